//! Nearest x2 upsampling and 2x2 average pooling, NHWC.

use rayon::prelude::*;

/// x: `[n, h, w, c]` -> out: `[n, 2h, 2w, c]`.
pub fn upsample_nearest2x(x: &[f32], n: usize, h: usize, w: usize, c: usize, out: &mut [f32]) {
    let wo = 2 * w;
    out[..n * 2 * h * wo * c]
        .par_chunks_exact_mut(wo * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, yo) = (row / (2 * h), row % (2 * h));
            let src = &x[(b * h + yo / 2) * w * c..][..w * c];
            for xo in 0..wo {
                dst[xo * c..][..c].copy_from_slice(&src[(xo / 2) * c..][..c]);
            }
        });
}

/// x: `[n, h, w, c]` -> out: `[n, h/2, w/2, c]` (h, w even).
pub fn avg_pool2x(x: &[f32], n: usize, h: usize, w: usize, c: usize, out: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    out[..n * ho * wo * c]
        .par_chunks_exact_mut(wo * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, yo) = (row / ho, row % ho);
            let r0 = &x[(b * h + 2 * yo) * w * c..][..w * c];
            let r1 = &x[(b * h + 2 * yo + 1) * w * c..][..w * c];
            for xo in 0..wo {
                let (p, q) = (2 * xo * c, (2 * xo + 1) * c);
                for ch in 0..c {
                    dst[xo * c + ch] = (r0[p + ch] + r0[q + ch] + r1[p + ch] + r1[q + ch]) * 0.25;
                }
            }
        });
}
