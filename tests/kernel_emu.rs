//! Every CUDA kernel's real source against double-precision references on the CPU, through the
//! emulation of the CUDA thread model in tools/kernel-emu (scripts/emulate-kernels.sh), so that
//! a kernel change is checked in CI, where there is no GPU. Needs g++ and python3; without a
//! C++ compiler the test says so and passes, or fails under `MCDM_REQUIRE_ALL_CHECKS=1` (CI).
//! A driver that runs past its limit (`EMU_RUN_TIMEOUT`, a kernel that spins) is stopped and
//! its log names the kernel it was running.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn kernels_match_references_in_emulation() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if !common::process::found(&cxx) {
        common::skip("kernel emulation", &format!("no C++ compiler ({cxx})"));
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = common::output(
        Command::new("bash")
            .arg(root.join("scripts/emulate-kernels.sh"))
            .current_dir(root),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "a kernel differs from its reference in emulation (logs in target/kernel-emu/logs)"
    );
}

/// The limit on the commands tests start holds: one that hangs is stopped and named, with what
/// it printed, instead of holding the run.
#[test]
fn a_hung_command_is_stopped_and_named() {
    let started = std::time::Instant::now();
    let stopped = std::panic::catch_unwind(|| {
        common::output_within(
            Command::new("sh").args(["-c", "echo started; sleep 60"]),
            std::time::Duration::from_secs(1),
        )
    });
    let message = *stopped
        .expect_err("a command past its limit must fail the test")
        .downcast::<String>()
        .unwrap();
    assert!(
        message.contains(r#""sh" "-c" "echo started; sleep 60" ran past 1 s"#)
            && message.ends_with("started\n"),
        "{message}"
    );
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
}
