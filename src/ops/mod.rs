//! The network's operations. Each file holds one op family: its API and its CPU reference
//! (NHWC, f32, multithreaded), the function every GPU kernel in `kernels/` is checked against.

pub mod attention;
pub mod conv;
pub mod embedding;
pub mod group_norm;
pub mod layer_norm;
pub mod layout;
pub mod linear;
pub mod matmul;
pub mod peak;
pub mod resample;
pub mod step;

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
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::exp;

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
}
