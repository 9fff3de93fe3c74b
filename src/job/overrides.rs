//! Settings given over a job: `mcdm sample`'s flags, the Python package's keywords. One set of
//! rules, so that the same settings give the same images from either.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::job::{check_model_name, Job, Sampler, TermSpec};

/// The job of the shipped SynthFaces experts composed on held-back conditions.
pub const DEFAULT_JOB: &str = "examples/default.json";

/// What is given over a job; None (or empty) keeps the job's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Models by name: a name the job has is replaced.
    pub models: Vec<(String, PathBuf)>,
    /// Non-empty: the experts, in place of all of the job's.
    pub experts: Vec<TermSpec>,
    pub uncond: Option<TermSpec>,
    /// A sampler given here drops the job's eta (a DDIM setting).
    pub sampler: Option<Sampler>,
    pub eta: Option<f32>,
    pub karras: Option<bool>,
    pub steps: Option<usize>,
    /// Over `steps` when both are given.
    pub timestep_respacing: Option<String>,
    pub clip_denoised: Option<bool>,
    pub num_samples: Option<usize>,
    pub batch_size: Option<usize>,
    pub seed: Option<u64>,
    pub init_noise: Option<PathBuf>,
}

impl Overrides {
    /// Whether no model or term is given (then the default job runs).
    pub fn names_no_term(&self) -> bool {
        self.models.is_empty() && self.experts.is_empty() && self.uncond.is_none()
    }
}

/// [`DEFAULT_JOB`] in the working folder, else in the mcdm checkout this was built from.
pub fn default_job_path() -> Option<PathBuf> {
    [Path::new("."), Path::new(env!("CARGO_MANIFEST_DIR"))]
        .iter()
        .map(|d| d.join(DEFAULT_JOB))
        .find(|p| p.is_file())
}

/// The job a run samples, and where it came from.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub job: Job,
    /// The job file read: `job_file`, or the default job when nothing names a term.
    pub file: Option<PathBuf>,
    /// The default job's model names that were added so that terms can use them by name
    /// (only when no job file is given).
    pub shipped: Vec<String>,
}

/// The job `job_file` (else the default job when `over` names no model or term) with `over`
/// over it. Without a job file the default job's models answer to their names too.
pub fn resolve(job_file: Option<&Path>, over: &Overrides) -> Result<Resolved> {
    let file = match job_file {
        Some(p) => Some(p.to_path_buf()),
        None if over.names_no_term() => Some(default_job_path().ok_or_else(|| {
            Error::Job(format!(
                "no model given and the default job {DEFAULT_JOB} was not found: give models \
                 and an unconditional term, or a job file"
            ))
        })?),
        None => None,
    };
    let mut job = match &file {
        Some(path) => Job::load(path)?,
        None => Job::default(),
    };
    let mut shipped = Vec::new();
    if file.is_none() {
        if let Some(path) = default_job_path() {
            for (name, path) in Job::load(&path)?.models {
                if !over.models.iter().any(|(n, _)| *n == name) {
                    shipped.push(name.clone());
                    job.models.push((name, path));
                }
            }
        }
    }
    Ok(Resolved {
        job: job.overridden(over)?,
        file,
        shipped,
    })
}

impl Job {
    /// This job with `over` over it.
    pub fn overridden(&self, over: &Overrides) -> Result<Job> {
        let mut job = self.clone();
        for (i, (name, path)) in over.models.iter().enumerate() {
            check_model_name(name)?;
            if path.as_os_str().is_empty() {
                return Err(Error::Job(format!("model `{name}`: no path")));
            }
            if over.models[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Job(format!("model `{name}` is given twice")));
            }
            job.models.retain(|(n, _)| n != name);
            job.models.push((name.clone(), path.clone()));
        }
        if !over.experts.is_empty() {
            job.experts = Some(over.experts.clone());
        }
        if over.uncond.is_some() {
            job.uncond = over.uncond.clone();
        }
        if over.sampler.is_some() {
            job.sampler = over.sampler;
            job.eta = None;
        }
        job.eta = over.eta.or(job.eta);
        job.karras = over.karras.or(job.karras);
        if over.timestep_respacing.is_some() {
            job.timestep_respacing = over.timestep_respacing.clone();
            job.steps = None;
        } else if over.steps.is_some() {
            job.steps = over.steps;
        }
        job.clip_denoised = over.clip_denoised.or(job.clip_denoised);
        job.num_samples = over.num_samples.or(job.num_samples);
        job.batch_size = over.batch_size.or(job.batch_size);
        job.seed = over.seed.or(job.seed);
        if over.init_noise.is_some() {
            job.init_noise = over.init_noise.clone();
        }
        Ok(job)
    }
}
