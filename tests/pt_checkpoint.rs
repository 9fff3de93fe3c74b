//! PyTorch checkpoints (`torch.save` zip files, made by tools/make_pt_fixtures.py with torch
//! itself) read without Python: the same numbers as the safetensors they were made from, the
//! same samples, and clear refusals of what a state_dict reader must not run or cannot read.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixtures;
use mcdm::weights::{SafetensorsFile, StorageDtype};

fn pt(name: &str) -> std::path::PathBuf {
    fixtures(&format!("pt/{name}"))
}

/// Every tensor of `a` is in `b` with the same name, dtype, shape and values, and no more.
fn same_tensors(a: &SafetensorsFile, b: &SafetensorsFile) {
    let names: Vec<&str> = a.names().collect();
    assert_eq!(names, b.names().collect::<Vec<_>>());
    for name in names {
        assert_eq!(a.dtype(name).unwrap(), b.dtype(name).unwrap(), "{name}");
        assert_eq!(a.shape(name).unwrap(), b.shape(name).unwrap(), "{name}");
        match a.dtype(name).unwrap() {
            StorageDtype::I64 => assert_eq!(a.i64(name).unwrap(), b.i64(name).unwrap(), "{name}"),
            _ => assert_eq!(a.f32(name).unwrap(), b.f32(name).unwrap(), "{name}"),
        }
    }
}

#[test]
fn state_dicts_hold_the_numbers_of_their_safetensors() {
    let source = SafetensorsFile::open(&fixtures("sample/models/uncond.safetensors")).unwrap();
    // A plain state_dict, and one wrapped under "model" with a `module.` prefix.
    for name in ["uncond_f16.pt", "uncond_wrapped.pt"] {
        same_tensors(&SafetensorsFile::open(&pt(name)).unwrap(), &source);
    }
    // f32 at an offset into a larger storage, bf16, i64 and a 0-dimensional tensor.
    let small = SafetensorsFile::open(&pt("small.pt")).unwrap();
    same_tensors(
        &small,
        &SafetensorsFile::open(&pt("small.safetensors")).unwrap(),
    );
    assert_eq!(small.dtype("b").unwrap(), StorageDtype::BF16);
}

fn mcdm(args: &[&str]) -> (Option<i32>, String) {
    let out = common::output(Command::new(env!("CARGO_BIN_EXE_mcdm")).args(args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mcdm sample --model u=M.pt` gives the images of the safetensors model, and records the
/// checkpoint's own hash.
#[test]
fn a_checkpoint_samples_as_its_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixtures("sample/models/uncond.json");
    let run = |model: &Path, out: &str| {
        // The config beside the checkpoint, as for safetensors (<stem>.json).
        let beside = model.with_extension("json");
        if !beside.exists() {
            std::fs::copy(&config, &beside).unwrap();
        }
        let out = dir.path().join(out);
        let tensor = out.with_extension("safetensors");
        let (code, err) = mcdm(&[
            "sample",
            "--device",
            "cpu",
            "--model",
            &format!("u={}", model.display()),
            "--uncond",
            "u",
            "--steps",
            "3",
            "--num-samples",
            "2",
            "--out",
            &out.display().to_string(),
            "--save-tensor",
            &tensor.display().to_string(),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("record.json")).unwrap())
                .unwrap();
        let samples = SafetensorsFile::open(&tensor)
            .unwrap()
            .f32("samples")
            .unwrap();
        (
            samples,
            record["models"]["u"]["sha256"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let checkpoint = dir.path().join("u.pt");
    std::fs::copy(pt("uncond_wrapped.pt"), &checkpoint).unwrap();
    let (from_pt, hash) = run(&checkpoint, "pt");
    let (from_safetensors, _) = run(&fixtures("sample/models/uncond.safetensors"), "st");
    assert_eq!(from_pt, from_safetensors);
    use sha2::Digest;
    let want = format!(
        "{:x}",
        sha2::Sha256::digest(std::fs::read(&checkpoint).unwrap())
    );
    assert_eq!(hash, want);
}

/// What a state_dict reader must not run, cannot map or cannot trust is refused, naming why.
#[test]
fn bad_checkpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let open_err = |path: &Path| {
        SafetensorsFile::open(path)
            .err()
            .expect("refused")
            .to_string()
    };
    let err = open_err(&pt("evil.pt"));
    assert!(
        err.contains("it calls `posix.system`, which a state_dict does not"),
        "{err}"
    );
    let err = open_err(&pt("transposed.pt"));
    assert!(
        err.contains("`t` is not contiguous (shape [2, 3], strides [1, 2])"),
        "{err}"
    );
    let err = open_err(&pt("short.pt"));
    assert!(
        err.contains(
            "`a` (shape [3, 4] at element 8) runs past the end of its storage of 16 bytes"
        ),
        "{err}"
    );
    // Cut short: the zip's directory (at its end) is gone.
    let bytes = std::fs::read(pt("uncond_f16.pt")).unwrap();
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_err(&cut);
    assert!(
        err.contains("a PyTorch checkpoint mcdm cannot read: not a whole zip file"),
        "{err}"
    );
    // The legacy format of torch < 1.6 starts with a pickled magic number.
    let legacy = dir.path().join("legacy.pt");
    std::fs::write(
        &legacy,
        b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.",
    )
    .unwrap();
    let err = open_err(&legacy);
    assert!(
        err.contains("the legacy format of torch < 1.6: convert it with tools/convert_pt.py"),
        "{err}"
    );
    // Nothing ran: the evil checkpoint's command would have printed.
    let (code, err) = mcdm(&["inspect", &pt("evil.pt").display().to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("must never run"), "{err}");
}

/// `mcdm convert` writes a checkpoint as safetensors: the same tensors in the storage type
/// asked, and a config that loads it as the original loads.
#[test]
fn convert_writes_the_checkpoint_as_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixtures("sample/models/uncond.json").display().to_string();
    let source = SafetensorsFile::open(&fixtures("sample/models/uncond.safetensors")).unwrap();
    for dtype in ["f16", "bf16", "f32"] {
        let out = dir.path().join(format!("u-{dtype}.safetensors"));
        let (code, err) = mcdm(&[
            "convert",
            &pt("uncond_wrapped.pt").display().to_string(),
            &out.display().to_string(),
            "--dtype",
            dtype,
            "--config",
            &config,
        ]);
        assert_eq!(code, Some(0), "{err}");
        let converted = SafetensorsFile::open(&out).unwrap();
        // f16 and f32 hold the f16 weights exactly; bf16 rounds them.
        if dtype != "bf16" {
            let names: Vec<&str> = converted.names().collect();
            for name in names {
                assert_eq!(
                    converted.f32(name).unwrap(),
                    source.f32(name).unwrap(),
                    "{name}"
                );
            }
        } else {
            assert_eq!(converted.dtype("out.2.weight").unwrap(), StorageDtype::BF16);
        }
        // Its config (in the metadata and beside it) loads it as the original's loads it.
        let a = mcdm::model::load_model(&out, None).unwrap();
        let b =
            mcdm::model::load_model(&fixtures("sample/models/uncond.safetensors"), None).unwrap();
        assert_eq!(
            a.config.unet.to_json(&a.config.diffusion),
            b.config.unet.to_json(&b.config.diffusion)
        );
        assert!(out.with_extension("json").is_file());
    }
    // Over its own input: refused before anything is written.
    let input = dir.path().join("in.pt");
    std::fs::copy(pt("uncond_f16.pt"), &input).unwrap();
    let s = input.display().to_string();
    let (code, err) = mcdm(&["convert", &s, &s]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the file given to INPUT"), "{err}");
}
