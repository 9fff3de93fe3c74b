//! The network's operations. Each file holds one op family: its API and its CPU reference
//! (NHWC, f32, multithreaded), the function every GPU kernel in `kernels/` is checked against.

pub mod attention;
pub mod conv;
pub mod embedding;
pub mod group_norm;
pub mod layer_norm;
pub mod layout;
pub mod linear;
pub mod matmul;
pub mod resample;
pub mod step;

/// SiLU (swish): x * sigmoid(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
