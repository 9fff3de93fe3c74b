//! Linear layers (time-embedding MLP, condition projections).

use cudarc::driver::LaunchConfig;

use super::matmul::{matmul, Mat};
use super::{check_len, elements};
use crate::cuda::{Arg, Gpu, GpuBuffer};
use crate::error::Result;

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

/// A linear layer on the device, in f32 (the reference keeps the embedding path in f32).
pub struct GpuLinear {
    // Crate-visible only: they must stay those of the uploaded parameters.
    pub(crate) in_features: usize,
    pub(crate) out_features: usize,
    weight: GpuBuffer<f32>,
    bias: GpuBuffer<f32>,
}

impl Linear {
    pub fn upload(&self, gpu: &Gpu) -> Result<GpuLinear> {
        let (i, o) = (self.in_features, self.out_features);
        if Some(self.weight.len()) != i.checked_mul(o) || self.bias.len() != o {
            return Err(crate::Error::Input(format!(
                "a linear layer from {i} to {o} features needs {i}x{o} weights and {o} biases, \
                 got {} and {}",
                self.weight.len(),
                self.bias.len()
            )));
        }
        Ok(GpuLinear {
            in_features: self.in_features,
            out_features: self.out_features,
            weight: gpu.upload(&self.weight)?,
            bias: gpu.upload(&self.bias)?,
        })
    }
}

impl GpuLinear {
    /// `kernels/linear.cu`: y `[n, out]` = act(x) W^T + b, act = SiLU when `silu_in`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<f32>,
        n: usize,
        y: &mut GpuBuffer<f32>,
        silu_in: bool,
    ) -> Result<()> {
        check_len(
            "linear input",
            x.len(),
            elements("linear input", &[n, self.in_features])?,
        )?;
        let out = elements("linear output", &[n, self.out_features])?;
        check_len("linear output", y.len(), out)?;
        let cfg = LaunchConfig {
            // 32 outputs of 8 rows a block (`LINEAR_ROWS` in kernels/linear.cu).
            grid_dim: (
                self.out_features.div_ceil(32) as u32,
                n.div_ceil(8) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let i = |v: usize| Arg::I32(v as i32);
        gpu.launch(
            "linear",
            "linear_f32",
            cfg,
            &[
                Arg::Ptr(x.ptr(gpu)),
                Arg::Ptr(self.weight.ptr(gpu)),
                Arg::Ptr(self.bias.ptr(gpu)),
                Arg::Ptr(y.ptr(gpu)),
                i(n),
                i(self.in_features),
                i(self.out_features),
                i(silu_in as usize),
            ],
        )
    }
}
