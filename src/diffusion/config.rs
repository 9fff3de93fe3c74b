//! The diffusion process a model was trained with, in guided-diffusion's flag names.

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

/// The longest diffusion (guided-diffusion's models use 1000 to 4000 steps).
pub const MAX_DIFFUSION_STEPS: usize = 1_000_000;

/// An error unless `steps` is a diffusion length mcdm takes (1 to [`MAX_DIFFUSION_STEPS`]).
pub fn check_diffusion_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_DIFFUSION_STEPS {
        return Err(Error::Diffusion(format!(
            "diffusion_steps must be between 1 and {MAX_DIFFUSION_STEPS}, got {steps}"
        )));
    }
    Ok(())
}
