//! The CUDA backend: activations and convolution weights in the storage type `T` (f32, f16 or
//! bf16), norms, the embedding path and the sampler's state in f32 (as the reference keeps
//! them), every operation one or more launches of `kernels/*.cu` on the device's one stream.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::{copying, Backend, Buffer, InputNorm, Moments, Residual, Source};
use crate::cuda::buffer::GpuPool;
use crate::cuda::{Gpu, GpuBuffer, GpuFloat, GpuGraph, StreamMark};
use crate::diffusion::StepParams;
use crate::error::{Error, Result};
use crate::ops::attention::attend_gpu;
use crate::ops::conv::{Conv2d, ConvInput, GpuConv2d};
use crate::ops::embedding::{timestep_embedding_gpu, TimeFeatures};
use crate::ops::group_norm::{GpuGroupNorm, GpuMoments, GroupNorm};
use crate::ops::layer_norm::{gelu_gpu, GpuLayerNorm, LayerNorm};
use crate::ops::layout::{nchw_to_nhwc_gpu, nhwc_to_nchw_gpu, pack_input_gpu, unpack_output_gpu};
use crate::ops::linear::{add_rows_gpu, silu_gpu, GpuLinear, Linear};
use crate::ops::resample::{
    add_channel_bias_gpu, avg_pool2x_gpu, concat_channels_gpu, upsample_nearest2x_gpu,
};
use crate::ops::step::{diffusion_step_gpu, fill_normals_gpu};

/// `MCDM_FOLD_COPIES=0` makes the decoder's concatenations and the upsamplings before a conv
/// as copies again, as the CPU backend does (to time what folding them into the kernels'
/// addressing saves); unset or any other value folds them. Read once.
pub fn fold_copies() -> bool {
    static FOLD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOLD.get_or_init(|| std::env::var("MCDM_FOLD_COPIES").map_or(true, |v| v != "0"))
}

/// `MCDM_NORM_STATS_IN_CONV=1` has the convs whose output a group norm reads make its channels'
/// moments in their epilogues ([`Backend::conv_moments`]), so that the norm makes no statistics
/// pass over it; off by default until a GPU run has timed it. Read once, when a backend is made.
pub fn norm_stats_in_conv_setting() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MCDM_NORM_STATS_IN_CONV").is_ok_and(|v| v == "1"))
}

/// `MCDM_NORM_APPLY_IN_CONV=1` has each conv that reads a group norm's output apply the norm
/// (and its scale-shift and SiLU) as it loads its input ([`Backend::normed_conv`]), so that
/// the normalised tensor is never stored; off by default until a GPU run has timed it. Read
/// once, when a backend is made.
pub fn norm_apply_in_conv_setting() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MCDM_NORM_APPLY_IN_CONV").is_ok_and(|v| v == "1"))
}

/// The device view of moments the backend made.
fn gpu_moments(m: &Moments<GpuBuffer<f32>>) -> GpuMoments<'_> {
    GpuMoments {
        part: &m.part,
        chunks: m.chunks,
    }
}

impl<T: GpuFloat> Buffer for GpuBuffer<T> {
    fn len(&self) -> usize {
        GpuBuffer::len(self)
    }
}

impl Buffer for CudaSlice<i64> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

/// The CUDA backend on one device handle, storing activations in `T`, with pools of device
/// buffers recycled across layers, passes and steps.
pub struct Cuda<T> {
    gpu: Arc<Gpu>,
    pool: GpuPool<T>,
    vectors: GpuPool<f32>,
    /// Set at the end of alternate sampling steps ([`Backend::step_queued`]).
    marks: Option<[StreamMark; 2]>,
    /// See [`norm_stats_in_conv_setting`].
    norm_stats_in_conv: bool,
    /// See [`norm_apply_in_conv_setting`].
    norm_apply_in_conv: bool,
}

impl<T: GpuFloat> Cuda<T> {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        Cuda {
            gpu,
            pool: GpuPool::default(),
            vectors: GpuPool::default(),
            marks: None,
            norm_stats_in_conv: norm_stats_in_conv_setting(),
            norm_apply_in_conv: norm_apply_in_conv_setting(),
        }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Overrides `MCDM_NORM_STATS_IN_CONV` for this backend (tests, benchmarks).
    pub fn set_norm_stats_in_conv(&mut self, on: bool) {
        self.norm_stats_in_conv = on;
    }

    /// Overrides `MCDM_NORM_APPLY_IN_CONV` for this backend (tests, benchmarks).
    pub fn set_norm_apply_in_conv(&mut self, on: bool) {
        self.norm_apply_in_conv = on;
    }

    /// `f` with a vector of `len` floats from the pool (contents unspecified), given back after
    /// whatever `f` returns.
    fn with_vector<R>(
        &mut self,
        len: usize,
        f: impl FnOnce(&mut Self, &mut GpuBuffer<f32>) -> Result<R>,
    ) -> Result<R> {
        let mut vector = self.take_vector(len)?;
        let result = f(self, &mut vector);
        self.give_vector(vector);
        result
    }

    /// The conv of `input` (`nhw`: the size the conv sees), with its output's moments where
    /// `moments` asks for them, the backend makes them and the kernel can.
    fn conv_input(
        &mut self,
        conv: &GpuConv2d<T>,
        input: ConvInput<'_, T>,
        nhw: [usize; 3],
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
        moments: bool,
    ) -> Result<Option<Moments<GpuBuffer<f32>>>> {
        let plan = (moments && self.norm_stats_in_conv)
            .then(|| conv.moments_plan(&self.gpu, input, nhw))
            .flatten();
        let Some((kernel, chunks)) = plan else {
            let [n, h, w] = nhw;
            conv.forward(&self.gpu, input, n, h, w, y, residual)?;
            return Ok(None);
        };
        let mut part = self.take_vector(nhw[0] * chunks * conv.cout * 3)?;
        match conv.forward_moments(&self.gpu, kernel, input, nhw, y, residual, &mut part) {
            Ok(()) => Ok(Some(Moments { part, chunks })),
            Err(e) => {
                self.give_vector(part);
                Err(e)
            }
        }
    }
}

impl<T: GpuFloat> Backend for Cuda<T> {
    type Tensor = GpuBuffer<T>;
    type Vector = GpuBuffer<f32>;
    type Labels = CudaSlice<i64>;
    type Conv = GpuConv2d<T>;
    type GroupNorm = GpuGroupNorm;
    type Linear = GpuLinear;
    type LayerNorm = GpuLayerNorm;
    type Graph = GpuGraph;

    fn conv_params(&self, conv: &Conv2d) -> Result<GpuConv2d<T>> {
        conv.upload(&self.gpu)
    }
    fn group_norm_params(&self, norm: &GroupNorm) -> Result<GpuGroupNorm> {
        norm.upload(&self.gpu)
    }
    fn linear_params(&self, linear: &Linear) -> Result<GpuLinear> {
        linear.upload(&self.gpu)
    }
    fn layer_norm_params(&self, norm: &LayerNorm) -> Result<GpuLayerNorm> {
        norm.upload(&self.gpu)
    }

    fn take(&mut self, len: usize) -> Result<GpuBuffer<T>> {
        self.pool.take(&self.gpu, len)
    }
    fn give(&mut self, tensor: GpuBuffer<T>) {
        self.pool.give(tensor);
    }
    fn take_vector(&mut self, len: usize) -> Result<GpuBuffer<f32>> {
        self.vectors.take(&self.gpu, len)
    }
    fn give_vector(&mut self, vector: GpuBuffer<f32>) {
        self.vectors.give(vector);
    }
    fn allocations(&self) -> usize {
        self.pool.allocations() + self.vectors.allocations()
    }
    fn release_buffers(&mut self) {
        self.pool = GpuPool::default();
        self.vectors = GpuPool::default();
    }

    fn upload(&mut self, host: &[f32]) -> Result<GpuBuffer<f32>> {
        self.gpu.upload(host)
    }
    fn upload_labels(&mut self, host: &[i64]) -> Result<CudaSlice<i64>> {
        self.gpu.upload_raw(host)
    }
    fn upload_tensor(&mut self, host: &[f32]) -> Result<GpuBuffer<T>> {
        self.gpu.upload(host)
    }
    fn download(&mut self, vector: &GpuBuffer<f32>) -> Result<Vec<f32>> {
        self.gpu.download(vector)
    }
    fn download_tensor(&mut self, tensor: &GpuBuffer<T>) -> Result<Vec<f32>> {
        self.gpu.download(tensor)
    }
    fn copy(
        &mut self,
        src: &GpuBuffer<f32>,
        offset: usize,
        dst: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        self.gpu.copy(src, offset, dst)
    }

    fn conv(
        &mut self,
        conv: &GpuConv2d<T>,
        x: &GpuBuffer<T>,
        [n, h, w]: [usize; 3],
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
    ) -> Result<()> {
        let resampled = match residual {
            Residual::Upsampled(r) => Some((r, false)),
            Residual::Pooled(r) => Some((r, true)),
            _ => None,
        };
        if let Some(r) = resampled.filter(|_| !fold_copies()) {
            let (ho, wo) = conv.out_size(h, w);
            let out = [ho, wo, conv.cout];
            return copying::conv_resampled_residual(self, conv, x, [n, h, w], y, r, out);
        }
        conv.forward(&self.gpu, x, n, h, w, y, residual)
    }
    fn upsample_conv(
        &mut self,
        conv: &GpuConv2d<T>,
        x: &GpuBuffer<T>,
        [n, h, w, c]: [usize; 4],
        y: &mut GpuBuffer<T>,
    ) -> Result<()> {
        if !fold_copies() {
            return copying::upsample_conv(self, conv, x, [n, h, w, c], y);
        }
        let input = ConvInput {
            x,
            second: None,
            upsampled: true,
            norm: None,
        };
        conv.forward(&self.gpu, input, n, 2 * h, 2 * w, y, Residual::None)
    }
    fn concat_conv(
        &mut self,
        conv: &GpuConv2d<T>,
        [a, b]: [&GpuBuffer<T>; 2],
        [n, h, w, ca, cb]: [usize; 5],
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
    ) -> Result<()> {
        if !fold_copies() {
            return copying::concat_conv(self, conv, [a, b], [n, h, w, ca, cb], y, residual);
        }
        let input = ConvInput {
            x: a,
            second: Some((b, cb)),
            upsampled: false,
            norm: None,
        };
        conv.forward(&self.gpu, input, n, h, w, y, residual)
    }
    fn concat_group_norm(
        &mut self,
        norm: &GpuGroupNorm,
        [a, b]: [&GpuBuffer<T>; 2],
        [n, hw, ca, cb]: [usize; 4],
        y: &mut GpuBuffer<T>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu: bool,
    ) -> Result<()> {
        if !fold_copies() || !norm.takes_concat(&self.gpu, b, ca) {
            let sizes = [n, hw, ca, cb];
            return copying::concat_group_norm(self, norm, [a, b], sizes, y, scale_shift, silu);
        }
        self.with_vector(norm.scratch_len(n, hw), |be, scratch| {
            let ss = scale_shift;
            norm.forward_concat(&be.gpu, [a, b], ca, n, hw, y, scratch, ss, silu)
        })
    }
    fn group_norm(
        &mut self,
        norm: &GpuGroupNorm,
        x: &GpuBuffer<T>,
        n: usize,
        hw: usize,
        y: &mut GpuBuffer<T>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu: bool,
    ) -> Result<()> {
        self.with_vector(norm.scratch_len(n, hw), |be, scratch| {
            norm.forward(&be.gpu, x, n, hw, y, scratch, scale_shift, silu)
        })
    }
    fn group_norm_pool2x(
        &mut self,
        norm: &GpuGroupNorm,
        x: &GpuBuffer<T>,
        [n, h, w, c]: [usize; 4],
        y: &mut GpuBuffer<T>,
        silu: bool,
    ) -> Result<()> {
        if !fold_copies() {
            return copying::group_norm_pool2x(self, norm, x, [n, h, w, c], y, silu);
        }
        self.with_vector(norm.scratch_len(n, h * w), |be, scratch| {
            norm.forward_pool(&be.gpu, x, [n, h, w], y, scratch, silu)
        })
    }
    fn conv_moments(
        &mut self,
        conv: &GpuConv2d<T>,
        x: &GpuBuffer<T>,
        [n, h, w, c]: [usize; 4],
        upsampled: bool,
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
    ) -> Result<Option<Moments<GpuBuffer<f32>>>> {
        // Not where the conv would copy first (an upsampled input or residual unfolded).
        let resampled = matches!(residual, Residual::Upsampled(_) | Residual::Pooled(_));
        if !fold_copies() && (upsampled || resampled) {
            let nhwc = [n, h, w, c];
            return copying::conv_without_moments(self, conv, x, nhwc, upsampled, y, residual);
        }
        let input = ConvInput {
            x,
            second: None,
            upsampled,
            norm: None,
        };
        let nhw = if upsampled {
            [n, 2 * h, 2 * w]
        } else {
            [n, h, w]
        };
        self.conv_input(conv, input, nhw, y, residual, true)
    }
    fn normed_conv(
        &mut self,
        norm: InputNorm<'_, Self>,
        conv: &GpuConv2d<T>,
        parts: &[Source<'_, Self>],
        [n, h, w]: [usize; 3],
        upsampled: bool,
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
        moments: bool,
    ) -> Result<Option<Moments<GpuBuffer<f32>>>> {
        let gn = norm.norm;
        // One tensor, or a concatenation whose statistics the kernels can read from its two.
        let split = match parts {
            [a] => Some((a, None)),
            [a, b] if gn.takes_concat(&self.gpu, b.data, a.c) => Some((a, Some(b))),
            _ => None,
        };
        let Some((first, second)) = split.filter(|_| self.norm_apply_in_conv && fold_copies())
        else {
            let nhw = [n, h, w];
            return copying::normed_conv(
                self, norm, conv, parts, nhw, upsampled, y, residual, moments,
            );
        };
        let c = first.c + second.map_or(0, |b| b.c);
        let nhw_seen = if upsampled {
            [n, 2 * h, 2 * w]
        } else {
            [n, h, w]
        };
        let ss = norm.scale_shift;
        self.with_vector(n * c * 2, |be, table| {
            let second_moments = second.map(|b| b.moments);
            match (first.moments, second_moments) {
                (Some(ma), None | Some(Some(_))) => {
                    let ma = (gpu_moments(ma), first.c);
                    let mb = second_moments.flatten().map(gpu_moments);
                    be.with_vector(n * gn.groups() * 2, |be, stats| {
                        gn.channel_table_from_moments(&be.gpu, ma, mb, n, stats, ss, table)
                    })?
                }
                _ => be.with_vector(gn.scratch_len(n, h * w), |be, scratch| {
                    let b = second.map(|b| (b.data, first.c));
                    gn.channel_table(&be.gpu, first.data, b, [n, h * w], scratch, ss, table)
                })?,
            }
            let input = ConvInput {
                x: first.data,
                second: second.map(|b| (b.data, b.c)),
                upsampled,
                norm: Some((&*table, norm.silu)),
            };
            be.conv_input(conv, input, nhw_seen, y, residual, moments)
        })
    }
    fn group_norm_from(
        &mut self,
        norm: &GpuGroupNorm,
        (x, moments): (&GpuBuffer<T>, &Moments<GpuBuffer<f32>>),
        n: usize,
        hw: usize,
        y: &mut GpuBuffer<T>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu: bool,
    ) -> Result<()> {
        self.with_vector(n * norm.groups() * 2, |be, stats| {
            let first = (x, gpu_moments(moments));
            norm.forward_from_moments(&be.gpu, first, None, [n, hw], y, stats, scale_shift, silu)
        })
    }
    fn concat_group_norm_from(
        &mut self,
        norm: &GpuGroupNorm,
        [a, b]: [&GpuBuffer<T>; 2],
        [ma, mb]: [&Moments<GpuBuffer<f32>>; 2],
        [n, hw, ca, cb]: [usize; 4],
        y: &mut GpuBuffer<T>,
        scale_shift: Option<&GpuBuffer<f32>>,
        silu: bool,
    ) -> Result<()> {
        if !fold_copies() || !norm.takes_concat(&self.gpu, b, ca) {
            let sizes = [n, hw, ca, cb];
            return copying::concat_group_norm(self, norm, [a, b], sizes, y, scale_shift, silu);
        }
        self.with_vector(n * norm.groups() * 2, |be, stats| {
            let (first, second) = ((a, gpu_moments(ma)), Some((b, ca, gpu_moments(mb))));
            let ss = scale_shift;
            norm.forward_from_moments(&be.gpu, first, second, [n, hw], y, stats, ss, silu)
        })
    }
    fn group_norm_pool2x_from(
        &mut self,
        norm: &GpuGroupNorm,
        (x, moments): (&GpuBuffer<T>, &Moments<GpuBuffer<f32>>),
        [n, h, w, c]: [usize; 4],
        y: &mut GpuBuffer<T>,
        silu: bool,
    ) -> Result<()> {
        if !fold_copies() {
            return copying::group_norm_pool2x(self, norm, x, [n, h, w, c], y, silu);
        }
        self.with_vector(n * norm.groups() * 2, |be, stats| {
            let first = (x, gpu_moments(moments));
            norm.forward_pool_from_moments(&be.gpu, first, [n, h, w], y, stats, silu)
        })
    }
    fn attend(
        &mut self,
        qkv: &GpuBuffer<T>,
        [n, t, c, heads]: [usize; 4],
        out: &mut GpuBuffer<T>,
    ) -> Result<()> {
        attend_gpu(&self.gpu, qkv, n, t, c, heads, out)
    }
    fn upsample2x(
        &mut self,
        x: &GpuBuffer<T>,
        [n, h, w, c]: [usize; 4],
        y: &mut GpuBuffer<T>,
    ) -> Result<()> {
        upsample_nearest2x_gpu(&self.gpu, x, n, h, w, c, y)
    }
    fn avg_pool2x(
        &mut self,
        x: &GpuBuffer<T>,
        [n, h, w, c]: [usize; 4],
        y: &mut GpuBuffer<T>,
    ) -> Result<()> {
        avg_pool2x_gpu(&self.gpu, x, n, h, w, c, y)
    }
    fn concat_channels(
        &mut self,
        a: &GpuBuffer<T>,
        b: &GpuBuffer<T>,
        [n, hw, ca, cb]: [usize; 4],
        y: &mut GpuBuffer<T>,
    ) -> Result<()> {
        concat_channels_gpu(&self.gpu, a, b, n, hw, ca, cb, y)
    }
    fn add_channel_bias(
        &mut self,
        x: &mut GpuBuffer<T>,
        bias: &GpuBuffer<f32>,
        n: usize,
        hw: usize,
        c: usize,
    ) -> Result<()> {
        add_channel_bias_gpu(&self.gpu, x, bias, n, hw, c)
    }

    fn timestep_embedding(
        &mut self,
        t: &GpuBuffer<f32>,
        n: usize,
        dim: usize,
        features: TimeFeatures,
        out: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        timestep_embedding_gpu(&self.gpu, t, n, dim, features, out)
    }
    fn linear(
        &mut self,
        linear: &GpuLinear,
        x: &GpuBuffer<f32>,
        n: usize,
        y: &mut GpuBuffer<f32>,
        silu_in: bool,
    ) -> Result<()> {
        linear.forward(&self.gpu, x, n, y, silu_in)
    }
    fn add_rows(
        &mut self,
        y: &mut GpuBuffer<f32>,
        table: &GpuBuffer<f32>,
        labels: &CudaSlice<i64>,
        n: usize,
        dim: usize,
    ) -> Result<()> {
        add_rows_gpu(&self.gpu, y, table, labels, n, dim)
    }
    fn add(&mut self, y: &mut GpuBuffer<f32>, x: &GpuBuffer<f32>) -> Result<()> {
        // y [1, 1, len] += x [1, len]: the channel-bias kernel over one pixel.
        add_channel_bias_gpu(&self.gpu, y, x, 1, 1, x.len())
    }
    fn silu(&mut self, x: &mut GpuBuffer<f32>, len: usize) -> Result<()> {
        silu_gpu(&self.gpu, x, len)
    }

    fn layer_norm(&mut self, norm: &GpuLayerNorm, x: &mut GpuBuffer<T>, rows: usize) -> Result<()> {
        norm.forward_in_place(&self.gpu, x, rows)
    }
    fn gelu(&mut self, x: &mut GpuBuffer<T>, len: usize) -> Result<()> {
        gelu_gpu(&self.gpu, x, len)
    }

    fn nchw_to_nhwc(
        &mut self,
        x: &GpuBuffer<f32>,
        [n, c, hw]: [usize; 3],
        y: &mut GpuBuffer<T>,
    ) -> Result<()> {
        nchw_to_nhwc_gpu(&self.gpu, x, n, c, hw, y)
    }
    fn nhwc_to_nchw(
        &mut self,
        x: &GpuBuffer<T>,
        [n, hw, c]: [usize; 3],
        y: &mut GpuBuffer<f32>,
    ) -> Result<()> {
        nhwc_to_nchw_gpu(&self.gpu, x, n, c, hw, y)
    }

    fn pack_input(
        &mut self,
        x: &GpuBuffer<f32>,
        cond: Option<(&GpuBuffer<f32>, usize)>,
        first_image: usize,
        [b, hw, cc]: [usize; 3],
        y: &mut GpuBuffer<T>,
        y_offset: usize,
    ) -> Result<()> {
        pack_input_gpu(&self.gpu, x, cond, first_image, b, hw, cc, y, y_offset)
    }
    fn unpack_output(
        &mut self,
        y: &GpuBuffer<T>,
        offset: usize,
        oc: usize,
        eps: &mut GpuBuffer<f32>,
        eps_offset: usize,
        var: Option<&mut GpuBuffer<f32>>,
        [b, hw]: [usize; 2],
    ) -> Result<()> {
        unpack_output_gpu(&self.gpu, y, offset, oc, eps, eps_offset, var, b, hw)
    }
    fn fill_normals(
        &mut self,
        out: &mut GpuBuffer<f32>,
        [b, len]: [usize; 2],
        first_image: usize,
        seed: u64,
        step: u32,
    ) -> Result<()> {
        fill_normals_gpu(&self.gpu, out, b, len, first_image, seed, step)
    }
    fn diffusion_step(
        &mut self,
        x: &mut GpuBuffer<f32>,
        eps: &GpuBuffer<f32>,
        weights: &GpuBuffer<f32>,
        terms: usize,
        var: Option<&GpuBuffer<f32>>,
        [b, len]: [usize; 2],
        first_image: usize,
        params: StepParams,
        history: Option<&mut GpuBuffer<f32>>,
    ) -> Result<()> {
        diffusion_step_gpu(
            &self.gpu,
            x,
            eps,
            weights,
            terms,
            var,
            b,
            len,
            first_image,
            params,
            history,
        )
    }

    fn can_capture(&self) -> bool {
        self.gpu.cuda_graphs()
    }
    fn capture(&mut self, enqueue: &mut dyn FnMut(&mut Self) -> Result<()>) -> Result<GpuGraph> {
        let gpu = self.gpu.clone();
        gpu.capture(|| enqueue(self))
    }
    unsafe fn replay(&mut self, graph: &GpuGraph) -> Result<()> {
        // SAFETY: the caller's contract is launch_graph's.
        unsafe { self.gpu.launch_graph(graph) }
    }
    fn note_capture_failure(&mut self, error: &Error) {
        self.gpu.note_graph_failure(error);
    }
    fn step_queued(&mut self, done: usize) -> Result<usize> {
        if self.marks.is_none() {
            self.marks = Some([self.gpu.new_mark()?, self.gpu.new_mark()?]);
        }
        let marks = self.marks.as_ref().expect("made above");
        self.gpu.mark(&marks[done % 2])?;
        if done == 0 {
            return Ok(0);
        }
        // One step in flight: the host waits for the one before.
        marks[(done - 1) % 2].wait()?;
        Ok(done)
    }
}
