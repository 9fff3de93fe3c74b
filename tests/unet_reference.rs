//! The UNet forward pass against guided-diffusion's `UNetModel` (fixtures made by
//! `tools/make_unet_fixtures.py` on random weights): rel L2 <= 1e-5.

mod common;

use common::{fixtures, rel_l2, unet_case_names, within, UnetCase};
use mcdm::backend::Cpu;
use mcdm::config::{resolve, InferredArch, PartialConfig, Source};
use mcdm::device::Workspace;
use mcdm::model::{load_model, Conditioning, UNet};
use mcdm::weights::SafetensorsFile;

/// f32 rel L2 of the forward pass: measured at most 1.2e-6 (2026-12-06).
const FORWARD_BOUND: f64 = 1e-5;

#[test]
fn forward_matches_reference() {
    let mut ws = Workspace::new();
    for name in unet_case_names() {
        let case = UnetCase::load(&name);
        let (model, cond) = (&case.model, case.conditioning());
        let out = model
            .forward_nchw(&case.x, case.shape, &cond, &mut ws)
            .unwrap();
        let err = rel_l2(&out, &case.out);
        within(
            &format!("{name}: forward vs guided-diffusion, rel L2"),
            err,
            FORWARD_BOUND,
        );
        // The workspace is reused across cases and calls: a second pass must agree exactly.
        let again = model
            .forward_nchw(&case.x, case.shape, &cond, &mut ws)
            .unwrap();
        assert_eq!(
            out, again,
            "{name}: second pass through a reused workspace differs"
        );
    }
}

/// Architecture fields read off the key names and shapes equal those of the config file.
#[test]
fn inference_recovers_architecture() {
    for case in unet_case_names() {
        let file = SafetensorsFile::open(&fixtures(&format!("unet/{case}.safetensors"))).unwrap();
        let model = load_model(file.path(), None).unwrap();
        let want = &model.config.unet;
        let arch = InferredArch::from_shapes(&file.shapes());
        assert_eq!(arch.num_channels, Some(want.num_channels), "{case}");
        assert_eq!(arch.in_channels, Some(want.in_channels), "{case}");
        assert_eq!(arch.num_res_blocks, Some(want.num_res_blocks), "{case}");
        assert_eq!(
            arch.channel_mult.as_ref(),
            Some(&want.channel_mult),
            "{case}"
        );
        assert_eq!(arch.attention_ds, Some(want.attention_ds()), "{case}");
        assert_eq!(
            arch.use_scale_shift_norm,
            Some(want.use_scale_shift_norm),
            "{case}"
        );
        assert_eq!(arch.resblock_updown, Some(want.resblock_updown), "{case}");
        assert_eq!(arch.learn_sigma, Some(want.learn_sigma), "{case}");
        assert_eq!(arch.num_classes, Some(want.num_classes), "{case}");
        assert_eq!(arch.embed_dim, Some(want.embed_dim), "{case}");
        // With no config at all, the inferred model still loads (heads default to 4, or what
        // the shapes allow) and every key is accounted for.
        let inferred = resolve(&[], &file.shapes())
            .unwrap_or_else(|e| panic!("{case}: no config, inferred: {e}"));
        assert_eq!(
            inferred.unet.level_channels(),
            want.level_channels(),
            "{case}"
        );
    }
}

/// A config with heads given but everything else inferred reproduces the reference.
#[test]
fn partial_config_with_inference_matches_reference() {
    let case = "legacy_heads2_scaleshift";
    let file = SafetensorsFile::open(&fixtures(&format!("unet/{case}.safetensors"))).unwrap();
    let full = load_model(file.path(), None).unwrap();
    let heads_only = PartialConfig::from_json(&format!(
        r#"{{"num_heads": {}, "image_size": {}}}"#,
        full.config.unet.num_heads, full.config.unet.image_size
    ))
    .unwrap();
    let src = Source::File("test".into());
    let cfg = resolve(&[(src, heads_only)], &file.shapes()).unwrap();
    let mut a = full.config.unet.clone();
    let b = cfg.unet.clone();
    // Fields that never reach the forward pass.
    a.dropout = b.dropout;
    assert_eq!(a, b);
}

/// A network of the config `json` (no weights file) with random weights.
fn random_unet(json: &str) -> UNet<Cpu> {
    let partial = PartialConfig::from_json(json).unwrap();
    let source = Source::File("test".into());
    let config = resolve(&[(source, partial)], &Default::default()).unwrap();
    UNet::random(&config.unet, 7).unwrap()
}

/// A batch whose activations would not stay cache-sized runs in groups of images
/// (`forward_nhwc`); each image's output must be what a batch of that image alone gives, its
/// timestep, label and vector condition included.
#[test]
fn large_batches_run_in_groups_with_unchanged_results() {
    // 32 x 32 pixels x 512 input channels = 2^19 floats an image: groups of two images (the
    // group size is 2^20 floats), so 3 images run as 2 + 1.
    let unet = random_unet(
        r#"{"image_size": 32, "in_channels": 512, "num_channels": 32, "num_res_blocks": 1,
            "channel_mult": "1,2", "attention_resolutions": "", "class_cond": true,
            "num_classes": 5, "embed_dim": 3, "learn_sigma": true}"#,
    );
    let (n, h, w, c) = (3, 32, 32, 512);
    let per_image = h * w * c;
    let x: Vec<f32> = (0..n * per_image)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.0) - 1.0)
        .collect();
    let timesteps = [12.0, 500.0, 977.0];
    let labels = [4, 0, 2];
    let embedding: Vec<f32> = (0..n * 3).map(|i| (i as f32 * 0.7).sin()).collect();
    let mut cpu = Cpu::new();
    let cond = Conditioning {
        timesteps: &timesteps,
        labels: Some(&labels),
        embedding: Some(&embedding),
    };
    let all = unet
        .forward_nhwc(&mut cpu, &x, [n, h, w, c], &cond)
        .unwrap();
    let out_per_image = all.len() / n;
    for k in 0..n {
        let one = Conditioning {
            timesteps: &timesteps[k..k + 1],
            labels: Some(&labels[k..k + 1]),
            embedding: Some(&embedding[k * 3..k * 3 + 3]),
        };
        let single = unet
            .forward_nhwc(
                &mut cpu,
                &x[k * per_image..][..per_image],
                [1, h, w, c],
                &one,
            )
            .unwrap();
        assert_eq!(
            &all[k * out_per_image..][..out_per_image],
            &single[..],
            "image {k}"
        );
    }
}

/// The FLOPs `bench` and `inspect` report, against PyTorch's FlopCounterMode on the reference
/// model (`flops.json`): convolutions and attention's two matmuls, exactly.
#[test]
fn flops_match_pytorch_flop_counter() {
    let dir = fixtures("unet");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("flops.json")).unwrap()).unwrap();
    let cases = cases.as_object().unwrap();
    assert!(cases.len() >= 9, "flops.json holds {} cases", cases.len());
    for (name, case) in cases {
        let text = std::fs::read_to_string(dir.join(case["config"].as_str().unwrap())).unwrap();
        let unet = random_unet(&text);
        let size = |k: &str| case[k].as_u64().unwrap() as usize;
        let got = unet.flops_per_image(size("height"), size("width"));
        assert_eq!(got, case["flops"].as_f64().unwrap(), "{name}");
    }
}
