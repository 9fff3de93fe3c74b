//! Spatial self-attention of guided-diffusion's `AttentionBlock`, NHWC.
//!
//! The qkv projection is stored in the "new" order (all q, then all k, then all v, each
//! head-major); legacy checkpoints are permuted at load ([`legacy_qkv_to_new_order`]), so one
//! attention routine serves both orders. The T x T score matrix is formed in row chunks.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::conv::{Conv2d, GpuConv2d, Residual};
use super::group_norm::{GpuGroupNorm, GroupNorm};
use super::matmul::{matmul, Mat};
use super::{check_len, elements};
use crate::cuda::buffer::GpuPool;
use crate::cuda::interface::{self as k, AttentionArgs};
use crate::cuda::{Gpu, GpuBuffer, GpuFloat};
use crate::error::Result;

/// Query rows per task.
const QUERY_CHUNK: usize = 64;

/// Row permutation for the legacy order: new row `s*C + h*d + j` is legacy row
/// `h*3d + s*d + j` (`s` in q, k, v), as `QKVAttentionLegacy` reshapes to `(B*H, 3d, T)`.
pub fn legacy_qkv_to_new_order(
    rows: &[f32],
    row_len: usize,
    channels: usize,
    heads: usize,
) -> Vec<f32> {
    let d = channels / heads;
    let mut out = vec![0.0; rows.len()];
    for s in 0..3 {
        for h in 0..heads {
            for j in 0..d {
                let new = s * channels + h * d + j;
                let old = h * 3 * d + s * d + j;
                out[new * row_len..][..row_len].copy_from_slice(&rows[old * row_len..][..row_len]);
            }
        }
    }
    out
}

pub struct Attention {
    pub channels: usize,
    pub heads: usize,
    pub norm: GroupNorm,
    /// 1x1, `channels -> 3 * channels`, in the new order.
    pub qkv: Conv2d,
    /// 1x1, `channels -> channels`.
    pub proj_out: Conv2d,
}

impl Attention {
    /// x, out: `[n, t, c]`, out = x + proj_out(attention(qkv(norm(x)))).
    /// `normed` (n*t*c), `qkv` (n*t*3c) and `heads_out` (n*t*c) are scratch buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        t: usize,
        out: &mut [f32],
        normed: &mut [f32],
        qkv: &mut [f32],
        heads_out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let c = self.channels;
        self.norm.forward(x, n, t, normed, None, false);
        self.qkv.forward(normed, n, t, 1, qkv, false, scratch);
        attend(qkv, n, t, c, self.heads, heads_out);
        out[..n * t * c].copy_from_slice(&x[..n * t * c]);
        self.proj_out
            .forward(heads_out, n, t, 1, out, true, scratch);
    }
}

/// Softmax attention per head: qkv `[n, t, 3c]` (new order) -> out `[n, t, c]`
/// (channel `h*d + j`), scores scaled by 1/sqrt(d), softmax in f32.
pub fn attend(qkv: &[f32], n: usize, t: usize, c: usize, heads: usize, out: &mut [f32]) {
    let d = c / heads;
    let scale = 1.0 / (d as f32).sqrt();
    out[..n * t * c]
        .par_chunks_mut(t * c)
        .enumerate()
        .for_each(|(b, out_b)| {
            let qkv_b = &qkv[b * t * 3 * c..][..t * 3 * c];
            out_b
                .par_chunks_mut(QUERY_CHUNK * c)
                .enumerate()
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, (chunk, out_rows)| {
                    let q0 = chunk * QUERY_CHUNK;
                    let rows = out_rows.len() / c;
                    scores.resize(rows * t, 0.0);
                    for h in 0..heads {
                        let q = &qkv_b[q0 * 3 * c + h * d..];
                        let k = &qkv_b[c + h * d..];
                        let v = &qkv_b[2 * c + h * d..];
                        matmul(
                            scores,
                            t,
                            rows,
                            t,
                            d,
                            Mat {
                                data: q,
                                rs: 3 * c,
                                cs: 1,
                            },
                            Mat {
                                data: k,
                                rs: 1,
                                cs: 3 * c,
                            },
                            false,
                            scale,
                            false,
                        );
                        scores.chunks_exact_mut(t).for_each(super::softmax_in_place);
                        matmul(
                            &mut out_rows[h * d..],
                            c,
                            rows,
                            d,
                            t,
                            Mat::rows(scores, t),
                            Mat {
                                data: v,
                                rs: 3 * c,
                                cs: 1,
                            },
                            false,
                            1.0,
                            false,
                        );
                    }
                });
        });
}

/// An attention block on the device.
pub struct GpuAttention<T> {
    // Crate-visible only: they must stay those of the uploaded parameters.
    pub(crate) channels: usize,
    pub(crate) heads: usize,
    pub(crate) norm: GpuGroupNorm,
    pub(crate) qkv: GpuConv2d<T>,
    pub(crate) proj_out: GpuConv2d<T>,
}

impl Attention {
    pub fn upload<T: GpuFloat>(&self, gpu: &Gpu) -> Result<GpuAttention<T>> {
        let c = self.channels;
        let shapes = [
            (self.norm.channels, c),
            (self.qkv.cin, c),
            (self.qkv.cout, 3 * c),
            (self.proj_out.cin, c),
            (self.proj_out.cout, c),
        ];
        if self.qkv.kernel != 1 || self.proj_out.kernel != 1 || shapes.iter().any(|(a, b)| a != b) {
            return Err(crate::Error::Input(format!(
                "an attention block over {c} channels needs a norm over {c}, a 1x1 qkv conv to \
                 {} and a 1x1 projection to {c}",
                3 * c
            )));
        }
        Ok(GpuAttention {
            channels: self.channels,
            heads: self.heads,
            norm: self.norm.upload(gpu)?,
            qkv: self.qkv.upload(gpu)?,
            proj_out: self.proj_out.upload(gpu)?,
        })
    }
}

impl<T: GpuFloat> GpuAttention<T> {
    /// out = x + proj_out(attention(qkv(norm(x)))), x and out `[n, t, c]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        n: usize,
        t: usize,
        out: &mut GpuBuffer<T>,
        pool: &mut GpuPool<T>,
        stats: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        let c = self.channels;
        let mut normed = pool.take(gpu, elements("attention", &[n, t, c])?)?;
        self.norm
            .forward(gpu, x, n, t, &mut normed, stats, None, false)?;
        let mut qkv = pool.take(gpu, elements("attention qkv", &[n, t, 3, c])?)?;
        self.qkv
            .forward(gpu, &normed, n, t, 1, &mut qkv, Residual::None)?;
        attend_gpu(gpu, &qkv, n, t, c, self.heads, &mut normed)?;
        self.proj_out
            .forward(gpu, &normed, n, t, 1, out, Residual::Buffer(x))?;
        pool.give(normed);
        pool.give(qkv);
        Ok(())
    }
}

/// Dynamic shared memory of the 16-bit attention kernel for heads up to `dmax` wide and tiles
/// of `keys` keys: two stages of K and V tiles, rows of `dmax + 8` values (`ATT_SMEM`).
fn mma_shared_bytes(dmax: usize, keys: usize) -> u32 {
    (2 * 2 * keys * (dmax + 8) * 2) as u32
}

/// `kernels/attention.cu`: the device counterpart of [`attend`].
pub fn attend_gpu<T: GpuFloat>(
    gpu: &Gpu,
    qkv: &GpuBuffer<T>,
    n: usize,
    t: usize,
    c: usize,
    heads: usize,
    out: &mut GpuBuffer<T>,
) -> Result<()> {
    check_len(
        "attention qkv",
        qkv.len(),
        elements("attention qkv", &[n, t, 3, c])?,
    )?;
    check_len(
        "attention output",
        out.len(),
        elements("attention", &[n, t, c])?,
    )?;
    let d = c.checked_div(heads).unwrap_or(0);
    if d == 0 || d > k::ATT_DMAX || !d.is_multiple_of(8) || !c.is_multiple_of(heads) {
        return Err(crate::Error::Cuda(format!(
            "attention head width {c}/{heads} is unsupported on the GPU (needs a multiple of 8, at \
             most {})",
            k::ATT_DMAX
        )));
    }
    // 16-bit types: heads up to 64 wide take the kernel sized for them (fewer registers, wider
    // key tiles); both copy 16-byte rows of qkv with cp.async into dynamic shared memory.
    let (kernel, shared_mem_bytes) = match (std::mem::size_of::<T>(), d <= k::ATT_D64_DMAX) {
        (4, _) => ("attention", 0),
        (_, true) => (
            "attention_d64",
            mma_shared_bytes(k::ATT_D64_DMAX, k::ATT_D64_BKV),
        ),
        (_, false) => (
            "attention",
            mma_shared_bytes(k::ATT_WIDE_DMAX, k::ATT_WIDE_BKV),
        ),
    };
    if shared_mem_bytes > 0 && !qkv.ptr(gpu).is_multiple_of(16) {
        return Err(crate::Error::Cuda(
            "attention: qkv must be 16-byte aligned".into(),
        ));
    }
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(k::ATT_BQ) as u32, heads as u32, n as u32),
        block_dim: (k::ATT_THREADS as u32, 1, 1),
        shared_mem_bytes,
    };
    let args = AttentionArgs {
        qkv: qkv.ptr(gpu),
        out: out.ptr(gpu),
        n: n as i32,
        t: t as i32,
        c: c as i32,
        heads: heads as i32,
    };
    gpu.launch("attention", &format!("{kernel}{}", T::SUFFIX), cfg, &args)
}
