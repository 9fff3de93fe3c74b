//! Activation buffers for the forward pass, recycled across layers and calls.
//!
//! Every activation is taken from the pool and given back when its last reader is done, so after
//! the first forward pass at a given batch and image size no layer allocates.

/// A pool of f32 buffers.
#[derive(Default)]
pub struct Workspace {
    free: Vec<Vec<f32>>,
    /// im2col scratch for convolutions.
    pub(crate) scratch: Vec<f32>,
    /// The largest forward pass (in floats) already checked against the available memory.
    pub(crate) memory_checked: usize,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer of `len` floats with unspecified contents: the smallest free one that fits, else
    /// a new one.
    pub fn take(&mut self, len: usize) -> Vec<f32> {
        let best = best_fit(self.free.iter().map(Vec::capacity), len);
        let mut buf = match best {
            Some(i) => self.free.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        buf.resize(len, 0.0);
        buf
    }

    /// Returns a buffer to the pool.
    pub fn give(&mut self, buf: Vec<f32>) {
        self.free.push(buf);
    }

    /// Bytes held by the pool (free buffers and scratch).
    pub fn bytes(&self) -> usize {
        (self.free.iter().map(Vec::capacity).sum::<usize>() + self.scratch.capacity()) * 4
    }
}

/// The memory this machine can give a process now, in bytes (Linux: `MemAvailable` of
/// /proc/meminfo, else `MemTotal`), where known: requests past it are refused up front, since
/// where memory is overcommitted they would otherwise be granted and fail later, or abort the
/// process.
pub(crate) fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<usize> {
        let kib: usize = info
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    field("MemAvailable:").or_else(|| field("MemTotal:"))
}

/// An error when `what` needs more than the `bytes` of memory this machine has available.
pub fn check_host_memory(bytes: usize, what: &str) -> crate::Result<()> {
    match available_memory() {
        Some(available) if bytes > available => Err(crate::Error::Input(format!(
            "{what} needs about {} of memory, more than the {} this machine has available",
            crate::error::human_bytes(bytes),
            crate::error::human_bytes(available)
        ))),
        _ => Ok(()),
    }
}

/// Index of the smallest capacity that holds `len`, if any: the pools' reuse rule.
pub(crate) fn best_fit(capacities: impl Iterator<Item = usize>, len: usize) -> Option<usize> {
    capacities
        .enumerate()
        .filter(|&(_, cap)| cap >= len)
        .min_by_key(|&(_, cap)| cap)
        .map(|(i, _)| i)
}
