//! Model and diffusion configuration, in guided-diffusion's script flag names.
//!
//! A config is resolved from up to four sources, in order: an explicit JSON file, `<stem>.json`
//! beside the weights, a `config` entry in the safetensors metadata, and inference from the
//! weights' key names and shapes; each field comes from the first source that gives it. Fields
//! that none of them gives take the reference default of
//! `model_and_diffusion_defaults()`; [`ResolvedConfig::sources`] says where each field came from.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::diffusion::{DiffusionConfig, NoiseSchedule};
use crate::error::{Error, Result};

/// The largest image side mcdm samples at (guided-diffusion's models go up to 512).
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Bounds on a UNet config, far past any real model (guided-diffusion's widest level is 1024
/// channels, its deepest 6 levels of 3 blocks).
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_RES_BLOCKS: usize = 64;
pub const MAX_LEVELS: usize = 13;
pub const MAX_CLASSES: usize = 1 << 24;

/// UNet architecture (guided-diffusion `UNetModel`) plus mcdm's extensions
/// (`in_channels`, `num_classes`, `embed_dim`, and diffusers' `flip_sin_to_cos`, `freq_shift`,
/// `norm_eps`, `norm_num_groups`).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub num_channels: usize,
    pub num_res_blocks: usize,
    /// Channel multiplier per level (resolved: never empty).
    pub channel_mult: Vec<f64>,
    /// Resolutions (not downsample rates) at which attention is used.
    pub attention_resolutions: Vec<usize>,
    pub num_heads: usize,
    /// -1: use `num_heads`.
    pub num_head_channels: i64,
    /// -1: same as `num_heads`.
    pub num_heads_upsample: i64,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_new_attention_order: bool,
    pub learn_sigma: bool,
    /// Number of class labels when class-conditional (`label_emb`).
    pub num_classes: Option<usize>,
    /// Width of a vector condition projected by `vector_emb` (Linear) into the time embedding.
    pub embed_dim: Option<usize>,
    pub dropout: f64,
    pub use_fp16: bool,
    /// The time features as `[cos | sin]` (guided-diffusion's; diffusers' `flip_sin_to_cos`),
    /// else `[sin | cos]`.
    pub flip_sin_to_cos: bool,
    /// Frequencies `10000^(-i / (half - freq_shift))` (diffusers' `freq_shift`; 0 in
    /// guided-diffusion).
    pub freq_shift: f64,
    /// The group norms' eps (guided-diffusion's GroupNorm32: 1e-5; diffusers' `norm_eps`).
    pub norm_eps: f64,
    /// The group norms' group count (guided-diffusion's GroupNorm32: 32; diffusers'
    /// `norm_num_groups`).
    pub norm_num_groups: usize,
}

impl UNetConfig {
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            6
        } else {
            3
        }
    }
    pub fn time_embed_dim(&self) -> usize {
        4 * self.num_channels
    }
    /// Channels of each level, `int(mult * num_channels)` as in the reference.
    pub fn level_channels(&self) -> Vec<usize> {
        self.channel_mult
            .iter()
            .map(|m| (m * self.num_channels as f64) as usize)
            .collect()
    }
    /// Downsample rates (1, 2, 4, ...) at which attention blocks sit.
    pub fn attention_ds(&self) -> Vec<usize> {
        self.attention_resolutions
            .iter()
            .map(|r| self.image_size / r)
            .collect()
    }
    /// Heads of an attention block with `channels` channels; `upsample` for output blocks.
    pub fn heads(&self, channels: usize, upsample: bool) -> usize {
        if self.num_head_channels > 0 {
            channels / self.num_head_channels as usize
        } else if upsample && self.num_heads_upsample > 0 {
            self.num_heads_upsample as usize
        } else {
            self.num_heads
        }
    }
}

/// Where a resolved config field came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A JSON file (explicit `--config` or `<stem>.json` beside the weights).
    File(String),
    /// The `config` entry of the safetensors metadata.
    Metadata,
    /// Read off the weights' key names and shapes.
    Inferred,
    /// The reference default (`model_and_diffusion_defaults()`), or mcdm's documented default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(_) => f.write_str("file"),
            Source::Metadata => f.write_str("metadata"),
            Source::Inferred => f.write_str("inferred"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// A fully resolved config: the architecture, the diffusion, and the source of every field.
#[derive(Clone, Debug)]
pub struct ResolvedConfig {
    pub unet: UNetConfig,
    pub diffusion: DiffusionConfig,
    pub sources: BTreeMap<&'static str, Source>,
}

impl ResolvedConfig {
    /// A warning naming the fields that change the images a model makes (image size and noise
    /// schedule) that no source gave, with the default each took: it may not be what the model
    /// was trained with. None when the config gives them all.
    pub fn default_warning(&self) -> Option<String> {
        let fields = [
            ("image_size", self.unet.image_size.to_string()),
            (
                "noise_schedule",
                self.diffusion.noise_schedule.name().to_string(),
            ),
            (
                "diffusion_steps",
                self.diffusion.diffusion_steps.to_string(),
            ),
        ];
        let defaulted: Vec<String> = fields
            .iter()
            .filter(|(key, _)| self.sources.get(key) == Some(&Source::Default))
            .map(|(key, value)| format!("{key} {value}"))
            .collect();
        (!defaulted.is_empty()).then(|| {
            format!(
                "not in its config, so defaulted: {} (the images depend on them; give them in \
                 its config if the model was trained otherwise)",
                defaulted.join(", ")
            )
        })
    }
}

/// Every key a config may hold. `use_checkpoint` is accepted and has no effect at inference.
pub const CONFIG_KEYS: &[&str] = &[
    "image_size",
    "in_channels",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "learn_sigma",
    "class_cond",
    "num_classes",
    "embed_dim",
    "flip_sin_to_cos",
    "freq_shift",
    "norm_eps",
    "norm_num_groups",
    "dropout",
    "use_fp16",
    "use_checkpoint",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "rescale_timesteps",
    "predict_xstart",
    "sigma_small",
    "use_kl",
    "rescale_learned_sigmas",
];

/// Parses JSON like `serde_json::from_str`, but a key given twice in one object is an error
/// (serde_json keeps the last one silently, so a stray duplicate would change a setting unseen).
pub fn parse_json(text: &str) -> std::result::Result<Value, serde_json::Error> {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    let crate::files::StrictJson(value) = crate::files::StrictJson::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A config as given by one source: JSON values by key, checked against [`CONFIG_KEYS`].
#[derive(Clone, Debug, Default)]
pub struct PartialConfig {
    values: BTreeMap<String, Value>,
}

impl PartialConfig {
    /// Parses a JSON object; unknown keys are an error that names them all.
    pub fn from_json(text: &str) -> Result<Self> {
        let value = parse_json(text).map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::Config("expected a JSON object".into()));
        };
        let unknown: Vec<&str> = map
            .keys()
            .filter(|k| !CONFIG_KEYS.contains(&k.as_str()))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Config(format!(
                "unknown key(s): {} (known: {})",
                unknown.join(", "),
                CONFIG_KEYS.join(", ")
            )));
        }
        Ok(PartialConfig {
            values: map.into_iter().collect(),
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }
}

fn parse_bool(key: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "True" || s == "true" => Ok(true),
        Value::String(s) if s == "False" || s == "false" => Ok(false),
        _ => Err(Error::Config(format!(
            "`{key}` must be true/false or \"True\"/\"False\", got {v}"
        ))),
    }
}

fn parse_int(key: &str, v: &Value) -> Result<i64> {
    match v {
        Value::Number(n) if n.is_i64() => Ok(n.as_i64().unwrap_or_default()),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| Error::Config(format!("`{key}` must be an integer, got {v}"))),
        _ => Err(Error::Config(format!(
            "`{key}` must be an integer, got {v}"
        ))),
    }
}

fn parse_usize(key: &str, v: &Value) -> Result<usize> {
    let i = parse_int(key, v)?;
    usize::try_from(i).map_err(|_| Error::Config(format!("`{key}` must be >= 0, got {i}")))
}

fn parse_float(key: &str, v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or_default()),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| Error::Config(format!("`{key}` must be a number, got {v}"))),
        _ => Err(Error::Config(format!("`{key}` must be a number, got {v}"))),
    }
}

fn parse_string(key: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(Error::Config(format!("`{key}` must be a string, got {v}"))),
    }
}

/// A comma list ("1,2,2") or a JSON array of numbers.
fn parse_list(key: &str, v: &Value) -> Result<Vec<f64>> {
    let bad = || Error::Config(format!("`{key}` must be a list like \"1,2,2\", got {v}"));
    match v {
        Value::String(s) if s.trim().is_empty() => Ok(Vec::new()),
        Value::String(s) => s
            .split(',')
            .map(|p| p.trim().parse::<f64>().map_err(|_| bad()))
            .collect(),
        Value::Array(items) => items.iter().map(|i| i.as_f64().ok_or_else(bad)).collect(),
        Value::Number(n) => Ok(vec![n.as_f64().ok_or_else(bad)?]),
        _ => Err(bad()),
    }
}

/// The reference's `channel_mult` for `channel_mult=""` (`create_model`).
pub fn default_channel_mult(image_size: usize) -> Option<Vec<f64>> {
    match image_size {
        512 => Some(vec![0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]),
        256 => Some(vec![1.0, 1.0, 2.0, 2.0, 4.0, 4.0]),
        128 => Some(vec![1.0, 1.0, 2.0, 3.0, 4.0]),
        64 => Some(vec![1.0, 2.0, 3.0, 4.0]),
        _ => None,
    }
}

/// What the weights' key names and shapes tell about the architecture.
#[derive(Clone, Debug, Default)]
pub struct InferredArch {
    pub in_channels: Option<usize>,
    pub num_channels: Option<usize>,
    pub num_res_blocks: Option<usize>,
    pub channel_mult: Option<Vec<f64>>,
    /// Downsample rates with attention.
    pub attention_ds: Option<Vec<usize>>,
    pub use_scale_shift_norm: Option<bool>,
    pub resblock_updown: Option<bool>,
    pub learn_sigma: Option<bool>,
    pub num_classes: Option<Option<usize>>,
    pub embed_dim: Option<Option<usize>>,
}

impl InferredArch {
    /// Reads the architecture off `shapes` (key -> shape) of a guided-diffusion state_dict.
    pub fn from_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Self {
        let dim = |key: &str, i: usize| shapes.get(key).and_then(|s| s.get(i).copied());
        let has = |key: &str| shapes.contains_key(key);
        let mut arch = InferredArch {
            in_channels: dim("input_blocks.0.0.weight", 1),
            num_channels: dim("time_embed.0.weight", 1),
            learn_sigma: dim("out.2.weight", 0).map(|c| c == 6),
            num_classes: Some(dim("label_emb.weight", 0)),
            embed_dim: Some(dim("vector_emb.weight", 1)),
            ..Default::default()
        };
        let count_blocks = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    let p = format!("{prefix}.{i}.");
                    shapes.keys().any(|k| k.starts_with(&p))
                })
                .count()
        };
        let n_out = count_blocks("output_blocks");
        if n_out == 0 {
            return arch;
        }
        // An output block ends with an up layer (Upsample conv or up ResBlock) every
        // num_res_blocks + 1 blocks; a ResBlock or conv past index 0 marks one.
        let is_up = |j: usize| {
            (1..=2).any(|k| {
                has(&format!("output_blocks.{j}.{k}.conv.weight"))
                    || has(&format!("output_blocks.{j}.{k}.in_layers.0.weight"))
            })
        };
        let nrb_plus_1 = match (0..n_out).find(|&j| is_up(j)) {
            Some(j) => j + 1,
            None => n_out,
        };
        if nrb_plus_1 < 2 || n_out % nrb_plus_1 != 0 {
            return arch;
        }
        let nrb = nrb_plus_1 - 1;
        let levels = n_out / nrb_plus_1;
        arch.num_res_blocks = Some(nrb);
        let mc = arch.num_channels;
        let mut mult = Vec::new();
        let mut attention_ds = Vec::new();
        for level in 0..levels {
            let first = 1 + level * nrb_plus_1;
            let ch = dim(&format!("input_blocks.{first}.0.out_layers.3.weight"), 0);
            if let (Some(ch), Some(mc)) = (ch, mc) {
                mult.push(ch as f64 / mc as f64);
            }
            // Past usize's bits the level count is absurd: validation refuses it.
            match 1usize.checked_shl(level as u32) {
                Some(ds) if has(&format!("input_blocks.{first}.1.qkv.weight")) => {
                    attention_ds.push(ds)
                }
                _ => {}
            }
        }
        if mult.len() == levels {
            arch.channel_mult = Some(mult);
        }
        arch.attention_ds = Some(attention_ds);
        if levels > 1 {
            let down = nrb_plus_1;
            if has(&format!("input_blocks.{down}.0.op.weight")) {
                arch.resblock_updown = Some(false);
            } else if has(&format!("input_blocks.{down}.0.in_layers.0.weight")) {
                arch.resblock_updown = Some(true);
            }
        } else {
            arch.resblock_updown = Some(false);
        }
        let emb_rows = dim("input_blocks.1.0.emb_layers.1.weight", 0);
        let out_ch = dim("input_blocks.1.0.out_layers.3.weight", 0);
        if let (Some(rows), Some(oc)) = (emb_rows, out_ch) {
            arch.use_scale_shift_norm = Some(rows == 2 * oc);
        }
        arch
    }
}

/// Image size assumed when no source gives one: the size whose reference default channel_mult
/// matches, else 64 (the reference default), raised to the smallest size the levels divide.
fn default_image_size(channel_mult: &[f64]) -> usize {
    for size in [512, 256, 128, 64] {
        if default_channel_mult(size).as_deref() == Some(channel_mult) {
            return size;
        }
    }
    let divisor = 1usize.checked_shl(channel_mult.len().saturating_sub(1) as u32);
    64usize.max(divisor.unwrap_or(usize::MAX))
}

/// Resolves a config from the given sources (first wins per field) and the weights' shapes.
pub fn resolve(
    sources: &[(Source, PartialConfig)],
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<ResolvedConfig> {
    let arch = InferredArch::from_shapes(shapes);
    let mut origin: BTreeMap<&'static str, Source> = BTreeMap::new();
    let given = |key: &'static str| -> Option<(&Value, &Source)> {
        sources
            .iter()
            .find_map(|(src, pc)| pc.get(key).map(|v| (v, src)))
    };
    macro_rules! field {
        ($key:literal, $parse:expr, $inferred:expr, $default:expr) => {{
            if let Some((v, src)) = given($key) {
                origin.insert($key, src.clone());
                $parse($key, v)?
            } else if let Some(v) = $inferred {
                origin.insert($key, Source::Inferred);
                v
            } else {
                origin.insert($key, Source::Default);
                $default
            }
        }};
    }
    let missing = |key: &str, hint: &str| {
        Error::Config(format!(
            "`{key}` is not in the config and cannot be inferred from the weights ({hint})"
        ))
    };
    // Architecture the weights should show: an error when they do not, the reference default
    // when there are no weights at all (a config for random-weight benchmarks).
    let arch_default = |value: usize, key: &str, hint: &str| {
        if shapes.is_empty() {
            Ok(value)
        } else {
            Err(missing(key, hint))
        }
    };

    let num_channels: usize = field!(
        "num_channels",
        parse_usize,
        arch.num_channels,
        arch_default(128, "num_channels", "no `time_embed.0.weight`")?
    );
    let num_res_blocks: usize = field!(
        "num_res_blocks",
        parse_usize,
        arch.num_res_blocks,
        arch_default(
            2,
            "num_res_blocks",
            "the output_blocks do not show the level structure"
        )?
    );
    let in_channels: usize = field!(
        "in_channels",
        parse_usize,
        arch.in_channels,
        arch_default(3, "in_channels", "no `input_blocks.0.0.weight`")?
    );
    // channel_mult "" means the reference default for the image size, so it is resolved
    // together with image_size.
    let given_mult = match given("channel_mult") {
        Some((v, src)) => Some((parse_list("channel_mult", v)?, src.clone())),
        None => None,
    };
    let given_size = match given("image_size") {
        Some((v, src)) => Some((parse_usize("image_size", v)?, src.clone())),
        None => None,
    };
    let channel_mult = match (&given_mult, &given_size) {
        (Some((m, src)), _) if !m.is_empty() => {
            origin.insert("channel_mult", src.clone());
            m.clone()
        }
        (Some((_, src)), Some((size, _))) => {
            origin.insert("channel_mult", src.clone());
            default_channel_mult(*size).ok_or_else(|| {
                Error::Config(format!(
                    "channel_mult \"\" has no reference default for image_size {size} \
                     (defaults exist for 64, 128, 256, 512): give channel_mult"
                ))
            })?
        }
        _ => match &arch.channel_mult {
            Some(m) => {
                origin.insert("channel_mult", Source::Inferred);
                m.clone()
            }
            None if shapes.is_empty() => {
                origin.insert("channel_mult", Source::Default);
                let size = given_size.as_ref().map_or(64, |(s, _)| *s);
                default_channel_mult(size).ok_or_else(|| missing("channel_mult", "no weights"))?
            }
            None => return Err(missing("channel_mult", "no level structure in the keys")),
        },
    };
    if channel_mult.is_empty() || channel_mult.iter().any(|m| *m <= 0.0) {
        return Err(Error::Config(format!(
            "channel_mult must be positive numbers, got {channel_mult:?}"
        )));
    }
    let image_size = match given_size {
        Some((size, src)) => {
            origin.insert("image_size", src);
            size
        }
        None => {
            origin.insert("image_size", Source::Default);
            default_image_size(&channel_mult)
        }
    };
    if image_size == 0 {
        return Err(Error::Config("image_size must be positive".into()));
    }
    let attention_resolutions: Vec<usize> = match given("attention_resolutions") {
        Some((v, src)) => {
            origin.insert("attention_resolutions", src.clone());
            let list = parse_list("attention_resolutions", v)?;
            list.iter()
                .map(|&r| {
                    if r >= 1.0 && r.fract() == 0.0 {
                        Ok(r as usize)
                    } else {
                        Err(Error::Config(format!(
                            "attention_resolutions must be positive integers, got {r}"
                        )))
                    }
                })
                .collect::<Result<_>>()?
        }
        None => match &arch.attention_ds {
            Some(ds) => {
                origin.insert("attention_resolutions", Source::Inferred);
                ds.iter().map(|d| image_size / d).collect()
            }
            None => {
                origin.insert("attention_resolutions", Source::Default);
                vec![16, 8]
            }
        },
    };
    let num_heads: usize = field!("num_heads", parse_usize, None::<usize>, 4);
    let num_head_channels: i64 = field!("num_head_channels", parse_int, None::<i64>, -1);
    let num_heads_upsample: i64 = field!("num_heads_upsample", parse_int, None::<i64>, -1);
    let use_scale_shift_norm: bool = field!(
        "use_scale_shift_norm",
        parse_bool,
        arch.use_scale_shift_norm,
        true
    );
    let resblock_updown: bool = field!("resblock_updown", parse_bool, arch.resblock_updown, false);
    let use_new_attention_order: bool =
        field!("use_new_attention_order", parse_bool, None::<bool>, false);
    let learn_sigma: bool = field!("learn_sigma", parse_bool, arch.learn_sigma, false);
    let class_cond: bool = field!(
        "class_cond",
        parse_bool,
        arch.num_classes.map(|n| n.is_some()),
        false
    );
    let num_classes: Option<usize> = if class_cond {
        Some(field!(
            "num_classes",
            parse_usize,
            arch.num_classes.flatten(),
            1000
        ))
    } else {
        if given("num_classes").is_some() {
            return Err(Error::Config(
                "`num_classes` is given but `class_cond` is false".into(),
            ));
        }
        None
    };
    let embed_dim: Option<usize> = match given("embed_dim") {
        Some((v, src)) => {
            origin.insert("embed_dim", src.clone());
            Some(parse_usize("embed_dim", v)?)
        }
        None => {
            origin.insert("embed_dim", Source::Inferred);
            arch.embed_dim.flatten()
        }
    };
    let dropout: f64 = field!("dropout", parse_float, None::<f64>, 0.0);
    let flip_sin_to_cos: bool = field!("flip_sin_to_cos", parse_bool, None::<bool>, true);
    let freq_shift: f64 = field!("freq_shift", parse_float, None::<f64>, 0.0);
    let norm_eps: f64 = field!("norm_eps", parse_float, None::<f64>, 1e-5);
    let norm_num_groups: usize = field!("norm_num_groups", parse_usize, None::<usize>, 32);
    let use_fp16: bool = field!("use_fp16", parse_bool, None::<bool>, false);
    if let Some((v, _)) = given("use_checkpoint") {
        parse_bool("use_checkpoint", v)?;
    }

    let diffusion = DiffusionConfig {
        diffusion_steps: field!("diffusion_steps", parse_usize, None::<usize>, 1000),
        noise_schedule: field!(
            "noise_schedule",
            |k, v| NoiseSchedule::parse(&parse_string(k, v)?),
            None::<NoiseSchedule>,
            NoiseSchedule::Linear
        ),
        timestep_respacing: field!(
            "timestep_respacing",
            parse_string,
            None::<String>,
            String::new()
        ),
        rescale_timesteps: field!("rescale_timesteps", parse_bool, None::<bool>, false),
        predict_xstart: field!("predict_xstart", parse_bool, None::<bool>, false),
        learn_sigma,
        sigma_small: field!("sigma_small", parse_bool, None::<bool>, false),
        use_kl: field!("use_kl", parse_bool, None::<bool>, false),
        rescale_learned_sigmas: field!("rescale_learned_sigmas", parse_bool, None::<bool>, false),
    };
    // The step count, and a respacing that keeps no step or that no stride gives, are refused
    // with the config.
    crate::diffusion::space_timesteps(diffusion.diffusion_steps, &diffusion.timestep_respacing)
        .map_err(|e| match e {
            Error::Diffusion(m) => Error::Config(m),
            e => e,
        })?;

    let unet = UNetConfig {
        image_size,
        in_channels,
        num_channels,
        num_res_blocks,
        channel_mult,
        attention_resolutions,
        num_heads,
        num_head_channels,
        num_heads_upsample,
        use_scale_shift_norm,
        resblock_updown,
        use_new_attention_order,
        learn_sigma,
        num_classes,
        embed_dim,
        dropout,
        use_fp16,
        flip_sin_to_cos,
        freq_shift,
        norm_eps,
        norm_num_groups,
    };
    unet.validate()?;
    Ok(ResolvedConfig {
        unet,
        diffusion,
        sources: origin,
    })
}

impl UNetConfig {
    /// Checks the config describes a buildable network (groups and heads dividing channels).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_channels == 0 || self.in_channels == 0 || self.num_res_blocks == 0 {
            return bad("num_channels, in_channels and num_res_blocks must be positive".into());
        }
        if self.embed_dim == Some(0) {
            return bad(
                "embed_dim must be positive, got 0 (leave it out for a model without a vector \
                 condition)"
                    .into(),
            );
        }
        let half = (self.num_channels / 2) as f64;
        if !self.freq_shift.is_finite() || self.freq_shift >= half {
            return bad(format!(
                "freq_shift must be below half the time features ({half}), got {}",
                self.freq_shift
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad(format!("norm_eps must be in (0, 1), got {}", self.norm_eps));
        }
        // Dropout is inactive at inference, but a value outside [0, 1) is no model's.
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "dropout must be in [0, 1) (a probability), got {}",
                self.dropout
            ));
        }
        // Bounds far past any real model, so that sizes derived from them cannot overflow.
        if self.channel_mult.is_empty() {
            return bad("channel_mult must name at least one level".into());
        }
        if self.num_res_blocks > MAX_RES_BLOCKS || self.channel_mult.len() > MAX_LEVELS {
            return bad(format!(
                "num_res_blocks {} and {} channel_mult levels: at most {MAX_RES_BLOCKS} and \
                 {MAX_LEVELS}",
                self.num_res_blocks,
                self.channel_mult.len()
            ));
        }
        let levels = self.level_channels();
        let widest = levels
            .iter()
            .chain([&self.num_channels, &self.in_channels])
            .max();
        if widest.is_some_and(|&w| w > MAX_WIDTH) || self.embed_dim.is_some_and(|d| d > MAX_WIDTH) {
            return bad(format!(
                "channel widths ({} x channel_mult {:?}, in_channels {}, embed_dim {:?}) must \
                 be at most {MAX_WIDTH}",
                self.num_channels, self.channel_mult, self.in_channels, self.embed_dim
            ));
        }
        if self.num_classes.is_some_and(|k| k > MAX_CLASSES) {
            return bad(format!("num_classes must be at most {MAX_CLASSES}"));
        }
        // Every group norm is over a level's width or the sum of two.
        let groups = self.norm_num_groups;
        if groups == 0 {
            return bad("norm_num_groups must be positive, got 0".into());
        }
        for &ch in &levels {
            if ch == 0 || ch % groups != 0 {
                return bad(format!(
                    "level width {ch} (channel_mult {:?} x num_channels {}) is not a positive \
                     multiple of {groups}, as GroupNorm({groups}) requires (norm_num_groups)",
                    self.channel_mult, self.num_channels
                ));
            }
        }
        for &r in &self.attention_resolutions {
            if r == 0 || !self.image_size.is_multiple_of(r) {
                return bad(format!(
                    "attention resolution {r} does not divide image_size {}",
                    self.image_size
                ));
            }
        }
        if self.image_size > MAX_IMAGE_SIZE {
            return bad(format!(
                "image_size {} is larger than the {MAX_IMAGE_SIZE} mcdm supports",
                self.image_size
            ));
        }
        if self.num_head_channels == 0 || self.num_head_channels < -1 {
            return bad(format!(
                "num_head_channels must be -1 or positive, got {}",
                self.num_head_channels
            ));
        }
        if self.num_heads_upsample == 0 || self.num_heads_upsample < -1 {
            return bad(format!(
                "num_heads_upsample must be -1 (num_heads) or positive, got {}",
                self.num_heads_upsample
            ));
        }
        let ds = self.attention_ds();
        for (level, &ch) in levels.iter().enumerate() {
            // Attention blocks at this level use both head counts; the middle block uses
            // num_heads only.
            let uses: &[bool] = if ds.contains(&(1 << level)) {
                &[false, true]
            } else if level + 1 == levels.len() {
                &[false]
            } else {
                &[]
            };
            if self.num_head_channels > 0
                && !uses.is_empty()
                && !ch.is_multiple_of(self.num_head_channels as usize)
            {
                return bad(format!(
                    "num_head_channels {} does not divide the {ch} channels of an attention block",
                    self.num_head_channels
                ));
            }
            for &upsample in uses {
                let heads = self.heads(ch, upsample);
                if heads == 0 || ch % heads != 0 {
                    return bad(format!(
                        "attention over {ch} channels cannot be split into {heads} heads \
                         (num_heads {}, num_head_channels {}, num_heads_upsample {})",
                        self.num_heads, self.num_head_channels, self.num_heads_upsample
                    ));
                }
            }
        }
        if self.num_classes == Some(0) {
            return bad("num_classes must be positive".into());
        }
        Ok(())
    }

    /// The config as JSON, in the same flag names it is read with.
    pub fn to_json(&self, diffusion: &DiffusionConfig) -> Value {
        let list = |v: &[f64]| {
            v.iter()
                .map(|m| {
                    if m.fract() == 0.0 {
                        format!("{}", *m as i64)
                    } else {
                        format!("{m}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let res: Vec<f64> = self
            .attention_resolutions
            .iter()
            .map(|&r| r as f64)
            .collect();
        let mut map = serde_json::json!({
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "num_channels": self.num_channels,
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": list(&self.channel_mult),
            "attention_resolutions": list(&res),
            "num_heads": self.num_heads,
            "num_head_channels": self.num_head_channels,
            "num_heads_upsample": self.num_heads_upsample,
            "use_scale_shift_norm": self.use_scale_shift_norm,
            "resblock_updown": self.resblock_updown,
            "use_new_attention_order": self.use_new_attention_order,
            "learn_sigma": self.learn_sigma,
            "class_cond": self.num_classes.is_some(),
            "dropout": self.dropout,
            "use_fp16": self.use_fp16,
            "diffusion_steps": diffusion.diffusion_steps,
            "noise_schedule": diffusion.noise_schedule.name(),
            "timestep_respacing": diffusion.timestep_respacing,
            "rescale_timesteps": diffusion.rescale_timesteps,
            "predict_xstart": diffusion.predict_xstart,
            "sigma_small": diffusion.sigma_small,
            "use_kl": diffusion.use_kl,
            "rescale_learned_sigmas": diffusion.rescale_learned_sigmas,
        });
        if let Some(n) = self.num_classes {
            map["num_classes"] = n.into();
        }
        if let Some(d) = self.embed_dim {
            map["embed_dim"] = d.into();
        }
        if !self.flip_sin_to_cos {
            map["flip_sin_to_cos"] = false.into();
        }
        if self.freq_shift != 0.0 {
            map["freq_shift"] = self.freq_shift.into();
        }
        if self.norm_eps != 1e-5 {
            map["norm_eps"] = self.norm_eps.into();
        }
        if self.norm_num_groups != 32 {
            map["norm_num_groups"] = self.norm_num_groups.into();
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_with_a_key_given_twice_is_refused() {
        let err = parse_json(r#"{"a": 1, "b": {"c": [2, {"d": null}], "c": 3}}"#).unwrap_err();
        assert!(err.to_string().contains("key `c` is given twice"), "{err}");
        assert!(
            parse_json(r#"{"a": 1} {"b": 2}"#).is_err(),
            "trailing text accepted"
        );
    }

    /// Each value takes the forms guided-diffusion's scripts and configs write (argparse
    /// strings, JSON numbers and booleans), and nothing else.
    #[test]
    fn values_take_the_reference_forms() {
        use serde_json::json;
        for (v, want) in [
            (json!(true), true),
            (json!("True"), true),
            (json!("true"), true),
            (json!(false), false),
            (json!("False"), false),
            (json!("false"), false),
        ] {
            assert_eq!(parse_bool("k", &v).unwrap(), want, "{v}");
        }
        for v in [json!("TRUE"), json!("yes"), json!(1), json!(null)] {
            let err = parse_bool("k", &v).unwrap_err().to_string();
            assert!(err.contains("`k` must be true/false"), "{v}: {err}");
        }
        for (v, want) in [
            (json!(64), 64),
            (json!(-1), -1),
            (json!("64"), 64),
            (json!(" -1 "), -1),
        ] {
            assert_eq!(parse_int("k", &v).unwrap(), want, "{v}");
        }
        for v in [
            json!(64.5),
            json!("64.5"),
            json!("x"),
            json!(true),
            json!(u64::MAX),
        ] {
            let err = parse_int("k", &v).unwrap_err().to_string();
            assert!(err.contains("`k` must be an integer"), "{v}: {err}");
        }
        for (v, want) in [(json!("ddim25"), "ddim25"), (json!(25), "25")] {
            assert_eq!(parse_string("k", &v).unwrap(), want, "{v}");
        }
        for v in [json!([25]), json!(true)] {
            assert!(parse_string("k", &v).is_err(), "{v}");
        }
        for (v, want) in [
            (json!("32,16,8"), &[32.0, 16.0, 8.0][..]),
            (json!(" 1, 2.5 "), &[1.0, 2.5]),
            (json!(""), &[]),
            (json!([32, 16]), &[32.0, 16.0]),
            (json!(16), &[16.0]),
        ] {
            assert_eq!(parse_list("k", &v).unwrap(), want, "{v}");
        }
        for v in [json!("1,,2"), json!(["1"]), json!(true), json!({})] {
            let err = parse_list("k", &v).unwrap_err().to_string();
            assert!(err.contains("`k` must be a list"), "{v}: {err}");
        }
    }

    /// Output blocks that do not repeat in levels of num_res_blocks + 1 (ending with an up
    /// layer) leave the block count to the config rather than to a guess.
    #[test]
    fn irregular_output_blocks_infer_no_block_count() {
        let shapes = |keys: &[&str]| -> BTreeMap<String, Vec<usize>> {
            keys.iter().map(|k| (k.to_string(), vec![8])).collect()
        };
        let regular = shapes(&[
            "output_blocks.0.0.in_layers.0.weight",
            "output_blocks.1.0.in_layers.0.weight",
            "output_blocks.1.1.conv.weight",
            "output_blocks.2.0.in_layers.0.weight",
            "output_blocks.3.0.in_layers.0.weight",
        ]);
        assert_eq!(InferredArch::from_shapes(&regular).num_res_blocks, Some(1));
        // 5 blocks in levels of 2; an up layer in the first block (levels of 1).
        let mut five = regular.clone();
        five.insert("output_blocks.4.0.in_layers.0.weight".into(), vec![8]);
        let up_first = shapes(&[
            "output_blocks.0.0.in_layers.0.weight",
            "output_blocks.0.1.conv.weight",
            "output_blocks.1.0.in_layers.0.weight",
            "output_blocks.1.1.conv.weight",
        ]);
        for irregular in [five, up_first] {
            assert_eq!(InferredArch::from_shapes(&irregular).num_res_blocks, None);
        }
    }

    /// Networks the reference could not build are refused by validation, each by name.
    #[test]
    fn unbuildable_networks_are_refused() {
        for (fields, needle) in [
            (
                r#""channel_mult": "1,2", "num_channels": 48"#,
                "level width 48",
            ),
            (
                r#""channel_mult": "1,2", "attention_resolutions": "3""#,
                "attention resolution 3 does not divide",
            ),
            (r#""num_head_channels": -2"#, "num_head_channels must"),
            (r#""num_heads_upsample": -2"#, "num_heads_upsample must"),
            (
                r#""num_heads": 3"#,
                "attention over 32 channels cannot be split into 3 heads",
            ),
            (r#""num_heads": 0"#, "cannot be split into 0 heads"),
            // Attention at 4x4 (level 1, 96 channels); the middle block's 64 would divide.
            (
                r#""channel_mult": "1,3,2", "attention_resolutions": "4", "num_head_channels": 64"#,
                "num_head_channels 64 does not divide the 96 channels",
            ),
            // No attention but the middle block's (96 channels, the last level).
            (
                r#""channel_mult": "2,3", "num_head_channels": 64"#,
                "num_head_channels 64 does not divide the 96 channels",
            ),
        ] {
            let mut json = serde_json::json!({"image_size": 8, "num_channels": 32,
                "num_res_blocks": 1, "channel_mult": "1", "attention_resolutions": ""});
            let given: serde_json::Value = serde_json::from_str(&format!("{{{fields}}}")).unwrap();
            for (k, v) in given.as_object().unwrap() {
                json[k] = v.clone();
            }
            let err = resolve_json(&json.to_string()).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    fn resolve_json(json: &str) -> Result<ResolvedConfig> {
        let partial = PartialConfig::from_json(json)?;
        resolve(&[(Source::File("test".into()), partial)], &BTreeMap::new())
    }

    /// Without weights, a missing image size or channel_mult takes the reference's pairing of
    /// the two; with weights, a missing channel_mult must come from their keys.
    #[test]
    fn image_size_and_channel_mult_default_together() {
        for (json, size, mult) in [
            (
                r#"{"channel_mult": "1,1,2,2,4,4"}"#,
                256,
                &[1.0, 1.0, 2.0, 2.0, 4.0, 4.0][..],
            ),
            (
                r#"{"channel_mult": "1,1,2,3,4"}"#,
                128,
                &[1.0, 1.0, 2.0, 3.0, 4.0],
            ),
            (r#"{"channel_mult": "1,2"}"#, 64, &[1.0, 2.0]),
            (r#"{"image_size": 128}"#, 128, &[1.0, 1.0, 2.0, 3.0, 4.0]),
            ("{}", 64, &[1.0, 2.0, 3.0, 4.0]),
        ] {
            let cfg = resolve_json(json).unwrap();
            assert_eq!(cfg.unet.image_size, size, "{json}");
            assert_eq!(cfg.unet.channel_mult, mult, "{json}");
        }
        let shapes: BTreeMap<String, Vec<usize>> =
            [("time_embed.0.weight".into(), vec![8, 4])].into();
        let partial = PartialConfig::from_json(
            r#"{"num_res_blocks": 2, "in_channels": 3, "num_channels": 8}"#,
        )
        .unwrap();
        let err = resolve(&[(Source::File("test".into()), partial)], &shapes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "`channel_mult` is not in the config and cannot be inferred from the \
                          weights (no level structure in the keys)"
            ),
            "{err}"
        );
    }

    /// Sizes that no network has are refused with the config.
    #[test]
    fn impossible_sizes_are_refused() {
        for (json, needle) in [
            (
                r#"{"channel_mult": "1,0"}"#,
                "channel_mult must be positive numbers",
            ),
            (
                r#"{"channel_mult": "1,-2"}"#,
                "channel_mult must be positive numbers",
            ),
            (
                r#"{"attention_resolutions": "16.5"}"#,
                "must be positive integers, got 16.5",
            ),
            (
                r#"{"attention_resolutions": "0"}"#,
                "must be positive integers, got 0",
            ),
            (
                r#"{"num_channels": 0}"#,
                "num_channels, in_channels and num_res_blocks must be positive",
            ),
            (
                r#"{"in_channels": 0}"#,
                "num_channels, in_channels and num_res_blocks must be positive",
            ),
            (
                r#"{"num_res_blocks": 0}"#,
                "num_channels, in_channels and num_res_blocks must be positive",
            ),
            (
                r#"{"embed_dim": 0}"#,
                "embed_dim must be positive, got 0 (leave it out",
            ),
            (
                r#"{"dropout": 5.0}"#,
                "dropout must be in [0, 1) (a probability), got 5",
            ),
            (
                r#"{"dropout": 1}"#,
                "dropout must be in [0, 1) (a probability), got 1",
            ),
            (
                r#"{"dropout": -0.1}"#,
                "dropout must be in [0, 1) (a probability), got -0.1",
            ),
        ] {
            let err = resolve_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    /// `channel_mult ""` takes `create_model`'s default for the image size
    /// (guided_diffusion/script_util.py), and a float is read from a number or a string.
    #[test]
    fn empty_channel_mult_takes_the_reference_default() {
        for (size, mult) in [
            (64, &[1.0, 2.0, 3.0, 4.0][..]),
            (128, &[1.0, 1.0, 2.0, 3.0, 4.0]),
            (256, &[1.0, 1.0, 2.0, 2.0, 4.0, 4.0]),
            (512, &[0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]),
        ] {
            let cfg = resolve_json(&format!(
                r#"{{"image_size": {size}, "channel_mult": "", "dropout": "0.25"}}"#
            ))
            .unwrap();
            assert_eq!(cfg.unet.channel_mult, mult, "image_size {size}");
            assert_eq!(cfg.unet.dropout, 0.25);
        }
        // Written back as read: the 512 model's half-width first level included.
        let cfg = resolve_json(r#"{"image_size": 512, "channel_mult": ""}"#).unwrap();
        let json = cfg.unet.to_json(&cfg.diffusion);
        assert_eq!(json["channel_mult"], "0.5,1,1,2,2,4,4");
        let cfg = resolve_json(r#"{"channel_mult": "1,2", "dropout": 0.1}"#).unwrap();
        assert_eq!(cfg.unet.dropout, 0.1);
        let err = resolve_json(r#"{"image_size": 32, "channel_mult": ""}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("no reference default for image_size 32"),
            "{err}"
        );
    }

    /// Widths up to MAX_WIDTH are accepted, one more is refused.
    #[test]
    fn widths_are_bounded_inclusively() {
        for (key, base) in [
            ("in_channels", ""),
            ("embed_dim", r#""num_channels": 32, "#),
        ] {
            let json = |v: usize| format!(r#"{{{base}"channel_mult": "1", "{key}": {v}}}"#);
            assert!(resolve_json(&json(MAX_WIDTH)).is_ok(), "{key}");
            let err = resolve_json(&json(MAX_WIDTH + 1)).unwrap_err();
            assert!(err.to_string().contains("must be at most"), "{key}: {err}");
        }
    }

    /// Image size and schedule given by no source are named in the warning, with their
    /// defaults; fields a source gives are not.
    #[test]
    fn defaulted_image_fields_are_warned_of() {
        let cfg = resolve_json(r#"{"channel_mult": "1,2"}"#).unwrap();
        assert_eq!(
            cfg.default_warning().unwrap(),
            "not in its config, so defaulted: image_size 64, noise_schedule linear, \
             diffusion_steps 1000 (the images depend on them; give them in its config if the \
             model was trained otherwise)"
        );
        let cfg =
            resolve_json(r#"{"image_size": 32, "channel_mult": "1,2", "diffusion_steps": 50}"#)
                .unwrap();
        let warning = cfg.default_warning().unwrap();
        assert!(
            warning.contains("defaulted: noise_schedule linear ("),
            "{warning}"
        );
        let cfg = resolve_json(
            r#"{"image_size": 32, "channel_mult": "1,2", "diffusion_steps": 50,
                "noise_schedule": "cosine"}"#,
        )
        .unwrap();
        assert_eq!(cfg.default_warning(), None);
    }

    /// Without duplicates it reads what serde_json reads, numbers and nesting included.
    #[test]
    fn json_otherwise_as_serde_json() {
        let text = r#"{"i": -3, "u": 18446744073709551615, "f": 0.1, "s": "x\u00e9", "n": null,
                       "t": true, "a": [1, [2], {"k": "v"}], "o": {}}"#;
        assert_eq!(
            parse_json(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }
}
