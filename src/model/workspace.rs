//! Activation buffers for the forward pass, recycled across layers and calls.
//!
//! Every activation is taken from the pool and given back when its last reader is done, so after
//! the first forward pass at a given batch and image size no layer allocates.

use crate::memory::best_fit;

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
