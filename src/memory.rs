//! Memory planning: what this machine can give, and the reuse rule of the buffer pools (host
//! and device) that let a forward pass after the first allocate nothing.

use crate::error::{human_bytes, Error, Result};

/// The memory this machine can give a process now, in bytes (Linux: `MemAvailable` of
/// /proc/meminfo, else `MemTotal`), where known: requests past it are refused up front, since
/// where memory is overcommitted they would otherwise be granted and fail later, or abort the
/// process.
pub fn available_memory() -> Option<usize> {
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
pub fn check_host_memory(bytes: usize, what: &str) -> Result<()> {
    match available_memory() {
        Some(available) if bytes > available => Err(Error::Input(format!(
            "{what} needs about {} of memory, more than the {} this machine has available",
            human_bytes(bytes),
            human_bytes(available)
        ))),
        _ => Ok(()),
    }
}

/// Index of the smallest capacity that holds `len`, if any: the pools' reuse rule.
pub fn best_fit(capacities: impl Iterator<Item = usize>, len: usize) -> Option<usize> {
    capacities
        .enumerate()
        .filter(|&(_, cap)| cap >= len)
        .min_by_key(|&(_, cap)| cap)
        .map(|(i, _)| i)
}
