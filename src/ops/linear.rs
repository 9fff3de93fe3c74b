//! Linear layers (time-embedding MLP, condition projections).

use super::matmul::{matmul, Mat};

/// `y = x W^T + b` with PyTorch's weight layout `[out, in]`.
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Linear {
    /// x: `[n, in]`, out: `[n, out]`.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let (i, o) = (self.in_features, self.out_features);
        for row in out[..n * o].chunks_exact_mut(o) {
            row.copy_from_slice(&self.bias);
        }
        matmul(
            out,
            o,
            n,
            o,
            i,
            Mat::rows(x, i),
            Mat::transposed(&self.weight, i),
            true,
            1.0,
            true,
        );
    }
}
