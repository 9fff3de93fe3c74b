//! A job's terms made ready to sample: the models the terms use loaded on a device, the prompts
//! encoded, the conditions read, and a [`ComposedSampler`] over them. This is what
//! `mcdm sample` does before it samples; a program that embeds mcdm does the same with
//! [`Job::composition`] and [`Job::sample_spec`].

use std::path::{Path, PathBuf};

use crate::device::{DType, Device};
use crate::error::{Error, Result};
use crate::job::conditions::term_condition;
use crate::job::{Job, Sampler, TermSpec};
use crate::model::{load_model, LoadedModel};
use crate::sample::{ComposedSampler, Expert, SampleSpec, SamplerKind, Unconditional};
use crate::text::TextEncoder;

/// The steps a job gets when neither it nor its unconditional model names any.
pub const DEFAULT_RESPACING: &str = "50";

/// The images a run makes when neither the caller nor the job says.
pub const DEFAULT_NUM_SAMPLES: usize = 4;

/// The batch size for `images` images on `device` when none is given: up to 16 on the CPU,
/// 64 on a GPU (which splits a batch that does not fit).
pub fn default_batch_size(images: usize, device: &Device) -> usize {
    images.clamp(1, if device.is_cpu() { 16 } else { 64 })
}

/// The terms of a composition as a job or the command line gives them.
#[derive(Clone, Copy, Debug)]
pub struct Terms<'a> {
    /// Model names and paths; the terms refer to models by name.
    pub models: &'a [(String, PathBuf)],
    pub experts: &'a [TermSpec],
    pub uncond: &'a TermSpec,
}

/// The sampling settings of a run, defaults resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub sampler: Sampler,
    /// DDIM's eta (0 for the other samplers).
    pub eta: f32,
    /// Karras sigmas (a solver only).
    pub karras: bool,
    /// None: the unconditional model's `timestep_respacing`, else [`DEFAULT_RESPACING`].
    pub timestep_respacing: Option<String>,
    pub clip_denoised: bool,
    pub seed: u64,
}

/// The loaded half of a composition: [`Composition::sampler`] borrows it.
pub struct Composition {
    /// The models some term uses, in the order of [`Terms::models`], on the device.
    pub models: Vec<LoadedModel>,
    /// Each of `models`' name and path.
    pub sources: Vec<(String, PathBuf)>,
    /// The names of the models no term uses (not loaded).
    pub unused: Vec<String>,
    pub experts: Vec<Expert>,
    pub uncond: Unconditional,
    /// The samples' height and width: the unconditional model's image size.
    pub size: [usize; 2],
    /// The text encoder's folder, when a term has a prompt.
    pub text_model: Option<PathBuf>,
    /// What the caller should pass on to its user: defaulted config fields, prompts cut,
    /// large weights, conditions out of range, converted PNG channels.
    pub warnings: Vec<String>,
    /// The terms as given, for messages: "expert 0 is `sketch`", ...
    names: Vec<String>,
}

impl Composition {
    /// Loads the models that the terms use onto `device` (stored as `dtype` on a GPU), encodes
    /// the prompts (on the CPU in f32 whatever the device, so that a prompt gives the same
    /// images everywhere) with the encoder at `text_model` (else [`TextEncoder::locate`]'s),
    /// and reads the conditions of `num_samples` images.
    pub fn load(
        terms: Terms,
        num_samples: usize,
        device: &Device,
        dtype: DType,
        text_model: Option<&Path>,
    ) -> Result<Composition> {
        let mut one = Self::load_across(
            terms,
            num_samples,
            std::slice::from_ref(device),
            dtype,
            text_model,
        )?;
        Ok(one.pop().expect("one composition per device"))
    }

    /// [`Composition::load`] onto each of `devices` (several GPUs): every model file is read
    /// and hashed once, every prompt encoded and every condition read once, and the models
    /// copied to each device.
    pub fn load_across(
        terms: Terms,
        num_samples: usize,
        devices: &[Device],
        dtype: DType,
        text_model: Option<&Path>,
    ) -> Result<Vec<Composition>> {
        let all = || terms.experts.iter().chain([terms.uncond]);
        let index = |name: &str| {
            terms
                .models
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = terms.models.iter().map(|(n, _)| n.as_str()).collect();
                    Error::Job(format!(
                        "unknown model `{name}`: the models are {} (give --model {name}=PATH)",
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ))
                })
        };
        let mut used: Vec<usize> = all().map(|t| index(&t.model)).collect::<Result<_>>()?;
        used.sort();
        used.dedup();
        let mut warnings = Vec::new();
        let mut models = Vec::new();
        for &m in &used {
            let (name, path) = &terms.models[m];
            let model = load_model(path, None).map_err(|e| {
                Error::Job(format!(
                    "loading model `{name}` from {}: {e}",
                    path.display()
                ))
            })?;
            if let Some(w) = model.config.default_warning() {
                warnings.push(format!(
                    "model `{name}` ({}): {w} (see mcdm inspect {0})",
                    path.display()
                ));
            }
            models.push(model);
        }
        let slot = |name: &str| -> Result<usize> {
            let m = index(name)?;
            Ok(used
                .iter()
                .position(|&u| u == m)
                .expect("every term's model is loaded"))
        };
        let uncond_model = slot(&terms.uncond.model)?;
        let image_size = models[uncond_model].config.unet.image_size;
        let size = [image_size, image_size];

        // Prompts are encoded once, all together.
        let prompts: Vec<&str> = all().filter_map(|t| t.text.as_deref()).collect();
        let mut text_dir = None;
        let encoded: Vec<Vec<f32>> = if prompts.is_empty() {
            Vec::new()
        } else {
            let dir = TextEncoder::locate(text_model)
                .map_err(|e| Error::Job(format!("text= needs the text encoder: {e}")))?;
            let encoder = TextEncoder::load(&dir).map_err(|e| {
                Error::Job(format!(
                    "loading the text model from {}: {e}",
                    dir.display()
                ))
            })?;
            for prompt in &prompts {
                if let Some(w) = encoder.cut_warning(prompt)? {
                    warnings.push(format!("text= prompt {w}"));
                }
            }
            text_dir = Some(dir);
            let flat = encoder.encode(&prompts)?;
            flat.chunks_exact(encoder.dim())
                .map(<[f32]>::to_vec)
                .collect()
        };
        let mut condition = |t: &TermSpec| {
            let prompt = t.text.as_ref().map(|text| {
                let row = prompts
                    .iter()
                    .position(|p| p == text)
                    .expect("encoded above");
                encoded[row].as_slice()
            });
            let cfg = &models[slot(&t.model)?].config.unet;
            term_condition(
                t,
                num_samples,
                size,
                cfg.embed_dim,
                cfg.in_channels.saturating_sub(3),
                prompt,
                &mut warnings,
            )
        };
        let experts: Vec<Expert> = terms
            .experts
            .iter()
            .map(|t| {
                Ok(Expert {
                    model: slot(&t.model)?,
                    condition: condition(t)?,
                    weight: t.weight,
                })
            })
            .collect::<Result<_>>()?;
        let uncond = Unconditional {
            model: uncond_model,
            condition: condition(terms.uncond)?,
        };
        let unused: Vec<String> = (0..terms.models.len())
            .filter(|m| !used.contains(m))
            .map(|m| terms.models[m].0.clone())
            .collect();
        let names: Vec<String> = terms
            .experts
            .iter()
            .enumerate()
            .map(|(i, t)| format!("expert {i} is `{}`", t.model))
            .chain([format!("the unconditional term `{}`", terms.uncond.model)])
            .collect();
        let sources: Vec<(String, PathBuf)> =
            used.iter().map(|&m| terms.models[m].clone()).collect();
        let mut compositions = Vec::with_capacity(devices.len());
        for (i, device) in devices.iter().enumerate() {
            // The last device takes the host copies; the others get copies of them.
            let placed = if i + 1 == devices.len() {
                std::mem::take(&mut models)
                    .into_iter()
                    .map(|m| m.to_device(device, dtype))
                    .collect::<Result<Vec<_>>>()?
            } else {
                models
                    .iter()
                    .map(|m| m.copy_to(device, dtype))
                    .collect::<Result<Vec<_>>>()?
            };
            compositions.push(Composition {
                sources: sources.clone(),
                models: placed,
                unused: unused.clone(),
                experts: experts.clone(),
                uncond: uncond.clone(),
                size,
                text_model: text_dir.clone(),
                warnings: warnings.clone(),
                names: names.clone(),
            });
        }
        Ok(compositions)
    }

    /// The sample spec of `settings` for these models (their image size, and their steps when
    /// the settings name none).
    pub fn spec(&self, settings: &Settings) -> SampleSpec {
        let model_respacing = &self.models[self.uncond.model]
            .config
            .diffusion
            .timestep_respacing;
        let respacing = settings.timestep_respacing.clone().unwrap_or_else(|| {
            if model_respacing.is_empty() {
                DEFAULT_RESPACING.into()
            } else {
                model_respacing.clone()
            }
        });
        SampleSpec {
            sampler: match settings.sampler {
                Sampler::Ddim => SamplerKind::Ddim { eta: settings.eta },
                Sampler::Ddpm => SamplerKind::Ddpm,
                Sampler::Solver(kind) => SamplerKind::Solver {
                    kind,
                    karras: settings.karras,
                },
            },
            timestep_respacing: Some(respacing),
            clip_denoised: settings.clip_denoised,
            seed: settings.seed,
            height: self.size[0],
            width: self.size[1],
        }
    }

    /// The sampler of this composition; its errors name the terms as given.
    pub fn sampler(&self, spec: SampleSpec) -> Result<ComposedSampler<'_>> {
        ComposedSampler::new(&self.models, &self.experts, &self.uncond, spec).map_err(|e| match e {
            Error::Input(m) => {
                Error::Input(format!("composition ({}): {m}", self.names.join(", ")))
            }
            e => e,
        })
    }
}

impl Job {
    /// The job's sampling settings, with `mcdm sample`'s defaults for what it does not give
    /// (DDIM, eta 0, the model's steps, clip on, seed 0). An eta with another sampler than
    /// DDIM, or Karras sigmas with DDPM or DDIM, is an error.
    pub fn settings(&self) -> Result<Settings> {
        let sampler = self.sampler.unwrap_or(Sampler::Ddim);
        let eta = self.eta.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::Job(format!(
                "job file: `eta` must be between 0 (deterministic) and 1, got {eta}"
            )));
        }
        if eta != 0.0 && sampler != Sampler::Ddim {
            return Err(Error::Job(format!(
                "job file: `eta` {eta} is a DDIM setting: {} sampling has no eta",
                sampler.name()
            )));
        }
        let karras = self.karras.unwrap_or(false);
        if karras && !matches!(sampler, Sampler::Solver(_)) {
            return Err(Error::Job(format!(
                "job file: `karras` chooses a solver's sigmas, and {} is not one",
                sampler.name()
            )));
        }
        if self.steps == Some(0) {
            return Err(Error::Job("job file: `steps` must be positive".into()));
        }
        Ok(Settings {
            sampler,
            eta,
            karras,
            timestep_respacing: self
                .steps
                .map(|s| s.to_string())
                .or(self.timestep_respacing.clone()),
            clip_denoised: self.clip_denoised.unwrap_or(true),
            seed: self.seed.unwrap_or(0),
        })
    }

    /// The job's composition loaded for `num_samples` images (see [`Composition::load`]).
    pub fn composition(
        &self,
        num_samples: usize,
        device: &Device,
        dtype: DType,
        text_model: Option<&Path>,
    ) -> Result<Composition> {
        let uncond = self
            .uncond
            .as_ref()
            .ok_or_else(|| Error::Job("job file: no `uncond` term".into()))?;
        let terms = Terms {
            models: &self.models,
            experts: self.experts.as_deref().unwrap_or_default(),
            uncond,
        };
        Composition::load(terms, num_samples, device, dtype, text_model)
    }
}
