//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gpu;
pub mod process;

#[allow(unused_imports)]
pub use process::{output, output_within};

use std::path::{Path, PathBuf};

use mcdm::model::{load_model, Conditioning, LoadedModel};
use mcdm::weights::{SafetensorsFile, StorageDtype};

/// `tests/fixtures/<sub>`, or `$MCDM_FIXTURES/<sub>` for test executables run away from the
/// checkout they were built in (scripts/device-check.sh).
pub fn fixtures(sub: &str) -> PathBuf {
    std::env::var_os("MCDM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(sub)
}

/// `MCDM_REQUIRE_ALL_CHECKS=1` (set by `.ci/run`): a check that cannot run here fails instead of
/// skipping, so that a machine missing a tool cannot pass CI with that check unrun.
pub fn all_checks_required() -> bool {
    std::env::var("MCDM_REQUIRE_ALL_CHECKS").is_ok_and(|v| v == "1")
}

/// Says that `check` cannot run here and why: a skip message, or a failure under
/// `MCDM_REQUIRE_ALL_CHECKS=1`.
pub fn skip(check: &str, why: &str) {
    assert!(
        !all_checks_required(),
        "{check}: cannot run: {why} (MCDM_REQUIRE_ALL_CHECKS=1 requires every check)"
    );
    eprintln!("{check}: skipped, {why}");
}

/// Runs `scripts/<script>` with `args` and `env`, this build's CLI as `MCDM_BIN`, and returns
/// what it printed (it is shown too); None after [`skip`] when the script exits 77, its way of
/// saying that what it needs cannot be installed here (`why`). Any other failure fails the test.
pub fn run_script(
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    check: &str,
    why: &str,
) -> Option<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let mut cmd = std::process::Command::new(&path);
    cmd.args(args).env("MCDM_BIN", env!("CARGO_BIN_EXE_mcdm"));
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = output(&mut cmd);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{printed}");
    if out.status.code() == Some(77) {
        skip(check, why);
        return None;
    }
    assert!(out.status.success(), "scripts/{script} failed:\n{printed}");
    Some(printed)
}

/// `MCDM_SKIP_TEXT_TESTS=1`: whether `check`, which needs the MiniLM model, is skipped (after
/// saying so; a failure under `MCDM_REQUIRE_ALL_CHECKS=1`).
pub fn text_tests_skipped(check: &str) -> bool {
    let skipped = std::env::var("MCDM_SKIP_TEXT_TESTS").is_ok_and(|v| v == "1");
    if skipped {
        skip(check, "MCDM_SKIP_TEXT_TESTS=1");
    }
    skipped
}

/// A measured error against a reference, printed with its bound (`cargo test -- --nocapture`
/// shows them all); fails above the bound or on NaN. Bounds are set at a stated multiple (at
/// most 10x) of the error measured when they were set, so that a kernel or formula gone
/// slightly wrong still fails.
pub fn within(what: &str, err: f64, bound: f64) {
    eprintln!("{what}: {err:.2e} (bound {bound:.0e})");
    assert!(
        err <= bound,
        "{what}: {err:.3e} is over its bound {bound:.0e}"
    );
}

/// ||a - b|| / ||b||; NaN when `a` holds a NaN.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    assert!(
        b.iter().all(|v| v.is_finite()),
        "the reference is not finite"
    );
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    assert!(
        den > 0.0,
        "reference is all zeros: the test would prove nothing"
    );
    (num / den).sqrt()
}

/// A float tensor stored as f32 / i64 in a fixture, as f32.
pub fn read_f32(file: &SafetensorsFile, name: &str) -> Vec<f32> {
    match file.dtype(name).unwrap() {
        StorageDtype::I64 => file
            .i64(name)
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        _ => file.f32(name).unwrap(),
    }
}

/// The forward cases of tests/fixtures/unet (`<name>.safetensors` + `<name>.io.safetensors`,
/// made by tools/make_unet_fixtures.py), sorted.
pub fn unet_case_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures("unet"))
        .expect("fixtures/unet")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".io.safetensors").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 6,
        "expected the reference fixtures, found {names:?}"
    );
    names
}

/// One reference forward case: the model, its inputs and guided-diffusion's output.
pub struct UnetCase {
    pub model: LoadedModel,
    pub shape: [usize; 4],
    pub x: Vec<f32>,
    pub t: Vec<f32>,
    pub y: Option<Vec<i64>>,
    pub emb: Option<Vec<f32>>,
    pub out: Vec<f32>,
}

impl UnetCase {
    pub fn load(name: &str) -> Self {
        let model = load_model(&fixtures(&format!("unet/{name}.safetensors")), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = SafetensorsFile::open(&fixtures(&format!("unet/{name}.io.safetensors"))).unwrap();
        UnetCase {
            model,
            shape: io.shape("x").unwrap().try_into().unwrap(),
            x: io.f32("x").unwrap(),
            t: read_f32(&io, "t"),
            y: io.contains("y").then(|| io.i64("y").unwrap()),
            emb: io.contains("emb").then(|| io.f32("emb").unwrap()),
            out: io.f32("out").unwrap(),
        }
    }

    pub fn conditioning(&self) -> Conditioning<'_> {
        Conditioning {
            timesteps: &self.t,
            labels: self.y.as_deref(),
            embedding: self.emb.as_deref(),
        }
    }
}
