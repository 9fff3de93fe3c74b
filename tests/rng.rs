//! Philox known answers, the hand-written transcendentals, and the statistics of the normals.

use mcdm::rng::{fill_normals, ln, normals4, philox4x32_10, sincos_2pi};

/// Known-answer vectors of philox4x32 with 10 rounds, the three `philox4x32 10` lines of
/// `tests/kat_vectors` in the Random123 distribution (D. E. Shaw Research,
/// https://github.com/DEShawResearch/random123): counter words 0-3, key words 0-1, output 0-3.
#[test]
fn philox_known_answers() {
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0; 4],
            [0; 2],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [0xffffffff; 4],
            [0xffffffff; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (counter, key, expected) in kat {
        assert_eq!(
            philox4x32_10(counter, key),
            expected,
            "counter {counter:08x?}"
        );
    }
}

fn rel_err(got: f32, want: f64) -> f64 {
    if want == 0.0 {
        (got as f64).abs()
    } else {
        ((got as f64 - want) / want).abs()
    }
}

#[test]
fn ln_matches_std() {
    let mut worst = 0.0f64;
    // Every uniform the sampler can produce is k * 2^-24 with k in 1..=2^24; check a dense
    // sweep of them plus both ends, and a spread of other magnitudes.
    let mut xs: Vec<f32> = (1..=(1u32 << 24))
        .step_by(97)
        .map(|k| k as f32 / 16_777_216.0)
        .collect();
    xs.extend([
        1.0,
        1.0 / 16_777_216.0,
        0.5,
        2.0,
        1e-30,
        1e30,
        0.999_999_94,
        1.000_000_1,
    ]);
    for &x in &xs {
        let e = rel_err(ln(x), (x as f64).ln());
        assert!(e <= 2e-6, "ln({x:e}) = {} vs {}", ln(x), (x as f64).ln());
        worst = worst.max(e);
    }
    assert_eq!(ln(1.0), 0.0);
    assert!(worst < 2e-7, "worst relative error {worst:e}");
}

#[test]
fn sincos_matches_std() {
    let mut worst = 0.0f64;
    for k in (0..(1u32 << 24)).step_by(89) {
        let v = k as f32 / 16_777_216.0;
        let (s, c) = sincos_2pi(v);
        let a = 2.0 * std::f64::consts::PI * v as f64;
        // Relative to the larger of |sin|, |cos| near exact zeros, plain relative elsewhere.
        for (got, want) in [(s, a.sin()), (c, a.cos())] {
            let e = if want.abs() < 1e-3 {
                (got as f64 - want).abs()
            } else {
                rel_err(got, want)
            };
            assert!(
                e <= 2e-6,
                "sincos_2pi({v}) = ({s}, {c}) vs ({}, {})",
                a.sin(),
                a.cos()
            );
            worst = worst.max(e);
        }
    }
    assert_eq!(sincos_2pi(0.0), (0.0, 1.0));
    assert_eq!(sincos_2pi(0.25), (1.0, 0.0));
    assert!(worst < 3e-7, "worst error {worst:e}");
}

fn moments(xs: &[f32]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let kurt = xs.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n / (var * var);
    (mean, var, kurt)
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let (ma, va, _) = moments(a);
    let (mb, vb, _) = moments(b);
    let cov = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - ma) * (y as f64 - mb))
        .sum::<f64>()
        / a.len() as f64;
    cov / (va * vb).sqrt()
}

const N: usize = 1_000_000;

#[test]
fn normals_have_unit_moments() {
    let mut xs = vec![0.0f32; N];
    fill_normals(0x1234_5678_9abc_def0, 3, 17, &mut xs);
    assert!(xs.iter().all(|x| x.is_finite()));
    let (mean, var, kurt) = moments(&xs);
    // Standard errors at n = 1e6: mean 1e-3, variance 1.4e-3, kurtosis ~5e-3; allow ~5 sigma.
    assert!(mean.abs() < 5e-3, "mean {mean}");
    assert!((var - 1.0).abs() < 7e-3, "variance {var}");
    assert!((kurt - 3.0).abs() < 0.03, "kurtosis {kurt}");
    let tail = xs.iter().filter(|x| x.abs() > 1.96).count() as f64 / N as f64;
    assert!((tail - 0.05).abs() < 1.5e-3, "P(|z| > 1.96) = {tail}");
    // Each of the four lanes of a block is normal on its own, and the two normals of one
    // Box-Muller pair are uncorrelated.
    for lane in 0..4 {
        let l: Vec<f32> = xs.iter().skip(lane).step_by(4).copied().collect();
        let (m, v, _) = moments(&l);
        assert!(
            m.abs() < 1e-2 && (v - 1.0).abs() < 1.4e-2,
            "lane {lane}: {m} {v}"
        );
    }
    let even: Vec<f32> = xs.iter().step_by(2).copied().collect();
    let odd: Vec<f32> = xs.iter().skip(1).step_by(2).copied().collect();
    assert!(correlation(&even, &odd).abs() < 5e-3);
}

#[test]
fn normals_are_deterministic_and_blockwise() {
    let mut a = vec![0.0f32; 1003];
    let mut b = vec![0.0f32; 1003];
    fill_normals(42, 1, 2, &mut a);
    fill_normals(42, 1, 2, &mut b);
    assert_eq!(a, b);
    // A prefix of the image gets the same values, and blocks match normals4.
    let mut short = vec![0.0f32; 7];
    fill_normals(42, 1, 2, &mut short);
    assert_eq!(&short[..], &a[..7]);
    for block in [0u32, 1, 100, 249] {
        let n = normals4(42, 1, 2, block);
        let e = 4 * block as usize;
        assert_eq!(&n[..], &a[e..e + 4]);
    }
    // The documented recipe, spelled out for element 5 (block 1, lane 1).
    let w = philox4x32_10([1, 1, 2, 0], [42, 0]);
    let u = ((w[0] >> 8) + 1) as f32 / 16_777_216.0;
    let v = (w[1] >> 8) as f32 / 16_777_216.0;
    assert_eq!(a[5], (-2.0 * ln(u)).sqrt() * sincos_2pi(v).0);
}

#[test]
fn streams_are_independent() {
    let n = 200_000;
    let base = (0x0123_4567_89ab_cdefu64, 5u32, 9u32);
    let variants = [
        (base.0 ^ 1, base.1, base.2),
        (base.0 ^ (1 << 32), base.1, base.2),
        (base.0, base.1 + 1, base.2),
        (base.0, base.1, base.2 + 1),
        (base.0, base.2, base.1),
    ];
    let mut x = vec![0.0f32; n];
    fill_normals(base.0, base.1, base.2, &mut x);
    for (seed, image, step) in variants {
        let mut y = vec![0.0f32; n];
        fill_normals(seed, image, step, &mut y);
        assert_ne!(x[..8], y[..8]);
        // Standard error of a correlation at n = 2e5 is 2.2e-3.
        let r = correlation(&x, &y);
        assert!(
            r.abs() < 1.2e-2,
            "seed {seed:x} image {image} step {step}: corr {r}"
        );
    }
}
