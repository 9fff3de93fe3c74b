//! Device buffers and a pool that recycles them across layers and steps.

use cudarc::driver::{CudaSlice, DevicePtr};

use super::{Gpu, GpuFloat};
use crate::error::Result;
use crate::memory::best_fit;

/// A device array of `len` elements (the allocation may be larger when recycled).
pub struct GpuBuffer<T> {
    slice: CudaSlice<T>,
    len: usize,
}

impl<T: GpuFloat> GpuBuffer<T> {
    pub(crate) fn new(slice: CudaSlice<T>, len: usize) -> Self {
        GpuBuffer { slice, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub(crate) fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }
    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
    fn capacity(&self) -> usize {
        self.slice.len()
    }
    /// The device address of element `offset` (checked against the length).
    pub(crate) fn ptr_at(&self, gpu: &Gpu, offset: usize) -> u64 {
        assert!(
            offset <= self.len,
            "offset {offset} past a buffer of {}",
            self.len
        );
        let (p, _sync) = self.slice.device_ptr(gpu.stream());
        p + (offset * std::mem::size_of::<T>()) as u64
    }
    pub(crate) fn ptr(&self, gpu: &Gpu) -> u64 {
        self.ptr_at(gpu, 0)
    }
}

/// Recycles device buffers by size, so that after the first pass no layer allocates.
pub struct GpuPool<T> {
    free: Vec<GpuBuffer<T>>,
    allocations: usize,
}

impl<T: GpuFloat> Default for GpuPool<T> {
    fn default() -> Self {
        GpuPool {
            free: Vec::new(),
            allocations: 0,
        }
    }
}

impl<T: GpuFloat> GpuPool<T> {
    /// A buffer of `len` elements, contents unspecified.
    pub fn take(&mut self, gpu: &Gpu, len: usize) -> Result<GpuBuffer<T>> {
        let best = best_fit(self.free.iter().map(GpuBuffer::capacity), len);
        match best {
            Some(i) => {
                let mut b = self.free.swap_remove(i);
                b.len = len;
                Ok(b)
            }
            None => {
                self.allocations += 1;
                gpu.zeros(len)
            }
        }
    }
    /// Buffers allocated so far: a stretch of work that leaves it unchanged (and gives back what
    /// it took) will, repeated, allocate nothing, whatever order best fit hands buffers out in.
    pub fn allocations(&self) -> usize {
        self.allocations
    }
    pub fn give(&mut self, buf: GpuBuffer<T>) {
        self.free.push(buf);
    }
}
