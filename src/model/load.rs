//! Opening a model file: the weights, the config from its sources, the UNet built on the CPU;
//! and the loaded model moved to a device.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use super::unet::{
    AttentionBlock, Conditioning, ConvLayer, Layer, LinearLayer, ResBlock, UNet, UpDown,
};
use crate::backend::Cpu;
use crate::config::{resolve, PartialConfig, ResolvedConfig, Source, UNetConfig};
use crate::device::{on_backend, DType, Device, Family, Kind, Placed, Placement, Workspace};
use crate::error::{Error, Result};
use crate::files::{read_string_limited, JSON_LIMIT};
use crate::ops::attention::legacy_qkv_to_new_order;
use crate::ops::conv::Conv2d;
use crate::ops::group_norm::GroupNorm;
use crate::ops::linear::Linear;
use crate::weights::SafetensorsFile;

/// The UNets, one type per backend.
pub struct UNets;

impl Family for UNets {
    type On<B: crate::backend::Backend> = UNet<B>;
}

/// A model file, its resolved config and the network built from it, on a device.
pub struct LoadedModel {
    /// Shared by the copies of one model on several devices ([`LoadedModel::copy_to`]).
    pub file: Arc<SafetensorsFile>,
    pub config: ResolvedConfig,
    /// The SHA-256 (hex) of the file's bytes the weights were read from; None for random
    /// weights.
    sha256: Option<String>,
    device: Device,
    dtype: DType,
    net: Placed<UNets>,
}

/// Resolves the config of `file` from, in order, the explicit `config` path, `<stem>.json`
/// beside the weights and the `config` metadata entry: each field comes from the first of them
/// that holds it; fields none of them gives are inferred from the weights or take their
/// documented defaults.
pub fn resolve_config(file: &SafetensorsFile, config: Option<&Path>) -> Result<ResolvedConfig> {
    let mut sources = Vec::new();
    if let Some(path) = config {
        sources.push(read_config(path)?);
    }
    let beside = file.path().with_extension("json");
    if beside.is_file() && config != Some(beside.as_path()) {
        sources.push(read_config(&beside)?);
    }
    if let Some(text) = file.metadata().get("config") {
        let partial = PartialConfig::from_json(text).map_err(|e| {
            Error::Config(format!("{} metadata `config`: {e}", file.path().display()))
        })?;
        sources.push((Source::Metadata, partial));
    }
    resolve(&sources, &file.shapes())
}

/// A config JSON file as a config source.
fn read_config(path: &Path) -> Result<(Source, PartialConfig)> {
    let text = read_string_limited(path, JSON_LIMIT, "config file")?;
    let partial = PartialConfig::from_json(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok((Source::File(path.display().to_string()), partial))
}

impl LoadedModel {
    /// A model with random weights for `config` (benchmarks), on the CPU; `label` names it in
    /// messages.
    pub fn random(config: ResolvedConfig, seed: u64, label: &str) -> Result<Self> {
        Ok(LoadedModel {
            file: Arc::new(SafetensorsFile::empty(label)?),
            net: Placed::Cpu(UNet::random(&config.unet, seed)?),
            config,
            sha256: None,
            device: Device::Cpu,
            dtype: DType::F32,
        })
    }

    /// The SHA-256 (hex) of the model file's bytes as loaded (None for random weights).
    pub fn sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    /// The device the network is on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The storage type on a GPU (f32 on the CPU).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backend type the network is on.
    pub fn kind(&self) -> Kind {
        self.net.kind()
    }

    /// The network, when it is on backend `B`.
    pub fn unet<B: Placement>(&self) -> Option<&UNet<B>> {
        B::get(&self.net)
    }

    /// The network on the CPU (models load there): None once moved to a GPU.
    pub fn cpu_unet(&self) -> Option<&UNet<Cpu>> {
        self.unet::<Cpu>()
    }

    /// The model moved to `device`, storing `dtype` there (ignored on the CPU). Its parameters
    /// are uploaded once and the host copy dropped. A model already on a GPU stays where it
    /// is when asked for the same place, and cannot be moved elsewhere (load it again).
    pub fn to_device(self, device: &Device, dtype: DType) -> Result<Self> {
        let kind = Kind::of(device, dtype);
        let same = self.device.same(device) && self.kind() == kind;
        if same {
            return Ok(self);
        }
        self.copy_to(device, dtype)
    }

    /// A copy of this model (still on the CPU) on `device`, storing `dtype` there: one model
    /// file read and hashed once serves every device.
    pub fn copy_to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let kind = Kind::of(device, dtype);
        let Some(unet) = self.cpu_unet() else {
            return Err(Error::Input(format!(
                "{} is on {}; it cannot move to {}: load it again",
                self.file.path().display(),
                self.device.describe(self.dtype),
                device.describe(dtype)
            )));
        };
        let net = on_backend!(kind, B => {
            let mut backend = B::open(device)?;
            B::wrap(unet.to_backend(&mut backend)?)
        });
        Ok(LoadedModel {
            file: Arc::clone(&self.file),
            config: self.config.clone(),
            sha256: self.sha256.clone(),
            device: device.clone(),
            dtype: if device.is_cpu() { DType::F32 } else { dtype },
            net,
        })
    }

    /// Forward pass on host NCHW input `x` `[n, c, h, w]` on the model's device; returns NCHW
    /// `[n, out_channels, h, w]`. `ws` keeps the buffers for the next call.
    pub fn forward_nchw(
        &self,
        x: &[f32],
        shape: [usize; 4],
        cond: &Conditioning<'_>,
        ws: &mut Workspace,
    ) -> Result<Vec<f32>> {
        on_backend!(self.kind(), B => {
            let unet = self.unet::<B>().ok_or_else(|| Error::Input("no network".into()))?;
            unet.forward_nchw(ws.backend::<B>(&self.device)?, x, shape, cond)
        })
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        on_backend!(self.kind(), B => self.unet::<B>().map_or(0, UNet::parameters))
    }

    /// Multiply-accumulates times two of one forward pass per image at `h x w`.
    pub fn flops_per_image(&self, h: usize, w: usize) -> f64 {
        on_backend!(self.kind(), B => self.unet::<B>().map_or(0.0, |u| u.flops_per_image(h, w)))
    }
}

/// Opens `weights`, resolves its config and builds the UNet on the CPU. The file is hashed
/// once its weights are copied out, and refused if it changed meanwhile.
pub fn load_model(weights: &Path, config: Option<&Path>) -> Result<LoadedModel> {
    if weights.is_dir() {
        return load_diffusers(weights, config);
    }
    let file = SafetensorsFile::open(weights)?;
    // A condition or an embedding file given as a model: say what it is not, rather than which
    // config field its shapes cannot give.
    if !file.names().any(|n| n.starts_with("time_embed.")) {
        return Err(Error::Input(format!(
            "{}: not a guided-diffusion UNet: it holds {}, and no `time_embed.*` (nor \
             `input_blocks.*`) weights",
            weights.display(),
            file.names_for_message()
        )));
    }
    let config = resolve_config(&file, config)?;
    built(file, config)
}

/// A diffusers `UNet2DModel` folder (see [`super::diffusers`]); `--config` fields come first.
fn load_diffusers(dir: &Path, config: Option<&Path>) -> Result<LoadedModel> {
    let (file, partial, config_json) = super::diffusers::open(dir)?;
    let mut sources = Vec::new();
    if let Some(path) = config {
        sources.push(read_config(path)?);
    }
    sources.push((Source::File(config_json.display().to_string()), partial));
    let config = resolve(&sources, &file.shapes())?;
    built(file, config)
}

/// The UNet of `file` under `config`, on the CPU; the file is hashed once its weights are
/// copied out.
fn built(file: SafetensorsFile, config: ResolvedConfig) -> Result<LoadedModel> {
    let unet = UNet::load(&file, &config.unet)?;
    let sha256 = Some(file.sha256()?);
    Ok(LoadedModel {
        file: Arc::new(file),
        config,
        sha256,
        device: Device::Cpu,
        dtype: DType::F32,
        net: Placed::Cpu(unet),
    })
}

/// The largest network [`UNet::random`] builds: 2^31 parameters, 8 GiB of f32.
pub const MAX_RANDOM_PARAMETERS: usize = 1 << 31;

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
    /// The eps and group count of the group norms it makes (the config's `norm_eps` and
    /// `norm_num_groups`).
    norm_eps: f64,
    norm_groups: usize,
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
            norm_eps: crate::ops::group_norm::EPS,
            norm_groups: crate::ops::group_norm::GROUPS,
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

    fn linear(&mut self, prefix: &str, i: usize, o: usize) -> LinearLayer<Cpu> {
        LinearLayer {
            in_features: i,
            out_features: o,
            params: Linear {
                in_features: i,
                out_features: o,
                weight: self.tensor(&format!("{prefix}.weight"), &[o, i]),
                bias: self.tensor(&format!("{prefix}.bias"), &[o]),
            },
        }
    }

    fn conv(
        &mut self,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> ConvLayer<Cpu> {
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
    ) -> ConvLayer<Cpu> {
        let params = if self.placeholders() {
            Conv2d::empty(cin, cout, kernel, stride)
        } else {
            Conv2d::from_torch(torch_weight, bias, kernel, stride)
        };
        ConvLayer {
            cin,
            cout,
            kernel,
            stride,
            params,
        }
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
            groups: self.norm_groups,
            weight: self.tensor(&format!("{prefix}.weight"), &[c]),
            bias: self.tensor(&format!("{prefix}.bias"), &[c]),
            eps: self.norm_eps,
        }
    }

    fn res_block(
        &mut self,
        prefix: &str,
        cfg: &UNetConfig,
        ch: usize,
        oc: usize,
        updown: UpDown,
    ) -> Box<ResBlock<Cpu>> {
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

    fn attention(
        &mut self,
        prefix: &str,
        cfg: &UNetConfig,
        c: usize,
        upsample: bool,
    ) -> AttentionBlock<Cpu> {
        let heads = cfg.heads(c, upsample);
        let norm = self.norm(&format!("{prefix}.norm"), c);
        let (mut qkv_w, mut qkv_b) = self.conv1d(&format!("{prefix}.qkv"), c, 3 * c);
        let (proj_w, proj_b) = self.conv1d(&format!("{prefix}.proj_out"), c, c);
        if !cfg.use_new_attention_order && !self.placeholders() {
            qkv_w = legacy_qkv_to_new_order(&qkv_w, c, c, heads);
            qkv_b = legacy_qkv_to_new_order(&qkv_b, 1, c, heads);
        }
        AttentionBlock {
            channels: c,
            heads,
            norm,
            qkv: self.conv_from_torch(c, 3 * c, &qkv_w, qkv_b, 1, 1),
            proj_out: self.conv_from_torch(c, c, &proj_w, proj_b, 1, 1),
        }
    }
}

impl UNet<Cpu> {
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
        ld.norm_eps = config.norm_eps;
        ld.norm_groups = config.norm_num_groups;
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
        })
    }
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
    /// high but not far: it bounds what the CPU backend's pool grows to in a pass (the
    /// convolutions' fixed-size scratch aside), within 4x, for networks of one to five levels.
    #[test]
    fn working_memory_estimate_bounds_a_forward_pass() {
        use crate::backend::Cpu;
        use crate::config::{resolve, PartialConfig, Source};
        use crate::model::{Conditioning, UNet};
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
            let mut cpu = Cpu::new();
            unet.forward_nhwc(&mut cpu, &x, [n, h, w, c], &cond)
                .unwrap();
            let pool = cpu.pool_bytes() / 4 - cpu.scratch_floats();
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
