//! Job files from the library: `Job::composition` and `Job::settings` make the sampler that
//! `mcdm sample --job` runs, and refuse what the CLI refuses.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use mcdm::job::compose::DEFAULT_RESPACING;
use mcdm::job::{Job, Sampler};
use mcdm::weights::SafetensorsFile;
use mcdm::{DType, Device};

fn default_job() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/default.json")
}

fn job(json: &str) -> Job {
    Job::parse(json, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn fails<T>(result: mcdm::Result<T>, needle: &str) {
    match result {
        Ok(_) => panic!("expected an error containing `{needle}`"),
        Err(e) => assert!(e.to_string().contains(needle), "`{needle}` not in: {e}"),
    }
}

/// The shipped default job, 2 images of 5 steps: the library's samples are the CLI's, bit for
/// bit.
#[test]
fn a_job_samples_from_the_library_as_from_the_cli() {
    let job = Job::load(&default_job()).unwrap();
    let mut settings = job.settings().unwrap();
    assert_eq!(settings.sampler, Sampler::Ddpm);
    settings.timestep_respacing = Some("5".into());
    let composition = job.composition(2, &Device::Cpu, DType::F32, None).unwrap();
    assert_eq!(composition.size, [32, 32]);
    assert_eq!(composition.experts.len(), 3);
    assert!(composition.unused.is_empty());
    assert!(composition.text_model.is_none(), "the job has no prompt");
    let sampler = composition.sampler(composition.spec(&settings)).unwrap();
    assert_eq!(sampler.num_steps(), 5);
    let images = sampler.sample(2, 2, None, &mut |_| {}).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let tensor = dir.path().join("x.safetensors");
    let out = common::output(Command::new(env!("CARGO_BIN_EXE_mcdm")).args([
        "sample",
        "--job",
        default_job().to_str().unwrap(),
        "--num-samples",
        "2",
        "--steps",
        "5",
        "--device",
        "cpu",
        "--save-tensor",
        tensor.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = SafetensorsFile::open(&tensor)
        .unwrap()
        .f32("samples")
        .unwrap();
    assert_eq!(images.len(), 2 * 3 * 32 * 32);
    assert!(images == cli, "the library's samples differ from the CLI's");
}

#[test]
fn settings_take_the_cli_defaults() {
    let j = job(r#"{"models": {}, "uncond": {"model": "u"}}"#);
    let s = j.settings().unwrap();
    assert_eq!(s.sampler, Sampler::Ddim);
    assert_eq!(
        (s.eta, s.karras, s.clip_denoised, s.seed),
        (0.0, false, true, 0)
    );
    assert_eq!(s.timestep_respacing, None);
    let s = job(r#"{"steps": 12, "sampler": "dpmpp-2m", "karras": true, "seed": 3}"#)
        .settings()
        .unwrap();
    assert_eq!(s.timestep_respacing.as_deref(), Some("12"));
    assert!(s.karras);
    assert_eq!(s.seed, 3);
    assert_eq!(DEFAULT_RESPACING, "50");
}

#[test]
fn settings_refuse_what_the_cli_refuses() {
    fails(
        job(r#"{"sampler": "ddpm", "eta": 0.5}"#).settings(),
        "is a DDIM setting",
    );
    fails(
        job(r#"{"eta": 1.5}"#).settings(),
        "between 0 (deterministic) and 1",
    );
    fails(
        job(r#"{"sampler": "ddim", "karras": true}"#).settings(),
        "`karras` chooses a solver's sigmas",
    );
    fails(
        job(r#"{"steps": 0}"#).settings(),
        "`steps` must be positive",
    );
}

#[test]
fn compositions_name_what_is_missing() {
    let cpu = Device::Cpu;
    fails(
        job(r#"{"models": {}}"#).composition(1, &cpu, DType::F32, None),
        "no `uncond` term",
    );
    fails(
        job(r#"{"models": {"u": "weights/uncond.safetensors"}, "uncond": {"model": "v"}}"#)
            .composition(1, &cpu, DType::F32, None),
        "unknown model `v`: the models are u",
    );
    fails(
        job(r#"{"models": {"u": "no/such.safetensors"}, "uncond": {"model": "u"}}"#).composition(
            1,
            &cpu,
            DType::F32,
            None,
        ),
        "loading model `u` from",
    );
    // A model no term uses is not loaded, and is named.
    let c = job(
        r#"{"models": {"u": "weights/uncond.safetensors", "x": "no/such.safetensors"},
                   "uncond": {"model": "u"}}"#,
    )
    .composition(1, &cpu, DType::F32, None)
    .unwrap();
    assert_eq!(c.unused, ["x"]);
    assert_eq!(c.sources.len(), 1);
}
