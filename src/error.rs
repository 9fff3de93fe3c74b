//! Typed errors of the library. The CLI wraps them with `anyhow` context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message includes the cause, so it is not chained again as a source.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` holds {count} non-finite value(s) (NaN or inf)")]
    NonFinite {
        path: PathBuf,
        name: String,
        count: usize,
    },
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("weights do not fit the config:\n{0}")]
    WeightsMismatch(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("invalid diffusion settings: {0}")]
    Diffusion(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
}
