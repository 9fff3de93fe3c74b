//! Helpers of the GPU tests: the device (or a skip message), inputs, tolerances.

use std::sync::Arc;

use mcdm::cuda::{unavailable_reason, Gpu, GpuFloat};

/// The GPU, or `None` after printing why `test` is skipped.
pub fn gpu(test: &str) -> Option<Arc<Gpu>> {
    if let Some(reason) = unavailable_reason() {
        eprintln!("{test}: skipped, no GPU ({reason})");
        return None;
    }
    Some(Gpu::new(0).expect("opening the GPU"))
}

/// Deterministic values in about [-1, 1], never all zero.
pub fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Values rounded through `T`, so that CPU and GPU see the same inputs.
pub fn rounded<T: GpuFloat>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// The bound on one op's error (`gpu_err`) in storage type `T`: `f32_bound`, the op's own, in
/// f32; 2e-3 in f16 and 1e-2 in bf16, where the storage's rounding dominates (measured at most
/// 2.8e-4 and 2.2e-3 over every op, on the fake driver, 2026-12-06).
pub fn tolerance<T: GpuFloat>(f32_bound: f64) -> f64 {
    match T::SUFFIX {
        "_f32" => f32_bound,
        "_f16" => 2e-3,
        _ => 1e-2,
    }
}

/// Runs `f` for f32, f16 and bf16 (`f` gets the name) and fails on any case over its tolerance.
pub fn for_each_dtype(test: &str, f: impl Fn(&Gpu, &str) -> Vec<(String, f64, f64)>) {
    let Some(g) = gpu(test) else { return };
    let mut failures = Vec::new();
    for name in ["f32", "f16", "bf16"] {
        for (case, err, tol) in f(&g, name) {
            eprintln!("{test} {name} {case}: rel L2 {err:.2e} (tolerance {tol:.0e})");
            if err.is_nan() || err > tol {
                failures.push(format!("{name} {case}: {err:.3e} > {tol:.0e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{test}: {failures:#?}");
}

/// The error of a GPU result against its CPU reference: the rel L2 error or, where worse, the
/// largest single error over 5x the largest reference value. Rounding stays well under that
/// (bf16: ~4e-3 of the largest value, against 5e-2 at the bf16 tolerance), while one element
/// wrong by a typical value (~0.2 of the largest) fails, so that a few wrong elements (a tile
/// edge) cannot hide in the L2 norm of a large output. NaN stays NaN.
pub fn gpu_err(got: &[f32], want: &[f32]) -> f64 {
    let l2 = super::rel_l2(got, want);
    let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let worst = got.iter().zip(want).fold(0f64, |m, (&a, &b)| {
        let e = (a as f64 - b as f64).abs();
        if e > m || e.is_nan() {
            e
        } else {
            m
        }
    });
    if worst.is_nan() {
        return f64::NAN;
    }
    l2.max(worst / (5.0 * scale))
}
