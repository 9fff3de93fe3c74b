//! diffusers `UNet2DModel` folders (fixtures saved by diffusers itself with random weights,
//! `tools/make_diffusers_fixtures.py`): the forward pass matches diffusers' at rel L2 <= 1e-4,
//! the schedule comes from the scheduler config, a folder samples and composes from the CLI,
//! and what guided-diffusion's network cannot express is refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, rel_l2, within};
use mcdm::device::Workspace;
use mcdm::model::{load_model, Conditioning};
use mcdm::weights::SafetensorsFile;

const CASES: &[&str] = &[
    "attn_scale_shift_classes",
    "default_pipeline",
    "resnet_updown",
    "ddpm_sin_first",
    "groups_4",
];

/// f32 rel L2 against diffusers' forward: measured at most 1.4e-6 (2026-12-06).
const FORWARD_BOUND: f64 = 1e-5;

#[test]
fn forward_matches_diffusers() {
    let mut ws = Workspace::new();
    for name in CASES {
        let dir = fixtures(&format!("diffusers/{name}"));
        let model = load_model(&dir, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = SafetensorsFile::open(&dir.join("io.safetensors")).unwrap();
        let shape: [usize; 4] = io.shape("x").unwrap().try_into().unwrap();
        let labels = io.contains("y").then(|| io.i64("y").unwrap());
        let t = io.f32("t").unwrap();
        let cond = Conditioning {
            timesteps: &t,
            labels: labels.as_deref(),
            embedding: None,
        };
        let out = model
            .forward_nchw(&io.f32("x").unwrap(), shape, &cond, &mut ws)
            .unwrap();
        within(
            &format!("{name}: forward vs diffusers UNet2DModel, rel L2"),
            rel_l2(&out, &io.f32("out").unwrap()),
            FORWARD_BOUND,
        );
    }
}

#[test]
fn schedules_come_from_the_scheduler_config() {
    let config = |name: &str| {
        load_model(&fixtures(&format!("diffusers/{name}")), None)
            .unwrap()
            .config
    };
    let c = config("attn_scale_shift_classes");
    assert_eq!(c.diffusion.noise_schedule.name(), "cosine");
    assert_eq!(c.diffusion.diffusion_steps, 1000);
    assert!(c.unet.learn_sigma && c.unet.use_scale_shift_norm);
    // A pipeline folder: unet/ and scheduler/.
    let c = config("default_pipeline");
    assert_eq!(c.diffusion.noise_schedule.name(), "linear");
    assert_eq!(c.diffusion.diffusion_steps, 100);
    // diffusers' DDPM layout: its time features and group-norm eps become config extensions.
    let c = config("ddpm_sin_first");
    assert!(!c.unet.flip_sin_to_cos);
    assert_eq!((c.unet.freq_shift, c.unet.norm_eps), (1.0, 1e-6));
    assert!(!c.diffusion.sigma_small, "variance_type fixed_large");
    assert_eq!(c.unet.norm_num_groups, 32);
    assert_eq!(config("groups_4").unet.norm_num_groups, 4);
    // No scheduler config: the schedule is the default, and said to be.
    let c = config("resnet_updown");
    assert!(c
        .default_warning()
        .is_some_and(|w| w.contains("noise_schedule")));
}

fn mcdm(args: &[&str]) -> (bool, String) {
    let out = common::output(Command::new(env!("CARGO_BIN_EXE_mcdm")).args(args));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--model u=DIR` samples and composes with a guided-diffusion expert of the same schedule,
/// and gives the samples of the same model converted to safetensors (`mcdm convert DIR`).
#[test]
fn a_folder_samples_and_composes_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures("diffusers/default_pipeline");
    let converted = tmp.path().join("u.safetensors");
    let (ok, err) = mcdm(&[
        "convert",
        dir.to_str().unwrap(),
        converted.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let classes = fixtures("sample/models/classes.safetensors");
    let run = |model: &Path, out: &str| {
        let tensor = tmp.path().join(format!("{out}.safetensors"));
        let (ok, err) = mcdm(&[
            "sample",
            "--device",
            "cpu",
            "--model",
            &format!("u={}", model.display()),
            "--model",
            &format!("c={}", classes.display()),
            "--uncond",
            "u",
            "--expert",
            "c,class=3,weight=1.5",
            "--steps",
            "4",
            "--num-samples",
            "2",
            "--seed",
            "3",
            "--out",
            tmp.path().join(out).to_str().unwrap(),
            "--save-tensor",
            tensor.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        SafetensorsFile::open(&tensor)
            .unwrap()
            .f32("samples")
            .unwrap()
    };
    let from_folder = run(&dir, "folder");
    assert!(
        from_folder == run(&converted, "converted"),
        "the folder and its conversion differ"
    );
    let record = std::fs::read_to_string(tmp.path().join("folder/record.json")).unwrap();
    assert!(record.contains("default_pipeline"), "{record}");
}

/// A copy of fixture `name` in `tmp` with its config.json edited by `edit`.
fn edited(tmp: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let from = fixtures(&format!("diffusers/{name}"));
    let to = tmp.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in [
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
    ] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    to
}

#[test]
fn what_guided_diffusion_cannot_express_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let fails = |dir: &Path, needle: &str| match load_model(dir, None) {
        Ok(_) => panic!("{}: loaded, expected `{needle}`", dir.display()),
        Err(e) => assert!(e.to_string().contains(needle), "`{needle}` not in: {e}"),
    };
    let name = "attn_scale_shift_classes";
    let set = |key: &'static str, value: serde_json::Value| {
        move |c: &mut serde_json::Value| c[key] = value.clone()
    };
    for (key, value, needle) in [
        (
            "flip_sin_to_cos",
            serde_json::json!("yes"),
            "`flip_sin_to_cos` must be true or false",
        ),
        (
            "freq_shift",
            serde_json::json!(16),
            "freq_shift must be below half the time features (16), got 16",
        ),
        (
            "norm_num_groups",
            serde_json::json!(16),
            "`attn_norm_num_groups` 32 differs from `norm_num_groups` 16",
        ),
        (
            "act_fn",
            serde_json::json!("gelu"),
            "`act_fn` \"gelu\" is not supported",
        ),
        (
            "attn_norm_num_groups",
            serde_json::Value::Null,
            "mid-block attention without group norm",
        ),
        (
            "_class_name",
            serde_json::json!("UNet2DConditionModel"),
            "only the pixel-space UNet2DModel",
        ),
        (
            "down_block_types",
            serde_json::json!(["DownBlock2D", "CrossAttnDownBlock2D"]),
            "down block type `CrossAttnDownBlock2D` is not supported",
        ),
        (
            "up_block_types",
            serde_json::json!(["UpBlock2D", "UpBlock2D"]),
            "differ in attention",
        ),
        (
            "layers_per_block",
            serde_json::json!(2),
            "the weights do not fit config.json: it asks for",
        ),
    ] {
        let dir = edited(tmp.path(), name, set(key, value));
        fails(&dir, needle);
    }
    // A group count that does not divide a level's channels (16 and 32).
    let dir = edited(
        tmp.path(),
        "groups_4",
        set("norm_num_groups", serde_json::json!(12)),
    );
    fails(&dir, "level width 16 (channel_mult [1.0, 2.0] x num_channels 16) is not a positive multiple of 12");
    // A folder that is not a diffusers model, and one without its weights.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(&empty, "it is a directory without config.json");
    let dir = edited(tmp.path(), name, |_| {});
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    fails(&dir, "no diffusion_pytorch_model.safetensors");
}
