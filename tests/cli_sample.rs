//! `mcdm sample` end to end: a composed run through the command line reproduces the reference
//! sampler, writes its files whole, and bad input fails cleanly.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixtures, rel_l2};
use mcdm::weights::{write_safetensors, SafetensorsFile, TensorData};
use serde_json::json;

fn mcdm(args: &[&str]) -> (Option<i32>, String) {
    let out = common::output(Command::new(env!("CARGO_BIN_EXE_mcdm")).args(args));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mcdm sample` of the unconditional fixture model alone, 2 steps, into `out`, plus `extra`.
fn sample_uncond(out: &Path, num_samples: &str, extra: &[&str]) -> (Option<i32>, String) {
    let (uncond, out) = (model("uncond"), out.display().to_string());
    let mut args = vec![
        "sample", "--model", &uncond, "--uncond", "uncond", "--steps", "2",
    ];
    args.extend_from_slice(&["--num-samples", num_samples, "--out", &out]);
    args.extend_from_slice(extra);
    mcdm(&args)
}

fn model(name: &str) -> String {
    format!(
        "{name}={}",
        fixtures(&format!("sample/models/{name}.safetensors")).display()
    )
}

/// Writes the tensors of reference case b as the CLI's condition files into `dir`.
fn case_b_inputs(dir: &Path) -> SafetensorsFile {
    let case =
        SafetensorsFile::open(&fixtures("sample/b_class_notsketch_text.safetensors")).unwrap();
    let write = |file: &str, name: &str, src: &str| {
        let shape = case.shape(src).unwrap().to_vec();
        write_safetensors(
            &dir.join(file),
            &[(name, TensorData::F32(shape, &case.f32(src).unwrap()))],
            None,
        )
        .unwrap();
    };
    write("sketch.safetensors", "cond", "cond.1");
    write("text.safetensors", "embedding", "emb.2");
    write("noise.safetensors", "x_T", "x_T");
    case
}

#[test]
fn cli_reproduces_reference_composition() {
    let dir = tempfile::tempdir().unwrap();
    let case = case_b_inputs(dir.path());
    let p = |f: &str| dir.path().join(f).display().to_string();
    let (code, err) = mcdm(&[
        "sample",
        "--model",
        &model("uncond"),
        "--model",
        &model("classes"),
        "--model",
        &model("sketch"),
        "--model",
        &model("text"),
        "--uncond",
        "uncond",
        "--expert",
        "classes,class=3,weight=1.5",
        "--expert",
        &format!("sketch,image={},weight=-0.5", p("sketch.safetensors")),
        "--expert",
        &format!("text,embedding={},weight=0.7", p("text.safetensors")),
        "--sampler",
        "ddim",
        "--timestep-respacing",
        "10",
        "--clip-denoised",
        "false",
        "--num-samples",
        "3",
        "--batch-size",
        "2",
        "--init-noise",
        &p("noise.safetensors"),
        "--seed",
        "9",
        "--save-tensor",
        &p("samples.safetensors"),
        "--out",
        &p("out"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let ours = SafetensorsFile::open(&dir.path().join("samples.safetensors"))
        .unwrap()
        .f32("samples")
        .unwrap();
    let err = rel_l2(&ours, &case.f32("samples").unwrap());
    // Measured 6.0e-7, 2026-12-06.
    common::within("CLI composed DDIM vs guided-diffusion", err, 5e-6);
    let out = dir.path().join("out");
    images_decode_to_the_samples(&out, &ours, 3, [16, 16]);

    // Every field of the record, and no other.
    let record = read_record(&out);
    let keys: Vec<&str> = record
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "batch_size",
            "clip_denoised",
            "command",
            "device",
            "eta",
            "experts",
            "first_image",
            "formula",
            "image_size",
            "images",
            "init_noise",
            "karras",
            "mcdm_version",
            "models",
            "num_samples",
            "png_scale",
            "sampler",
            "seconds",
            "seed",
            "shard",
            "status",
            "steps",
            "text_model",
            "timestep_respacing",
            "uncond"
        ]
    );
    let command = record["command"].as_str().unwrap();
    for part in [
        " sample --model ",
        " --expert classes,class=3,weight=1.5 ",
        " --seed 9 ",
    ] {
        assert!(command.contains(part), "`{part}` not in {command}");
    }
    assert_eq!(record["status"], "complete");
    assert_eq!(record["images"], 3);
    let file = |path: &str| json!({ "path": path, "sha256": sha256(Path::new(path)) });
    let model_entry = |name: &str| {
        let path = fixtures(&format!("sample/models/{name}.safetensors"));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
                .unwrap();
        let entry = &record["models"][name];
        assert_eq!(entry["path"], path.display().to_string(), "{name}");
        assert_eq!(entry["sha256"], sha256(&path), "{name}");
        // The config as read, in guided-diffusion's keys: those of the fixture's file that
        // reach sampling hold the file's values (use_checkpoint, say, is not recorded).
        let recorded = entry["config"].as_object().unwrap();
        for key in [
            "image_size",
            "num_channels",
            "channel_mult",
            "learn_sigma",
            "diffusion_steps",
        ] {
            assert!(
                recorded.contains_key(key),
                "{name}: no {key} in {recorded:?}"
            );
        }
        for (key, value) in recorded {
            if let Some(want) = config.get(key) {
                assert_eq!(value, want, "{name}: config key {key}");
            }
        }
    };
    for name in ["uncond", "classes", "sketch", "text"] {
        model_entry(name);
    }
    assert_eq!(record["models"].as_object().unwrap().len(), 4);
    assert_eq!(
        record["experts"],
        json!([
            { "model": "classes", "class": 3, "weight": 1.5 },
            { "model": "sketch", "image": file(&p("sketch.safetensors")), "weight": -0.5 },
            { "model": "text", "embedding": file(&p("text.safetensors")), "weight": 0.7 },
        ])
    );
    assert_eq!(record["uncond"], json!({ "model": "uncond" }));
    assert_eq!(record["formula"], "eps = eps_u + sum_i w_i (eps_i - eps_u)");
    assert_eq!(record["mcdm_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(record["sampler"], "ddim");
    assert_eq!(record["eta"], 0.0);
    assert_eq!(record["timestep_respacing"], "10");
    assert_eq!(record["steps"], 10);
    assert_eq!(record["clip_denoised"], false);
    assert_eq!(record["seed"], 9);
    assert_eq!(record["num_samples"], 3);
    assert_eq!(record["batch_size"], 2);
    assert_eq!(record["image_size"], json!([16, 16]));
    assert_eq!(record["init_noise"], file(&p("noise.safetensors")));
    assert_eq!(record["device"], "cpu");
    let seconds = record["seconds"].as_f64().unwrap();
    assert!(seconds > 0.0 && seconds < 600.0, "{seconds}");
    assert_eq!(record["text_model"], json!(null));

    // The record replays the run as a job file, from another folder: the same samples, and a
    // record that differs only in what describes the run itself.
    let replay = |out: &str| {
        let job = dir.path().join("out/record.json").display().to_string();
        let (code, err) = mcdm(&[
            "sample",
            "--job",
            &job,
            "--out",
            &p(out),
            "--save-tensor",
            &p(&format!("{out}.safetensors")),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let samples = SafetensorsFile::open(&dir.path().join(format!("{out}.safetensors")))
            .unwrap()
            .f32("samples")
            .unwrap();
        (samples, read_record(&dir.path().join(out)), err)
    };
    let (again, mut replayed, err) = replay("replay");
    assert_eq!(again, ours);
    assert!(!err.contains("warning"), "{err}");
    for key in ["command", "seconds"] {
        replayed[key] = record[key].clone();
    }
    assert_eq!(replayed, record);

    // A condition file changed since: the replay says the bytes differ from the record's.
    let sketch =
        SafetensorsFile::open(&fixtures("sample/b_class_notsketch_text.safetensors")).unwrap();
    let cond = sketch.f32("cond.1").unwrap();
    let shape = sketch.shape("cond.1").unwrap().to_vec();
    let changed: Vec<f32> = cond.iter().map(|v| -v).collect();
    write_safetensors(
        &dir.path().join("sketch.safetensors"),
        &[("cond", TensorData::F32(shape, &changed))],
        None,
    )
    .unwrap();
    let (_, _, err) = replay("changed");
    assert!(
        err.contains(&format!(
            "warning: input {}: not the file the recorded run read",
            p("sketch.safetensors")
        )),
        "{err}"
    );
}

/// The hex SHA-256 of a file.
fn sha256(path: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Decodes an 8-bit RGB PNG: (height, width, pixels row by row).
fn decode_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(
        (frame.color_type, frame.bit_depth),
        (png::ColorType::Rgb, png::BitDepth::Eight),
        "{}",
        path.display()
    );
    pixels.truncate(frame.buffer_size());
    (frame.height as usize, frame.width as usize, pixels)
}

/// The PNGs in `out` hold the `n` samples `[n, 3, h, w]` quantised as guided-diffusion's
/// scripts do (`((x + 1) * 127.5).clamp(0, 255).to(uint8)`, truncating), and the grid holds
/// them row by row, ceil(sqrt(n)) to a row, between white gaps of 2 pixels.
fn images_decode_to_the_samples(out: &Path, samples: &[f32], n: usize, [h, w]: [usize; 2]) {
    assert_eq!(samples.len(), n * 3 * h * w);
    let quantised = |k: usize, y: usize, x: usize, c: usize| {
        let v = samples[((k * 3 + c) * h + y) * w + x];
        ((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8
    };
    for k in 0..n {
        let (ph, pw, pixels) = decode_png(&out.join(format!("{k:06}.png")));
        assert_eq!((ph, pw), (h, w), "image {k}");
        for (i, &v) in pixels.iter().enumerate() {
            let (y, x, c) = (i / (3 * w), i / 3 % w, i % 3);
            assert_eq!(
                v,
                quantised(k, y, x, c),
                "image {k} at ({y}, {x}) channel {c}"
            );
        }
    }
    assert!(!out.join(format!("{n:06}.png")).exists());
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (gh, gw, grid) = decode_png(&out.join("grid.png"));
    assert_eq!((gh, gw), (rows * (h + 2) + 2, cols * (w + 2) + 2));
    for gy in 0..gh {
        for gx in 0..gw {
            let (row, y) = ((gy.max(2) - 2) / (h + 2), (gy.max(2) - 2) % (h + 2));
            let (col, x) = ((gx.max(2) - 2) / (w + 2), (gx.max(2) - 2) % (w + 2));
            let k = row * cols + col;
            let inside = gy >= 2 && gx >= 2 && y < h && x < w && k < n;
            for c in 0..3 {
                let want = if inside { quantised(k, y, x, c) } else { 255 };
                assert_eq!(
                    grid[(gy * gw + gx) * 3 + c],
                    want,
                    "grid ({gy}, {gx}) channel {c}"
                );
            }
        }
    }
}

/// Without `--steps`, a run takes the unconditional model's `timestep_respacing`, and 50
/// evenly spaced steps when its config gives none.
#[test]
fn default_step_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // (steps, respacing) of a run of the model at `path` with no step flag.
    let steps_of = |path: &Path| {
        let (code, err) = mcdm(&[
            "sample",
            "--model",
            &format!("u={}", path.display()),
            "--uncond",
            "u",
            "--num-samples",
            "1",
            "--out",
            &out.display().to_string(),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let record = read_record(&out);
        (
            record["steps"].clone(),
            record["timestep_respacing"].clone(),
        )
    };
    let source = fixtures("sample/models/uncond.safetensors");
    assert_eq!(steps_of(&source), (json!(50), json!("50")));

    // The same model with a respacing in its config.
    let copy = dir.path().join("respaced.safetensors");
    std::fs::copy(&source, &copy).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.with_extension("json")).unwrap())
            .unwrap();
    config["timestep_respacing"] = json!("4,3");
    std::fs::write(copy.with_extension("json"), config.to_string()).unwrap();
    assert_eq!(steps_of(&copy), (json!(7), json!("4,3")));
}

/// Runs `sample` with `args` (plus `--out`, `--steps 2` and `--num-samples 1` where `args`
/// lacks them; no `--steps` beside a `--timestep-respacing`), expecting exit 1 with `needle` in
/// the message and no images.
fn fails(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut all: Vec<&str> = vec!["sample"];
    all.extend_from_slice(args);
    let out_s = out.display().to_string();
    for (flag, value) in [
        ("--out", out_s.as_str()),
        ("--steps", "2"),
        ("--num-samples", "1"),
    ] {
        let respaced = flag == "--steps" && args.contains(&"--timestep-respacing");
        if !args.contains(&flag) && !respaced {
            all.extend_from_slice(&[flag, value]);
        }
    }
    let (code, err) = mcdm(&all);
    assert_eq!(code, Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "message lacks `{needle}`:\n{err}");
    assert!(
        !out.join("grid.png").exists() && !out.join("000000.png").exists(),
        "output written"
    );
    // The run made the directory and wrote nothing in it: it is gone again.
    assert!(!out.exists(), "empty output directory left behind");
}

/// Writes `dir/job.json`: the unconditional model, 2 steps, 1 sample, out `dir/out`, and
/// `extra`'s keys over those. Returns the job's path and its output directory.
fn write_job(dir: &Path, extra: &serde_json::Value) -> (String, std::path::PathBuf) {
    let out = dir.join("out");
    let mut job = json!({
        "models": { "uncond": fixtures("sample/models/uncond.safetensors").display().to_string() },
        "uncond": { "model": "uncond" },
        "steps": 2,
        "num_samples": 1,
        "out": out.display().to_string(),
    });
    for (k, v) in extra.as_object().unwrap() {
        job[k] = v.clone();
    }
    let path = dir.join("job.json");
    std::fs::write(&path, job.to_string()).unwrap();
    (path.display().to_string(), out)
}

/// `fails` for a job file holding `extra` besides the unconditional model.
fn job_fails(extra: serde_json::Value, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (path, out) = write_job(dir.path(), &extra);
    let (code, err) = mcdm(&["sample", "--job", &path]);
    assert_eq!(code, Some(1), "{extra}: expected exit 1: {err}");
    assert!(
        err.contains(needle),
        "{extra}: message lacks `{needle}`:\n{err}"
    );
    assert!(!out.exists(), "{extra}: output directory made");
}

/// A job file's `steps` and `timestep_respacing` conflict as the flags do, and its `out` may
/// not be empty (the images would land beside the job file).
#[test]
fn job_file_conflicts_and_empty_out() {
    job_fails(
        json!({ "timestep_respacing": "2" }),
        "give `steps` or `timestep_respacing`, not both",
    );
    job_fails(json!({ "out": "" }), "`out` is empty");
}

#[test]
fn unknown_model_in_expert() {
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--expert",
            "sketchy,weight=1",
        ],
        "unknown model `sketchy`",
    );
}

/// The `record.json` a run wrote into `out`.
fn read_record(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("record.json")).unwrap()).unwrap()
}

/// `fails` for the sketch expert given `image` as its condition, plus `extra` arguments.
fn sketch_condition_fails(image: &Path, extra: &[&str], needle: &str) {
    let (uncond, sketch) = (model("uncond"), model("sketch"));
    let expert = format!("sketch,image={}", image.display());
    let mut args = vec![
        "--model", &uncond, "--model", &sketch, "--uncond", "uncond", "--expert", &expert,
    ];
    args.extend_from_slice(extra);
    fails(&args, needle);
}

/// An RGB PNG for a 1-channel condition is read as its luma, with a warning: with R = G = B the
/// samples are those of the gray PNG.
#[test]
fn an_rgb_png_for_a_gray_condition_is_converted() {
    let dir = tempfile::tempdir().unwrap();
    let gray: Vec<u8> = (0..256).map(|i| ((i * 37) % 256) as u8).collect();
    let gray_png = dir.path().join("gray.png");
    let mut encoder = png::Encoder::new(std::fs::File::create(&gray_png).unwrap(), 16, 16);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&gray).unwrap();
    writer.finish().unwrap();
    let rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
    let rgb_png = dir.path().join("rgb.png");
    mcdm::image::write_png(&rgb_png, &rgb, 16, 16).unwrap();
    let run = |image: &Path| {
        let tensor = image.with_extension("safetensors");
        let (code, err) = sample_uncond(
            &dir.path().join("out"),
            "2",
            &[
                "--model",
                &model("sketch"),
                "--expert",
                &format!("sketch,image={}", image.display()),
                "--save-tensor",
                &tensor.display().to_string(),
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        let samples = SafetensorsFile::open(&tensor)
            .unwrap()
            .f32("samples")
            .unwrap();
        (samples, err)
    };
    let (from_gray, err) = run(&gray_png);
    assert!(!err.contains("warning"), "{err}");
    let (from_rgb, err) = run(&rgb_png);
    assert_eq!(
        err.matches("an RGB PNG for a 1-channel condition: converted to gray")
            .count(),
        1,
        "{err}"
    );
    // Measured 2.2e-6, 2026-12-06: the luma weights sum to 1 within an f32 rounding.
    common::within(
        "RGB (R = G = B) against gray PNG",
        rel_l2(&from_rgb, &from_gray),
        1e-5,
    );
}

/// --png-scale N writes every image and the grid N times larger, each pixel an N x N square
/// of the scale-1 image's; the scale is recorded, and out of 1..=16 it is an error.
#[test]
fn png_scale_enlarges_images_pixel_by_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let (one, three) = (dir.path().join("one"), dir.path().join("three"));
    let (code, err) = sample_uncond(&one, "2", &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = sample_uncond(&three, "2", &["--png-scale", "3"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(read_record(&three)["png_scale"], 3);
    for name in ["000001.png", "grid.png"] {
        let (h, w, small) = decode_png(&one.join(name));
        let (bh, bw, big) = decode_png(&three.join(name));
        assert_eq!((bh, bw), (3 * h, 3 * w), "{name}");
        for y in 0..bh {
            for x in 0..bw {
                assert_eq!(
                    big[(y * bw + x) * 3..][..3],
                    small[((y / 3) * w + x / 3) * 3..][..3],
                    "{name} ({y}, {x})"
                );
            }
        }
    }
    for bad in ["0", "17"] {
        let (code, err) = sample_uncond(&dir.path().join("bad"), "1", &["--png-scale", bad]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!("--png-scale {bad}: from 1 to 16")),
            "{err}"
        );
    }
}

/// Dark lines drawn on white, given to a sketch expert (which takes light lines on dark), are
/// warned of; the shipped sketches are not (`shipped_models_answer_to_their_names`).
#[test]
fn a_dark_on_light_sketch_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let drawing: Vec<u8> = (0..256 * 3)
        .map(|i| if (i / 3) % 17 == 0 { 0 } else { 255 })
        .collect();
    let path = dir.path().join("drawing.png");
    mcdm::image::write_png(&path, &drawing, 16, 16).unwrap();
    let (code, err) = sample_uncond(
        &dir.path().join("out"),
        "1",
        &[
            "--model",
            &model("sketch"),
            "--expert",
            &format!("sketch,image={}", path.display()),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("mostly light (mean 0.88 in [-1, 1]): a sketch is light lines on a dark"),
        "{err}"
    );
}

/// A storage type the CPU ignores, and a `,key=` swallowed by a text= prompt, are warned of.
#[test]
fn flags_that_do_not_do_what_they_say_are_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = sample_uncond(
        &dir.path().join("out"),
        "1",
        &["--dtype", "f16", "--device", "cpu"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: --dtype f16: the CPU computes in f32 whatever the storage type"),
        "{err}"
    );
    // The warning comes before the run fails on the prompt (the model takes no text).
    let (_, err) = sample_uncond(
        &dir.path().join("out"),
        "1",
        &["--expert", "uncond,text=a face,weight=2"],
    );
    assert!(
        err.contains("`,weight=` is part of the prompt, since text= takes the rest of the spec"),
        "{err}"
    );
}

#[test]
fn image_condition_of_wrong_size_or_channels() {
    let dir = tempfile::tempdir().unwrap();
    for (name, shape, message) in [
        ("small", [1, 8, 8], "is 8x8, but the samples are 16x16"),
        (
            "rgb",
            [3, 16, 16],
            "the model takes a 1-channel image condition ([1, 16, 16] per image, 256 values), got \
             3 channel(s) of 16x16",
        ),
    ] {
        let path = dir.path().join(format!("{name}.safetensors"));
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| (i as f32 * 0.3).sin())
            .collect();
        write_safetensors(
            &path,
            &[("cond", TensorData::F32(shape.to_vec(), &data))],
            None,
        )
        .unwrap();
        sketch_condition_fails(&path, &[], message);
    }
}

#[test]
fn init_noise_of_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.safetensors");
    let data: Vec<f32> = (0..2 * 3 * 256).map(|i| (i as f32 * 0.7).sin()).collect();
    write_safetensors(
        &noise,
        &[("x_T", TensorData::F32(vec![2, 3, 16, 16], &data))],
        None,
    )
    .unwrap();
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--init-noise",
            &noise.display().to_string(),
        ],
        "expected [1, 3, 16, 16]",
    );
}

#[test]
fn conflicting_schedules() {
    let other = format!(
        "big={}",
        fixtures("unet/legacy_heads2_scaleshift.safetensors").display()
    );
    fails(
        &[
            "--model",
            &model("uncond"),
            "--model",
            &other,
            "--uncond",
            "uncond",
            "--expert",
            "big",
        ],
        "disagree on the diffusion schedule",
    );
}

#[test]
fn no_experts_and_no_uncond() {
    fails(&["--model", &model("uncond")], "nothing to sample");
    fails(
        &["--model", &model("uncond"), "--expert", "uncond"],
        "needs an unconditional term",
    );
}

#[test]
fn unwritable_output_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("out").display().to_string();
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--out",
            &out,
            "--steps",
            "2",
        ],
        "creating output directory",
    );
    // --out naming a file.
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--out",
            &file.display().to_string(),
        ],
        "a-file: is a file, not a folder",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn null_class_required_for_class_model_as_uncond() {
    fails(
        &[
            "--model",
            &model("classes"),
            "--uncond",
            "classes",
            "--expert",
            "classes,class=1",
        ],
        "give class=K (the class that stands for no condition)",
    );
}

/// A term starts with a model name and holds known keys; the unconditional term has no weight,
/// on the command line and in a job file alike.
#[test]
fn bad_term_syntax() {
    let uncond = model("uncond");
    for (uncond_term, expert, needle) in [
        ("uncond", "uncond,wieght=2", "unknown key `wieght`"),
        ("uncond", "class=3", "starting with a model name"),
        ("uncond", ",class=3", "starting with a model name"),
        ("uncond", "uncond,class", "`class` is not key=value"),
        (
            "uncond,weight=0.5",
            "uncond",
            "unknown key `weight` (expected class, image, embedding, text)",
        ),
    ] {
        fails(
            &[
                "--model",
                &uncond,
                "--uncond",
                uncond_term,
                "--expert",
                expert,
            ],
            needle,
        );
    }
    job_fails(
        json!({ "uncond": { "model": "uncond", "weight": 0.5 } }),
        "unknown key `weight`",
    );
    job_fails(
        json!({ "experts": [{ "model": "uncond", "colour": 1 }] }),
        "unknown key `colour`",
    );
}

#[test]
fn text_prompt_needs_a_384_wide_model() {
    if common::text_tests_skipped("text-conditioned sampling") {
        return;
    }
    // The fixture text model takes a 16-wide embedding, not MiniLM's 384.
    fails(
        &[
            "--model",
            &model("uncond"),
            "--model",
            &model("text"),
            "--uncond",
            "uncond",
            "--expert",
            "text,weight=2,text=a smiling woman, red hair",
        ],
        "text= gives a 384-wide sentence embedding, but the model's embed_dim is 16",
    );
}

/// `mcdm sample` with no model arguments runs examples/default.json: the SynthFaces experts
/// composed on held-back conditions (fewer images and steps here).
#[test]
fn default_job_runs_without_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, err) = mcdm(&[
        "sample",
        "--num-samples",
        "2",
        "--steps",
        "3",
        "--out",
        &out.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let record = read_record(&out);
    assert_eq!(record["experts"].as_array().unwrap().len(), 3, "{record}");
    assert!(out.join("grid.png").is_file() && out.join("000001.png").is_file());
}

/// Without a job, the shipped models answer to their names: a term may name one with no
/// --model, the others are not loaded and go unmentioned, and --model overrides a name.
#[test]
fn shipped_models_answer_to_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").display().to_string();
    let sketch = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sketch.safetensors");
    let sketch = format!("sketch,image={}", sketch.display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--num-samples",
            "1",
            "--out",
            &out,
            "--uncond",
            "uncond",
            "--expert",
            &sketch,
        ];
        args.extend_from_slice(extra);
        let (code, err) = mcdm(&args);
        assert_eq!(code, Some(0), "{err}");
        assert!(!err.contains("warning"), "{err}");
        read_record(Path::new(&out))
    };
    let record = run(&[]);
    let models = record["models"].as_object().unwrap();
    assert_eq!(models.keys().collect::<Vec<_>>(), ["sketch", "uncond"]);
    assert!(models["uncond"]["path"]
        .as_str()
        .unwrap()
        .ends_with("weights/uncond.safetensors"));
    // A copy in place of the shipped unconditional model.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/uncond.safetensors");
    let copy = dir.path().join("mine.safetensors");
    std::fs::copy(&shipped, &copy).unwrap();
    std::fs::copy(shipped.with_extension("json"), copy.with_extension("json")).unwrap();
    let record = run(&["--model", &format!("uncond={}", copy.display())]);
    assert_eq!(
        record["models"]["uncond"]["path"],
        copy.display().to_string()
    );
}

/// A prompt given as text= samples exactly as its embedding from `mcdm encode-text` does.
#[test]
fn text_prompt_equals_its_encoded_embedding() {
    if common::text_tests_skipped("text-conditioned sampling") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let w = |m: &str| {
        format!(
            "{m}={}",
            root.join(format!("weights/{m}.safetensors")).display()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    let prompt = "a smiling woman with long red hair, no glasses";
    let (code, err) = mcdm(&[
        "encode-text",
        "--text",
        prompt,
        "--output",
        &p("e.safetensors"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let common = [
        "--uncond",
        "uncond",
        "--num-samples",
        "2",
        "--steps",
        "4",
        "--seed",
        "3",
    ];
    let run = |expert: String, out: &str| {
        let (u, t) = (w("uncond"), w("text"));
        let mut args = vec!["sample", "--model", &u, "--model", &t, "--expert", &expert];
        args.extend_from_slice(&common);
        let (s, o) = (p(&format!("{out}.safetensors")), p(out));
        args.extend_from_slice(&["--save-tensor", &s, "--out", &o]);
        let (code, err) = mcdm(&args);
        assert_eq!(code, Some(0), "{err}");
        SafetensorsFile::open(Path::new(&s))
            .unwrap()
            .f32("samples")
            .unwrap()
    };
    let from_text = run(format!("text,weight=2,text={prompt}"), "a");
    let from_file = run(
        format!("text,weight=2,embedding={}", p("e.safetensors")),
        "b",
    );
    assert_eq!(from_text, from_file);
    let record = std::fs::read_to_string(dir.path().join("a/record.json")).unwrap();
    assert!(record.contains(prompt), "the record lacks the prompt");
}

/// A job file value of the wrong type or range is an error naming the key, not the default.
#[test]
fn job_file_values_of_the_wrong_type() {
    use serde_json::json;
    job_fails(
        json!({"steps": "2"}),
        "`steps` must be a non-negative integer",
    );
    job_fails(
        json!({"num_samples": -1}),
        "`num_samples` must be a non-negative integer",
    );
    job_fails(
        json!({"batch_size": 1.5}),
        "`batch_size` must be a non-negative integer",
    );
    job_fails(
        json!({"seed": "7"}),
        "`seed` must be a non-negative integer",
    );
    job_fails(
        json!({"clip_denoised": "false"}),
        "`clip_denoised` must be true or false",
    );
    job_fails(json!({"eta": "0.5"}), "`eta` must be a number");
    job_fails(json!({"sampler": 5}), "`sampler` must be a string");
    job_fails(
        json!({"timestep_respacing": 10}),
        "`timestep_respacing` must be a string",
    );
    job_fails(json!({"out": 5}), "`out` must be a string");
    job_fails(
        json!({"uncond": {"model": "uncond", "image": 5}}),
        "`image` must be a path",
    );
    job_fails(
        json!({"experts": [{"model": "uncond", "weight": 1e300}]}),
        "weight must be a finite number",
    );
    // serde_json keeps the last of two equal keys; a job file may not hold them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.json");
    std::fs::write(
        &path,
        r#"{"uncond": {"model": "u"}, "steps": 2, "steps": 3}"#,
    )
    .unwrap();
    let (code, err) = mcdm(&["sample", "--job", &path.display().to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("key `steps` is given twice"), "{err}");
}

#[test]
fn eta_outside_0_1_or_with_ddpm() {
    let base = ["--model", &model("uncond"), "--uncond", "uncond"];
    for eta in ["--eta=2", "--eta=-0.5", "--eta=NaN", "--eta=inf"] {
        let mut args = base.to_vec();
        args.push(eta);
        fails(&args, "--eta must be between 0 (deterministic) and 1");
    }
    let mut args = base.to_vec();
    args.extend_from_slice(&["--sampler", "ddpm", "--eta", "0.5"]);
    fails(&args, "is a DDIM setting");
}

/// A solver run from the command line reproduces diffusers' scheduler (fixture l: DPM-Solver++
/// 3M on Karras sigmas, a class term against a null class and NOT a sketch), and its record
/// replays it.
#[test]
fn cli_solver_reproduces_diffusers_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let case = SafetensorsFile::open(&fixtures("sample/l_dpmpp3m_karras_cfg.safetensors")).unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    for (file, name, src) in [
        ("sketch.safetensors", "cond", "cond.1"),
        ("noise.safetensors", "x_T", "x_T"),
    ] {
        let shape = case.shape(src).unwrap().to_vec();
        let data = case.f32(src).unwrap();
        write_safetensors(
            &dir.path().join(file),
            &[(name, TensorData::F32(shape, &data))],
            None,
        )
        .unwrap();
    }
    let sketch = format!("sketch,image={},weight=-0.5", p("sketch.safetensors"));
    let (code, err) = mcdm(&[
        "sample",
        "--model",
        &model("classes"),
        "--model",
        &model("sketch"),
        "--uncond",
        "classes,class=4",
        "--expert",
        "classes,class=1,weight=2",
        "--expert",
        &sketch,
        "--sampler",
        "dpmpp-3m",
        "--karras",
        "--steps",
        "12",
        "--clip-denoised",
        "false",
        "--num-samples",
        "3",
        "--init-noise",
        &p("noise.safetensors"),
        "--save-tensor",
        &p("samples.safetensors"),
        "--out",
        &p("out"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let samples = |f: &str| {
        SafetensorsFile::open(&dir.path().join(f))
            .unwrap()
            .f32("samples")
            .unwrap()
    };
    let ours = samples("samples.safetensors");
    let err = rel_l2(&ours, &case.f32("samples").unwrap());
    common::within("CLI DPM-Solver++ 3M (Karras) vs diffusers", err, 1e-5);
    let record = read_record(&dir.path().join("out"));
    assert_eq!(
        (record["sampler"].as_str(), record["karras"].as_bool()),
        (Some("dpmpp-3m"), Some(true))
    );
    let replay = dir
        .path()
        .join("out")
        .join("record.json")
        .display()
        .to_string();
    let (code, err) = mcdm(&[
        "sample",
        "--job",
        &replay,
        "--save-tensor",
        &p("again.safetensors"),
        "--out",
        &p("again"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        samples("again.safetensors"),
        ours,
        "the record's replay differs"
    );
}

/// Settings that belong to other samplers, impossible step counts and unknown names.
#[test]
fn solver_settings_that_do_not_apply_are_refused() {
    let base = ["--model", &model("uncond"), "--uncond", "uncond"];
    let with = |extra: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        args
    };
    fails(
        &with(&["--sampler", "dpmpp-2m", "--eta", "0.3"]),
        "is a DDIM setting: dpmpp-2m sampling has no eta",
    );
    fails(&with(&["--karras"]), "--karras chooses a solver's sigmas");
    fails(
        &with(&["--sampler", "ddpm", "--karras"]),
        "use it with --sampler dpmpp-2m, dpmpp-3m or unipc, not ddpm",
    );
    fails(
        &with(&["--sampler", "unipc", "--steps", "101"]),
        "unipc takes 1 to 100 steps (the model's diffusion steps), not 101",
    );
    fails(
        &with(&["--sampler", "dpmpp-3m", "--timestep-respacing", "ddim5"]),
        "dpmpp-3m takes a number of steps, not the respacing `ddim5`",
    );
    job_fails(
        json!({"sampler": "heun"}),
        "sampler `heun` is unknown (ddim, ddpm, dpmpp-2m, dpmpp-3m, unipc)",
    );
    job_fails(json!({"karras": "yes"}), "`karras` must be true or false");
    // An unknown --sampler is clap's usage error (exit 2), naming the valid ones.
    let mut args = vec!["sample"];
    args.extend(with(&["--sampler", "euler"]));
    let (code, err) = mcdm(&args);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("dpmpp-2m") && err.contains("unipc"), "{err}");
}

/// `--sampler ddpm` over a DDIM job drops the job's eta (the user did not give one).
#[test]
fn ddpm_flag_over_a_ddim_job_with_eta() {
    let dir = tempfile::tempdir().unwrap();
    let (path, out) = write_job(dir.path(), &json!({"sampler": "ddim", "eta": 0.5}));
    let (code, err) = mcdm(&["sample", "--job", &path, "--sampler", "ddpm"]);
    assert_eq!(code, Some(0), "{err}");
    let record = read_record(&out);
    assert_eq!(
        (record["sampler"].as_str(), record["eta"].as_f64()),
        (Some("ddpm"), Some(0.0))
    );
}

/// A failed run removes every directory level of --out it made, and nothing else.
/// Experts given with --expert replace the job file's.
#[test]
fn expert_flags_replace_the_jobs_experts() {
    let dir = tempfile::tempdir().unwrap();
    let experts = json!({ "experts": [
        { "model": "uncond", "weight": 0.5 }, { "model": "uncond", "weight": 0.25 },
    ] });
    let (job, out) = write_job(dir.path(), &experts);
    let (code, err) = mcdm(&["sample", "--job", &job, "--expert", "uncond,weight=2"]);
    assert_eq!(code, Some(0), "{err}");
    let record = read_record(&out);
    let weights: Vec<f64> = record["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["weight"].as_f64().unwrap())
        .collect();
    assert_eq!(weights, [2.0], "{record}");
}

/// A condition holds one entry for all images (`[D]`, `[1, D]`: the same samples) or one per
/// image; any other count is refused.
#[test]
fn condition_batches_broadcast_or_cover_the_samples() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let values: Vec<f32> = (0..64).map(|i| (i as f32 * 0.61).sin()).collect();
    let write = |name: &str, key: &str, shape: &[usize]| {
        let len = shape.iter().product::<usize>();
        let data = TensorData::F32(shape.to_vec(), &values[..len]);
        write_safetensors(&dir.path().join(name), &[(key, data)], None).unwrap();
    };
    let text = |file: &str, num_samples: &str, tensor: &str| {
        mcdm(&[
            "sample",
            "--model",
            &model("uncond"),
            "--model",
            &model("text"),
            "--uncond",
            "uncond",
            "--expert",
            &format!("text,embedding={}", p(file)),
            "--steps",
            "2",
            "--num-samples",
            num_samples,
            "--out",
            &p("out"),
            "--save-tensor",
            &p(tensor),
        ])
    };
    write("vector.safetensors", "embedding", &[16]);
    write("row.safetensors", "embedding", &[1, 16]);
    for (file, tensor) in [
        ("vector.safetensors", "a.safetensors"),
        ("row.safetensors", "b.safetensors"),
    ] {
        let (code, err) = text(file, "2", tensor);
        assert_eq!(code, Some(0), "{file}: {err}");
    }
    let samples = |f: &str| {
        SafetensorsFile::open(&dir.path().join(f))
            .unwrap()
            .f32("samples")
            .unwrap()
    };
    assert_eq!(samples("a.safetensors"), samples("b.safetensors"));

    write("two.safetensors", "embedding", &[2, 16]);
    let (code, err) = text("two.safetensors", "3", "c.safetensors");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`embedding` must be [D] or [1 or at least 3, D], got [2, 16]"),
        "{err}"
    );
    write("two-sketches.safetensors", "cond", &[2, 1, 4, 4]);
    sketch_condition_fails(
        &dir.path().join("two-sketches.safetensors"),
        &["--num-samples", "3"],
        "`cond` must be [C, H, W] or [1 or at least 3, C, H, W], got [2, 1, 4, 4]",
    );
}

/// The record keeps the batch size the run used, not the short last batch's.
#[test]
fn record_holds_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, err) = sample_uncond(&out, "3", &["--batch-size", "2"]);
    assert_eq!(code, Some(0), "{err}");
    let record = read_record(&out);
    assert_eq!(
        (
            record["batch_size"].as_u64(),
            record["num_samples"].as_u64()
        ),
        (Some(2), Some(3)),
        "{record}"
    );
    assert!(out.join("000002.png").is_file());
}

/// Bare names (`--out out`, `--save-tensor x.safetensors`) are taken in the working directory.
#[test]
fn relative_output_paths() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::output(
        Command::new(env!("CARGO_BIN_EXE_mcdm"))
            .current_dir(dir.path())
            .args(["sample", "--model", &model("uncond"), "--uncond", "uncond"])
            .args(["--steps", "2", "--num-samples", "1", "--out", "out"])
            .args(["--save-tensor", "x.safetensors"]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tensor = SafetensorsFile::open(&dir.path().join("x.safetensors")).unwrap();
    assert_eq!(tensor.shape("samples").unwrap()[0], 1);
    assert!(dir.path().join("out/000000.png").is_file());
}

#[test]
fn failed_run_removes_the_directories_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a/b/c");
    let missing = dir.path().join("missing/x.safetensors");
    let (code, err) = mcdm(&[
        "sample",
        "--model",
        &model("uncond"),
        "--uncond",
        "uncond",
        "--out",
        &out.display().to_string(),
        "--save-tensor",
        &missing.display().to_string(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        dir.path().is_dir() && !dir.path().join("a").exists(),
        "{err}"
    );
}

#[test]
fn a_name_or_key_given_twice() {
    let u = model("uncond");
    fails(
        &["--model", &u, "--model", &u, "--uncond", "uncond"],
        "--model uncond is given twice",
    );
    fails(
        &[
            "--model",
            &u,
            "--uncond",
            "uncond",
            "--expert",
            "uncond,weight=1,weight=2",
        ],
        "`weight` is given twice",
    );
}

/// More images than one run can draw noise for, or than memory holds, fail before sampling.
#[test]
fn impossible_sample_counts() {
    let run = |n: &str, needle: &str| {
        let u = model("uncond");
        fails(
            &[
                "--device",
                "cpu",
                "--model",
                &u,
                "--uncond",
                "uncond",
                "--num-samples",
                n,
            ],
            needle,
        );
    };
    run(
        "18446744073709551615",
        "more than the 4294967296 images one run draws",
    );
    // 2^32 images of 3x16x16, 1 byte each value for the PNGs, 1 for the grid.
    run(
        "4294967296",
        "16x16 (8-bit copies, grid, any --save-tensor) needs about 6144.0 GiB of memory, more \
         than the",
    );
    run("0", "--num-samples and --batch-size must be positive");
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--batch-size",
            "0",
        ],
        "--num-samples and --batch-size must be positive",
    );
}

/// Initial noise of 1e38 drives the network past f32: an error, and no image written.
#[test]
fn non_finite_samples_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.safetensors");
    write_safetensors(
        &noise,
        &[("x_T", TensorData::F32(vec![1, 3, 16, 16], &vec![1e38; 768]))],
        None,
    )
    .unwrap();
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--init-noise",
            &noise.display().to_string(),
        ],
        "sampling produced 768 non-finite value(s)",
    );
}

/// An unwritable --save-tensor or an output name taken by a directory fail before sampling.
#[test]
fn output_files_are_checked_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir
        .path()
        .join("missing/x.safetensors")
        .display()
        .to_string();
    fails(
        &[
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--save-tensor",
            &missing,
        ],
        "does not exist",
    );
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("record.json")).unwrap();
    let (code, err) = sample_uncond(&out, "1", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("record.json: is a directory"), "{err}");
    assert!(!out.join("000000.png").exists(), "an image was written");

    // A numbered image that cannot be written, and a tensor over one of the run's own files.
    let out = dir.path().join("out2");
    std::fs::create_dir_all(out.join("000001.png")).unwrap();
    let run = |extra: &[&str]| sample_uncond(&out, "2", extra);
    let (code, err) = run(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("000001.png: is a directory"), "{err}");
    std::fs::remove_dir(out.join("000001.png")).unwrap();
    for name in ["grid.png", "record.json", "000001.png"] {
        let tensor = out.join(name).display().to_string();
        let (code, err) = run(&["--save-tensor", &tensor]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains("the run writes that file itself"), "{err}");
    }
    assert!(!out.join("000000.png").exists(), "an image was written");

    // Past the run's numbers too: an earlier run's images there are removed at the end.
    std::fs::create_dir(out.join("000002.png")).unwrap();
    let (code, err) = run(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("000002.png: is a directory"), "{err}");
    std::fs::remove_dir(out.join("000002.png")).unwrap();
    // The tensor may go beside the images.
    let tensor = out.join("samples.safetensors");
    let (code, err) = run(&["--save-tensor", &tensor.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(tensor.is_file() && out.join("000001.png").is_file());
}

/// Model names must be usable in a term spec, and a path must follow `=`; a model no term uses
/// is named in a warning (it is not loaded, so a wrong path would otherwise go unnoticed).
#[test]
fn bad_model_arguments() {
    fails(
        &["--model", "=x.safetensors", "--uncond", "u"],
        "must be non-empty",
    );
    fails(
        &["--model", "a,b=x.safetensors", "--uncond", "u"],
        "without `,`",
    );
    fails(&["--model", "u=", "--uncond", "u"], "no path after `=`");
    let dir = tempfile::tempdir().unwrap();
    let unused = ["--model", "s=/no/such/model.safetensors"];
    let (code, err) = sample_uncond(&dir.path().join("out"), "1", &unused);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: model `s`") && err.contains("not loaded"),
        "{err}"
    );
}

/// A PNG whose header declares 30000x30000 pixels is refused before it is decoded.
#[test]
fn oversized_png_condition() {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        c.extend_from_slice(&body);
        c.extend_from_slice(&crc32(&body).to_be_bytes());
        c
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.png");
    std::fs::write(&path, png).unwrap();
    sketch_condition_fails(
        &path,
        &[],
        "the PNG is 30000x30000, larger than mcdm's largest image size, 4096x4096",
    );
}

/// Images an earlier, larger run left in --out are pointed out, not silently mixed in.
#[test]
fn a_smaller_run_replaces_a_larger_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let run = |n: &str| {
        mcdm(&[
            "sample",
            "--device",
            "cpu",
            "--model",
            &model("uncond"),
            "--uncond",
            "uncond",
            "--steps",
            "2",
            "--num-samples",
            n,
            "--out",
            &out,
        ])
    };
    let (code, err) = run("3");
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("earlier run"), "{err}");
    let (code, err) = run("1");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("held an earlier run: removed its 2 image(s) that this one does not make"),
        "{err}"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["000000.png", "grid.png", "record.json"]);
}
