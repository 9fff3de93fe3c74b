//! `scripts/slurm-test.sh` with this build's binary: a job array on a one-node Slurm cluster,
//! one task killed and resubmitted with --resume, merged, equals the one-process run byte for
//! byte. The script installs Slurm and munge from Debian's packages when they are missing.

mod common;

#[test]
fn a_killed_and_resubmitted_slurm_array_equals_one_process() {
    let why = "Slurm is not installed and cannot be installed here";
    let Some(printed) = common::run_script("slurm-test.sh", &[], &[], "slurm", why) else {
        return;
    };
    assert!(printed.contains("PASS: the merged shards equal the one-process run byte for byte"));
}
