//! `scripts/slurm-test.sh` with this build's binary: a job array on a one-node Slurm cluster,
//! one task killed and resubmitted with --resume, merged, equals the one-process run byte for
//! byte. The script installs Slurm and munge from Debian's packages when they are missing.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn a_killed_and_resubmitted_slurm_array_equals_one_process() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-test.sh");
    let out = common::output(Command::new(&script).env("MCDM_BIN", env!("CARGO_BIN_EXE_mcdm")));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{printed}");
    if out.status.code() == Some(77) {
        common::skip(
            "slurm",
            "Slurm is not installed and cannot be installed here",
        );
        return;
    }
    assert!(
        out.status.success(),
        "scripts/slurm-test.sh failed:\n{printed}"
    );
    assert!(printed.contains("PASS: the merged shards equal the one-process run byte for byte"));
}
