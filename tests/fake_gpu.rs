//! The GPU tests on the fake CUDA driver (tools/fake-cuda: a libcuda that runs the real
//! kernels in the CPU emulation of tools/kernel-emu), so that CI, which has no GPU, runs mcdm's
//! GPU host code and kernels end to end. Builds the driver (`scripts/fake-gpu-test.sh
//! --build-only`: g++ and the CUDA headers of scripts/install-nvrtc.sh), then runs the gpu_ops,
//! gpu_sample and gpu_text test executables that cargo built beside this one with the fake on
//! their library path. The two slowest (composed sampling and the text encoder, ~6 minutes
//! emulated) are left to `scripts/fake-gpu-test.sh`, which runs everything.
//!
//! Skipped, with a message, where a real GPU is present (the GPU tests then run on it) or where
//! g++ or the CUDA headers are missing.

use std::path::{Path, PathBuf};
use std::process::Command;

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
fn gpu_tests_pass_on_the_fake_driver() {
    if mcdm::cuda::unavailable_reason().is_none() {
        eprintln!("fake GPU: skipped, a real GPU is present (the GPU tests ran on it)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let include = std::env::var_os("MCDM_CUDA_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".nvrtc/nvidia/cu13/include"));
    if !include.join("cuda.h").is_file() || Command::new("g++").arg("--version").output().is_err() {
        eprintln!(
            "fake GPU: skipped, needs g++ and cuda.h ({}; scripts/install-nvrtc.sh)",
            include.display()
        );
        return;
    }
    let build = Command::new("bash")
        .arg(root.join("scripts/fake-gpu-test.sh"))
        .arg("--build-only")
        .env("MCDM_CUDA_INCLUDE", &include)
        .current_dir(root)
        .output()
        .expect("running scripts/fake-gpu-test.sh --build-only");
    assert!(
        build.status.success(),
        "building the fake CUDA driver failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let deps = std::env::current_exe()
        .expect("this test's path")
        .parent()
        .expect("cargo's deps folder")
        .to_path_buf();
    let mut failed = Vec::new();
    for name in ["gpu_ops", "gpu_sample", "gpu_text"] {
        let exe = sibling_test(&deps, name)
            .unwrap_or_else(|| panic!("no {name} test executable in {}", deps.display()));
        // One test at a time: the emulator runs a launch on the calling thread's fibers.
        let out = Command::new(&exe)
            .args([
                "--test-threads",
                "1",
                "--skip",
                "composed_sampling_matches_cpu",
            ])
            .args(["--skip", "encoder_matches_cpu"])
            .env("LD_LIBRARY_PATH", root.join("target/fake-cuda"))
            .output()
            .expect("running a GPU test executable");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A skip would mean the fake was not loaded: that is a failure here.
        if !out.status.success() || log.contains("skipped, no GPU") {
            failed.push(format!("{name}:\n{log}"));
        } else {
            eprintln!("{name} on the fake driver: ok");
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
