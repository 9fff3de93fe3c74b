//! Composed sampling: at every step each expert and the unconditional term are evaluated, their
//! eps predictions combined as `eps = eps_u + sum_i w_i (eps_i - eps_u)` (Nair et al., eq. 12
//! with weights), and the DDIM or DDPM update applied.
//!
//! Terms that share a model run as one batched forward pass. Noise comes from Philox keyed by
//! (seed, image index, step), so image k is the same whatever the batch size: `x_T` of image k
//! uses step key [`INIT_NOISE_STEP`], the update at spaced step i uses key i.

mod across;
mod steps;

pub use across::sample_each_across;

use std::ops::ControlFlow;

use crate::backend::Backend;
use crate::config::MAX_IMAGE_SIZE;
use crate::device::{on_backend, Device, Placement};
use crate::diffusion::{Diffusion, DiffusionConfig, ModelVarType, Solver, SolverKind, StepParams};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::rng::{fill_normals, MAX_SAMPLES};

/// Philox step key of the initial noise `x_T`.
pub const INIT_NOISE_STEP: u32 = u32::MAX;

/// Per-image conditions of one kind: `count` items one after the other in `data`, each of the
/// same length; `count` is 1 (one item shared by all images) or at least the number of images
/// (image k takes item k).
#[derive(Clone, Debug)]
pub struct Batched {
    pub data: Vec<f32>,
    pub count: usize,
}

impl Batched {
    fn item(&self, k: usize) -> &[f32] {
        let len = self.data.len() / self.count;
        let k = if self.count == 1 { 0 } else { k };
        &self.data[k * len..][..len]
    }
}

/// What one term is conditioned on. Absent parts are the null condition where the model takes
/// them (zero image, zero embedding); class labels have no implicit null.
#[derive(Clone, Debug, Default)]
pub struct Condition {
    /// A class label, for a class-conditional model (`num_classes`); required there.
    pub class: Option<i64>,
    /// `[count, C, H, W]`, values in [-1, 1] as images are scaled, concatenated after x_t on
    /// the channel axis (C = the model's `in_channels` - 3).
    pub image: Option<Batched>,
    /// `[count, D]`, D the model's `embed_dim` (384 for all-MiniLM-L6-v2 prompts).
    pub embedding: Option<Batched>,
}

/// One expert of the product: a model, its condition and its weight w_i in
/// `eps = eps_u + sum_i w_i (eps_i - eps_u)`.
#[derive(Clone, Debug)]
pub struct Expert {
    /// Index into the models given to [`ComposedSampler::new`].
    pub model: usize,
    pub condition: Condition,
    /// 1 for the paper's product of experts; negative for "not this".
    pub weight: f32,
}

/// The unconditional term eps_u: a model given its null condition (an unconditional model,
/// or a conditional one with, say, its null class; image and embedding parts left out are
/// zeros).
#[derive(Clone, Debug)]
pub struct Unconditional {
    /// Index into the models given to [`ComposedSampler::new`]; its diffusion (schedule,
    /// variance) is the run's.
    pub model: usize,
    pub condition: Condition,
}

/// The update applied to the composed eps at each step: guided-diffusion's DDIM and DDPM, or
/// one of diffusers' multistep solvers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerKind {
    /// `ddim_sample` with the given eta: 0 is deterministic, 1 DDPM-like noise.
    Ddim { eta: f32 },
    /// `p_sample` (ancestral), with the unconditional model's variance (learned or fixed).
    Ddpm,
    /// DPM-Solver++ or UniPC as diffusers' schedulers run them ([`Solver`]), over evenly spaced
    /// timesteps or Karras sigmas; deterministic.
    Solver { kind: SolverKind, karras: bool },
}

/// How to sample.
#[derive(Clone, Debug)]
pub struct SampleSpec {
    pub sampler: SamplerKind,
    /// The steps: "50" (50 evenly spaced), sections "10,10,5", or "ddim25"; None takes the
    /// unconditional model's `timestep_respacing` (its full schedule when that is empty). The
    /// solvers take a number of steps only.
    pub timestep_respacing: Option<String>,
    /// Clip each predicted x_0 to [-1, 1] (guided-diffusion's `clip_denoised`).
    pub clip_denoised: bool,
    /// Keys all noise: image k's is the same whatever the batch (see the module doc).
    pub seed: u64,
    /// The sample size, in pixels (the models' `image_size`).
    pub height: usize,
    pub width: usize,
}

/// A prepared composition: checked conditions, the shared diffusion, terms grouped per model.
pub struct ComposedSampler<'a> {
    models: &'a [LoadedModel],
    /// The unconditional term's model, whose device the others share.
    uncond_model: usize,
    /// Experts, then the unconditional term last.
    terms: Vec<(usize, &'a Condition)>,
    weights: Vec<f32>,
    /// Per model used: (model, indices into `terms`).
    groups: Vec<(usize, Vec<usize>)>,
    diffusion: Diffusion,
    /// The schedule of a multistep solver, which then replaces `diffusion`'s steps.
    solver: Option<Solver>,
    diffusion_config: DiffusionConfig,
    spec: SampleSpec,
    learned_variance: bool,
}

/// The most experts one run composes: each costs a forward pass per step, and a composition
/// of more is far more likely a generated mistake than a model.
pub const MAX_EXPERTS: usize = 64;

impl<'a> ComposedSampler<'a> {
    /// Checks the composition: model indices, conditions against each model's inputs and the
    /// sample size, and that all models share one diffusion schedule.
    pub fn new(
        models: &'a [LoadedModel],
        experts: &'a [Expert],
        uncond: &'a Unconditional,
        spec: SampleSpec,
    ) -> Result<Self> {
        let bad = |m: String| Error::Input(m);
        let (h, w) = (spec.height, spec.width);
        if !(1..=MAX_IMAGE_SIZE).contains(&h) || !(1..=MAX_IMAGE_SIZE).contains(&w) {
            return Err(bad(format!(
                "the image size {h}x{w} must be between 1 and {MAX_IMAGE_SIZE} on each side"
            )));
        }
        if experts.len() > MAX_EXPERTS {
            return Err(bad(format!(
                "{} experts: at most {MAX_EXPERTS} are composed in one run",
                experts.len()
            )));
        }
        if let SamplerKind::Ddim { eta } = spec.sampler {
            // Past 1 the DDIM update takes the square root of a negative number.
            if !(0.0..=1.0).contains(&eta) {
                return Err(bad(format!("DDIM eta must be between 0 and 1, got {eta}")));
            }
        }
        let mut terms: Vec<(usize, &Condition)> =
            experts.iter().map(|e| (e.model, &e.condition)).collect();
        terms.push((uncond.model, &uncond.condition));
        for (i, &(m, cond)) in terms.iter().enumerate() {
            let who = if i + 1 == terms.len() {
                "the unconditional term".to_string()
            } else {
                format!("expert {i}")
            };
            let model = models
                .get(m)
                .ok_or_else(|| bad(format!("{who}: no model with index {m}")))?;
            check_condition(&who, model, cond, i + 1 == terms.len(), &spec)?;
        }
        let home = &models[uncond.model];
        for &(m, _) in &terms {
            let model = &models[m];
            if !model.device().same(home.device()) || model.kind() != home.kind() {
                return Err(bad(format!(
                    "the models are on different devices: {} on {}, the unconditional model {}                      on {}",
                    model.file.path().display(),
                    model.device().describe(model.dtype()),
                    home.file.path().display(),
                    home.device().describe(home.dtype())
                )));
            }
        }
        let base = &home.config.diffusion;
        for &(m, _) in &terms {
            let d = &models[m].config.diffusion;
            let fields = [
                (
                    "diffusion_steps",
                    d.diffusion_steps.to_string(),
                    base.diffusion_steps.to_string(),
                ),
                (
                    "noise_schedule",
                    d.noise_schedule.name().into(),
                    base.noise_schedule.name().into(),
                ),
                (
                    "rescale_timesteps",
                    d.rescale_timesteps.to_string(),
                    base.rescale_timesteps.to_string(),
                ),
                (
                    "predict_xstart",
                    d.predict_xstart.to_string(),
                    base.predict_xstart.to_string(),
                ),
            ];
            for (field, a, b) in fields {
                if a != b {
                    return Err(bad(format!(
                        "models disagree on the diffusion schedule: {} has {field} = {a}, the \
                         unconditional model {} has {b}",
                        models[m].file.path().display(),
                        models[uncond.model].file.path().display()
                    )));
                }
            }
        }
        let mut diffusion_config = base.clone();
        if let Some(r) = &spec.timestep_respacing {
            diffusion_config.timestep_respacing = r.clone();
        }
        let solver = match spec.sampler {
            SamplerKind::Solver { kind, karras } => {
                let r = diffusion_config.timestep_respacing.trim();
                let steps = if r.is_empty() {
                    diffusion_config.diffusion_steps
                } else {
                    r.parse().map_err(|_| {
                        bad(format!(
                            "{} takes a number of steps, not the respacing `{r}`",
                            kind.name()
                        ))
                    })?
                };
                Some(Solver::new(kind, &diffusion_config, steps, karras)?)
            }
            _ => None,
        };
        let diffusion = match &solver {
            // The solver has its own timesteps; the diffusion (its variance type) is the full
            // chain's.
            Some(_) => Diffusion::from_config(&DiffusionConfig {
                timestep_respacing: String::new(),
                ..diffusion_config.clone()
            })?,
            None => Diffusion::from_config(&diffusion_config)?,
        };
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, &(m, _)) in terms.iter().enumerate() {
            match groups.iter_mut().find(|(gm, _)| *gm == m) {
                Some((_, rows)) => rows.push(i),
                None => groups.push((m, vec![i])),
            }
        }
        Ok(ComposedSampler {
            models,
            uncond_model: uncond.model,
            terms,
            weights: experts.iter().map(|e| e.weight).collect(),
            groups,
            learned_variance: diffusion.var_type() == ModelVarType::LearnedRange,
            diffusion,
            solver,
            diffusion_config,
            spec,
        })
    }

    /// The device the models run on.
    pub fn device(&self) -> &Device {
        self.models[self.uncond_model].device()
    }

    /// Number of sampling steps.
    pub fn num_steps(&self) -> usize {
        match &self.solver {
            Some(s) => s.num_steps(),
            None => self.diffusion.num_steps(),
        }
    }

    /// The model timestep of the step at position `i` of the schedule (sampling runs `i` from
    /// `num_steps() - 1` down to 0).
    fn model_timestep(&self, i: usize) -> f32 {
        match &self.solver {
            Some(s) => s.model_timestep(s.num_steps() - 1 - i),
            None => self.diffusion.model_timestep(i),
        }
    }

    /// The update of the step at position `i` (see [`ComposedSampler::model_timestep`]).
    fn step_params(&self, i: usize) -> Result<StepParams> {
        let clip = self.spec.clip_denoised;
        let params = match (&self.solver, self.spec.sampler) {
            (Some(s), _) => {
                let predict_xstart = self.diffusion_config.predict_xstart;
                s.params(s.num_steps() - 1 - i, clip, predict_xstart)
            }
            (None, SamplerKind::Ddpm) => self.diffusion.ddpm_params(i, clip)?,
            (None, SamplerKind::Ddim { eta }) => self.diffusion.ddim_params(i, eta, clip)?,
            (None, SamplerKind::Solver { .. }) => unreachable!("a solver run has its schedule"),
        };
        Ok(params.with_noise_key(self.spec.seed, i as u32))
    }

    /// The diffusion settings sampled with (the unconditional model's, respacing applied).
    pub fn diffusion_config(&self) -> &DiffusionConfig {
        &self.diffusion_config
    }

    /// Elements of one image.
    pub fn image_len(&self) -> usize {
        3 * self.spec.height * self.spec.width
    }

    /// `x_T` of image `k` from the seed.
    pub fn initial_noise(&self, k: usize, out: &mut [f32]) {
        fill_normals(self.spec.seed, k as u32, INIT_NOISE_STEP, out);
    }

    /// Samples images `first..first + B` from `x` (`[B, 3, H, W]`, x_T) on the models' device;
    /// returns x_0. `on_step` is called after every step.
    pub fn sample_batch(
        &self,
        first: usize,
        x: Vec<f32>,
        on_step: &mut dyn FnMut(),
    ) -> Result<Vec<f32>> {
        let len = self.image_len();
        if x.is_empty() || !x.len().is_multiple_of(len) {
            return Err(Error::Input(format!(
                "x_T has {} values, not a multiple of 3x{}x{}",
                x.len(),
                self.spec.height,
                self.spec.width
            )));
        }
        let device = self.models[self.uncond_model].device();
        on_backend!(self.models[self.uncond_model].kind(), B => {
            let mut be = B::open(device)?;
            let run = self.run_inputs(&mut be)?;
            let x = be.upload(&x)?;
            let mut step = || {
                on_step();
                ControlFlow::Continue(())
            };
            let out = self.sample_batch_on(&mut be, &run, first, x, &mut step)?;
            Ok(out.expect("a batch whose steps never break is finished"))
        })
    }

    /// Per-image conditions must cover images `0..images` (or be shared, count 1).
    fn check_counts(&self, images: usize) -> Result<()> {
        for (i, (_, cond)) in self.terms.iter().enumerate() {
            for (kind, part) in [("image", &cond.image), ("embedding", &cond.embedding)] {
                if let Some(p) = part {
                    if p.count != 1 && p.count < images {
                        return Err(Error::Input(format!(
                            "term {i}: the {kind} condition holds {} items, but {images} images \
                             are sampled (give 1, shared, or one per image)",
                            p.count
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Class labels and embeddings of the `rows` of model `m` for images `first..first + b`,
    /// in row-major order (row r, image k at r * b + k): fixed for a whole batch.
    fn group_conditions(
        &self,
        m: usize,
        rows: &[usize],
        first: usize,
        b: usize,
    ) -> (Option<Vec<i64>>, Option<Vec<f32>>) {
        let cfg = &self.models[m].config.unet;
        let labels = cfg.num_classes.map(|_| {
            rows.iter()
                .flat_map(|&r| std::iter::repeat_n(self.terms[r].1.class.unwrap_or(0), b))
                .collect()
        });
        let embedding = cfg.embed_dim.map(|d| {
            let mut e = vec![0.0f32; rows.len() * b * d];
            for (r, &term) in rows.iter().enumerate() {
                if let Some(src) = &self.terms[term].1.embedding {
                    for k in 0..b {
                        e[(r * b + k) * d..][..d].copy_from_slice(src.item(first + k));
                    }
                }
            }
            e
        });
        (labels, embedding)
    }

    /// A request's sizes: positive counts, finite initial noise `[N, 3, H, W]`, conditions for
    /// every image.
    fn check_request(
        &self,
        num_samples: usize,
        batch_size: usize,
        init_noise: Option<&[f32]>,
    ) -> Result<()> {
        if num_samples == 0 || batch_size == 0 {
            return Err(Error::Input(
                "num_samples and batch_size must be positive".into(),
            ));
        }
        // Image k's noise is drawn for the 32-bit index k.
        if num_samples > MAX_SAMPLES {
            return Err(Error::Input(format!(
                "num_samples {num_samples} is more than the {MAX_SAMPLES} images one run draws"
            )));
        }
        if let Some(x) = init_noise {
            if x.len() != num_samples * self.image_len() {
                return Err(Error::Input(format!(
                    "initial noise has {} values, expected [{num_samples}, 3, {}, {}]",
                    x.len(),
                    self.spec.height,
                    self.spec.width
                )));
            }
            let bad = x.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(Error::Input(format!(
                    "initial noise holds {bad} non-finite value(s) (NaN or inf)"
                )));
            }
        }
        self.check_counts(num_samples)
    }

    /// Samples `num_samples` images in batches of `batch_size` on the models' device, and
    /// returns them as `[N, 3, H, W]` f32 (RGB, channel-first, roughly in [-1, 1]: exactly there
    /// with `clip_denoised`; `mcdm::image::to_rgb8` quantises an image as the reference scripts
    /// do). `init_noise` (`[N, 3, H, W]`) replaces the seeded x_T. `on_step` is called after
    /// every step of every batch. On a GPU, a batch that does not fit in memory is run again at half
    /// the size (the progress reports show the batch size used).
    pub fn sample(
        &self,
        num_samples: usize,
        batch_size: usize,
        init_noise: Option<&[f32]>,
        on_step: &mut dyn FnMut(StepProgress),
    ) -> Result<Vec<f32>> {
        // The request first: an impossible one is named as such, not as too large.
        self.check_request(num_samples, batch_size, init_noise)?;
        let mut samples = self.samples_buffer(num_samples)?;
        self.sample_each(
            0..num_samples,
            batch_size,
            init_noise,
            &mut |p| {
                on_step(p);
                ControlFlow::Continue(())
            },
            &mut |_, batch| {
                samples.extend_from_slice(batch);
                Ok(())
            },
        )?;
        Ok(samples)
    }

    /// [`ComposedSampler::sample`] of `images` only (of a run of `images.end` or more: a shard
    /// of it, each image as the whole run makes it), handing each finished batch to
    /// `on_batch(first, x_0)` (images `first..`, in order) instead of holding them all;
    /// `init_noise`, when given, holds x_T of images `0..images.end`. When `on_step` breaks,
    /// sampling stops after that step, the unfinished batch is dropped, and the result is the
    /// number of images finished from `images.start` (all of them when none broke); an error
    /// from `on_batch` ends the run.
    pub fn sample_each(
        &self,
        images: std::ops::Range<usize>,
        batch_size: usize,
        init_noise: Option<&[f32]>,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
        on_batch: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<usize> {
        let device = self.models[self.uncond_model].device();
        on_backend!(self.models[self.uncond_model].kind(), B => {
            let mut be = B::open(device)?;
            self.sample_each_on(&mut be, images, batch_size, init_noise, on_step, on_batch)
        })
    }

    /// An empty buffer with room for `num_samples` images, or an error saying what they need
    /// when that is more than the machine's memory (or than it can reserve).
    fn samples_buffer(&self, num_samples: usize) -> Result<Vec<f32>> {
        let values = num_samples.saturating_mul(self.image_len());
        let bytes = values.saturating_mul(std::mem::size_of::<f32>());
        let too_big = || {
            Error::Input(format!(
                "{num_samples} images of 3x{}x{} need {} of memory, which is not available",
                self.spec.height,
                self.spec.width,
                crate::error::human_bytes(bytes)
            ))
        };
        // Where memory is overcommitted, a reservation beyond it can succeed and fail later.
        if crate::memory::available_memory().is_some_and(|free| bytes > free) {
            return Err(too_big());
        }
        let mut samples = Vec::new();
        samples.try_reserve_exact(values).map_err(|_| too_big())?;
        Ok(samples)
    }
}

/// An error when any sample of images `first..` is NaN or infinite (a model or a condition
/// drove the network past the range of its number format), naming the first image affected.
fn check_finite(samples: &[f32], image_len: usize, first: usize) -> Result<()> {
    let bad = samples.iter().filter(|v| !v.is_finite()).count();
    match samples.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Numeric(format!(
            "sampling produced {bad} non-finite value(s) (NaN or inf), from image {} on: a model, \
             a condition or the initial noise drove the network past the range of its number \
             format (f32 on the CPU, the storage type on a GPU)",
            first + i / image_len
        ))),
    }
}

/// Reported after each denoising step of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepProgress {
    /// The batch: images `first .. first + batch`.
    pub first: usize,
    pub batch: usize,
    /// Steps of this batch done, of `steps`.
    pub step: usize,
    pub steps: usize,
}

impl StepProgress {
    fn new(first: usize, batch: usize, steps: usize) -> Self {
        StepProgress {
            first,
            batch,
            step: 0,
            steps,
        }
    }

    /// This batch one step further.
    fn next(&mut self) -> Self {
        self.step += 1;
        *self
    }
}

/// Runs `run(first, b)` over images `0..num` in batches of at most `batch`. A batch that does
/// not fit in device memory ([`Error::OutOfMemory`]) is run again at half the size, and later
/// batches keep the smaller size; image k never depends on its batch, so the result is the same.
pub(crate) fn run_in_batches(
    num: usize,
    mut batch: usize,
    mut run: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let mut first = 0;
    while first < num {
        let b = batch.min(num - first);
        match run(first, b) {
            Ok(()) => first += b,
            Err(Error::OutOfMemory { .. }) if b > 1 => batch = b / 2,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A term's condition must match what its model takes and the sample size.
fn check_condition(
    who: &str,
    model: &LoadedModel,
    cond: &Condition,
    is_uncond: bool,
    spec: &SampleSpec,
) -> Result<()> {
    let cfg = &model.config.unet;
    let name = model.file.path().display();
    let bad = |m: String| Err(Error::Input(format!("{who} ({name}): {m}")));
    match (cfg.num_classes, cond.class) {
        (Some(k), Some(c)) if c < 0 || c as usize >= k => {
            return bad(format!("class {c} is out of range 0..{k}"))
        }
        (Some(k), None) => {
            return bad(format!(
                "the model is class-conditional ({k} classes): give class=K{}",
                if is_uncond {
                    " (the class that stands for no condition)"
                } else {
                    ""
                }
            ))
        }
        (None, Some(_)) => {
            return bad("class= given, but the model is not class-conditional".into())
        }
        _ => {}
    }
    let Some(image_ch) = cfg.in_channels.checked_sub(3) else {
        return bad(format!(
            "the model takes {} input channel(s), fewer than the 3 of the RGB image sampled",
            cfg.in_channels
        ));
    };
    match &cond.image {
        Some(img) => {
            if image_ch == 0 {
                return bad(
                    "image= given, but the model takes no image condition (in_channels 3)".into(),
                );
            }
            let hw = spec.height * spec.width;
            let want = image_ch * hw;
            if img.count == 0 || img.data.len() != img.count * want {
                let per_image = img.data.len() / img.count.max(1);
                let got = if per_image == 0 {
                    "no values".to_string()
                } else if per_image % hw == 0 {
                    format!(
                        "{} channel(s) of {}x{}",
                        per_image / hw,
                        spec.height,
                        spec.width
                    )
                } else {
                    format!("{per_image} values")
                };
                return bad(format!(
                    "the model takes a {image_ch}-channel image condition ([{image_ch}, {}, {}] \
                     per image, {want} values), got {got}",
                    spec.height, spec.width,
                ));
            }
        }
        None if image_ch > 0 && !is_uncond => {
            return bad(format!(
                "the model takes a {image_ch}-channel image condition: give image=PATH"
            ))
        }
        None => {}
    }
    match (cfg.embed_dim, &cond.embedding) {
        (Some(d), Some(e)) if e.count == 0 || e.data.len() != e.count * d => bad(format!(
            "the embedding must have {d} values per image, got {}",
            e.data.len() / e.count.max(1)
        )),
        (Some(_), Some(e)) if e.data.iter().any(|v| !v.is_finite()) => {
            bad("the embedding holds non-finite values".into())
        }
        (None, Some(_)) => bad("embedding= given, but the model takes no vector condition".into()),
        (Some(d), None) if !is_uncond => bad(format!(
            "the model takes a {d}-wide embedding: give embedding=PATH"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom() -> Error {
        Error::OutOfMemory {
            device: "test".into(),
            bytes: 1 << 30,
            free: 0,
        }
    }

    /// Batches over 5 images "do not fit": 16 is halved to 8, then 4, and every image runs once.
    #[test]
    fn batches_are_halved_until_they_fit() {
        let (mut ran, mut tried) = (Vec::new(), Vec::new());
        run_in_batches(37, 16, |first, b| {
            tried.push(b);
            if b > 5 {
                return Err(oom());
            }
            ran.push((first, b));
            Ok(())
        })
        .unwrap();
        assert_eq!(&tried[..3], &[16, 8, 4]);
        let mut next = 0;
        for &(first, b) in &ran {
            assert_eq!(first, next);
            assert!(b == 4 || first + b == 37, "batch {b} at {first}");
            next += b;
        }
        assert_eq!(next, 37);
    }

    #[test]
    fn one_image_that_does_not_fit_is_an_error() {
        let mut calls = 0;
        let err = run_in_batches(3, 2, |_, _| {
            calls += 1;
            Err(oom())
        })
        .unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
        assert_eq!(calls, 2); // 2, then 1
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut calls = 0;
        let err = run_in_batches(8, 8, |_, _| {
            calls += 1;
            Err(Error::Cuda("launch failed".into()))
        })
        .unwrap_err();
        assert!(matches!(err, Error::Cuda(_)));
        assert_eq!(calls, 1);
    }
}
