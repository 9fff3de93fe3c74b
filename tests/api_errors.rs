//! The library's entry points, called the way an embedding program would, with input that is
//! wrong: each returns an error naming the problem, never a panic (the test profile checks
//! overflow, so a wrapped size shows here as a panic too).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use mcdm::backend::Cpu;
use mcdm::config::{resolve, PartialConfig, ResolvedConfig, Source};
use mcdm::diffusion::{space_timesteps, Diffusion};
use mcdm::model::{load_model, Conditioning, LoadedModel, UNet};
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, Unconditional,
};
use mcdm::weights::{write_safetensors, TensorData};

use common::fixtures;

/// Asserts that `result` is an error whose message contains `needle`.
fn fails<T: std::fmt::Debug>(result: mcdm::Result<T>, needle: &str) {
    match result {
        Ok(v) => panic!("expected an error containing `{needle}`, got Ok({v:?})"),
        Err(e) => assert!(e.to_string().contains(needle), "`{needle}` not in: {e}"),
    }
}

fn uncond_model() -> LoadedModel {
    load_model(&fixtures("sample/models/uncond.safetensors"), None).unwrap()
}

/// A config of `json` over a small 8x8 model, no weights.
fn config(json: &str) -> mcdm::Result<ResolvedConfig> {
    let base = r#"{"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1",
                   "attention_resolutions": "", "diffusion_steps": 100"#;
    let partial = PartialConfig::from_json(&format!("{base}{json}}}"))?;
    resolve(&[(Source::File("test".into()), partial)], &BTreeMap::new())
}

fn spec(height: usize, width: usize) -> SampleSpec {
    SampleSpec {
        sampler: SamplerKind::Ddim { eta: 0.0 },
        timestep_respacing: Some("2".into()),
        clip_denoised: true,
        seed: 3,
        height,
        width,
    }
}

const UNCOND: Unconditional = Unconditional {
    model: 0,
    condition: Condition {
        class: None,
        image: None,
        embedding: None,
    },
};

#[test]
fn sampler_refuses_impossible_image_sizes() {
    let models = [uncond_model()];
    for (h, w) in [(0, 16), (16, 0), (8192, 2), (1 << 32, 1 << 32)] {
        fails(
            ComposedSampler::new(&models, &[], &UNCOND, spec(h, w)).map(|_| ()),
            &format!("the image size {h}x{w} must be between 1 and 4096"),
        );
    }
}

#[test]
fn sampler_refuses_a_model_with_fewer_than_three_input_channels() {
    let models =
        [LoadedModel::random(config(r#", "in_channels": 1"#).unwrap(), 1, "gray").unwrap()];
    fails(
        ComposedSampler::new(&models, &[], &UNCOND, spec(8, 8)).map(|_| ()),
        "takes 1 input channel(s), fewer than the 3",
    );
}

/// Each term's condition is checked against its model when the sampler is built.
#[test]
fn sampler_refuses_conditions_its_models_cannot_take() {
    let load = |name: &str| {
        load_model(
            &fixtures(&format!("sample/models/{name}.safetensors")),
            None,
        )
        .unwrap()
    };
    // uncond; classes: 5 classes; sketch: a 1-channel image condition; text: a 16-wide
    // embedding.
    let models = [
        load("uncond"),
        load("classes"),
        load("sketch"),
        load("text"),
    ];
    let expert = |model: usize, condition: Condition| Expert {
        model,
        condition,
        weight: 1.0,
    };
    let class = |class: i64| Condition {
        class: Some(class),
        ..Default::default()
    };
    let values = |len: usize| -> Vec<f32> { (0..len).map(|i| (i as f32 * 0.3).sin()).collect() };
    let image = |count: usize, len: usize| Condition {
        image: Some(Batched {
            data: values(len),
            count,
        }),
        ..Default::default()
    };
    let embedding = |count: usize, len: usize| Condition {
        embedding: Some(Batched {
            data: values(len),
            count,
        }),
        ..Default::default()
    };
    for (term, needle) in [
        (expert(1, class(5)), "class 5 is out of range 0..5"),
        (expert(1, class(-1)), "class -1 is out of range 0..5"),
        (
            expert(1, Condition::default()),
            "the model is class-conditional (5 classes): give class=K",
        ),
        (
            expert(0, class(1)),
            "class= given, but the model is not class-conditional",
        ),
        (
            expert(2, Condition::default()),
            "takes a 1-channel image condition: give image=PATH",
        ),
        (
            expert(0, image(1, 256)),
            "image= given, but the model takes no image condition",
        ),
        (
            expert(2, image(0, 0)),
            "the model takes a 1-channel image condition ([1, 16, 16] per image, 256 values), got \
             no values",
        ),
        (
            expert(2, image(2, 511)),
            "the model takes a 1-channel image condition ([1, 16, 16] per image, 256 values), got \
             255 values",
        ),
        (
            expert(3, Condition::default()),
            "takes a 16-wide embedding: give embedding=PATH",
        ),
        (
            expert(0, embedding(1, 16)),
            "embedding= given, but the model takes no vector condition",
        ),
        (
            expert(3, embedding(0, 0)),
            "the embedding must have 16 values per image, got 0",
        ),
        (
            expert(3, embedding(2, 31)),
            "the embedding must have 16 values per image, got 15",
        ),
    ] {
        fails(
            ComposedSampler::new(&models, &[term], &UNCOND, spec(16, 16)).map(|_| ()),
            needle,
        );
    }
    // The unconditional term may leave an image or embedding out (zeros stand in for it; the
    // images that makes are checked against guided-diffusion by the sampling fixture
    // j_sketch_zero_uncond in tests/sample_reference.rs).
    for model in [2, 3] {
        let uncond = Unconditional {
            model,
            condition: Condition::default(),
        };
        assert!(ComposedSampler::new(&models, &[], &uncond, spec(16, 16)).is_ok());
    }
}

#[test]
fn sample_batch_refuses_image_indices_past_the_noise_keys() {
    let models = [uncond_model()];
    let sampler = ComposedSampler::new(&models, &[], &UNCOND, spec(16, 16)).unwrap();
    for first in [usize::MAX, 1 << 32] {
        let x: Vec<f32> = (0..768).map(|i| (i as f32 * 0.37).sin()).collect();
        fails(sampler.sample_batch(first, x, &mut || {}), "one run draws");
    }
}

/// x_T must be whole images, and per-image conditions must reach the batch's last image.
#[test]
fn sample_batch_checks_its_input() {
    let sketch = load_model(&fixtures("sample/models/sketch.safetensors"), None).unwrap();
    let models = [uncond_model(), sketch];
    let images = |count: usize, len: usize| -> Vec<f32> {
        (0..count * len).map(|i| (i as f32 * 0.37).sin()).collect()
    };
    let plain = ComposedSampler::new(&models, &[], &UNCOND, spec(16, 16)).unwrap();
    for len in [0, 767, 769, 2 * 768 + 5] {
        fails(
            plain.sample_batch(0, images(1, len), &mut || {}),
            &format!("x_T has {len} values, not a multiple of 3x16x16"),
        );
    }
    // A sketch expert with 5 sketches (1 channel): images 0..5 only.
    let expert = Expert {
        model: 1,
        condition: Condition {
            class: None,
            image: Some(Batched {
                data: images(5, 256),
                count: 5,
            }),
            embedding: None,
        },
        weight: 1.0,
    };
    let experts = [expert];
    let sampler = ComposedSampler::new(&models, &experts, &UNCOND, spec(16, 16)).unwrap();
    for (first, b) in [(5, 1), (4, 2), (0, 6)] {
        fails(
            sampler.sample_batch(first, images(b, 768), &mut || {}),
            &format!("holds 5 items, but {} images are sampled", first + b),
        );
    }
    let last = sampler.sample_batch(3, images(2, 768), &mut || {});
    assert_eq!(last.unwrap().len(), 2 * 768);
}

/// Counts of zero, more images than the noise keys reach, and initial noise of the wrong size
/// or not finite.
#[test]
fn sample_refuses_bad_requests() {
    let models = [uncond_model()];
    let sampler = ComposedSampler::new(&models, &[], &UNCOND, spec(16, 16)).unwrap();
    let noise = |values: usize| -> Vec<f32> { (0..values).map(|i| (i as f32).cos()).collect() };
    let max = mcdm::rng::MAX_SAMPLES;
    for (n, batch, init, needle) in [
        (0, 1, None, "num_samples and batch_size must be positive"),
        (1, 0, None, "num_samples and batch_size must be positive"),
        (
            max + 1,
            1,
            None,
            "more than the 4294967296 images one run draws",
        ),
        // At the limit the request is possible, only too large for this machine.
        (max, 1, None, "which is not available"),
        (
            2,
            2,
            Some(noise(768)),
            "initial noise has 768 values, expected [2, 3, 16, 16]",
        ),
        (1, 1, Some(noise(769)), "initial noise has 769 values"),
        (
            1,
            1,
            Some([noise(767), vec![f32::NAN]].concat()),
            "initial noise holds 1 non-finite value(s)",
        ),
    ] {
        fails(
            sampler.sample(n, batch, init.as_deref(), &mut |_| {}),
            needle,
        );
    }
}

#[test]
fn forward_checks_the_input_length() {
    let model = uncond_model();
    let t = [10.0f32];
    let cond = Conditioning {
        timesteps: &t,
        labels: None,
        embedding: None,
    };
    let unet = model.cpu_unet().unwrap();
    let mut cpu = Cpu::new();
    let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
    for len in [10, 0, 1000] {
        fails(
            unet.forward_nhwc(&mut cpu, &x[..len], [1, 16, 16, 3], &cond),
            "not 1x16x16x3",
        );
    }
    let mut inf = x[..768].to_vec();
    inf[5] = f32::INFINITY;
    inf[700] = f32::NAN;
    fails(
        unet.forward_nhwc(&mut cpu, &inf, [1, 16, 16, 3], &cond),
        "x holds 2 non-finite value(s)",
    );
    // A shape whose product wraps around usize.
    fails(
        unet.forward_nchw(&mut cpu, &[], [1 << 62, 4, 1, 1], &cond),
        "x has 0 values",
    );
    fails(
        unet.forward_nhwc(&mut cpu, &[], [1, 1 << 20, 1 << 20, 3], &cond),
        "x has 0 values",
    );
}

/// `UNet::check_input`, which every forward pass (CPU and GPU) runs first: the batch, the
/// image size and each condition against what the model takes.
#[test]
fn forward_input_is_checked_against_the_model() {
    let load = |name: &str| {
        load_model(
            &fixtures(&format!("sample/models/{name}.safetensors")),
            None,
        )
        .unwrap()
    };
    let (uncond, classes, text) = (load("uncond"), load("classes"), load("text"));
    let (uncond, classes, text) = (
        uncond.cpu_unet().unwrap(),
        classes.cpu_unet().unwrap(),
        text.cpu_unet().unwrap(),
    );
    let t = [10.0f32, 20.0];
    let plain = |n: usize| Conditioning {
        timesteps: &t[..n],
        labels: None,
        embedding: None,
    };
    for (n, h, w) in [(0, 8, 8), (1, 0, 8), (1, 8, 0)] {
        fails(
            uncond.check_input(n, 3, h, w, &plain(n)),
            &format!("empty input batch [{n}, 3, {h}, {w}]"),
        );
    }
    for (h, w) in [(4098, 8), (8, 4098)] {
        fails(
            uncond.check_input(1, 3, h, w, &plain(1)),
            &format!("image size {h}x{w} is larger than the 4096"),
        );
    }
    uncond.check_input(1, 3, 4096, 4096, &plain(1)).unwrap();

    let labels = [1i64, 4];
    let with_labels = |n: usize, k: usize| Conditioning {
        labels: Some(&labels[..k]),
        ..plain(n)
    };
    classes.check_input(2, 3, 8, 8, &with_labels(2, 2)).unwrap();
    fails(
        classes.check_input(2, 3, 8, 8, &with_labels(2, 1)),
        "1 class labels for a batch of 2",
    );
    fails(
        classes.check_input(1, 3, 8, 8, &plain(1)),
        "the model is class-conditional (5 classes): give labels `y`",
    );
    fails(
        uncond.check_input(1, 3, 8, 8, &with_labels(1, 1)),
        "class labels given, but the model is not class-conditional",
    );

    let embedding: Vec<f32> = (0..40).map(|i| (i as f32 * 0.3).sin()).collect();
    let with_embedding = |n: usize, len: usize| Conditioning {
        embedding: Some(&embedding[..len]),
        ..plain(n)
    };
    text.check_input(2, 3, 8, 8, &with_embedding(2, 32))
        .unwrap();
    fails(
        text.check_input(2, 3, 8, 8, &with_embedding(2, 16)),
        "embedding has 16 values, expected [2, 16]",
    );
    fails(
        text.check_input(1, 3, 8, 8, &plain(1)),
        "the model takes a vector condition: give `emb` [1, 16]",
    );
    fails(
        uncond.check_input(1, 3, 8, 8, &with_embedding(1, 16)),
        "an embedding was given, but the model has no embed_dim",
    );
}

/// A forward pass whose activations cannot fit in this machine's memory is refused before they
/// are allocated: one 4096x4096 image through 129 residual blocks of 64 channels, whose skip
/// connections alone are about 280 GB.
#[test]
fn forward_refuses_what_memory_cannot_hold() {
    let mut cfg = config("").unwrap();
    (cfg.unet.num_channels, cfg.unet.num_res_blocks) = (64, 64);
    let unet = UNet::random(&cfg.unet, 1).unwrap();
    let side = 4096;
    let need = unet.working_floats_per_image(side, side) as u64 * 4;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(u64::MAX / 1024);
    if need <= total_kib * 1024 {
        common::skip(
            "refusing a pass past memory",
            &format!("the pass needs {need} bytes, not more than this machine's memory"),
        );
        return;
    }
    let x: Vec<f32> = (0..side * side * 3)
        .map(|i| ((i % 1999) as f32 * 0.01).sin())
        .collect();
    let cond = Conditioning {
        timesteps: &[10.0],
        labels: None,
        embedding: None,
    };
    fails(
        unet.forward_nhwc(&mut Cpu::new(), &x, [1, side, side, 3], &cond),
        "a forward pass of 1 image(s) of 4096x4096 needs about",
    );
}

#[test]
fn configs_refuse_impossible_level_counts() {
    let mut cfg = config("").unwrap();
    cfg.unet.channel_mult.clear();
    fails(cfg.unet.validate(), "at least one level");
    fails(UNet::parameter_count(&cfg.unet), "at least one level");
    fails(
        LoadedModel::random(cfg, 0, "empty").map(|_| ()),
        "at least one level",
    );
    let partial = PartialConfig::from_json(&format!(
        r#"{{"channel_mult": "{}"}}"#,
        vec!["1"; 70].join(",")
    ))
    .unwrap();
    fails(
        resolve(&[(Source::File("test".into()), partial)], &BTreeMap::new()).map(|_| ()),
        "channel_mult levels",
    );
    // The bounds themselves are taken; one past them is not.
    let mut cfg = config("").unwrap();
    cfg.unet.num_res_blocks = 64;
    cfg.unet.validate().unwrap();
    cfg.unet.num_res_blocks = 65;
    fails(
        cfg.unet.validate(),
        "num_res_blocks 65 and 1 channel_mult levels",
    );
    let mut cfg = config("").unwrap();
    (cfg.unet.image_size, cfg.unet.channel_mult) = (4096, vec![1.0; 13]);
    cfg.unet.validate().unwrap();
    cfg.unet.channel_mult.push(1.0);
    fails(
        cfg.unet.validate(),
        "num_res_blocks 1 and 14 channel_mult levels",
    );
    let mut cfg = config("").unwrap();
    cfg.unet.num_classes = Some(1 << 24);
    cfg.unet.validate().unwrap();
    cfg.unet.num_classes = Some((1 << 24) + 1);
    fails(cfg.unet.validate(), "num_classes must be at most 16777216");
}

#[test]
fn diffusion_sizes_are_bounded() {
    let mut cfg = config("").unwrap().diffusion;
    for steps in [0, usize::MAX, 1 << 36, 1_000_001] {
        cfg.diffusion_steps = steps;
        fails(
            Diffusion::from_config(&cfg).map(|_| ()),
            "diffusion_steps must be between 1 and 1000000",
        );
        fails(
            space_timesteps(steps, ""),
            "diffusion_steps must be between",
        );
    }
    // The longest diffusion taken.
    cfg.diffusion_steps = 1_000_000;
    assert_eq!(Diffusion::from_config(&cfg).unwrap().num_steps(), 1_000_000);
    assert_eq!(space_timesteps(1_000_000, "").unwrap().len(), 1_000_000);
    // A respacing no stride gives is refused with the config, not when sampling starts.
    fails(
        config(r#", "timestep_respacing": "abc""#).map(|_| ()),
        "timestep_respacing",
    );
    let diffusion = Diffusion::from_config(&config("").unwrap().diffusion).unwrap();
    for eta in [f32::NAN, -1.0, 2.0] {
        fails(
            diffusion.ddim_params(3, eta, true).map(|_| ()),
            "eta must be between 0 and 1",
        );
    }
}

#[test]
fn written_tensors_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let values = [0.5f32, -1.5];
    fails(
        write_safetensors(
            &path,
            &[
                ("a", TensorData::F32(vec![2], &values)),
                ("a", TensorData::F32(vec![2], &values)),
            ],
            None,
        ),
        "tensor `a` is given twice",
    );
    fails(
        write_safetensors(
            &path,
            &[("a", TensorData::F32(vec![1 << 62, 4], &[]))],
            None,
        ),
        "does not hold its 0 values",
    );
    fails(
        mcdm::image::write_png(&path, &[1, 2, 3], 1, (1 << 32) + 1),
        "more than a PNG holds",
    );
    assert!(!Path::new(&path).exists(), "a refused write left a file");
}
