//! Benchmark support: what the device reaches at all (`peak`), and the kernel table timed
//! against it (`kernels`).

pub mod kernels;
pub mod peak;
