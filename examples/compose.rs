//! Compose a class expert and an image-conditioned expert with an unconditional model, from
//! Rust, on the GPU when one is usable. Uses the small random-weight reference models of the
//! test fixtures so it runs from a fresh clone: `cargo run --release --example compose`.

use std::path::Path;

use mcdm::model::load_model;
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, Unconditional,
};
use mcdm::{DType, Device};

fn main() -> mcdm::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sample/models");
    let (device, _) = Device::auto();
    let load = |name: &str| {
        load_model(&dir.join(format!("{name}.safetensors")), None)?.to_device(&device, DType::Bf16)
    };
    let models = vec![load("uncond")?, load("classes")?, load("sketch")?];
    // A 1-channel 16x16 "sketch": a bright diagonal, shared by every image.
    let sketch: Vec<f32> = (0..256)
        .map(|i| if i / 16 == i % 16 { 1.0 } else { -1.0 })
        .collect();
    let experts = vec![
        Expert {
            model: 1,
            condition: Condition {
                class: Some(3),
                ..Default::default()
            },
            weight: 1.0,
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
            weight: 1.0,
        },
    ];
    let uncond = Unconditional {
        model: 0,
        condition: Condition::default(),
    };
    let spec = SampleSpec {
        sampler: SamplerKind::Ddim { eta: 0.0 },
        timestep_respacing: Some("ddim10".into()),
        clip_denoised: true,
        seed: 7,
        height: 16,
        width: 16,
    };
    let sampler = ComposedSampler::new(&models, &experts, &uncond, spec)?;
    let images = sampler.sample(4, 4, None, &mut |_| {})?;
    let mean = images.iter().sum::<f32>() / images.len() as f32;
    println!(
        "4 images of 3x16x16 after {} steps on {}; mean value {mean:.4}",
        sampler.num_steps(),
        device.describe(DType::Bf16)
    );
    Ok(())
}
