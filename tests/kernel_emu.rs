//! Every CUDA kernel's real source against double-precision references on the CPU, through the
//! emulation of the CUDA thread model in tools/kernel-emu (scripts/emulate-kernels.sh), so that
//! a kernel change is checked in CI, where there is no GPU. Needs g++ and python3; without a
//! C++ compiler the test says so and passes.

use std::path::Path;
use std::process::Command;

#[test]
fn kernels_match_references_in_emulation() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        eprintln!("kernel emulation: skipped, no C++ compiler ({cxx})");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/emulate-kernels.sh"))
        .current_dir(root)
        .output()
        .expect("running scripts/emulate-kernels.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "a kernel differs from its reference in emulation (logs in target/kernel-emu/logs)"
    );
}
