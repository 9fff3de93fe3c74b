//! `mcdm sample`: composed sampling from experts and an unconditional model. The job file
//! format and the reading of conditions are the library's (`mcdm::job`); this module merges a
//! job with the flags, runs it and reports, and `output` writes what it made.

pub(super) mod folder;
pub(super) mod output;
mod shard;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use mcdm::diffusion::SolverKind;
use mcdm::job::compose::{default_batch_size, Composition, Settings, Terms, DEFAULT_NUM_SAMPLES};
use mcdm::job::conditions::init_noise_warning;
use mcdm::job::overrides::{default_job_path, resolve, Overrides, Resolved, DEFAULT_JOB};
use mcdm::job::{check_expert_count, check_model_name, Sampler as JobSampler, TermSpec};
use mcdm::model::LoadedModel;
use mcdm::sample::{sample_each_across, ComposedSampler, StepProgress};
use mcdm::weights::SafetensorsFile;
use mcdm::Device;

use super::interrupt::{self, Interrupted};
use super::{
    check_output_file, open_devices, same_file, warn_graph_failure, DevicesArg, Dtype, Progress,
};
use folder::{RunFolder, GRID, RECORD};
use mcdm::files::write_atomic;
use mcdm::image::{downscale, grid, images_npz, to_rgb8, upscale, MAX_PNG_SCALE};
use mcdm::weights::{write_safetensors, TensorData};
use output::{hash_inputs, image_number, resumable, Resumable, RunRecord};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Sampler {
    /// guided-diffusion's ddim_sample (deterministic unless --eta)
    Ddim,
    /// guided-diffusion's p_sample, ancestral
    Ddpm,
    /// diffusers' DPMSolverMultistepScheduler, DPM-Solver++ order 2 (midpoint)
    #[value(name = "dpmpp-2m")]
    DpmPp2M,
    /// DPM-Solver++ order 3
    #[value(name = "dpmpp-3m")]
    DpmPp3M,
    /// diffusers' UniPCMultistepScheduler, bh2, order 2, corrector on
    Unipc,
}

impl From<Sampler> for JobSampler {
    fn from(s: Sampler) -> Self {
        match s {
            Sampler::Ddim => JobSampler::Ddim,
            Sampler::Ddpm => JobSampler::Ddpm,
            Sampler::DpmPp2M => JobSampler::Solver(SolverKind::DpmPp2M),
            Sampler::DpmPp3M => JobSampler::Solver(SolverKind::DpmPp3M),
            Sampler::Unipc => JobSampler::Solver(SolverKind::UniPc),
        }
    }
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
    /// A model: NAME=PATH to safetensors weights or a PyTorch .pt state_dict (config:
    /// <stem>.json, then metadata, then inferred), or to a diffusers UNet2DModel folder (its
    /// config.json, the schedule from scheduler_config.json).
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
    /// The sampler (default: the job's, else ddim). The solvers follow diffusers' schedulers
    /// configured with the model's betas, epsilon prediction, "linspace" timesteps,
    /// lower_order_final and final sigma 0; --clip-denoised is their thresholding at 1.
    #[arg(long, value_enum)]
    sampler: Option<Sampler>,
    /// DDIM eta, from 0 (deterministic, the default) to 1 (DDPM-like noise); DDIM only.
    #[arg(long)]
    eta: Option<f32>,
    /// Karras sigmas (rho 7) instead of evenly spaced timesteps; the solvers only.
    #[arg(long)]
    karras: bool,
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
    /// Seed of all noise (default 0): image k draws the same noise whatever the batch size.
    #[arg(long)]
    seed: Option<u64>,
    /// Initial noise: safetensors with `x_T` [N, 3, H, W], N = --num-samples (default: the
    /// job's `init_noise`, else drawn from the seed).
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Also write the images as guided-diffusion's evaluation suite reads them: an .npz with
    /// `arr_0`, uint8 [N, H, W, 3] (for a sharded run, `mcdm merge --npz` writes it).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["shard", "num_shards"])]
    npz: Option<PathBuf>,
    /// Also save the final samples (before quantisation) as `samples` [N, 3, H, W] f32.
    #[arg(long)]
    save_tensor: Option<PathBuf>,
    /// Write each PNG (and the grid) this many times larger, each pixel a square of that side
    /// (default: the job's, else 1; at most 16). The samples are unchanged.
    #[arg(long, value_name = "N")]
    png_scale: Option<usize>,
    /// Make only shard I of N of the images (from 0: images I n / N to (I + 1) n / N), into
    /// OUT/shard-I-of-N; `mcdm merge` joins the shards. Default: from RANK/WORLD_SIZE,
    /// SLURM_PROCID/SLURM_NTASKS, a Slurm job array, or JOB_COMPLETION_INDEX with --num-shards.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Keep the images a stopped run of this same job (same models by hash, conditions,
    /// sampler, seed, sizes, shard) left in the output folder, and make only the rest; a folder
    /// of another job is an error.
    #[arg(long, conflicts_with = "save_tensor")]
    resume: bool,
    /// The number of shards of a Kubernetes Indexed Job (JOB_COMPLETION_INDEX gives the index)
    /// or of a Slurm job array numbered from 0 (SLURM_ARRAY_TASK_ID gives the index, so that
    /// one task resubmitted alone, `sbatch --array=3`, is still shard 3).
    #[arg(long, value_name = "N")]
    num_shards: Option<usize>,
    /// Output directory (default `samples`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to run: cpu, cuda (GPU 0), cuda:N (GPU N), auto (the GPU when one is usable, else
    /// the CPU), or several GPUs: cuda:all (every GPU) or cuda:0,2,3 (those). Several GPUs each
    /// load the models and take whole batches in turn; the images are a one-GPU run's.
    #[arg(long, default_value = "auto", value_parser = super::parse_devices, value_name = "DEVICE")]
    device: DevicesArg,
    /// GPU storage type [default: bf16].
    #[arg(long, value_enum, value_name = "DTYPE")]
    dtype: Option<Dtype>,
    /// Enqueue every kernel of every step from the host, instead of replaying each step's model
    /// passes as one CUDA graph (the results are the same; for comparison and diagnosis).
    #[arg(long)]
    no_cuda_graph: bool,
    /// The sentence encoder for text= terms (default: $MCDM_TEXT_MODEL, then
    /// models/all-MiniLM-L6-v2).
    #[arg(long, value_name = "DIR")]
    text_model: Option<PathBuf>,
}

/// Everything a run needs, from the job file and the flags.
pub(crate) struct Plan {
    /// The job file read, if any.
    job: Option<PathBuf>,
    /// The names of the shipped models among `models` (given by neither a flag nor a job).
    shipped: Vec<String>,
    init_noise: Option<PathBuf>,
    /// The hashes a run's record (given as the job) holds for its files.
    recorded_hashes: Vec<(PathBuf, String)>,
    models: Vec<(String, PathBuf)>,
    experts: Vec<TermSpec>,
    uncond: TermSpec,
    sampler: JobSampler,
    eta: f32,
    /// Karras sigmas (a solver only).
    karras: bool,
    respacing: Option<String>,
    clip_denoised: bool,
    num_samples: usize,
    /// None: the device's default.
    batch_size: Option<usize>,
    seed: u64,
    png_scale: usize,
    /// This process's part of the run, if it is sharded.
    shard: Option<shard::Shard>,
    /// The folder this process writes: `--out`, or its shard's folder in it.
    out: PathBuf,
}

/// text= takes the rest of a term spec, commas included: a `,key=` after it is part of the
/// prompt, which is rarely what was meant.
fn warn_of_keys_in_prompt(flag: &str, spec: &str) {
    let Some((_, prompt)) = spec.split_once(",text=") else {
        return;
    };
    for key in ["class", "image", "embedding", "weight"] {
        if prompt.contains(&format!(",{key}=")) {
            report!(
                "warning: {flag} {spec}: `,{key}=` is part of the prompt, since text= takes the \
                 rest of the spec; put text= last to give {key}"
            );
        }
    }
}

/// The job file's settings with the flags' over them (the library's override rules, the flags
/// named in messages).
fn plan(args: &Args) -> Result<Plan> {
    let mut over = Overrides::default();
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
        over.models.push((name.to_string(), PathBuf::from(path)));
    }
    check_expert_count(args.experts.len(), "--expert")?;
    for e in &args.experts {
        over.experts
            .push(TermSpec::parse(e, true).context("--expert")?);
    }
    for (flag, spec) in args
        .experts
        .iter()
        .map(|e| ("--expert", e))
        .chain(args.uncond.iter().map(|u| ("--uncond", u)))
    {
        warn_of_keys_in_prompt(flag, spec);
    }
    over.uncond = args
        .uncond
        .as_ref()
        .map(|u| TermSpec::parse(u, false).context("--uncond"))
        .transpose()?;
    if args.steps == Some(0) {
        bail!("--steps must be positive");
    }
    over.sampler = args.sampler.map(JobSampler::from);
    over.eta = args.eta;
    over.karras = args.karras.then_some(true);
    over.steps = args.steps;
    over.timestep_respacing = args.timestep_respacing.clone();
    over.clip_denoised = args.clip_denoised;
    over.num_samples = args.num_samples;
    over.batch_size = args.batch_size;
    over.seed = args.seed;
    over.init_noise = args.init_noise.clone();
    if args.job.is_none() && over.names_no_term() && default_job_path().is_none() {
        bail!("no model given and the default job {DEFAULT_JOB} was not found: give --model and --uncond, or --job FILE");
    }
    let Resolved {
        job,
        file: job_path,
        shipped,
    } = resolve(args.job.as_deref(), &over)?;
    let experts = job.experts.clone().unwrap_or_default();
    let uncond = match job.uncond.clone() {
        Some(u) => u,
        None if experts.is_empty() => bail!("nothing to sample: give --uncond NAME (and any --expert)"),
        None => bail!("give --uncond NAME: the composition eps_u + sum_i w_i (eps_i - eps_u) needs an unconditional term (a model, or a conditional model with its null condition)"),
    };
    let sampler = job.sampler.unwrap_or(JobSampler::Ddim);
    let respacing = job
        .steps
        .map(|s| s.to_string())
        .or(job.timestep_respacing.clone());
    let num_samples = job.num_samples.unwrap_or(DEFAULT_NUM_SAMPLES);
    let batch_size = job.batch_size;
    if num_samples == 0 || batch_size == Some(0) {
        bail!("--num-samples and --batch-size must be positive");
    }
    if num_samples > mcdm::rng::MAX_SAMPLES {
        bail!(
            "--num-samples {num_samples} is more than the {} images one run draws",
            mcdm::rng::MAX_SAMPLES
        );
    }
    let shard = shard::find(args.shard.as_deref(), args.num_shards, &|name| {
        std::env::var(name).ok()
    })?;
    let png_scale = args.png_scale.or(job.png_scale).unwrap_or(1);
    if !(1..=MAX_PNG_SCALE).contains(&png_scale) {
        bail!("--png-scale {png_scale}: from 1 to {MAX_PNG_SCALE}");
    }
    // A job's DDIM eta was dropped if --sampler overrides its sampler.
    let eta_from = if args.eta.is_some() {
        "--eta"
    } else {
        "job file: `eta`"
    };
    if let Some(e) = job.eta {
        if !(0.0..=1.0).contains(&e) {
            bail!("{eta_from} must be between 0 (deterministic) and 1, got {e}");
        }
        if sampler != JobSampler::Ddim && e != 0.0 {
            bail!(
                "{eta_from} {e} is a DDIM setting: {} sampling has no eta",
                sampler.name()
            );
        }
    }
    let eta = match sampler {
        JobSampler::Ddim => job.eta.unwrap_or(0.0),
        JobSampler::Ddpm | JobSampler::Solver(_) => 0.0,
    };
    let karras = job.karras.unwrap_or(false);
    if karras && !matches!(sampler, JobSampler::Solver(_)) {
        bail!(
            "--karras chooses a solver's sigmas: use it with --sampler dpmpp-2m, dpmpp-3m or unipc, not {}",
            sampler.name()
        );
    }
    Ok(Plan {
        job: job_path,
        shipped,
        init_noise: job.init_noise.clone(),
        recorded_hashes: job.hashes.clone(),
        models: job.models.clone(),
        experts,
        uncond,
        sampler,
        eta,
        karras,
        respacing,
        clip_denoised: job.clip_denoised.unwrap_or(true),
        num_samples,
        batch_size,
        seed: job.seed.unwrap_or(0),
        png_scale,
        out: {
            let out = args
                .out
                .clone()
                .or(job.out)
                .unwrap_or_else(|| PathBuf::from("samples"));
            match &shard {
                Some(s) => out.join(s.folder()),
                None => out,
            }
        },
        shard,
    })
}

pub fn run(args: Args) -> Result<()> {
    // Before anything is written: a signal from here on stops the run with its folder in order.
    interrupt::catch()?;
    let devices = open_devices(&args.device)?;
    let plan = plan(&args)?;
    if let (Some(s), Some(_)) = (&plan.shard, &args.npz) {
        bail!(
            "--npz with shard {} of {} (from {}): `mcdm merge --npz` writes the whole run's",
            s.index,
            s.count,
            s.from
        );
    }
    if let Some(s) = &plan.shard {
        let images = s.images(plan.num_samples);
        report!(
            "shard {} of {} (from {}): images {}..{} of {}, into {}",
            s.index,
            s.count,
            s.from,
            images.start,
            images.end,
            plan.num_samples,
            plan.out.display()
        );
        if images.is_empty() {
            report!("this shard has no image to make: nothing to do");
            return Ok(());
        }
    }
    let created: Vec<PathBuf> = plan
        .out
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    if plan.out.exists() && !plan.out.is_dir() {
        bail!(
            "--out {}: is a file, not a folder (--out names the folder the images go to)",
            plan.out.display()
        );
    }
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("creating output directory {}", plan.out.display()))?;
    // The lock first, then every check on the folder, all before any sampling work.
    let result = RunFolder::open(&plan.out).and_then(|folder| {
        check_outputs(&args, &plan)?;
        sample_plan(&args, &plan, &devices, folder)
    });
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

/// Every file the run reads, with the flag (or job field) that named it.
fn inputs(plan: &Plan) -> Vec<(&'static str, PathBuf)> {
    let mut inputs: Vec<(&str, PathBuf)> = Vec::new();
    inputs.extend(plan.job.iter().map(|p| ("--job", p.clone())));
    inputs.extend(plan.models.iter().map(|(_, p)| ("--model", p.clone())));
    for t in plan.experts.iter().chain([&plan.uncond]) {
        inputs.extend(t.image.iter().map(|p| ("image=", p.clone())));
        inputs.extend(t.embedding.iter().map(|p| ("embedding=", p.clone())));
    }
    inputs.extend(plan.init_noise.iter().map(|p| ("--init-noise", p.clone())));
    inputs
}

/// Every file the run writes can be written, is not a file it reads, and no two of them are
/// the same file.
fn check_outputs(args: &Args, plan: &Plan) -> Result<()> {
    let owned = inputs(plan);
    let inputs: Vec<(&str, &Path)> = owned.iter().map(|(f, p)| (*f, p.as_path())).collect();
    for name in [GRID, RECORD] {
        check_output_file(&plan.out.join(name), "--out", &inputs)?;
    }
    // The numbered images of an earlier run are replaced or removed when this one ends.
    let entries =
        std::fs::read_dir(&plan.out).with_context(|| format!("--out {}", plan.out.display()))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if image_number(&name).is_some() {
            check_output_file(&entry.path(), "--out", &inputs)?;
        }
    }
    if let Some(path) = &args.npz {
        check_output_file(path, "--npz", &inputs)?;
    }
    if let Some(path) = &args.save_tensor {
        check_output_file(path, "--save-tensor", &inputs)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let in_out = |dir: &Path| {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            same_file(dir, &plan.out)
        };
        if (image_number(name).is_some() || name == GRID || name == RECORD)
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

/// Says so when the record replayed as the job gives `path` another hash than `hash`: the run
/// then reads other bytes than the recorded one did.
fn warn_if_not_recorded(plan: &Plan, path: &Path, hash: Option<&str>, what: &str) {
    let recorded = plan.recorded_hashes.iter().find(|(p, _)| p == path);
    if let (Some((_, want)), Some(got)) = (recorded, hash) {
        if want != got {
            report!(
                "warning: {what} {}: not the file the recorded run read (sha256 {got}, the \
                 record says {want})",
                path.display()
            );
        }
    }
}

fn sample_plan(args: &Args, plan: &Plan, devices: &[Device], folder: RunFolder) -> Result<()> {
    let device = &devices[0];
    let dtype = super::storage_dtype(args.dtype, Dtype::Bf16, device);
    let terms = Terms {
        models: &plan.models,
        experts: &plan.experts,
        uncond: &plan.uncond,
    };
    let n = plan.num_samples;
    // Each device has its own copy of the models, loaded from their files once.
    let compositions =
        Composition::load_across(terms, n, devices, dtype.into(), args.text_model.as_deref())?;
    let composition = &compositions[0];
    for name in &composition.unused {
        if !plan.shipped.contains(name) {
            let (_, path) = plan
                .models
                .iter()
                .find(|(n, _)| n == name)
                .expect("a model");
            report!(
                "warning: model `{name}` ({}) is not used by --uncond or any --expert: not loaded",
                path.display()
            );
        }
    }
    for ((name, path), model) in composition.sources.iter().zip(&composition.models) {
        warn_if_not_recorded(plan, path, model.sha256(), &format!("model `{name}`"));
    }
    for w in &composition.warnings {
        report!("warning: {w}");
    }
    let [h, w] = composition.size;
    let spec = composition.spec(&Settings {
        sampler: plan.sampler,
        eta: plan.eta,
        karras: plan.karras,
        timestep_respacing: plan.respacing.clone(),
        clip_denoised: plan.clip_denoised,
        seed: plan.seed,
    });
    let respacing = spec.timestep_respacing.clone().expect("resolved");
    let samplers: Vec<ComposedSampler> = compositions
        .iter()
        .map(|c| c.sampler(spec.clone()))
        .collect::<mcdm::Result<_>>()?;
    let sampler = &samplers[0];
    let text_model = composition.text_model.clone();

    let init_noise = match &plan.init_noise {
        Some(path) => {
            let file = SafetensorsFile::open(path)
                .with_context(|| format!("--init-noise {}", path.display()))?;
            let shape = file
                .shape("x_T")
                .with_context(|| format!("--init-noise {}", path.display()))?;
            if shape != [n, 3, h, w] {
                bail!("--init-noise {}: `x_T` is {shape:?}, expected [{n}, 3, {h}, {w}] (--num-samples {n})", path.display());
            }
            let noise = file.f32("x_T")?;
            if let Some(w) = init_noise_warning(path, &noise) {
                report!("warning: --init-noise: {w}");
            }
            Some(noise)
        }
        None => None,
    };
    let input_paths = plan
        .experts
        .iter()
        .chain([&plan.uncond])
        .flat_map(|t| t.image.iter().chain(&t.embedding))
        .chain(&plan.init_noise)
        .map(PathBuf::as_path);
    let input_hashes = hash_inputs(input_paths)?;
    for (path, hash) in &input_hashes {
        warn_if_not_recorded(plan, path, Some(hash), "input");
    }

    if let Some(signal) = interrupt::requested() {
        return Err(Interrupted {
            signal,
            message: format!(
                "stopped before sampling; {} is unchanged",
                plan.out.display()
            ),
        }
        .into());
    }
    // The 8-bit images (for the grid) and, for --save-tensor, the samples, held to the end.
    let values = n.saturating_mul(3 * h * w);
    let per_value = 2 + if args.save_tensor.is_some() { 4 } else { 0 };
    mcdm::memory::check_host_memory(
        values.saturating_mul(per_value),
        &format!("the output of {n} images of {h}x{w} (8-bit copies, grid, any --save-tensor)"),
    )?;
    let steps = sampler.num_steps();
    // This process's images: all, or its shard's.
    let images = plan.shard.as_ref().map_or(0..n, |s| s.images(n));
    let used_models: Vec<(&(String, PathBuf), &LoadedModel)> = composition
        .sources
        .iter()
        .zip(&composition.models)
        .collect();
    let device_name = match devices.len() {
        1 => device.describe(dtype.into()),
        k => format!("{k} x {}", device.describe(dtype.into())),
    };
    let record_of = |done: usize, batch_used: usize, seconds: f64| {
        RunRecord {
            plan,
            init_noise: plan.init_noise.as_deref(),
            models: &used_models,
            respacing: &respacing,
            steps,
            batch_used,
            size: [h, w],
            device: device_name.clone(),
            seconds,
            input_hashes: &input_hashes,
            text_model: text_model.as_deref(),
        }
        .record(images.start, done)
    };
    // What a stopped run of this same job left in the folder, kept with --resume.
    let kept = resumable(&plan.out, &record_of(0, 0, 0.0)?)?;
    let kept = match (args.resume, kept) {
        (true, Resumable::Images(k)) => k,
        (true, Resumable::OtherJob(why)) => bail!(
            "--resume: {} holds a run of another job ({why}); without --resume this run \
             replaces it",
            plan.out.display()
        ),
        (true, Resumable::Nothing) => {
            report!(
                "--resume: {} holds no run of this job: making every image",
                plan.out.display()
            );
            0
        }
        (false, Resumable::Images(k)) if k > 0 => {
            report!(
                "note: {} holds {k} image(s) of this job from a stopped run: this run makes them \
                 again (--resume keeps them)",
                plan.out.display()
            );
            0
        }
        (false, _) => 0,
    };
    let todo = images.start + kept..images.end;
    let mine = images.len();
    let batch_size = plan
        .batch_size
        .unwrap_or_else(|| default_batch_size(todo.len(), device));
    // Counted in image-steps, so that the bar stays right when a GPU batch is split. Several
    // devices report their steps from their own threads.
    let progress = Mutex::new((
        Progress::new(
            todo.len().saturating_mul(steps),
            true,
            "{elapsed_precise} [{bar:30}] ETA {eta} {wide_msg}",
        ),
        0usize,
    ));
    let start = Instant::now();
    // The size the first batch ran at: the requested one unless it did not fit on the GPU.
    let batch_used = AtomicUsize::new(batch_size);
    let on_step = |_device: usize, p: StepProgress| {
        let mut guard = progress.lock().expect("the progress bar");
        let (progress, image_steps) = &mut *guard;
        *image_steps += p.batch;
        if p.first == todo.start {
            batch_used.store(p.batch, Ordering::Relaxed);
        }
        let images_per_s =
            *image_steps as f64 / steps as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let images = match p.batch {
            1 => format!("image {}", p.first + 1),
            b => format!("images {}-{}", p.first + 1, p.first + b),
        };
        progress.advance(p.batch as u64, || {
            format!(
                "{images} of {n}, step {}/{}, {images_per_s:.2} images/s",
                p.step, p.steps
            )
        });
        match interrupt::requested() {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    };
    // Each finished batch's images are staged, then published with a partial record, so that
    // a run stopped in any way keeps them.
    let mut rgb: Vec<Vec<u8>> = Vec::new();
    // The kept images, read back for the grid.
    for k in images.start..todo.start {
        let (pixels, ph, pw) = mcdm::image::read_rgb8(&plan.out.join(folder::image_name(k)))?;
        rgb.push(downscale(&pixels, ph, pw, plan.png_scale));
    }
    let mut samples: Vec<f32> = Vec::new();
    let mut removed = 0;
    let mut on_batch = |first: usize, x0: &[f32]| -> Result<()> {
        let s = plan.png_scale;
        for (k, img) in x0.chunks_exact(3 * h * w).enumerate() {
            let pixels = to_rgb8(img, h, w);
            folder
                .stage_image(first + k, &upscale(&pixels, h, w, s), s * h, s * w)
                .with_context(|| format!("writing image {}", first + k))?;
            rgb.push(pixels);
        }
        if args.save_tensor.is_some() {
            samples.extend_from_slice(x0);
        }
        let done = first + x0.len() / (3 * h * w) - images.start;
        let seconds = start.elapsed().as_secs_f64();
        let mut record = record_of(done, batch_used.load(Ordering::Relaxed), seconds)?;
        removed += folder.publish(
            images.start..images.start + done,
            &mut record,
            "partial",
            false,
        )?;
        Ok(())
    };
    for d in devices {
        d.set_cuda_graphs(!args.no_cuda_graph);
    }
    let mut failure = None;
    let done = if todo.is_empty() {
        0
    } else {
        sample_each_across(
            &samplers,
            todo.clone(),
            batch_size,
            init_noise.as_deref(),
            &on_step,
            &mut |first, x0| {
                on_batch(first, x0).map_err(|e| {
                    let message = format!("{e:#}");
                    failure = Some(e);
                    mcdm::Error::Input(message)
                })
            },
        )
        .map_err(|e| match (failure.take(), e) {
            (Some(cause), _) => cause,
            (None, e @ mcdm::Error::OutOfMemory { .. }) => {
                anyhow::Error::new(e).context("even one image at a time does not fit in GPU memory")
            }
            (None, e) => e.into(),
        })?
    };
    progress.into_inner().expect("the progress bar").0.finish();
    let seconds = start.elapsed().as_secs_f64();
    let finished = kept + done;
    if finished == 0 {
        let signal = interrupt::requested().unwrap_or(libc::SIGINT);
        return Err(Interrupted {
            signal,
            message: format!("no image was finished; {} is unchanged", plan.out.display()),
        }
        .into());
    }

    let (g, gh, gw) = grid(&rgb, h, w, (finished as f64).sqrt().ceil() as usize);
    let s = plan.png_scale;
    folder.stage_grid(&upscale(&g, gh, gw, s), s * gh, s * gw)?;
    if let Some(path) = &args.save_tensor {
        write_safetensors(
            path,
            &[("samples", TensorData::F32(vec![done, 3, h, w], &samples))],
            None,
        )
        .with_context(|| format!("--save-tensor {}", path.display()))?;
    }
    let mut record = record_of(finished, batch_used.load(Ordering::Relaxed), seconds)?;
    let status = if finished < mine {
        "partial"
    } else {
        "complete"
    };
    removed += folder.commit(images.start..images.start + finished, &mut record, status)?;
    if removed > 0 {
        report!(
            "note: {} held an earlier run: removed its {removed} image(s) that this one does not \
             make",
            plan.out.display()
        );
    }
    if finished < mine {
        let signal = interrupt::requested().unwrap_or(libc::SIGINT);
        return Err(Interrupted {
            signal,
            message: format!(
                "kept the {finished} finished image(s) of {mine} in {} (its record.json says \
                 \"partial\"); the same command with --resume makes the rest",
                plan.out.display()
            ),
        }
        .into());
    }
    let batch_used = batch_used.load(Ordering::Relaxed);
    if let Some(path) = &args.npz {
        write_atomic(path, &images_npz(&rgb.concat(), [n, h, w, 3])?)
            .with_context(|| format!("--npz {}", path.display()))?;
    }
    if !device.is_cpu() {
        if batch_used < batch_size.min(mine) {
            report!(
                "batches of {batch_size} did not fit in GPU memory: ran batches of {batch_used}"
            );
        }
        for d in devices {
            warn_graph_failure(d);
        }
    }
    report!(
        "{done} image{} ({h}x{w}, {steps} {} steps, {} expert(s)) in {seconds:.1} s ({:.2} images/s){}: {}/grid.png",
        if done == 1 { "" } else { "s" },
        plan.sampler.name().to_uppercase(),
        plan.experts.len(),
        done as f64 / seconds,
        if kept > 0 { format!(", {kept} kept from the stopped run") } else { String::new() },
        plan.out.display()
    );
    Ok(())
}
