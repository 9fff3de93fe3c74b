//! The GPU tests on the fake CUDA driver (tools/fake-cuda: a libcuda that runs the real
//! kernels in the CPU emulation of tools/kernel-emu), so that CI, which has no GPU, runs mcdm's
//! GPU host code and kernels end to end. Builds the driver under AddressSanitizer
//! (`scripts/fake-gpu-test.sh --build-asan`: g++ and the CUDA headers of
//! scripts/install-nvrtc.sh), then runs the gpu_ops, gpu_sample and gpu_text test executables
//! that cargo built beside this one, and the mcdm binary, with the fake on their library path
//! and the sanitizer's runtime preloaded: a kernel or copy that touches memory outside its
//! allocations aborts the run, as compute-sanitizer's memcheck would fail it on a GPU. Every test
//! of those executables runs, and together they must launch every kernel entry point of the
//! build.
//!
//! Skipped, with a message, where a real GPU is present (the GPU tests then run on it) or where
//! g++, its AddressSanitizer runtime or the CUDA headers are missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::rel_l2;

/// The limit of one GPU test executable on the fake driver (each takes a minute or two).
const EXECUTABLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20 * 60);

/// The newest test executable `<name>-<hash>` in `dir` (cargo's deps folder).
fn sibling_test(dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|hash| hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[test]
fn unlaunched_lists_the_entry_points_not_reached() {
    if mcdm::cuda::KERNEL_RESOURCES.is_empty() {
        common::skip("the entry point list", "built without NVRTC");
        return;
    }
    let all: Vec<&str> = mcdm::cuda::KERNEL_RESOURCES
        .iter()
        .map(|r| r.kernel)
        .collect();
    assert!(all.contains(&"conv2d_f16") && all.contains(&"diffusion_step"));
    let reached: String = all
        .iter()
        .filter(|k| **k != "silu_f32")
        .map(|k| format!("{k}\n"))
        .collect();
    assert_eq!(unlaunched(&reached), ["silu_f32"]);
    assert!(unlaunched(&format!("{reached}silu_f32\n")).is_empty());
}

/// benches/results/gpu-parity.tsv names every entry point of the build, so that one added
/// shows there as never run on a GPU until a device check runs it (tools/gpu_parity.py).
#[test]
fn every_entry_point_is_in_the_gpu_parity_list() {
    if mcdm::cuda::KERNEL_RESOURCES.is_empty() {
        common::skip("the GPU parity list", "built without NVRTC");
        return;
    }
    let list = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/gpu-parity.tsv"),
    )
    .unwrap();
    let listed: std::collections::BTreeSet<&str> = list
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('\t').next())
        .collect();
    let mut missing: Vec<&str> = mcdm::cuda::KERNEL_RESOURCES
        .iter()
        .map(|r| r.kernel)
        .filter(|k| !listed.contains(k))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "entry points missing from benches/results/gpu-parity.tsv (add them as `never`): \
         {missing:?}"
    );
}

/// The sanitized fake libcuda, built once per test process; None (after saying why) where it
/// cannot or need not run.
struct FakeDriver {
    /// The folder of its libcuda.so.1.
    dir: PathBuf,
    /// AddressSanitizer's runtime, which must be loaded before the instrumented library.
    asan_runtime: PathBuf,
}

impl FakeDriver {
    /// `cmd` with the fake on its library path and the sanitizer's runtime preloaded.
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        // The emulator's most skewed thread order (tools/kernel-emu/emu.h): the last warp of a
        // block runs first, each warp alone to the next __syncthreads. scripts/emulate-kernels.sh
        // runs every schedule on small shapes; this one meets the model's real shapes.
        let schedule = std::env::var("EMU_SCHEDULE").unwrap_or_else(|_| "reverse-by-warp".into());
        cmd.env("LD_LIBRARY_PATH", &self.dir)
            .env("LD_PRELOAD", &self.asan_runtime)
            // Leaks are the test harness's business; only memory errors count here.
            .env("ASAN_OPTIONS", "detect_leaks=0")
            .env("EMU_SCHEDULE", schedule)
    }
}

fn fake_driver() -> Option<&'static FakeDriver> {
    static DRIVER: OnceLock<Option<FakeDriver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            if mcdm::cuda::unavailable_reason().is_none() {
                eprintln!("fake GPU: skipped, a real GPU is present (the GPU tests ran on it)");
                return None;
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let include = std::env::var_os("MCDM_CUDA_INCLUDE")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join(".nvrtc/nvidia/cu13/include"));
            if !include.join("cuda.h").is_file() || !common::process::found("g++") {
                common::skip(
                    "fake GPU",
                    &format!(
                        "needs g++ and cuda.h ({}; scripts/install-nvrtc.sh)",
                        include.display()
                    ),
                );
                return None;
            }
            // g++ answers the bare name when it has no AddressSanitizer runtime.
            let runtime = common::output(Command::new("g++").arg("-print-file-name=libasan.so"));
            let asan_runtime = PathBuf::from(String::from_utf8_lossy(&runtime.stdout).trim());
            if !asan_runtime.is_absolute() || !asan_runtime.exists() {
                common::skip("fake GPU", "g++ has no AddressSanitizer runtime (libasan)");
                return None;
            }
            let build = common::output(
                Command::new("bash")
                    .arg(root.join("scripts/fake-gpu-test.sh"))
                    .arg("--build-asan")
                    .env("MCDM_CUDA_INCLUDE", &include)
                    .current_dir(root),
            );
            assert!(
                build.status.success(),
                "building the fake CUDA driver failed:\n{}",
                String::from_utf8_lossy(&build.stderr)
            );
            Some(FakeDriver {
                dir: root.join("target/fake-cuda-asan"),
                asan_runtime,
            })
        })
        .as_ref()
}

#[test]
fn gpu_tests_pass_on_the_fake_driver() {
    let Some(driver) = fake_driver() else { return };
    let deps = std::env::current_exe()
        .expect("this test's path")
        .parent()
        .expect("cargo's deps folder")
        .to_path_buf();
    let mut failed = Vec::new();
    // The fake driver lists every kernel the runs reach here.
    let log_dir = tempfile::tempdir().unwrap();
    let launched = log_dir.path().join("launched.txt");
    for name in ["gpu_ops", "gpu_sample", "gpu_text"] {
        let exe = sibling_test(&deps, name)
            .unwrap_or_else(|| panic!("no {name} test executable in {}", deps.display()));
        // One test at a time: the emulator runs a launch on the calling thread's fibers.
        let out = common::output_within(
            driver
                .apply(&mut Command::new(&exe))
                .env("FAKE_CUDA_LAUNCH_LOG", &launched)
                .args(["--test-threads", "1", "--nocapture"]),
            EXECUTABLE_LIMIT,
        );
        let log = output_text(&out);
        // The measured errors and their bounds, for the record (not the executable's own test
        // lines, which would read as this run's).
        for line in log
            .lines()
            .filter(|l| l.contains("rel L2") || l.contains("error "))
        {
            eprintln!("{name}: {line}");
        }
        // A skip would mean the fake was not loaded: that is a failure here.
        if !out.status.success() || log.contains("skipped, no GPU") {
            failed.push(format!("{name}:\n{log}"));
        } else {
            eprintln!("{name} on the fake driver: ok");
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let reached = std::fs::read_to_string(&launched).unwrap_or_default();
    let missing = unlaunched(&reached);
    assert!(
        missing.is_empty(),
        "kernel entry points no GPU test launches (the build has them; add a test that runs \
         each against its CPU reference): {missing:?}"
    );
}

/// The kernel entry points of the build (ptxas's report of its CUBINs) that `reached`, one
/// kernel name a line, does not name.
fn unlaunched(reached: &str) -> Vec<&'static str> {
    let reached: std::collections::BTreeSet<&str> = reached.lines().collect();
    let mut missing: Vec<&'static str> = mcdm::cuda::KERNEL_RESOURCES
        .iter()
        .map(|r| r.kernel)
        .filter(|k| !reached.contains(k))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    assert!(
        !mcdm::cuda::KERNEL_RESOURCES.is_empty(),
        "no ptxas report in this build (built without NVRTC?): the entry points are unknown"
    );
    missing
}

/// A process's stdout then stderr, for messages and assertions.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes the config of an 8x8 UNet with one attention layer into `dir`: quick to bench, on the
/// fake GPU or the CPU.
fn tiny_config(dir: &Path) -> PathBuf {
    let config = dir.join("tiny.json");
    std::fs::write(
        &config,
        r#"{"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
            "attention_resolutions": "4", "num_head_channels": 32}"#,
    )
    .unwrap();
    config
}

/// A small composed `mcdm sample` run on `device` (f32) with `flags`, the fake device holding
/// `memory` bytes if given: its samples, or its error message.
fn sample(
    driver: &FakeDriver,
    device: &str,
    flags: &[&str],
    memory: Option<usize>,
    out: &Path,
) -> Result<Vec<f32>, String> {
    let memory = memory.map(|bytes| bytes.to_string());
    let env: Vec<(&str, &str)> = memory
        .iter()
        .map(|m| ("FAKE_CUDA_MEMORY_BYTES", m.as_str()))
        .collect();
    sample_with(driver, device, flags, &env, out)
}

/// [`sample`] with the fake driver's environment `env`; with `--resume` in `flags` (which
/// cannot save a tensor) the samples are empty.
fn sample_with(
    driver: &FakeDriver,
    device: &str,
    flags: &[&str],
    env: &[(&str, &str)],
    out: &Path,
) -> Result<Vec<f32>, String> {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sample/models");
    let tensor = out.join("samples.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    driver.apply(&mut cmd);
    cmd.arg("sample")
        .args(["--device", device, "--dtype", "f32"])
        .arg(format!(
            "--model=u={}",
            models.join("uncond.safetensors").display()
        ))
        .arg(format!(
            "--model=c={}",
            models.join("classes.safetensors").display()
        ))
        .args(["--uncond", "u", "--expert", "c,class=3,weight=1.5"])
        .args(["--num-samples", "4", "--steps", "3", "--seed", "7"])
        .arg("--out")
        .arg(out)
        .args(flags)
        .envs(env.iter().copied());
    let resume = flags.contains(&"--resume");
    if !resume {
        cmd.arg("--save-tensor").arg(&tensor);
    }
    let run = common::output(&mut cmd);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    if !run.status.success() {
        return Err(stderr);
    }
    assert!(!stderr.contains("warning"), "{stderr}");
    if resume {
        return Ok(Vec::new());
    }
    let file = mcdm::weights::SafetensorsFile::open(&tensor).unwrap();
    Ok(file.f32("samples").unwrap())
}

/// The CLI's GPU path (`--device cuda`: upload, the GPU sampler with its steps replayed as CUDA
/// graphs, the fused step) gives the CPU's images, `--no-cuda-graph` the same bits, and on a
/// device too small for the batch it halves the batch and still does: the fake device's memory
/// is swept over sizes from "nothing fits" to "everything fits".
#[test]
fn cli_samples_on_the_fake_gpu_as_on_the_cpu() {
    let Some(driver) = fake_driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cpu = sample(driver, "cpu", &[], None, &dir.path().join("cpu")).unwrap();
    let gpu = sample(driver, "cuda", &[], None, &dir.path().join("gpu")).unwrap();
    // Measured 5.6e-6, 2026-12-06.
    common::within(
        "mcdm sample on the fake GPU, f32, rel L2 vs the CPU",
        rel_l2(&gpu, &cpu),
        5e-5,
    );
    let no_graph = ["--no-cuda-graph"];
    let launched = sample(
        driver,
        "cuda",
        &no_graph,
        None,
        &dir.path().join("launched"),
    )
    .unwrap();
    assert!(
        launched
            .iter()
            .zip(&gpu)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "--no-cuda-graph changed the samples"
    );
    // Every group norm's statistics from the moments of the convs that made its input, and
    // the norm applied by the conv that reads it, in the captured steps (a failed capture would
    // warn, which sample_with refuses).
    let env = [
        ("MCDM_NORM_STATS_IN_CONV", "1"),
        ("MCDM_NORM_APPLY_IN_CONV", "1"),
    ];
    let fused = sample_with(driver, "cuda", &[], &env, &dir.path().join("fused")).unwrap();
    common::within(
        "mcdm sample on the fake GPU with the norms fused into the convs, f32, rel L2 vs the CPU",
        rel_l2(&fused, &cpu),
        5e-5,
    );
    let mut split = 0;
    for quarter_mib in 8..=24 {
        let out = dir.path().join(format!("mem{quarter_mib}"));
        match sample(driver, "cuda", &[], Some(quarter_mib << 18), &out) {
            Ok(images) => {
                let err = rel_l2(&images, &cpu);
                common::within(
                    &format!("{quarter_mib}/4 MiB device, rel L2 vs the CPU"),
                    err,
                    5e-5,
                );
                let record = std::fs::read_to_string(out.join("record.json")).unwrap();
                if !record.contains("\"batch_size\": 4") {
                    split += 1;
                }
            }
            // Too small for the models, or for one image: a clear error, no panic.
            Err(message) => assert!(
                message.contains("out of device memory") && !message.contains("panicked"),
                "{quarter_mib}/4 MiB: {message}"
            ),
        }
    }
    assert!(split > 0, "no memory size made the sampler split its batch");
}

/// The PNGs of a run folder, by name.
fn pngs(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// `--device cuda:all` on a fake machine of 3 GPUs makes the one-GPU images bit for bit, and
/// so does `cuda:0,2`. When a GPU fails mid-run, the run stops with an error naming it and
/// keeps every image finished before (another GPU makes the failed batch); `--resume` on one
/// GPU completes the folder to the one-GPU images. A GPU that does not exist is named.
#[test]
fn several_gpus_make_the_one_gpu_images() {
    let Some(driver) = fake_driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let batches = ["--batch-size", "1"];
    let three = [("FAKE_CUDA_DEVICES", "3")];
    let one = sample_with(driver, "cuda", &batches, &[], &dir.path().join("one")).unwrap();
    let one_pngs = pngs(&dir.path().join("one"));
    for device in ["cuda:all", "cuda:0,2"] {
        let out = dir.path().join(device.replace([':', ','], "-"));
        let images = sample_with(driver, device, &batches, &three, &out).unwrap();
        assert!(images == one, "--device {device} changed the samples");
        assert_eq!(pngs(&out), one_pngs, "--device {device} changed the PNGs");
        let record = std::fs::read_to_string(out.join("record.json")).unwrap();
        let gpus = if device == "cuda:all" { "3 x " } else { "2 x " };
        assert!(record.contains(gpus), "{record}");
    }

    let failed = dir.path().join("failed");
    let failing = [
        ("FAKE_CUDA_DEVICES", "2"),
        ("FAKE_CUDA_FAIL_DEVICE", "1"),
        ("FAKE_CUDA_FAIL_AFTER", "12"),
    ];
    let err = sample_with(driver, "cuda:all", &batches, &failing, &failed).unwrap_err();
    assert!(
        err.contains("GPU 1 (") && err.contains("failed at the batch from image"),
        "{err}"
    );
    let record = std::fs::read_to_string(failed.join("record.json")).unwrap();
    assert!(record.contains("\"partial\""), "{record}");
    let kept = pngs(&failed);
    assert!(
        !kept.is_empty(),
        "the images finished before the failure were lost"
    );
    for (name, png) in &kept {
        assert_eq!(
            Some(png),
            one_pngs.get(name),
            "{name} differs from the one-GPU run"
        );
    }
    let resumed = [&batches[..], &["--resume"]].concat();
    sample_with(driver, "cuda", &resumed, &[], &failed).unwrap();
    assert_eq!(
        pngs(&failed),
        one_pngs,
        "the resumed run differs from the one-GPU run"
    );

    let err = sample_with(driver, "cuda:0,5", &batches, &three, &dir.path().join("x")).unwrap_err();
    assert!(
        err.contains("there is no GPU 5 (this machine has 3: 0 to 2)"),
        "{err}"
    );
}

/// A diffusers UNet2DModel folder runs through the same GPU graph: `mcdm forward --device cuda`
/// (f32) matches diffusers' own forward pass (tests/diffusers_unet.rs checks the CPU).
#[test]
fn a_diffusers_folder_forward_on_the_fake_gpu_matches_diffusers() {
    let Some(driver) = fake_driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    // guided-diffusion's time features, diffusers' DDPM ones ([sin | cos], freq_shift 1), and
    // group norms of 4 groups.
    for name in ["attn_scale_shift_classes", "ddpm_sin_first", "groups_4"] {
        let model = common::fixtures(&format!("diffusers/{name}"));
        let io = model.join("io.safetensors");
        let out = dir.path().join(format!("{name}.safetensors"));
        let run = common::output(
            driver
                .apply(&mut Command::new(env!("CARGO_BIN_EXE_mcdm")))
                .args(["forward", "--device", "cuda", "--dtype", "f32", "--model"])
                .arg(&model)
                .arg("--input")
                .arg(&io)
                .arg("--output")
                .arg(&out),
        );
        assert!(run.status.success(), "{}", output_text(&run));
        let got = mcdm::weights::SafetensorsFile::open(&out)
            .unwrap()
            .f32("out")
            .unwrap();
        let want = mcdm::weights::SafetensorsFile::open(&io)
            .unwrap()
            .f32("out")
            .unwrap();
        // Measured 1.3e-6, 2026-12-06.
        common::within(
            &format!("{name} on the fake GPU, f32, rel L2 vs diffusers"),
            rel_l2(&got, &want),
            1e-5,
        );
    }
}

/// A GPU older than the kernels need (the fake set to compute capability 7.5, a T4) is named
/// in a clear error with `--device cuda`, and `--device auto` runs on the CPU instead.
#[test]
fn an_old_gpu_is_refused_and_auto_uses_the_cpu() {
    let Some(driver) = fake_driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
        let out = common::output(
            driver
                .apply(&mut cmd)
                .env("FAKE_CUDA_COMPUTE_CAPABILITY", "7.5")
                .args(args),
        );
        (out.status.code(), output_text(&out))
    };
    let bench = |device: &str| {
        let config = config.to_str().unwrap();
        run(&[
            "bench", "--device", device, "--batch", "1", "--iters", "1", "--config", config,
        ])
    };
    let (code, text) = bench("cuda");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("compute capability 7.5") && text.contains("8.0 or newer"),
        "{text}"
    );
    let (code, text) = bench("auto");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("), cpu, "), "{text}");
    let (code, text) = run(&["info"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("compute capability 7.5") && text.contains("--device auto uses the CPU"),
        "{text}"
    );
}

/// Kernel images on a GPU without a CUBIN of its own (compute capability 8.7, a Jetson Orin):
/// the sm_86 CUBIN serves it, with no NVRTC. With `MCDM_KERNEL_SOURCE=1` the kernels are
/// compiled at first use by the NVRTC found at run time and cached (one PTX per kernel file),
/// a second run with no NVRTC is served from the cache, and with neither NVRTC nor a cache
/// `--device auto` says why and runs on the CPU.
#[test]
fn kernel_images_fit_the_gpu_or_compile_at_first_use() {
    let Some(driver) = fake_driver() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let nvrtc = std::env::var_os("MCDM_NVRTC_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".nvrtc/nvidia/cu13/lib/libnvrtc.so.13"));
    let include = std::env::var_os("MCDM_CUDA_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".nvrtc/nvidia/cu13/include"));
    let (Some(nvrtc_dir), true) = (nvrtc.parent(), nvrtc.is_file()) else {
        common::skip(
            "kernels compiled at first use",
            &format!("no NVRTC at {}", nvrtc.display()),
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let cache = dir.path().join("cache");
    let fake = driver.dir.display().to_string();
    let with_nvrtc = format!("{fake}:{}", nvrtc_dir.display());
    let bench = |library_path: &str, device: &str, from_source: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
        driver
            .apply(&mut cmd)
            .env("LD_LIBRARY_PATH", library_path)
            .env("FAKE_CUDA_COMPUTE_CAPABILITY", "8.7")
            .env("XDG_CACHE_HOME", &cache)
            .env("MCDM_CUDA_INCLUDE", &include)
            .args(["bench", "--device", device, "--dtype", "f16"])
            .args(["--batch", "1", "--iters", "1", "--config"])
            .arg(&config);
        if from_source {
            cmd.env("MCDM_KERNEL_SOURCE", "1");
        }
        let out = common::output(&mut cmd);
        let text = output_text(&out);
        assert!(out.status.success(), "{text}");
        text
    };
    let text = bench(&fake, "cuda", false);
    assert!(text.contains("Fake CUDA"), "{text}");
    assert!(
        !cache.exists(),
        "the embedded sm_86 CUBIN should have served"
    );

    let text = bench(&fake, "auto", true);
    assert!(
        text.contains("the GPU cannot be used") && text.contains("no NVRTC library"),
        "{text}"
    );
    assert!(text.contains("), cpu, "), "{text}");

    let text = bench(&with_nvrtc, "cuda", true);
    assert!(text.contains("Fake CUDA"), "{text}");
    let cached: Vec<String> = std::fs::read_dir(cache.join("mcdm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for &(file, _) in mcdm::cuda::KERNEL_SOURCES {
        let prefix = format!("{file}-compute_87-");
        assert!(
            cached
                .iter()
                .any(|c| c.starts_with(&prefix) && c.ends_with(".ptx")),
            "no cached PTX for kernels/{file}.cu: {cached:?}"
        );
    }
    assert!(
        cached.iter().all(|c| !c.starts_with('.')),
        "temporary files left in the cache: {cached:?}"
    );
    // No NVRTC on the path now: only the cache can serve.
    bench(&fake, "cuda", true);
}

/// `mcdm encode-text --device cuda` (the GPU text encoder: 1x1 convs, attention, layer norm,
/// GELU) writes the CPU's embeddings, in every storage type.
#[test]
fn encode_text_on_the_fake_gpu_as_on_the_cpu() {
    let Some(driver) = fake_driver() else { return };
    if common::text_tests_skipped("encode-text on the fake GPU") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let encode = |device: &str, dtype: &str| {
        let output = dir.path().join(format!("{device}-{dtype}.safetensors"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
        let run = common::output(
            driver
                .apply(&mut cmd)
                .args(["encode-text", "--device", device, "--dtype", dtype])
                .args(["--text", "This person has black hair.", "--text", ""])
                .arg("--output")
                .arg(&output),
        );
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let file = mcdm::weights::SafetensorsFile::open(&output).unwrap();
        assert_eq!(file.shape("embedding").unwrap(), [2, 384]);
        file.f32("embedding").unwrap()
    };
    let cpu = encode("cpu", "f32");
    // Measured 1.4e-6 (f32), 1.2e-3 (f16), 9.2e-3 (bf16), 2026-12-06.
    for (dtype, bound) in [("f32", 1e-5), ("f16", 1e-2), ("bf16", 5e-2)] {
        let err = rel_l2(&encode("cuda", dtype), &cpu);
        common::within(
            &format!("encode-text on the fake GPU, {dtype}, rel L2 vs the CPU"),
            err,
            bound,
        );
    }
}

/// `mcdm bench --profile` times every launch of a forward pass with events: the kernel families
/// of a UNet all show up, with their launch counts, in the table and in the JSON record.
#[test]
fn bench_profile_on_the_fake_gpu() {
    let Some(driver) = fake_driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny.json");
    std::fs::write(
        &config,
        r#"{"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
            "attention_resolutions": "8", "num_head_channels": 32, "use_scale_shift_norm": true,
            "learn_sigma": true}"#,
    )
    .unwrap();
    let record = dir.path().join("bench.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    let run = common::output(
        driver
            .apply(&mut cmd)
            .args([
                "bench", "--device", "cuda", "--dtype", "bf16", "--batch", "2",
            ])
            .args(["--iters", "1", "--profile", "--config"])
            .arg(&config)
            .arg("--output")
            .arg(&record),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for family in ["conv", "group_norm", "attention", "linear", "layout"] {
        assert!(
            stdout.contains(&format!("| {family}.cu |")),
            "{family}:\n{stdout}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let kernels = json["results"][0]["profile"].as_array().unwrap();
    // One launch per conv layer of this UNet: the input conv; 8 res blocks of 2 convs (2 down,
    // 2 middle, 4 up), 5 of them with a 1x1 skip conv (the 32 -> 64 one and the 4 up blocks,
    // which take the concatenated skips); the down and up convs; 4 attention layers of 2 1x1
    // convs (qkv and out); the output conv: 1 + 16 + 5 + 2 + 8 + 1.
    let conv_launches: u64 = kernels
        .iter()
        .filter(|k| k["file"] == "conv")
        .map(|k| k["launches"].as_u64().unwrap())
        .sum();
    assert_eq!(conv_launches, 33, "conv launches:\n{stdout}");
    let total: f64 = kernels.iter().map(|k| k["ms"].as_f64().unwrap()).sum();
    assert!(total > 0.0, "no kernel time:\n{stdout}");
    // With MCDM_NORM_STATS_IN_CONV=1 every group norm of this UNet reads a conv's output (or a
    // concatenation of two), so each takes its statistics from the convs' moments: no
    // statistics pass at all, and one channel-moment merge per norm. With
    // MCDM_NORM_APPLY_IN_CONV=1 too, every norm a conv reads is applied by that conv (from a
    // per-channel table): only the pooled norms of downsampling blocks are stored.
    let launches = |json: &serde_json::Value, kernel: &str| -> u64 {
        json["results"][0]["profile"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["kernel"].as_str().is_some_and(|n| n.starts_with(kernel)))
            .map(|k| k["launches"].as_u64().unwrap())
            .sum()
    };
    let norms = launches(&json, "group_norm_merge");
    assert_eq!(launches(&json, "group_norm_partial"), norms, "{stdout}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    let run = common::output(
        driver
            .apply(&mut cmd)
            .env("MCDM_NORM_STATS_IN_CONV", "1")
            .env("MCDM_NORM_APPLY_IN_CONV", "1")
            .args([
                "bench", "--device", "cuda", "--dtype", "bf16", "--batch", "2",
            ])
            .args(["--iters", "1", "--profile", "--config"])
            .arg(&config)
            .arg("--output")
            .arg(&record),
    );
    let stdout = output_text(&run);
    assert!(run.status.success(), "{stdout}");
    let fused: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(launches(&fused, "group_norm_partial"), 0, "{stdout}");
    assert_eq!(
        launches(&fused, "group_norm_merge_channels"),
        norms,
        "{stdout}"
    );
    let pooled = launches(&fused, "group_norm_apply_pool");
    assert_eq!(launches(&fused, "group_norm_apply_bf16"), 0, "{stdout}");
    assert_eq!(
        launches(&fused, "group_norm_channel_affine"),
        norms - pooled,
        "{stdout}"
    );
    // A profile is of one forward pass, not of composed sampling (small enough to end quickly
    // should the check fail: `--kernels` is not tried, its full-size kernels take minutes here).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcdm"));
    let run = common::output(
        driver
            .apply(&mut cmd)
            .args(["bench", "--device", "cuda", "--profile", "--compose", "1"])
            .args(["--steps", "2", "--batch", "1", "--iters", "1", "--config"])
            .arg(&config),
    );
    let text = output_text(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains("--profile times the kernels of a forward pass"),
        "{text}"
    );
}

/// The Python package on the fake GPU: a device out of memory is Python's MemoryError
/// (python/tests, `test_out_of_device_memory_is_a_memory_error`, run here with the driver's
/// environment; scripts/python-test.sh builds the package).
#[test]
fn python_out_of_device_memory_is_a_memory_error() {
    let Some(driver) = fake_driver() else { return };
    let env = serde_json::json!({
        "LD_LIBRARY_PATH": driver.dir,
        "LD_PRELOAD": driver.asan_runtime,
        "ASAN_OPTIONS": "detect_leaks=0",
    });
    let env = env.to_string();
    let Some(printed) = common::run_script(
        "python-test.sh",
        &["-k", "out_of_device_memory", "-rs"],
        &[("MCDM_FAKE_GPU_ENV", &env)],
        "python package on the fake GPU",
        "python3 cannot make a virtual environment",
    ) else {
        return;
    };
    assert!(printed.contains("1 passed"), "{printed}");
}
