//! The multistep solvers users check against diffusers: DPM-Solver++ (2M and 3M, data
//! prediction, midpoint) and UniPC (bh2, order 2, corrector on), as
//! `DPMSolverMultistepScheduler` / `UniPCMultistepScheduler` compute them when configured with
//! `trained_betas` = the model's betas, `prediction_type="epsilon"`,
//! `timestep_spacing="linspace"`, `lower_order_final=True`, `final_sigmas_type="zero"` and
//! `use_karras_sigmas` as asked (thresholding with `sample_max_value=1` is a clip of x_0 to
//! [-1, 1]: `clip_denoised`).
//!
//! Every update is linear in the state: with x_0 the step's prediction (from x_t and the composed
//! eps) and h1, h2 the two previous ones, a step is
//!     xc = x                                          (or, UniPC's corrector:
//!          ca last + c0 x_0 + c1 h1 + c2 h2,           last = the previous step's xc)
//!     x' = pa xc + p0 x_0 + p1 h1 + p2 h2
//! so each step is a [`StepParams`] of mode 2 (its coefficients computed here in f64, then
//! rounded to f32) and the fused step kernel stays one pass over per-image history buffers.

use super::{beta_schedule, check_diffusion_steps, DiffusionConfig, StepParams};
use crate::error::{Error, Result};

/// A multistep solver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverKind {
    /// DPM-Solver++(2M): `dpmpp-2m`.
    DpmPp2M,
    /// DPM-Solver++(3M): `dpmpp-3m`.
    DpmPp3M,
    /// UniPC, bh2, order 2, with its corrector: `unipc`.
    UniPc,
}

impl SolverKind {
    pub const ALL: [SolverKind; 3] = [SolverKind::DpmPp2M, SolverKind::DpmPp3M, SolverKind::UniPc];

    /// The name of the CLI and job files.
    pub fn name(self) -> &'static str {
        match self {
            SolverKind::DpmPp2M => "dpmpp-2m",
            SolverKind::DpmPp3M => "dpmpp-3m",
            SolverKind::UniPc => "unipc",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A solver's schedule for one run: the model timesteps and sigmas of its steps.
#[derive(Clone, Debug)]
pub struct Solver {
    kind: SolverKind,
    /// The model timestep of each step, in sampling order (descending).
    timesteps: Vec<usize>,
    /// sigma = sqrt((1 - alpha_bar) / alpha_bar) at each step, then 0 (one more than the steps),
    /// rounded to f32 as diffusers stores them.
    sigmas: Vec<f64>,
    /// `1000 / diffusion_steps` when the model takes rescaled timesteps, else 1.
    timestep_scale: f32,
}

impl Solver {
    /// The schedule of `steps` steps over the diffusion of `config` (its betas, its
    /// `rescale_timesteps`; `timestep_respacing` does not apply), with Karras sigmas when asked.
    pub fn new(
        kind: SolverKind,
        config: &DiffusionConfig,
        steps: usize,
        karras: bool,
    ) -> Result<Self> {
        check_diffusion_steps(config.diffusion_steps)?;
        let total = config.diffusion_steps;
        if steps == 0 || steps > total {
            return Err(Error::Diffusion(format!(
                "{} takes 1 to {total} steps (the model's diffusion steps), not {steps}",
                kind.name()
            )));
        }
        let mut alpha_bar = 1.0f64;
        let train_sigmas: Vec<f64> = beta_schedule(config.noise_schedule, total)
            .iter()
            .map(|beta| {
                alpha_bar *= 1.0 - beta;
                ((1.0 - alpha_bar) / alpha_bar).sqrt()
            })
            .collect();
        let (timesteps, mut sigmas) = if karras {
            karras_schedule(&train_sigmas, steps)
        } else {
            // np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]: numpy rounds halves to even.
            let timesteps: Vec<usize> = (1..=steps)
                .rev()
                .map(|i| (i as f64 * (total - 1) as f64 / steps as f64).round_ties_even() as usize)
                .collect();
            let sigmas = timesteps.iter().map(|&t| train_sigmas[t]).collect();
            (timesteps, sigmas)
        };
        sigmas.push(0.0);
        for s in &mut sigmas {
            *s = *s as f32 as f64;
        }
        Ok(Solver {
            kind,
            timesteps,
            sigmas,
            timestep_scale: if config.rescale_timesteps {
                (1000.0 / total as f64) as f32
            } else {
                1.0
            },
        })
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timestep the network is fed at step `k` (0 first), rescaled like
    /// [`super::Diffusion::model_timestep`].
    ///
    /// # Panics
    /// If `k >= num_steps()`.
    pub fn model_timestep(&self, k: usize) -> f32 {
        self.timesteps[k] as f32 * self.timestep_scale
    }

    /// The update of step `k` (0 first): x_0 from x_t and the composed model output (eps, or x_0
    /// itself for a `predict_xstart` model), clipped to [-1, 1] when `clip`, then the solver's
    /// linear combination (see the module docs).
    ///
    /// # Panics
    /// If `k >= num_steps()`.
    pub fn params(&self, k: usize, clip: bool, predict_xstart: bool) -> StepParams {
        let s0 = self.sigmas[k];
        let (pa, p) = match self.kind {
            SolverKind::DpmPp2M | SolverKind::DpmPp3M => self.dpm_predictor(k),
            SolverKind::UniPc => self.unipc_predictor(k),
        };
        let corrector = (self.kind == SolverKind::UniPc && k > 0).then(|| self.unipc_corrector(k));
        let (ca, c) = corrector.unwrap_or((0.0, [0.0; 3]));
        StepParams {
            mode: 2,
            predict_xstart: predict_xstart as i32,
            clip: clip as i32,
            // x_0 = (x - sigma_t eps) / alpha_t = x sqrt(sigma² + 1) - sigma eps.
            sqrt_recip: (s0 * s0 + 1.0).sqrt() as f32,
            sqrt_recipm1: s0 as f32,
            corrector: corrector.is_some() as i32,
            ca: ca as f32,
            c0: c[0] as f32,
            c1: c[1] as f32,
            c2: c[2] as f32,
            pa: pa as f32,
            p0: p[0] as f32,
            p1: p[1] as f32,
            p2: p[2] as f32,
            ..Default::default()
        }
    }

    /// lambda = log(alpha_t) - log(sigma_t) = -log(sigma) at sigma index `i`.
    fn lambda(&self, i: usize) -> f64 {
        -self.sigmas[i].ln()
    }

    /// alpha_t = 1 / sqrt(sigma² + 1) and sigma_t = sigma alpha_t at sigma index `i`.
    fn alpha_sigma(&self, i: usize) -> (f64, f64) {
        let s = self.sigmas[i];
        let alpha = 1.0 / (s * s + 1.0).sqrt();
        (alpha, s * alpha)
    }

    /// The previous steps whose x_0 a step may use: diffusers' `lower_order_nums`.
    fn warm(k: usize, order: usize) -> usize {
        k.min(order)
    }

    /// DPM-Solver++ from sigma `k` to `k + 1`: (the coefficient of x, those of [x_0, h1, h2]).
    fn dpm_predictor(&self, k: usize) -> (f64, [f64; 3]) {
        let n = self.num_steps();
        let order = if self.kind == SolverKind::DpmPp3M {
            3
        } else {
            2
        };
        let warm = Self::warm(k, order);
        // lower_order_final (final_sigmas_type "zero": always at the last step) and
        // lower_order_second (fewer than 15 steps).
        let used = if warm < 1 || k == n - 1 {
            1
        } else if order == 2 || warm < 2 || (k == n - 2 && n < 15) {
            2
        } else {
            3
        };
        if self.sigmas[k + 1] == 0.0 {
            // sigma_t 0: lambda_t is infinite and the update is x_0 itself.
            return (0.0, [1.0, 0.0, 0.0]);
        }
        let (alpha_t, sigma_t) = self.alpha_sigma(k + 1);
        let (_, sigma_s0) = self.alpha_sigma(k);
        let h = self.lambda(k + 1) - self.lambda(k);
        let pa = sigma_t / sigma_s0;
        let a = alpha_t * ((-h).exp() - 1.0);
        let m0 = [1.0, 0.0, 0.0];
        match used {
            1 => (pa, scale(m0, -a)),
            2 => {
                let r0 = (self.lambda(k) - self.lambda(k - 1)) / h;
                let d1 = scale(sub(m0, [0.0, 1.0, 0.0]), 1.0 / r0);
                (pa, add(scale(m0, -a), scale(d1, -0.5 * a)))
            }
            _ => {
                let r0 = (self.lambda(k) - self.lambda(k - 1)) / h;
                let r1 = (self.lambda(k - 1) - self.lambda(k - 2)) / h;
                let d1_0 = scale([1.0, -1.0, 0.0], 1.0 / r0);
                let d1_1 = scale([0.0, 1.0, -1.0], 1.0 / r1);
                let diff = sub(d1_0, d1_1);
                let d1 = add(d1_0, scale(diff, r0 / (r0 + r1)));
                let d2 = scale(diff, 1.0 / (r0 + r1));
                let b = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                let c = alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5);
                (pa, add(add(scale(m0, -a), scale(d1, b)), scale(d2, -c)))
            }
        }
    }

    /// The order UniPC's predictor uses at step `k` (`this_order`).
    fn unipc_order(&self, k: usize) -> usize {
        (self.num_steps() - k).min(2).min(Self::warm(k, 2) + 1)
    }

    /// UniPC's predictor (bh2) from sigma `k` to `k + 1`, on [x_0, h1, h2].
    fn unipc_predictor(&self, k: usize) -> (f64, [f64; 3]) {
        if self.sigmas[k + 1] == 0.0 {
            return (0.0, [1.0, 0.0, 0.0]);
        }
        let (alpha_t, sigma_t) = self.alpha_sigma(k + 1);
        let (_, sigma_s0) = self.alpha_sigma(k);
        let h = self.lambda(k + 1) - self.lambda(k);
        let h_phi_1 = (-h).exp_m1();
        let b_h = h_phi_1;
        let mut p = [-alpha_t * h_phi_1, 0.0, 0.0];
        if self.unipc_order(k) == 2 {
            // D1 = (h1 - x_0) / rk, weighted 0.5.
            let rk = (self.lambda(k - 1) - self.lambda(k)) / h;
            p = add(p, scale([-1.0, 1.0, 0.0], -alpha_t * b_h * 0.5 / rk));
        }
        (sigma_t / sigma_s0, p)
    }

    /// UniPC's corrector at step `k` > 0: the previous step's start `last` moved to sigma `k`
    /// again, now with this step's x_0; (the coefficient of `last`, those of [x_0, h1, h2]).
    fn unipc_corrector(&self, k: usize) -> (f64, [f64; 3]) {
        let order = self.unipc_order(k - 1);
        let (alpha_t, sigma_t) = self.alpha_sigma(k);
        let (_, sigma_s0) = self.alpha_sigma(k - 1);
        let h = self.lambda(k) - self.lambda(k - 1);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = h_phi_1;
        // b_i = h phi_{i+1}(h) i! / B(h), diffusers' recurrence.
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut b = [0.0; 2];
        for (i, bi) in b.iter_mut().enumerate() {
            *bi = h_phi_k * factorial / b_h;
            factorial *= (i + 2) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        // The previous x_0 (m0) is h1 here; this step's (model_t) is x_0; D1_t = x_0 - h1.
        let d1_t = [1.0, -1.0, 0.0];
        let corr = if order == 2 {
            // rks = [rk, 1]; rhos_c solves [[1, 1], [rk, 1]] rho = b.
            let rk = (self.lambda(k - 2) - self.lambda(k - 1)) / h;
            let rho0 = (b[0] - b[1]) / (1.0 - rk);
            let rho1 = b[0] - rho0;
            let d1 = scale([0.0, -1.0, 1.0], 1.0 / rk);
            add(scale(d1, rho0), scale(d1_t, rho1))
        } else {
            scale(d1_t, 0.5)
        };
        let c = add(
            scale([0.0, 1.0, 0.0], -alpha_t * h_phi_1),
            scale(corr, -alpha_t * b_h),
        );
        (sigma_t / sigma_s0, c)
    }
}

/// diffusers' `_convert_to_karras` (rho 7 between the smallest and largest training sigma) and
/// `_sigma_to_t` (the timestep interpolated in log sigma, rounded).
fn karras_schedule(train_sigmas: &[f64], steps: usize) -> (Vec<usize>, Vec<f64>) {
    // diffusers keeps the training sigmas in f32.
    let train: Vec<f64> = train_sigmas.iter().map(|&s| s as f32 as f64).collect();
    let log_sigmas: Vec<f64> = train.iter().map(|&s| (s as f32).ln() as f64).collect();
    let (min_inv, max_inv) = (
        train[0].powf(1.0 / 7.0),
        train[train.len() - 1].powf(1.0 / 7.0),
    );
    let sigmas: Vec<f64> = (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(7.0)
        })
        .collect();
    let timesteps = sigmas
        .iter()
        .map(|&sigma| {
            let log_sigma = sigma.max(1e-10).ln();
            // The last index whose log sigma is at most this one, at most len - 2.
            let below = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
            let low = below.saturating_sub(1).min(log_sigmas.len() - 2);
            let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
            let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
            ((1.0 - w) * low as f64 + w * (low + 1) as f64).round_ties_even() as usize
        })
        .collect();
    (timesteps, sigmas)
}

fn add(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn scale(a: [f64; 3], s: f64) -> [f64; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::NoiseSchedule;

    fn config(steps: usize, schedule: NoiseSchedule) -> DiffusionConfig {
        DiffusionConfig {
            diffusion_steps: steps,
            noise_schedule: schedule,
            ..Default::default()
        }
    }

    /// np.linspace(0, 999, 11).round()[::-1][:-1], numpy's values.
    #[test]
    fn linspace_timesteps_are_diffusers() {
        let s = Solver::new(
            SolverKind::DpmPp2M,
            &config(1000, NoiseSchedule::Linear),
            10,
            false,
        )
        .unwrap();
        assert_eq!(
            s.timesteps,
            [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
        );
        assert_eq!(s.sigmas.len(), 11);
        assert_eq!(s.sigmas[10], 0.0);
    }

    /// The last step goes to sigma 0, where every solver's update is x_0 itself.
    #[test]
    fn the_last_step_returns_x0() {
        for kind in SolverKind::ALL {
            for karras in [false, true] {
                let s = Solver::new(kind, &config(100, NoiseSchedule::Cosine), 7, karras).unwrap();
                let p = s.params(6, false, false);
                assert_eq!((p.pa, p.p0, p.p1, p.p2), (0.0, 1.0, 0.0, 0.0), "{kind:?}");
            }
        }
    }

    #[test]
    fn steps_out_of_range_are_refused() {
        let cfg = config(100, NoiseSchedule::Linear);
        for steps in [0, 101] {
            let err = Solver::new(SolverKind::UniPc, &cfg, steps, false).unwrap_err();
            assert!(err.to_string().contains("takes 1 to 100 steps"), "{err}");
        }
    }
}
