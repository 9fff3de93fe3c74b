//! Bad input to `mcdm forward` / `inspect`: a clear message naming the problem, a non-zero exit,
//! no panic, and no output file left behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

const CASE: &str = "classcond_sigma_headsup_bf16";

/// Raw tensors of a safetensors file: name -> (dtype, shape, bytes).
type Raw = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> (Raw, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut raw: Raw = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    (raw, meta.metadata().clone())
}

fn write_raw(path: &Path, raw: &Raw, meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, &meta).unwrap()).unwrap();
}

struct Run {
    code: Option<i32>,
    stderr: String,
}

fn mcdm(args: &[&str]) -> Run {
    let out = common::output(Command::new(env!("CARGO_BIN_EXE_mcdm")).args(args));
    Run {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs mcdm with `args`, expecting exit 1 with `needle` in the message.
fn fails(args: &[&str], needle: &str) {
    let r = mcdm(args);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "message lacks `{needle}`:\n{}",
        r.stderr
    );
}

/// A temp dir holding the case's weights (as `model.safetensors`, no JSON beside it unless
/// asked), its config and its reference input.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (src, dst) in [
            (format!("unet/{CASE}.safetensors"), "model.safetensors"),
            (format!("unet/{CASE}.json"), "config.json"),
            (format!("unet/{CASE}.io.safetensors"), "input.safetensors"),
        ] {
            std::fs::copy(fixtures(&src), dir.path().join(dst)).unwrap();
        }
        Setup { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
    /// Runs `forward` and checks it failed cleanly with a message containing `needle`.
    fn forward_fails(&self, needle: &str) {
        let r = mcdm(&[
            "forward",
            "--model",
            &self.s("model.safetensors"),
            "--config",
            &self.s("config.json"),
            "--input",
            &self.s("input.safetensors"),
            "--output",
            &self.s("out.safetensors"),
            "--device",
            "cpu",
        ]);
        assert_eq!(
            r.code,
            Some(1),
            "expected exit 1, got {:?}: {}",
            r.code,
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "message lacks `{needle}`:\n{}",
            r.stderr
        );
        let leftovers: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("out") || n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "output left behind: {leftovers:?}");
    }
    /// `mcdm inspect model.safetensors ARGS`'s output; it must succeed.
    fn inspect(&self, args: &[&str]) -> String {
        let out = common::output(
            Command::new(env!("CARGO_BIN_EXE_mcdm"))
                .args(["inspect", &self.s("model.safetensors")])
                .args(args),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn edit_weights(&self, f: impl FnOnce(&mut Raw)) {
        let (mut raw, meta) = read_raw(&self.path("model.safetensors"));
        f(&mut raw);
        write_raw(&self.path("model.safetensors"), &raw, meta);
    }
    fn edit_input(&self, f: impl FnOnce(&mut Raw)) {
        let (mut raw, meta) = read_raw(&self.path("input.safetensors"));
        f(&mut raw);
        write_raw(&self.path("input.safetensors"), &raw, meta);
    }
    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let text = std::fs::read_to_string(self.path("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(self.path("config.json"), v.to_string()).unwrap();
    }
}

/// `--device auto` (the default) takes the CPU, without a warning, where no GPU is usable.
#[test]
fn good_input_writes_output() {
    let s = Setup::new();
    let r = mcdm(&[
        "forward",
        "--model",
        &s.s("model.safetensors"),
        "--config",
        &s.s("config.json"),
        "--input",
        &s.s("input.safetensors"),
        "--output",
        &s.s("out.safetensors"),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    if mcdm::cuda::unavailable_reason().is_some() {
        assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    }
    let out = mcdm::weights::SafetensorsFile::open(&s.path("out.safetensors")).unwrap();
    let io = mcdm::weights::SafetensorsFile::open(&s.path("input.safetensors")).unwrap();
    let err = common::rel_l2(&out.f32("out").unwrap(), &io.f32("out").unwrap());
    // Measured 1.0e-6, 2026-12-06.
    common::within("mcdm forward vs guided-diffusion, rel L2", err, 1e-5);
}

#[test]
fn truncated_weights() {
    let s = Setup::new();
    let bytes = std::fs::read(s.path("model.safetensors")).unwrap();
    std::fs::write(s.path("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    s.forward_fails("truncated, or not safetensors");
}

#[test]
fn corrupt_header() {
    let s = Setup::new();
    let mut bytes = std::fs::read(s.path("model.safetensors")).unwrap();
    bytes[8..24].copy_from_slice(b"#corrupt-header#");
    std::fs::write(s.path("model.safetensors"), &bytes).unwrap();
    s.forward_fails("not safetensors: it does not start with an 8-byte header length and a JSON");
}

/// A file starting as a zip (a PyTorch checkpoint) is read as one, whatever its name: a
/// damaged one says so (tests/pt_checkpoint.rs reads whole ones).
#[test]
fn pytorch_checkpoint() {
    let s = Setup::new();
    let mut bytes = b"PK\x03\x04\x14\x00\x00\x08".to_vec();
    bytes.extend_from_slice(b"archive/data.pkl and more zip content");
    std::fs::write(s.path("model.safetensors"), &bytes).unwrap();
    s.forward_fails("a PyTorch checkpoint mcdm cannot read: not a whole zip file");
}

/// Headers whose byte ranges disagree with the tensors or the file, written by hand.
#[test]
fn inconsistent_byte_ranges() {
    let s = Setup::new();
    let write = |header: &str, data_len: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend((0..data_len).map(|i| i as u8));
        std::fs::write(s.path("model.safetensors"), bytes).unwrap();
    };
    let tensor = |name: &str, shape: &str, a: usize, b: usize| {
        format!(r#""{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[{a},{b}]}}"#)
    };
    // Two floats in 4 bytes.
    write(&format!("{{{}}}", tensor("out.2.bias", "[2]", 0, 4)), 4);
    s.forward_fails(
        "tensor `out.2.bias`: its byte range [0, 4] (4 bytes) does not hold its shape [2] of F32 \
         (8 bytes)",
    );
    // A gap between two tensors.
    let gap = format!(
        "{{{},{}}}",
        tensor("a", "[1]", 0, 4),
        tensor("b", "[1]", 8, 12)
    );
    write(&gap, 12);
    s.forward_fails("does not start where the tensor before it ends");
    // Bytes past the data the header declares, and too few.
    let one = format!("{{{}}}", tensor("a", "[2]", 0, 8));
    write(&one, 9);
    s.forward_fails(&format!(
        "its {} bytes do not end where the header or the data it declares ends",
        8 + one.len() + 9
    ));
    write(&one, 7);
    s.forward_fails("truncated, or not safetensors");
}

#[test]
fn missing_and_unexpected_keys_reported_together() {
    let s = Setup::new();
    s.edit_weights(|raw| {
        raw.retain(|t| t.0 != "middle_block.1.qkv.bias");
        raw.push(("extra.weight".into(), Dtype::F32, vec![2], vec![0u8; 8]));
    });
    s.forward_fails("missing key `middle_block.1.qkv.bias`");
    s.forward_fails("unexpected key `extra.weight`");
}

#[test]
fn wrong_shape() {
    let s = Setup::new();
    s.edit_config(|c| {
        c.insert("num_channels".into(), 64.into());
    });
    s.forward_fails("shape mismatch for `time_embed.0.weight`");
}

#[test]
fn unsupported_dtype() {
    let s = Setup::new();
    s.edit_weights(|raw| {
        let t = raw.iter_mut().find(|t| t.0 == "out.2.bias").unwrap();
        t.1 = Dtype::I16;
    });
    s.forward_fails("has dtype I16, expected F32, F16, BF16");
}

#[test]
fn nan_in_weights() {
    let s = Setup::new();
    s.edit_weights(|raw| {
        let t = raw
            .iter_mut()
            .find(|t| t.0 == "input_blocks.0.0.weight")
            .unwrap();
        assert_eq!(t.1, Dtype::BF16);
        t.3[2..4].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    });
    s.forward_fails("`input_blocks.0.0.weight` holds 1 non-finite value");
}

#[test]
fn wrong_channel_count() {
    let s = Setup::new();
    s.edit_input(|raw| {
        let x = raw.iter_mut().find(|t| t.0 == "x").unwrap();
        let [b, c, h, w] = x.2[..] else { panic!() };
        x.2 = vec![b, c + 1, h, w];
        x.3 = (0..b * (c + 1) * h * w)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect();
    });
    s.forward_fails("x has 4 channels but the model takes 3");
}

#[test]
fn size_the_levels_cannot_divide() {
    let s = Setup::new();
    s.edit_input(|raw| {
        let x = raw.iter_mut().find(|t| t.0 == "x").unwrap();
        let [b, c, _, _] = x.2[..] else { panic!() };
        x.2 = vec![b, c, 15, 16];
        x.3 = (0..b * c * 15 * 16)
            .flat_map(|i| (i as f32 * 0.01).sin().to_le_bytes())
            .collect();
    });
    s.forward_fails("not divisible by 2");
}

/// `emb` must be `[B, D]`: a vector, or a matrix of another batch, is named as such.
#[test]
fn embedding_of_wrong_shape() {
    let shapes: [fn(usize) -> Vec<usize>; 2] = [|b| vec![b], |b| vec![b + 1, 8]];
    for shape_of in shapes {
        let s = Setup::new();
        s.edit_input(|raw| {
            let shape = shape_of(raw.iter().find(|t| t.0 == "x").unwrap().2[0]);
            let bytes = (0..shape.iter().product::<usize>())
                .flat_map(|i| (i as f32 * 0.37).cos().to_le_bytes())
                .collect();
            raw.push(("emb".into(), Dtype::F32, shape, bytes));
        });
        s.forward_fails("`emb` must be [");
    }
}

#[test]
fn label_out_of_range() {
    let s = Setup::new();
    s.edit_input(|raw| {
        let y = raw.iter_mut().find(|t| t.0 == "y").unwrap();
        y.3[..8].copy_from_slice(&10i64.to_le_bytes());
    });
    s.forward_fails("class label 10 is out of range 0..10");
}

#[test]
fn missing_labels_for_class_model() {
    let s = Setup::new();
    s.edit_input(|raw| raw.retain(|t| t.0 != "y"));
    s.forward_fails("class-conditional");
}

#[test]
fn config_field_that_cannot_be_inferred() {
    let s = Setup::new();
    s.edit_config(|c| {
        c.remove("num_channels");
    });
    // Nor in the metadata's config, which would give it.
    let path = s.path("model.safetensors");
    let (mut raw, _) = read_raw(&path);
    raw.retain(|t| !t.0.starts_with("time_embed.0."));
    write_raw(&path, &raw, None);
    s.forward_fails("`num_channels` is not in the config and cannot be inferred");
}

#[test]
fn unknown_config_key() {
    let s = Setup::new();
    s.edit_config(|c| {
        c.insert("num_chanels".into(), 32.into());
    });
    s.forward_fails("unknown key(s): num_chanels");
}

#[test]
fn missing_input_file() {
    let s = Setup::new();
    std::fs::remove_file(s.path("input.safetensors")).unwrap();
    s.forward_fails("input.safetensors");
}

#[test]
fn inspect_reports_sources() {
    let s = Setup::new();
    let text = s.inspect(&[]);
    // No JSON beside `model.safetensors`: the config comes from the metadata.
    assert!(text.contains("(metadata)"), "{text}");
    assert!(text.contains("GFLOP per image"), "{text}");
    // Storage: the bytes of each dtype's tensors.
    let (raw, _) = read_raw(&s.path("model.safetensors"));
    let mut bytes = std::collections::BTreeMap::new();
    for (_, dtype, _, data) in &raw {
        *bytes
            .entry(format!("{dtype:?}").to_lowercase())
            .or_insert(0) += data.len();
    }
    assert!(!bytes.is_empty());
    for (dtype, n) in bytes {
        let line = format!("  {dtype:<5} {n} bytes ({:.2} MiB)", n as f64 / 1048576.0);
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
    // Every tensor is a parameter of the network.
    let parameters: usize = raw.iter().map(|t| t.2.iter().product::<usize>()).sum();
    let line = format!("parameters: {parameters} (");
    assert!(text.contains(&line), "no `{line}` in:\n{text}");
}

/// `--config`, `<stem>.json` and the metadata each give some fields: every field comes from the
/// first that holds it, and `inspect` names the file when two contribute.
#[test]
fn config_fields_come_from_the_first_source_that_gives_them() {
    let s = Setup::new();
    std::fs::write(s.path("model.json"), r#"{"noise_schedule": "cosine"}"#).unwrap();
    std::fs::write(
        s.path("extra.json"),
        r#"{"diffusion_steps": 500, "noise_schedule": "linear"}"#,
    )
    .unwrap();
    let text = s.inspect(&["--config", &s.s("extra.json")]);
    let field = |key: &str| field_of(&text, key);
    // `--config` wins over `model.json`, which then gives nothing.
    assert_eq!(field("diffusion_steps"), "500 (file)");
    assert_eq!(field("noise_schedule"), "\"linear\" (file)");
    // From the metadata (the reference default is -1).
    assert_eq!(field("num_heads_upsample"), "2 (metadata)");
    // Where `--config` is silent, `model.json` gives the field; two files: each is named.
    std::fs::write(s.path("extra.json"), r#"{"diffusion_steps": 500}"#).unwrap();
    let text = s.inspect(&["--config", &s.s("extra.json")]);
    let field = |key: &str| field_of(&text, key);
    assert_eq!(
        field("diffusion_steps"),
        format!("500 ({})", s.s("extra.json"))
    );
    assert_eq!(
        field("noise_schedule"),
        format!("\"cosine\" ({})", s.s("model.json"))
    );
    assert_eq!(field("num_heads_upsample"), "2 (metadata)");
}

/// The value and source `mcdm inspect` prints for config field `key`.
fn field_of(text: &str, key: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{text}"));
    line.split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Finite inputs far out of scale overflow inside the network: an error, nothing written.
#[test]
fn non_finite_output() {
    let s = Setup::new();
    s.edit_input(|raw| {
        let x = raw.iter_mut().find(|t| t.0 == "x").unwrap();
        assert_eq!(x.1, Dtype::F32);
        x.3 = x.3.chunks(4).flat_map(|_| 3e38f32.to_le_bytes()).collect();
    });
    s.forward_fails("non-finite value(s) (NaN or inf)");
}

/// Weights holding a NaN or an infinity are refused when loaded, naming the tensor.
#[test]
fn non_finite_weights() {
    let s = Setup::new();
    s.edit_weights(|raw| {
        let (name, dtype, _, bytes) = raw.iter_mut().find(|t| t.0.ends_with(".weight")).unwrap();
        let nan: Vec<u8> = match dtype {
            Dtype::F32 => f32::NAN.to_le_bytes().to_vec(),
            Dtype::F16 => half::f16::NAN.to_le_bytes().to_vec(),
            Dtype::BF16 => half::bf16::NAN.to_le_bytes().to_vec(),
            other => panic!("{name}: {other:?}"),
        };
        bytes[..nan.len()].copy_from_slice(&nan);
    });
    s.forward_fails("tensor `input_blocks.0.0.weight` holds 1 non-finite value(s) (NaN or inf)");
}

/// Configs guided-diffusion rejects, and sizes no machine holds, fail before anything is built.
#[test]
fn impossible_configs() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "num_head_channels",
            7.into(),
            "num_head_channels 7 does not divide",
        ),
        (
            "num_heads_upsample",
            0.into(),
            "num_heads_upsample must be -1 (num_heads) or positive",
        ),
        (
            "image_size",
            1048576.into(),
            "image_size 1048576 is larger than the 4096",
        ),
        (
            "diffusion_steps",
            1_000_000_000_000u64.into(),
            "diffusion_steps must be between 1 and",
        ),
    ];
    for (key, value, needle) in cases {
        let s = Setup::new();
        s.edit_config(|c| {
            c.insert(key.into(), value);
        });
        s.forward_fails(needle);
    }
    let s = Setup::new();
    s.edit_config(|c| {
        c.insert("num_channels".into(), (1u64 << 40).into());
    });
    s.forward_fails("must be at most 65536");
    let s = Setup::new();
    s.edit_config(|c| {
        c.insert("num_res_blocks".into(), 1_000_000_000.into());
    });
    s.forward_fails("num_res_blocks 1000000000");
    // Widths within bounds against 32-channel weights: the 3x3 convs at 65536 channels would
    // need 154 GB of placeholders; the mismatches are reported with nothing allocated, the list
    // cut short.
    let s = Setup::new();
    s.edit_config(|c| {
        c.insert("num_channels".into(), 32768.into());
    });
    s.forward_fails("config needs [131072, 32768]");
    s.forward_fails(" more");
}

#[test]
fn a_directory_or_fifo_as_model() {
    let s = Setup::new();
    std::fs::create_dir(s.path("dir.safetensors")).unwrap();
    fails(&["inspect", &s.s("dir.safetensors")], "it is a directory");
    let fifo = s.path("fifo.safetensors");
    if !common::output(Command::new("mkfifo").arg(&fifo))
        .status
        .success()
    {
        common::skip("a FIFO as model", "mkfifo could not make one here");
        return;
    }
    // Opening a FIFO for reading would block until a writer comes: it must not be opened.
    fails(
        &["inspect", &fifo.display().to_string()],
        "not a regular file",
    );
}

/// `fails` for `mcdm bench` on the CPU with the setup's config and `extra` arguments.
fn bench_fails(s: &Setup, extra: &[&str], needle: &str) {
    let config = s.s("config.json");
    let mut args = vec!["bench", "--device", "cpu", "--config", &config];
    args.extend_from_slice(extra);
    fails(&args, needle);
}

/// Benchmark sizes no machine holds are refused before any allocation.
#[test]
fn impossible_benchmarks() {
    let s = Setup::new();
    bench_fails(
        &s,
        &["--batch", "1000000000000"],
        "a benchmark batch is at most 4096",
    );
    s.edit_config(|c| {
        c.insert("num_channels".into(), 32768.into());
    });
    bench_fails(
        &s,
        &["--batch", "1"],
        "parameters, more than the 2147483648",
    );
}

/// Output paths are checked before the work that would be lost.
#[test]
fn output_path_in_a_missing_directory() {
    let s = Setup::new();
    let missing = s.path("missing/e.safetensors").display().to_string();
    fails(
        &["encode-text", "--text", "a face", "--output", &missing],
        "does not exist",
    );
    let missing = s.path("missing/b.json").display().to_string();
    bench_fails(
        &s,
        &["--batch", "1", "--output", &missing],
        "does not exist",
    );
}

/// A benchmark whose input alone is more than the machine's memory is refused up front (it
/// used to abort in the allocator), and so is `--config` naming a directory or nothing.
#[test]
fn impossible_bench_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("huge.json");
    std::fs::write(
        &config,
        r#"{"image_size": 4096, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
            "attention_resolutions": "", "in_channels": 64}"#,
    )
    .unwrap();
    let config = config.display().to_string();
    // 4096 images of 64x4096x4096 f32: 16 TiB.
    fails(
        &[
            "bench", "--device", "cpu", "--config", &config, "--batch", "4096",
        ],
        "--batch 4096: the input needs about 16384.0 GiB of memory, more than the",
    );
    let folder = dir.path().display().to_string();
    fails(
        &["bench", "--device", "cpu", "--config", &folder],
        &format!("--config {folder}: is a directory"),
    );
    let missing = dir.path().join("missing.json").display().to_string();
    fails(
        &["bench", "--device", "cpu", "--config", &missing],
        &format!("--config {missing}: no such file"),
    );
}

/// A file that is not a UNet, given as a model, is named as such (with what it holds), and a
/// condition file lacking its tensor lists the tensors it has.
#[test]
fn files_of_the_wrong_kind_say_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cond.safetensors");
    let data = vec![0.25f32; 256];
    mcdm::weights::write_safetensors(
        &path,
        &[(
            "sketch",
            mcdm::weights::TensorData::F32(vec![1, 16, 16], &data),
        )],
        None,
    )
    .unwrap();
    let p = path.display().to_string();
    fails(
        &["inspect", &p],
        "not a guided-diffusion UNet: it holds `sketch`, and no `time_embed.*`",
    );
    let model = |name: &str| {
        format!(
            "{name}={}",
            fixtures(&format!("sample/models/{name}.safetensors")).display()
        )
    };
    fails(
        &[
            "sample",
            "--device",
            "cpu",
            "--model",
            &model("uncond"),
            "--model",
            &model("sketch"),
            "--uncond",
            "uncond",
            "--expert",
            &format!("sketch,image={p}"),
            "--out",
            &dir.path().join("out").display().to_string(),
        ],
        &format!("{p}: no tensor `cond` (the file holds `sketch`)"),
    );
}
