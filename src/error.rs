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
    /// An allocation the device could not satisfy; the sampler retries with smaller batches.
    #[error(
        "CUDA: allocating {:.1} MiB on {device} failed: out of device memory ({:.1} MiB free)",
        *.bytes as f64 / MIB, *.free as f64 / MIB
    )]
    OutOfMemory {
        device: String,
        bytes: usize,
        free: usize,
    },
}

const MIB: f64 = (1 << 20) as f64;

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
}
