//! `mcdm bench`: forward-pass throughput of a config with random weights.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use mcdm::config::{resolve, PartialConfig, ResolvedConfig, Source};
use mcdm::cuda::{Gpu, KernelTime};
use mcdm::device::Workspace;
use mcdm::files::{read_string_limited, JSON_LIMIT};
use mcdm::memory::check_host_memory;
use mcdm::model::{Conditioning, LoadedModel};
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, StepProgress,
    Unconditional, MAX_EXPERTS,
};
use mcdm::{DType, Device};

use super::{check_output_file, config_arg, open_device, warn_graph_failure, DeviceArg, Dtype};

/// Time UNet forward passes (random weights) for a config at several batch sizes.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    mcdm bench --config tools/configs/bench-cpu.json --batch 1,16 --output benches/results/cpu.json\n\n\
    Compare with the same config in PyTorch: python tools/bench_torch.py tools/configs/bench-cpu.json")]
pub struct Args {
    /// Model config (JSON, guided-diffusion flag names).
    #[arg(long, required_unless_present = "kernels")]
    config: Option<PathBuf>,
    /// Time single GPU kernels instead (conv, attention, group norm, upsampling, skip
    /// concatenation, the embedding projection; fixed shapes of the ImageNet-64 ADM and
    /// 256x256 face workloads, no --config needed), in TFLOP/s or GB/s and as a share of this
    /// GPU's measured peaks (tensor-core or FMA throughput, copy bandwidth); each the median of
    /// --iters runs timed by CUDA events.
    #[arg(long)]
    kernels: bool,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Timed forward passes per batch size (after one warm-up pass).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where to run: cpu, cuda (GPU 0), cuda:N (GPU N), or auto (the GPU when one is usable,
    /// else the CPU).
    #[arg(long, default_value = "auto", value_parser = super::parse_device, value_name = "DEVICE")]
    device: DeviceArg,
    /// GPU storage type [default: bf16].
    #[arg(long, value_enum, value_name = "DTYPE")]
    dtype: Option<Dtype>,
    /// Time composed sampling instead: this many experts (random models of the config) plus an
    /// unconditional model, every step evaluating all of them.
    #[arg(long, default_value_t = 0)]
    compose: usize,
    /// DDIM steps of a composed run.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// In a composed run, enqueue every kernel from the host instead of replaying each step's
    /// model passes as one CUDA graph (to measure what the graphs save).
    #[arg(long)]
    no_cuda_graph: bool,
    /// After timing each batch size, run one more forward pass with every kernel launch timed
    /// by CUDA events and show where the time goes (GPU only). A kernel's time runs from just
    /// before its launch to its end, so where the host cannot keep the GPU busy (small
    /// batches) it includes the launch latency.
    #[arg(long)]
    profile: bool,
}

/// Bounds that keep an impossible request from exhausting memory before it can fail clearly.
const MAX_BATCH: usize = 4096;
const MAX_STEPS: usize = 10_000;

pub fn run(args: Args) -> Result<()> {
    let device = open_device(args.device)?;
    let dtype = super::storage_dtype(args.dtype, Dtype::Bf16, &device);
    if args.iters == 0 || args.batch.contains(&0) {
        bail!("--iters and every --batch must be positive");
    }
    if let Some(n) = args.batch.iter().find(|&&n| n > MAX_BATCH) {
        bail!("--batch {n}: a benchmark batch is at most {MAX_BATCH} images");
    }
    if args.compose > MAX_EXPERTS {
        bail!("--compose {}: at most {MAX_EXPERTS} experts", args.compose);
    }
    if args.steps > MAX_STEPS {
        bail!("--steps {}: at most {MAX_STEPS}", args.steps);
    }
    if let Some(path) = &args.output {
        let config = args.config.as_deref().map(|p| ("--config", p));
        check_output_file(path, "--output", config.as_slice())?;
    }
    if args.profile && (device.is_cpu() || args.kernels || args.compose > 0) {
        bail!("--profile times the kernels of a forward pass: use it with --config on a GPU, without --kernels or --compose");
    }
    if args.kernels {
        let Some(gpu) = device.gpu() else {
            bail!("--kernels times GPU kernels: use --device cuda on a machine with a GPU");
        };
        return bench_kernels(gpu, dtype.into(), args.iters);
    }
    let config = config_arg(&args.config)?.expect("clap requires --config without --kernels");
    let text =
        read_string_limited(config, JSON_LIMIT, "config file").context("reading --config")?;
    let partial =
        PartialConfig::from_json(&text).with_context(|| format!("config {}", config.display()))?;
    let source = Source::File(config.display().to_string());
    let cfg = resolve(&[(source, partial)], &Default::default())?;
    if args.compose > 0 {
        return run_compose(&args, cfg, &device, dtype);
    }
    let model = LoadedModel::random(cfg.clone(), 0, "random model")?
        .to_device(&device, dtype.into())
        .context("uploading the model")?;
    let device_name = match &device {
        Device::Cpu => format!("cpu, {} threads", rayon::current_num_threads()),
        Device::Cuda(gpu) => format!("{}, {:?}", gpu.info().name, dtype),
    };
    let mut ws = Workspace::new();
    let mut forward = |x: &[f32], shape: [usize; 4], cond: &Conditioning<'_>| -> Result<()> {
        model.forward_nchw(x, shape, cond, &mut ws)?;
        if let Some(gpu) = device.gpu() {
            gpu.synchronize()?;
        }
        Ok(())
    };
    let size = cfg.unet.image_size;
    let gflop = model.flops_per_image(size, size) / 1e9;
    report!(
        "config {} ({:.1} M parameters, {gflop:.2} GFLOP per image at {size}x{size}), {device_name}",
        config.display(),
        model.parameters() as f64 / 1e6
    );
    say!("| batch | s / forward | ms / image | images / s | GFLOP/s |");
    say!("|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    for &n in &args.batch {
        let c = cfg.unet.in_channels;
        let x_bytes = n
            .saturating_mul(c * size * size)
            .saturating_mul(std::mem::size_of::<f32>());
        check_host_memory(x_bytes, &format!("--batch {n}: the input"))?;
        let x: Vec<f32> = (0..n * c * size * size)
            .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        let t: Vec<f32> = (0..n).map(|i| (i * 37 % 1000) as f32).collect();
        let labels = cfg
            .unet
            .num_classes
            .map(|k| (0..n).map(|i| (i % k) as i64).collect::<Vec<_>>());
        let emb = cfg.unet.embed_dim.map(|d| vec![0.1f32; n * d]);
        let cond = Conditioning {
            timesteps: &t,
            labels: labels.as_deref(),
            embedding: emb.as_deref(),
        };
        forward(&x, [n, c, size, size], &cond)?;
        let mut times = Vec::new();
        for _ in 0..args.iters {
            let start = Instant::now();
            forward(&x, [n, c, size, size], &cond)?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        say!(
            "| {n} | {median:.4} | {:.2} | {:.2} | {:.1} |",
            median * 1e3 / n as f64,
            n as f64 / median,
            gflop * n as f64 / median
        );
        let mut row = serde_json::json!({
            "batch": n, "seconds_per_forward": median, "images_per_second": n as f64 / median,
            "times": times,
        });
        if let (true, Some(gpu)) = (args.profile, device.gpu()) {
            gpu.profile_start()?;
            forward(&x, [n, c, size, size], &cond)?;
            let kernels = gpu.profile_finish()?;
            row["profile"] = serde_json::json!(kernels
                .iter()
                .map(|k| serde_json::json!({
                    "file": k.file, "kernel": k.name, "launches": k.launches, "ms": k.ms,
                }))
                .collect::<Vec<_>>());
            profiles.push((n, median, kernels));
        }
        rows.push(row);
    }
    for (n, seconds, kernels) in &profiles {
        print_profile(*n, *seconds, kernels)?;
    }
    write_record(&args, &device_name, &cfg, gflop, rows)
}

/// Where one forward pass of `n` images spends its GPU time: per kernel family (the file under
/// `kernels/`), then the kernels that take the most.
fn print_profile(n: usize, seconds: f64, kernels: &[KernelTime]) -> Result<()> {
    let total: f64 = kernels.iter().map(|k| k.ms).sum();
    let share = |ms: f64| 100.0 * ms / total.max(1e-12);
    say!(
        "\nbatch {n}: the kernels of one forward pass took {total:.2} ms (each from just before \
         its launch to its end); the timed forward pass, with uploads and downloads, {:.2} ms\n",
        seconds * 1e3
    );
    let mut families: Vec<(&str, usize, f64)> = Vec::new();
    for k in kernels {
        match families.iter_mut().find(|f| f.0 == k.file) {
            Some(f) => {
                f.1 += k.launches;
                f.2 += k.ms;
            }
            None => families.push((&k.file, k.launches, k.ms)),
        }
    }
    families.sort_by(|a, b| b.2.total_cmp(&a.2));
    say!("| kernels/ | launches | ms | share |");
    say!("|---|---:|---:|---:|");
    for (file, launches, ms) in &families {
        say!("| {file}.cu | {launches} | {ms:.3} | {:.1}% |", share(*ms));
    }
    say!("\n| kernel | launches | ms | share |");
    say!("|---|---:|---:|---:|");
    for k in kernels.iter().take(12) {
        say!(
            "| {} | {} | {:.3} | {:.1}% |",
            k.name,
            k.launches,
            k.ms,
            share(k.ms)
        );
    }
    Ok(())
}

fn write_record(
    args: &Args,
    device: &str,
    cfg: &ResolvedConfig,
    gflop: f64,
    rows: Vec<serde_json::Value>,
) -> Result<()> {
    if let Some(path) = &args.output {
        // The switches that choose kernels and fusions, as this run saw them.
        let switches: std::collections::BTreeMap<_, _> = [
            "MCDM_CONV_KERNEL",
            "MCDM_FOLD_COPIES",
            "MCDM_NORM_STATS_IN_CONV",
            "MCDM_NORM_APPLY_IN_CONV",
        ]
        .map(|k| (k, std::env::var(k).ok()))
        .into_iter()
        .collect();
        let record = serde_json::json!({
            "tool": format!("mcdm {}", env!("CARGO_PKG_VERSION")),
            "device": device,
            "config": cfg.unet.to_json(&cfg.diffusion),
            "gflop_per_image": gflop,
            "compose_experts": args.compose,
            "steps": args.steps,
            "environment": switches,
            "results": rows,
        });
        mcdm::files::write_atomic(path, serde_json::to_string_pretty(&record)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Composed DDIM sampling with `--compose` random experts plus an unconditional model.
fn run_compose(args: &Args, cfg: ResolvedConfig, device: &Device, dtype: Dtype) -> Result<()> {
    let size = cfg.unet.image_size;
    // Models go to the device once; each timed run then samples with everything resident.
    let models: Vec<LoadedModel> = (0..=args.compose)
        .map(|i| {
            LoadedModel::random(cfg.clone(), i as u64, &format!("random model {i}"))?
                .to_device(device, dtype.into())
        })
        .collect::<mcdm::Result<_>>()
        .context("uploading the models")?;
    let condition = |i: usize| Condition {
        class: cfg.unet.num_classes.map(|k| (i % k) as i64),
        image: (cfg.unet.in_channels > 3).then(|| Batched {
            data: vec![0.5; (cfg.unet.in_channels - 3) * size * size],
            count: 1,
        }),
        embedding: cfg.unet.embed_dim.map(|d| Batched {
            data: vec![0.1; d],
            count: 1,
        }),
    };
    let experts: Vec<Expert> = (1..=args.compose)
        .map(|m| Expert {
            model: m,
            condition: condition(m),
            weight: 1.0,
        })
        .collect();
    let uncond = Unconditional {
        model: 0,
        condition: condition(0),
    };
    let spec = SampleSpec {
        sampler: SamplerKind::Ddim { eta: 0.0 },
        timestep_respacing: Some(args.steps.to_string()),
        clip_denoised: true,
        seed: 0,
        height: size,
        width: size,
    };
    let sampler = ComposedSampler::new(&models, &experts, &uncond, spec)?;
    let gflop = models[0].flops_per_image(size, size) / 1e9;
    let device_name = match device {
        Device::Cpu => format!("cpu, {} threads", rayon::current_num_threads()),
        Device::Cuda(gpu) => {
            gpu.set_cuda_graphs(!args.no_cuda_graph);
            let graphs = if args.no_cuda_graph {
                "no CUDA graphs"
            } else {
                "CUDA graphs"
            };
            format!("{}, {:?}, {graphs}", gpu.info().name, dtype)
        }
    };
    report!(
        "composed DDIM: {} expert(s) + unconditional, {} steps, {gflop:.2} GFLOP per image per forward, {device_name}",
        args.compose, args.steps
    );
    // Returns the batch size that ran: smaller than n when n did not fit in GPU memory.
    let run = |n: usize| -> Result<usize> {
        let mut ran = 0;
        let mut on_step = |p: StepProgress| ran = ran.max(p.batch);
        sampler.sample(n, n, None, &mut on_step)?;
        Ok(ran)
    };
    // What the host enqueued in the last timed run: every kernel, or, with CUDA graphs, the
    // first steps' kernels and a graph launch for each later step.
    let launches = || match device {
        Device::Cpu => (0, 0),
        Device::Cuda(g) => (g.kernel_launches(), g.graph_launches()),
    };
    say!("| batch | s / run | images / s | GFLOP/s | host launches / run |");
    say!("|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    for &n in &args.batch {
        let ran = run(n)?;
        let mut times = Vec::new();
        let mut per_run = (0, 0);
        for _ in 0..args.iters {
            let before = launches();
            let start = Instant::now();
            run(n)?;
            times.push(start.elapsed().as_secs_f64());
            let after = launches();
            per_run = (after.0 - before.0, after.1 - before.1);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let forwards = (args.compose + 1) * args.steps * n;
        let batch = if ran < n {
            format!("{n} (in batches of {ran}: {n} does not fit)")
        } else {
            n.to_string()
        };
        let host = match device {
            Device::Cpu => "n/a".to_string(),
            Device::Cuda(_) => format!("{} kernels + {} graphs", per_run.0, per_run.1),
        };
        say!(
            "| {batch} | {median:.4} | {:.2} | {:.1} | {host} |",
            n as f64 / median,
            gflop * forwards as f64 / median
        );
        rows.push(serde_json::json!({ "batch": n, "batch_ran": ran, "seconds_per_run": median, "images_per_second": n as f64 / median, "times": times, "kernel_launches": per_run.0, "graph_launches": per_run.1 }));
    }
    warn_graph_failure(device);
    write_record(args, &device_name, &cfg, gflop, rows)
}

/// The kernel table: the device's peaks, then every kernel as it is timed.
fn bench_kernels(gpu: &Gpu, dtype: DType, iters: usize) -> Result<()> {
    use mcdm::bench::kernels::{measure_peaks, time_kernels, Unit};
    use mcdm::bench::peak::BLOCK;
    let peaks = measure_peaks(gpu, dtype, iters)?;
    say!("| device peak | measured by | rate |");
    say!("|---|---|---:|");
    say!(
        "| {} | `{}` kernels/peak.cu, {} blocks x {BLOCK} threads, {} rounds | {:.1} TFLOP/s |",
        peaks.instruction,
        peaks.kernel,
        peaks.blocks,
        peaks.rounds,
        peaks.tflops
    );
    say!(
        "| DRAM copy | `copy_u4` kernels/peak.cu, 2 x {:.2} GiB | {:.0} GB/s |",
        peaks.copy_bytes as f64 / (1u64 << 30) as f64,
        peaks.gbs
    );
    say!("\n| kernel | shape | ms | rate | of peak |");
    say!("|---|---|---:|---:|---:|");
    // Rows are printed as they are timed; the first failed write ends the command after.
    let mut written = Ok(());
    time_kernels(gpu, dtype, iters, &peaks, &mut |row| {
        let rate = match row.unit {
            Unit::Tflops => format!("{:.1} TFLOP/s", row.rate),
            Unit::Gbs => format!("{:.0} GB/s", row.rate),
        };
        if written.is_ok() {
            written = super::write_line(
                &mut std::io::stdout().lock(),
                format_args!(
                    "| {} | {} | {:.3} | {rate} | {:.0}% |",
                    row.kernel,
                    row.shape,
                    row.ms,
                    100.0 * row.share
                ),
            );
        }
    })?;
    written.context("writing to standard output")
}
