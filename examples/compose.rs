//! Compose a class expert and an image-conditioned expert with an unconditional model, from
//! Rust. Uses the small random-weight reference models of the test fixtures so it runs from a
//! fresh clone: `cargo run --release --example compose`.

use std::path::Path;

use mcdm::model::load_model;
use mcdm::sample::{
    Batched, ComposedSampler, Condition, Expert, SampleSpec, SamplerKind, Unconditional,
};

fn main() -> mcdm::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sample/models");
    let models = vec![
        load_model(&dir.join("uncond.safetensors"), None)?,
        load_model(&dir.join("classes.safetensors"), None)?,
        load_model(&dir.join("sketch.safetensors"), None)?,
    ];
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
        "4 images of 3x16x16 after {} steps; mean value {mean:.4}",
        sampler.num_steps()
    );
    Ok(())
}
