//! `mcdm bench`: forward-pass throughput of a config with random weights.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use mcdm::config::{resolve, PartialConfig, ResolvedConfig, Source};
use mcdm::cuda::{Gpu, GpuFloat, KernelTime};
use mcdm::memory::check_host_memory;
use mcdm::model::{Conditioning, GpuUNet, GpuWorkspace, LoadedModel, UNet, Workspace};
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, StepProgress,
    Unconditional,
};

use super::{backend, check_output_file, config_arg, warn_graph_failure, Backend, Device, Dtype};

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
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// GPU storage type.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
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
const MAX_COMPOSE: usize = 64;
const MAX_STEPS: usize = 10_000;

/// Where the timed forward passes run: the CPU, or the GPU in one storage type.
enum Runner {
    Cpu(Workspace),
    Bf16(GpuUNet<half::bf16>, GpuWorkspace<half::bf16>),
    F16(GpuUNet<half::f16>, GpuWorkspace<half::f16>),
    F32(GpuUNet<f32>, GpuWorkspace<f32>),
}

fn run_gpu<T: GpuFloat>(
    dev: &GpuUNet<T>,
    ws: &mut GpuWorkspace<T>,
    unet: &UNet,
    x: &[f32],
    shape: [usize; 4],
    cond: &Conditioning<'_>,
    gpu: &Gpu,
) -> Result<()> {
    dev.forward_nchw(unet, x, shape, cond, ws)?;
    gpu.synchronize()?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let backend = backend(args.device)?;
    if args.iters == 0 || args.batch.contains(&0) {
        bail!("--iters and every --batch must be positive");
    }
    if let Some(n) = args.batch.iter().find(|&&n| n > MAX_BATCH) {
        bail!("--batch {n}: a benchmark batch is at most {MAX_BATCH} images");
    }
    if args.compose > MAX_COMPOSE {
        bail!("--compose {}: at most {MAX_COMPOSE} experts", args.compose);
    }
    if args.steps > MAX_STEPS {
        bail!("--steps {}: at most {MAX_STEPS}", args.steps);
    }
    if let Some(path) = &args.output {
        check_output_file(path, "--output")?;
    }
    if args.profile && (matches!(backend, Backend::Cpu) || args.kernels || args.compose > 0) {
        bail!("--profile times the kernels of a forward pass: use it with --config on a GPU, without --kernels or --compose");
    }
    if args.kernels {
        let Backend::Cuda(gpu) = &backend else {
            bail!("--kernels times GPU kernels: use --device cuda on a machine with a GPU");
        };
        return match args.dtype {
            Dtype::Bf16 => bench_kernels::<half::bf16>(gpu, args.iters),
            Dtype::F16 => bench_kernels::<half::f16>(gpu, args.iters),
            Dtype::F32 => bench_kernels::<f32>(gpu, args.iters),
        };
    }
    let config = config_arg(&args.config)?.expect("clap requires --config without --kernels");
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let partial =
        PartialConfig::from_json(&text).with_context(|| format!("config {}", config.display()))?;
    let source = Source::File(config.display().to_string());
    let cfg = resolve(&[(source, partial)], &Default::default())?;
    if args.compose > 0 {
        return run_compose(&args, cfg, &backend);
    }
    let unet = UNet::random(&cfg.unet, 0)?;
    let (device_name, mut runner) = match &backend {
        Backend::Cpu => (
            format!("cpu, {} threads", rayon::current_num_threads()),
            Runner::Cpu(Workspace::new()),
        ),
        Backend::Cuda(gpu) => (
            format!("{}, {:?}", gpu.info().name, args.dtype),
            match args.dtype {
                Dtype::Bf16 => Runner::Bf16(
                    GpuUNet::upload(&unet, gpu.clone())?,
                    GpuWorkspace::default(),
                ),
                Dtype::F16 => Runner::F16(
                    GpuUNet::upload(&unet, gpu.clone())?,
                    GpuWorkspace::default(),
                ),
                Dtype::F32 => Runner::F32(
                    GpuUNet::upload(&unet, gpu.clone())?,
                    GpuWorkspace::default(),
                ),
            },
        ),
    };
    let mut forward = |x: &[f32], shape: [usize; 4], cond: &Conditioning<'_>| -> Result<()> {
        match (&mut runner, &backend) {
            (Runner::Cpu(ws), _) => unet
                .forward_nchw(x, shape, cond, ws)
                .map(|_| ())
                .map_err(Into::into),
            (Runner::Bf16(d, ws), Backend::Cuda(g)) => run_gpu(d, ws, &unet, x, shape, cond, g),
            (Runner::F16(d, ws), Backend::Cuda(g)) => run_gpu(d, ws, &unet, x, shape, cond, g),
            (Runner::F32(d, ws), Backend::Cuda(g)) => run_gpu(d, ws, &unet, x, shape, cond, g),
            _ => unreachable!("runner and backend are made together"),
        }
    };
    let size = cfg.unet.image_size;
    let gflop = unet.flops_per_image(size, size) / 1e9;
    eprintln!(
        "config {} ({:.1} M parameters, {gflop:.2} GFLOP per image at {size}x{size}), {device_name}",
        config.display(),
        unet.parameters() as f64 / 1e6
    );
    println!("| batch | s / forward | ms / image | images / s | GFLOP/s |");
    println!("|---:|---:|---:|---:|---:|");
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
        println!(
            "| {n} | {median:.4} | {:.2} | {:.2} | {:.1} |",
            median * 1e3 / n as f64,
            n as f64 / median,
            gflop * n as f64 / median
        );
        let mut row = serde_json::json!({
            "batch": n, "seconds_per_forward": median, "images_per_second": n as f64 / median,
            "times": times,
        });
        if let (true, Backend::Cuda(gpu)) = (args.profile, &backend) {
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
        print_profile(*n, *seconds, kernels);
    }
    write_record(&args, &device_name, &cfg, gflop, rows)
}

/// Where one forward pass of `n` images spends its GPU time: per kernel family (the file under
/// `kernels/`), then the kernels that take the most.
fn print_profile(n: usize, seconds: f64, kernels: &[KernelTime]) {
    let total: f64 = kernels.iter().map(|k| k.ms).sum();
    let share = |ms: f64| 100.0 * ms / total.max(1e-12);
    println!(
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
    println!("| kernels/ | launches | ms | share |");
    println!("|---|---:|---:|---:|");
    for (file, launches, ms) in &families {
        println!("| {file}.cu | {launches} | {ms:.3} | {:.1}% |", share(*ms));
    }
    println!("\n| kernel | launches | ms | share |");
    println!("|---|---:|---:|---:|");
    for k in kernels.iter().take(12) {
        println!(
            "| {} | {} | {:.3} | {:.1}% |",
            k.name,
            k.launches,
            k.ms,
            share(k.ms)
        );
    }
}

fn write_record(
    args: &Args,
    device: &str,
    cfg: &ResolvedConfig,
    gflop: f64,
    rows: Vec<serde_json::Value>,
) -> Result<()> {
    if let Some(path) = &args.output {
        let record = serde_json::json!({
            "tool": format!("mcdm {}", env!("CARGO_PKG_VERSION")),
            "device": device,
            "config": cfg.unet.to_json(&cfg.diffusion),
            "gflop_per_image": gflop,
            "compose_experts": args.compose,
            "steps": args.steps,
            "results": rows,
        });
        mcdm::files::write_atomic(path, serde_json::to_string_pretty(&record)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Composed DDIM sampling with `--compose` random experts plus an unconditional model.
fn run_compose(args: &Args, cfg: ResolvedConfig, backend: &Backend) -> Result<()> {
    let size = cfg.unet.image_size;
    let models: Vec<LoadedModel> = (0..=args.compose)
        .map(|i| LoadedModel::random(cfg.clone(), i as u64, &format!("random model {i}")))
        .collect::<mcdm::Result<_>>()?;
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
    let gflop = models[0].unet.flops_per_image(size, size) / 1e9;
    let device = match backend {
        Backend::Cpu => format!("cpu, {} threads", rayon::current_num_threads()),
        Backend::Cuda(gpu) => {
            gpu.set_cuda_graphs(!args.no_cuda_graph);
            let graphs = if args.no_cuda_graph {
                "no CUDA graphs"
            } else {
                "CUDA graphs"
            };
            format!("{}, {:?}, {graphs}", gpu.info().name, args.dtype)
        }
    };
    eprintln!(
        "composed DDIM: {} expert(s) + unconditional, {} steps, {gflop:.2} GFLOP per image per forward, {device}",
        args.compose, args.steps
    );
    // Models go to the GPU once; each timed run then samples with everything resident.
    let uploaded = match (backend, args.dtype) {
        (Backend::Cpu, _) => Uploaded::None,
        (Backend::Cuda(g), Dtype::Bf16) => Uploaded::Bf16(upload_all(g, &models)?),
        (Backend::Cuda(g), Dtype::F16) => Uploaded::F16(upload_all(g, &models)?),
        (Backend::Cuda(g), Dtype::F32) => Uploaded::F32(upload_all(g, &models)?),
    };
    // Returns the batch size that ran: smaller than n when n did not fit in GPU memory.
    let run = |n: usize| -> Result<usize> {
        let mut ran = 0;
        let mut on_step = |p: StepProgress| ran = ran.max(p.batch);
        match &uploaded {
            Uploaded::None => sampler.sample(n, n, None, &mut on_step)?,
            Uploaded::Bf16(m) => sampler.sample_gpu(m, n, n, None, &mut on_step)?,
            Uploaded::F16(m) => sampler.sample_gpu(m, n, n, None, &mut on_step)?,
            Uploaded::F32(m) => sampler.sample_gpu(m, n, n, None, &mut on_step)?,
        };
        Ok(ran)
    };
    // What the host enqueued in the last timed run: every kernel, or, with CUDA graphs, the
    // first steps' kernels and a graph launch for each later step.
    let launches = || match backend {
        Backend::Cpu => (0, 0),
        Backend::Cuda(g) => (g.kernel_launches(), g.graph_launches()),
    };
    println!("| batch | s / run | images / s | GFLOP/s | host launches / run |");
    println!("|---:|---:|---:|---:|---|");
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
        let host = match backend {
            Backend::Cpu => "n/a".to_string(),
            Backend::Cuda(_) => format!("{} kernels + {} graphs", per_run.0, per_run.1),
        };
        println!(
            "| {batch} | {median:.4} | {:.2} | {:.1} | {host} |",
            n as f64 / median,
            gflop * forwards as f64 / median
        );
        rows.push(serde_json::json!({ "batch": n, "batch_ran": ran, "seconds_per_run": median, "images_per_second": n as f64 / median, "times": times, "kernel_launches": per_run.0, "graph_launches": per_run.1 }));
    }
    if let Backend::Cuda(gpu) = backend {
        warn_graph_failure(gpu);
    }
    write_record(args, &device, &cfg, gflop, rows)
}

/// The composed benchmark's models on the GPU, in the chosen storage type.
enum Uploaded {
    None,
    Bf16(Vec<GpuUNet<half::bf16>>),
    F16(Vec<GpuUNet<half::f16>>),
    F32(Vec<GpuUNet<f32>>),
}

fn upload_all<T: GpuFloat>(
    gpu: &std::sync::Arc<Gpu>,
    models: &[LoadedModel],
) -> Result<Vec<GpuUNet<T>>> {
    Ok(models
        .iter()
        .map(|m| GpuUNet::upload(&m.unet, gpu.clone()))
        .collect::<mcdm::Result<_>>()?)
}

/// Median GPU seconds of `iters` calls of `f` (after one warm-up): the time of its kernels,
/// from CUDA events around each launch, so that a kernel of a few microseconds is not
/// measured as the host's launch and synchronisation latency.
fn time_gpu(gpu: &Gpu, iters: usize, mut f: impl FnMut() -> mcdm::Result<()>) -> Result<f64> {
    f()?;
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        gpu.profile_start()?;
        f()?;
        let kernels = gpu.profile_finish()?;
        times.push(kernels.iter().map(|k| k.ms).sum::<f64>() / 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Single kernels at the shapes of the ImageNet-64 ADM and 256 face workloads.
fn bench_kernels<T: GpuFloat>(gpu: &std::sync::Arc<Gpu>, iters: usize) -> Result<()> {
    use mcdm::ops::attention::attend_gpu;
    use mcdm::ops::conv::{Conv2d, ConvKernel, Residual};
    use mcdm::ops::group_norm::{GpuGroupNorm, GroupNorm};
    use mcdm::ops::linear::Linear;
    use mcdm::ops::resample::{concat_channels_gpu, upsample_nearest2x_gpu};
    let g = &**gpu;
    let fill = |len: usize| {
        (0..len)
            .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect::<Vec<f32>>()
    };
    let peaks = measure_peaks::<T>(g, iters)?;
    let share = |rate: f64, peak: f64| format!("{:.0}%", 100.0 * rate / peak);
    println!("\n| kernel | shape | ms | rate | of peak |");
    println!("|---|---|---:|---:|---:|");
    // Convolutions: every kernel variant that can run the shape (`auto` marks the one
    // `forward` picks), so a GPU run shows which wins where.
    for &(n, h, w, cin, cout, k) in &[
        (64, 32, 32, 384, 384, 3),
        (8, 128, 128, 192, 192, 3),
        (8, 32, 32, 384, 768, 3),
        (8, 64, 64, 384, 384, 1),
        // ImageNet-64 ADM, 64 images x 4 experts: 64x64 at 192, 16x16 at 576, 8x8 at 768.
        (256, 64, 64, 192, 192, 3),
        (256, 16, 16, 576, 576, 3),
        (256, 8, 8, 768, 768, 3),
        // 256 face model, 8 images x 4 experts, at 256x256.
        (32, 256, 256, 192, 192, 3),
        // Small grids, where auto falls back to 64x64 tiles (under 264 large blocks): one
        // expert's deepest levels, ImageNet-64 ADM at batch 64 and the face model at batch 8.
        (64, 8, 8, 768, 768, 3),
        (8, 16, 16, 768, 768, 3),
        (8, 8, 8, 768, 768, 3),
    ] {
        let conv =
            Conv2d::from_torch(&fill(cout * cin * k * k), vec![0.0; cout], k, 1).upload::<T>(g)?;
        let x = g.upload::<T>(&fill(n * h * w * cin))?;
        let mut y = g.zeros::<T>(n * h * w * cout)?;
        let auto = conv.choose_kernel(g, &x, n, h, w);
        let flop = 2.0 * (n * h * w * cout * cin * k * k) as f64;
        for kern in ConvKernel::ALL {
            if !conv.supports(g, kern, &x) {
                continue;
            }
            let secs = time_gpu(g, iters, || {
                conv.forward_with(g, kern, &x, n, h, w, &mut y, Residual::None)
            })?;
            let tflops = flop / secs / 1e12;
            println!(
                "| conv{k}x{k} {}{} | n{n} {h}x{w} {cin}->{cout} | {:.3} | {tflops:.1} TFLOP/s | {} |",
                kern.name(),
                if kern == auto { " (auto)" } else { "" },
                secs * 1e3,
                share(tflops, peaks.tflops)
            );
        }
    }
    for &(n, t, c, heads) in &[(64, 256, 768, 12), (8, 1024, 384, 6), (8, 4096, 192, 3)] {
        let qkv = g.upload::<T>(&fill(n * t * 3 * c))?;
        let mut out = g.zeros::<T>(n * t * c)?;
        let secs = time_gpu(g, iters, || attend_gpu(g, &qkv, n, t, c, heads, &mut out))?;
        let tflops = 4.0 * (n * t * t * c) as f64 / secs / 1e12;
        println!(
            "| attention | n{n} t{t} c{c} heads{heads} | {:.3} | {tflops:.1} TFLOP/s | {} |",
            secs * 1e3,
            share(tflops, peaks.tflops)
        );
    }
    for &(n, hw, c) in &[
        (8, 256 * 256, 192),
        (8, 128 * 128, 192),
        (256, 64 * 64, 192),
        (64, 32 * 32, 384),
        (64, 8 * 8, 1536),
    ] {
        let gn = GroupNorm {
            channels: c,
            weight: vec![1.0; c],
            bias: vec![0.0; c],
        }
        .upload(g)?;
        let x = g.upload::<T>(&fill(n * hw * c))?;
        let mut y = g.zeros::<T>(n * hw * c)?;
        let mut stats = g.zeros::<f32>(GpuGroupNorm::scratch_len(n, hw))?;
        let secs = time_gpu(g, iters, || {
            gn.forward(g, &x, n, hw, &mut y, &mut stats, None, true)
        })?;
        // Statistics read x once, the apply pass reads x and writes y.
        let gbs = 3.0 * (n * hw * c * std::mem::size_of::<T>()) as f64 / secs / 1e9;
        println!(
            "| group norm + SiLU | n{n} hw{hw} c{c} | {:.3} | {gbs:.0} GB/s | {} |",
            secs * 1e3,
            share(gbs, peaks.gbs)
        );
    }
    // The decoder's upsampling and skip concatenations: bytes read plus written.
    let elem = std::mem::size_of::<T>();
    for &(n, h, w, c) in &[(64, 32, 32, 384), (8, 128, 128, 192)] {
        let x = g.upload::<T>(&fill(n * h * w * c))?;
        let mut y = g.zeros::<T>(4 * n * h * w * c)?;
        let secs = time_gpu(g, iters, || {
            upsample_nearest2x_gpu(g, &x, n, h, w, c, &mut y)
        })?;
        let gbs = (5 * n * h * w * c * elem) as f64 / secs / 1e9;
        println!(
            "| upsample x2 | n{n} {h}x{w} c{c} | {:.3} | {gbs:.0} GB/s | {} |",
            secs * 1e3,
            share(gbs, peaks.gbs)
        );
    }
    for &(n, hw, ca, cb) in &[(64, 64 * 64, 192, 192), (8, 256 * 256, 192, 192)] {
        let a = g.upload::<T>(&fill(n * hw * ca))?;
        let b = g.upload::<T>(&fill(n * hw * cb))?;
        let mut y = g.zeros::<T>(n * hw * (ca + cb))?;
        let secs = time_gpu(g, iters, || {
            concat_channels_gpu(g, &a, &b, n, hw, ca, cb, &mut y)
        })?;
        let gbs = (2 * n * hw * (ca + cb) * elem) as f64 / secs / 1e9;
        println!(
            "| concat | n{n} hw{hw} {ca}+{cb} | {:.3} | {gbs:.0} GB/s | {} |",
            secs * 1e3,
            share(gbs, peaks.gbs)
        );
    }
    // A ResBlock's embedding projection (f32, every storage type): ImageNet-64 ADM's widest,
    // for the 64 images of one expert; weight, input and output bytes.
    let (n, fin, fout) = (64, 768, 1536);
    let linear = Linear {
        in_features: fin,
        out_features: fout,
        weight: fill(fin * fout),
        bias: fill(fout),
    }
    .upload(g)?;
    let x = g.upload::<f32>(&fill(n * fin))?;
    let mut y = g.zeros::<f32>(n * fout)?;
    let secs = time_gpu(g, iters, || linear.forward(g, &x, n, &mut y, true))?;
    let gbs = (4 * (fin * fout + n * fin + n * fout)) as f64 / secs / 1e9;
    println!(
        "| linear f32 + SiLU in | n{n} {fin}->{fout} | {:.3} | {gbs:.0} GB/s | {} |",
        secs * 1e3,
        share(gbs, peaks.gbs)
    );
    Ok(())
}

/// What this GPU reaches at all (`kernels/peak.cu`), the yardsticks of the kernel table.
struct Peaks {
    /// Tensor-core (f16/bf16) or FMA (f32) throughput, TFLOP/s.
    tflops: f64,
    /// DRAM bandwidth of a streaming copy, GB/s (bytes read plus bytes written).
    gbs: f64,
}

/// Times the compute-peak kernel for `T` (its output checked against the CPU reference, so that
/// the timed work is known to be done) and a copy between two buffers far larger than the L2
/// cache, and prints them.
fn measure_peaks<T: GpuFloat>(g: &Gpu, iters: usize) -> Result<Peaks> {
    use mcdm::bench::peak::{
        blocks_to_fill, compute_peak, compute_peak_gpu, compute_reference, copy_gpu, BLOCK,
        MAX_EXACT_ROUNDS,
    };
    let peak = compute_peak::<T>()?;
    let (kernel, instruction) = (peak.kernel, peak.instruction);
    let blocks = blocks_to_fill(g);
    let mut out = g.zeros::<f32>(blocks * BLOCK)?;
    // Rounds for about 20 ms a launch, from a short probe.
    let probe = 256;
    let probe_secs = time_gpu(g, 1, || {
        compute_peak_gpu::<T>(g, &mut out, blocks, probe).map(drop)
    })?;
    let rounds = ((probe as f64 * 0.02 / probe_secs) as usize).clamp(probe, MAX_EXACT_ROUNDS);
    let mut flop = 0.0;
    let secs = time_gpu(g, iters, || {
        flop = compute_peak_gpu::<T>(g, &mut out, blocks, rounds)?;
        Ok(())
    })?;
    let want = compute_reference::<T>(rounds);
    if let Some(bad) = g.download(&out)?.into_iter().find(|&v| v != want) {
        bail!("{kernel} returned {bad} where {want} was due: not all the timed work was done");
    }
    // Two buffers of up to 1 GiB each (at most a quarter of the free memory each), each at least
    // 4x the L2 cache, so that the copy streams from and to DRAM.
    let (free, _) = g.memory()?;
    let floats = (free / 16).min(1 << 28) / 4 * 4;
    let l2 = g.info().l2_cache_bytes;
    if floats * 4 < 4 * l2 {
        bail!(
            "measuring DRAM bandwidth needs {} MiB of free GPU memory (two buffers of 4x the L2 \
             cache, each at most a quarter of the free memory), and {} MiB are free",
            (16 * l2) >> 20,
            free >> 20
        );
    }
    let x = g.zeros::<f32>(floats)?;
    let mut y = g.zeros::<f32>(floats)?;
    let mut bytes = 0.0;
    let copy_secs = time_gpu(g, iters, || {
        bytes = copy_gpu(g, &x, &mut y, blocks)?;
        Ok(())
    })?;
    let peaks = Peaks {
        tflops: flop / secs / 1e12,
        gbs: bytes / copy_secs / 1e9,
    };
    println!("| device peak | measured by | rate |");
    println!("|---|---|---:|");
    println!(
        "| {instruction} | `{kernel}` kernels/peak.cu, {blocks} blocks x {BLOCK} threads, {rounds} rounds | {:.1} TFLOP/s |",
        peaks.tflops
    );
    println!(
        "| DRAM copy | `copy_u4` kernels/peak.cu, 2 x {:.2} GiB | {:.0} GB/s |",
        (floats * 4) as f64 / (1u64 << 30) as f64,
        peaks.gbs
    );
    Ok(peaks)
}
