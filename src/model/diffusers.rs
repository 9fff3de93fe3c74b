//! diffusers `UNet2DModel` folders (`config.json` + `diffusion_pytorch_model.safetensors`, or a
//! pipeline folder with `unet/` and `scheduler/`) as the guided-diffusion UNet they describe.
//! A pixel-space `UNet2DModel` is guided-diffusion's network under other names: its blocks map
//! one to one onto `input_blocks` / `middle_block` / `output_blocks`, an attention's `to_q`,
//! `to_k`, `to_v` make one `qkv` in the new attention order, and the schedule comes from
//! `scheduler_config.json`; diffusers' `flip_sin_to_cos`, `freq_shift`, `norm_eps` and
//! `norm_num_groups` are mcdm config extensions. What guided-diffusion's network cannot express
//! (another activation, an attention without its norm or with its own group count) is refused
//! by name.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::{parse_json, PartialConfig};
use crate::error::{Error, Result};
use crate::files::{read_string_limited, JSON_LIMIT};
use crate::weights::{Derived, SafetensorsFile};

/// The weights and config of the diffusers folder `dir`, renamed to guided-diffusion's keys and
/// flags, and the config file read (for messages and `inspect`).
pub fn open(dir: &Path) -> Result<(SafetensorsFile, PartialConfig, PathBuf)> {
    let (unet_dir, schedulers) = if dir.join("config.json").is_file() {
        let parent = dir.parent().unwrap_or(Path::new("."));
        (
            dir.to_path_buf(),
            vec![
                dir.join("scheduler_config.json"),
                parent.join("scheduler/scheduler_config.json"),
            ],
        )
    } else if dir.join("unet/config.json").is_file() {
        (
            dir.join("unet"),
            vec![dir.join("scheduler/scheduler_config.json")],
        )
    } else {
        return Err(bad(
            dir,
            "it is a directory without config.json (nor unet/config.json): a folder given as a \
             model must be a diffusers UNet2DModel",
        ));
    };
    let config_path = unet_dir.join("config.json");
    let config = read_json(&config_path)?;
    let weights = [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    .iter()
    .map(|name| unet_dir.join(name))
    .find(|p| p.is_file())
    .ok_or_else(|| {
        bad(
            &unet_dir,
            "no diffusion_pytorch_model.safetensors (a .bin checkpoint needs re-saving with \
                 safe_serialization=True)",
        )
    })?;
    let scheduler = match schedulers.iter().find(|p| p.is_file()) {
        Some(p) => Some(read_json(p)?),
        None => None,
    };
    let unet = Unet2d::read(&config_path, &config)?;
    let mut flags = unet.guided_flags();
    if let Some(s) = &scheduler {
        schedule_flags(s, &mut flags).map_err(|e| bad(&schedulers[0], &e))?;
    }
    let partial = PartialConfig::from_json(&Value::Object(flags).to_string())
        .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
    let file = SafetensorsFile::open(&weights)?;
    let layout = unet.layout(&file).map_err(|e| bad(&weights, &e))?;
    Ok((file.derived(dir, &layout)?, partial, config_path))
}

fn bad(path: &Path, why: &str) -> Error {
    Error::Config(format!("{}: {why}", path.display()))
}

fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text = read_string_limited(path, JSON_LIMIT, "diffusers config")?;
    match parse_json(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad(path, "expected a JSON object")),
        Err(e) => Err(bad(path, &format!("not valid JSON: {e}"))),
    }
}

/// The parts of a `UNet2DModel` config that shape the network.
struct Unet2d {
    sample_size: usize,
    in_channels: usize,
    out_channels: usize,
    channels: Vec<usize>,
    layers: usize,
    /// Whether each level (down block) has attention.
    attention: Vec<bool>,
    /// Resnet up- and downsampling (`ResnetDownsampleBlock2D`, ...) instead of convs.
    resnet_updown: bool,
    head_dim: Option<usize>,
    scale_shift: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    norm_eps: f64,
    norm_groups: usize,
    num_classes: Option<usize>,
}

impl Unet2d {
    fn read(path: &Path, c: &Map<String, Value>) -> Result<Self> {
        let fail = |why: String| Err(bad(path, &why));
        let get = |k: &str| c.get(k).filter(|v| !v.is_null());
        let uint = |k: &str, default: Option<usize>| -> Result<usize> {
            match get(k) {
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    bad(
                        path,
                        &format!("`{k}` must be a non-negative integer, got {v}"),
                    )
                }),
                None => default.ok_or_else(|| bad(path, &format!("no `{k}`"))),
            }
        };
        let string = |k: &str, default: &str| -> String {
            get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .ok_or_else(|| bad(path, &format!("`{k}` must be a list of block names")))
        };
        if let Some(class) = get("_class_name").and_then(Value::as_str) {
            if class != "UNet2DModel" {
                return fail(format!(
                    "a diffusers `{class}`: only the pixel-space UNet2DModel is supported"
                ));
            }
        }
        // Settings guided-diffusion's network has one way only.
        let fixed: &[(&str, Value, &str)] = &[
            (
                "time_embedding_type",
                json!("positional"),
                "a sinusoidal time embedding",
            ),
            ("act_fn", json!("silu"), "SiLU"),
            ("center_input_sample", json!(false), "no input centring"),
            ("downsample_padding", json!(1), "padding 1"),
            ("mid_block_scale_factor", json!(1), "no output scaling"),
            (
                "add_attention",
                json!(true),
                "attention in the middle block",
            ),
            ("mid_block_type", json!("UNetMidBlock2D"), "UNetMidBlock2D"),
        ];
        for (key, want, what) in fixed {
            if let Some(v) = get(key) {
                let same = match (v.as_f64(), want.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    _ => v == want,
                };
                if !same {
                    return fail(format!(
                        "`{key}` {v} is not supported (mcdm runs guided-diffusion's network: \
                         {what}, `{key}` {want})"
                    ));
                }
            }
        }
        if let Some(v) = get("class_embed_type") {
            return fail(format!(
                "`class_embed_type` {v} is not supported (only the plain label embedding)"
            ));
        }
        let channels: Vec<usize> = get("block_out_channels")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|n| n as usize)
                    .collect()
            })
            .ok_or_else(|| bad(path, "`block_out_channels` must be a list of integers"))?;
        if channels.is_empty() || channels.iter().any(|&ch| ch == 0 || ch % channels[0] != 0) {
            return fail(format!(
                "`block_out_channels` {channels:?} must be multiples of the first (guided-diffusion's \
                 channel_mult)"
            ));
        }
        if let Some(d) = get("time_embedding_dim") {
            if d.as_u64() != Some(4 * channels[0] as u64) {
                return fail(format!(
                    "`time_embedding_dim` {d} is not supported (guided-diffusion's is 4 x the first \
                     channels, {})",
                    4 * channels[0]
                ));
            }
        }
        let down = strings("down_block_types")?;
        let up = strings("up_block_types")?;
        if down.len() != channels.len() || up.len() != channels.len() {
            return fail(format!(
                "{} down and {} up blocks for {} levels of `block_out_channels`",
                down.len(),
                up.len(),
                channels.len()
            ));
        }
        let (mut attention, mut updown) = (Vec::new(), Vec::new());
        for name in &down {
            let (attn, resnet) = match name.as_str() {
                "DownBlock2D" => (false, false),
                "ResnetDownsampleBlock2D" => (false, true),
                "AttnDownBlock2D" => (true, string("downsample_type", "conv") == "resnet"),
                other => return fail(format!("down block type `{other}` is not supported")),
            };
            attention.push(attn);
            updown.push(resnet);
        }
        for (j, name) in up.iter().enumerate() {
            let level = channels.len() - 1 - j;
            let (attn, resnet) = match name.as_str() {
                "UpBlock2D" => (false, false),
                "ResnetUpsampleBlock2D" => (false, true),
                "AttnUpBlock2D" => (true, string("upsample_type", "conv") == "resnet"),
                other => return fail(format!("up block type `{other}` is not supported")),
            };
            if attn != attention[level] {
                return fail(format!(
                    "up block {j} (`{name}`) and down block {level} (`{}`) differ in attention: \
                     guided-diffusion attends at the same resolutions on both sides",
                    down[level]
                ));
            }
            updown.push(resnet);
        }
        // Only levels that resample count: the last down block and the last up block do not.
        let n = channels.len();
        let resampling: Vec<bool> = updown[..n - 1]
            .iter()
            .chain(&updown[n..2 * n - 1])
            .copied()
            .collect();
        if resampling.windows(2).any(|w| w[0] != w[1]) {
            return fail(
                "resnet and conv up/downsampling mixed: guided-diffusion's resblock_updown is \
                 one setting for every level"
                    .into(),
            );
        }
        let scale_shift = match string("resnet_time_scale_shift", "default").as_str() {
            "default" => false,
            "scale_shift" => true,
            other => {
                return fail(format!(
                    "`resnet_time_scale_shift` `{other}` is not supported"
                ))
            }
        };
        let norm_groups = uint("norm_num_groups", Some(32))?;
        // A scale_shift mid block's attention has no group norm unless attn_norm_num_groups says
        // so (OpenAI's ADM conversions set it); guided-diffusion's always has one, with the
        // groups of every other norm.
        match get("attn_norm_num_groups").and_then(Value::as_u64) {
            None if scale_shift => {
                return fail(
                    "a scale_shift UNet2DModel without `attn_norm_num_groups` has a mid-block \
                     attention without group norm, which guided-diffusion's network does not have"
                        .into(),
                )
            }
            Some(g) if g as usize != norm_groups => {
                return fail(format!(
                    "`attn_norm_num_groups` {g} differs from `norm_num_groups` {norm_groups} \
                     (mcdm runs guided-diffusion's network: one group count for every norm)"
                ))
            }
            _ => {}
        }
        let flip_sin_to_cos = match get("flip_sin_to_cos") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| {
                bad(
                    path,
                    &format!("`flip_sin_to_cos` must be true or false, got {v}"),
                )
            })?,
        };
        let norm_eps = match get("norm_eps") {
            None => 1e-5,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(path, &format!("`norm_eps` must be a number, got {v}")))?,
        };
        let freq_shift = match get("freq_shift") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(path, &format!("`freq_shift` must be a number, got {v}")))?,
        };
        Ok(Unet2d {
            norm_eps,
            norm_groups,
            flip_sin_to_cos,
            freq_shift,
            sample_size: uint("sample_size", None)?,
            in_channels: uint("in_channels", Some(3))?,
            out_channels: uint("out_channels", Some(3))?,
            layers: uint("layers_per_block", Some(2))?,
            channels,
            attention,
            resnet_updown: resampling.first().copied().unwrap_or(false),
            head_dim: get("attention_head_dim")
                .and_then(Value::as_u64)
                .map(|d| d as usize),
            scale_shift,
            num_classes: get("num_class_embeds")
                .and_then(Value::as_u64)
                .map(|n| n as usize),
        })
    }

    /// The guided-diffusion flags of this network.
    fn guided_flags(&self) -> Map<String, Value> {
        let c0 = self.channels[0];
        let mult: Vec<String> = self.channels.iter().map(|c| (c / c0).to_string()).collect();
        let resolutions: Vec<String> = (0..self.channels.len())
            .filter(|&i| self.attention[i])
            .map(|i| (self.sample_size >> i).to_string())
            .collect();
        let mut f = Map::new();
        f.insert("image_size".into(), json!(self.sample_size));
        f.insert("num_channels".into(), json!(c0));
        f.insert("channel_mult".into(), json!(mult.join(",")));
        f.insert("num_res_blocks".into(), json!(self.layers));
        f.insert("attention_resolutions".into(), json!(resolutions.join(",")));
        // Without a head size each attention has one head (diffusers: the channels).
        match self.head_dim {
            Some(d) => {
                f.insert("num_head_channels".into(), json!(d));
            }
            None => {
                f.insert("num_heads".into(), json!(1));
                f.insert("num_head_channels".into(), json!(-1));
            }
        }
        f.insert("use_scale_shift_norm".into(), json!(self.scale_shift));
        f.insert("resblock_updown".into(), json!(self.resnet_updown));
        f.insert("use_new_attention_order".into(), json!(true));
        f.insert("flip_sin_to_cos".into(), json!(self.flip_sin_to_cos));
        f.insert("freq_shift".into(), json!(self.freq_shift));
        f.insert("norm_eps".into(), json!(self.norm_eps));
        f.insert("norm_num_groups".into(), json!(self.norm_groups));
        f.insert("in_channels".into(), json!(self.in_channels));
        f.insert(
            "learn_sigma".into(),
            json!(self.out_channels == 2 * self.in_channels),
        );
        f.insert("class_cond".into(), json!(self.num_classes.is_some()));
        if let Some(n) = self.num_classes {
            f.insert("num_classes".into(), json!(n));
        }
        f
    }

    /// Each guided-diffusion tensor and the diffusers tensors it is made of, with its shape.
    fn layout(&self, file: &SafetensorsFile) -> std::result::Result<Vec<Derived>, String> {
        let mut map: Vec<(String, String)> = Vec::new();
        let mut out = Vec::new();
        let shape_of = |name: &str| -> std::result::Result<Vec<usize>, String> {
            file.shape(name).map(<[usize]>::to_vec).map_err(|_| {
                format!(
                    "the weights do not fit config.json: it asks for `{name}`, which the file \
                     does not hold"
                )
            })
        };
        let pair = |map: &mut Vec<(String, String)>, to: String, from: String| {
            for p in ["weight", "bias"] {
                map.push((format!("{to}.{p}"), format!("{from}.{p}")));
            }
        };
        let resnet = |map: &mut Vec<(String, String)>, to: &str, from: &str| {
            for (t, f) in [
                ("in_layers.0", "norm1"),
                ("in_layers.2", "conv1"),
                ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"),
            ] {
                pair(map, format!("{to}.{t}"), format!("{from}.{f}"));
            }
            if file.contains(&format!("{from}.conv_shortcut.weight")) {
                pair(
                    map,
                    format!("{to}.skip_connection"),
                    format!("{from}.conv_shortcut"),
                );
            }
        };
        // An attention: norm and output projection renamed, q, k, v joined into qkv.
        // A down- or upsampler: a resnet (resblock_updown), else a conv named `conv` under `to`
        // in guided-diffusion (`op` for Downsample, `conv` for Upsample).
        let resample = |map: &mut Vec<(String, String)>, to: String, conv: &str, from: String| {
            if self.resnet_updown {
                resnet(map, &to, &from);
            } else {
                pair(map, format!("{to}.{conv}"), format!("{from}.conv"));
            }
        };
        let attention = |map: &mut Vec<(String, String)>,
                         out: &mut Vec<Derived>,
                         to: &str,
                         from: &str|
         -> std::result::Result<(), String> {
            pair(map, format!("{to}.norm"), format!("{from}.group_norm"));
            // Older diffusers checkpoints name them query, key, value, proj_attn.
            let (q, k, v, o) = if file.contains(&format!("{from}.query.weight")) {
                ("query", "key", "value", "proj_attn")
            } else {
                ("to_q", "to_k", "to_v", "to_out.0")
            };
            let c = shape_of(&format!("{from}.{q}.weight"))?
                .first()
                .copied()
                .unwrap_or(0);
            let parts = |p: &str| {
                [q, k, v]
                    .iter()
                    .map(|n| format!("{from}.{n}.{p}"))
                    .collect()
            };
            out.push((
                format!("{to}.qkv.weight"),
                parts("weight"),
                vec![3 * c, c, 1],
            ));
            out.push((format!("{to}.qkv.bias"), parts("bias"), vec![3 * c]));
            out.push((
                format!("{to}.proj_out.weight"),
                vec![format!("{from}.{o}.weight")],
                vec![c, c, 1],
            ));
            map.push((format!("{to}.proj_out.bias"), format!("{from}.{o}.bias")));
            Ok(())
        };
        pair(
            &mut map,
            "time_embed.0".into(),
            "time_embedding.linear_1".into(),
        );
        pair(
            &mut map,
            "time_embed.2".into(),
            "time_embedding.linear_2".into(),
        );
        if self.num_classes.is_some() {
            map.push(("label_emb.weight".into(), "class_embedding.weight".into()));
        }
        pair(&mut map, "input_blocks.0.0".into(), "conv_in".into());
        let levels = self.channels.len();
        let mut k = 1;
        for i in 0..levels {
            for j in 0..self.layers {
                resnet(
                    &mut map,
                    &format!("input_blocks.{k}.0"),
                    &format!("down_blocks.{i}.resnets.{j}"),
                );
                if self.attention[i] {
                    attention(
                        &mut map,
                        &mut out,
                        &format!("input_blocks.{k}.1"),
                        &format!("down_blocks.{i}.attentions.{j}"),
                    )?;
                }
                k += 1;
            }
            if i + 1 < levels {
                let from = format!("down_blocks.{i}.downsamplers.0");
                resample(&mut map, format!("input_blocks.{k}.0"), "op", from);
                k += 1;
            }
        }
        resnet(&mut map, "middle_block.0", "mid_block.resnets.0");
        attention(
            &mut map,
            &mut out,
            "middle_block.1",
            "mid_block.attentions.0",
        )?;
        resnet(&mut map, "middle_block.2", "mid_block.resnets.1");
        for i in 0..levels {
            let level = levels - 1 - i;
            for j in 0..=self.layers {
                let block = i * (self.layers + 1) + j;
                resnet(
                    &mut map,
                    &format!("output_blocks.{block}.0"),
                    &format!("up_blocks.{i}.resnets.{j}"),
                );
                let mut next = 1;
                if self.attention[level] {
                    attention(
                        &mut map,
                        &mut out,
                        &format!("output_blocks.{block}.1"),
                        &format!("up_blocks.{i}.attentions.{j}"),
                    )?;
                    next = 2;
                }
                if j == self.layers && level > 0 {
                    let from = format!("up_blocks.{i}.upsamplers.0");
                    resample(
                        &mut map,
                        format!("output_blocks.{block}.{next}"),
                        "conv",
                        from,
                    );
                }
            }
        }
        pair(&mut map, "out.0".into(), "conv_norm_out".into());
        pair(&mut map, "out.2".into(), "conv_out".into());

        for (to, from) in map {
            let shape = shape_of(&from)?;
            out.push((to, vec![from], shape));
        }
        // Every tensor of the file is used once: anything else is a layout this mapping does
        // not know, named rather than dropped.
        let used: std::collections::BTreeSet<&str> = out
            .iter()
            .flat_map(|(_, parts, _)| parts.iter().map(String::as_str))
            .collect();
        let unused: Vec<&str> = file.names().filter(|n| !used.contains(n)).collect();
        if !unused.is_empty() {
            return Err(format!(
                "{} tensor(s) the UNet2DModel layout of its config.json does not have: {}",
                unused.len(),
                unused
                    .iter()
                    .take(6)
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(out)
    }
}

/// The diffusion flags of a diffusers scheduler config (`num_train_timesteps`, `beta_schedule`,
/// `prediction_type`, `variance_type`), added to `flags`.
fn schedule_flags(
    s: &Map<String, Value>,
    flags: &mut Map<String, Value>,
) -> std::result::Result<(), String> {
    let get = |k: &str| s.get(k).filter(|v| !v.is_null());
    let steps = get("num_train_timesteps")
        .and_then(Value::as_u64)
        .unwrap_or(1000);
    flags.insert("diffusion_steps".into(), json!(steps));
    let schedule = get("beta_schedule")
        .and_then(Value::as_str)
        .unwrap_or("linear");
    match schedule {
        "linear" => {
            // guided-diffusion's linear schedule: 1e-4 to 2e-2, scaled by 1000 / steps.
            let scale = 1000.0 / steps as f64;
            for (key, want) in [("beta_start", 1e-4 * scale), ("beta_end", 2e-2 * scale)] {
                let got = get(key).and_then(Value::as_f64).unwrap_or(want);
                if (got - want).abs() > 1e-9 {
                    return Err(format!(
                        "`{key}` {got}: a linear schedule must be guided-diffusion's ({want} for \
                         {steps} steps)"
                    ));
                }
            }
            flags.insert("noise_schedule".into(), json!("linear"));
        }
        "squaredcos_cap_v2" => {
            flags.insert("noise_schedule".into(), json!("cosine"));
        }
        other => {
            return Err(format!(
                "`beta_schedule` `{other}` is not supported (linear, squaredcos_cap_v2)"
            ))
        }
    }
    if get("trained_betas").is_some() {
        return Err("`trained_betas` are not supported".into());
    }
    match get("prediction_type")
        .and_then(Value::as_str)
        .unwrap_or("epsilon")
    {
        "epsilon" => {}
        "sample" => {
            flags.insert("predict_xstart".into(), json!(true));
        }
        other => {
            return Err(format!(
                "`prediction_type` `{other}` is not supported (epsilon, sample)"
            ))
        }
    }
    match get("variance_type")
        .and_then(Value::as_str)
        .unwrap_or("fixed_small")
    {
        "fixed_small" => {
            flags.insert("sigma_small".into(), json!(true));
        }
        "fixed_large" => {
            flags.insert("sigma_small".into(), json!(false));
        }
        // The model's extra output channels, which learn_sigma (from out_channels) reads.
        "learned_range" => {}
        other => return Err(format!("`variance_type` `{other}` is not supported")),
    }
    Ok(())
}
