//! Counter-based noise: Philox4x32-10 and Box-Muller normals.
//!
//! Every normal is a pure function of `(seed, image, step, element)`, so a CUDA kernel can
//! reproduce the same values bit for bit, in any order and on any number of threads. The
//! stream layout is:
//!
//! - element `e` of one image (NCHW order within the image, `e = c*H*W + y*W + x`) reads
//!   Philox block `counter = [e / 4, image, step, 0]`, `key = [seed as u32, (seed >> 32) as u32]`
//!   and takes normal `e % 4` of that block;
//! - the block's four words `(w0, w1, w2, w3)` make two Box-Muller pairs: `(w0, w1)` give
//!   normals 0 and 1, `(w2, w3)` give normals 2 and 3;
//! - in a pair `(a, b)`, the radius uniform is `u = ((a >> 8) + 1) * 2^-24`, in **(0, 1]**, so
//!   the logarithm never sees 0; the angle uniform is `v = (b >> 8) * 2^-24`, in **[0, 1)**;
//!   both are exact in f32. Then `r = sqrt(-2 ln u)` and the normals are `(r cos 2πv, r sin 2πv)`.
//!   Tails are therefore cut at `sqrt(48 ln 2) ≈ 5.77`.
//!
//! `ln`, `sin` and `cos` are computed here with explicit `f32::mul_add` and fixed polynomials
//! (no library transcendentals), and every other operation is a correctly rounded IEEE f32
//! operation, so a GPU port using `fmaf`, `sqrtf` (IEEE) and no contraction gets identical bits.

use crate::error::{Error, Result};

/// The most images one run draws noise for: image k's noise is keyed by the 32-bit index k.
pub const MAX_SAMPLES: usize = 1 << 32;

/// Images `first..first + b` must have 32-bit noise keys (see [`MAX_SAMPLES`]).
pub fn check_image_keys(first: usize, b: usize) -> Result<()> {
    match first.checked_add(b) {
        Some(end) if end <= MAX_SAMPLES => Ok(()),
        _ => Err(Error::Input(format!(
            "images {first}.. of a batch of {b} are past the {MAX_SAMPLES} one run draws"
        ))),
    }
}

/// Philox multipliers and Weyl key increments (Salmon et al., SC'11; Random123).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// 2^-24: scale of the 24-bit uniforms.
const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;

/// Philox4x32 with 10 rounds: a bijection of the 128-bit counter under the 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        // The key is bumped between rounds, not before the first one.
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Natural logarithm of a positive, finite, normal f32 (Cephes `logf` polynomial, evaluated
/// with FMA). Used instead of `f32::ln` so that a GPU port can match it bit for bit.
pub fn ln(x: f32) -> f32 {
    // Split x = m * 2^e with m in [sqrt(1/2), sqrt(2)), so that f = m - 1 is exact and small.
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let z = f * f;
    let mut p = 0.070_376_836_f32;
    p = p.mul_add(f, -0.115_146_1);
    p = p.mul_add(f, 0.116_769_99);
    p = p.mul_add(f, -0.124_201_41);
    p = p.mul_add(f, 0.142_493_23);
    p = p.mul_add(f, -0.166_680_57);
    p = p.mul_add(f, 0.200_007_16);
    p = p.mul_add(f, -0.249_999_94);
    p = p.mul_add(f, 0.333_333_3);
    let ef = e as f32;
    // ln 2 = 355/512 - 2.12194440e-4 (Cody-Waite split; the first part is exact in f32).
    let mut y = (f * z) * p;
    y = ef.mul_add(-2.121_944_4e-4, y);
    y = (-0.5f32).mul_add(z, y);
    let r = f + y;
    ef.mul_add(355.0 / 512.0, r)
}

/// `(sin 2πv, cos 2πv)` for a finite `v` with `|4v| < 2^23`.
///
/// The reduction works in turns, so it is exact: `4v = q + r` with integer `q` (ties to even)
/// and `|r| <= 1/2`, then `sin`/`cos` of `r·π/2` by Taylor polynomials (truncation below
/// 1e-9 relative) and a quadrant swap.
pub fn sincos_2pi(v: f32) -> (f32, f32) {
    let t = v * 4.0;
    let q = t.round_ties_even();
    let r = t - q;
    let r2 = r * r;
    // sin(π/2·r) / r and cos(π/2·r) as polynomials in r².
    let mut s = 5.692_173e-8_f32;
    s = s.mul_add(r2, -3.598_843_3e-6);
    s = s.mul_add(r2, 1.604_411_8e-4);
    s = s.mul_add(r2, -0.004_681_754);
    s = s.mul_add(r2, 0.079_692_625);
    s = s.mul_add(r2, -0.645_964_1);
    s = s.mul_add(r2, std::f32::consts::FRAC_PI_2);
    let s = s * r;
    let mut c = 4.710_875e-7_f32;
    c = c.mul_add(r2, -2.520_204_2e-5);
    c = c.mul_add(r2, 9.192_602_6e-4);
    c = c.mul_add(r2, -0.020_863_48);
    c = c.mul_add(r2, 0.253_669_5);
    c = c.mul_add(r2, -1.233_700_6);
    c = c.mul_add(r2, 1.0);
    match (q as i64) & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// Two standard normals from two Philox words (see the module docs for the exact recipe).
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u = ((a >> 8) + 1) as f32 * TWO_POW_M24;
    let v = (b >> 8) as f32 * TWO_POW_M24;
    let r = (-2.0 * ln(u)).sqrt();
    let (s, c) = sincos_2pi(v);
    (r * c, r * s)
}

/// The four normals of Philox block `block` of `(seed, image, step)`: elements
/// `4*block .. 4*block + 4` of that image.
pub fn normals4(seed: u64, image: u32, step: u32, block: u32) -> [f32; 4] {
    let w = philox4x32_10([block, image, step, 0], [seed as u32, (seed >> 32) as u32]);
    let (n0, n1) = box_muller(w[0], w[1]);
    let (n2, n3) = box_muller(w[2], w[3]);
    [n0, n1, n2, n3]
}

/// Fills `out` (the elements of one image, NCHW order) with the standard normals of
/// `(seed, image, step)`. A shorter `out` gets a prefix of the same values.
///
/// # Panics
/// If `out` has more than 2^34 elements (the block index is 32 bits).
pub fn fill_normals(seed: u64, image: u32, step: u32, out: &mut [f32]) {
    assert!(
        out.len() as u64 <= 1u64 << 34,
        "fill_normals: {} elements exceed the 2^34 a (seed, image, step) stream holds",
        out.len()
    );
    for (block, chunk) in out.chunks_mut(4).enumerate() {
        let n = normals4(seed, image, step, block as u32);
        chunk.copy_from_slice(&n[..chunk.len()]);
    }
}
