//! Benchmark support: what the device reaches at all, the yardstick of the kernel table.

pub mod peak;
