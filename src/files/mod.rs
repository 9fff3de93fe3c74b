//! Files mcdm reads and writes: inputs read only when they are regular files below a size
//! limit, outputs written so that a reader never sees half of one.

mod read;
mod write;

pub use read::*;
pub use write::write_atomic;
