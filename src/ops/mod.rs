//! The network's operations. Each file holds one op family: its API and its CPU reference
//! (NHWC, f32, multithreaded), the function every GPU kernel in `kernels/` is checked against.
//!
//! The CPU ops are building blocks: like slice indexing, they panic when a slice is shorter than
//! the sizes they are given say. The checked entry points are [`crate::model::UNet`]'s forward
//! passes and [`crate::sample::ComposedSampler`], which validate shapes and return errors.

pub mod attention;
pub mod conv;
pub mod embedding;
pub mod group_norm;
pub mod layer_norm;
pub mod layout;
pub mod linear;
pub mod matmul;
pub mod resample;
pub mod step;

use multiversion::multiversion;

use crate::error::{Error, Result};

/// A product of sizes that a kernel itself forms in a 32-bit int (conv rows, a group-norm
/// image): an error where it passes `i32::MAX`.
pub(crate) fn int_product(what: &str, dims: &[usize]) -> Result<usize> {
    product(dims)
        .filter(|&p| p <= i32::MAX as usize)
        .ok_or_else(|| Error::Input(format!("{what}: {dims:?} is more than a kernel indexes")))
}

/// The product of `dims`, None where it overflows.
fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |p, &d| p.checked_mul(d))
}

/// A launch's buffer must hold what the kernel will touch.
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Cuda(format!(
            "{what}: buffer of {have} elements, kernel needs {need}"
        )));
    }
    Ok(())
}

/// The element count of a kernel's tensor of `dims`. The kernels take each dimension as a
/// 32-bit int and count elements in 64 bits: an error where a dimension passes `i32::MAX` or the
/// product overflows, so that a wrapped size can never pass [`check_len`].
pub(crate) fn elements(what: &str, dims: &[usize]) -> Result<usize> {
    product(dims)
        .filter(|_| dims.iter().all(|&d| d <= i32::MAX as usize))
        .ok_or_else(|| {
            Error::Input(format!(
                "{what}: the sizes {dims:?} are more than a kernel takes"
            ))
        })
}

/// SiLU (swish): x * sigmoid(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// e^x for x <= 88.3 (beyond, e^88.3 ~ 2.1e38), within 3e-7 relative of the exact value, and
/// 0 below -87.3. Unlike libm's `expf` it has no branches or calls, so loops over slices
/// vectorise (SiLU and the softmax spend most of their time here). x = n ln 2 + r with
/// |r| <= ln 2 / 2; e^r by its Taylor series to r^6; 2^n through the exponent bits.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| <= 128.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in plain SSE2.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted`'s low mantissa bits hold n (|n| <= 127): 2^n is n + 127 moved into the exponent
    // field, with integer ops only (a float-to-int `as` saturates, which keeps loops scalar).
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

/// Independent partial results per reduction, so that the loops below vectorise: a float sum
/// or max folded in one accumulator is a serial chain the compiler may not reorder.
const LANES: usize = 16;

/// Softmax of one row in place (the row's max subtracted first, as `torch.softmax`).
#[multiversion(targets = "simd")]
pub fn softmax_in_place(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|s| *s = exp(*s - max));
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// The dot product of two slices of one length, in `LANES` interleaved partial sums.
/// Always inlined, so that it takes the target features of a multiversioned caller.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    tail + lanes.iter().sum::<f32>()
}

/// The sum of a slice, in `LANES` interleaved partial sums (inlined like [`dot`]).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(chunk) {
            *s += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::{check_len, dot, elements, exp, int_product, softmax_in_place};

    #[test]
    fn launch_sizes_are_checked() {
        let max = i32::MAX as usize;
        assert_eq!(elements("t", &[2, 3, 7]).unwrap(), 42);
        assert_eq!(elements("t", &[]).unwrap(), 1);
        assert_eq!(elements("t", &[max, 4]).unwrap(), 4 * max);
        // One dimension past what a kernel's int holds, or a product that overflows.
        for dims in [[max + 1, 1, 1], [max, max, max]] {
            let e = elements("t", &dims).unwrap_err().to_string();
            assert!(e.contains("more than a kernel takes"), "{dims:?}: {e}");
        }
        assert_eq!(int_product("p", &[5, 9]).unwrap(), 45);
        assert_eq!(int_product("p", &[max]).unwrap(), max);
        for dims in [&[1 << 16, 1 << 15][..], &[max, max, max]] {
            let e = int_product("p", dims).unwrap_err().to_string();
            assert!(e.contains("more than a kernel indexes"), "{dims:?}: {e}");
        }
        check_len("b", 7, 7).unwrap();
        check_len("b", 8, 7).unwrap();
        let e = check_len("b", 6, 7).unwrap_err().to_string();
        assert!(e.contains("buffer of 6 elements, kernel needs 7"), "{e}");
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.3 + (88.3 + 87.3) * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        eprintln!("worst relative error {worst:.2e}");
        assert!(worst <= 3e-7, "worst relative error {worst:.2e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn dot_matches_f64() {
        for len in [0, 1, 15, 16, 17, 32, 100] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 11 % 23) as f32 - 11.0) / 5.0)
                .collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 * y as f64).abs())
                .sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * scale,
                "len {len}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn softmax_matches_f64() {
        let mut state = 0x2545_f491_u32;
        for len in [1, 7, 15, 16, 17, 64, 257] {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    20.0 * (state as f32 / u32::MAX as f32) - 10.0
                })
                .collect();
            let max = row
                .iter()
                .map(|&v| v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut got = row.clone();
            softmax_in_place(&mut got);
            for (&g, &v) in got.iter().zip(&row) {
                let want = (v as f64 - max).exp() / total;
                assert!(
                    (g as f64 - want).abs() <= 1e-6 * want + 1e-12,
                    "len {len}: {g} vs {want}"
                );
            }
        }
    }
}
