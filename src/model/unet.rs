//! guided-diffusion's `UNetModel` on the CPU: built from a weights file and a resolved config,
//! run NHWC in f32.

use std::collections::BTreeSet;

use crate::config::{UNetConfig, MAX_IMAGE_SIZE};
use crate::error::{Error, Result};
use crate::ops::attention::{legacy_qkv_to_new_order, Attention};
use crate::ops::conv::Conv2d;
use crate::ops::embedding::timestep_embedding;
use crate::ops::group_norm::GroupNorm;
use crate::ops::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::ops::linear::Linear;
use crate::ops::resample::{avg_pool2x, upsample_nearest2x};
use crate::ops::silu;
use crate::weights::SafetensorsFile;

use super::workspace::Workspace;
use crate::memory::check_host_memory;

/// Reads parameters by key, recording every key asked for and every problem, so that a config
/// that does not fit the weights is reported in full at once. Without a file it makes random
/// parameters (for benchmarks and tests of speed, never of correctness); a `dry` loader only
/// counts them.
///
/// Once something is wrong (or when dry), layers get empty placeholders: the network will not
/// run, and a config asking for absurd shapes allocates nothing.
struct Loader<'a> {
    file: Option<&'a SafetensorsFile>,
    dry: bool,
    rng_state: u64,
    seen: BTreeSet<String>,
    problems: Vec<String>,
    fatal: Option<Error>,
    parameters: usize,
}

impl<'a> Loader<'a> {
    fn new(file: Option<&'a SafetensorsFile>, seed: u64) -> Self {
        Loader {
            file,
            dry: false,
            rng_state: seed,
            seen: BTreeSet::new(),
            problems: Vec::new(),
            fatal: None,
            parameters: 0,
        }
    }

    /// Counts the parameters a config needs, allocating none.
    fn dry() -> Self {
        Loader {
            dry: true,
            ..Loader::new(None, 0)
        }
    }

    /// Whether layers get placeholders instead of their parameters.
    fn placeholders(&self) -> bool {
        self.dry || !self.problems.is_empty() || self.fatal.is_some()
    }

    fn tensor(&mut self, key: &str, shape: &[usize]) -> Vec<f32> {
        self.seen.insert(key.to_string());
        let Some(count) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            self.problems.push(format!(
                "`{key}`: the config asks for an impossible shape {shape:?}"
            ));
            self.parameters = usize::MAX;
            return Vec::new();
        };
        self.parameters = self.parameters.saturating_add(count);
        if self.dry {
            return Vec::new();
        }
        let Some(file) = self.file else {
            return self.random(key, shape);
        };
        let Ok(actual) = file.shape(key) else {
            self.problems
                .push(format!("missing key `{key}` (expected shape {shape:?})"));
            return Vec::new();
        };
        if actual != shape {
            self.problems.push(format!(
                "shape mismatch for `{key}`: weights have {actual:?}, config needs {shape:?}"
            ));
            return Vec::new();
        }
        match file.f32(key) {
            Ok(v) => v,
            Err(e) => {
                self.fatal.get_or_insert(e);
                Vec::new()
            }
        }
    }

    /// Uniform values keeping activations O(1): weights scaled by 1/sqrt(fan_in), norm scales
    /// near 1, biases small.
    fn random(&mut self, key: &str, shape: &[usize]) -> Vec<f32> {
        let count: usize = shape.iter().product();
        let (center, half_width) = match shape {
            [_] if key.ends_with(".weight") => (1.0, 0.1),
            [_] => (0.0, 0.1),
            [_, rest @ ..] => (0.0, (3.0 / rest.iter().product::<usize>() as f32).sqrt()),
            [] => (0.0, 0.1),
        };
        (0..count)
            .map(|_| {
                // splitmix64
                self.rng_state = self.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.rng_state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let u = ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32;
                center + half_width * (2.0 * u - 1.0)
            })
            .collect()
    }

    fn linear(&mut self, prefix: &str, i: usize, o: usize) -> Linear {
        Linear {
            in_features: i,
            out_features: o,
            weight: self.tensor(&format!("{prefix}.weight"), &[o, i]),
            bias: self.tensor(&format!("{prefix}.bias"), &[o]),
        }
    }

    fn conv(&mut self, prefix: &str, cin: usize, cout: usize, k: usize, stride: usize) -> Conv2d {
        let w = self.tensor(&format!("{prefix}.weight"), &[cout, cin, k, k]);
        let b = self.tensor(&format!("{prefix}.bias"), &[cout]);
        self.conv_from_torch(cin, cout, &w, b, k, stride)
    }

    /// [`Conv2d::from_torch`], or an empty placeholder (see [`Loader`]).
    fn conv_from_torch(
        &self,
        cin: usize,
        cout: usize,
        torch_weight: &[f32],
        bias: Vec<f32>,
        kernel: usize,
        stride: usize,
    ) -> Conv2d {
        if self.placeholders() {
            return Conv2d::empty(cin, cout, kernel, stride);
        }
        Conv2d::from_torch(torch_weight, bias, kernel, stride)
    }

    /// A Conv1d with kernel 1 (`[cout, cin, 1]`), as attention's qkv and proj_out.
    fn conv1d(&mut self, prefix: &str, cin: usize, cout: usize) -> (Vec<f32>, Vec<f32>) {
        (
            self.tensor(&format!("{prefix}.weight"), &[cout, cin, 1]),
            self.tensor(&format!("{prefix}.bias"), &[cout]),
        )
    }

    fn norm(&mut self, prefix: &str, c: usize) -> GroupNorm {
        GroupNorm {
            channels: c,
            weight: self.tensor(&format!("{prefix}.weight"), &[c]),
            bias: self.tensor(&format!("{prefix}.bias"), &[c]),
        }
    }

    fn res_block(
        &mut self,
        prefix: &str,
        cfg: &UNetConfig,
        ch: usize,
        oc: usize,
        updown: UpDown,
    ) -> Box<ResBlock> {
        let emb = cfg.time_embed_dim();
        let emb_out = if cfg.use_scale_shift_norm { 2 * oc } else { oc };
        Box::new(ResBlock {
            in_norm: self.norm(&format!("{prefix}.in_layers.0"), ch),
            in_conv: self.conv(&format!("{prefix}.in_layers.2"), ch, oc, 3, 1),
            updown,
            emb_proj: self.linear(&format!("{prefix}.emb_layers.1"), emb, emb_out),
            out_norm: self.norm(&format!("{prefix}.out_layers.0"), oc),
            out_conv: self.conv(&format!("{prefix}.out_layers.3"), oc, oc, 3, 1),
            skip: (oc != ch).then(|| self.conv(&format!("{prefix}.skip_connection"), ch, oc, 1, 1)),
            scale_shift: cfg.use_scale_shift_norm,
        })
    }

    fn attention(&mut self, prefix: &str, cfg: &UNetConfig, c: usize, upsample: bool) -> Attention {
        let heads = cfg.heads(c, upsample);
        let norm = self.norm(&format!("{prefix}.norm"), c);
        let (mut qkv_w, mut qkv_b) = self.conv1d(&format!("{prefix}.qkv"), c, 3 * c);
        let (proj_w, proj_b) = self.conv1d(&format!("{prefix}.proj_out"), c, c);
        if !cfg.use_new_attention_order && !self.placeholders() {
            qkv_w = legacy_qkv_to_new_order(&qkv_w, c, c, heads);
            qkv_b = legacy_qkv_to_new_order(&qkv_b, 1, c, heads);
        }
        Attention {
            channels: c,
            heads,
            norm,
            qkv: self.conv_from_torch(c, 3 * c, &qkv_w, qkv_b, 1, 1),
            proj_out: self.conv_from_torch(c, c, &proj_w, proj_b, 1, 1),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpDown {
    None,
    Up,
    Down,
}

pub(crate) struct ResBlock {
    pub(crate) in_norm: GroupNorm,
    pub(crate) in_conv: Conv2d,
    pub(crate) updown: UpDown,
    pub(crate) emb_proj: Linear,
    pub(crate) out_norm: GroupNorm,
    pub(crate) out_conv: Conv2d,
    pub(crate) skip: Option<Conv2d>,
    pub(crate) scale_shift: bool,
}

pub(crate) enum Layer {
    Conv(Conv2d),
    /// Boxed: a residual block is several times the size of the other layers.
    Res(Box<ResBlock>),
    Attn(Attention),
    /// Nearest x2, then a 3x3 conv (`Upsample` with conv_resample).
    UpConv(Conv2d),
}

/// An activation: NHWC data from the workspace plus its spatial size and channels.
struct Act {
    data: Vec<f32>,
    h: usize,
    w: usize,
    c: usize,
}

/// Conditioning of one forward pass over a batch of `n` images.
#[derive(Clone, Copy, Debug)]
pub struct Conditioning<'a> {
    /// `[n]` timestep values, fed to the network as they are.
    pub timesteps: &'a [f32],
    /// `[n]` class labels (class-conditional models).
    pub labels: Option<&'a [i64]>,
    /// `[n, embed_dim]` vector conditions (models with `embed_dim`).
    pub embedding: Option<&'a [f32]>,
}

/// The largest network [`UNet::random`] builds: 2^31 parameters, 8 GiB of f32.
pub const MAX_RANDOM_PARAMETERS: usize = 1 << 31;

/// A guided-diffusion UNet with weights in f32.
pub struct UNet {
    config: UNetConfig,
    pub(crate) time_embed: [Linear; 2],
    pub(crate) label_emb: Option<Vec<f32>>,
    pub(crate) vector_emb: Option<Linear>,
    pub(crate) input_blocks: Vec<Vec<Layer>>,
    pub(crate) middle_block: Vec<Layer>,
    pub(crate) output_blocks: Vec<Vec<Layer>>,
    pub(crate) out_norm: GroupNorm,
    pub(crate) out_conv: Conv2d,
    parameters: usize,
    /// Unique per network built: tells a [`crate::model::GpuUNet`] which network it uploaded.
    id: u64,
}

/// The next [`UNet`]'s id.
static NEXT_UNET_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl UNet {
    /// Builds the network described by `config` from `file`. Every missing key, unexpected key
    /// and shape mismatch is reported in one [`Error::WeightsMismatch`].
    pub fn load(file: &SafetensorsFile, config: &UNetConfig) -> Result<Self> {
        let mut ld = Loader::new(Some(file), 0);
        let unet = Self::build(config, &mut ld)?;
        if let Some(e) = ld.fatal {
            return Err(e);
        }
        let mut problems = ld.problems;
        for key in file.names().filter(|k| !ld.seen.contains(*k)) {
            problems.push(format!(
                "unexpected key `{key}` {:?}",
                file.shape(key).unwrap_or_default()
            ));
        }
        if !problems.is_empty() {
            const SHOWN: usize = 40;
            let more = problems.len().saturating_sub(SHOWN);
            return Err(Error::WeightsMismatch(format!(
                "{}: {} problem(s)\n  {}{}",
                file.path().display(),
                problems.len(),
                problems[..problems.len().min(SHOWN)].join("\n  "),
                if more > 0 {
                    format!("\n  ... and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        Ok(unet)
    }

    /// A network with random parameters, for benchmarks. Refuses a config of more than
    /// [`MAX_RANDOM_PARAMETERS`] parameters before allocating any.
    pub fn random(config: &UNetConfig, seed: u64) -> Result<Self> {
        let parameters = Self::parameter_count(config)?;
        if parameters > MAX_RANDOM_PARAMETERS {
            return Err(Error::Config(format!(
                "the config has {parameters} parameters, more than the {MAX_RANDOM_PARAMETERS} \
                 (8 GiB of f32) mcdm makes random weights for"
            )));
        }
        Self::build(config, &mut Loader::new(None, seed))
    }

    /// The parameters `config` describes, counted without building the network.
    pub fn parameter_count(config: &UNetConfig) -> Result<usize> {
        let mut ld = Loader::dry();
        Self::build(config, &mut ld)?;
        match ld.problems.first() {
            Some(p) => Err(Error::Config(p.clone())),
            None => Ok(ld.parameters),
        }
    }

    fn build(config: &UNetConfig, ld: &mut Loader<'_>) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let mc = cfg.num_channels;
        let emb = cfg.time_embed_dim();
        let time_embed = [
            ld.linear("time_embed.0", mc, emb),
            ld.linear("time_embed.2", emb, emb),
        ];
        let label_emb = cfg
            .num_classes
            .map(|k| ld.tensor("label_emb.weight", &[k, emb]));
        let vector_emb = cfg.embed_dim.map(|d| ld.linear("vector_emb", d, emb));

        let level_ch = cfg.level_channels();
        let attention_ds = cfg.attention_ds();
        let nrb = cfg.num_res_blocks;
        let mut ch = level_ch[0];
        let mut input_blocks = vec![vec![Layer::Conv(ld.conv(
            "input_blocks.0.0",
            cfg.in_channels,
            ch,
            3,
            1,
        ))]];
        let mut skip_ch = vec![ch];
        let mut ds = 1;
        for (level, &lch) in level_ch.iter().enumerate() {
            for _ in 0..nrb {
                let p = format!("input_blocks.{}", input_blocks.len());
                let mut layers = vec![Layer::Res(ld.res_block(
                    &format!("{p}.0"),
                    cfg,
                    ch,
                    lch,
                    UpDown::None,
                ))];
                ch = lch;
                if attention_ds.contains(&ds) {
                    layers.push(Layer::Attn(ld.attention(&format!("{p}.1"), cfg, ch, false)));
                }
                input_blocks.push(layers);
                skip_ch.push(ch);
            }
            if level + 1 != level_ch.len() {
                let p = format!("input_blocks.{}.0", input_blocks.len());
                let layer = if cfg.resblock_updown {
                    Layer::Res(ld.res_block(&p, cfg, ch, ch, UpDown::Down))
                } else {
                    Layer::Conv(ld.conv(&format!("{p}.op"), ch, ch, 3, 2))
                };
                input_blocks.push(vec![layer]);
                skip_ch.push(ch);
                ds *= 2;
            }
        }
        let middle_block = vec![
            Layer::Res(ld.res_block("middle_block.0", cfg, ch, ch, UpDown::None)),
            Layer::Attn(ld.attention("middle_block.1", cfg, ch, false)),
            Layer::Res(ld.res_block("middle_block.2", cfg, ch, ch, UpDown::None)),
        ];
        let mut output_blocks = Vec::new();
        for (level, &lch) in level_ch.iter().enumerate().rev() {
            for i in 0..=nrb {
                let p = format!("output_blocks.{}", output_blocks.len());
                let ich = skip_ch.pop().unwrap_or_default();
                let mut layers = vec![Layer::Res(ld.res_block(
                    &format!("{p}.0"),
                    cfg,
                    ch + ich,
                    lch,
                    UpDown::None,
                ))];
                ch = lch;
                if attention_ds.contains(&ds) {
                    layers.push(Layer::Attn(ld.attention(&format!("{p}.1"), cfg, ch, true)));
                }
                if level > 0 && i == nrb {
                    let q = format!("{p}.{}", layers.len());
                    layers.push(if cfg.resblock_updown {
                        Layer::Res(ld.res_block(&q, cfg, ch, ch, UpDown::Up))
                    } else {
                        Layer::UpConv(ld.conv(&format!("{q}.conv"), ch, ch, 3, 1))
                    });
                    ds /= 2;
                }
                output_blocks.push(layers);
            }
        }
        let out_norm = ld.norm("out.0", ch);
        let out_conv = ld.conv("out.2", level_ch[0], cfg.out_channels(), 3, 1);

        Ok(UNet {
            config: config.clone(),
            time_embed,
            label_emb,
            vector_emb,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm,
            out_conv,
            parameters: ld.parameters,
            id: NEXT_UNET_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// This network's identity (not its weights'): the same for no two networks built.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.parameters
    }

    /// Checks an input batch: channels, a size the levels divide, and the conditioning.
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

    /// Forward pass on NCHW input `x` `[n, c, h, w]`; returns NCHW `[n, out_channels, h, w]`.
    pub fn forward_nchw(
        &self,
        x: &[f32],
        shape: [usize; 4],
        cond: &Conditioning<'_>,
        ws: &mut Workspace,
    ) -> Result<Vec<f32>> {
        let [n, c, h, w] = shape;
        // The layout copy needs only the length; forward_nhwc checks the rest.
        check_input_len(x, [n, c, h, w])?;
        let mut nhwc = ws.take(x.len());
        nchw_to_nhwc(x, n, c, h * w, &mut nhwc);
        let out = self.forward_nhwc(&nhwc, [n, h, w, c], cond, ws);
        ws.give(nhwc);
        let out = out?;
        let oc = self.config.out_channels();
        let mut res = vec![0.0; out.len()];
        nhwc_to_nchw(&out, n, oc, h * w, &mut res);
        ws.give(out);
        Ok(res)
    }

    /// Forward pass on NHWC input `[n, h, w, c]`; returns NHWC `[n, h, w, out_channels]` (a
    /// workspace buffer: give it back when done).
    pub fn forward_nhwc(
        &self,
        x: &[f32],
        shape: [usize; 4],
        cond: &Conditioning<'_>,
        ws: &mut Workspace,
    ) -> Result<Vec<f32>> {
        let [n, h, w, c] = shape;
        check_input_len(x, [n, h, w, c])?;
        self.check_input(n, c, h, w, cond)?;
        // Images are independent, so a large batch runs in groups whose activations stay
        // cache-sized (about 1M floats for the widest level-0 tensor); results are unchanged.
        let per_image = h * w * self.config.level_channels()[0].max(c);
        let group = ((1usize << 20) / per_image.max(1)).clamp(1, n);
        let oc = self.config.out_channels();
        let floats = group
            .saturating_mul(self.working_floats_per_image(h, w))
            .saturating_add(n.saturating_mul(h * w).saturating_mul(c + oc));
        // Once per size the workspace has not yet served, not on every pass of a sampling run.
        if floats > ws.memory_checked {
            check_host_memory(
                floats.saturating_mul(std::mem::size_of::<f32>()),
                &format!("a forward pass of {n} image(s) of {h}x{w}"),
            )?;
            ws.memory_checked = floats;
        }
        if group == n {
            return Ok(self.forward_group(x, shape, cond, ws));
        }
        let mut out = ws.take(n * h * w * oc);
        for first in (0..n).step_by(group) {
            let g = group.min(n - first);
            let d = self.config.embed_dim.unwrap_or(0);
            let sub = Conditioning {
                timesteps: &cond.timesteps[first..first + g],
                labels: cond.labels.map(|y| &y[first..first + g]),
                embedding: cond.embedding.map(|e| &e[first * d..(first + g) * d]),
            };
            let part = self.forward_group(
                &x[first * h * w * c..(first + g) * h * w * c],
                [g, h, w, c],
                &sub,
                ws,
            );
            out[first * h * w * oc..(first + g) * h * w * oc].copy_from_slice(&part);
            ws.give(part);
        }
        Ok(out)
    }

    /// The forward pass over one group of images (input already checked).
    fn forward_group(
        &self,
        x: &[f32],
        shape: [usize; 4],
        cond: &Conditioning<'_>,
        ws: &mut Workspace,
    ) -> Vec<f32> {
        let [n, h, w, c] = shape;
        let emb = self.embedding(n, cond, ws);
        let mut input = ws.take(x.len());
        input.copy_from_slice(x);
        let mut act = Act {
            data: input,
            h,
            w,
            c,
        };
        let mut skips: Vec<Act> = Vec::with_capacity(self.input_blocks.len());
        for block in &self.input_blocks {
            act = self.run_block(block, act, n, &emb, ws);
            let mut copy = ws.take(act.data.len());
            copy.copy_from_slice(&act.data);
            skips.push(Act { data: copy, ..act });
        }
        act = self.run_block(&self.middle_block, act, n, &emb, ws);
        for block in &self.output_blocks {
            let skip = skips.pop().expect("one skip per output block");
            let cat = concat_channels(&act, &skip, n, ws);
            ws.give(act.data);
            ws.give(skip.data);
            act = self.run_block(block, cat, n, &emb, ws);
        }
        let hw = act.h * act.w;
        let mut normed = ws.take(act.data.len());
        self.out_norm
            .forward(&act.data, n, hw, &mut normed, None, true);
        ws.give(act.data);
        let mut out = ws.take(n * hw * self.config.out_channels());
        let mut scratch = std::mem::take(&mut ws.scratch);
        self.out_conv
            .forward(&normed, n, h, w, &mut out, false, &mut scratch);
        ws.scratch = scratch;
        ws.give(normed);
        ws.give(emb);
        out
    }

    /// SiLU(time_embed(t) + label_emb(y) + vector_emb(e)): `[n, 4mc]`, the input every
    /// ResBlock's `emb_layers` starts from.
    fn embedding(&self, n: usize, cond: &Conditioning<'_>, ws: &mut Workspace) -> Vec<f32> {
        let mc = self.config.num_channels;
        let dim = self.config.time_embed_dim();
        let mut t_emb = ws.take(n * mc);
        timestep_embedding(cond.timesteps, mc, &mut t_emb);
        let mut hidden = ws.take(n * dim);
        self.time_embed[0].forward(&t_emb, n, &mut hidden, false);
        hidden.iter_mut().for_each(|v| *v = silu(*v));
        let mut emb = ws.take(n * dim);
        self.time_embed[1].forward(&hidden, n, &mut emb, false);
        if let (Some(table), Some(labels)) = (&self.label_emb, cond.labels) {
            for (row, &y) in emb.chunks_exact_mut(dim).zip(labels) {
                let src = &table[y as usize * dim..][..dim];
                row.iter_mut().zip(src).for_each(|(a, b)| *a += b);
            }
        }
        if let (Some(proj), Some(e)) = (&self.vector_emb, cond.embedding) {
            proj.forward(e, n, &mut hidden, false);
            emb.iter_mut().zip(&hidden).for_each(|(a, b)| *a += b);
        }
        emb.iter_mut().for_each(|v| *v = silu(*v));
        ws.give(t_emb);
        ws.give(hidden);
        emb
    }

    fn run_block(
        &self,
        layers: &[Layer],
        mut act: Act,
        n: usize,
        emb: &[f32],
        ws: &mut Workspace,
    ) -> Act {
        for layer in layers {
            let next = match layer {
                Layer::Conv(conv) => {
                    let (ho, wo) = conv.out_size(act.h, act.w);
                    let mut out = ws.take(n * ho * wo * conv.cout);
                    let mut scratch = std::mem::take(&mut ws.scratch);
                    conv.forward(&act.data, n, act.h, act.w, &mut out, false, &mut scratch);
                    ws.scratch = scratch;
                    Act {
                        data: out,
                        h: ho,
                        w: wo,
                        c: conv.cout,
                    }
                }
                Layer::UpConv(conv) => {
                    let (h2, w2) = (2 * act.h, 2 * act.w);
                    let mut up = ws.take(n * h2 * w2 * act.c);
                    upsample_nearest2x(&act.data, n, act.h, act.w, act.c, &mut up);
                    let mut out = ws.take(n * h2 * w2 * conv.cout);
                    let mut scratch = std::mem::take(&mut ws.scratch);
                    conv.forward(&up, n, h2, w2, &mut out, false, &mut scratch);
                    ws.scratch = scratch;
                    ws.give(up);
                    Act {
                        data: out,
                        h: h2,
                        w: w2,
                        c: conv.cout,
                    }
                }
                Layer::Res(block) => block.forward(&act, n, emb, ws),
                Layer::Attn(attn) => {
                    let t = act.h * act.w;
                    let len = act.data.len();
                    let mut out = ws.take(len);
                    let mut normed = ws.take(len);
                    let mut qkv = ws.take(3 * len);
                    let mut heads = ws.take(len);
                    let mut scratch = std::mem::take(&mut ws.scratch);
                    attn.forward(
                        &act.data,
                        n,
                        t,
                        &mut out,
                        &mut normed,
                        &mut qkv,
                        &mut heads,
                        &mut scratch,
                    );
                    ws.scratch = scratch;
                    ws.give(normed);
                    ws.give(qkv);
                    ws.give(heads);
                    Act { data: out, ..act }
                }
            };
            ws.give(std::mem::replace(&mut act, next).data);
        }
        act
    }

    /// About how many floats a CPU forward pass of one `h` x `w` image holds at once, erring
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
        let conv = |c: &Conv2d, h: usize, w: usize| {
            let (ho, wo) = c.out_size(h, w);
            2.0 * ho as f64 * wo as f64 * (c.cout * c.cin * c.kernel * c.kernel) as f64
        };
        let mut total = 0.0;
        let mut size = (h, w);
        let walk = |layers: &[Layer], size: &mut (usize, usize), total: &mut f64| {
            for layer in layers {
                match layer {
                    Layer::Conv(c) => {
                        *total += conv(c, size.0, size.1);
                        *size = c.out_size(size.0, size.1);
                    }
                    Layer::UpConv(c) => {
                        *size = (size.0.saturating_mul(2), size.1.saturating_mul(2));
                        *total += conv(c, size.0, size.1);
                    }
                    Layer::Res(r) => {
                        *total += conv(&r.in_conv, size.0, size.1);
                        *size = match r.updown {
                            UpDown::Up => (size.0.saturating_mul(2), size.1.saturating_mul(2)),
                            UpDown::Down => (size.0 / 2, size.1 / 2),
                            UpDown::None => *size,
                        };
                        *total += conv(&r.out_conv, size.0, size.1);
                        if let Some(s) = &r.skip {
                            *total += conv(s, size.0, size.1);
                        }
                    }
                    Layer::Attn(a) => {
                        let t = (size.0 * size.1) as f64;
                        *total += conv(&a.qkv, size.0, size.1) + conv(&a.proj_out, size.0, size.1);
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
        total + conv(&self.out_conv, h, w)
    }
}

impl ResBlock {
    fn forward(&self, x: &Act, n: usize, emb: &[f32], ws: &mut Workspace) -> Act {
        let oc = self.out_conv.cout;
        let mut scratch = std::mem::take(&mut ws.scratch);
        let mut a = ws.take(x.data.len());
        self.in_norm
            .forward(&x.data, n, x.h * x.w, &mut a, None, true);
        // Up/down applies to both the normalised branch and the skip input.
        let (h, w, resampled) = match self.updown {
            UpDown::None => (x.h, x.w, None),
            UpDown::Up => {
                let (h, w) = (2 * x.h, 2 * x.w);
                let mut a2 = ws.take(n * h * w * x.c);
                upsample_nearest2x(&a, n, x.h, x.w, x.c, &mut a2);
                let mut x2 = ws.take(n * h * w * x.c);
                upsample_nearest2x(&x.data, n, x.h, x.w, x.c, &mut x2);
                ws.give(std::mem::replace(&mut a, a2));
                (h, w, Some(x2))
            }
            UpDown::Down => {
                let (h, w) = (x.h / 2, x.w / 2);
                let mut a2 = ws.take(n * h * w * x.c);
                avg_pool2x(&a, n, x.h, x.w, x.c, &mut a2);
                let mut x2 = ws.take(n * h * w * x.c);
                avg_pool2x(&x.data, n, x.h, x.w, x.c, &mut x2);
                ws.give(std::mem::replace(&mut a, a2));
                (h, w, Some(x2))
            }
        };
        let skip_in: &[f32] = resampled.as_deref().unwrap_or(&x.data);
        let hw = h * w;
        let mut hidden = ws.take(n * hw * oc);
        self.in_conv
            .forward(&a, n, h, w, &mut hidden, false, &mut scratch);
        ws.give(a);
        let mut e = ws.take(n * self.emb_proj.out_features);
        self.emb_proj.forward(emb, n, &mut e, false);
        let mut normed = ws.take(n * hw * oc);
        if self.scale_shift {
            self.out_norm
                .forward(&hidden, n, hw, &mut normed, Some(&e), true);
        } else {
            for (img, e_row) in hidden.chunks_exact_mut(hw * oc).zip(e.chunks_exact(oc)) {
                for px in img.chunks_exact_mut(oc) {
                    px.iter_mut().zip(e_row).for_each(|(v, b)| *v += b);
                }
            }
            self.out_norm
                .forward(&hidden, n, hw, &mut normed, None, true);
        }
        ws.give(e);
        // out = skip(x) + out_conv(normed): the skip written first, the conv accumulated.
        let mut out = hidden;
        match &self.skip {
            Some(conv) => conv.forward(skip_in, n, h, w, &mut out, false, &mut scratch),
            None => out.copy_from_slice(skip_in),
        }
        self.out_conv
            .forward(&normed, n, h, w, &mut out, true, &mut scratch);
        ws.give(normed);
        if let Some(r) = resampled {
            ws.give(r);
        }
        ws.scratch = scratch;
        Act {
            data: out,
            h,
            w,
            c: oc,
        }
    }
}

/// `cat([a, b], dim=channels)` in NHWC.
fn concat_channels(a: &Act, b: &Act, n: usize, ws: &mut Workspace) -> Act {
    let c = a.c + b.c;
    let mut out = ws.take(n * a.h * a.w * c);
    for ((dst, pa), pb) in out
        .chunks_exact_mut(c)
        .zip(a.data.chunks_exact(a.c))
        .zip(b.data.chunks_exact(b.c))
    {
        dst[..a.c].copy_from_slice(pa);
        dst[a.c..].copy_from_slice(pb);
    }
    Act {
        data: out,
        h: a.h,
        w: a.w,
        c,
    }
}

/// The lengths of a forward pass's conditioning, wherever its values live.
pub(crate) struct CondLengths {
    pub timesteps: usize,
    pub labels: Option<usize>,
    pub embedding: Option<usize>,
}

/// What the model takes of an input batch `[n, c, h, w]`, on the host or the device: a size
/// its levels divide, its channels, and conditioning of the right kinds and lengths.
pub(crate) fn check_shape(
    cfg: &UNetConfig,
    [n, c, h, w]: [usize; 4],
    cond: CondLengths,
) -> Result<()> {
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
fn check_input_len(x: &[f32], shape: [usize; 4]) -> Result<()> {
    let want = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d));
    if want != Some(x.len()) {
        let [a, b, c, d] = shape;
        return Err(Error::Input(format!(
            "x has {} values, not {a}x{b}x{c}x{d}",
            x.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Loader;

    /// Random weights (benchmarks, GPU parity runs on random models) are uniform on
    /// [center - half, center + half]: weight tensors at variance 1 / fan_in, norm scales near 1,
    /// biases near 0. The same seed repeats them; another seed does not.
    #[test]
    fn random_weights_are_uniform_at_the_intended_scale() {
        let conv = Loader::new(None, 7).random("in.weight", &[64, 32, 3, 3]);
        check_uniform(&conv, 0.0, (3.0f64 / (32 * 3 * 3) as f64).sqrt());
        let mut ld = Loader::new(None, 7);
        check_uniform(&ld.random("norm.weight", &[8192]), 1.0, 0.1);
        check_uniform(&ld.random("norm.bias", &[8192]), 0.0, 0.1);
        check_uniform(
            &ld.random("proj.weight", &[16, 4096]),
            0.0,
            (3.0f64 / 4096.0).sqrt(),
        );

        assert_eq!(
            conv,
            Loader::new(None, 7).random("in.weight", &[64, 32, 3, 3])
        );
        let other = Loader::new(None, 8).random("in.weight", &[64, 32, 3, 3]);
        let same = conv.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert!(
            same < 10,
            "{same} of {} values repeat under another seed",
            conv.len()
        );
    }

    /// `working_floats_per_image`, which refuses forward passes past the machine's memory, errs
    /// high but not far: it bounds what the workspace pool grows to in a pass (the convolutions'
    /// fixed-size scratch aside), within 4x, for networks of one to five levels.
    #[test]
    fn working_memory_estimate_bounds_a_forward_pass() {
        use crate::config::{resolve, PartialConfig, Source};
        use crate::model::{Conditioning, UNet, Workspace};
        for (json, size, n) in [
            (
                r#"{"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                    "attention_resolutions": "", "image_size": 32}"#,
                128,
                1,
            ),
            (
                r#"{"num_channels": 64, "num_res_blocks": 2, "channel_mult": "1,2,2",
                    "attention_resolutions": "16,8", "image_size": 64}"#,
                64,
                2,
            ),
            (
                r#"{"num_channels": 128, "num_res_blocks": 3, "channel_mult": "1,1,2,3,4",
                    "attention_resolutions": "32,16,8", "image_size": 64, "num_head_channels": 64,
                    "use_scale_shift_norm": true, "resblock_updown": true, "learn_sigma": true}"#,
                64,
                3,
            ),
        ] {
            let partial = PartialConfig::from_json(json).unwrap();
            let cfg = resolve(&[(Source::File("t".into()), partial)], &Default::default()).unwrap();
            let unet = UNet::random(&cfg.unet, 3).unwrap();
            let (h, w, c) = (size, size, 3);
            let x: Vec<f32> = (0..n * h * w * c)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let t: Vec<f32> = (0..n).map(|i| 100.0 * i as f32 + 5.0).collect();
            let cond = Conditioning {
                timesteps: &t,
                labels: None,
                embedding: None,
            };
            let mut ws = Workspace::new();
            let out = unet.forward_nhwc(&x, [n, h, w, c], &cond, &mut ws).unwrap();
            ws.give(out);
            let pool = ws.bytes() / 4 - ws.scratch.capacity();
            let oc = unet.config().out_channels();
            let estimate = n * unet.working_floats_per_image(h, w) + n * h * w * (c + oc);
            let ratio = estimate as f64 / pool as f64;
            assert!(
                (1.0..=4.0).contains(&ratio),
                "{json} at {size}: {estimate} floats estimated, {pool} held"
            );
        }
    }

    /// Every value in range; mean, variance, a 10-bin histogram and the correlation of
    /// neighbours within 5 standard errors of a uniform distribution's.
    fn check_uniform(v: &[f32], center: f64, half: f64) {
        let n = v.len() as f64;
        let u: Vec<f64> = v.iter().map(|&x| (x as f64 - center) / half).collect();
        assert!(
            u.iter().all(|x| x.abs() <= 1.0 + 1e-6),
            "values outside the range"
        );
        let mean = u.iter().sum::<f64>() / n;
        // A uniform on [-1, 1] has variance 1/3 and fourth moment 1/5.
        assert!(mean.abs() < 5.0 * (1.0 / 3.0 / n).sqrt(), "mean {mean}");
        let var = u.iter().map(|x| x * x).sum::<f64>() / n;
        let var_se = ((1.0 / 5.0 - 1.0 / 9.0) / n).sqrt();
        assert!((var - 1.0 / 3.0).abs() < 5.0 * var_se, "variance {var}");
        let mut bins = [0usize; 10];
        for x in &u {
            bins[(((x + 1.0) * 5.0) as usize).min(9)] += 1;
        }
        let bin_se = (n * 0.1 * 0.9).sqrt();
        for (i, &b) in bins.iter().enumerate() {
            assert!(
                (b as f64 - n / 10.0).abs() < 5.0 * bin_se,
                "bin {i}: {bins:?}"
            );
        }
        let lag1 = u.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / (n - 1.0) / (1.0 / 3.0);
        assert!(lag1.abs() < 5.0 / n.sqrt(), "neighbour correlation {lag1}");
    }
}
