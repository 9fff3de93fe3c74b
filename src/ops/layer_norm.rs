//! LayerNorm over the last axis and the exact GELU, the transformer ops of the text encoder
//! (`crate::text`): the CPU references and their kernels (`kernels/layer_norm.cu`).

use cudarc::driver::LaunchConfig;
use multiversion::multiversion;
use rayon::prelude::*;

use super::{check_len, elements};
use crate::cuda::interface::{self as k, GeluArgs, LayerNormArgs};
use crate::cuda::{grid_1d, Gpu, GpuBuffer, GpuFloat};
use crate::error::{Error, Result};

/// LayerNorm over the last axis with biased variance, as `torch.nn.LayerNorm`.
#[derive(Clone)]
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

/// GELU in its exact form, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, in f64.
#[inline]
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    // Clamped at 0: near erf = -1 the fit's 2.7e-9 could make Phi slightly negative.
    let phi = (0.5 * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))).max(0.0);
    (x * phi) as f32
}

/// [`gelu`] of every element, compiled for AVX-512/AVX2 with run-time dispatch.
#[multiversion(targets = "simd")]
pub fn gelu_in_place(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = gelu(*v));
}

/// erf(z) = z P(z^2) / Q(z^2), z clamped to [-6, 6] (erf(6) = 1 - 2e-17): within 2.7e-9 of the
/// exact value, relative. Unlike libm's erf it has no branches, so loops over slices vectorise.
#[inline]
fn erf(z: f64) -> f64 {
    let z = z.clamp(-6.0, 6.0);
    let s = z * z;
    let p = ERF_P.iter().rev().fold(0.0, |acc, &c| acc * s + c);
    let q = ERF_Q.iter().rev().fold(0.0, |acc, &c| acc * s + c);
    z * p / q
}

// Made by tools/fit_erf.py (a least-squares fit in relative error against mpmath's erf).
const ERF_P: [f64; 10] = [
    1.128379167942922,
    0.15134162774732923,
    0.049779844485396206,
    0.002417633067882944,
    0.00031326300815648383,
    -2.2395997223368063e-06,
    7.182593957352289e-08,
    -3.4489029386501974e-09,
    9.53298903670612e-11,
    5.672562511704072e-13,
];
const ERF_Q: [f64; 10] = [
    1.0,
    0.4674564141136463,
    0.09993463757837276,
    0.012519089220638666,
    0.0009559677881389711,
    3.884969721180267e-05,
    -5.916448489568124e-07,
    5.310830229163688e-09,
    -1.7643021240200843e-10,
    1.385172240825445e-11,
];

/// LayerNorm parameters on the device (f32, like the other norms).
pub struct GpuLayerNorm {
    // Crate-visible only: they must stay those of the uploaded parameters.
    pub(crate) width: usize,
    pub(crate) eps: f32,
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
        let len = elements("layer norm", &[rows, self.width])?;
        check_len("layer norm input", x.len(), len)?;
        check_len("layer norm output", y.len(), len)?;
        self.launch::<T>(gpu, x.ptr(gpu), y.ptr(gpu), rows)
    }

    /// x = LayerNorm(x) in place (the kernel allows y to alias x), x `[rows, width]`.
    pub fn forward_in_place<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &mut GpuBuffer<T>,
        rows: usize,
    ) -> Result<()> {
        check_len(
            "layer norm input",
            x.len(),
            elements("layer norm", &[rows, self.width])?,
        )?;
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
            block_dim: (k::LN_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = LayerNormArgs {
            x,
            gamma: self.weight.ptr(gpu),
            beta: self.bias.ptr(gpu),
            y,
            rows: rows_i,
            width: width_i,
            eps: self.eps,
            ..Default::default()
        };
        gpu.launch(
            "layer_norm",
            &format!("layer_norm{}", T::SUFFIX),
            cfg,
            &args,
        )
    }
}

/// `kernels/layer_norm.cu`: the first `len` elements of `x` replaced by [`gelu`] of them.
pub fn gelu_gpu<T: GpuFloat>(gpu: &Gpu, x: &mut GpuBuffer<T>, len: usize) -> Result<()> {
    check_len("gelu", x.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let args = GeluArgs {
        x: x.ptr(gpu),
        len: len as i64,
    };
    gpu.launch(
        "layer_norm",
        &format!("gelu{}", T::SUFFIX),
        grid_1d(len, k::GELU_THREADS),
        &args,
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
    fn gelu_matches_libm_erf_over_its_range() {
        // libm's f64 erf (an independent implementation) as the reference, x in [-12, 12].
        let mut worst = 0f64;
        for i in 0..=2_400_000 {
            let x = (-12.0 + 24.0 * i as f64 / 2_400_000.0) as f32;
            let got = gelu(x) as f64;
            // The exact value at the f32 x; f32 rounding of the result plus the fit's 2.7e-9.
            let x32 = x as f64;
            let exact = 0.5 * x32 * (1.0 + libm::erf(x32 * std::f64::consts::FRAC_1_SQRT_2));
            let bound = exact.abs() * f32::EPSILON as f64 + 3e-9 * x32.abs();
            let diff = (got - exact).abs();
            assert!(diff <= bound, "gelu({x}) = {got}, want {exact}");
            if bound > 0.0 {
                worst = worst.max(diff / bound);
            }
        }
        eprintln!("worst error {worst:.2} of the bound");
        assert!(gelu(f32::NAN).is_nan());
        assert_eq!(gelu(40.0), 40.0);
        assert_eq!(gelu(-40.0), 0.0);
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
