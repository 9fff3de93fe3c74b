//! LayerNorm over the last axis and the exact GELU, the transformer ops of the text encoder
//! (`crate::text`): the CPU references and their kernels (`kernels/layer_norm.cu`).

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::conv::check_len;
use crate::cuda::{grid_1d, Arg, Gpu, GpuBuffer, GpuFloat};
use crate::error::{Error, Result};

/// Threads per block of `layer_norm_*` (one block per row); `LN_THREADS` in the kernel file.
const LN_THREADS: u32 = 128;

/// LayerNorm over the last axis with biased variance, as `torch.nn.LayerNorm`.
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    /// Normalises each row of `x` (`[rows, width]`) in place.
    pub fn forward(&self, x: &mut [f32]) {
        let width = self.weight.len();
        x.par_chunks_mut(width).for_each(|row| {
            // Statistics in f64: with eps = 1e-12 nothing else guards against cancellation.
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (var + self.eps as f64).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *v = ((*v as f64 - mean) * inv) as f32 * w + b;
            }
        });
    }
}

/// GELU in its exact form, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// LayerNorm parameters on the device (f32, like the other norms).
pub struct GpuLayerNorm {
    pub width: usize,
    pub eps: f32,
    weight: GpuBuffer<f32>,
    bias: GpuBuffer<f32>,
}

impl LayerNorm {
    pub fn upload(&self, gpu: &Gpu) -> Result<GpuLayerNorm> {
        if self.bias.len() != self.weight.len() {
            return Err(Error::Cuda(format!(
                "layer norm: weight of {} and bias of {} values",
                self.weight.len(),
                self.bias.len()
            )));
        }
        Ok(GpuLayerNorm {
            width: self.weight.len(),
            eps: self.eps,
            weight: gpu.upload(&self.weight)?,
            bias: gpu.upload(&self.bias)?,
        })
    }
}

impl GpuLayerNorm {
    /// `kernels/layer_norm.cu`: y = LayerNorm(x), both `[rows, width]`.
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        rows: usize,
        y: &mut GpuBuffer<T>,
    ) -> Result<()> {
        check_len("layer norm input", x.len(), rows * self.width)?;
        check_len("layer norm output", y.len(), rows * self.width)?;
        self.launch::<T>(gpu, x.ptr(gpu), y.ptr(gpu), rows)
    }

    /// x = LayerNorm(x) in place (the kernel allows y to alias x), x `[rows, width]`.
    pub fn forward_in_place<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &mut GpuBuffer<T>,
        rows: usize,
    ) -> Result<()> {
        check_len("layer norm input", x.len(), rows * self.width)?;
        let p = x.ptr(gpu);
        self.launch::<T>(gpu, p, p, rows)
    }

    fn launch<T: GpuFloat>(&self, gpu: &Gpu, x: u64, y: u64, rows: usize) -> Result<()> {
        if rows == 0 || self.width == 0 {
            return Ok(());
        }
        let (rows_i, width_i) = match (i32::try_from(rows), i32::try_from(self.width)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                return Err(Error::Cuda(format!(
                    "layer norm of {rows} rows of {} is too large for one launch",
                    self.width
                )))
            }
        };
        // One block of LN_THREADS per row (see the kernel file).
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (LN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        gpu.launch(
            "layer_norm",
            &format!("layer_norm{}", T::SUFFIX),
            cfg,
            &[
                Arg::Ptr(x),
                Arg::Ptr(self.weight.ptr(gpu)),
                Arg::Ptr(self.bias.ptr(gpu)),
                Arg::Ptr(y),
                Arg::I32(rows_i),
                Arg::I32(width_i),
                Arg::F32(self.eps),
            ],
        )
    }
}

/// `kernels/layer_norm.cu`: the first `len` elements of `x` replaced by [`gelu`] of them.
pub fn gelu_gpu<T: GpuFloat>(gpu: &Gpu, x: &mut GpuBuffer<T>, len: usize) -> Result<()> {
    check_len("gelu", x.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    gpu.launch(
        "layer_norm",
        &format!("gelu{}", T::SUFFIX),
        grid_1d(len),
        // `long long len`: 8 bytes by value, which Arg::Ptr pushes (a u64).
        &[Arg::Ptr(x.ptr(gpu)), Arg::Ptr(len as u64)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_erf_form() {
        // Values of x * Phi(x) from the normal CDF.
        for (x, want) in [
            (0.0f32, 0.0f32),
            (1.0, 0.841_344_7),
            (-1.0, -0.158_655_3),
            (3.0, 2.995_950_4),
        ] {
            assert!((gelu(x) - want).abs() < 1e-6, "gelu({x}) = {}", gelu(x));
        }
    }

    #[test]
    fn layer_norm_standardises_rows() {
        let ln = LayerNorm {
            weight: vec![2.0; 4],
            bias: vec![1.0; 4],
            eps: 1e-12,
        };
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0];
        ln.forward(&mut x);
        let s = 1.0 / 1.25f32.sqrt();
        let want = [
            1.0 - 3.0 * s,
            1.0 - s,
            1.0 + s,
            1.0 + 3.0 * s,
            1.0,
            1.0,
            1.0,
            1.0,
        ];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{x:?}");
        }
    }
}
