//! GroupNorm (32 groups and eps 1e-5 unless the model says otherwise) fused with the optional
//! scale-shift of `use_scale_shift_norm` and SiLU, NHWC. Statistics in f64 on the CPU (the
//! reference computes them in f32).

use cudarc::driver::LaunchConfig;
use multiversion::multiversion;
use rayon::prelude::*;

use super::silu;
use super::{check_len, elements, int_product};
use crate::cuda::interface::{
    self as k, GroupNormApplyArgs, GroupNormApplyPoolArgs, GroupNormChannelAffineArgs,
    GroupNormMergeArgs, GroupNormMergeChannelsArgs, GroupNormStatsArgs,
};
use crate::cuda::{Gpu, GpuBuffer, GpuFloat};
use crate::error::Result;

/// guided-diffusion's group count (GroupNorm32).
pub const GROUPS: usize = 32;
/// guided-diffusion's eps (GroupNorm32).
pub const EPS: f64 = 1e-5;
/// The widest group norm the GPU kernel takes.
pub const MAX_CHANNELS: usize = k::GN_MAX_CHANNELS;

#[derive(Clone)]
pub struct GroupNorm {
    pub channels: usize,
    /// Groups of `channels / groups` channels ([`GROUPS`] in guided-diffusion).
    pub groups: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// Added to the variance inside the root ([`EPS`] in guided-diffusion).
    pub eps: f64,
}

impl GroupNorm {
    /// x, out: `[n, hw, c]`. `scale_shift`: `[n, 2c]` (scale first, as `chunk(emb_out, 2)`),
    /// applied as `GN(x) * (1 + scale) + shift`; then SiLU when `silu_after`.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        hw: usize,
        out: &mut [f32],
        scale_shift: Option<&[f32]>,
        silu_after: bool,
    ) {
        let c = self.channels;
        let cg = c / self.groups;
        let rows = c * PIXELS_PER_TASK;
        x[..n * hw * c]
            .par_chunks(hw * c)
            .zip(out[..n * hw * c].par_chunks_mut(hw * c))
            .enumerate()
            .for_each(|(b, (img, out_img))| {
                // Per-channel sums over pixel chunks, merged in chunk order (so the result does
                // not depend on how rayon split the work), then per group.
                let parts: Vec<(Vec<f64>, Vec<f64>)> =
                    img.par_chunks(rows).map(|r| channel_sums(r, c)).collect();
                let (mut sum, mut sq) = (vec![0f64; c], vec![0f64; c]);
                for (s, q) in &parts {
                    sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                    sq.iter_mut().zip(q).for_each(|(a, b)| *a += b);
                }
                let count = (hw * cg) as f64;
                let mut mul = vec![0f32; c];
                let mut add = vec![0f32; c];
                for g in 0..self.groups {
                    let s: f64 = sum[g * cg..][..cg].iter().sum();
                    let q: f64 = sq[g * cg..][..cg].iter().sum();
                    let mean = s / count;
                    let var = (q / count - mean * mean).max(0.0);
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    for ch in g * cg..(g + 1) * cg {
                        // y = (x - mean) * rstd * gamma + beta, folded with (1 + scale) and shift.
                        let (scale, shift) = match scale_shift {
                            Some(ss) => (ss[b * 2 * c + ch] as f64, ss[b * 2 * c + c + ch] as f64),
                            None => (0.0, 0.0),
                        };
                        let gamma = self.weight[ch] as f64 * rstd;
                        mul[ch] = (gamma * (1.0 + scale)) as f32;
                        add[ch] =
                            ((self.bias[ch] as f64 - mean * gamma) * (1.0 + scale) + shift) as f32;
                    }
                }
                out_img
                    .par_chunks_mut(rows)
                    .zip(img.par_chunks(rows))
                    .for_each(|(o, i)| apply(o, i, &mul, &add, silu_after));
            });
    }
}

/// Pixels per parallel task of the CPU group norm.
const PIXELS_PER_TASK: usize = 64;

/// Per-channel sum and sum of squares of `[pixels, c]` rows, in f64.
#[multiversion(targets = "simd")]
fn channel_sums(rows: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let mut sum = vec![0f64; c];
    let mut sq = vec![0f64; c];
    for px in rows.chunks_exact(c) {
        for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(px) {
            let v = v as f64;
            *s += v;
            *q += v * v;
        }
    }
    (sum, sq)
}

/// `out = x * mul + add` per channel over `[pixels, c]` rows, then SiLU when `silu_after`.
#[multiversion(targets = "simd")]
fn apply(out: &mut [f32], x: &[f32], mul: &[f32], add: &[f32], silu_after: bool) {
    let c = mul.len();
    for (po, pi) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (((y, &x), &m), &a) in po.iter_mut().zip(pi).zip(mul).zip(add) {
            *y = x * m + a;
        }
    }
    // A separate pass, so that both loops vectorise.
    if silu_after {
        out.iter_mut().for_each(|y| *y = silu(*y));
    }
}

/// GroupNorm parameters on the device (f32, as the reference keeps norms in f32).
pub struct GpuGroupNorm {
    // Crate-visible only: it must stay that of the uploaded parameters.
    pub(crate) channels: usize,
    groups: usize,
    weight: GpuBuffer<f32>,
    bias: GpuBuffer<f32>,
    eps: f32,
}

/// Per-channel moments on the device, as a conv's epilogue makes them
/// (`GpuConv2d::forward_moments`): `part` f32 `[n, chunks, c, 3]`.
#[derive(Clone, Copy)]
pub struct GpuMoments<'a> {
    pub part: &'a GpuBuffer<f32>,
    pub chunks: usize,
}

impl GroupNorm {
    pub fn upload(&self, gpu: &Gpu) -> Result<GpuGroupNorm> {
        let (c, groups) = (self.channels, self.groups);
        if c == 0 || !c.is_multiple_of(k::GN_VEC) || c > MAX_CHANNELS {
            return Err(crate::Error::Input(format!(
                "group norm over {c} channels: the kernel takes multiples of {} up to {MAX_CHANNELS}",
                k::GN_VEC
            )));
        }
        if groups == 0 || !c.is_multiple_of(groups) || groups > k::GN_THREADS {
            return Err(crate::Error::Input(format!(
                "group norm over {c} channels in {groups} groups: the groups must divide the \
                 channels, and the GPU kernels take at most {} groups",
                k::GN_THREADS
            )));
        }
        if self.weight.len() != c || self.bias.len() != c {
            return Err(crate::Error::Input(format!(
                "group norm over {c} channels: {} weights and {} biases",
                self.weight.len(),
                self.bias.len()
            )));
        }
        Ok(GpuGroupNorm {
            channels: self.channels,
            groups,
            weight: gpu.upload(&self.weight)?,
            bias: gpu.upload(&self.bias)?,
            eps: self.eps as f32,
        })
    }
}

/// Elements per block of the apply kernel: threads x 8 channels x `GN_APPLY_ITERS`.
const APPLY_ELEMENTS_PER_BLOCK: usize = k::GN_APPLY_THREADS * k::GN_VEC * k::GN_APPLY_ITERS;

/// Pixels per block of the statistics kernel: about 1024 blocks in all, at least 32 rows each.
fn stats_rows(n: usize, hw: usize) -> usize {
    (n * hw).div_ceil(1024).max(32)
}

/// See [`GpuGroupNorm::scratch_len`].
fn scratch_len(n: usize, hw: usize, groups: usize) -> usize {
    let chunks = hw.div_ceil(32).min(1024 / n.max(1) + 1);
    n * groups * (2 + 3 * chunks)
}

impl GpuGroupNorm {
    /// The f32 scratch [`GpuGroupNorm::forward`] needs for `n` images of at most `hw` pixels:
    /// the statistics `[n, groups, 2]`, then the per-chunk moments `[n, chunks, groups, 3]`,
    /// with chunks <= min(ceil(hw / 32), 1024 / n + 1) (see `stats_rows`), so one scratch sized
    /// for the largest level serves every level.
    pub fn scratch_len(&self, n: usize, hw: usize) -> usize {
        scratch_len(n, hw, self.groups)
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// [`GpuGroupNorm::forward`] (or [`GpuGroupNorm::forward_concat`] with `second`: the
    /// tensor of the channels past the first `ca`, and its moments) with the statistics merged
    /// from the per-channel moments the convs that made x made (`GpuConv2d::forward_moments`)
    /// instead of a pass over x. `stats` holds `[n, groups, 2]` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_from_moments<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        (x, moments): (&GpuBuffer<T>, GpuMoments<'_>),
        second: Option<(&GpuBuffer<T>, usize, GpuMoments<'_>)>,
        [n, hw]: [usize; 2],
        y: &mut GpuBuffer<T>,
        stats: &mut GpuBuffer<f32>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu_after: bool,
    ) -> Result<()> {
        let c = self.channels;
        let ca = second.map_or(c, |(_, ca, _)| ca);
        if let Some((b, _, _)) = second {
            if !self.takes_concat(gpu, b, ca) {
                return Err(crate::Error::Cuda(format!(
                    "group norm over {c} channels cannot read them as {ca} + {} from two tensors",
                    c.saturating_sub(ca)
                )));
            }
            check_len(
                "group norm input (second tensor)",
                b.len(),
                elements("group norm", &[n, hw, c - ca])?,
            )?;
        }
        check_len(
            "group norm input",
            x.len(),
            elements("group norm", &[n, hw, ca])?,
        )?;
        check_aligned(x.ptr(gpu))?;
        let second_moments = second.map(|(_, _, m)| m);
        let stats = self.merge_channel_moments(gpu, (moments, ca), second_moments, n, stats)?;
        let second = second.map(|(b, ca, _)| (b, ca));
        self.apply(gpu, x, second, n, hw, y, stats, scale_shift, silu_after)
    }

    /// `kernels/group_norm.cu`: statistics (per-chunk moments, merged) then the fused affine
    /// (+ scale-shift, + SiLU). `scratch` holds [`GpuGroupNorm::scratch_len`] floats;
    /// `scale_shift` is `[n, 2c]` f32.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        n: usize,
        hw: usize,
        y: &mut GpuBuffer<T>,
        scratch: &mut GpuBuffer<f32>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu_after: bool,
    ) -> Result<()> {
        self.run(gpu, x, None, n, hw, y, scratch, scale_shift, silu_after)
    }

    /// Whether [`GpuGroupNorm::forward_concat`] takes a concatenation whose first tensor has
    /// `ca` channels (whole 16-byte packs of eight channels in each tensor).
    pub fn takes_concat<T: GpuFloat>(&self, gpu: &Gpu, b: &GpuBuffer<T>, ca: usize) -> bool {
        ca > 0
            && ca < self.channels
            && ca.is_multiple_of(k::GN_VEC)
            && b.ptr(gpu).is_multiple_of(16)
    }

    /// [`GpuGroupNorm::forward`] of the channel concatenation `cat([a, b])` (a `[n, hw, ca]`,
    /// b the other channels), read from the two tensors (see [`GpuGroupNorm::takes_concat`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_concat<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        [a, b]: [&GpuBuffer<T>; 2],
        ca: usize,
        n: usize,
        hw: usize,
        y: &mut GpuBuffer<T>,
        scratch: &mut GpuBuffer<f32>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu_after: bool,
    ) -> Result<()> {
        if !self.takes_concat(gpu, b, ca) {
            return Err(crate::Error::Cuda(format!(
                "group norm over {} channels cannot read them as {ca} + {} from two tensors",
                self.channels,
                self.channels.saturating_sub(ca)
            )));
        }
        self.run(
            gpu,
            a,
            Some((b, ca)),
            n,
            hw,
            y,
            scratch,
            scale_shift,
            silu_after,
        )
    }

    /// [`GpuGroupNorm::forward`] without scale-shift, then 2x2 average pooling, in one pass
    /// over the output: x `[n, h, w, c]` (h and w even) -> y `[n, h/2, w/2, c]` (a
    /// downsampling ResBlock's normalised branch; `group_norm_apply_pool` in
    /// `kernels/group_norm.cu`). `scratch` holds [`GpuGroupNorm::scratch_len`] of `h * w`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_pool<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        [n, h, w]: [usize; 3],
        y: &mut GpuBuffer<T>,
        scratch: &mut GpuBuffer<f32>,
        silu_after: bool,
    ) -> Result<()> {
        check_pool_sides(h, w)?;
        int_product("group norm image", &[h, w, self.channels])?;
        let stats = self.statistics(gpu, x, None, n, h * w, scratch)?;
        self.apply_pool(gpu, x, [n, h, w], y, stats, silu_after)
    }

    /// [`GpuGroupNorm::forward_pool`] with the statistics from the per-channel moments of the
    /// conv that made x (see [`GpuGroupNorm::forward_from_moments`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_pool_from_moments<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        (x, moments): (&GpuBuffer<T>, GpuMoments<'_>),
        [n, h, w]: [usize; 3],
        y: &mut GpuBuffer<T>,
        stats: &mut GpuBuffer<f32>,
        silu_after: bool,
    ) -> Result<()> {
        let c = self.channels;
        check_pool_sides(h, w)?;
        check_len(
            "group norm input",
            x.len(),
            elements("group norm", &[n, h, w, c])?,
        )?;
        check_aligned(x.ptr(gpu))?;
        let stats = self.merge_channel_moments(gpu, (moments, c), None, n, stats)?;
        self.apply_pool(gpu, x, [n, h, w], y, stats, silu_after)
    }

    /// The norm, then `* (1 + scale) + shift`, as one affine map per image and channel, for a
    /// conv that applies it (and the SiLU) as it reads x (`ConvInput::norm`): `table` f32
    /// `[n, c, 2]` of `(mul, add)`, from the statistics of x `[n, hw, ca]` (and of `second`, the
    /// tensor of the channels past the first `ca`, see [`GpuGroupNorm::takes_concat`]).
    /// `scratch` holds [`GpuGroupNorm::scratch_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn channel_table<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        second: Option<(&GpuBuffer<T>, usize)>,
        [n, hw]: [usize; 2],
        scratch: &mut GpuBuffer<f32>,
        scale_shift: Option<&GpuBuffer<f32>>,
        table: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        if let Some((b, ca)) = second {
            if !self.takes_concat(gpu, b, ca) {
                return Err(crate::Error::Cuda(format!(
                    "group norm over {} channels cannot read them as {ca} + {} from two tensors",
                    self.channels,
                    self.channels.saturating_sub(ca)
                )));
            }
        }
        let stats = self.statistics(gpu, x, second, n, hw, scratch)?;
        self.affine_table(gpu, stats, n, scale_shift, table)
    }

    /// [`GpuGroupNorm::channel_table`] with the statistics merged from the per-channel moments
    /// of channels 0 .. ca and of the others in `second` (as
    /// [`GpuGroupNorm::forward_from_moments`]); `stats` holds `[n, groups, 2]` floats.
    #[allow(clippy::too_many_arguments)]
    pub fn channel_table_from_moments(
        &self,
        gpu: &Gpu,
        first: (GpuMoments<'_>, usize),
        second: Option<GpuMoments<'_>>,
        n: usize,
        stats: &mut GpuBuffer<f32>,
        scale_shift: Option<&GpuBuffer<f32>>,
        table: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        let stats = self.merge_channel_moments(gpu, first, second, n, stats)?;
        self.affine_table(gpu, stats, n, scale_shift, table)
    }

    /// The launch of `group_norm_channel_affine` with the statistics at device address
    /// `stats`.
    fn affine_table(
        &self,
        gpu: &Gpu,
        stats: u64,
        n: usize,
        scale_shift: Option<&GpuBuffer<f32>>,
        table: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        let c = self.channels;
        check_len(
            "group norm table",
            table.len(),
            elements("group norm table", &[n, c, 2])?,
        )?;
        let i = |v: usize| v as i32;
        gpu.launch(
            "group_norm",
            "group_norm_channel_affine",
            LaunchConfig {
                grid_dim: (c.div_ceil(k::GN_AFFINE_THREADS) as u32, n as u32, 1),
                block_dim: (k::GN_AFFINE_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &GroupNormChannelAffineArgs {
                stats,
                gamma: self.weight.ptr(gpu),
                beta: self.bias.ptr(gpu),
                scale_shift: scale_shift_ptr(gpu, scale_shift, n, c)?,
                table: table.ptr(gpu),
                c: i(c),
                groups: i(self.groups),
                group_channels: i(c / self.groups),
                ..Default::default()
            },
        )
    }

    /// The apply-and-pool launch with the statistics at device address `stats` (the sides
    /// checked even by the caller).
    fn apply_pool<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        [n, h, w]: [usize; 3],
        y: &mut GpuBuffer<T>,
        stats: u64,
        silu_after: bool,
    ) -> Result<()> {
        let c = self.channels;
        int_product("group norm image", &[h, w, c])?;
        let out = elements("group norm + pooling output", &[n, h / 2, w / 2, c])?;
        check_len("group norm + pooling output", y.len(), out)?;
        check_aligned(y.ptr(gpu))?;
        let i = |v: usize| v as i32;
        gpu.launch(
            "group_norm",
            &format!("group_norm_apply_pool{}", T::SUFFIX),
            LaunchConfig {
                grid_dim: (
                    (h / 2 * (w / 2) * c).div_ceil(k::GN_APPLY_THREADS * k::GN_VEC) as u32,
                    n as u32,
                    1,
                ),
                block_dim: (k::GN_APPLY_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &GroupNormApplyPoolArgs {
                x: x.ptr(gpu),
                stats,
                gamma: self.weight.ptr(gpu),
                beta: self.bias.ptr(gpu),
                y: y.ptr(gpu),
                h: i(h),
                w: i(w),
                c: i(c),
                silu: silu_after as i32,
                groups: i(self.groups),
                group_channels: i(c / self.groups),
            },
        )
    }

    /// The statistics launches (per-chunk moments, merged) over x, or over x and `second` (the
    /// tensor holding the channels past the first `ca`); returns the device address of the
    /// statistics `[n, groups, 2]` in `scratch`.
    fn statistics<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        second: Option<(&GpuBuffer<T>, usize)>,
        n: usize,
        hw: usize,
        scratch: &mut GpuBuffer<f32>,
    ) -> Result<u64> {
        let c = self.channels;
        elements("group norm", &[n, hw, c])?;
        // The apply kernels index one image in 32 bits.
        int_product("group norm image", &[hw, c])?;
        let ca = second.map_or(c, |(_, ca)| ca);
        check_len("group norm input", x.len(), n * hw * ca)?;
        if let Some((b, _)) = second {
            check_len(
                "group norm input (second tensor)",
                b.len(),
                n * hw * (c - ca),
            )?;
        }
        check_aligned(x.ptr(gpu))?;
        let rows = stats_rows(n, hw);
        let chunks = hw.div_ceil(rows);
        let groups = self.groups;
        check_len(
            "group norm scratch",
            scratch.len(),
            n * groups * (2 + 3 * chunks),
        )?;
        let (x2, c1) = second.map_or((0, 0), |(b, ca)| (b.ptr(gpu), ca as i32));
        let stats = scratch.ptr(gpu);
        let part = stats + (n * groups * 2 * std::mem::size_of::<f32>()) as u64;
        let i = |v: usize| v as i32;
        gpu.launch(
            "group_norm",
            &format!("group_norm_partial{}", T::SUFFIX),
            LaunchConfig {
                grid_dim: (chunks as u32, n as u32, 1),
                block_dim: (k::GN_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &GroupNormStatsArgs {
                x: x.ptr(gpu),
                part,
                hw: i(hw),
                c: i(c),
                rows: i(rows),
                x2,
                c1,
                groups: i(groups),
                group_channels: i(c / groups),
                ..Default::default()
            },
        )?;
        self.merge(gpu, part, stats, n, chunks)?;
        Ok(stats)
    }

    /// The launch of `group_norm_merge_channels`: the statistics, into `stats` (`[n, groups,
    /// 2]`; its device address is returned), from the per-channel moments of channels 0 .. ca
    /// and of the others in `second`.
    fn merge_channel_moments(
        &self,
        gpu: &Gpu,
        (first, ca): (GpuMoments<'_>, usize),
        second: Option<GpuMoments<'_>>,
        n: usize,
        stats: &mut GpuBuffer<f32>,
    ) -> Result<u64> {
        let (c, groups) = (self.channels, self.groups);
        let part_len = |m: GpuMoments<'_>, channels: usize| -> Result<()> {
            let len = elements("group norm moments", &[n, m.chunks, channels, 3])?;
            check_len("group norm moments", m.part.len(), len)
        };
        part_len(first, ca)?;
        if let Some(m) = second {
            part_len(m, c - ca)?;
        }
        check_len("group norm statistics", stats.len(), n * groups * 2)?;
        let (part2, chunks2) = second.map_or((0, 0), |m| (m.part.ptr(gpu), m.chunks));
        let i = |v: usize| v as i32;
        gpu.launch(
            "group_norm",
            "group_norm_merge_channels",
            LaunchConfig {
                grid_dim: (groups as u32, n as u32, 1),
                block_dim: (k::GN_MERGE_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &GroupNormMergeChannelsArgs {
                part: first.part.ptr(gpu),
                chunks: i(first.chunks),
                c1: i(ca),
                part2,
                chunks2: i(chunks2),
                c: i(c),
                stats: stats.ptr(gpu),
                eps: self.eps,
                groups: i(groups),
                group_channels: i(c / groups),
                ..Default::default()
            },
        )?;
        Ok(stats.ptr(gpu))
    }

    /// The merge launch: the moments at device address `part` (`[n, chunks, groups, 3]`) into
    /// the statistics at `stats` (`[n, groups, 2]`).
    fn merge(&self, gpu: &Gpu, part: u64, stats: u64, n: usize, chunks: usize) -> Result<()> {
        let groups = self.groups;
        gpu.launch(
            "group_norm",
            "group_norm_merge",
            LaunchConfig {
                grid_dim: (groups as u32, n as u32, 1),
                block_dim: (k::GN_MERGE_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &GroupNormMergeArgs {
                part,
                stats,
                chunks: chunks as i32,
                eps: self.eps,
                groups: groups as i32,
                ..Default::default()
            },
        )
    }

    /// The statistics, then the apply launch; `second`: the tensor holding the channels past
    /// the first `ca`.
    #[allow(clippy::too_many_arguments)]
    fn run<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        second: Option<(&GpuBuffer<T>, usize)>,
        n: usize,
        hw: usize,
        y: &mut GpuBuffer<T>,
        scratch: &mut GpuBuffer<f32>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu_after: bool,
    ) -> Result<()> {
        let stats = self.statistics(gpu, x, second, n, hw, scratch)?;
        self.apply(gpu, x, second, n, hw, y, stats, scale_shift, silu_after)
    }

    /// The apply launch with the statistics at device address `stats` (`[n, groups, 2]`).
    #[allow(clippy::too_many_arguments)]
    fn apply<T: GpuFloat>(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        second: Option<(&GpuBuffer<T>, usize)>,
        n: usize,
        hw: usize,
        y: &mut GpuBuffer<T>,
        stats: u64,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu_after: bool,
    ) -> Result<()> {
        let c = self.channels;
        let len = elements("group norm", &[n, hw, c])?;
        int_product("group norm image", &[hw, c])?;
        check_len("group norm output", y.len(), len)?;
        check_aligned(y.ptr(gpu))?;
        let ss = scale_shift_ptr(gpu, scale_shift, n, c)?;
        let (x2, c1) = second.map_or((0, 0), |(b, ca)| (b.ptr(gpu), ca as i32));
        let i = |v: usize| v as i32;
        gpu.launch(
            "group_norm",
            &format!("group_norm_apply{}", T::SUFFIX),
            LaunchConfig {
                grid_dim: (
                    (hw * c).div_ceil(APPLY_ELEMENTS_PER_BLOCK) as u32,
                    n as u32,
                    1,
                ),
                block_dim: (k::GN_APPLY_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            &GroupNormApplyArgs {
                x: x.ptr(gpu),
                stats,
                gamma: self.weight.ptr(gpu),
                beta: self.bias.ptr(gpu),
                scale_shift: ss,
                y: y.ptr(gpu),
                hw: i(hw),
                c: i(c),
                silu: silu_after as i32,
                x2,
                c1,
                groups: i(self.groups),
                group_channels: i(c / self.groups),
                ..Default::default()
            },
        )
    }
}

/// The device address of a scale-shift `[n, 2c]` (scale first), or 0 without one.
fn scale_shift_ptr(
    gpu: &Gpu,
    scale_shift: Option<&GpuBuffer<f32>>,
    n: usize,
    c: usize,
) -> Result<u64> {
    match scale_shift {
        Some(b) => {
            check_len("scale-shift", b.len(), n * 2 * c)?;
            Ok(b.ptr(gpu))
        }
        None => Ok(0),
    }
}

/// Group norm + 2x2 pooling takes whole windows.
fn check_pool_sides(h: usize, w: usize) -> Result<()> {
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        return Err(crate::Error::Input(format!(
            "group norm + 2x2 pooling of {h}x{w} images: the sides must be even"
        )));
    }
    Ok(())
}

/// The kernels move eight channels at a time, in 16-byte accesses.
fn check_aligned(ptr: u64) -> Result<()> {
    if !ptr.is_multiple_of(16) {
        return Err(crate::Error::Cuda(
            "group norm: x and y must be 16-byte aligned".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's GroupNorm (biased variance, eps inside the root), then `* (1 + scale) + shift`
    /// and SiLU, in f64.
    fn reference(
        gn: &GroupNorm,
        x: &[f32],
        n: usize,
        hw: usize,
        ss: Option<&[f32]>,
        silu: bool,
    ) -> Vec<f64> {
        let (c, cg) = (gn.channels, gn.channels / gn.groups);
        let mut y = vec![0f64; x.len()];
        for b in 0..n {
            for g in 0..gn.groups {
                let at = |p: usize, k: usize| (b * hw + p) * c + g * cg + k;
                let values = (0..hw).flat_map(|p| (0..cg).map(move |k| (p, k)));
                let count = (hw * cg) as f64;
                let mean = values.clone().map(|(p, k)| x[at(p, k)] as f64).sum::<f64>() / count;
                let var = values
                    .clone()
                    .map(|(p, k)| (x[at(p, k)] as f64 - mean).powi(2))
                    .sum::<f64>()
                    / count;
                for (p, k) in values {
                    let ch = g * cg + k;
                    let mut v = (x[at(p, k)] as f64 - mean) / (var + gn.eps).sqrt()
                        * gn.weight[ch] as f64
                        + gn.bias[ch] as f64;
                    if let Some(ss) = ss {
                        v = v * (1.0 + ss[b * 2 * c + ch] as f64) + ss[b * 2 * c + c + ch] as f64;
                    }
                    if silu {
                        v /= 1.0 + (-v).exp();
                    }
                    y[at(p, k)] = v;
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_the_f64_formula() {
        let mut state = 0x9e37_79b9_u32;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            2.0 * (state as f32 / u32::MAX as f32) - 1.0
        };
        // (n, hw, c, groups, input spread, scale-shift, SiLU, eps). Spread 1e-3 is a nearly flat
        // image: its variance (3e-7) is below eps, so eps sets the scale (diffusers' DDPM models
        // use 1e-6).
        for (n, hw, c, groups, spread, with_ss, silu, eps) in [
            (2, 5, 32, GROUPS, 1.0, true, true, EPS),
            (1, 130, 64, GROUPS, 3.0, false, false, EPS),
            (3, 7, 96, GROUPS, 1.0, true, false, EPS),
            (2, 9, 64, GROUPS, 1e-3, false, true, EPS),
            (2, 9, 64, GROUPS, 1e-3, false, true, 1e-6),
            (2, 11, 48, 8, 1.0, true, true, EPS),
            (1, 70, 40, 1, 2.0, false, false, EPS),
            (1, 6, 24, 24, 1.0, false, true, EPS),
        ] {
            let gn = GroupNorm {
                channels: c,
                groups,
                weight: (0..c).map(|_| 1.0 + 0.5 * uniform()).collect(),
                bias: (0..c).map(|_| 0.5 * uniform()).collect(),
                eps,
            };
            let x: Vec<f32> = (0..n * hw * c).map(|_| 0.05 + spread * uniform()).collect();
            let ss: Vec<f32> = (0..n * 2 * c).map(|_| 0.5 * uniform()).collect();
            let ss = with_ss.then_some(&ss[..]);
            let mut got = vec![f32::NAN; x.len()];
            gn.forward(&x, n, hw, &mut got, ss, silu);
            let want = reference(&gn, &x, n, hw, ss, silu);
            let err: f64 = got
                .iter()
                .zip(&want)
                .map(|(&g, w)| (g as f64 - w).powi(2))
                .sum();
            let norm: f64 = want.iter().map(|w| w * w).sum();
            let rel = (err / norm).sqrt();
            assert!(
                rel <= 1e-5,
                "n {n} hw {hw} c {c} groups {groups} spread {spread}: rel L2 {rel:.2e}"
            );
        }
    }

    /// One scratch sized for the largest level must serve every smaller one.
    #[test]
    fn scratch_for_the_largest_level_serves_all() {
        for n in [1, 2, 3, 8, 24, 64, 256, 2000] {
            let mut worst = 0;
            for hw in 1usize..=70_000 {
                let need = n * GROUPS * (2 + 3 * hw.div_ceil(stats_rows(n, hw)));
                worst = worst.max(need);
                assert!(worst <= scratch_len(n, hw, GROUPS), "n {n} hw {hw}");
            }
        }
    }
}
