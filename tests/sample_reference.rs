//! Composed sampling against guided-diffusion's `ddim_sample_loop` and `p_sample_loop`, and the
//! solvers against diffusers' `DPMSolverMultistepScheduler` / `UniPCMultistepScheduler`, driven
//! by a reference composition (fixtures by `tools/make_sampling_fixtures.py`, which gives the
//! reference mcdm's step noise where a step adds some).

mod common;

use common::{fixtures, rel_l2, within};

/// f32 rel L2 of a composed run against guided-diffusion: measured at most 4.4e-6 (2026-12-06);
/// against diffusers' schedulers (the solvers): at most 6.4e-6 (2026-12-06).
const SAMPLING_BOUND: f64 = 1e-5;
use mcdm::diffusion::SolverKind;
use mcdm::model::{load_model, LoadedModel};
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, Unconditional,
};
use mcdm::weights::SafetensorsFile;
use serde_json::Value;

struct Case {
    models: Vec<LoadedModel>,
    experts: Vec<Expert>,
    uncond: Unconditional,
    spec: SampleSpec,
    x_t: Vec<f32>,
    samples: Vec<f32>,
    n: usize,
}

fn load_case(name: &str) -> Case {
    let dir = fixtures("sample");
    let job: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let tensors = SafetensorsFile::open(&dir.join(format!("{name}.safetensors"))).unwrap();
    let names: Vec<String> = job["models"].as_object().unwrap().keys().cloned().collect();
    let models: Vec<LoadedModel> = names
        .iter()
        .map(|n| load_model(&dir.join(job["models"][n].as_str().unwrap()), None).unwrap())
        .collect();
    let index = |v: &Value| names.iter().position(|n| n == v.as_str().unwrap()).unwrap();
    let batched = |v: &Value| {
        v.as_str().map(|t| Batched {
            data: tensors.f32(t).unwrap(),
            count: tensors.shape(t).unwrap()[0],
        })
    };
    let condition = |v: &Value| Condition {
        class: v["class"].as_i64(),
        image: batched(&v["image"]),
        embedding: batched(&v["embedding"]),
    };
    let experts = job["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Expert {
            model: index(&e["model"]),
            condition: condition(e),
            weight: e["weight"].as_f64().unwrap() as f32,
        })
        .collect();
    let uncond = Unconditional {
        model: index(&job["uncond"]["model"]),
        condition: condition(&job["uncond"]),
    };
    let shape = tensors.shape("x_T").unwrap().to_vec();
    let spec = SampleSpec {
        sampler: match job["sampler"].as_str().unwrap() {
            "ddim" => SamplerKind::Ddim {
                eta: job["eta"].as_f64().unwrap() as f32,
            },
            "ddpm" => SamplerKind::Ddpm,
            solver => SamplerKind::Solver {
                kind: SolverKind::parse(solver).unwrap(),
                karras: job["karras"].as_bool().unwrap(),
            },
        },
        timestep_respacing: Some(job["timestep_respacing"].as_str().unwrap().to_string()),
        clip_denoised: job["clip_denoised"].as_bool().unwrap(),
        seed: job["seed"].as_u64().unwrap(),
        height: shape[2],
        width: shape[3],
    };
    Case {
        models,
        experts,
        uncond,
        spec,
        x_t: tensors.f32("x_T").unwrap(),
        samples: tensors.f32("samples").unwrap(),
        n: shape[0],
    }
}

fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures("sample"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 9,
        "expected the sampling fixtures, found {names:?}"
    );
    names
}

#[test]
fn composed_sampling_matches_reference() {
    for name in cases() {
        let case = load_case(&name);
        let sampler =
            ComposedSampler::new(&case.models, &case.experts, &case.uncond, case.spec.clone())
                .unwrap();
        assert_eq!(
            sampler.diffusion_config().timestep_respacing,
            case.spec.timestep_respacing.clone().unwrap(),
            "{name}"
        );
        let mut done = Vec::new();
        let out = sampler
            .sample(case.n, case.n, Some(&case.x_t), &mut |p| {
                assert_eq!(
                    (p.first, p.batch, p.steps),
                    (0, case.n, sampler.num_steps())
                );
                done.push(p.step)
            })
            .unwrap();
        let want: Vec<usize> = (1..=sampler.num_steps()).collect();
        assert_eq!(done, want, "{name}: progress");
        let err = rel_l2(&out, &case.samples);
        let reference = match case.spec.sampler {
            SamplerKind::Solver { .. } => "diffusers' scheduler",
            _ => "guided-diffusion",
        };
        let what = format!(
            "{name} ({} steps): rel L2 vs {reference}",
            sampler.num_steps()
        );
        within(&what, err, SAMPLING_BOUND);
    }
}

/// Image k is the same whatever the batch size: noise is keyed by image index, and no op mixes
/// images. Checked with seeded noise and DDPM (noise at every step).
#[test]
fn batch_size_does_not_change_images() {
    let case = load_case("b_class_notsketch_text");
    let mut spec = case.spec.clone();
    spec.sampler = SamplerKind::Ddpm;
    spec.seed = 1234;
    let sampler = ComposedSampler::new(&case.models, &case.experts, &case.uncond, spec).unwrap();
    let all = sampler.sample(case.n, case.n, None, &mut |_| {}).unwrap();
    // x_T of image k is the seed's noise under step key 0xFFFFFFFF (README).
    let len = sampler.image_len();
    let mut x_t = vec![0.0; case.n * len];
    for (k, img) in x_t.chunks_exact_mut(len).enumerate() {
        mcdm::rng::fill_normals(1234, k as u32, 0xFFFF_FFFF, img);
    }
    let from_x_t = sampler.sample(case.n, case.n, Some(&x_t), &mut |_| {});
    assert!(
        from_x_t.unwrap() == all,
        "x_T is not the seed's initial noise"
    );
    let one_by_one = sampler.sample(case.n, 1, None, &mut |_| {}).unwrap();
    let err = rel_l2(&one_by_one, &all);
    // GEMM blocking depends on the batch, so rounding may differ; nothing else may (measured
    // 4.9e-7, 2026-12-06).
    within(&format!("batch 1 vs batch {}, rel L2", case.n), err, 4e-6);
    // And a different seed gives different images.
    let mut spec = case.spec.clone();
    spec.sampler = SamplerKind::Ddpm;
    spec.seed = 1235;
    let other = ComposedSampler::new(&case.models, &case.experts, &case.uncond, spec).unwrap();
    let diff = rel_l2(
        &other.sample(case.n, case.n, None, &mut |_| {}).unwrap(),
        &all,
    );
    assert!(diff > 0.05, "seed had no effect ({diff:.3e})");
}

/// With all weights 1 the composition is the paper's eq. 12, sum eps_i - (N-1) eps_u: the same
/// run with the unconditional term listed once more as an expert of weight 0 changes nothing.
#[test]
fn zero_weight_expert_is_inert() {
    let mut case = load_case("a_sketch_text_eq12");
    let base = ComposedSampler::new(&case.models, &case.experts, &case.uncond, case.spec.clone())
        .unwrap()
        .sample(case.n, case.n, Some(&case.x_t), &mut |_| {})
        .unwrap();
    case.experts.push(Expert {
        model: case.uncond.model,
        condition: Condition::default(),
        weight: 0.0,
    });
    let with_zero =
        ComposedSampler::new(&case.models, &case.experts, &case.uncond, case.spec.clone())
            .unwrap()
            .sample(case.n, case.n, Some(&case.x_t), &mut |_| {})
            .unwrap();
    let err = rel_l2(&with_zero, &base);
    // Batching the two terms of one model changes only float rounding in the GEMMs (measured
    // 1.8e-6, 2026-12-06).
    within("a zero-weight expert added, rel L2", err, 1e-5);
}

/// The library refuses a DDIM eta outside [0, 1] (past 1 the update takes the square root of a
/// negative number) for any caller, not only the command line.
#[test]
fn ddim_eta_outside_0_1_is_refused() {
    let case = load_case("b_class_notsketch_text");
    for eta in [1.5, -0.1, f32::NAN] {
        let mut spec = case.spec.clone();
        spec.sampler = SamplerKind::Ddim { eta };
        let err = ComposedSampler::new(&case.models, &case.experts, &case.uncond, spec)
            .err()
            .expect("accepted");
        assert!(
            err.to_string().contains("DDIM eta must be between 0 and 1"),
            "{err}"
        );
    }
    let mut spec = case.spec.clone();
    spec.sampler = SamplerKind::Ddim { eta: 1.0 };
    assert!(ComposedSampler::new(&case.models, &case.experts, &case.uncond, spec).is_ok());
}
