//! `sample_each_across`: several workers (here CPU ones, as the fake GPUs of tests/fake_gpu.rs
//! are) make a one-worker run's images, hand batches on in image order, stop together, and pass
//! on a failure to publish.

mod common;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};

use mcdm::model::load_model;
use mcdm::sample::{
    sample_each_across, ComposedSampler, Condition, SampleSpec, SamplerKind, Unconditional,
};

use common::fixtures;

fn spec() -> SampleSpec {
    SampleSpec {
        sampler: SamplerKind::Ddpm,
        timestep_respacing: Some("3".into()),
        clip_denoised: true,
        seed: 5,
        height: 16,
        width: 16,
    }
}

#[test]
fn workers_make_the_one_worker_images_in_order() {
    let models = vec![load_model(&fixtures("sample/models/uncond.safetensors"), None).unwrap()];
    let uncond = Unconditional {
        model: 0,
        condition: Condition::default(),
    };
    let samplers: Vec<ComposedSampler> = (0..3)
        .map(|_| ComposedSampler::new(&models, &[], &uncond, spec()).unwrap())
        .collect();
    let want = samplers[0].sample(7, 7, None, &mut |_| {}).unwrap();
    let image = 3 * 16 * 16;
    let run = |workers: &[ComposedSampler], batch: usize| {
        let mut got = Vec::new();
        let mut firsts = Vec::new();
        let made = sample_each_across(
            workers,
            1..7,
            batch,
            None,
            &|_, _| ControlFlow::Continue(()),
            &mut |first, x0| {
                firsts.push(first);
                got.extend_from_slice(x0);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(made, 6);
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "out of order: {firsts:?}"
        );
        got
    };
    for batch in [1, 2, 3] {
        let got = run(&samplers, batch);
        // Bit for bit what one worker makes in batches of the same size.
        assert!(
            got == run(&samplers[..1], batch),
            "3 workers, batches of {batch}"
        );
        // Measured 2.7e-6 (batches of 3) against one batch of 7, 2026-12-06.
        common::within(
            &format!("3 workers, batches of {batch}, rel L2 vs one batch"),
            common::rel_l2(&got, &want[image..]),
            2e-5,
        );
    }

    // Given initial noise (of images 0..7) is each image's, whichever worker makes it.
    let noise = common::gpu::values(7 * image, 3);
    let with_noise = samplers[0].sample(7, 7, Some(&noise), &mut |_| {}).unwrap();
    let mut got = Vec::new();
    sample_each_across(
        &samplers,
        2..7,
        2,
        Some(&noise),
        &|_, _| ControlFlow::Continue(()),
        &mut |_, x0| {
            got.extend_from_slice(x0);
            Ok(())
        },
    )
    .unwrap();
    common::within(
        "3 workers from given noise, rel L2 vs one batch",
        common::rel_l2(&got, &with_noise[2 * image..]),
        2e-5,
    );

    // A stop from on_step stops every worker; what is handed on is a prefix.
    let steps = AtomicUsize::new(0);
    let mut handed = 0;
    let made = sample_each_across(
        &samplers,
        0..7,
        1,
        None,
        &|_, _| {
            if steps.fetch_add(1, Ordering::Relaxed) >= 5 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
        &mut |_, x0| {
            handed += x0.len() / image;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(made, handed);
    assert!(made < 7, "the stop was not heard");

    // A failure to publish ends the run with that error.
    let err = sample_each_across(
        &samplers,
        0..7,
        2,
        None,
        &|_, _| ControlFlow::Continue(()),
        &mut |_, _| Err(mcdm::Error::Input("disk full".into())),
    )
    .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
}
