//! The kernel table (`mcdm bench --kernels`): single kernels at the layer shapes of the
//! ImageNet-64 ADM and 256x256 face workloads, each timed by CUDA events and stated as a share
//! of the device's measured peaks.

use super::peak::{
    blocks_to_fill, compute_peak, compute_peak_gpu, compute_reference, copy_gpu, BLOCK,
    MAX_EXACT_ROUNDS,
};
use crate::cuda::{Gpu, GpuFloat};
use crate::device::DType;
use crate::error::{Error, Result};

/// What this GPU reaches at all (`kernels/peak.cu`), the yardsticks of the kernel table.
#[derive(Clone, Debug)]
pub struct Peaks {
    /// Tensor-core (f16/bf16) or FMA (f32) throughput, TFLOP/s.
    pub tflops: f64,
    /// DRAM bandwidth of a streaming copy, GB/s (bytes read plus bytes written).
    pub gbs: f64,
    /// The instruction the compute peak issues, and its kernel in `kernels/peak.cu`.
    pub instruction: &'static str,
    pub kernel: &'static str,
    /// The compute launch: blocks of [`BLOCK`] threads, and rounds a thread.
    pub blocks: usize,
    pub rounds: usize,
    /// Bytes of each of the two buffers the copy streams between.
    pub copy_bytes: usize,
}

/// How a kernel's rate is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Multiply-adds times two, TFLOP/s, against [`Peaks::tflops`].
    Tflops,
    /// Bytes read plus written, GB/s, against [`Peaks::gbs`].
    Gbs,
}

/// One timed kernel.
#[derive(Clone, Debug)]
pub struct KernelRow {
    /// The kernel (`conv3x3 tile128 (auto)`, `attention`, ...) and the shape it ran.
    pub kernel: String,
    pub shape: String,
    /// Median milliseconds.
    pub ms: f64,
    /// In `unit`.
    pub rate: f64,
    pub unit: Unit,
    /// `rate` as a fraction of the matching peak.
    pub share: f64,
}

/// Median GPU seconds of `iters` calls of `f` (after one warm-up): the time of its kernels,
/// from CUDA events around each launch, so that a kernel of a few microseconds is not
/// measured as the host's launch and synchronisation latency.
pub fn time_gpu(gpu: &Gpu, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        gpu.profile_start()?;
        f()?;
        let kernels = gpu.profile_finish()?;
        times.push(kernels.iter().map(|k| k.ms).sum::<f64>() / 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Times the compute-peak kernel for `dtype` (its output checked against the CPU reference, so
/// that the timed work is known to be done) and a copy between two buffers far larger than
/// the L2 cache.
pub fn measure_peaks(gpu: &Gpu, dtype: DType, iters: usize) -> Result<Peaks> {
    match dtype {
        DType::Bf16 => peaks::<half::bf16>(gpu, iters),
        DType::F16 => peaks::<half::f16>(gpu, iters),
        DType::F32 => peaks::<f32>(gpu, iters),
    }
}

fn peaks<T: GpuFloat>(g: &Gpu, iters: usize) -> Result<Peaks> {
    let peak = compute_peak::<T>()?;
    let blocks = blocks_to_fill(g);
    let mut out = g.zeros::<f32>(blocks * BLOCK)?;
    // Rounds for about 20 ms a launch, from a short probe.
    let probe = 256;
    let probe_secs = time_gpu(g, 1, || {
        compute_peak_gpu::<T>(g, &mut out, blocks, probe).map(drop)
    })?;
    let rounds = ((probe as f64 * 0.02 / probe_secs) as usize).clamp(probe, MAX_EXACT_ROUNDS);
    let mut flop = 0.0;
    let secs = time_gpu(g, iters, || {
        flop = compute_peak_gpu::<T>(g, &mut out, blocks, rounds)?;
        Ok(())
    })?;
    let want = compute_reference::<T>(rounds);
    if let Some(bad) = g.download(&out)?.into_iter().find(|&v| v != want) {
        return Err(Error::Cuda(format!(
            "{} returned {bad} where {want} was due: not all the timed work was done",
            peak.kernel
        )));
    }
    // Two buffers of up to 1 GiB each (at most a quarter of the free memory each), each at least
    // 4x the L2 cache, so that the copy streams from and to DRAM.
    let (free, _) = g.memory()?;
    let floats = (free / 16).min(1 << 28) / 4 * 4;
    let l2 = g.info().l2_cache_bytes;
    if floats * 4 < 4 * l2 {
        return Err(Error::Cuda(format!(
            "measuring DRAM bandwidth needs {} MiB of free GPU memory (two buffers of 4x the L2 \
             cache, each at most a quarter of the free memory), and {} MiB are free",
            (16 * l2) >> 20,
            free >> 20
        )));
    }
    let x = g.zeros::<f32>(floats)?;
    let mut y = g.zeros::<f32>(floats)?;
    let mut bytes = 0.0;
    let copy_secs = time_gpu(g, iters, || {
        bytes = copy_gpu(g, &x, &mut y, blocks)?;
        Ok(())
    })?;
    Ok(Peaks {
        tflops: flop / secs / 1e12,
        gbs: bytes / copy_secs / 1e9,
        instruction: peak.instruction,
        kernel: peak.kernel,
        blocks,
        rounds,
        copy_bytes: floats * 4,
    })
}

/// Times every kernel of the table in `dtype` (each the median of `iters` runs), reporting
/// each row as it is measured.
pub fn time_kernels(
    gpu: &Gpu,
    dtype: DType,
    iters: usize,
    peaks: &Peaks,
    on_row: &mut dyn FnMut(KernelRow),
) -> Result<()> {
    match dtype {
        DType::Bf16 => kernels::<half::bf16>(gpu, iters, peaks, on_row),
        DType::F16 => kernels::<half::f16>(gpu, iters, peaks, on_row),
        DType::F32 => kernels::<f32>(gpu, iters, peaks, on_row),
    }
}

fn kernels<T: GpuFloat>(
    g: &Gpu,
    iters: usize,
    peaks: &Peaks,
    on_row: &mut dyn FnMut(KernelRow),
) -> Result<()> {
    use crate::ops::attention::attend_gpu;
    use crate::ops::conv::{Conv2d, ConvInput, ConvKernel, Residual};
    use crate::ops::group_norm::GroupNorm;
    use crate::ops::linear::Linear;
    use crate::ops::resample::{concat_channels_gpu, upsample_nearest2x_gpu};
    let fill = |len: usize| {
        (0..len)
            .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect::<Vec<f32>>()
    };
    let mut row = |kernel: String, shape: String, secs: f64, amount: f64, unit: Unit| {
        let (rate, peak) = match unit {
            Unit::Tflops => (amount / secs / 1e12, peaks.tflops),
            Unit::Gbs => (amount / secs / 1e9, peaks.gbs),
        };
        on_row(KernelRow {
            kernel,
            shape,
            ms: secs * 1e3,
            rate,
            unit,
            share: rate / peak,
        });
    };
    // Convolutions: every kernel variant that can run the shape (`auto` marks the one
    // `forward` picks), so a GPU run shows which wins where.
    for &(n, h, w, cin, cout, k) in &[
        (64, 32, 32, 384, 384, 3),
        (8, 128, 128, 192, 192, 3),
        (8, 32, 32, 384, 768, 3),
        (8, 64, 64, 384, 384, 1),
        // ImageNet-64 ADM, 64 images x 4 experts: 64x64 at 192, 16x16 at 576, 8x8 at 768.
        (256, 64, 64, 192, 192, 3),
        (256, 16, 16, 576, 576, 3),
        (256, 8, 8, 768, 768, 3),
        // 256 face model, 8 images x 4 experts, at 256x256.
        (32, 256, 256, 192, 192, 3),
        // Small grids, where auto falls back to 64x64 tiles (under 264 large blocks): one
        // expert's deepest levels, ImageNet-64 ADM at batch 64 and the face model at batch 8.
        (64, 8, 8, 768, 768, 3),
        (8, 16, 16, 768, 768, 3),
        (8, 8, 8, 768, 768, 3),
    ] {
        let conv =
            Conv2d::from_torch(&fill(cout * cin * k * k), vec![0.0; cout], k, 1).upload::<T>(g)?;
        let x = g.upload::<T>(&fill(n * h * w * cin))?;
        let mut y = g.zeros::<T>(n * h * w * cout)?;
        let auto = conv.choose_kernel(g, &x, n, h, w);
        let flop = 2.0 * (n * h * w * cout * cin * k * k) as f64;
        for kern in ConvKernel::ALL {
            if !conv.supports(g, kern, &x) {
                continue;
            }
            let secs = time_gpu(g, iters, || {
                conv.forward_with(g, kern, &x, n, h, w, &mut y, Residual::None)
            })?;
            let auto = if kern == auto { " (auto)" } else { "" };
            row(
                format!("conv{k}x{k} {}{auto}", kern.name()),
                format!("n{n} {h}x{w} {cin}->{cout}"),
                secs,
                flop,
                Unit::Tflops,
            );
        }
    }
    // The copies folded into a conv's addressing, beside the copy kernels below: the decoder's
    // 3x3 conv reading its concatenation from two tensors (ImageNet-64 ADM, 64 images x 4
    // experts, 32x32 at 384 + 384), and one reading a 2x upsampling of a 16x16 input; and the
    // group norm + SiLU applied as the conv reads (64x64 at 192, beside the plain conv above
    // and the norm below).
    for &(n, h, w, ca, cb, cout, up, normed) in &[
        (256, 32, 32, 384, 384, 384, false, false),
        (256, 32, 32, 384, 0, 384, true, false),
        (256, 64, 64, 192, 0, 192, false, true),
    ] {
        let conv = Conv2d::from_torch(&fill(cout * (ca + cb) * 9), vec![0.0; cout], 3, 1)
            .upload::<T>(g)?;
        let (sh, sw) = if up { (h / 2, w / 2) } else { (h, w) };
        let a = g.upload::<T>(&fill(n * sh * sw * ca))?;
        let b = g.upload::<T>(&fill(n * sh * sw * cb.max(1)))?;
        let table = g.upload::<f32>(&fill(n * (ca + cb) * 2))?;
        let input = ConvInput {
            x: &a,
            second: (cb > 0).then_some((&b, cb)),
            upsampled: up,
            norm: normed.then_some((&table, true)),
        };
        let mut y = g.zeros::<T>(n * h * w * cout)?;
        let kern = conv.choose_kernel(g, input, n, h, w);
        let secs = time_gpu(g, iters, || {
            conv.forward_with(g, kern, input, n, h, w, &mut y, Residual::None)
        })?;
        let (what, shape) = if up {
            (
                "upsample-read",
                format!("n{n} {sh}x{sw}->{h}x{w} {ca}->{cout}"),
            )
        } else if normed {
            ("norm+SiLU-read", format!("n{n} {h}x{w} {ca}->{cout}"))
        } else {
            ("concat-read", format!("n{n} {h}x{w} {ca}+{cb}->{cout}"))
        };
        let flop = 2.0 * (n * h * w * cout * (ca + cb) * 9) as f64;
        let name = format!("conv3x3 {what} {} (auto)", kern.name());
        row(name, shape, secs, flop, Unit::Tflops);
    }
    for &(n, t, c, heads) in &[(64, 256, 768, 12), (8, 1024, 384, 6), (8, 4096, 192, 3)] {
        let qkv = g.upload::<T>(&fill(n * t * 3 * c))?;
        let mut out = g.zeros::<T>(n * t * c)?;
        let secs = time_gpu(g, iters, || attend_gpu(g, &qkv, n, t, c, heads, &mut out))?;
        let flop = 4.0 * (n * t * t * c) as f64;
        let shape = format!("n{n} t{t} c{c} heads{heads}");
        row("attention".into(), shape, secs, flop, Unit::Tflops);
    }
    for &(n, hw, c) in &[
        (8, 256 * 256, 192),
        (8, 128 * 128, 192),
        (256, 64 * 64, 192),
        (64, 32 * 32, 384),
        (64, 8 * 8, 1536),
    ] {
        let gn = GroupNorm {
            channels: c,
            groups: crate::ops::group_norm::GROUPS,
            weight: vec![1.0; c],
            bias: vec![0.0; c],
            eps: crate::ops::group_norm::EPS,
        }
        .upload(g)?;
        let x = g.upload::<T>(&fill(n * hw * c))?;
        let mut y = g.zeros::<T>(n * hw * c)?;
        let mut stats = g.zeros::<f32>(gn.scratch_len(n, hw))?;
        let secs = time_gpu(g, iters, || {
            gn.forward(g, &x, n, hw, &mut y, &mut stats, None, true)
        })?;
        // Statistics read x once, the apply pass reads x and writes y.
        let bytes = 3.0 * (n * hw * c * std::mem::size_of::<T>()) as f64;
        let shape = format!("n{n} hw{hw} c{c}");
        row("group norm + SiLU".into(), shape, secs, bytes, Unit::Gbs);
    }
    // The decoder's upsampling and skip concatenations: bytes read plus written.
    let elem = std::mem::size_of::<T>();
    for &(n, h, w, c) in &[(64, 32, 32, 384), (8, 128, 128, 192)] {
        let x = g.upload::<T>(&fill(n * h * w * c))?;
        let mut y = g.zeros::<T>(4 * n * h * w * c)?;
        let secs = time_gpu(g, iters, || {
            upsample_nearest2x_gpu(g, &x, n, h, w, c, &mut y)
        })?;
        let bytes = (5 * n * h * w * c * elem) as f64;
        let shape = format!("n{n} {h}x{w} c{c}");
        row("upsample x2".into(), shape, secs, bytes, Unit::Gbs);
    }
    for &(n, hw, ca, cb) in &[(64, 64 * 64, 192, 192), (8, 256 * 256, 192, 192)] {
        let a = g.upload::<T>(&fill(n * hw * ca))?;
        let b = g.upload::<T>(&fill(n * hw * cb))?;
        let mut y = g.zeros::<T>(n * hw * (ca + cb))?;
        let secs = time_gpu(g, iters, || {
            concat_channels_gpu(g, &a, &b, n, hw, ca, cb, &mut y)
        })?;
        let bytes = (2 * n * hw * (ca + cb) * elem) as f64;
        let shape = format!("n{n} hw{hw} {ca}+{cb}");
        row("concat".into(), shape, secs, bytes, Unit::Gbs);
    }
    // A ResBlock's embedding projection (f32, every storage type): ImageNet-64 ADM's widest,
    // for the 64 images of one expert; weight, input and output bytes.
    let (n, fin, fout) = (64, 768, 1536);
    let linear = Linear {
        in_features: fin,
        out_features: fout,
        weight: fill(fin * fout),
        bias: fill(fout),
    }
    .upload(g)?;
    let x = g.upload::<f32>(&fill(n * fin))?;
    let mut y = g.zeros::<f32>(n * fout)?;
    let secs = time_gpu(g, iters, || linear.forward(g, &x, n, &mut y, true))?;
    let bytes = (4 * (fin * fout + n * fin + n * fout)) as f64;
    let shape = format!("n{n} {fin}->{fout}");
    row("linear f32 + SiLU in".into(), shape, secs, bytes, Unit::Gbs);
    Ok(())
}
