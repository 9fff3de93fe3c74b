//! `mcdm sample`: composed sampling from experts and an unconditional model.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use mcdm::files::write_atomic;
use mcdm::image::{grid, read_png, to_rgb8, write_png};
use mcdm::model::{load_model, LoadedModel};
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, StepProgress,
    Unconditional,
};
use mcdm::weights::{write_safetensors, SafetensorsFile, TensorData};

use mcdm::text::TextEncoder;
use mcdm::Device;

use super::{check_output_file, open_device, progress_bar, warn_graph_failure, DeviceArg, Dtype};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Sampler {
    Ddim,
    Ddpm,
}

/// Sample images whose every step combines experts with an unconditional model:
/// eps = eps_u + sum_i w_i (eps_i - eps_u).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    # two experts (a sketch and a partial segmentation) composed with an unconditional model\n  \
    # (paper eq. 12) on SynthFaces conditions from examples/ (image k takes condition k)\n  \
    mcdm sample --model u=weights/uncond.safetensors --model s=weights/sketch.safetensors \\\n    \
    --model g=weights/segment.safetensors --uncond u \\\n    \
    --expert s,image=examples/sketch.safetensors --expert g,image=examples/segment.safetensors,weight=1.5 \\\n    \
    --num-samples 8 --out out/\n\n  \
    # classifier-free-guidance style: the null condition is class 0 of the same model\n  \
    mcdm sample --model c=m.safetensors --uncond c,class=0 --expert c,class=7,weight=3\n\n  \
    # a text expert conditioned on a prompt\n  \
    mcdm sample --model u=weights/uncond.safetensors --model t=weights/text.safetensors --uncond u \\\n    \
    --expert \"t,weight=2,text=a smiling woman with long red hair\"\n\n  \
    # a job file (JSON) with the same fields: models, experts, uncond, sampler, ...\n  \
    mcdm sample --job job.json\n\n\
Conditions: image=PATH takes a PNG (scaled to [-1, 1]; gray gives 1 channel, RGB 3) or a\n\
safetensors file with `cond` [C, H, W] or [1 or >= N, C, H, W] (image k takes item k);\n\
embedding=PATH a safetensors file with `embedding` [D] or [1 or >= N, D];\n\
text=PROMPT (last in the spec) is encoded with all-MiniLM-L6-v2 for models with embed_dim 384 (scripts/fetch-text-model.sh gets the encoder).\n\
An unconditional term on a class-conditional model needs class=K (the null class); on an image\n\
or embedding model, a condition it is not given is zeros.\n\n\
Output: OUT/000000.png ..., OUT/grid.png, OUT/record.json (everything to reproduce the run).")]
pub struct Args {
    /// A model: NAME=PATH to safetensors weights (config: <stem>.json, then metadata, then inferred).
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    /// An expert: NAME[,class=K][,image=PATH][,embedding=PATH][,weight=W][,text=PROMPT]
    /// (weight default 1; text= comes last and takes the rest, commas included). Given, these
    /// replace a job file's experts.
    #[arg(long = "expert", value_name = "SPEC")]
    experts: Vec<String>,
    /// The unconditional term: NAME[,class=K][,image=PATH][,embedding=PATH][,text=PROMPT].
    #[arg(long, value_name = "SPEC")]
    uncond: Option<String>,
    /// A JSON job file holding models, experts, uncond and any of the options below (paths
    /// relative to the file); command-line flags override it. With no model, term or job given,
    /// the default job examples/default.json runs.
    #[arg(long)]
    job: Option<PathBuf>,
    /// The sampler (default: the job's, else ddim).
    #[arg(long, value_enum)]
    sampler: Option<Sampler>,
    /// DDIM eta, from 0 (deterministic, the default) to 1 (DDPM-like noise); DDIM only.
    #[arg(long)]
    eta: Option<f32>,
    /// Respacing: "N", sections "10,10,5" or "ddimN" (default: the unconditional model's, else 50).
    #[arg(long, conflicts_with = "steps")]
    timestep_respacing: Option<String>,
    /// Number of evenly spaced steps (same as --timestep-respacing N).
    #[arg(long)]
    steps: Option<usize>,
    /// Clip each predicted x_0 to [-1, 1] (default true).
    #[arg(long, value_name = "true|false")]
    clip_denoised: Option<bool>,
    /// Images to draw (default: the job's, else 4).
    #[arg(long)]
    num_samples: Option<usize>,
    /// Images per batch (default: all, at most 16 on the CPU and 64 on a GPU). On a GPU a batch
    /// that does not fit in memory is halved until it does.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Seed of all noise (default 0): image k is the same whatever the batch size.
    #[arg(long)]
    seed: Option<u64>,
    /// Initial noise: safetensors with `x_T` [N, 3, H, W], N = --num-samples.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Also save the final samples (before quantisation) as `samples` [N, 3, H, W] f32.
    #[arg(long)]
    save_tensor: Option<PathBuf>,
    /// Output directory (default `samples`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to run: cpu, cuda (GPU 0), cuda:N (GPU N), or auto (the GPU when one is usable,
    /// else the CPU).
    #[arg(long, default_value = "auto", value_parser = super::parse_device, value_name = "DEVICE")]
    device: DeviceArg,
    /// GPU storage type.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Enqueue every kernel of every step from the host, instead of replaying each step's model
    /// passes as one CUDA graph (the results are the same; for comparison and diagnosis).
    #[arg(long)]
    no_cuda_graph: bool,
    /// The sentence encoder for text= terms (default: $MCDM_TEXT_MODEL, then
    /// models/all-MiniLM-L6-v2).
    #[arg(long, value_name = "DIR")]
    text_model: Option<PathBuf>,
}

/// A term as written by the user, before loading.
#[derive(Clone, Debug)]
struct TermSpec {
    model: String,
    class: Option<i64>,
    image: Option<PathBuf>,
    embedding: Option<PathBuf>,
    /// A prompt, encoded with the text encoder into the embedding.
    text: Option<String>,
    weight: f32,
}

fn parse_term(spec: &str, allow_weight: bool) -> Result<TermSpec> {
    // `text=` comes last and takes the rest, commas included.
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
        bail!("`{spec}`: expected NAME[,key=value...], starting with a model name");
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
            .ok_or_else(|| anyhow!("`{spec}`: `{part}` is not key=value"))?;
        if seen.contains(&key.trim()) {
            bail!("`{spec}`: `{}` is given twice", key.trim());
        }
        seen.push(key.trim());
        match key.trim() {
            "class" => {
                term.class = Some(
                    value
                        .trim()
                        .parse()
                        .with_context(|| format!("`{spec}`: class must be an integer"))?,
                )
            }
            "image" => term.image = Some(PathBuf::from(value)),
            "embedding" => term.embedding = Some(PathBuf::from(value)),
            "weight" if allow_weight => {
                term.weight = value
                    .trim()
                    .parse()
                    .with_context(|| format!("`{spec}`: weight must be a number"))?;
                if !term.weight.is_finite() {
                    bail!("`{spec}`: weight must be finite");
                }
            }
            other => bail!(
                "`{spec}`: unknown key `{other}` (expected class, image, embedding, text{})",
                if allow_weight { ", weight" } else { "" }
            ),
        }
    }
    Ok(term)
}

/// A term from a job file's JSON object, paths relative to `base`.
fn term_from_json(v: &Value, base: &Path, allow_weight: bool) -> Result<TermSpec> {
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("expected an object, got {v}"))?;
    for key in obj.keys() {
        if !["model", "class", "image", "embedding", "text", "weight"].contains(&key.as_str())
            || (key == "weight" && !allow_weight)
        {
            bail!("unknown key `{key}` in {v}");
        }
    }
    let string = |k: &str| -> Result<Option<String>> {
        obj.get(k)
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("`{k}` must be a string in {v}"))
            })
            .transpose()
    };
    let weight = match obj.get("weight") {
        None => 1.0,
        Some(w) => match w.as_f64().map(|w| w as f32) {
            Some(w) if w.is_finite() => w,
            _ => bail!("weight must be a finite number in {v}"),
        },
    };
    Ok(TermSpec {
        model: string("model")?.ok_or_else(|| anyhow!("`model` missing in {v}"))?,
        class: obj
            .get("class")
            .map(|c| {
                c.as_i64()
                    .ok_or_else(|| anyhow!("class must be an integer in {v}"))
            })
            .transpose()?,
        image: string("image")?.map(|p| base.join(p)),
        embedding: string("embedding")?.map(|p| base.join(p)),
        text: string("text")?,
        weight,
    })
}

/// A job file's value of `key`, when present, read by `read` (None: the wrong type, reported
/// as "`key` must be `expected`").
fn job_value<T>(
    job: &serde_json::Map<String, Value>,
    key: &str,
    expected: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> Result<Option<T>> {
    job.get(key)
        .map(|v| read(v).ok_or_else(|| anyhow!("job file: `{key}` must be {expected}, got {v}")))
        .transpose()
}

/// Everything a run needs, from the job file and the flags.
struct Plan {
    models: Vec<(String, PathBuf)>,
    experts: Vec<TermSpec>,
    uncond: TermSpec,
    sampler: Sampler,
    eta: f32,
    respacing: Option<String>,
    clip_denoised: bool,
    num_samples: usize,
    /// None: the backend's default.
    batch_size: Option<usize>,
    seed: u64,
    out: PathBuf,
}

/// The built-in default job: the SynthFaces experts composed on held-back conditions.
fn default_job() -> Result<PathBuf> {
    let rel = Path::new("examples/default.json");
    [Path::new("."), Path::new(env!("CARGO_MANIFEST_DIR"))]
        .iter()
        .map(|d| d.join(rel))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("no model given and the default job examples/default.json was not found: give --model and --uncond, or --job FILE"))
}

fn plan(args: &Args) -> Result<Plan> {
    let mut job = serde_json::Map::new();
    let mut base = PathBuf::from(".");
    let nothing_given = args.job.is_none()
        && args.models.is_empty()
        && args.uncond.is_none()
        && args.experts.is_empty();
    let job_path = if nothing_given {
        Some(default_job()?)
    } else {
        args.job.clone()
    };
    if let Some(path) = &job_path {
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .with_context(|| format!("reading job file {}", path.display()))?;
        let v = mcdm::config::parse_json(&text)
            .with_context(|| format!("job file {}: not valid JSON", path.display()))?;
        job = v
            .as_object()
            .cloned()
            .ok_or_else(|| anyhow!("job file {}: expected a JSON object", path.display()))?;
        const KEYS: &[&str] = &[
            "models",
            "experts",
            "uncond",
            "sampler",
            "eta",
            "timestep_respacing",
            "steps",
            "clip_denoised",
            "num_samples",
            "batch_size",
            "seed",
            "out",
        ];
        if let Some(k) = job.keys().find(|k| !KEYS.contains(&k.as_str())) {
            bail!(
                "job file {}: unknown key `{k}` (known: {})",
                path.display(),
                KEYS.join(", ")
            );
        }
        base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    let ctx = |what: &str| format!("job file: {what}");
    let mut models: Vec<(String, PathBuf)> = match job.get("models") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    base.join(
                        v.as_str()
                            .ok_or_else(|| anyhow!("{}", ctx("model paths must be strings")))?,
                    ),
                ))
            })
            .collect::<Result<_>>()?,
        Some(_) => bail!("{}", ctx("`models` must map names to paths")),
        None => Vec::new(),
    };
    for (name, _) in &models {
        check_model_name(name).with_context(|| ctx("models"))?;
    }
    for (i, m) in args.models.iter().enumerate() {
        let (name, path) = m
            .split_once('=')
            .ok_or_else(|| anyhow!("--model `{m}`: expected NAME=PATH"))?;
        check_model_name(name).with_context(|| format!("--model `{m}`"))?;
        if path.is_empty() {
            bail!("--model `{m}`: no path after `=`");
        }
        if args.models[..i]
            .iter()
            .any(|earlier| earlier.split_once('=').is_some_and(|(n, _)| n == name))
        {
            bail!("--model {name} is given twice");
        }
        models.retain(|(n, _)| n != name);
        models.push((name.to_string(), PathBuf::from(path)));
    }
    let mut experts = match job.get("experts") {
        Some(Value::Array(a)) if args.experts.is_empty() => a
            .iter()
            .map(|e| term_from_json(e, &base, true))
            .collect::<Result<_>>()
            .with_context(|| ctx("experts"))?,
        Some(Value::Array(_)) | None => Vec::new(),
        Some(_) => bail!("{}", ctx("`experts` must be a list")),
    };
    for e in &args.experts {
        experts.push(parse_term(e, true).context("--expert")?);
    }
    let uncond = match (&args.uncond, job.get("uncond")) {
        (Some(u), _) => parse_term(u, false).context("--uncond")?,
        (None, Some(v)) => term_from_json(v, &base, false).with_context(|| ctx("uncond"))?,
        (None, None) if experts.is_empty() => bail!("nothing to sample: give --uncond NAME (and any --expert)"),
        (None, None) => bail!("give --uncond NAME: the composition eps_u + sum_i w_i (eps_i - eps_u) needs an unconditional term (a model, or a conditional model with its null condition)"),
    };
    let get_str = |k: &str| job_value(&job, k, "a string", |v| v.as_str().map(str::to_string));
    let get_u = |k: &str| job_value(&job, k, "a non-negative integer", Value::as_u64);
    let sampler = match (args.sampler, get_str("sampler")?.as_deref()) {
        (Some(s), _) => s,
        (None, Some("ddpm")) => Sampler::Ddpm,
        (None, Some("ddim") | None) => Sampler::Ddim,
        (None, Some(other)) => bail!(
            "{}",
            ctx(&format!("sampler `{other}` is unknown (ddim or ddpm)"))
        ),
    };
    let (job_steps, job_respacing) = (get_u("steps")?, get_str("timestep_respacing")?);
    if job_steps.is_some() && job_respacing.is_some() {
        bail!("{}", ctx("give `steps` or `timestep_respacing`, not both"));
    }
    let steps = args.steps.or(job_steps.map(|s| s as usize));
    if steps == Some(0) {
        bail!("--steps must be positive");
    }
    let respacing = args
        .timestep_respacing
        .clone()
        .or(steps.map(|s| s.to_string()))
        .or(job_respacing);
    let num_samples = match args.num_samples {
        Some(n) => n,
        None => get_u("num_samples")?.map_or(Ok(4), usize::try_from)?,
    };
    let batch_size = match args.batch_size {
        Some(b) => Some(b),
        None => get_u("batch_size")?.map(usize::try_from).transpose()?,
    };
    if num_samples == 0 || batch_size == Some(0) {
        bail!("--num-samples and --batch-size must be positive");
    }
    if num_samples > mcdm::rng::MAX_SAMPLES {
        bail!(
            "--num-samples {num_samples} is more than the {} images one run draws",
            mcdm::rng::MAX_SAMPLES
        );
    }
    let (eta, eta_from) = match args.eta {
        Some(e) => (Some(e), "--eta"),
        None => (
            job_value(&job, "eta", "a number", |v| v.as_f64().map(|e| e as f32))?,
            "job file: `eta`",
        ),
    };
    if let Some(e) = eta {
        if !(0.0..=1.0).contains(&e) {
            bail!("{eta_from} must be between 0 (deterministic) and 1, got {e}");
        }
        // A job's DDIM eta is dropped when --sampler ddpm overrides its sampler.
        if sampler == Sampler::Ddpm && e != 0.0 && (args.eta.is_some() || args.sampler.is_none()) {
            bail!("{eta_from} {e} is a DDIM setting: DDPM sampling has no eta");
        }
    }
    let eta = match sampler {
        Sampler::Ddim => eta.unwrap_or(0.0),
        Sampler::Ddpm => 0.0,
    };
    if get_str("out")?.is_some_and(|o| o.is_empty()) {
        bail!("{}", ctx("`out` is empty"));
    }
    let clip_denoised = match args.clip_denoised {
        Some(c) => c,
        None => job_value(&job, "clip_denoised", "true or false", Value::as_bool)?.unwrap_or(true),
    };
    Ok(Plan {
        models,
        experts,
        uncond,
        sampler,
        eta,
        respacing,
        clip_denoised,
        num_samples,
        batch_size,
        seed: args.seed.or(get_u("seed")?).unwrap_or(0),
        out: args
            .out
            .clone()
            .or(get_str("out")?.map(|o| base.join(o)))
            .unwrap_or_else(|| PathBuf::from("samples")),
    })
}

/// Reads an image condition: a PNG or safetensors `cond`, as [count, C, H, W].
fn read_image_condition(path: &Path, n: usize) -> Result<(Batched, [usize; 3])> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        let (data, c, h, w) = read_png(path)?;
        return Ok((Batched { data, count: 1 }, [c, h, w]));
    }
    let file = SafetensorsFile::open(path)?;
    let shape = file.shape("cond")?.to_vec();
    let (count, chw) = match shape[..] {
        [c, h, w] => (1, [c, h, w]),
        [k, c, h, w] if k == 1 || k >= n => (k, [c, h, w]),
        _ => bail!(
            "{}: `cond` must be [C, H, W] or [1 or at least {n}, C, H, W], got {shape:?}",
            path.display()
        ),
    };
    Ok((
        Batched {
            data: file.f32("cond")?,
            count,
        },
        chw,
    ))
}

fn read_embedding(path: &Path, n: usize) -> Result<Batched> {
    let file = SafetensorsFile::open(path)?;
    let shape = file.shape("embedding")?.to_vec();
    let count = match shape[..] {
        [_] => 1,
        [k, _] if k == 1 || k >= n => k,
        _ => bail!(
            "{}: `embedding` must be [D] or [1 or at least {n}, D], got {shape:?}",
            path.display()
        ),
    };
    Ok(Batched {
        data: file.f32("embedding")?,
        count,
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("hashing {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

pub fn run(args: Args) -> Result<()> {
    let device = open_device(args.device)?;
    let plan = plan(&args)?;
    // Fail on an unwritable output before any sampling work.
    let created: Vec<PathBuf> = plan
        .out
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("creating output directory {}", plan.out.display()))?;
    let result = check_outputs(&args, &plan).and_then(|()| sample_plan(&args, &plan, &device));
    if result.is_err() {
        // The directories this run made go again, deepest first, as long as they are empty.
        for dir in &created {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
    result
}

/// k for an image file name `NNNNNN.png` (six digits).
fn image_number(name: &str) -> Option<usize> {
    name.strip_suffix(".png")
        .filter(|stem| stem.len() == 6)
        .and_then(|stem| stem.parse().ok())
}

/// How many `NNNNNN.png` files in `dir` number `n` or more: images an earlier, larger run left.
fn earlier_images(dir: &Path, n: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| image_number(name).is_some_and(|k| k >= n))
        .count()
}

/// A model name that terms can refer to: not empty, and free of the separators of a term spec.
fn check_model_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains([',', '=']) {
        bail!("model name `{name}` must be non-empty, without `,` or `=`");
    }
    Ok(())
}

/// Every file the run writes can be written, and no two of them are the same file.
fn check_outputs(args: &Args, plan: &Plan) -> Result<()> {
    for name in ["grid.png", "record.json"] {
        check_output_file(&plan.out.join(name), "--out")?;
    }
    // The numbered images are written after sampling: one that cannot be would lose the run.
    let ours = |name: &str| image_number(name).is_some_and(|k| k < plan.num_samples);
    let entries =
        std::fs::read_dir(&plan.out).with_context(|| format!("--out {}", plan.out.display()))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ours(&name) && entry.path().is_dir() {
            bail!("--out: {} is a directory", entry.path().display());
        }
    }
    if let Some(path) = &args.save_tensor {
        check_output_file(path, "--save-tensor")?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let numbered = ours(name);
        let in_out = |dir: &Path| {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            dir.canonicalize().ok() == plan.out.canonicalize().ok()
        };
        if (numbered || name == "grid.png" || name == "record.json")
            && path.parent().is_some_and(in_out)
        {
            bail!(
                "--save-tensor {}: the run writes that file itself; choose another name",
                path.display()
            );
        }
    }
    Ok(())
}

fn sample_plan(args: &Args, plan: &Plan, device: &Device) -> Result<()> {
    let names: Vec<&str> = plan.models.iter().map(|(n, _)| n.as_str()).collect();
    let index = |name: &str| {
        names.iter().position(|n| *n == name).ok_or_else(|| {
            anyhow!(
                "unknown model `{name}`: the models are {} (give --model {name}=PATH)",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    };
    // Only models that a term uses are loaded.
    let mut used: Vec<usize> = plan
        .experts
        .iter()
        .chain([&plan.uncond])
        .map(|t| index(&t.model))
        .collect::<Result<_>>()?;
    used.sort();
    used.dedup();
    for (m, (name, path)) in plan.models.iter().enumerate() {
        if !used.contains(&m) {
            eprintln!(
                "warning: model `{name}` ({}) is not used by --uncond or any --expert: not loaded",
                path.display()
            );
        }
    }
    let mut loaded: Vec<LoadedModel> = Vec::new();
    for &m in &used {
        let (name, path) = &plan.models[m];
        loaded.push(
            load_model(path, None)
                .with_context(|| format!("loading model `{name}` from {}", path.display()))?
                .to_device(device, args.dtype.into())
                .context("uploading the models")?,
        );
    }
    let slot = |name: &str| -> Result<usize> {
        Ok(used
            .iter()
            .position(|&u| u == index(name).expect("checked"))
            .expect("loaded"))
    };
    let uncond_cfg = loaded[slot(&plan.uncond.model)?].config.unet.clone();
    let (h, w) = (uncond_cfg.image_size, uncond_cfg.image_size);

    let n = plan.num_samples;
    // Prompts are encoded once, all together.
    let prompts: Vec<&str> = plan
        .experts
        .iter()
        .chain([&plan.uncond])
        .filter_map(|t| t.text.as_deref())
        .collect();
    // On the CPU in f32 whatever --device: a few prompts take milliseconds, and a prompt gets
    // the same embedding (so the same images) on every device.
    let encoded: Vec<Vec<f32>> = if prompts.is_empty() {
        Vec::new()
    } else {
        let dir = TextEncoder::locate(args.text_model.as_deref())
            .context("text= needs the text encoder")?;
        let encoder = TextEncoder::load(&dir)
            .with_context(|| format!("loading the text model from {}", dir.display()))?;
        let flat = encoder.encode(&prompts).context("encoding the prompts")?;
        flat.chunks_exact(encoder.dim())
            .map(<[f32]>::to_vec)
            .collect()
    };
    let prompt_embedding = |t: &TermSpec| -> Result<Option<Batched>> {
        let Some(text) = &t.text else { return Ok(None) };
        if t.embedding.is_some() {
            bail!("`{}`: give text= or embedding=, not both", t.model);
        }
        let row = &encoded[prompts
            .iter()
            .position(|p| p == text)
            .expect("encoded above")];
        let want = loaded[slot(&t.model)?].config.unet.embed_dim;
        if want != Some(row.len()) {
            bail!(
                "`{}`: text= gives a {}-wide sentence embedding, but the model's embed_dim is {}",
                t.model,
                row.len(),
                want.map_or("none".to_string(), |d| d.to_string())
            );
        }
        Ok(Some(Batched {
            data: row.clone(),
            count: 1,
        }))
    };
    let condition = |t: &TermSpec| -> Result<Condition> {
        let image = match &t.image {
            Some(p) => {
                let (img, [_, ih, iw]) = read_image_condition(p, n)
                    .with_context(|| format!("image condition of `{}`", t.model))?;
                if (ih, iw) != (h, w) {
                    bail!(
                        "image condition {} of `{}` is {ih}x{iw}, but the samples are {h}x{w}",
                        p.display(),
                        t.model
                    );
                }
                Some(img)
            }
            None => None,
        };
        let embedding = match prompt_embedding(t)? {
            Some(e) => Some(e),
            None => t
                .embedding
                .as_ref()
                .map(|p| {
                    read_embedding(p, n)
                        .with_context(|| format!("embedding of `{}` from {}", t.model, p.display()))
                })
                .transpose()?,
        };
        Ok(Condition {
            class: t.class,
            image,
            embedding,
        })
    };
    let experts: Vec<Expert> = plan
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
        model: slot(&plan.uncond.model)?,
        condition: condition(&plan.uncond)?,
    };

    let model_respacing = &loaded[uncond.model].config.diffusion.timestep_respacing;
    let respacing = plan.respacing.clone().unwrap_or_else(|| {
        if model_respacing.is_empty() {
            "50".into()
        } else {
            model_respacing.clone()
        }
    });
    let spec = SampleSpec {
        sampler: match plan.sampler {
            Sampler::Ddim => SamplerKind::Ddim { eta: plan.eta },
            Sampler::Ddpm => SamplerKind::Ddpm,
        },
        timestep_respacing: Some(respacing.clone()),
        clip_denoised: plan.clip_denoised,
        seed: plan.seed,
        height: h,
        width: w,
    };
    let sampler = ComposedSampler::new(&loaded, &experts, &uncond, spec).context("composition")?;

    let init_noise = match &args.init_noise {
        Some(path) => {
            let file = SafetensorsFile::open(path)
                .with_context(|| format!("--init-noise {}", path.display()))?;
            let shape = file
                .shape("x_T")
                .with_context(|| format!("--init-noise {}", path.display()))?;
            if shape != [n, 3, h, w] {
                bail!("--init-noise {}: `x_T` is {shape:?}, expected [{n}, 3, {h}, {w}] (--num-samples {n})", path.display());
            }
            Some(file.f32("x_T")?)
        }
        None => None,
    };

    // The samples (f32), then their 8-bit images and the grid, all held at the end of the run.
    let values = n.saturating_mul(3 * h * w);
    mcdm::memory::check_host_memory(
        values.saturating_mul(std::mem::size_of::<f32>() + 2),
        &format!("the output of {n} images of {h}x{w} (samples, 8-bit copies, grid)"),
    )?;
    let steps = sampler.num_steps();
    let batch_size = plan.batch_size.unwrap_or(if device.is_cpu() {
        n.min(16)
    } else {
        n.min(64)
    });
    // Counted in image-steps, so that the bar stays right when a GPU batch is split.
    let bar = progress_bar(
        n.saturating_mul(steps),
        true,
        "{elapsed_precise} [{bar:30}] {msg} ETA {eta}",
    );
    let start = Instant::now();
    let mut image_steps = 0usize;
    // The size the first batch ran at: the requested one unless it did not fit on the GPU.
    let mut batch_used = batch_size;
    let mut on_step = |p: StepProgress| {
        image_steps += p.batch;
        if p.first == 0 {
            batch_used = p.batch;
        }
        let images_per_s =
            image_steps as f64 / steps as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let images = match p.batch {
            1 => format!("image {}", p.first + 1),
            b => format!("images {}-{}", p.first + 1, p.first + b),
        };
        bar.set_message(format!(
            "{images} of {n}, step {}/{}, {images_per_s:.2} images/s",
            p.step, p.steps
        ));
        bar.inc(p.batch as u64);
    };
    let init_noise = init_noise.as_deref();
    device.set_cuda_graphs(!args.no_cuda_graph);
    let samples = sampler
        .sample(n, batch_size, init_noise, &mut on_step)
        .map_err(|e| match e {
            mcdm::Error::OutOfMemory { .. } => {
                anyhow::Error::new(e).context("even one image at a time does not fit in GPU memory")
            }
            e => e.into(),
        })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();

    let len = 3 * h * w;
    let mut rgb = Vec::with_capacity(n);
    for (k, img) in samples.chunks_exact(len).enumerate() {
        let pixels = to_rgb8(img, h, w);
        write_png(&plan.out.join(format!("{k:06}.png")), &pixels, h, w)?;
        rgb.push(pixels);
    }
    let (g, gh, gw) = grid(&rgb, h, w, (n as f64).sqrt().ceil() as usize);
    write_png(&plan.out.join("grid.png"), &g, gh, gw)?;
    if let Some(path) = &args.save_tensor {
        write_safetensors(
            path,
            &[("samples", TensorData::F32(vec![n, 3, h, w], &samples))],
            None,
        )
        .with_context(|| format!("--save-tensor {}", path.display()))?;
    }

    let term_json = |t: &TermSpec, weight: bool| {
        let mut v = json!({ "model": t.model });
        if let Some(c) = t.class {
            v["class"] = c.into();
        }
        if let Some(p) = &t.image {
            v["image"] = json!({ "path": p.display().to_string(), "sha256": sha256_file(p).ok() });
        }
        if let Some(text) = &t.text {
            v["text"] = text.clone().into();
        }
        if let Some(p) = &t.embedding {
            v["embedding"] =
                json!({ "path": p.display().to_string(), "sha256": sha256_file(p).ok() });
        }
        if weight {
            v["weight"] = t.weight.into();
        }
        v
    };
    let mut models = BTreeMap::new();
    for (&m, model) in used.iter().zip(&loaded) {
        let (name, path) = &plan.models[m];
        models.insert(
            name.clone(),
            json!({
                "path": path.display().to_string(),
                "sha256": sha256_file(path)?,
                "config": model.config.unet.to_json(&model.config.diffusion),
            }),
        );
    }
    let record = json!({
        "mcdm_version": env!("CARGO_PKG_VERSION"),
        "formula": "eps = eps_u + sum_i w_i (eps_i - eps_u)",
        "models": models,
        "experts": plan.experts.iter().map(|t| term_json(t, true)).collect::<Vec<_>>(),
        "uncond": term_json(&plan.uncond, false),
        "sampler": match plan.sampler { Sampler::Ddim => "ddim", Sampler::Ddpm => "ddpm" },
        "eta": plan.eta,
        "timestep_respacing": respacing,
        "steps": steps,
        "clip_denoised": plan.clip_denoised,
        "seed": plan.seed,
        "num_samples": n,
        "batch_size": batch_used,
        "image_size": [h, w],
        "init_noise": args.init_noise.as_ref().map(|p| json!({ "path": p.display().to_string(), "sha256": sha256_file(p).ok() })),
        "device": device.describe(args.dtype.into()),
        "seconds": seconds,
    });
    write_atomic(
        &plan.out.join("record.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    let stale = earlier_images(&plan.out, n);
    if stale > 0 {
        eprintln!(
            "note: {} also holds {stale} numbered image(s) past {:06}.png from an earlier run, \
             not part of this one",
            plan.out.display(),
            n - 1
        );
    }
    if !device.is_cpu() {
        if batch_used < batch_size.min(n) {
            eprintln!(
                "batches of {batch_size} did not fit in GPU memory: ran batches of {batch_used}"
            );
        }
        warn_graph_failure(device);
    }
    eprintln!(
        "{n} image{} ({h}x{w}, {steps} {} steps, {} expert(s)) in {seconds:.1} s ({:.2} images/s): {}/grid.png",
        if n == 1 { "" } else { "s" },
        match plan.sampler { Sampler::Ddim => "DDIM", Sampler::Ddpm => "DDPM" },
        plan.experts.len(),
        n as f64 / seconds,
        plan.out.display()
    );
    Ok(())
}
