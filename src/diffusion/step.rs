//! The per-element updates: `p_mean_variance`'s x_0 prediction, `p_sample` and `ddim_sample`.
//!
//! All tensors are flat f32 slices of one shape (a batch in NCHW order): the whole batch is at
//! the same step, so every coefficient is a per-step scalar. Like the reference
//! (`_extract_into_tensor(...).float()`), coefficients are read from the f64 tables and rounded
//! to f32 before use, and each expression is evaluated in f32 in the reference's order, without
//! fused multiply-adds.

use super::{Diffusion, ModelMeanType, ModelVarType};
use crate::error::{Error, Result};

/// The f32 scalars of one update, used by the CPU loops below and passed by value to the fused
/// CUDA kernel (`kernels/step.cu`, whose `StepParams` has this exact field order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepParams {
    /// 0 DDIM, 1 DDPM, 2 a multistep solver (see `corrector` below).
    pub mode: i32,
    pub predict_xstart: i32,
    pub clip: i32,
    /// Whether this step adds noise (DDIM: `i > 0 && sigma != 0`; DDPM: `i > 0`).
    pub add_noise: i32,
    pub sqrt_recip: f32,
    pub sqrt_recipm1: f32,
    pub sqrt_alpha_bar_prev: f32,
    pub eps_coef: f32,
    pub sigma: f32,
    pub coef1: f32,
    pub coef2: f32,
    /// exp(log_var / 2) of the fixed variances.
    pub noise_std: f32,
    /// The learned range's bounds: log beta~ and log beta.
    pub min_log: f32,
    pub max_log: f32,
    /// Philox key (seed) and step word of the noise, set with [`StepParams::with_noise_key`].
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub step: u32,
    pub reserved: u32,
    /// Mode 2 (the multistep solvers, `solver.rs`): whether UniPC's corrector runs first,
    /// `xc = ca last + c0 x_0 + c1 h1 + c2 h2` (else `xc = x`), then
    /// `x' = pa xc + p0 x_0 + p1 h1 + p2 h2`; h1, h2 the two previous x_0.
    pub corrector: i32,
    pub ca: f32,
    pub c0: f32,
    pub c1: f32,
    pub c2: f32,
    pub pa: f32,
    pub p0: f32,
    pub p1: f32,
    pub p2: f32,
    pub reserved2: u32,
}

// The kernel reads the struct by value: any change of size here must be made in common.cuh too.
const _: () = assert!(std::mem::size_of::<StepParams>() == 112);

impl StepParams {
    /// The noise of this step is Philox normals keyed by `seed` and `step`.
    pub fn with_noise_key(mut self, seed: u64, step: u32) -> Self {
        self.seed_lo = seed as u32;
        self.seed_hi = (seed >> 32) as u32;
        self.step = step;
        self
    }

    /// One element's update: x_t `x`, the composed model output `m`, the learned-variance
    /// channel `v` of a learned-range DDPM step (None otherwise) and the noise `z` (read only
    /// when the step adds noise). The CPU loops of [`Diffusion::ddim_step`] and
    /// [`Diffusion::ddpm_step`] compute exactly this, and so does `kernels/step.cu`.
    #[inline]
    pub fn update(&self, x: f32, m: f32, v: Option<f32>, z: f32) -> f32 {
        let c = self.xstart();
        if self.mode == 0 {
            let x0 = c.pred_xstart(x, m);
            let eps = (c.sqrt_recip * x - x0) / c.sqrt_recipm1;
            let mean = x0 * self.sqrt_alpha_bar_prev + self.eps_coef * eps;
            return if self.add_noise != 0 {
                mean + self.sigma * z
            } else {
                mean
            };
        }
        let mean = self.coef1 * c.pred_xstart(x, m) + self.coef2 * x;
        if self.add_noise == 0 {
            return mean;
        }
        match v {
            Some(v) => {
                let frac = (v + 1.0) / 2.0;
                let log_var = frac * self.max_log + (1.0 - frac) * self.min_log;
                mean + (0.5 * log_var).exp() * z
            }
            None => mean + self.noise_std * z,
        }
    }

    /// One element's multistep update (mode 2): x_t `x`, the composed model output `m`, and
    /// its history `[h1, h2, last]` (the two previous x_0 and the previous step's start),
    /// updated in place. The CPU step and `kernels/step.cu` compute exactly this.
    #[inline]
    pub fn update_multistep(&self, x: f32, m: f32, history: [&mut f32; 3]) -> f32 {
        let [h1, h2, last] = history;
        let x0 = self.xstart().pred_xstart(x, m);
        let xc = if self.corrector != 0 {
            self.ca * *last + self.c0 * x0 + self.c1 * *h1 + self.c2 * *h2
        } else {
            x
        };
        let out = self.pa * xc + self.p0 * x0 + self.p1 * *h1 + self.p2 * *h2;
        *last = xc;
        *h2 = *h1;
        *h1 = x0;
        out
    }

    fn xstart(&self) -> XstartCoefs {
        XstartCoefs {
            mean_type: if self.predict_xstart != 0 {
                ModelMeanType::StartX
            } else {
                ModelMeanType::Epsilon
            },
            clip: self.clip != 0,
            sqrt_recip: self.sqrt_recip,
            sqrt_recipm1: self.sqrt_recipm1,
        }
    }
}

/// The f32 coefficients of the x_0 prediction at one step.
#[derive(Clone, Copy)]
struct XstartCoefs {
    mean_type: ModelMeanType,
    clip: bool,
    sqrt_recip: f32,
    sqrt_recipm1: f32,
}

impl XstartCoefs {
    #[inline]
    fn pred_xstart(&self, x: f32, m: f32) -> f32 {
        let p = match self.mean_type {
            ModelMeanType::Epsilon => self.sqrt_recip * x - self.sqrt_recipm1 * m,
            ModelMeanType::StartX => m,
        };
        if self.clip {
            p.clamp(-1.0, 1.0)
        } else {
            p
        }
    }
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::Diffusion(format!(
            "{what} has {len} elements, x has {expected}"
        )))
    }
}

/// The noise slice for a step that adds noise, or an error when the caller gave none.
fn required_noise(noise: Option<&[f32]>, i: usize, n: usize) -> Result<&[f32]> {
    let noise = noise
        .ok_or_else(|| Error::Diffusion(format!("step {i} adds noise but no noise was given")))?;
    check_len("noise", noise.len(), n)?;
    Ok(noise)
}

impl Diffusion {
    fn check_step(&self, i: usize) -> Result<()> {
        if i < self.num_steps() {
            Ok(())
        } else {
            Err(Error::Diffusion(format!(
                "step {i} is out of range (the diffusion has {} steps)",
                self.num_steps()
            )))
        }
    }

    fn xstart_coefs(&self, i: usize, clip: bool) -> XstartCoefs {
        XstartCoefs {
            mean_type: self.mean_type,
            clip,
            sqrt_recip: self.tables.sqrt_recip_alphas_cumprod[i] as f32,
            sqrt_recipm1: self.tables.sqrt_recipm1_alphas_cumprod[i] as f32,
        }
    }

    fn base_params(&self, i: usize, clip: bool) -> StepParams {
        let c = self.xstart_coefs(i, clip);
        StepParams {
            predict_xstart: (self.mean_type == ModelMeanType::StartX) as i32,
            clip: clip as i32,
            sqrt_recip: c.sqrt_recip,
            sqrt_recipm1: c.sqrt_recipm1,
            ..Default::default()
        }
    }

    /// The scalars of the DDIM update at spaced step `i` (see [`Diffusion::ddim_step`]).
    pub fn ddim_params(&self, i: usize, eta: f32, clip_denoised: bool) -> Result<StepParams> {
        self.check_step(i)?;
        // Past 1 the square root below is of a negative number; NaN passes no comparison.
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::Diffusion(format!(
                "DDIM eta must be between 0 and 1, got {eta}"
            )));
        }
        let alpha_bar = self.tables.alphas_cumprod[i] as f32;
        let alpha_bar_prev = self.tables.alphas_cumprod_prev[i] as f32;
        let sigma = eta
            * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt()
            * (1.0 - alpha_bar / alpha_bar_prev).sqrt();
        Ok(StepParams {
            mode: 0,
            add_noise: (i > 0 && sigma != 0.0) as i32,
            sqrt_alpha_bar_prev: alpha_bar_prev.sqrt(),
            eps_coef: (1.0 - alpha_bar_prev - sigma * sigma).sqrt(),
            sigma,
            ..self.base_params(i, clip_denoised)
        })
    }

    /// The scalars of the DDPM update at spaced step `i` (see [`Diffusion::ddpm_step`]).
    pub fn ddpm_params(&self, i: usize, clip_denoised: bool) -> Result<StepParams> {
        self.check_step(i)?;
        let t = &self.tables;
        let fixed_log_var = match self.var_type {
            ModelVarType::FixedSmall | ModelVarType::LearnedRange => {
                t.posterior_log_variance_clipped[i]
            }
            // The reference's fixed-large chain starts from beta~_1, not beta_0.
            ModelVarType::FixedLarge if i == 0 => t.posterior_variance[1].ln(),
            ModelVarType::FixedLarge => t.betas[i].ln(),
        };
        Ok(StepParams {
            mode: 1,
            add_noise: (i > 0) as i32,
            coef1: t.posterior_mean_coef1[i] as f32,
            coef2: t.posterior_mean_coef2[i] as f32,
            noise_std: (0.5 * fixed_log_var as f32).exp(),
            min_log: t.posterior_log_variance_clipped[i] as f32,
            max_log: t.betas[i].ln() as f32,
            ..self.base_params(i, clip_denoised)
        })
    }

    /// The model's prediction of x_0 at spaced step `i` (`p_mean_variance`'s `pred_xstart`),
    /// clipped to [-1, 1] when `clip`. `model_out` is the (composed) eps, or x_0 when the
    /// model predicts x_0; all slices have the length of `x`.
    pub fn predict_xstart(
        &self,
        i: usize,
        x: &[f32],
        model_out: &[f32],
        clip: bool,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_step(i)?;
        check_len("model output", model_out.len(), x.len())?;
        check_len("out", out.len(), x.len())?;
        let c = self.xstart_coefs(i, clip);
        for ((o, &x), &m) in out.iter_mut().zip(x).zip(model_out) {
            *o = c.pred_xstart(x, m);
        }
        Ok(())
    }

    /// One DDIM update from spaced step `i` to `i - 1` (`ddim_sample`): x_0 predicted (and
    /// clipped when `clip_denoised`), eps re-derived from that x_0, then
    /// `x_0 sqrt(abar_prev) + sqrt(1 - abar_prev - sigma²) eps + sigma noise` with
    /// `sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)`.
    ///
    /// `noise` (standard normals, the length of `x`) is needed only when `i > 0` and
    /// `eta != 0`; it is ignored otherwise, so the last update (`i == 0`) is deterministic.
    /// A learned variance plays no part here, as in the reference.
    #[allow(clippy::too_many_arguments)]
    pub fn ddim_step(
        &self,
        i: usize,
        x: &[f32],
        model_out: &[f32],
        eta: f32,
        clip_denoised: bool,
        noise: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_step(i)?;
        let n = x.len();
        check_len("model output", model_out.len(), n)?;
        check_len("out", out.len(), n)?;
        let p = self.ddim_params(i, eta, clip_denoised)?;
        let noise = if p.add_noise != 0 {
            Some(required_noise(noise, i, n)?)
        } else {
            None
        };
        for (k, ((o, &x), &m)) in out.iter_mut().zip(x).zip(model_out).enumerate() {
            *o = p.update(x, m, None, noise.map_or(0.0, |z| z[k]));
        }
        Ok(())
    }

    /// One ancestral DDPM update from spaced step `i` to `i - 1` (`p_sample`): the posterior
    /// mean from the predicted (and, when `clip_denoised`, clipped) x_0, plus
    /// `exp(log_var / 2) noise` when `i > 0`.
    ///
    /// The log variance follows [`Diffusion::var_type`]: fixed small (clipped posterior log
    /// variance), fixed large (`log beta`, with the second posterior variance at `i == 0`), or
    /// learned range, where `v` (the model's channels 3..6, laid out like `x`) is required and
    /// `log_var = f log beta + (1 - f) log beta~` with `f = (v + 1) / 2`. `v` must be `None`
    /// for the fixed variances. `noise` is required when `i > 0` and ignored at `i == 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn ddpm_step(
        &self,
        i: usize,
        x: &[f32],
        model_out: &[f32],
        v: Option<&[f32]>,
        clip_denoised: bool,
        noise: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_step(i)?;
        let n = x.len();
        check_len("model output", model_out.len(), n)?;
        check_len("out", out.len(), n)?;
        let p = self.ddpm_params(i, clip_denoised)?;
        let noise = if p.add_noise != 0 {
            Some(required_noise(noise, i, n)?)
        } else {
            None
        };
        match (self.var_type, v) {
            (ModelVarType::LearnedRange, Some(v)) => check_len("variance output", v.len(), n)?,
            (ModelVarType::LearnedRange, None) => {
                return Err(Error::Diffusion(
                    "the model learns its variance (learn_sigma) but no variance output was given"
                        .into(),
                ))
            }
            (ModelVarType::FixedSmall | ModelVarType::FixedLarge, Some(_)) => {
                return Err(Error::Diffusion(
                    "a variance output was given but the diffusion's variance is fixed".into(),
                ))
            }
            (_, None) => {}
        }
        for (k, ((o, &x), &m)) in out.iter_mut().zip(x).zip(model_out).enumerate() {
            *o = p.update(x, m, v.map(|v| v[k]), noise.map_or(0.0, |z| z[k]));
        }
        Ok(())
    }
}
