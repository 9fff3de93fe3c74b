//! Inputs under faults: a FIFO and `/dev/zero` as every input flag, files past the size limit,
//! safetensors headers that break the format, out-of-range configs, too many experts, and the
//! warnings for what is legal but likely a mistake.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mcdm::weights::{write_safetensors, SafetensorsFile, TensorData};

use crate::common::{self, fixtures};
use crate::{mcdm, mcdm_within, sample_args, uncond_path};

/// A refusal takes well under a second; a FIFO opened for reading would block forever.
const QUICK: Duration = Duration::from_secs(20);

fn fixture_model(name: &str) -> PathBuf {
    fixtures(&format!("sample/models/{name}.safetensors"))
}

/// Runs `args` within [`QUICK`], expecting exit 1 with each of `needles` in its message;
/// returns the message.
fn refused(args: &[&str], needles: &[&str]) -> String {
    let out = mcdm_within(args, QUICK);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{args:?}: message lacks `{needle}`:\n{err}"
        );
    }
    err
}

/// How many lines of `err` are warnings holding `needle`.
fn warnings(err: &str, needle: &str) -> usize {
    err.lines()
        .filter(|l| l.starts_with("warning: ") && l.contains(needle))
        .count()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// `sample` with the unconditional fixture model as `u` and the sketch model as `s`, plus
/// `extra`, one image of 2 steps into `out`.
fn sample_with(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = sample_args(&uncond_path(), out, 1, 2);
    args.extend([
        "--model".into(),
        format!("s={}", fixture_model("sketch").display()),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A FIFO (which would block a reader forever) and `/dev/zero` (which never ends) given to
/// every flag that names an input file: each is refused at once, naming the file and what it
/// is, before anything reads from it.
#[test]
fn fifos_and_devices_as_every_input_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    // PNG conditions are told by their extension: links give the FIFO and the device one.
    let (fifo_png, zero_png) = (dir.path().join("fifo.png"), dir.path().join("zero.png"));
    std::os::unix::fs::symlink(&fifo, &fifo_png).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &zero_png).unwrap();
    let out = dir.path().join("out").display().to_string();
    let model = uncond_path().display().to_string();
    let unet = fixtures("unet/classcond_sigma_headsup_bf16.safetensors");
    let unet_input = fixtures("unet/classcond_sigma_headsup_bf16.io.safetensors");
    let (unet, unet_input) = (unet.display().to_string(), unet_input.display().to_string());
    let forward_out = dir.path().join("f.safetensors").display().to_string();
    for (path, png, kind) in [
        (fifo.as_path(), fifo_png.as_path(), "a FIFO"),
        (
            Path::new("/dev/zero"),
            zero_png.as_path(),
            "a character device",
        ),
    ] {
        let (p, png) = (path.display().to_string(), png.display().to_string());
        let is_kind = format!("not a regular file: it is {kind}");
        let sample = |extra: &[&str]| sample_with(Path::new(&out), extra);
        let cases: Vec<Vec<String>> = vec![
            vec!["sample".into(), "--job".into(), p.clone()],
            sample(&["--model", &format!("x={p}"), "--expert", "x"]),
            sample(&["--expert", &format!("s,image={png}")]),
            sample(&["--expert", &format!("s,image={p}")]),
            sample(&["--expert", &format!("u,embedding={p}")]),
            sample(&["--init-noise", &p]),
            [
                "forward",
                "--model",
                &unet,
                "--input",
                &p,
                "--output",
                &forward_out,
            ]
            .map(String::from)
            .to_vec(),
            [
                "forward",
                "--model",
                &p,
                "--input",
                &unet_input,
                "--output",
                &forward_out,
            ]
            .map(String::from)
            .to_vec(),
            ["inspect", &model, "--config", &p]
                .map(String::from)
                .to_vec(),
            vec!["inspect".into(), p.clone()],
            ["encode-text", "--text-file", &p, "--output", &forward_out]
                .map(String::from)
                .to_vec(),
            ["bench", "--device", "cpu", "--config", &p]
                .map(String::from)
                .to_vec(),
        ];
        for args in cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let named = if args.iter().any(|a| a.contains(&png)) {
                &png
            } else {
                &p
            };
            refused(&args, &[named, &is_kind]);
        }
    }
    assert!(
        !dir.path().join("out").exists(),
        "a refused run left its output folder"
    );
}

/// `mcdm` with `MCDM_MAX_INPUT_MB` set to `limit`, within [`QUICK`].
fn with_limit(limit: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = common::output_within(
        Command::new(env!("CARGO_BIN_EXE_mcdm"))
            .env("MCDM_MAX_INPUT_MB", limit)
            .args(args),
        QUICK,
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A file past the size limit is refused before it is read, naming its size, the limit and
/// how to raise it; raising the limit lets it through.
#[test]
fn files_past_the_size_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    // A valid job and a valid text file, padded to 2 MiB.
    let pad = " ".repeat(2 << 20);
    std::fs::write(p("job.json"), format!("{{\"steps\": 2}}{pad}")).unwrap();
    std::fs::write(p("texts.txt"), format!("a face{pad}")).unwrap();
    let too_large = |what: &str| {
        format!("the {what} is 2.0 MiB, more than the 1.0 MiB mcdm reads (set MCDM_MAX_INPUT_MB to raise the limit)")
    };
    for (args, what, file) in [
        (
            vec!["sample", "--job", &p("job.json")],
            "job file",
            p("job.json"),
        ),
        (
            vec![
                "encode-text",
                "--text-file",
                &p("texts.txt"),
                "--output",
                &p("e.safetensors"),
            ],
            "text file",
            p("texts.txt"),
        ),
    ] {
        let (code, err) = with_limit("1", &args);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&file) && err.contains(&too_large(what)),
            "{err}"
        );
        // Under a limit of 3 MiB the file is read (what follows may fail for other reasons:
        // the job names no model, and the text model is past that limit).
        let (_, err) = with_limit("3", &args);
        assert!(!err.contains(&format!("{file}: the {what}")), "{err}");
    }
    let (code, err) = with_limit("lots", &["inspect", &uncond_path().display().to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("MCDM_MAX_INPUT_MB=lots: expected a positive number of MiB"),
        "{err}"
    );
}

/// A safetensors file of `header` and `data_len` zero bytes of data at `path`.
fn write_header(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

/// Headers that break the format each get their own message, not "not safetensors".
#[test]
fn broken_headers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let s = path.display().to_string();
    let tensor = |name: &str, dtype: &str, shape: &str, offsets: &str| {
        format!(r#""{name}":{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}}}"#)
    };
    let good = tensor("out.2.bias", r#""F32""#, "[2]", "[0,8]");
    for (header, needle) in [
        (
            format!(
                "{{{good},{}}}",
                tensor("out.2.bias", r#""I64""#, "[1]", "[8,16]")
            ),
            "tensor `out.2.bias` is given twice in the header",
        ),
        (
            format!("{{{}}}", tensor("a", r#""F31""#, "[2]", "[0,8]")),
            "tensor `a` has unknown dtype \"F31\"",
        ),
        (
            format!("{{{}}}", tensor("a", r#""F32""#, "[2]", "[-8,8]")),
            "tensor `a` has data_offsets [-8,8]: expected [begin, end], byte offsets",
        ),
        (
            format!("{{{}}}", tensor("a", r#""F32""#, "[2]", "[0,16]")),
            "tensor `a`: its byte range [0, 16] (16 bytes) does not hold its shape [2] of F32",
        ),
        (
            format!("{{{}}}", tensor("a", r#""F32""#, "[-1,2]", "[0,8]")),
            "tensor `a` has shape [-1,2]: a shape is a list of sizes (non-negative integers)",
        ),
        (
            format!(r#"{{"__metadata__":{{"config":{{"image_size":16}}}},{good}}}"#),
            "`__metadata__` values must be strings, but `config` is {\"image_size\":16}",
        ),
    ] {
        write_header(&path, &header, 16);
        let err = refused(&["inspect", &s], &[&s, needle]);
        assert!(!err.contains("convert_pt"), "{header}: {err}");
    }
    // An empty file is not safetensors: it is too short to hold a header length.
    std::fs::write(&path, b"").unwrap();
    refused(
        &["inspect", &s],
        &["truncated, or not safetensors: its 0 bytes"],
    );
}

/// The unconditional fixture's config with `key` set to `value`, written to `dir`.
fn config_with(dir: &Path, key: &str, value: serde_json::Value) -> String {
    let path = fixtures("sample/models/uncond.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    config[key] = value;
    let out = dir.join(format!("{key}.json"));
    std::fs::write(&out, config.to_string()).unwrap();
    out.display().to_string()
}

/// Config values out of their range are errors naming the field and the range.
#[test]
fn out_of_range_config_values_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = uncond_path().display().to_string();
    for (key, value, needle) in [
        ("dropout", serde_json::json!(5.0), "dropout must be in [0, 1) (a probability), got 5"),
        (
            "embed_dim",
            serde_json::json!(0),
            "embed_dim must be positive, got 0 (leave it out for a model without a vector condition)",
        ),
    ] {
        let config = config_with(dir.path(), key, value);
        refused(&["inspect", &model, "--config", &config], &["invalid config", needle]);
    }
}

/// A job of 200,000 experts, or more than 64 --expert flags, is refused before any model is
/// read.
#[test]
fn the_number_of_experts_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.json");
    let experts: Vec<serde_json::Value> = (0..200_000)
        .map(|_| serde_json::json!({"model": "u"}))
        .collect();
    let text = serde_json::json!({"models": {"u": "missing.safetensors"}, "uncond": {"model": "u"},
        "experts": experts});
    std::fs::write(&job, text.to_string()).unwrap();
    refused(
        &["sample", "--job", &job.display().to_string()],
        &["job file: `experts`: 200000 experts, more than the 64 one run composes"],
    );
    let out = dir.path().join("out");
    let mut args = sample_args(Path::new("missing.safetensors"), &out, 1, 2);
    for _ in 0..65 {
        args.extend(["--expert".to_string(), "u".to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(
        &args,
        &["--expert: 65 experts, more than the 64 one run composes"],
    );
}

/// The unconditional fixture model rewritten without its `config` metadata and with no JSON
/// beside it: image size and schedule are then defaults.
fn uncond_without_config(dir: &Path) -> PathBuf {
    let file = SafetensorsFile::open(&uncond_path()).unwrap();
    let values: Vec<(String, Vec<usize>, Vec<f32>)> = file
        .names()
        .map(|n| {
            (
                n.to_string(),
                file.shape(n).unwrap().to_vec(),
                file.f32(n).unwrap(),
            )
        })
        .collect();
    let tensors: Vec<(&str, TensorData<'_>)> = values
        .iter()
        .map(|(n, s, v)| (n.as_str(), TensorData::F32(s.clone(), v)))
        .collect();
    let path = dir.join("bare.safetensors");
    write_safetensors(&path, &tensors, None).unwrap();
    path
}

/// A model whose config leaves out the image size and the schedule samples, with one warning
/// naming the defaults taken.
#[test]
fn defaulted_image_size_and_schedule_are_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let bare = uncond_without_config(dir.path());
    let args = sample_args(&bare, &dir.path().join("out"), 1, 2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = mcdm(&args);
    assert_eq!(code, Some(0), "{err}");
    let want = format!(
        "warning: model `u` ({0}): not in its config, so defaulted: image_size 64, \
         noise_schedule linear, diffusion_steps 1000 (the images depend on them; give them in \
         its config if the model was trained otherwise) (see mcdm inspect {0})",
        bare.display()
    );
    assert_eq!(err.lines().filter(|l| *l == want).count(), 1, "{err}");
    assert_eq!(warnings(&err, "defaulted"), 1, "{err}");
}

/// Writes `cond` [1, 16, 16] filled with `value` (a sketch condition) to `path`.
fn write_filled(path: &Path, name: &str, shape: Vec<usize>, value: f32) {
    let data = vec![value; shape.iter().product()];
    write_safetensors(path, &[(name, TensorData::F32(shape, &data))], None).unwrap();
}

/// A huge weight, image condition and initial noise, and a PNG's dropped alpha channel, each
/// give one warning; the run still samples.
#[test]
fn suspicious_values_are_warned_of_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    write_filled(
        Path::new(&p("cond.safetensors")),
        "cond",
        vec![1, 16, 16],
        50.0,
    );
    write_filled(
        Path::new(&p("noise.safetensors")),
        "x_T",
        vec![1, 3, 16, 16],
        1000.0,
    );
    // A gray+alpha PNG as the second sketch.
    {
        let file = std::fs::File::create(p("sketch.png")).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 16, 16);
        enc.set_color(png::ColorType::GrayscaleAlpha);
        enc.set_depth(png::BitDepth::Eight);
        let pixels: Vec<u8> = (0..256).flat_map(|i| [(i % 2) as u8 * 255, 128]).collect();
        enc.write_header()
            .unwrap()
            .write_image_data(&pixels)
            .unwrap();
    }
    let args = sample_with(
        &dir.path().join("out"),
        &[
            // The unconditional model as its own expert: eps_u + 25 (eps_u - eps_u) is eps_u.
            "--expert",
            "u,weight=25",
            "--expert",
            &format!("s,image={},weight=0.5", p("cond.safetensors")),
            "--expert",
            &format!("s,image={},weight=0.5", p("sketch.png")),
            "--init-noise",
            &p("noise.safetensors"),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = mcdm(&args);
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "warning: expert `u` has weight 25: past ±20 one expert swamps the other terms",
        &format!(
            "warning: image condition of `s` ({}): values reach 5e1, far outside the [-1, 1] \
             images are scaled to",
            p("cond.safetensors")
        ),
        &format!(
            "warning: image condition of `s`: {}: the PNG's alpha channel is dropped (only its \
             gray or RGB values are read)",
            p("sketch.png")
        ),
        &format!(
            "warning: --init-noise: initial noise {}: values reach 1e3, far past standard normal \
             noise (more than 100)",
            p("noise.safetensors")
        ),
    ] {
        assert_eq!(
            err.lines().filter(|l| *l == needle).count(),
            1,
            "`{needle}` in:\n{err}"
        );
    }
    assert_eq!(warnings(&err, ""), 4, "{err}");
}

/// An embedding of absurd magnitude gives one warning.
#[test]
fn a_huge_embedding_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let embedding = dir.path().join("e.safetensors");
    write_filled(&embedding, "embedding", vec![16], 2e4);
    let mut args = sample_args(&uncond_path(), &dir.path().join("out"), 1, 2);
    args.extend([
        "--model".into(),
        format!("t={}", fixture_model("text").display()),
        "--expert".into(),
        format!("t,embedding={}", embedding.display()),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = mcdm(&args);
    assert_eq!(code, Some(0), "{err}");
    let want = format!(
        "warning: embedding of `t` ({}): values reach 2e4, an absurd magnitude for an \
         embedding (more than 1e4)",
        embedding.display()
    );
    assert_eq!(err.lines().filter(|l| *l == want).count(), 1, "{err}");
    assert_eq!(warnings(&err, ""), 1, "{err}");
}

/// An empty prompt and one past the encoder's 256 tokens each give one warning, the latter
/// with how many tokens are lost.
#[test]
fn empty_and_cut_prompts_are_warned_of() {
    if common::text_tests_skipped("prompt warnings") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let weights = |m: &str| {
        format!(
            "{m}={}",
            root.join(format!("weights/{m}.safetensors")).display()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").display().to_string();
    // 300 words of one token each, with [CLS] and [SEP]: 302 tokens, 46 past 256.
    let long = vec!["face"; 300].join(" ");
    let (code, err) = mcdm(&[
        "sample",
        "--device",
        "cpu",
        "--model",
        &weights("uncond"),
        "--model",
        &weights("text"),
        "--uncond",
        "uncond",
        "--expert",
        "text,text=",
        "--expert",
        &format!("text,text={long}"),
        "--steps",
        "2",
        "--num-samples",
        "1",
        "--out",
        &out,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let empty =
        "warning: `text`: its text= prompt is empty: the embedding of no words conditions it";
    let cut = "warning: text= prompt \"face face face face face face face face \"... is 302 \
               tokens, cut at the encoder's 256: its last 46 tokens are ignored";
    for want in [empty, cut] {
        assert_eq!(
            err.lines().filter(|l| *l == want).count(),
            1,
            "`{want}` in:\n{err}"
        );
    }
    assert_eq!(warnings(&err, ""), 2, "{err}");
}

/// A tensor in `forward`'s input that it does not read is named in one warning each.
#[test]
fn forward_warns_of_input_tensors_it_ignores() {
    let dir = tempfile::tempdir().unwrap();
    let case = "classcond_sigma_headsup_bf16";
    let io = SafetensorsFile::open(&fixtures(&format!("unet/{case}.io.safetensors"))).unwrap();
    let (x, t, y) = (
        io.f32("x").unwrap(),
        io.i64("t").unwrap(),
        io.i64("y").unwrap(),
    );
    let extra = [0.5f32; 3];
    let input = dir.path().join("in.safetensors");
    write_safetensors(
        &input,
        &[
            ("x", TensorData::F32(io.shape("x").unwrap().to_vec(), &x)),
            ("t", TensorData::I64(vec![3], &t)),
            ("y", TensorData::I64(vec![3], &y)),
            ("embedding", TensorData::F32(vec![3], &extra)),
        ],
        None,
    )
    .unwrap();
    let model = fixtures(&format!("unet/{case}.safetensors"))
        .display()
        .to_string();
    let output = dir.path().join("out.safetensors").display().to_string();
    let input = input.display().to_string();
    let (code, err) = mcdm(&[
        "forward", "--device", "cpu", "--model", &model, "--input", &input, "--output", &output,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let want = format!(
        "warning: input {input}: tensor `embedding` is not one forward reads (x, t, y, emb): \
         ignored"
    );
    assert_eq!(err.lines().filter(|l| *l == want).count(), 1, "{err}");
    assert_eq!(warnings(&err, ""), 1, "{err}");
}
