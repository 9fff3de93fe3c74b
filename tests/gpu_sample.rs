//! The fused GPU step and the GPU sampler against the CPU: Philox noise bit-identical, composed
//! runs the same within the precision's tolerance. Skipped (with a message) without a GPU.

mod common;

use common::gpu::{gpu, gpu_err};

use common::{fixtures, rel_l2};
use mcdm::cuda::{Gpu, GpuFloat};
use mcdm::diffusion::{compose, Diffusion, DiffusionConfig, SolverKind};
use mcdm::model::{load_model, LoadedModel};
use mcdm::ops::step::{diffusion_step_gpu, fill_normals_gpu};
use mcdm::rng::fill_normals;
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, Unconditional,
};
use mcdm::{DType, Device};

#[test]
fn noise_is_bit_identical() {
    let Some(g) = gpu("noise") else { return };
    let (b, len) = (3, 3 * 17 * 9 + 2);
    // Image keys are 32-bit: past i32::MAX too (the kernel's int argument wraps, its key not).
    for (seed, step, first) in [
        (0u64, 0u32, 5usize),
        (0x1234_5678_9abc_def0, 41, 5),
        (7, u32::MAX, 3_000_000_000),
    ] {
        let mut dev = g.zeros::<f32>(b * len).unwrap();
        fill_normals_gpu(&g, &mut dev, b, len, first, seed, step).unwrap();
        let got = g.download(&dev).unwrap();
        for k in 0..b {
            let mut want = vec![0.0; len];
            fill_normals(seed, (first + k) as u32, step, &mut want);
            let same = got[k * len..(k + 1) * len]
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "seed {seed} step {step} image {}: GPU normals differ from the CPU's",
                first + k
            );
        }
    }
}

/// One fused step (compose + DDIM/DDPM with in-kernel noise) against compose + the CPU step.
#[test]
fn fused_step_matches_cpu() {
    let Some(g) = gpu("fused step") else { return };
    let values = |len: usize, s: u64| -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u64 * 2654435761 + s * 97) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    // Both 32-bit halves of the seed are set, so that both Philox key words must reach the kernel.
    let (b, len, first, seed) = (2, 3 * 8 * 8, 3, 0x5eed_0000_0063u64);
    for learn_sigma in [false, true] {
        let d = Diffusion::from_config(&DiffusionConfig {
            timestep_respacing: "10".into(),
            learn_sigma,
            ..Default::default()
        })
        .unwrap();
        let x = values(b * len, 1);
        let eps: Vec<Vec<f32>> = (0..3).map(|t| values(b * len, 10 + t)).collect();
        let weights = [1.5f32, -0.5];
        let v = values(b * len, 50);
        let mut composed = vec![0.0; b * len];
        compose(&[&eps[0], &eps[1]], &weights, &eps[2], &mut composed);
        for i in [9usize, 4, 0] {
            for ddpm in [false, true] {
                let mut noise = vec![0.0; b * len];
                for k in 0..b {
                    fill_normals(
                        seed,
                        (first + k) as u32,
                        i as u32,
                        &mut noise[k * len..(k + 1) * len],
                    );
                }
                let mut want = vec![0.0; b * len];
                let params = if ddpm {
                    d.ddpm_step(
                        i,
                        &x,
                        &composed,
                        learn_sigma.then_some(&v[..]),
                        true,
                        Some(&noise),
                        &mut want,
                    )
                    .unwrap();
                    d.ddpm_params(i, true).unwrap()
                } else {
                    d.ddim_step(i, &x, &composed, 0.7, true, Some(&noise), &mut want)
                        .unwrap();
                    d.ddim_params(i, 0.7, true).unwrap()
                };
                let mut xd = g.upload::<f32>(&x).unwrap();
                let ed = g.upload::<f32>(&eps.concat()).unwrap();
                let wd = g.upload::<f32>(&weights).unwrap();
                let vd = g.upload::<f32>(&v).unwrap();
                let var = (ddpm && learn_sigma).then_some(&vd);
                diffusion_step_gpu(
                    &g,
                    &mut xd,
                    &ed,
                    &wd,
                    3,
                    var,
                    b,
                    len,
                    first,
                    params.with_noise_key(seed, i as u32),
                    None,
                )
                .unwrap();
                let err = gpu_err(&g.download(&xd).unwrap(), &want);
                eprintln!("step {i} ddpm {ddpm} learned {learn_sigma}: error {err:.2e}");
                assert!(
                    err <= 1e-6,
                    "step {i} ddpm {ddpm} learned {learn_sigma}: {err:.3e}"
                );
            }
        }
    }
}

fn reference_case() -> (Vec<LoadedModel>, Vec<Expert>, Unconditional) {
    let dir = fixtures("sample/models");
    let models: Vec<LoadedModel> = ["uncond", "classes", "sketch", "text"]
        .iter()
        .map(|m| load_model(&dir.join(format!("{m}.safetensors")), None).unwrap())
        .collect();
    let sketch: Vec<f32> = (0..256)
        .map(|i| ((i * 37 % 17) as f32 / 8.0) - 1.0)
        .collect();
    let text: Vec<f32> = (0..16).map(|i| (i as f32 * 0.4).sin()).collect();
    let experts = vec![
        Expert {
            model: 1,
            condition: Condition {
                class: Some(3),
                ..Default::default()
            },
            weight: 1.5,
        },
        Expert {
            model: 2,
            condition: Condition {
                image: Some(Batched {
                    data: sketch,
                    count: 1,
                }),
                ..Default::default()
            },
            weight: -0.5,
        },
        Expert {
            model: 3,
            condition: Condition {
                embedding: Some(Batched {
                    data: text,
                    count: 1,
                }),
                ..Default::default()
            },
            weight: 0.7,
        },
    ];
    (
        models,
        experts,
        Unconditional {
            model: 0,
            condition: Condition::default(),
        },
    )
}

/// Sampling of the 16x16 fixture models in `steps` evenly spaced steps, clipped.
fn spec_16x16(sampler: SamplerKind, steps: usize, seed: u64) -> SampleSpec {
    SampleSpec {
        sampler,
        timestep_respacing: Some(steps.to_string()),
        clip_denoised: true,
        seed,
        height: 16,
        width: 16,
    }
}

/// The storage type `T` as the library names it.
fn dtype<T: GpuFloat>() -> DType {
    match T::SUFFIX {
        "_f32" => DType::F32,
        "_f16" => DType::F16,
        _ => DType::Bf16,
    }
}

/// The reference case's models moved to the GPU, storing `dtype`.
fn on_gpu(g: &std::sync::Arc<Gpu>, models: Vec<LoadedModel>, dtype: DType) -> Vec<LoadedModel> {
    let device = Device::Cuda(g.clone());
    models
        .into_iter()
        .map(|m| m.to_device(&device, dtype).unwrap())
        .collect()
}

/// Rel L2 of composed sampling on the GPU storing `T` against the CPU: 3 images in GPU
/// batches of 2 (a short last batch), 4 steps (kept few: the fake driver emulates every launch).
fn compare<T: GpuFloat>(g: &std::sync::Arc<Gpu>, sampler: SamplerKind) -> f64 {
    let (models, experts, uncond) = reference_case();
    let spec = spec_16x16(sampler, 4, 5);
    let s = ComposedSampler::new(&models, &experts, &uncond, spec.clone()).unwrap();
    let want = s.sample(3, 3, None, &mut |_| {}).unwrap();
    let dev = on_gpu(g, models, dtype::<T>());
    let s = ComposedSampler::new(&dev, &experts, &uncond, spec).unwrap();
    let got = s.sample(3, 2, None, &mut |_| {}).unwrap();
    rel_l2(&got, &want)
}

#[test]
fn composed_sampling_matches_cpu() {
    let Some(g) = gpu("composed sampling") else {
        return;
    };
    let mut failures = Vec::new();
    // Bounds: measured at most 3.6e-6 (f32), 2.8e-3 (f16), 2.8e-2 (bf16) on the fake driver,
    // 2026-12-06; UniPC on Karras sigmas 1.3e-5, 1.1e-2, 5.2e-2: its higher-order terms take
    // differences of successive x_0 predictions, which amplify the storage type's rounding, and
    // Karras sigmas spend more steps at large sigma (bf16 bound 1e-1 there).
    // UniPC on Karras sigmas: the solvers' step, its corrector and per-image history.
    let unipc = SamplerKind::Solver {
        kind: SolverKind::UniPc,
        karras: true,
    };
    for sampler in [SamplerKind::Ddim { eta: 0.0 }, SamplerKind::Ddpm, unipc] {
        let bf16_bound = if sampler == unipc { 1e-1 } else { 5e-2 };
        for (name, err, bound) in [
            ("f32", compare::<f32>(&g, sampler), 3e-5),
            ("f16", compare::<half::f16>(&g, sampler), 2e-2),
            ("bf16", compare::<half::bf16>(&g, sampler), bf16_bound),
        ] {
            eprintln!("composed {sampler:?} {name}: rel L2 {err:.2e} (bound {bound:.0e})");
            if err.is_nan() || err > bound {
                failures.push(format!("{name} {sampler:?}: {err:.3e} > {bound:.0e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A capture records without running: the buffer is untouched until the graph is launched.
/// Allocating or downloading while recording fails the capture, and so does work that fails
/// after dropping a buffer (a free the capture cannot record); each leaves the stream usable.
#[test]
fn capture_records_and_refuses_what_a_graph_cannot_replay() {
    let Some(g) = gpu("CUDA graph capture") else {
        return;
    };
    let (b, len, seed, step) = (2, 300, 11u64, 4u32);
    let mut dev = g.upload::<f32>(&vec![0.5; b * len]).unwrap();
    let graph = g
        .capture(|| fill_normals_gpu(&g, &mut dev, b, len, 0, seed, step))
        .unwrap();
    assert!(
        g.download(&dev).unwrap().iter().all(|&v| v == 0.5),
        "the capture ran its launch"
    );
    // SAFETY: `dev`, the one buffer the graph touches, is alive and unmoved.
    unsafe { g.launch_graph(&graph) }.unwrap();
    let mut want = vec![0.0; b * len];
    for (k, image) in want.chunks_exact_mut(len).enumerate() {
        fill_normals(seed, k as u32, step, image);
    }
    assert_eq!(g.download(&dev).unwrap(), want);

    let refused = g.capture(|| g.zeros::<f32>(8).map(drop)).err().unwrap();
    assert!(
        refused.to_string().contains("allocating while capturing"),
        "{refused}"
    );
    let refused = g.capture(|| g.download(&dev).map(drop)).err().unwrap();
    assert!(
        refused.to_string().contains("downloading while capturing"),
        "{refused}"
    );
    let dropped = g.zeros::<f32>(16).unwrap();
    let refused = g
        .capture(|| {
            drop(dropped);
            Err(mcdm::Error::Cuda("the work failed".into()))
        })
        .err()
        .unwrap();
    assert!(refused.to_string().contains("the work failed"), "{refused}");
    // Another thread's launch during a capture would be recorded, not run: refused.
    let mut other = g.zeros::<f32>(len).unwrap();
    let refused = g
        .capture(|| {
            std::thread::scope(|s| {
                s.spawn(|| fill_normals_gpu(&g, &mut other, 1, len, 0, seed, step))
                    .join()
                    .unwrap()
            })
        })
        .err()
        .unwrap();
    assert!(
        refused.to_string().contains("from another thread"),
        "{refused}"
    );
    // A panic in the recorded work ends the capture before it is passed on.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        g.capture(|| panic!("the work panicked"))
    }));
    assert!(panicked.is_err());
    g.zeros::<f32>(8)
        .expect("allocating after a capture that panicked");
    fill_normals_gpu(&g, &mut dev, b, len, 0, seed, step + 1).unwrap();
    assert_ne!(
        g.download(&dev).unwrap(),
        want,
        "the stream is unusable after a failed capture"
    );
}

/// The sampler's steps replayed as CUDA graphs give the images of the same steps launched
/// kernel by kernel, bit for bit (the same kernels on the same buffers, in the same order),
/// and every step after the first two (the first sizes the workspace, the second shows that
/// it allocates nothing more) did run as a graph.
#[test]
fn graph_replay_matches_kernel_launches() {
    let Some(g) = gpu("CUDA graph replay") else {
        return;
    };
    let (models, experts, uncond) = reference_case();
    let steps = 4;
    let spec = spec_16x16(SamplerKind::Ddpm, steps, 9);
    let dev = on_gpu(&g, models, DType::F32);
    let s = ComposedSampler::new(&dev, &experts, &uncond, spec).unwrap();
    let mut reported = 0;
    let replayed = s.sample(2, 2, None, &mut |p| reported = p.step).unwrap();
    assert_eq!(g.take_graph_failure(), None);
    assert_eq!(g.graph_launches(), steps - 2);
    assert_eq!(reported, steps, "progress reports");
    g.set_cuda_graphs(false);
    let launched = s.sample(2, 2, None, &mut |_| {}).unwrap();
    assert_eq!(g.graph_launches(), steps - 2);
    let same = replayed
        .iter()
        .zip(&launched)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "graph replay changed the samples");
}

/// Models on different devices (the CPU and the GPU, or two handles of one GPU: two streams),
/// a model moved off its GPU, and device inputs that do not fit the model are refused before
/// anything runs.
#[test]
fn mismatched_devices_and_inputs_are_refused() {
    use mcdm::backend::{Cond, Cuda};
    let Some(g) = gpu("mismatched devices") else {
        return;
    };
    let (models, experts, uncond) = reference_case();
    let spec = spec_16x16(SamplerKind::Ddim { eta: 0.0 }, 2, 5);
    let mut dev = on_gpu(&g, models, DType::F32);
    let refused = |models: &[LoadedModel]| {
        let err = ComposedSampler::new(models, &experts, &uncond, spec.clone())
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the models are on different devices"),
            "{err}"
        );
    };
    let cpu_model = load_model(&fixtures("sample/models/classes.safetensors"), None).unwrap();
    let classes = std::mem::replace(&mut dev[1], cpu_model);
    refused(&dev);
    let other = Device::Cuda(Gpu::new(0).unwrap());
    dev[1] = load_model(&fixtures("sample/models/classes.safetensors"), None)
        .unwrap()
        .to_device(&other, DType::F32)
        .unwrap();
    refused(&dev);
    // The same place is a no-op; another one needs the weights again.
    let err = classes
        .to_device(&Device::Cpu, DType::F32)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("load it again"), "{err}");

    // The class model on the GPU: no labels, the wrong channel count, too few timesteps.
    let classes = load_model(&fixtures("sample/models/classes.safetensors"), None)
        .unwrap()
        .to_device(&Device::Cuda(g.clone()), DType::F32)
        .unwrap();
    let unet = classes.unet::<Cuda<f32>>().unwrap();
    let mut be = Cuda::<f32>::new(g.clone());
    let x = g.upload::<f32>(&vec![0.25; 2 * 16 * 16 * 4]).unwrap();
    let t = g.upload::<f32>(&[10.0]).unwrap();
    let labels = g.upload_raw(&[1i64]).unwrap();
    let mut forward = |shape: [usize; 4], labels| {
        let cond = Cond {
            timesteps: &t,
            labels,
            embedding: None,
        };
        unet.forward(&mut be, &x, shape, cond)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(forward([1, 16, 16, 3], None).contains("class-conditional"));
    assert!(forward([1, 16, 16, 4], Some(&labels)).contains("has 4 channels"));
    assert!(forward([2, 16, 16, 3], Some(&labels)).contains("timesteps"));
}
