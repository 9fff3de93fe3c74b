//! Model and diffusion configuration, in guided-diffusion's script flag names.
//!
//! A config is resolved from up to four sources, in order: an explicit JSON file, `<stem>.json`
//! beside the weights, a `config` entry in the safetensors metadata, and inference from the
//! weights' key names and shapes. Fields that none of them gives take the reference default of
//! `model_and_diffusion_defaults()`; [`ResolvedConfig::sources`] says where each field came from.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::error::{Error, Result};

/// Beta schedule of the forward process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseSchedule {
    Linear,
    Cosine,
}

impl NoiseSchedule {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(NoiseSchedule::Linear),
            "cosine" => Ok(NoiseSchedule::Cosine),
            _ => Err(Error::Config(format!(
                "noise_schedule `{s}` is unknown (expected linear or cosine)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            NoiseSchedule::Linear => "linear",
            NoiseSchedule::Cosine => "cosine",
        }
    }
}

/// The diffusion process a model was trained with (`create_gaussian_diffusion`'s arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusionConfig {
    pub diffusion_steps: usize,
    pub noise_schedule: NoiseSchedule,
    /// "" (all steps), "N", sections "10,10,5", or "ddimN".
    pub timestep_respacing: String,
    pub rescale_timesteps: bool,
    pub predict_xstart: bool,
    pub learn_sigma: bool,
    pub sigma_small: bool,
    pub use_kl: bool,
    pub rescale_learned_sigmas: bool,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        DiffusionConfig {
            diffusion_steps: 1000,
            noise_schedule: NoiseSchedule::Linear,
            timestep_respacing: String::new(),
            rescale_timesteps: false,
            predict_xstart: false,
            learn_sigma: false,
            sigma_small: false,
            use_kl: false,
            rescale_learned_sigmas: false,
        }
    }
}

/// UNet architecture (guided-diffusion `UNetModel`) plus mcdm's extensions
/// (`in_channels`, `num_classes`, `embed_dim`).
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
