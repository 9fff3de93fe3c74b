//! guided-diffusion's `UNetModel`, written once over [`Backend`]: the same graph runs on the
//! CPU and on a GPU. Networks are built on the CPU from a weights file ([`super::load`]) and
//! moved to another backend with [`UNet::to_backend`].

use crate::backend::{Backend, Buffer, Cond, Cpu, InputNorm, Moments, PassSizes, Residual, Source};
use crate::config::{UNetConfig, MAX_IMAGE_SIZE};
use crate::error::{Error, Result};
use crate::ops::embedding::TimeFeatures;

/// A convolution layer: its shape and its parameters on the backend.
pub struct ConvLayer<B: Backend> {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    /// 1 or 3 (padding `kernel / 2`).
    pub(crate) kernel: usize,
    /// 1 or 2.
    pub(crate) stride: usize,
    pub(crate) params: B::Conv,
}

impl<B: Backend> ConvLayer<B> {
    /// Output height and width for an `h x w` input.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.kernel / 2;
        let side = |s: usize| (s + 2 * p).saturating_sub(self.kernel) / self.stride + 1;
        (side(h), side(w))
    }

    fn flops(&self, h: usize, w: usize) -> f64 {
        let (ho, wo) = self.out_size(h, w);
        2.0 * ho as f64 * wo as f64 * (self.cout * self.cin * self.kernel * self.kernel) as f64
    }
}

/// A linear layer in f32: its shape and its parameters on the backend.
pub struct LinearLayer<B: Backend> {
    pub(crate) in_features: usize,
    pub(crate) out_features: usize,
    pub(crate) params: B::Linear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpDown {
    None,
    Up,
    Down,
}

pub struct ResBlock<B: Backend> {
    pub(crate) in_norm: B::GroupNorm,
    pub(crate) in_conv: ConvLayer<B>,
    pub(crate) updown: UpDown,
    pub(crate) emb_proj: LinearLayer<B>,
    pub(crate) out_norm: B::GroupNorm,
    pub(crate) out_conv: ConvLayer<B>,
    pub(crate) skip: Option<ConvLayer<B>>,
    pub(crate) scale_shift: bool,
}

/// guided-diffusion's `AttentionBlock`, qkv in the new order (legacy checkpoints are permuted
/// at load).
pub struct AttentionBlock<B: Backend> {
    pub(crate) channels: usize,
    pub(crate) heads: usize,
    pub(crate) norm: B::GroupNorm,
    /// 1x1, `channels -> 3 * channels`.
    pub(crate) qkv: ConvLayer<B>,
    /// 1x1, `channels -> channels`.
    pub(crate) proj_out: ConvLayer<B>,
}

pub enum Layer<B: Backend> {
    Conv(ConvLayer<B>),
    /// Nearest x2, then a 3x3 conv (`Upsample` with conv_resample).
    UpConv(ConvLayer<B>),
    /// Boxed: a residual block is several times the size of the other layers.
    Res(Box<ResBlock<B>>),
    Attn(AttentionBlock<B>),
}

/// An activation: NHWC data plus its spatial size and channels, and the per-channel moments
/// of the conv that made it, where the backend made them (for the group norm that reads it).
struct Act<B: Backend> {
    data: B::Tensor,
    h: usize,
    w: usize,
    c: usize,
    moments: Option<Moments<B::Vector>>,
}

/// A borrowed activation, the input of a block: each input block's output is both a skip and
/// the next block's input, so blocks borrow their input and the skips are kept without copies.
struct ActRef<'a, B: Backend> {
    data: &'a B::Tensor,
    h: usize,
    w: usize,
    c: usize,
    moments: Option<&'a Moments<B::Vector>>,
}

impl<B: Backend> Clone for ActRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for ActRef<'_, B> {}

impl<B: Backend> Act<B> {
    fn view(&self) -> ActRef<'_, B> {
        ActRef {
            data: &self.data,
            h: self.h,
            w: self.w,
            c: self.c,
            moments: self.moments.as_ref(),
        }
    }

    /// Returns the data and the moments to the backend's pools.
    fn give(self, be: &mut B) {
        be.give(self.data);
        if let Some(m) = self.moments {
            be.give_vector(m.part);
        }
    }
}

impl<'a, B: Backend> ActRef<'a, B> {
    /// The activation as a conv's input.
    fn source(self) -> Source<'a, B> {
        Source {
            data: self.data,
            c: self.c,
            moments: self.moments,
        }
    }
}

/// A group norm without scale-shift.
fn plain_norm<B: Backend>(norm: &B::GroupNorm, silu: bool) -> InputNorm<'_, B> {
    InputNorm {
        norm,
        scale_shift: None,
        silu,
    }
}

/// Conditioning of one forward pass over a batch of `n` images, on the host.
#[derive(Clone, Copy, Debug)]
pub struct Conditioning<'a> {
    /// `[n]` timestep values, fed to the network as they are.
    pub timesteps: &'a [f32],
    /// `[n]` class labels (class-conditional models).
    pub labels: Option<&'a [i64]>,
    /// `[n, embed_dim]` vector conditions (models with `embed_dim`).
    pub embedding: Option<&'a [f32]>,
}

/// A guided-diffusion UNet with its parameters on backend `B`.
pub struct UNet<B: Backend> {
    pub(crate) config: UNetConfig,
    pub(crate) time_embed: [LinearLayer<B>; 2],
    /// `label_emb.weight` `[num_classes, 4mc]`.
    pub(crate) label_emb: Option<B::Vector>,
    pub(crate) vector_emb: Option<LinearLayer<B>>,
    pub(crate) input_blocks: Vec<Vec<Layer<B>>>,
    pub(crate) middle_block: Vec<Layer<B>>,
    pub(crate) output_blocks: Vec<Vec<Layer<B>>>,
    pub(crate) out_norm: B::GroupNorm,
    pub(crate) out_conv: ConvLayer<B>,
    pub(crate) parameters: usize,
}

impl UNet<Cpu> {
    /// The same network with its parameters moved to `backend` (uploaded once; convolutions in
    /// the backend's storage type, norms and the embedding path in f32).
    pub fn to_backend<B: Backend>(&self, backend: &mut B) -> Result<UNet<B>> {
        let blocks = |blocks: &[Vec<Layer<Cpu>>], be: &mut B| -> Result<Vec<Vec<Layer<B>>>> {
            blocks.iter().map(|b| layers_to(b, be)).collect()
        };
        Ok(UNet {
            config: self.config.clone(),
            time_embed: [
                linear_to(&self.time_embed[0], backend)?,
                linear_to(&self.time_embed[1], backend)?,
            ],
            label_emb: self
                .label_emb
                .as_ref()
                .map(|t| backend.upload(t))
                .transpose()?,
            vector_emb: self
                .vector_emb
                .as_ref()
                .map(|l| linear_to(l, backend))
                .transpose()?,
            input_blocks: blocks(&self.input_blocks, backend)?,
            middle_block: layers_to(&self.middle_block, backend)?,
            output_blocks: blocks(&self.output_blocks, backend)?,
            out_norm: backend.group_norm_params(&self.out_norm)?,
            out_conv: conv_to(&self.out_conv, backend)?,
            parameters: self.parameters,
        })
    }
}

fn conv_to<B: Backend>(c: &ConvLayer<Cpu>, be: &B) -> Result<ConvLayer<B>> {
    Ok(ConvLayer {
        cin: c.cin,
        cout: c.cout,
        kernel: c.kernel,
        stride: c.stride,
        params: be.conv_params(&c.params)?,
    })
}

fn linear_to<B: Backend>(l: &LinearLayer<Cpu>, be: &B) -> Result<LinearLayer<B>> {
    Ok(LinearLayer {
        in_features: l.in_features,
        out_features: l.out_features,
        params: be.linear_params(&l.params)?,
    })
}

fn layers_to<B: Backend>(layers: &[Layer<Cpu>], be: &B) -> Result<Vec<Layer<B>>> {
    layers
        .iter()
        .map(|l| {
            Ok(match l {
                Layer::Conv(c) => Layer::Conv(conv_to(c, be)?),
                Layer::UpConv(c) => Layer::UpConv(conv_to(c, be)?),
                Layer::Attn(a) => Layer::Attn(AttentionBlock {
                    channels: a.channels,
                    heads: a.heads,
                    norm: be.group_norm_params(&a.norm)?,
                    qkv: conv_to(&a.qkv, be)?,
                    proj_out: conv_to(&a.proj_out, be)?,
                }),
                Layer::Res(r) => Layer::Res(Box::new(ResBlock {
                    in_norm: be.group_norm_params(&r.in_norm)?,
                    in_conv: conv_to(&r.in_conv, be)?,
                    updown: r.updown,
                    emb_proj: linear_to(&r.emb_proj, be)?,
                    out_norm: be.group_norm_params(&r.out_norm)?,
                    out_conv: conv_to(&r.out_conv, be)?,
                    skip: r.skip.as_ref().map(|s| conv_to(s, be)).transpose()?,
                    scale_shift: r.scale_shift,
                })),
            })
        })
        .collect()
}

impl<B: Backend> UNet<B> {
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    /// Checks a host input batch: channels, a size the levels divide, and the conditioning's
    /// kinds, lengths and values (finite timesteps and embeddings, labels in range).
    pub fn check_input(
        &self,
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        cond: &Conditioning<'_>,
    ) -> Result<()> {
        let lengths = CondLengths {
            timesteps: cond.timesteps.len(),
            labels: cond.labels.map(<[i64]>::len),
            embedding: cond.embedding.map(<[f32]>::len),
        };
        check_shape(&self.config, [n, c, h, w], lengths)?;
        let bad = |m: String| Err(Error::Input(m));
        if let Some(t) = cond.timesteps.iter().find(|t| !t.is_finite()) {
            return bad(format!("timestep {t} is not finite"));
        }
        if let (Some(k), Some(y)) = (self.config.num_classes, cond.labels) {
            if let Some(l) = y.iter().find(|&&l| l < 0 || l as usize >= k) {
                return bad(format!("class label {l} is out of range 0..{k}"));
            }
        }
        if cond
            .embedding
            .is_some_and(|e| e.iter().any(|v| !v.is_finite()))
        {
            return bad("embedding holds non-finite values".into());
        }
        Ok(())
    }

    /// Forward pass on host NCHW input `x` `[n, c, h, w]`; returns NCHW
    /// `[n, out_channels, h, w]`. The input and the conditioning are checked first.
    pub fn forward_nchw(
        &self,
        be: &mut B,
        x: &[f32],
        [n, c, h, w]: [usize; 4],
        cond: &Conditioning<'_>,
    ) -> Result<Vec<f32>> {
        check_input_len(x, [n, c, h, w])?;
        self.check_input(n, c, h, w, cond)?;
        let x_dev = be.upload(x)?;
        let mut nhwc = be.take(x.len())?;
        be.nchw_to_nhwc(&x_dev, [n, c, h * w], &mut nhwc)?;
        let out = self.forward_uploaded(be, &nhwc, [n, h, w, c], cond);
        be.give(nhwc);
        let out = out?;
        let oc = self.config.out_channels();
        let mut nchw = be.take_vector(out.len())?;
        be.nhwc_to_nchw(&out, [n, h * w, oc], &mut nchw)?;
        be.give(out);
        let host = be.download(&nchw);
        be.give_vector(nchw);
        host
    }

    /// Forward pass on host NHWC input `[n, h, w, c]`; returns NHWC `[n, h, w, out_channels]`.
    /// The input and the conditioning are checked first.
    pub fn forward_nhwc(
        &self,
        be: &mut B,
        x: &[f32],
        [n, h, w, c]: [usize; 4],
        cond: &Conditioning<'_>,
    ) -> Result<Vec<f32>> {
        check_input_len(x, [n, h, w, c])?;
        self.check_input(n, c, h, w, cond)?;
        let x = be.upload_tensor(x)?;
        let out = self.forward_uploaded(be, &x, [n, h, w, c], cond)?;
        let host = be.download_tensor(&out);
        be.give(out);
        host
    }

    /// [`UNet::forward`] with the host conditioning uploaded.
    fn forward_uploaded(
        &self,
        be: &mut B,
        x: &B::Tensor,
        shape: [usize; 4],
        cond: &Conditioning<'_>,
    ) -> Result<B::Tensor> {
        let timesteps = be.upload(cond.timesteps)?;
        let labels = cond.labels.map(|y| be.upload_labels(y)).transpose()?;
        let embedding = cond.embedding.map(|e| be.upload(e)).transpose()?;
        let cond = Cond {
            timesteps: &timesteps,
            labels: labels.as_ref(),
            embedding: embedding.as_ref(),
        };
        self.forward(be, x, shape, cond)
    }

    /// x NHWC `[n, h, w, in_channels]` on the backend -> NHWC `[n, h, w, out_channels]` (from
    /// the backend's pool: give it back when done). Shapes and buffer lengths are checked
    /// here; the values are not: labels must lie in `0..num_classes` (one outside adds no
    /// class embedding) and timesteps must be finite ([`UNet::check_input`] checks host values).
    pub fn forward(
        &self,
        be: &mut B,
        x: &B::Tensor,
        [n, h, w, c]: [usize; 4],
        cond: Cond<'_, B>,
    ) -> Result<B::Tensor> {
        let lengths = CondLengths {
            timesteps: cond.timesteps.len(),
            labels: cond.labels.map(Buffer::len),
            embedding: cond.embedding.map(Buffer::len),
        };
        check_shape(&self.config, [n, c, h, w], lengths)?;
        let input = h * w * c;
        if x.len() < n * input {
            return Err(Error::Input(format!(
                "x has {} values, not {n}x{h}x{w}x{c}",
                x.len()
            )));
        }
        let sizes = PassSizes {
            n,
            input,
            output: h * w * self.config.out_channels(),
            widest: h * w * self.config.level_channels()[0].max(c),
            working: self.working_floats_per_image(h, w),
            image: [h, w],
        };
        be.in_groups(x, sizes, cond, &mut |be, x, n, cond| {
            self.forward_group(be, x, [n, h, w, c], cond)
        })
    }

    /// The forward pass over one group of images (input already checked).
    fn forward_group(
        &self,
        be: &mut B,
        x: &B::Tensor,
        [n, h, w, c]: [usize; 4],
        cond: Cond<'_, B>,
    ) -> Result<B::Tensor> {
        let emb = self.embedding(be, n, cond)?;
        let input = ActRef {
            data: x,
            h,
            w,
            c,
            moments: None,
        };
        let mut skips: Vec<Act<B>> = Vec::with_capacity(self.input_blocks.len());
        for block in &self.input_blocks {
            let from = skips.last().map_or(input, Act::view);
            let out = self.run_block(be, block, from, None, n, &emb)?;
            skips.push(out);
        }
        let deepest = skips.last().map_or(input, Act::view);
        let mut act = self.run_block(be, &self.middle_block, deepest, None, n, &emb)?;
        for block in &self.output_blocks {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::Input("a decoder block without its skip".into()))?;
            // The block's input is cat([act, skip], channels), which it reads from the two.
            let out = self.run_block(be, block, act.view(), Some(skip.view()), n, &emb)?;
            act.give(be);
            skip.give(be);
            act = out;
        }
        let mut out = be.take(n * act.h * act.w * self.config.out_channels())?;
        let norm = plain_norm(&self.out_norm, true);
        let conv = &self.out_conv.params;
        let input = [act.view().source()];
        be.normed_conv(
            norm,
            conv,
            &input,
            [n, h, w],
            false,
            &mut out,
            Residual::None,
            false,
        )?;
        act.give(be);
        be.give_vector(emb);
        Ok(out)
    }

    /// SiLU(time_embed(t) + label_emb(y) + vector_emb(e)): f32 `[n, 4mc]`, the input every
    /// ResBlock's `emb_layers` starts from.
    fn embedding(&self, be: &mut B, n: usize, cond: Cond<'_, B>) -> Result<B::Vector> {
        let (mc, dim) = (self.config.num_channels, self.config.time_embed_dim());
        let mut t_emb = be.take_vector(n * mc)?;
        let features = TimeFeatures {
            flip_sin_to_cos: self.config.flip_sin_to_cos,
            freq_shift: self.config.freq_shift as f32,
        };
        be.timestep_embedding(cond.timesteps, n, mc, features, &mut t_emb)?;
        let mut hidden = be.take_vector(n * dim)?;
        be.linear(&self.time_embed[0].params, &t_emb, n, &mut hidden, false)?;
        let mut emb = be.take_vector(n * dim)?;
        be.linear(&self.time_embed[1].params, &hidden, n, &mut emb, true)?;
        if let (Some(table), Some(labels)) = (&self.label_emb, cond.labels) {
            be.add_rows(&mut emb, table, labels, n, dim)?;
        }
        if let (Some(proj), Some(e)) = (&self.vector_emb, cond.embedding) {
            be.linear(&proj.params, e, n, &mut hidden, false)?;
            be.add(&mut emb, &hidden)?;
        }
        be.silu(&mut emb, n * dim)?;
        be.give_vector(t_emb);
        be.give_vector(hidden);
        Ok(emb)
    }

    /// The layers of one block on `input`, or on `cat([input, skip], channels)` (a decoder
    /// block), which only a first ResBlock reads without the copy.
    fn run_block(
        &self,
        be: &mut B,
        layers: &[Layer<B>],
        input: ActRef<'_, B>,
        skip: Option<ActRef<'_, B>>,
        n: usize,
        emb: &B::Vector,
    ) -> Result<Act<B>> {
        let reads_concat = matches!(layers.first(), Some(Layer::Res(r)) if r.reads_concat());
        if let (Some(skip), false) = (skip, reads_concat) {
            let cat = concat(be, input, skip, n)?;
            let out = self.run_block(be, layers, cat.view(), None, n, emb);
            cat.give(be);
            return out;
        }
        // The block's input is borrowed (it may be a skip); each layer's output is owned and
        // goes back to the pool once the next layer has read it.
        let mut owned: Option<Act<B>> = None;
        for layer in layers {
            let act = owned.as_ref().map_or(input, Act::view);
            // Only the first layer sees the skip.
            let skip = if owned.is_none() { skip } else { None };
            let next = match layer {
                Layer::Conv(conv) | Layer::UpConv(conv) => {
                    let up = matches!(layer, Layer::UpConv(_));
                    let (ho, wo) = if up {
                        (2 * act.h, 2 * act.w)
                    } else {
                        conv.out_size(act.h, act.w)
                    };
                    let mut out = be.take(n * ho * wo * conv.cout)?;
                    let nhwc = [n, act.h, act.w, act.c];
                    let none = Residual::None;
                    let moments =
                        be.conv_moments(&conv.params, act.data, nhwc, up, &mut out, none)?;
                    Act {
                        data: out,
                        h: ho,
                        w: wo,
                        c: conv.cout,
                        moments,
                    }
                }
                Layer::Res(block) => block.forward(be, act, skip, n, emb)?,
                Layer::Attn(attn) => attn.forward(be, act, n)?,
            };
            if let Some(prev) = owned.replace(next) {
                prev.give(be);
            }
        }
        owned.ok_or_else(|| Error::Input("a block without layers".into()))
    }

    /// About how many floats a forward pass of one `h` x `w` image holds at once, erring
    /// high: the skips kept for the decoder, plus a few of the widest activation (a decoder
    /// concatenation, its norm and the block's hidden layers, attention's q, k and v).
    pub fn working_floats_per_image(&self, h: usize, w: usize) -> usize {
        let levels = self.config.level_channels();
        let mut skips = h.saturating_mul(w).saturating_mul(self.config.num_channels);
        let mut widest = 0usize;
        for (l, &ch) in levels.iter().enumerate() {
            let pixels = (h >> l).max(1).saturating_mul((w >> l).max(1));
            let below = levels.get(l + 1).copied().unwrap_or(ch);
            let blocks = self.config.num_res_blocks + 1;
            skips = skips.saturating_add(pixels.saturating_mul(ch).saturating_mul(blocks));
            widest = widest.max(pixels.saturating_mul(ch.saturating_add(below)));
        }
        skips.saturating_add(widest.saturating_mul(6))
    }

    /// Multiply-accumulates times two of one forward pass per image at `h x w`.
    pub fn flops_per_image(&self, h: usize, w: usize) -> f64 {
        let mut total = 0.0;
        let mut size = (h, w);
        let walk = |layers: &[Layer<B>], size: &mut (usize, usize), total: &mut f64| {
            for layer in layers {
                match layer {
                    Layer::Conv(c) => {
                        *total += c.flops(size.0, size.1);
                        *size = c.out_size(size.0, size.1);
                    }
                    Layer::UpConv(c) => {
                        *size = (size.0.saturating_mul(2), size.1.saturating_mul(2));
                        *total += c.flops(size.0, size.1);
                    }
                    Layer::Res(r) => {
                        *total += r.in_conv.flops(size.0, size.1);
                        *size = match r.updown {
                            UpDown::Up => (size.0.saturating_mul(2), size.1.saturating_mul(2)),
                            UpDown::Down => (size.0 / 2, size.1 / 2),
                            UpDown::None => *size,
                        };
                        *total += r.out_conv.flops(size.0, size.1);
                        if let Some(s) = &r.skip {
                            *total += s.flops(size.0, size.1);
                        }
                    }
                    Layer::Attn(a) => {
                        let t = (size.0 * size.1) as f64;
                        *total += a.qkv.flops(size.0, size.1) + a.proj_out.flops(size.0, size.1);
                        *total += 4.0 * t * t * a.channels as f64;
                    }
                }
            }
        };
        for b in &self.input_blocks {
            walk(b, &mut size, &mut total);
        }
        walk(&self.middle_block, &mut size, &mut total);
        for b in &self.output_blocks {
            walk(b, &mut size, &mut total);
        }
        total + self.out_conv.flops(h, w)
    }
}

/// `cat([a, b], channels)` as a new activation.
fn concat<B: Backend>(be: &mut B, a: ActRef<'_, B>, b: ActRef<'_, B>, n: usize) -> Result<Act<B>> {
    let hw = a.h * a.w;
    let mut cat = be.take(n * hw * (a.c + b.c))?;
    be.concat_channels(a.data, b.data, [n, hw, a.c, b.c], &mut cat)?;
    Ok(Act {
        data: cat,
        h: a.h,
        w: a.w,
        c: a.c + b.c,
        moments: None,
    })
}

impl<B: Backend> ResBlock<B> {
    /// Whether [`ResBlock::forward`] takes its input as two tensors: its norm and its skip
    /// convolution read the concatenation (a resampling block or an identity skip would need
    /// it whole).
    fn reads_concat(&self) -> bool {
        self.updown == UpDown::None && self.skip.is_some()
    }

    /// The block on x, or on `cat([x, extra], channels)` where [`ResBlock::reads_concat`].
    fn forward(
        &self,
        be: &mut B,
        x: ActRef<'_, B>,
        extra: Option<ActRef<'_, B>>,
        n: usize,
        emb: &B::Vector,
    ) -> Result<Act<B>> {
        let oc = self.out_conv.cout;
        let mut e = be.take_vector(n * self.emb_proj.out_features)?;
        be.linear(&self.emb_proj.params, emb, n, &mut e, false)?;
        // Up/down applies to both the normalised branch and the skip input: upsampling is read
        // by the convolutions (and the residual add) from the half-size tensors, the normalised
        // branch is pooled as it is normalised, and the skip input is pooled (an identity skip by
        // the out-conv's epilogue).
        let up = self.updown == UpDown::Up;
        let (h, w) = match self.updown {
            UpDown::None => (x.h, x.w),
            UpDown::Up => (2 * x.h, 2 * x.w),
            UpDown::Down => (x.h / 2, x.w / 2),
        };
        let hw = h * w;
        let mut hidden = be.take(n * hw * oc)?;
        let in_conv = &self.in_conv.params;
        let (hidden_moments, pooled) = match self.updown {
            UpDown::None | UpDown::Up => {
                let norm = plain_norm(&self.in_norm, true);
                let mut parts = vec![x.source()];
                parts.extend(extra.map(ActRef::source));
                let (nhw, none) = ([n, x.h, x.w], Residual::None);
                // Without scale-shift the embedding is added to the hidden layer first, so its
                // moments would not be those of what the out-norm reads.
                let moments = self.scale_shift;
                let hid = &mut hidden;
                let m = be.normed_conv(norm, in_conv, &parts, nhw, up, hid, none, moments)?;
                (m, None)
            }
            UpDown::Down => {
                let mut a = be.take(n * hw * x.c)?;
                let nhwc = [n, x.h, x.w, x.c];
                match x.moments {
                    Some(m) => {
                        be.group_norm_pool2x_from(&self.in_norm, (x.data, m), nhwc, &mut a, true)?
                    }
                    None => be.group_norm_pool2x(&self.in_norm, x.data, nhwc, &mut a, true)?,
                }
                let a_nhwc = [n, h, w, x.c];
                let m = be.conv_moments(in_conv, &a, a_nhwc, false, &mut hidden, Residual::None)?;
                be.give(a);
                // The skip conv reads x pooled; an identity skip is pooled by the out-conv's
                // epilogue as it adds it.
                let pooled = match self.skip {
                    Some(_) => {
                        let mut x2 = be.take(n * hw * x.c)?;
                        be.avg_pool2x(x.data, nhwc, &mut x2)?;
                        Some(x2)
                    }
                    None => None,
                };
                (m, pooled)
            }
        };
        let hidden_moments = if self.scale_shift {
            hidden_moments
        } else {
            if let Some(m) = hidden_moments {
                be.give_vector(m.part);
            }
            be.add_channel_bias(&mut hidden, &e, n, hw, oc)?;
            None
        };
        // out = skip(x) + out_conv(normed), the residual added in the conv's epilogue.
        let mut out = be.take(n * hw * oc)?;
        let nhw = [n, h, w];
        match (&self.skip, &pooled, extra) {
            (Some(conv), Some(x2), _) => {
                be.conv(&conv.params, x2, nhw, &mut out, Residual::None)?
            }
            (Some(conv), None, Some(e)) => {
                let sizes = [n, h, w, x.c, e.c];
                be.concat_conv(
                    &conv.params,
                    [x.data, e.data],
                    sizes,
                    &mut out,
                    Residual::None,
                )?
            }
            (Some(conv), None, None) if up => {
                be.upsample_conv(&conv.params, x.data, [n, x.h, x.w, x.c], &mut out)?
            }
            (Some(conv), None, None) => {
                be.conv(&conv.params, x.data, nhw, &mut out, Residual::None)?
            }
            (None, _, _) => {}
        }
        let residual = match (&self.skip, &pooled) {
            (Some(_), _) => Residual::Output,
            (None, Some(x2)) => Residual::Buffer(x2),
            (None, None) if up => Residual::Upsampled(x.data),
            (None, None) if self.updown == UpDown::Down => Residual::Pooled(x.data),
            (None, None) => Residual::Buffer(x.data),
        };
        let norm = InputNorm {
            norm: &self.out_norm,
            scale_shift: self.scale_shift.then_some(&e),
            silu: true,
        };
        let normed = [Source {
            data: &hidden,
            c: oc,
            moments: hidden_moments.as_ref(),
        }];
        let out_conv = &self.out_conv.params;
        let moments = be.normed_conv(
            norm, out_conv, &normed, nhw, false, &mut out, residual, true,
        )?;
        be.give(hidden);
        if let Some(m) = hidden_moments {
            be.give_vector(m.part);
        }
        be.give_vector(e);
        if let Some(x2) = pooled {
            be.give(x2);
        }
        Ok(Act {
            data: out,
            h,
            w,
            c: oc,
            moments,
        })
    }
}

impl<B: Backend> AttentionBlock<B> {
    /// out = x + proj_out(attention(qkv(norm(x)))), x and out `[n, t, c]`.
    fn forward(&self, be: &mut B, x: ActRef<'_, B>, n: usize) -> Result<Act<B>> {
        let (t, c) = (x.h * x.w, self.channels);
        let len = n * t * c;
        let mut qkv = be.take(3 * len)?;
        let norm = plain_norm(&self.norm, false);
        let input = [x.source()];
        let none = Residual::None;
        be.normed_conv(
            norm,
            &self.qkv.params,
            &input,
            [n, t, 1],
            false,
            &mut qkv,
            none,
            false,
        )?;
        let mut heads = be.take(len)?;
        be.attend(&qkv, [n, t, c, self.heads], &mut heads)?;
        let mut out = be.take(len)?;
        let residual = Residual::Buffer(x.data);
        let proj = &self.proj_out.params;
        let moments = be.conv_moments(proj, &heads, [n, t, 1, c], false, &mut out, residual)?;
        be.give(heads);
        be.give(qkv);
        Ok(Act {
            data: out,
            h: x.h,
            w: x.w,
            c: x.c,
            moments,
        })
    }
}

/// The lengths of a forward pass's conditioning, wherever its values live.
struct CondLengths {
    timesteps: usize,
    labels: Option<usize>,
    embedding: Option<usize>,
}

/// What the model takes of an input batch `[n, c, h, w]`: a size its levels divide, its
/// channels, and conditioning of the right kinds and lengths.
fn check_shape(cfg: &UNetConfig, [n, c, h, w]: [usize; 4], cond: CondLengths) -> Result<()> {
    let bad = |m: String| Err(Error::Input(m));
    if n == 0 || h == 0 || w == 0 {
        return bad(format!("empty input batch [{n}, {c}, {h}, {w}]"));
    }
    if h > MAX_IMAGE_SIZE || w > MAX_IMAGE_SIZE {
        return bad(format!(
            "image size {h}x{w} is larger than the {MAX_IMAGE_SIZE} mcdm supports"
        ));
    }
    if c != cfg.in_channels {
        return bad(format!(
            "x has {c} channels but the model takes {} (x_t plus image conditions)",
            cfg.in_channels
        ));
    }
    let div = 1usize << (cfg.channel_mult.len() - 1);
    if !h.is_multiple_of(div) || !w.is_multiple_of(div) {
        return bad(format!(
            "image size {h}x{w} is not divisible by {div}, as the model's {} levels need",
            cfg.channel_mult.len()
        ));
    }
    if cond.timesteps != n {
        return bad(format!("{} timesteps for a batch of {n}", cond.timesteps));
    }
    match (cfg.num_classes, cond.labels) {
        (Some(_), Some(y)) if y != n => bad(format!("{y} class labels for a batch of {n}"))?,
        (Some(k), None) => bad(format!(
            "the model is class-conditional ({k} classes): give labels `y`"
        ))?,
        (None, Some(_)) => {
            bad("class labels given, but the model is not class-conditional".into())?
        }
        _ => {}
    }
    match (cfg.embed_dim, cond.embedding) {
        (Some(d), Some(e)) if Some(e) != n.checked_mul(d) => {
            bad(format!("embedding has {e} values, expected [{n}, {d}]"))
        }
        (Some(d), None) => bad(format!(
            "the model takes a vector condition: give `emb` [{n}, {d}]"
        )),
        (None, Some(_)) => bad("an embedding was given, but the model has no embed_dim".into()),
        _ => Ok(()),
    }
}

/// An error unless `x` holds exactly the product of `shape`'s dimensions.
/// `x` holds `shape`'s values, all finite.
fn check_input_len(x: &[f32], shape: [usize; 4]) -> Result<()> {
    let want = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d));
    if want != Some(x.len()) {
        let [a, b, c, d] = shape;
        return Err(Error::Input(format!(
            "x has {} values, not {a}x{b}x{c}x{d}",
            x.len()
        )));
    }
    let bad = x.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::Input(format!(
            "x holds {bad} non-finite value(s) (NaN or inf)"
        )));
    }
    Ok(())
}
