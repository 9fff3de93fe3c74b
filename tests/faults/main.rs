//! The binary under faults (#28): hostile and bad inputs (`inputs`), interrupted, failing and
//! misdirected outputs (`outputs`). Every case asserts the exit status, the message, and what is
//! left on disk.

#[path = "../common/mod.rs"]
mod common;
mod inputs;
mod outputs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// `mcdm` with `args`, within `limit`.
pub fn mcdm_within(args: &[&str], limit: Duration) -> Output {
    common::output_within(Command::new(env!("CARGO_BIN_EXE_mcdm")).args(args), limit)
}

/// The exit code and standard error of `mcdm` with `args` (a minute at most: every case here
/// runs in about a second).
pub fn mcdm(args: &[&str]) -> (Option<i32>, String) {
    let out = mcdm_within(args, Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The small unconditional fixture model (16x16).
pub fn uncond_path() -> PathBuf {
    common::fixtures("sample/models/uncond.safetensors")
}

/// A copy of the fixture model (with its config) in `dir`, to change or replace.
pub fn uncond_copy(dir: &Path) -> PathBuf {
    let model = dir.join("u.safetensors");
    std::fs::copy(uncond_path(), &model).unwrap();
    std::fs::copy(
        uncond_path().with_extension("json"),
        model.with_extension("json"),
    )
    .unwrap();
    model
}

/// `--model u=PATH` and `--uncond u` for the fixture model at `path`, on the CPU, `steps` steps.
pub fn sample_args(path: &Path, out: &Path, n: usize, steps: usize) -> Vec<String> {
    [
        "sample",
        "--device",
        "cpu",
        "--model",
        &format!("u={}", path.display()),
        "--uncond",
        "u",
        "--steps",
        &steps.to_string(),
        "--num-samples",
        &n.to_string(),
        "--out",
        &out.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}
