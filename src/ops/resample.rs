//! Nearest x2 upsampling, 2x2 average pooling, the skip concatenation and the per-channel bias
//! of a ResBlock's embedding, NHWC.

use rayon::prelude::*;

use super::{check_len, elements};
use crate::cuda::interface::{self as k, BiasArgs, ConcatArgs, ResampleArgs};
use crate::cuda::{grid_1d, Gpu, GpuBuffer, GpuFloat, KernelArgs};
use crate::error::Result;

/// x: `[n, h, w, c]` -> out: `[n, 2h, 2w, c]`.
pub fn upsample_nearest2x(x: &[f32], n: usize, h: usize, w: usize, c: usize, out: &mut [f32]) {
    let wo = 2 * w;
    out[..n * 2 * h * wo * c]
        .par_chunks_exact_mut(wo * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, yo) = (row / (2 * h), row % (2 * h));
            let src = &x[(b * h + yo / 2) * w * c..][..w * c];
            for xo in 0..wo {
                dst[xo * c..][..c].copy_from_slice(&src[(xo / 2) * c..][..c]);
            }
        });
}

/// x: `[n, h, w, c]` -> out: `[n, h/2, w/2, c]` (h, w even).
pub fn avg_pool2x(x: &[f32], n: usize, h: usize, w: usize, c: usize, out: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    out[..n * ho * wo * c]
        .par_chunks_exact_mut(wo * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, yo) = (row / ho, row % ho);
            let r0 = &x[(b * h + 2 * yo) * w * c..][..w * c];
            let r1 = &x[(b * h + 2 * yo + 1) * w * c..][..w * c];
            for xo in 0..wo {
                let (p, q) = (2 * xo * c, (2 * xo + 1) * c);
                for ch in 0..c {
                    dst[xo * c + ch] = (r0[p + ch] + r0[q + ch] + r1[p + ch] + r1[q + ch]) * 0.25;
                }
            }
        });
}

/// `cat([a, b], channels)`: a `[n, hw, ca]`, b `[n, hw, cb]` -> out `[n, hw, ca + cb]`.
pub fn concat_channels(
    a: &[f32],
    b: &[f32],
    n: usize,
    hw: usize,
    ca: usize,
    cb: usize,
    out: &mut [f32],
) {
    let c = ca + cb;
    for ((dst, pa), pb) in out[..n * hw * c]
        .chunks_exact_mut(c)
        .zip(a.chunks_exact(ca))
        .zip(b.chunks_exact(cb))
    {
        dst[..ca].copy_from_slice(pa);
        dst[ca..].copy_from_slice(pb);
    }
}

/// x `[n, hw, c]` += bias `[n, c]` at every pixel.
pub fn add_channel_bias(x: &mut [f32], bias: &[f32], n: usize, hw: usize, c: usize) {
    for (img, b) in x[..n * hw * c]
        .chunks_exact_mut(hw * c)
        .zip(bias.chunks_exact(c))
    {
        for px in img.chunks_exact_mut(c) {
            px.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

/// Whether the kernels can move RESAMPLE_VEC channels a thread: every channel count a multiple
/// of it and every pointer 16-byte aligned (`vec`); else one element a thread.
fn vectorised(channels: &[usize], pointers: &[u64]) -> bool {
    channels.iter().all(|c| c.is_multiple_of(k::RESAMPLE_VEC))
        && pointers.iter().all(|p| p.is_multiple_of(16))
}

/// Launches `kernel` over `outputs` elements, `vec` as [`vectorised`] decided it.
fn launch_elementwise<T: GpuFloat, A: KernelArgs>(
    gpu: &Gpu,
    kernel: &str,
    outputs: usize,
    vec: bool,
    args: &A,
) -> Result<()> {
    let per_thread = if vec { k::RESAMPLE_VEC } else { 1 };
    gpu.launch(
        "resample",
        &format!("{kernel}{}", T::SUFFIX),
        grid_1d(outputs.div_ceil(per_thread), k::RESAMPLE_THREADS),
        args,
    )
}

/// `kernels/resample.cu`: the device counterpart of [`upsample_nearest2x`].
pub fn upsample_nearest2x_gpu<T: GpuFloat>(
    gpu: &Gpu,
    x: &GpuBuffer<T>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    y: &mut GpuBuffer<T>,
) -> Result<()> {
    check_len(
        "upsample input",
        x.len(),
        elements("upsample input", &[n, h, w, c])?,
    )?;
    // The kernel forms 2h and 2w in 32 bits too.
    let (h2, w2) = (h.saturating_mul(2), w.saturating_mul(2));
    let out = elements("upsample output", &[n, h2, w2, c])?;
    check_len("upsample output", y.len(), out)?;
    resample::<T>(gpu, "upsample2x", out, x, y, [n, h, w, c])
}

/// The upsampling or pooling `kernel` of x `[n, h, w, c]` into y (sizes checked).
fn resample<T: GpuFloat>(
    gpu: &Gpu,
    kernel: &str,
    outputs: usize,
    x: &GpuBuffer<T>,
    y: &mut GpuBuffer<T>,
    [n, h, w, c]: [usize; 4],
) -> Result<()> {
    let (x, y) = (x.ptr(gpu), y.ptr(gpu));
    let vec = vectorised(&[c], &[x, y]);
    let i = |v: usize| v as i32;
    let args = ResampleArgs {
        x,
        y,
        n: i(n),
        h: i(h),
        w: i(w),
        c: i(c),
        vec: vec as i32,
        ..Default::default()
    };
    launch_elementwise::<T, _>(gpu, kernel, outputs, vec, &args)
}

/// `kernels/resample.cu`: the device counterpart of [`avg_pool2x`].
pub fn avg_pool2x_gpu<T: GpuFloat>(
    gpu: &Gpu,
    x: &GpuBuffer<T>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    y: &mut GpuBuffer<T>,
) -> Result<()> {
    check_len(
        "avgpool input",
        x.len(),
        elements("avgpool input", &[n, h, w, c])?,
    )?;
    let out = elements("avgpool output", &[n, h / 2, w / 2, c])?;
    check_len("avgpool output", y.len(), out)?;
    resample::<T>(gpu, "avgpool2x", out, x, y, [n, h, w, c])
}

/// `kernels/resample.cu`: `cat([a, b], channels)` in NHWC.
#[allow(clippy::too_many_arguments)]
pub fn concat_channels_gpu<T: GpuFloat>(
    gpu: &Gpu,
    a: &GpuBuffer<T>,
    b: &GpuBuffer<T>,
    n: usize,
    hw: usize,
    ca: usize,
    cb: usize,
    y: &mut GpuBuffer<T>,
) -> Result<()> {
    check_len("concat a", a.len(), elements("concat a", &[n, hw, ca])?)?;
    check_len("concat b", b.len(), elements("concat b", &[n, hw, cb])?)?;
    let out = elements("concat output", &[n, hw, ca.saturating_add(cb)])?;
    check_len("concat output", y.len(), out)?;
    let (a, b, y) = (a.ptr(gpu), b.ptr(gpu), y.ptr(gpu));
    let vec = vectorised(&[ca, cb], &[a, b, y]);
    let i = |v: usize| v as i32;
    let args = ConcatArgs {
        a,
        b,
        y,
        n: i(n),
        hw: i(hw),
        ca: i(ca),
        cb: i(cb),
        vec: vec as i32,
        ..Default::default()
    };
    launch_elementwise::<T, _>(gpu, "concat_channels", out, vec, &args)
}

/// `kernels/resample.cu`: x `[n, hw, c]` += bias `[n, c]` (the embedding without scale-shift).
pub fn add_channel_bias_gpu<T: GpuFloat>(
    gpu: &Gpu,
    x: &mut GpuBuffer<T>,
    bias: &GpuBuffer<f32>,
    n: usize,
    hw: usize,
    c: usize,
) -> Result<()> {
    let len = elements("bias target", &[n, hw, c])?;
    check_len("bias target", x.len(), len)?;
    check_len("bias", bias.len(), elements("bias", &[n, c])?)?;
    let (x, bias) = (x.ptr(gpu), bias.ptr(gpu));
    let vec = vectorised(&[c], &[x, bias]);
    let i = |v: usize| v as i32;
    let args = BiasArgs {
        x,
        bias,
        n: i(n),
        hw: i(hw),
        c: i(c),
        vec: vec as i32,
    };
    launch_elementwise::<T, _>(gpu, "add_channel_bias", len, vec, &args)
}
