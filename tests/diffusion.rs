//! The diffusion module against guided-diffusion's own numbers
//! (`tools/make_diffusion_fixtures.py` writes them into `tests/fixtures/diffusion/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mcdm::diffusion::{
    beta_schedule, compose, space_timesteps, Diffusion, DiffusionConfig, DiffusionTables,
    NoiseSchedule,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture { bytes }
    }
    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        meta.metadata().clone().unwrap_or_default()
    }
    fn has(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }
    fn f64s(&self, name: &str) -> Vec<f64> {
        let st = self.tensors();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.tensors();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn usizes(&self, name: &str) -> Vec<usize> {
        let st = self.tensors();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect()
    }
}

fn schedule(name: &str) -> NoiseSchedule {
    NoiseSchedule::parse(name).unwrap()
}

fn assert_rel_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(f64::MIN_POSITIVE);
        assert!(
            err <= tol || g == w,
            "{what}[{k}]: {g:e} vs {w:e} (rel {err:e})"
        );
    }
}

#[test]
fn tables_match_reference() {
    let mut seen = 0;
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("tables_") {
            continue;
        }
        seen += 1;
        let fx = Fixture::open(&path);
        let meta = fx.metadata();
        let config = DiffusionConfig {
            diffusion_steps: meta["diffusion_steps"].parse().unwrap(),
            noise_schedule: schedule(&meta["noise_schedule"]),
            timestep_respacing: meta["timestep_respacing"].clone(),
            rescale_timesteps: meta["rescale_timesteps"] == "true",
            ..DiffusionConfig::default()
        };
        assert_rel_close(
            &format!("{name} schedule_betas"),
            &beta_schedule(config.noise_schedule, config.diffusion_steps),
            &fx.f64s("schedule_betas"),
            1e-12,
        );
        let d = Diffusion::from_config(&config).unwrap();
        let t = d.tables();
        let tables: [(&str, &Vec<f64>); 9] = [
            ("betas", &t.betas),
            ("alphas_cumprod", &t.alphas_cumprod),
            ("alphas_cumprod_prev", &t.alphas_cumprod_prev),
            ("sqrt_recip_alphas_cumprod", &t.sqrt_recip_alphas_cumprod),
            (
                "sqrt_recipm1_alphas_cumprod",
                &t.sqrt_recipm1_alphas_cumprod,
            ),
            ("posterior_variance", &t.posterior_variance),
            (
                "posterior_log_variance_clipped",
                &t.posterior_log_variance_clipped,
            ),
            ("posterior_mean_coef1", &t.posterior_mean_coef1),
            ("posterior_mean_coef2", &t.posterior_mean_coef2),
        ];
        for (table, got) in tables {
            assert_rel_close(&format!("{name} {table}"), got, &fx.f64s(table), 1e-12);
        }
        assert_eq!(d.timestep_map(), &fx.usizes("timestep_map")[..], "{name}");
        assert_eq!(d.num_steps(), d.timestep_map().len());
        let want_ts = fx.f32s("model_timesteps");
        let got_ts: Vec<f32> = (0..d.num_steps()).map(|i| d.model_timestep(i)).collect();
        assert_eq!(got_ts, want_ts, "{name} model timesteps");
    }
    assert!(seen >= 8, "only {seen} table fixtures found");
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// f32 rel L2 of one step and its predicted x_0: measured at most 1.2e-7 (2026-12-06).
const STEP_BOUND: f64 = 1e-6;

#[test]
fn steps_match_reference() {
    let fx = Fixture::open(&fixture_dir().join("steps.safetensors"));
    let cases: Vec<Value> = serde_json::from_str(&fx.metadata()["cases"]).unwrap();
    let mut kinds = HashMap::new();
    let mut worst = 0.0f64;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let config = DiffusionConfig {
            diffusion_steps: c["diffusion_steps"].as_u64().unwrap() as usize,
            noise_schedule: schedule(c["noise_schedule"].as_str().unwrap()),
            timestep_respacing: c["timestep_respacing"].as_str().unwrap().to_owned(),
            learn_sigma: c["learn_sigma"].as_bool().unwrap(),
            sigma_small: c["sigma_small"].as_bool().unwrap(),
            predict_xstart: c["predict_xstart"].as_bool().unwrap(),
            ..DiffusionConfig::default()
        };
        let d = Diffusion::from_config(&config).unwrap();
        let i = case["index"].as_u64().unwrap() as usize;
        let clip = case["clip_denoised"].as_bool().unwrap();
        let kind = case["kind"].as_str().unwrap();
        let x = fx.f32s(&format!("{name}.x"));
        let m = fx.f32s(&format!("{name}.model_out"));
        let noise = fx.f32s(&format!("{name}.noise"));
        let mut out = vec![0.0f32; x.len()];
        match kind {
            "ddpm" => {
                let v = fx
                    .has(&format!("{name}.v"))
                    .then(|| fx.f32s(&format!("{name}.v")));
                d.ddpm_step(i, &x, &m, v.as_deref(), clip, Some(&noise), &mut out)
                    .unwrap();
            }
            "ddim" => {
                let eta = case["eta"].as_f64().unwrap() as f32;
                d.ddim_step(i, &x, &m, eta, clip, Some(&noise), &mut out)
                    .unwrap();
            }
            other => panic!("unknown case kind {other}"),
        }
        let e = rel_l2(&out, &fx.f32s(&format!("{name}.sample")));
        assert!(e <= STEP_BOUND, "{name}: sample rel L2 {e:e}");
        worst = worst.max(e);
        d.predict_xstart(i, &x, &m, clip, &mut out).unwrap();
        let e = rel_l2(&out, &fx.f32s(&format!("{name}.pred_xstart")));
        assert!(e <= STEP_BOUND, "{name}: pred_xstart rel L2 {e:e}");
        worst = worst.max(e);
        *kinds.entry(kind.to_owned()).or_insert(0) += 1;
    }
    assert!(
        kinds["ddpm"] >= 16 && kinds["ddim"] >= 32,
        "cases: {kinds:?}"
    );
    eprintln!(
        "{} steps vs guided-diffusion: worst rel L2 {worst:.2e} (bound {STEP_BOUND:.0e})",
        cases.len()
    );
}

#[test]
fn respacing_matches_reference() {
    let text = std::fs::read_to_string(fixture_dir().join("respacing.json")).unwrap();
    let entries: Vec<Value> = serde_json::from_str(&text).unwrap();
    let as_usizes = |v: &Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as usize)
            .collect()
    };
    for e in &entries {
        let steps = e["num_timesteps"].as_u64().unwrap() as usize;
        let spec = e["spec"].as_str().unwrap();
        let got = space_timesteps(steps, spec);
        match e.get("space") {
            // The reference returns an empty set for e.g. "0" and only fails when building the
            // diffusion; space_timesteps refuses it up front.
            Some(kept) if kept.as_array().unwrap().is_empty() => {
                assert!(
                    got.is_err(),
                    "T={steps} `{spec}`: expected an error, got {got:?}"
                )
            }
            Some(kept) => assert_eq!(got.unwrap(), as_usizes(kept), "T={steps} `{spec}`"),
            None => assert!(
                got.is_err(),
                "T={steps} `{spec}`: expected an error, got {got:?}"
            ),
        }
        let config = DiffusionConfig {
            diffusion_steps: steps,
            noise_schedule: schedule(e["noise_schedule"].as_str().unwrap()),
            timestep_respacing: spec.to_owned(),
            ..DiffusionConfig::default()
        };
        let built = Diffusion::from_config(&config);
        match e.get("timestep_map") {
            Some(map) => assert_eq!(
                built.unwrap().timestep_map(),
                &as_usizes(map)[..],
                "T={steps} `{spec}`"
            ),
            None => assert!(built.is_err(), "T={steps} `{spec}` should not build"),
        }
    }
}

#[test]
fn bad_settings_are_errors() {
    for spec in [
        "abc", "0", "1001", "ddim", "ddimx", "ddim1001", "10,,5", "2.5", "-5",
    ] {
        assert!(space_timesteps(1000, spec).is_err(), "`{spec}`");
    }
    let err = space_timesteps(1000, "99999999999999999999").unwrap_err();
    assert!(err.to_string().contains("is too large"), "{err}");
    // An exact integer stride exists for ddim7 at T=1000 (143), none for ddim33 at T=100.
    assert_eq!(space_timesteps(1000, "ddim7").unwrap().len(), 7);
    assert!(space_timesteps(100, "ddim33").is_err());
    let mut config = DiffusionConfig {
        timestep_respacing: "1".into(),
        ..DiffusionConfig::default()
    };
    assert!(
        Diffusion::from_config(&config).is_err(),
        "a single step cannot build"
    );
    config.timestep_respacing = String::new();
    config.diffusion_steps = 7;
    assert!(
        Diffusion::from_config(&config).is_err(),
        "linear betas above 1"
    );
    config.diffusion_steps = 0;
    assert!(Diffusion::from_config(&config).is_err());
    // Betas must lie in (0, 1]: beta 0 would divide by 1 - alpha_bar = 0 in the posterior.
    for betas in [
        vec![0.0, 0.5],
        vec![0.5, 1.5],
        vec![0.5, f64::NAN],
        vec![0.5],
    ] {
        assert!(
            DiffusionTables::from_betas(betas.clone()).is_err(),
            "{betas:?}"
        );
    }
    assert!(DiffusionTables::from_betas(vec![0.5, 1.0]).is_ok());
}

#[test]
fn step_arguments_are_checked() {
    let fixed = Diffusion::from_config(&DiffusionConfig {
        timestep_respacing: "10".into(),
        ..DiffusionConfig::default()
    })
    .unwrap();
    let learned = Diffusion::from_config(&DiffusionConfig {
        timestep_respacing: "10".into(),
        learn_sigma: true,
        ..DiffusionConfig::default()
    })
    .unwrap();
    let x = vec![0.3f32; 12];
    let m = vec![-0.2f32; 12];
    let mut out = vec![0.0f32; 12];
    // Noise is needed wherever the step adds some, and only there.
    assert!(fixed
        .ddpm_step(5, &x, &m, None, true, None, &mut out)
        .is_err());
    assert!(fixed
        .ddpm_step(0, &x, &m, None, true, None, &mut out)
        .is_ok());
    assert!(fixed
        .ddim_step(5, &x, &m, 0.0, true, None, &mut out)
        .is_ok());
    assert!(fixed
        .ddim_step(5, &x, &m, 1.0, true, None, &mut out)
        .is_err());
    assert!(fixed
        .ddim_step(0, &x, &m, 1.0, true, None, &mut out)
        .is_ok());
    // The last step is the noiseless mean: noise given at i == 0 changes nothing.
    let mut with_noise = vec![0.0f32; 12];
    let noise = vec![5.0f32; 12];
    fixed
        .ddpm_step(0, &x, &m, None, true, Some(&noise), &mut with_noise)
        .unwrap();
    fixed
        .ddpm_step(0, &x, &m, None, true, None, &mut out)
        .unwrap();
    assert_eq!(out, with_noise);
    // The variance output must be present exactly when the variance is learned.
    assert!(learned
        .ddpm_step(3, &x, &m, None, true, Some(&noise), &mut out)
        .is_err());
    assert!(learned
        .ddpm_step(3, &x, &m, Some(&m), true, Some(&noise), &mut out)
        .is_ok());
    assert!(fixed
        .ddpm_step(3, &x, &m, Some(&m), true, Some(&noise), &mut out)
        .is_err());
    // Lengths and step indices.
    assert!(fixed
        .ddim_step(10, &x, &m, 0.0, true, None, &mut out)
        .is_err());
    assert!(fixed
        .ddim_step(3, &x, &m[..11], 0.0, true, None, &mut out)
        .is_err());
    assert!(fixed
        .ddpm_step(3, &x, &m, None, true, Some(&noise[..4]), &mut out)
        .is_err());
    assert!(fixed
        .predict_xstart(3, &x, &m, true, &mut out[..5])
        .is_err());
}

/// Deterministic pseudo-random values in [-2, 2).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

#[test]
fn compose_follows_the_formula() {
    let n = 1000;
    let uncond = values(1, n);
    let experts: Vec<Vec<f32>> = (2..5).map(|s| values(s, n)).collect();
    let refs: Vec<&[f32]> = experts.iter().map(|e| &e[..]).collect();
    let weights = [1.5f32, -0.5, 3.0];
    let mut out = vec![0.0f32; n];
    compose(&refs, &weights, &uncond, &mut out);
    for k in 0..n {
        let u = uncond[k] as f64;
        let want: f64 = u + experts
            .iter()
            .zip(weights)
            .map(|(e, w)| w as f64 * (e[k] as f64 - u))
            .sum::<f64>();
        assert!(
            (out[k] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{k}"
        );
    }
    // All weights 1: eq. 12, sum_i eps_i - (N - 1) eps_u.
    compose(&refs, &[1.0; 3], &uncond, &mut out);
    for k in 0..n {
        let want = experts.iter().map(|e| e[k] as f64).sum::<f64>() - 2.0 * uncond[k] as f64;
        assert!(
            (out[k] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{k}"
        );
    }
    // No experts leaves the unconditional prediction; weight 0 ignores an expert.
    compose(&[], &[], &uncond, &mut out);
    assert_eq!(out, uncond);
    compose(&refs[..1], &[0.0], &uncond, &mut out);
    assert_eq!(out, uncond);
}
