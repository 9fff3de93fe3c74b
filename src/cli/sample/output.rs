//! `record.json`: what `mcdm sample` writes beside its images (everything to reproduce the run),
//! and what `--resume` reads back from a stopped run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use mcdm::files::{open_limited, SAFETENSORS_LIMIT};
use mcdm::job::TermSpec;
use mcdm::model::LoadedModel;

use super::Plan;

/// A run, to record.
pub(super) struct RunRecord<'a> {
    pub plan: &'a Plan,
    pub init_noise: Option<&'a Path>,
    /// The models the run used: their names and paths, and the models loaded.
    pub models: &'a [(&'a (String, PathBuf), &'a LoadedModel)],
    pub respacing: &'a str,
    pub steps: usize,
    /// The batch size that ran.
    pub batch_used: usize,
    pub size: [usize; 2],
    pub device: String,
    pub seconds: f64,
    /// The conditions' and initial noise's hashes, taken as they were read (see [`hash_inputs`]).
    pub input_hashes: &'a BTreeMap<PathBuf, String>,
    /// The text encoder's folder, when a term had a prompt.
    pub text_model: Option<&'a Path>,
}

impl RunRecord<'_> {
    /// `record.json` of a run that finished `images` images from `first`: the models with
    /// their hashes and configs, the terms, the settings, the shard. Its `status` is the output
    /// folder's to set.
    pub fn record(&self, first: usize, images: usize) -> Result<serde_json::Value> {
        let plan = self.plan;
        let file = |p: &Path| json!({ "path": absolute(p), "sha256": self.input_hashes.get(p) });
        let term_json = |t: &TermSpec, weight: bool| {
            let mut v = json!({ "model": t.model });
            if let Some(c) = t.class {
                v["class"] = c.into();
            }
            if let Some(p) = &t.image {
                v["image"] = file(p);
            }
            if let Some(text) = &t.text {
                v["text"] = text.clone().into();
            }
            if let Some(p) = &t.embedding {
                v["embedding"] = file(p);
            }
            if weight {
                v["weight"] = decimal(t.weight);
            }
            v
        };
        let mut models = BTreeMap::new();
        for ((name, path), model) in self.models {
            models.insert(
                name.clone(),
                json!({
                    "path": absolute(path),
                    "sha256": model.sha256(),
                    "config": model.config.unet.to_json(&model.config.diffusion),
                }),
            );
        }
        Ok(json!({
            "mcdm_version": env!("CARGO_PKG_VERSION"),
            "command": command_line(),
            "text_model": self.text_model.map(absolute),
            "formula": "eps = eps_u + sum_i w_i (eps_i - eps_u)",
            "models": models,
            "experts": plan.experts.iter().map(|t| term_json(t, true)).collect::<Vec<_>>(),
            "uncond": term_json(&plan.uncond, false),
            "sampler": plan.sampler.name(),
            "eta": decimal(plan.eta),
            "karras": plan.karras,
            "timestep_respacing": self.respacing,
            "steps": self.steps,
            "clip_denoised": plan.clip_denoised,
            "seed": plan.seed,
            "num_samples": plan.num_samples,
            "first_image": first,
            "images": images,
            "shard": plan.shard.as_ref().map(|s| json!({
                "index": s.index, "count": s.count, "from": s.from,
            })),
            "batch_size": self.batch_used,
            "image_size": self.size,
            "png_scale": plan.png_scale,
            "init_noise": self.init_noise.map(file),
            "device": self.device,
            "seconds": self.seconds,
        }))
    }
}

/// Record fields that describe one process's part of a run, not its job.
const RUN_FIELDS: &[&str] = &[
    "command",
    "seconds",
    "device",
    "batch_size",
    "images",
    "first_image",
    "shard",
    "status",
    "text_model",
];

/// A record without what differs between the processes of one job (shards, resumed parts).
pub(crate) fn job_of(record: &serde_json::Value) -> serde_json::Value {
    let mut job = record.clone();
    if let Some(map) = job.as_object_mut() {
        for key in RUN_FIELDS {
            map.remove(*key);
        }
    }
    job
}

/// The keys whose values differ between two records (or that one of them lacks), quoted.
pub(crate) fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    a.iter()
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, _)| format!("`{k}`"))
        .chain(
            b.keys()
                .filter(|k| !a.contains_key(k.as_str()))
                .map(|k| format!("`{k}`")),
        )
        .collect()
}

/// What the folder holds of a run of the job whose (new) record is `record`.
pub(super) enum Resumable {
    /// No record, or one of a run that left no image whole.
    Nothing,
    /// This many images of this job's run from its first image, each whole.
    Images(usize),
    /// A run of another job: the record fields that differ.
    OtherJob(String),
}

/// Reads the record in `out`: a partial or complete run of the same job (same models by hash,
/// conditions, sampler, seed, sizes and shard) keeps its images, as far as they are all there.
pub(super) fn resumable(out: &Path, record: &serde_json::Value) -> Result<Resumable> {
    let Ok(text) = std::fs::read_to_string(out.join(super::folder::RECORD)) else {
        return Ok(Resumable::Nothing);
    };
    let Ok(old) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(Resumable::Nothing);
    };
    let (a, b) = (job_of(&old), job_of(record));
    if a != b || old["first_image"] != record["first_image"] {
        let differs = differing_keys(&a, &b).join(", ");
        return Ok(Resumable::OtherJob(format!(
            "its record differs in {differs}"
        )));
    }
    // A run killed while moving its images in (`writing`) may hold a mix: nothing is kept.
    if !matches!(old["status"].as_str(), Some("partial" | "complete")) {
        return Ok(Resumable::Nothing);
    }
    let first = old["first_image"].as_u64().unwrap_or(0) as usize;
    let images = old["images"].as_u64().unwrap_or(0) as usize;
    let whole = (first..first + images)
        .take_while(|&k| out.join(super::folder::image_name(k)).is_file())
        .count();
    Ok(Resumable::Images(whole))
}

/// `path` as an absolute path, so that the record replays as a job from any folder.
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// The command line of this run, quoted for a POSIX shell where needed.
pub(crate) fn command_line() -> String {
    let quote = |arg: std::ffi::OsString| {
        let arg = arg.to_string_lossy().into_owned();
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-./=,:@%+".contains(c));
        if plain {
            arg
        } else {
            format!("'{}'", arg.replace('\'', "'\\''"))
        }
    };
    std::env::args_os().map(quote).collect::<Vec<_>>().join(" ")
}

/// An f32 setting as it was written (0.7, not 0.699999988079071, its exact value as an f64).
fn decimal(v: f32) -> serde_json::Value {
    v.to_string()
        .parse::<f64>()
        .map_or(serde_json::Value::Null, Into::into)
}

/// k for an image file name `NNNNNN.png` (six digits).
pub(crate) fn image_number(name: &str) -> Option<usize> {
    name.strip_suffix(".png")
        .filter(|stem| stem.len() == 6)
        .and_then(|stem| stem.parse().ok())
}

/// The SHA-256 of each of `paths`, hashed when called: just after the run read them, so that
/// the record holds the bytes it used.
pub(super) fn hash_inputs<'p>(
    paths: impl IntoIterator<Item = &'p Path>,
) -> Result<BTreeMap<PathBuf, String>> {
    let mut hashes = BTreeMap::new();
    for path in paths {
        let (mut file, _) = open_limited(path, SAFETENSORS_LIMIT, "input")?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("hashing {}", path.display()))?;
        hashes.insert(path.to_path_buf(), format!("{:x}", hasher.finalize()));
    }
    Ok(hashes)
}
