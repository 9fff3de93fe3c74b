//! The UNet on a CUDA device: the same graph as [`UNet`], parameters uploaded once (convs in
//! the storage type `T`, norms and the embedding path in f32 as the reference keeps them), and
//! activations recycled through a [`GpuPool`].

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::unet::{check_shape, CondLengths, Conditioning, Layer, UNet, UpDown};
use crate::config::UNetConfig;
use crate::cuda::buffer::GpuPool;
use crate::cuda::{grid_1d, Arg, Gpu, GpuBuffer, GpuFloat};
use crate::error::{Error, Result};
use crate::ops::attention::GpuAttention;
use crate::ops::conv::{GpuConv2d, Residual};
use crate::ops::embedding::timestep_embedding_gpu;
use crate::ops::group_norm::GpuGroupNorm;
use crate::ops::layout::{nchw_to_nhwc_gpu, nhwc_to_nchw_gpu};
use crate::ops::linear::GpuLinear;
use crate::ops::resample::{
    add_channel_bias_gpu, avg_pool2x_gpu, concat_channels_gpu, upsample_nearest2x_gpu,
};
use crate::ops::{check_len, elements};

struct GpuResBlock<T> {
    in_norm: GpuGroupNorm,
    in_conv: GpuConv2d<T>,
    updown: UpDown,
    emb_proj: GpuLinear,
    out_norm: GpuGroupNorm,
    out_conv: GpuConv2d<T>,
    skip: Option<GpuConv2d<T>>,
    scale_shift: bool,
}

// Built once per model (a few hundred layers): the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum GpuLayer<T> {
    Conv(GpuConv2d<T>),
    UpConv(GpuConv2d<T>),
    Res(GpuResBlock<T>),
    Attn(GpuAttention<T>),
}

/// Device buffers reused across forward passes.
pub struct GpuWorkspace<T> {
    pool: GpuPool<T>,
    f32_pool: GpuPool<f32>,
}

impl<T: GpuFloat> GpuWorkspace<T> {
    /// Returns a buffer (such as a forward pass's output) to the pool.
    pub fn give(&mut self, buf: GpuBuffer<T>) {
        self.pool.give(buf);
    }

    /// Buffers allocated so far ([`GpuPool::allocations`]).
    pub fn allocations(&self) -> usize {
        self.pool.allocations() + self.f32_pool.allocations()
    }
}

impl<T: GpuFloat> Default for GpuWorkspace<T> {
    fn default() -> Self {
        GpuWorkspace {
            pool: GpuPool::default(),
            f32_pool: GpuPool::default(),
        }
    }
}

/// Conditioning already on the device.
pub struct GpuConditioning<'a> {
    /// `[n]` timestep values.
    pub timesteps: &'a GpuBuffer<f32>,
    /// `[n]` class labels.
    pub labels: Option<&'a CudaSlice<i64>>,
    /// `[n, embed_dim]`.
    pub embedding: Option<&'a GpuBuffer<f32>>,
}

struct Act<T> {
    data: GpuBuffer<T>,
    h: usize,
    w: usize,
    c: usize,
}

/// A borrowed activation, the input of a block.
struct ActRef<'a, T> {
    data: &'a GpuBuffer<T>,
    h: usize,
    w: usize,
    c: usize,
}

impl<T> Clone for ActRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ActRef<'_, T> {}

impl<T> Act<T> {
    fn view(&self) -> ActRef<'_, T> {
        ActRef {
            data: &self.data,
            h: self.h,
            w: self.w,
            c: self.c,
        }
    }
}

pub struct GpuUNet<T> {
    gpu: Arc<Gpu>,
    config: UNetConfig,
    /// [`UNet::id`] of the network uploaded.
    source: u64,
    time_embed: [GpuLinear; 2],
    label_emb: Option<GpuBuffer<f32>>,
    vector_emb: Option<GpuLinear>,
    input_blocks: Vec<Vec<GpuLayer<T>>>,
    middle_block: Vec<GpuLayer<T>>,
    output_blocks: Vec<Vec<GpuLayer<T>>>,
    out_norm: GpuGroupNorm,
    out_conv: GpuConv2d<T>,
}

fn upload_layers<T: GpuFloat>(gpu: &Gpu, layers: &[Layer]) -> Result<Vec<GpuLayer<T>>> {
    layers
        .iter()
        .map(|l| {
            Ok(match l {
                Layer::Conv(c) => GpuLayer::Conv(c.upload(gpu)?),
                Layer::UpConv(c) => GpuLayer::UpConv(c.upload(gpu)?),
                Layer::Attn(a) => GpuLayer::Attn(a.upload(gpu)?),
                Layer::Res(r) => GpuLayer::Res(GpuResBlock {
                    in_norm: r.in_norm.upload(gpu)?,
                    in_conv: r.in_conv.upload(gpu)?,
                    updown: r.updown,
                    emb_proj: r.emb_proj.upload(gpu)?,
                    out_norm: r.out_norm.upload(gpu)?,
                    out_conv: r.out_conv.upload(gpu)?,
                    skip: r.skip.as_ref().map(|s| s.upload(gpu)).transpose()?,
                    scale_shift: r.scale_shift,
                }),
            })
        })
        .collect()
}

impl<T: GpuFloat> GpuUNet<T> {
    /// Uploads the parameters of `unet` once.
    pub fn upload(unet: &UNet, gpu: Arc<Gpu>) -> Result<Self> {
        let g = &gpu;
        Ok(GpuUNet {
            config: unet.config().clone(),
            source: unet.id(),
            time_embed: [unet.time_embed[0].upload(g)?, unet.time_embed[1].upload(g)?],
            label_emb: unet.label_emb.as_ref().map(|t| g.upload(t)).transpose()?,
            vector_emb: unet.vector_emb.as_ref().map(|l| l.upload(g)).transpose()?,
            input_blocks: unet
                .input_blocks
                .iter()
                .map(|b| upload_layers(g, b))
                .collect::<Result<_>>()?,
            middle_block: upload_layers(g, &unet.middle_block)?,
            output_blocks: unet
                .output_blocks
                .iter()
                .map(|b| upload_layers(g, b))
                .collect::<Result<_>>()?,
            out_norm: unet.out_norm.upload(g)?,
            out_conv: unet.out_conv.upload(g)?,
            gpu,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether this is the upload of `unet` (of that network, not of one with the same config).
    pub fn is_upload_of(&self, unet: &UNet) -> bool {
        self.source == unet.id()
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Host NCHW in, host NCHW out (checks the input like [`UNet::forward_nchw`]).
    pub fn forward_nchw(
        &self,
        unet: &UNet,
        x: &[f32],
        shape: [usize; 4],
        cond: &Conditioning<'_>,
        ws: &mut GpuWorkspace<T>,
    ) -> Result<Vec<f32>> {
        let [n, c, h, w] = shape;
        if !self.is_upload_of(unet) {
            return Err(Error::Input(
                "forward_nchw: the UNet given is not the one uploaded".into(),
            ));
        }
        unet.check_input(n, c, h, w, cond)?;
        if x.len() != n * c * h * w {
            return Err(Error::Input(format!(
                "x has {} values, not {n}x{c}x{h}x{w}",
                x.len()
            )));
        }
        let g = &*self.gpu;
        let x_dev = g.upload::<f32>(x)?;
        let mut x_nhwc = ws.pool.take(g, x.len())?;
        nchw_to_nhwc_gpu(g, &x_dev, n, c, h * w, &mut x_nhwc)?;
        let t = g.upload::<f32>(cond.timesteps)?;
        let labels = cond.labels.map(|y| g.upload_raw(y)).transpose()?;
        let emb = cond.embedding.map(|e| g.upload::<f32>(e)).transpose()?;
        let dev_cond = GpuConditioning {
            timesteps: &t,
            labels: labels.as_ref(),
            embedding: emb.as_ref(),
        };
        let out = self.forward(&x_nhwc, [n, h, w, c], &dev_cond, ws)?;
        let oc = self.config.out_channels();
        let mut nchw = g.zeros::<f32>(n * oc * h * w)?;
        nhwc_to_nchw_gpu(g, &out, n, oc, h * w, &mut nchw)?;
        ws.pool.give(out);
        ws.pool.give(x_nhwc);
        g.download(&nchw)
    }

    /// x NHWC `[n, h, w, in_channels]` on the device -> NHWC `[n, h, w, out_channels]` (a pool
    /// buffer: give it back to `ws` when done). Shapes and buffer lengths are checked here; the
    /// values on the device are not: labels must lie in `0..num_classes` (one outside adds no
    /// class embedding) and timesteps must be finite ([`UNet::check_input`] checks host values).
    pub fn forward(
        &self,
        x: &GpuBuffer<T>,
        shape: [usize; 4],
        cond: &GpuConditioning<'_>,
        ws: &mut GpuWorkspace<T>,
    ) -> Result<GpuBuffer<T>> {
        let [n, h, w, c] = shape;
        self.check_device_input(x, shape, cond)?;
        let g = &*self.gpu;
        let emb = self.embedding(n, cond, ws)?;
        // Group norm scratch, sized for the largest level (it serves every smaller one).
        let mut stats = ws.f32_pool.take(g, GpuGroupNorm::scratch_len(n, h * w))?;
        let input = ActRef { data: x, h, w, c };
        // Each input block's output is both a skip and the next block's input: blocks borrow
        // their input, so the skips are kept without copies.
        let mut skips: Vec<Act<T>> = Vec::with_capacity(self.input_blocks.len());
        for block in &self.input_blocks {
            let from = skips.last().map_or(input, Act::view);
            let out = self.run_block(block, from, n, &emb, &mut stats, ws)?;
            skips.push(out);
        }
        let deepest = skips.last().map_or(input, Act::view);
        let mut act = self.run_block(&self.middle_block, deepest, n, &emb, &mut stats, ws)?;
        for block in &self.output_blocks {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::Cuda("skip stack underflow".into()))?;
            let hw = act.h * act.w;
            let mut cat = ws.pool.take(g, n * hw * (act.c + skip.c))?;
            concat_channels_gpu(g, &act.data, &skip.data, n, hw, act.c, skip.c, &mut cat)?;
            let cat = Act {
                data: cat,
                h: act.h,
                w: act.w,
                c: act.c + skip.c,
            };
            ws.pool.give(act.data);
            ws.pool.give(skip.data);
            act = self.run_block(block, cat.view(), n, &emb, &mut stats, ws)?;
            ws.pool.give(cat.data);
        }
        let hw = act.h * act.w;
        let mut normed = ws.pool.take(g, act.data.len())?;
        self.out_norm
            .forward(g, &act.data, n, hw, &mut normed, &mut stats, None, true)?;
        ws.pool.give(act.data);
        let mut out = ws.pool.take(g, n * hw * self.config.out_channels())?;
        self.out_conv
            .forward(g, &normed, n, h, w, &mut out, Residual::None)?;
        ws.pool.give(normed);
        ws.f32_pool.give(emb);
        ws.f32_pool.give(stats);
        Ok(out)
    }

    /// The shape against the model, and the lengths of the input and conditioning buffers.
    fn check_device_input(
        &self,
        x: &GpuBuffer<T>,
        [n, h, w, c]: [usize; 4],
        cond: &GpuConditioning<'_>,
    ) -> Result<()> {
        let lengths = CondLengths {
            timesteps: cond.timesteps.len(),
            labels: cond.labels.map(CudaSlice::len),
            embedding: cond.embedding.map(GpuBuffer::len),
        };
        check_shape(&self.config, [n, c, h, w], lengths)?;
        check_len("x", x.len(), elements("x", &[n, h, w, c])?)
    }

    /// SiLU(time_embed(t) + label_emb(y) + vector_emb(e)), f32 `[n, 4mc]`.
    fn embedding(
        &self,
        n: usize,
        cond: &GpuConditioning<'_>,
        ws: &mut GpuWorkspace<T>,
    ) -> Result<GpuBuffer<f32>> {
        let g = &*self.gpu;
        let (mc, dim) = (self.config.num_channels, self.config.time_embed_dim());
        let mut t_emb = ws.f32_pool.take(g, n * mc)?;
        timestep_embedding_gpu(g, cond.timesteps, n, mc, &mut t_emb)?;
        let mut hidden = ws.f32_pool.take(g, n * dim)?;
        self.time_embed[0].forward(g, &t_emb, n, &mut hidden, false)?;
        let mut emb = ws.f32_pool.take(g, n * dim)?;
        self.time_embed[1].forward(g, &hidden, n, &mut emb, true)?;
        if let (Some(table), Some(labels)) = (&self.label_emb, cond.labels) {
            add_rows(g, &mut emb, table, labels, n, dim)?;
        }
        if let (Some(proj), Some(e)) = (&self.vector_emb, cond.embedding) {
            proj.forward(g, e, n, &mut hidden, false)?;
            // emb += hidden: a per-(image, channel) bias over a single pixel.
            add_channel_bias_gpu(g, &mut emb, &hidden, n, 1, dim)?;
        }
        g.launch(
            "linear",
            "silu_f32",
            grid_1d(n * dim),
            &[Arg::Ptr(emb.ptr(g)), Arg::I32((n * dim) as i32)],
        )?;
        ws.f32_pool.give(t_emb);
        ws.f32_pool.give(hidden);
        Ok(emb)
    }

    fn run_block(
        &self,
        layers: &[GpuLayer<T>],
        input: ActRef<'_, T>,
        n: usize,
        emb: &GpuBuffer<f32>,
        stats: &mut GpuBuffer<f32>,
        ws: &mut GpuWorkspace<T>,
    ) -> Result<Act<T>> {
        let g = &*self.gpu;
        // The block's input is borrowed (it may be a skip); each layer's output is owned and
        // goes back to the pool once the next layer has read it.
        let mut owned: Option<Act<T>> = None;
        for layer in layers {
            let act = owned.as_ref().map_or(input, Act::view);
            let next = match layer {
                GpuLayer::Conv(conv) => {
                    let (ho, wo) = conv.out_size(act.h, act.w);
                    let mut out = ws.pool.take(g, n * ho * wo * conv.cout)?;
                    conv.forward(g, act.data, n, act.h, act.w, &mut out, Residual::None)?;
                    Act {
                        data: out,
                        h: ho,
                        w: wo,
                        c: conv.cout,
                    }
                }
                GpuLayer::UpConv(conv) => {
                    let (h2, w2) = (2 * act.h, 2 * act.w);
                    let mut up = ws.pool.take(g, n * h2 * w2 * act.c)?;
                    upsample_nearest2x_gpu(g, act.data, n, act.h, act.w, act.c, &mut up)?;
                    let mut out = ws.pool.take(g, n * h2 * w2 * conv.cout)?;
                    conv.forward(g, &up, n, h2, w2, &mut out, Residual::None)?;
                    ws.pool.give(up);
                    Act {
                        data: out,
                        h: h2,
                        w: w2,
                        c: conv.cout,
                    }
                }
                GpuLayer::Res(block) => self.res_block(block, act, n, emb, stats, ws)?,
                GpuLayer::Attn(attn) => {
                    let mut out = ws.pool.take(g, act.data.len())?;
                    attn.forward(g, act.data, n, act.h * act.w, &mut out, &mut ws.pool, stats)?;
                    Act {
                        data: out,
                        h: act.h,
                        w: act.w,
                        c: act.c,
                    }
                }
            };
            if let Some(prev) = owned.replace(next) {
                ws.pool.give(prev.data);
            }
        }
        owned.ok_or_else(|| Error::Cuda("a block without layers".into()))
    }

    fn res_block(
        &self,
        r: &GpuResBlock<T>,
        x: ActRef<'_, T>,
        n: usize,
        emb: &GpuBuffer<f32>,
        stats: &mut GpuBuffer<f32>,
        ws: &mut GpuWorkspace<T>,
    ) -> Result<Act<T>> {
        let g = &*self.gpu;
        let oc = r.out_conv.cout;
        let mut a = ws.pool.take(g, x.data.len())?;
        r.in_norm
            .forward(g, x.data, n, x.h * x.w, &mut a, stats, None, true)?;
        let (h, w, resampled) = match r.updown {
            UpDown::None => (x.h, x.w, None),
            UpDown::Up | UpDown::Down => {
                let up = r.updown == UpDown::Up;
                let (h, w) = if up {
                    (2 * x.h, 2 * x.w)
                } else {
                    (x.h / 2, x.w / 2)
                };
                let mut a2 = ws.pool.take(g, n * h * w * x.c)?;
                let mut x2 = ws.pool.take(g, n * h * w * x.c)?;
                if up {
                    upsample_nearest2x_gpu(g, &a, n, x.h, x.w, x.c, &mut a2)?;
                    upsample_nearest2x_gpu(g, x.data, n, x.h, x.w, x.c, &mut x2)?;
                } else {
                    avg_pool2x_gpu(g, &a, n, x.h, x.w, x.c, &mut a2)?;
                    avg_pool2x_gpu(g, x.data, n, x.h, x.w, x.c, &mut x2)?;
                }
                ws.pool.give(std::mem::replace(&mut a, a2));
                (h, w, Some(x2))
            }
        };
        let hw = h * w;
        let mut hidden = ws.pool.take(g, n * hw * oc)?;
        r.in_conv
            .forward(g, &a, n, h, w, &mut hidden, Residual::None)?;
        ws.pool.give(a);
        let mut e = ws.f32_pool.take(g, n * r.emb_proj.out_features)?;
        r.emb_proj.forward(g, emb, n, &mut e, false)?;
        let mut normed = ws.pool.take(g, n * hw * oc)?;
        if r.scale_shift {
            r.out_norm
                .forward(g, &hidden, n, hw, &mut normed, stats, Some(&e), true)?;
        } else {
            add_channel_bias_gpu(g, &mut hidden, &e, n, hw, oc)?;
            r.out_norm
                .forward(g, &hidden, n, hw, &mut normed, stats, None, true)?;
        }
        ws.f32_pool.give(e);
        let skip_in = resampled.as_ref().unwrap_or(x.data);
        let mut out = hidden;
        match &r.skip {
            Some(conv) => {
                conv.forward(g, skip_in, n, h, w, &mut out, Residual::None)?;
                r.out_conv
                    .forward(g, &normed, n, h, w, &mut out, Residual::Output)?;
            }
            None => r
                .out_conv
                .forward(g, &normed, n, h, w, &mut out, Residual::Buffer(skip_in))?,
        }
        ws.pool.give(normed);
        if let Some(b) = resampled {
            ws.pool.give(b);
        }
        Ok(Act {
            data: out,
            h,
            w,
            c: oc,
        })
    }
}

/// `kernels/linear.cu`: y[i, :] += table[labels[i], :].
fn add_rows(
    g: &Gpu,
    y: &mut GpuBuffer<f32>,
    table: &GpuBuffer<f32>,
    labels: &CudaSlice<i64>,
    n: usize,
    dim: usize,
) -> Result<()> {
    let (lp, _sync) = cudarc::driver::DevicePtr::device_ptr(labels, g.stream());
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    g.launch(
        "linear",
        "add_rows_f32",
        cfg,
        &[
            Arg::Ptr(y.ptr(g)),
            Arg::Ptr(table.ptr(g)),
            Arg::Ptr(lp),
            Arg::I32(n as i32),
            Arg::I32(dim as i32),
            // The table's rows: the kernel skips labels past them.
            Arg::I32((table.len() / dim.max(1)) as i32),
        ],
    )
}
