//! Sinusoidal timestep embedding, guided-diffusion's `timestep_embedding`: **[cos | sin]**, or
//! diffusers' `get_timestep_embedding` with `flip_sin_to_cos` and `downscale_freq_shift`.

use cudarc::driver::LaunchConfig;

use super::{check_len, elements};
use crate::cuda::interface::{TimestepArgs, EMBEDDING_THREADS};
use crate::cuda::{Gpu, GpuBuffer};
use crate::error::Result;

/// How the time features are laid out: guided-diffusion's is `{ flip_sin_to_cos: true,
/// freq_shift: 0.0 }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimeFeatures {
    /// `[cos | sin]`, else `[sin | cos]`.
    pub flip_sin_to_cos: bool,
    /// Frequencies `10000^(-i / (half - freq_shift))`.
    pub freq_shift: f32,
}

impl TimeFeatures {
    pub const GUIDED_DIFFUSION: TimeFeatures = TimeFeatures {
        flip_sin_to_cos: true,
        freq_shift: 0.0,
    };
}

/// Writes `[t.len(), dim]`; the f32 operation order follows the reference so that fractional and
/// large timesteps give the same values.
pub fn timestep_embedding(t: &[f32], dim: usize, features: TimeFeatures, out: &mut [f32]) {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let divisor = half as f32 - features.freq_shift;
    let (first, second) = if features.flip_sin_to_cos {
        (f32::cos as fn(f32) -> f32, f32::sin as fn(f32) -> f32)
    } else {
        (f32::sin as fn(f32) -> f32, f32::cos as fn(f32) -> f32)
    };
    for (row, &tv) in out.chunks_exact_mut(dim).zip(t) {
        for i in 0..half {
            let freq = (log_period * i as f32 / divisor).exp();
            let arg = tv * freq;
            row[i] = first(arg);
            row[half + i] = second(arg);
        }
        if dim % 2 == 1 {
            row[dim - 1] = 0.0;
        }
    }
}

/// `kernels/linear.cu`: the device counterpart of [`timestep_embedding`] (f32).
pub fn timestep_embedding_gpu(
    gpu: &Gpu,
    t: &GpuBuffer<f32>,
    n: usize,
    dim: usize,
    features: TimeFeatures,
    out: &mut GpuBuffer<f32>,
) -> Result<()> {
    check_len("timesteps", t.len(), n)?;
    let len = elements("timestep embedding", &[n, dim])?;
    check_len("timestep embedding", out.len(), len)?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (EMBEDDING_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = TimestepArgs {
        t: t.ptr(gpu),
        y: out.ptr(gpu),
        n: n as i32,
        dim: dim as i32,
        flip_sin_to_cos: features.flip_sin_to_cos as i32,
        freq_shift: features.freq_shift,
    };
    gpu.launch("linear", "timestep_embedding_f32", cfg, &args)
}

#[cfg(test)]
mod tests {
    use super::{timestep_embedding, TimeFeatures};

    /// The reference's formula, `[cos(t f_i) | sin(t f_i)]` with `f_i = 10000^(-i / half)`, in
    /// f64; an odd width ends in a zero column (the reference pads one), whatever the buffer held.
    #[test]
    fn rows_are_cos_then_sin_and_odd_widths_end_in_zero() {
        let t = [0.0f32, 3.0, 17.5, 999.0];
        for dim in [2usize, 7, 8, 33] {
            let half = dim / 2;
            let mut out = vec![f32::NAN; t.len() * dim];
            timestep_embedding(&t, dim, TimeFeatures::GUIDED_DIFFUSION, &mut out);
            for (row, &tv) in out.chunks_exact(dim).zip(&t) {
                for i in 0..half {
                    let arg = tv as f64 * 10000f64.powf(-(i as f64) / half as f64);
                    assert!(
                        (row[i] as f64 - arg.cos()).abs() < 2e-4,
                        "dim {dim} t {tv} cos {i}"
                    );
                    let sin = row[half + i] as f64;
                    assert!((sin - arg.sin()).abs() < 2e-4, "dim {dim} t {tv} sin {i}");
                }
                if dim % 2 == 1 {
                    assert_eq!(row[dim - 1], 0.0, "dim {dim}: the padding column");
                }
            }
        }
    }

    /// diffusers' DDPM layout: `[sin | cos]`, frequencies `10000^(-i / (half - 1))`.
    #[test]
    fn sin_first_with_a_frequency_shift() {
        let (t, dim) = ([5.0f32, 640.0], 16usize);
        let features = TimeFeatures {
            flip_sin_to_cos: false,
            freq_shift: 1.0,
        };
        let mut out = vec![f32::NAN; t.len() * dim];
        timestep_embedding(&t, dim, features, &mut out);
        for (row, &tv) in out.chunks_exact(dim).zip(&t) {
            for i in 0..dim / 2 {
                let arg = tv as f64 * 10000f64.powf(-(i as f64) / (dim / 2 - 1) as f64);
                assert!((row[i] as f64 - arg.sin()).abs() < 2e-4, "t {tv} sin {i}");
                assert!(
                    (row[dim / 2 + i] as f64 - arg.cos()).abs() < 2e-4,
                    "t {tv} cos {i}"
                );
            }
        }
    }
}
