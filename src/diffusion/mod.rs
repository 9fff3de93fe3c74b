//! Diffusion schedules, timestep respacing and the DDPM / DDIM updates.
//!
//! [`Diffusion`] is guided-diffusion's `SpacedDiffusion` as built by
//! `create_gaussian_diffusion`: the tables are f64 like the reference, and the per-element
//! updates ([`Diffusion::ddim_step`], [`Diffusion::ddpm_step`]) cast the step's coefficients
//! to f32 first and then follow the reference's f32 operations in the same order.

mod compose;
mod config;
mod respace;
mod schedule;
mod solver;
mod step;

pub use compose::compose;
pub use config::{check_diffusion_steps, DiffusionConfig, NoiseSchedule, MAX_DIFFUSION_STEPS};
pub use respace::space_timesteps;
pub use schedule::beta_schedule;
pub use solver::{Solver, SolverKind};
pub use step::StepParams;

use crate::error::{Error, Result};

/// What the model's first three output channels predict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelMeanType {
    /// The noise `eps` (the default).
    Epsilon,
    /// The clean image `x_0` (`predict_xstart`).
    StartX,
}

/// Which variance the DDPM step samples with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelVarType {
    /// The posterior variance `beta~_t` (`sigma_small`).
    FixedSmall,
    /// `beta_t` (with `beta~_1` at the first step), the default without `learn_sigma`.
    FixedLarge,
    /// Interpolated in log space between `beta~_t` and `beta_t` by the model's channels 3..6.
    LearnedRange,
}

/// The f64 tables of a (respaced) diffusion, indexed by the spaced step `i`.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusionTables {
    /// Betas of the spaced chain, `1 - alpha_bar[i] / alpha_bar[i-1]` at the kept steps.
    pub betas: Vec<f64>,
    /// `alpha_bar`, the cumulative product of `1 - beta`.
    pub alphas_cumprod: Vec<f64>,
    /// `alpha_bar` of the previous step, 1 before the first.
    pub alphas_cumprod_prev: Vec<f64>,
    /// `sqrt(1 / alpha_bar)`.
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// `sqrt(1 / alpha_bar - 1)`.
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// Variance of the posterior `q(x_{t-1} | x_t, x_0)`, 0 at the first step.
    pub posterior_variance: Vec<f64>,
    /// Its log, with the first entry replaced by the second (the first is log 0).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Posterior mean coefficient of `x_0`.
    pub posterior_mean_coef1: Vec<f64>,
    /// Posterior mean coefficient of `x_t`.
    pub posterior_mean_coef2: Vec<f64>,
}

impl DiffusionTables {
    /// The tables of `GaussianDiffusion.__init__` for `betas`; needs at least two steps (the
    /// clipped log variance reads the second posterior variance) and betas in (0, 1].
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.len() < 2 {
            return Err(Error::Diffusion(format!(
                "a diffusion needs at least 2 steps, got {}",
                betas.len()
            )));
        }
        if let Some(b) = betas.iter().find(|&&b| !(b > 0.0 && b <= 1.0)) {
            return Err(Error::Diffusion(format!("beta {b} is outside (0, 1]")));
        }
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0f64;
        for &b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..betas.len() - 1].iter().copied())
            .collect();
        let zip3 = |f: &dyn Fn(f64, f64, f64) -> f64| -> Vec<f64> {
            betas
                .iter()
                .zip(&alphas_cumprod)
                .zip(&alphas_cumprod_prev)
                .map(|((&b, &a), &ap)| f(b, a, ap))
                .collect()
        };
        let sqrt_recip_alphas_cumprod = zip3(&|_, a, _| (1.0 / a).sqrt());
        let sqrt_recipm1_alphas_cumprod = zip3(&|_, a, _| (1.0 / a - 1.0).sqrt());
        let posterior_variance = zip3(&|b, a, ap| b * (1.0 - ap) / (1.0 - a));
        let posterior_log_variance_clipped: Vec<f64> = std::iter::once(posterior_variance[1])
            .chain(posterior_variance[1..].iter().copied())
            .map(f64::ln)
            .collect();
        let posterior_mean_coef1 = zip3(&|b, a, ap| b * ap.sqrt() / (1.0 - a));
        let posterior_mean_coef2 = zip3(&|b, a, ap| (1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a));
        Ok(DiffusionTables {
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            sqrt_recip_alphas_cumprod,
            sqrt_recipm1_alphas_cumprod,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        })
    }
}

/// A respaced diffusion process (`SpacedDiffusion`): the tables, which original timestep each
/// spaced step stands for, and how the model's output is read.
///
/// Spaced steps are indexed `0..num_steps()`; sampling runs them from `num_steps() - 1` down
/// to 0, and step 0 adds no noise.
#[derive(Clone, Debug)]
pub struct Diffusion {
    tables: DiffusionTables,
    timestep_map: Vec<usize>,
    original_num_steps: usize,
    rescale_timesteps: bool,
    mean_type: ModelMeanType,
    var_type: ModelVarType,
}

impl Diffusion {
    /// Builds the process `create_gaussian_diffusion` builds for `config`. `use_kl` and
    /// `rescale_learned_sigmas` only choose a training loss and are ignored.
    pub fn from_config(config: &DiffusionConfig) -> Result<Self> {
        // Before the schedule allocates one value per step.
        check_diffusion_steps(config.diffusion_steps)?;
        let base = DiffusionTables::from_betas(beta_schedule(
            config.noise_schedule,
            config.diffusion_steps,
        ))?;
        let timestep_map = space_timesteps(config.diffusion_steps, &config.timestep_respacing)?;
        let mut last = 1.0f64;
        let betas = timestep_map
            .iter()
            .map(|&t| {
                let a = base.alphas_cumprod[t];
                let beta = 1.0 - a / last;
                last = a;
                beta
            })
            .collect();
        Ok(Diffusion {
            tables: DiffusionTables::from_betas(betas)?,
            timestep_map,
            original_num_steps: config.diffusion_steps,
            rescale_timesteps: config.rescale_timesteps,
            mean_type: if config.predict_xstart {
                ModelMeanType::StartX
            } else {
                ModelMeanType::Epsilon
            },
            var_type: match (config.learn_sigma, config.sigma_small) {
                (true, _) => ModelVarType::LearnedRange,
                (false, true) => ModelVarType::FixedSmall,
                (false, false) => ModelVarType::FixedLarge,
            },
        })
    }

    /// Number of spaced steps.
    pub fn num_steps(&self) -> usize {
        self.timestep_map.len()
    }

    /// The original timestep of each spaced step (ascending).
    pub fn timestep_map(&self) -> &[usize] {
        &self.timestep_map
    }

    /// The f64 tables of the spaced chain.
    pub fn tables(&self) -> &DiffusionTables {
        &self.tables
    }

    /// What the model's first three channels predict.
    pub fn mean_type(&self) -> ModelMeanType {
        self.mean_type
    }

    /// The variance the DDPM step uses; [`ModelVarType::LearnedRange`] needs the model's
    /// variance channels.
    pub fn var_type(&self) -> ModelVarType {
        self.var_type
    }

    /// The timestep the network is fed at spaced step `i`: the original timestep, times
    /// `1000 / diffusion_steps` (rounded to f32 first, as the reference's scalar is) when
    /// `rescale_timesteps`.
    ///
    /// # Panics
    /// If `i >= num_steps()`.
    pub fn model_timestep(&self, i: usize) -> f32 {
        let t = self.timestep_map[i] as f32;
        if self.rescale_timesteps {
            t * (1000.0 / self.original_num_steps as f64) as f32
        } else {
            t
        }
    }
}
