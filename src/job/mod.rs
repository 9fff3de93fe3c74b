//! Job files: a composed sampling run as JSON (`examples/default.json`), and the term syntax of
//! `mcdm sample --expert` / `--uncond`. A job names its models, its experts and unconditional
//! term, and any of the sampling settings; paths are relative to the file. [`conditions`]
//! reads the condition files the terms name. A run's `record.json` is a job too: it replays
//! the run, and the hashes it holds let the caller check that the files are the ones it used.
//!
//! ```json
//! {"models": {"u": "uncond.safetensors", "s": "sketch.safetensors"},
//!  "uncond": {"model": "u"},
//!  "experts": [{"model": "s", "image": "sketch.png", "weight": 1.5}],
//!  "sampler": "ddpm", "steps": 50, "num_samples": 8, "seed": 1, "out": "out"}
//! ```

pub mod compose;
pub mod conditions;
pub mod overrides;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::parse_json;
use crate::diffusion::SolverKind;
use crate::error::{Error, Result};
use crate::files::{read_string_limited, JSON_LIMIT};
pub use crate::sample::MAX_EXPERTS;

/// The keys a job file may hold.
pub const KEYS: &[&str] = &[
    "models",
    "experts",
    "uncond",
    "sampler",
    "eta",
    "karras",
    "timestep_respacing",
    "steps",
    "clip_denoised",
    "num_samples",
    "batch_size",
    "seed",
    "init_noise",
    "png_scale",
    "out",
];

/// The keys of a run's `record.json` that only describe the run (a record is replayed as a
/// job, these aside). A job holding `mcdm_version` is taken for a record.
pub const RECORD_KEYS: &[&str] = &[
    "mcdm_version",
    "formula",
    "command",
    "text_model",
    "images",
    "first_image",
    "shard",
    "status",
    "image_size",
    "device",
    "seconds",
];

/// A file a job names: its path, or in a record `{"path": ..., "sha256": ...}`.
fn file_path(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("path")?.as_str())
}

/// Refuses more than [`MAX_EXPERTS`] experts (`count`, given by `what`) before any is read.
pub fn check_expert_count(count: usize, what: &str) -> Result<()> {
    if count > MAX_EXPERTS {
        return Err(bad(format!(
            "{what}: {count} experts, more than the {MAX_EXPERTS} one run composes (each costs \
             a forward pass per step)"
        )));
    }
    Ok(())
}

/// The samplers a job names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Ddim,
    Ddpm,
    /// A multistep solver (`dpmpp-2m`, `dpmpp-3m`, `unipc`).
    Solver(SolverKind),
}

impl Sampler {
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddim => "ddim",
            Sampler::Ddpm => "ddpm",
            Sampler::Solver(kind) => kind.name(),
        }
    }

    /// The sampler of this name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "ddim" => Some(Sampler::Ddim),
            "ddpm" => Some(Sampler::Ddpm),
            _ => SolverKind::parse(name).map(Sampler::Solver),
        }
    }

    /// Every name, for messages.
    pub fn names() -> String {
        let mut names = vec!["ddim", "ddpm"];
        names.extend(SolverKind::ALL.map(SolverKind::name));
        names.join(", ")
    }
}

/// A term as written by the user, before its model and conditions are loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct TermSpec {
    /// The name of one of the job's models.
    pub model: String,
    pub class: Option<i64>,
    /// An image condition: a PNG, or safetensors with `cond`.
    pub image: Option<PathBuf>,
    /// A vector condition: safetensors with `embedding`.
    pub embedding: Option<PathBuf>,
    /// A prompt, to be encoded with the text encoder into the embedding.
    pub text: Option<String>,
    pub weight: f32,
}

/// A job file's contents; what it does not give is None (or empty).
#[derive(Clone, Debug, Default)]
pub struct Job {
    /// Model names and paths, in the file's order.
    pub models: Vec<(String, PathBuf)>,
    pub experts: Option<Vec<TermSpec>>,
    pub uncond: Option<TermSpec>,
    pub sampler: Option<Sampler>,
    pub eta: Option<f32>,
    /// Karras sigmas for a solver.
    pub karras: Option<bool>,
    pub timestep_respacing: Option<String>,
    pub steps: Option<usize>,
    pub clip_denoised: Option<bool>,
    pub num_samples: Option<usize>,
    pub batch_size: Option<usize>,
    pub seed: Option<u64>,
    /// Initial noise: safetensors with `x_T`.
    pub init_noise: Option<PathBuf>,
    /// Each PNG enlarged this many times.
    pub png_scale: Option<usize>,
    pub out: Option<PathBuf>,
    /// The SHA-256 a record gives for each file it names (models, conditions, initial noise).
    pub hashes: Vec<(PathBuf, String)>,
}

fn bad(message: String) -> Error {
    Error::Job(message)
}

/// A model name that terms can refer to: not empty, and free of the separators of a term spec.
pub fn check_model_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains([',', '=']) {
        return Err(bad(format!(
            "model name `{name}` must be non-empty, without `,` or `=`"
        )));
    }
    Ok(())
}

impl Job {
    /// Reads the job file at `path`; its paths are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Job> {
        let text = read_string_limited(path, JSON_LIMIT, "job file")
            .map_err(|e| bad(format!("reading the job file: {e}")))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Job::parse_from(&text, &base, Some(path))
    }

    /// A job from its JSON text, paths relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Job> {
        Job::parse_from(text, base, None)
    }

    /// Problems of the file as a whole name `file` where given; those of one value name the
    /// key.
    fn parse_from(text: &str, base: &Path, file: Option<&Path>) -> Result<Job> {
        let whole = |what: String| match file {
            Some(path) => bad(format!("job file {}: {what}", path.display())),
            None => bad(format!("job file: {what}")),
        };
        let v = parse_json(text).map_err(|e| whole(format!("not valid JSON: {e}")))?;
        let job = v
            .as_object()
            .ok_or_else(|| whole("expected a JSON object".into()))?;
        let record = job.contains_key("mcdm_version");
        let known = |k: &str| KEYS.contains(&k) || (record && RECORD_KEYS.contains(&k));
        if let Some(k) = job.keys().find(|k| !known(k)) {
            return Err(whole(format!(
                "unknown key `{k}` (known: {})",
                KEYS.join(", ")
            )));
        }
        // Files with the hash a record gives them, and their paths relative to `base`.
        let mut hashes = Vec::new();
        let mut file = |v: &Value| {
            let path = base.join(file_path(v)?);
            if let Some(h) = v.get("sha256").and_then(Value::as_str) {
                hashes.push((path.clone(), h.to_string()));
            }
            Some(path)
        };
        let field = |what: &str| bad(format!("job file: {what}"));
        let value = |key: &str, expected: &str, v: &Value| {
            field(&format!("`{key}` must be {expected}, got {v}"))
        };
        let string = |key: &str| -> Result<Option<String>> {
            job.get(key)
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| value(key, "a string", v))
                })
                .transpose()
        };
        let unsigned = |key: &str| -> Result<Option<u64>> {
            job.get(key)
                .map(|v| {
                    v.as_u64()
                        .ok_or_else(|| value(key, "a non-negative integer", v))
                })
                .transpose()
        };
        let count = |key: &str| -> Result<Option<usize>> {
            unsigned(key)?
                .map(|n| usize::try_from(n).map_err(|e| field(&format!("`{key}`: {e}"))))
                .transpose()
        };
        let models = match job.get("models") {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    check_model_name(k).map_err(|e| field(&format!("models: {e}")))?;
                    let path = file(v).ok_or_else(|| field("model paths must be strings"))?;
                    Ok((k.clone(), path))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(field("`models` must map names to paths")),
            None => Vec::new(),
        };
        let experts = match job.get("experts") {
            Some(Value::Array(a)) => {
                check_expert_count(a.len(), "job file: `experts`")?;
                Some(
                    a.iter()
                        .map(|e| TermSpec::from_json(e, &mut file, true))
                        .collect::<Result<_>>()
                        .map_err(|e| field(&format!("experts: {e}")))?,
                )
            }
            Some(_) => return Err(field("`experts` must be a list")),
            None => None,
        };
        let uncond = job
            .get("uncond")
            .map(|v| TermSpec::from_json(v, &mut file, false))
            .transpose()
            .map_err(|e| field(&format!("uncond: {e}")))?;
        let sampler = match string("sampler")?.as_deref() {
            None => None,
            Some(name) => Some(Sampler::parse(name).ok_or_else(|| {
                field(&format!(
                    "sampler `{name}` is unknown ({})",
                    Sampler::names()
                ))
            })?),
        };
        let (mut steps, timestep_respacing) = (count("steps")?, string("timestep_respacing")?);
        // A record gives both: the respacing, and the number of steps it makes.
        if record && timestep_respacing.is_some() {
            steps = None;
        }
        if steps.is_some() && timestep_respacing.is_some() {
            return Err(field("give `steps` or `timestep_respacing`, not both"));
        }
        let eta = job
            .get("eta")
            .map(|v| {
                v.as_f64()
                    .map(|e| e as f32)
                    .ok_or_else(|| value("eta", "a number", v))
            })
            .transpose()?;
        let flag = |key: &str| {
            job.get(key)
                .map(|v| v.as_bool().ok_or_else(|| value(key, "true or false", v)))
                .transpose()
        };
        let clip_denoised = flag("clip_denoised")?;
        let karras = flag("karras")?;
        let init_noise = match job.get("init_noise") {
            None | Some(Value::Null) => None,
            Some(v) => Some(file(v).ok_or_else(|| value("init_noise", "a path (a string)", v))?),
        };
        let out = match string("out")? {
            Some(o) if o.is_empty() => return Err(field("`out` is empty")),
            o => o.map(|o| base.join(o)),
        };
        Ok(Job {
            models,
            experts,
            uncond,
            sampler,
            eta,
            karras,
            timestep_respacing,
            steps,
            clip_denoised,
            num_samples: count("num_samples")?,
            batch_size: count("batch_size")?,
            seed: unsigned("seed")?,
            init_noise,
            png_scale: count("png_scale")?,
            out,
            hashes,
        })
    }
}

impl TermSpec {
    /// A term from the command line: `NAME[,class=K][,image=PATH][,embedding=PATH][,weight=W]`
    /// (`weight` only when `allow_weight`), optionally ending in `,text=PROMPT`, which takes
    /// the rest, commas included.
    pub fn parse(spec: &str, allow_weight: bool) -> Result<TermSpec> {
        let (head, text) = match spec.find(",text=") {
            Some(i) => (
                &spec[..i],
                Some(spec[i + 6..].trim().trim_matches('"').to_string()),
            ),
            None => (spec, None),
        };
        let mut parts = head.split(',');
        let model = parts.next().unwrap_or_default().trim().to_string();
        if model.is_empty() || model.contains('=') {
            return Err(bad(format!(
                "`{spec}`: expected NAME[,key=value...], starting with a model name"
            )));
        }
        let mut term = TermSpec {
            model,
            class: None,
            image: None,
            embedding: None,
            text,
            weight: 1.0,
        };
        let mut seen = Vec::new();
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{spec}`: `{part}` is not key=value")))?;
            let key = key.trim();
            if seen.contains(&key) {
                return Err(bad(format!("`{spec}`: `{key}` is given twice")));
            }
            seen.push(key);
            match key {
                "class" => {
                    let class = value
                        .trim()
                        .parse()
                        .map_err(|e| bad(format!("`{spec}`: class must be an integer: {e}")))?;
                    term.class = Some(class);
                }
                "image" => term.image = Some(PathBuf::from(value)),
                "embedding" => term.embedding = Some(PathBuf::from(value)),
                "weight" if allow_weight => {
                    term.weight = value
                        .trim()
                        .parse()
                        .map_err(|e| bad(format!("`{spec}`: weight must be a number: {e}")))?;
                    if !term.weight.is_finite() {
                        return Err(bad(format!("`{spec}`: weight must be finite")));
                    }
                }
                other => {
                    return Err(bad(format!(
                        "`{spec}`: unknown key `{other}` (expected class, image, embedding, \
                         text{})",
                        if allow_weight { ", weight" } else { "" }
                    )))
                }
            }
        }
        Ok(term)
    }

    /// A term as a job file's JSON object gives it, its paths as they are.
    pub fn from_object(v: &Value, allow_weight: bool) -> Result<TermSpec> {
        TermSpec::from_json(v, &mut |p| p.as_str().map(PathBuf::from), allow_weight)
    }

    /// A term of a job file; `file` resolves the path of a condition file (a string, or a
    /// record's `{"path", "sha256"}`).
    fn from_json(
        v: &Value,
        file: &mut impl FnMut(&Value) -> Option<PathBuf>,
        allow_weight: bool,
    ) -> Result<TermSpec> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad(format!("expected an object, got {v}")))?;
        for key in obj.keys() {
            if !["model", "class", "image", "embedding", "text", "weight"].contains(&key.as_str())
                || (key == "weight" && !allow_weight)
            {
                return Err(bad(format!("unknown key `{key}` in {v}")));
            }
        }
        let string = |k: &str| -> Result<Option<String>> {
            obj.get(k)
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("`{k}` must be a string in {v}")))
                })
                .transpose()
        };
        let mut path = |k: &str| -> Result<Option<PathBuf>> {
            obj.get(k)
                .map(|p| file(p).ok_or_else(|| bad(format!("`{k}` must be a path in {v}"))))
                .transpose()
        };
        let weight = match obj.get("weight") {
            None => 1.0,
            Some(w) => match w.as_f64().map(|w| w as f32) {
                Some(w) if w.is_finite() => w,
                _ => return Err(bad(format!("weight must be a finite number in {v}"))),
            },
        };
        Ok(TermSpec {
            model: string("model")?.ok_or_else(|| bad(format!("`model` missing in {v}")))?,
            class: obj
                .get("class")
                .map(|c| {
                    c.as_i64()
                        .ok_or_else(|| bad(format!("class must be an integer in {v}")))
                })
                .transpose()?,
            image: path("image")?,
            embedding: path("embedding")?,
            text: string("text")?,
            weight,
        })
    }
}
