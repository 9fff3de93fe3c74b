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
    #[error("{path}: a PyTorch checkpoint mcdm cannot read: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` has dtype {dtype}, expected {expected}")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
        expected: &'static str,
    },
    #[error("{path}: tensor `{name}` holds {count} non-finite value(s) (NaN or inf)")]
    NonFinite {
        path: PathBuf,
        name: String,
        count: usize,
    },
    /// `present` lists the tensors the file has, for the message.
    #[error("{path}: no tensor `{name}` (the file holds {present})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        present: String,
    },
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
    /// A result left the range of its number format (NaN or inf): a model or an input is out
    /// of scale.
    #[error("{0}")]
    Numeric(String),
    /// A job file or a term spec that cannot be read (the message names the file or flag).
    #[error("{0}")]
    Job(String),
    /// An allocation the device could not satisfy; the sampler retries with smaller batches.
    #[error(
        "CUDA: allocating {} on {device} failed: out of device memory ({} free)",
        human_bytes(*.bytes), human_bytes(*.free)
    )]
    OutOfMemory {
        device: String,
        bytes: usize,
        free: usize,
    },
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

/// `bytes` in B, KiB, MiB or GiB, whichever reads best.
pub(crate) fn human_bytes(bytes: usize) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    for unit in ["KiB", "MiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.1} GiB")
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_in_the_best_unit() {
        use super::human_bytes;
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(141 << 30), "141.0 GiB");
        // A whole unit reads in that unit.
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1 << 10), "1.0 KiB");
        assert_eq!(human_bytes(1 << 20), "1.0 MiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
