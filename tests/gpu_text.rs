//! The text encoder's kernels (LayerNorm, GELU) against their CPU references over several shapes,
//! and the whole GPU text encoder against the CPU one on the fixture sentences, for f32, f16 and
//! bf16 storage. Without a GPU each test says so and passes: CI has none;
//! `scripts/device-check.sh` runs these on one.
//!
//! The encoder test needs all-MiniLM-L6-v2 as tests/text_encoder.rs does (MCDM_TEXT_MODEL, else
//! models/all-MiniLM-L6-v2; scripts/fetch-text-model.sh): when it is absent it fails with the
//! instructions, unless MCDM_SKIP_TEXT_TESTS=1.

mod common;

use common::gpu::{for_each_dtype, gpu, gpu_err, rounded, tolerance, values};

use std::sync::Arc;

use common::{fixtures, rel_l2};
use mcdm::cuda::{Gpu, GpuFloat};
use mcdm::ops::layer_norm::{gelu, gelu_gpu, LayerNorm};
use mcdm::text::TextEncoder;

fn layer_norm_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    // (rows, width, scale, offset, eps): BERT's shapes (384, 1536), odd and tiny widths, a
    // width over the block, rows far from 0 (cancellation) and a constant row.
    for (i, &(rows, width, scale, offset, eps)) in [
        (1, 384, 1.0, 0.0, 1e-12),
        (7, 384, 3.0, 0.5, 1e-12),
        (3, 1536, 1.0, -2.0, 1e-5),
        (5, 100, 0.5, 0.0, 1e-5),
        (300, 33, 1.0, 0.0, 1e-12),
        (2, 1, 1.0, 0.0, 1e-12),
        (64, 4097, 2.0, 1.0, 1e-12),
        (4, 384, 0.1, 20.0, 1e-12),
        (2, 384, 0.0, 1.5, 1e-12),
    ]
    .iter()
    .enumerate()
    {
        let ln = LayerNorm {
            weight: values(width, 10 + i as u32)
                .iter()
                .map(|v| 1.0 + 0.2 * v)
                .collect(),
            bias: values(width, 20 + i as u32),
            eps,
        };
        let x = rounded::<T>(
            &values(rows * width, 30 + i as u32)
                .iter()
                .map(|v| scale * v + offset)
                .collect::<Vec<_>>(),
        );
        let mut want = x.clone();
        ln.forward(&mut want);
        let dev = ln.upload(g).unwrap();
        let xd = g.upload::<T>(&x).unwrap();
        let mut yd = g.upload::<T>(&vec![f32::NAN; x.len()]).unwrap();
        dev.forward(g, &xd, rows, &mut yd).unwrap();
        let case = format!("layer norm {rows}x{width} scale {scale} offset {offset} eps {eps:e}");
        out.push((
            case.clone(),
            gpu_err(&g.download(&yd).unwrap(), &want),
            // f32 measured at most 1.5e-7 (2026-12-06).
            tolerance::<T>(1e-6),
        ));
        // In place (y aliases x): the same values.
        let mut xd = g.upload::<T>(&x).unwrap();
        dev.forward_in_place(g, &mut xd, rows).unwrap();
        out.push((
            format!("{case} in place"),
            gpu_err(&g.download(&xd).unwrap(), &want),
            tolerance::<T>(1e-6),
        ));
    }
    out
}

#[test]
fn layer_norm_matches_cpu() {
    for_each_dtype("layer_norm", |g, name| match name {
        "f32" => layer_norm_cases::<f32>(g),
        "f16" => layer_norm_cases::<half::f16>(g),
        _ => layer_norm_cases::<half::bf16>(g),
    });
}

fn gelu_cases<T: GpuFloat>(g: &Gpu) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for (i, &(len, scale)) in [
        (1, 1.0),
        (255, 4.0),
        (256, 4.0),
        (1000, 8.0),
        (1536 * 7, 3.0),
        ((1 << 20) + 3, 6.0),
    ]
    .iter()
    .enumerate()
    {
        let mut x: Vec<f32> = values(len, 40 + i as u32)
            .iter()
            .map(|v| scale * v)
            .collect();
        // Fixed points of interest where they fit: 0, the tails, +-1 (not in the one-element
        // case, whose reference would be gelu(0) = 0 alone).
        if len > 1 {
            for (slot, v) in x.iter_mut().zip([0.0, -1.0, 1.0, -9.0, 9.0, 40.0, -40.0]) {
                *slot = v;
            }
        }
        let x = rounded::<T>(&x);
        let want: Vec<f32> = x.iter().map(|&v| gelu(v)).collect();
        // One element past `len` must stay untouched.
        let mut padded = x.clone();
        padded.push(7.0);
        let mut xd = g.upload::<T>(&padded).unwrap();
        gelu_gpu(g, &mut xd, len).unwrap();
        let got = g.download(&xd).unwrap();
        let case = format!("gelu len {len} scale {scale}");
        assert_eq!(got[len], 7.0, "{case}: wrote past len");
        // f32 measured at most 2.3e-8 (2026-12-06).
        out.push((case, gpu_err(&got[..len], &want), tolerance::<T>(2e-7)));
    }
    out
}

#[test]
fn gelu_matches_cpu() {
    for_each_dtype("gelu", |g, name| match name {
        "f32" => gelu_cases::<f32>(g),
        "f16" => gelu_cases::<half::f16>(g),
        _ => gelu_cases::<half::bf16>(g),
    });
}

fn fixture_texts() -> Vec<String> {
    let path = fixtures("text/sentences.json");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    json["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect()
}

/// Per text: the rel L2 error of the GPU embedding against the CPU's (itself checked against
/// sentence-transformers), and the GPU embedding's norm.
fn compare<T: GpuFloat>(
    g: &Arc<Gpu>,
    cpu: &TextEncoder,
    texts: &[&str],
    want: &[f32],
) -> Vec<(f64, f32)> {
    let dtype = match T::SUFFIX {
        "_f32" => mcdm::DType::F32,
        "_f16" => mcdm::DType::F16,
        _ => mcdm::DType::Bf16,
    };
    let dev = cpu
        .to_device(&mcdm::Device::Cuda(g.clone()), dtype)
        .unwrap();
    assert_eq!(dev.dim(), cpu.dim());
    assert!(dev.encode(&[]).unwrap().is_empty());
    let got = dev.encode(texts).unwrap();
    assert_eq!(got.len(), want.len());
    let d = cpu.dim();
    got.chunks_exact(d)
        .zip(want.chunks_exact(d))
        .map(|(g, w)| (rel_l2(g, w), g.iter().map(|v| v * v).sum::<f32>().sqrt()))
        .collect()
}

#[test]
fn encoder_matches_cpu() {
    let Some(g) = gpu("text encoder") else { return };
    if common::text_tests_skipped("GPU text encoder") {
        return;
    }
    let cpu = TextEncoder::locate(None)
        .and_then(|dir| TextEncoder::load(&dir))
        .unwrap_or_else(|e| {
            panic!(
                "the text model is needed for this test: {e}\n\
                 (set MCDM_SKIP_TEXT_TESTS=1 to skip the tests that need it)"
            )
        });
    let owned = fixture_texts();
    // Eight of the fixture's texts (the fake driver emulates every launch), from blank to long.
    let mut texts: Vec<&str> = owned.iter().take(8).map(String::as_str).collect();
    assert!(texts.len() >= 4);
    // Texts of one token count run as one batch: equal lengths with different words, and
    // repeats of earlier texts.
    texts.extend([
        "a red face",
        "a face",
        "a blue face",
        texts[3],
        texts[1],
        texts[3],
    ]);
    let want = cpu.encode(&texts).unwrap();
    let mut failures = Vec::new();
    // Bounds per storage type, rel L2 per text: measured at most 1.9e-6 (f32), 1.4e-3 (f16),
    // 1.1e-2 (bf16) on the fake driver, 2026-12-06.
    for (name, bound, results) in [
        ("f32", 1e-5, compare::<f32>(&g, &cpu, &texts, &want)),
        ("f16", 1e-2, compare::<half::f16>(&g, &cpu, &texts, &want)),
        ("bf16", 5e-2, compare::<half::bf16>(&g, &cpu, &texts, &want)),
    ] {
        let mut worst = 0f64;
        for (text, &(err, norm)) in texts.iter().zip(&results) {
            worst = if err.is_nan() { err } else { worst.max(err) };
            if err.is_nan() || err > bound || norm.is_nan() || (norm - 1.0).abs() >= 1e-4 {
                failures.push(format!(
                    "{name} {:?}: rel L2 {err:.2e} (bound {bound:.0e}), norm {norm}",
                    text.chars().take(60).collect::<String>()
                ));
            }
        }
        eprintln!(
            "text encoder {name}: {} texts, worst rel L2 {worst:.2e} (bound {bound:.0e})",
            texts.len()
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
