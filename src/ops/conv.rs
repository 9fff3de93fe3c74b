//! 2-D convolution, NHWC: 3x3 (padding 1, stride 1 or 2) and 1x1 (stride 1).
//!
//! The CPU reference lowers to GEMM: im2col rows `[pixels, k*k*cin]` times the weight
//! `[k*k*cin, cout]`, in chunks of rows so the scratch stays small.

use rayon::prelude::*;

use super::matmul::{matmul, Mat};

/// Scratch floats per im2col chunk (16 MiB).
const IM2COL_CHUNK: usize = 1 << 22;

pub struct Conv2d {
    pub cin: usize,
    pub cout: usize,
    /// 1 or 3.
    pub kernel: usize,
    /// 1 or 2.
    pub stride: usize,
    /// `[kernel, kernel, cin, cout]`: row (ky*k + kx)*cin + ci of the GEMM's right operand.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Conv2d {
    /// From PyTorch's `[cout, cin, k, k]` weight layout.
    pub fn from_torch(torch_weight: &[f32], bias: Vec<f32>, kernel: usize, stride: usize) -> Self {
        let cout = bias.len();
        let cin = torch_weight.len() / (cout * kernel * kernel);
        let mut weight = vec![0.0; torch_weight.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kernel {
                    for kx in 0..kernel {
                        let src = ((co * cin + ci) * kernel + ky) * kernel + kx;
                        let dst = ((ky * kernel + kx) * cin + ci) * cout + co;
                        weight[dst] = torch_weight[src];
                    }
                }
            }
        }
        Conv2d {
            cin,
            cout,
            kernel,
            stride,
            weight,
            bias,
        }
    }

    fn padding(&self) -> usize {
        self.kernel / 2
    }

    /// Output height and width for an `h x w` input.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.padding();
        (
            (h + 2 * p - self.kernel) / self.stride + 1,
            (w + 2 * p - self.kernel) / self.stride + 1,
        )
    }

    /// x: `[n, h, w, cin]` -> out: `[n, ho, wo, cout]`, out = conv(x) + bias, or
    /// out += conv(x) + bias when `accumulate` (a residual add in the epilogue).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        out: &mut [f32],
        accumulate: bool,
        scratch: &mut Vec<f32>,
    ) {
        let (ho, wo) = self.out_size(h, w);
        let (cin, cout) = (self.cin, self.cout);
        let pixels = n * ho * wo;
        let out = &mut out[..pixels * cout];
        out.par_chunks_mut(cout * 256).for_each(|rows| {
            for row in rows.chunks_exact_mut(cout) {
                if accumulate {
                    row.iter_mut().zip(&self.bias).for_each(|(o, b)| *o += b);
                } else {
                    row.copy_from_slice(&self.bias);
                }
            }
        });
        if self.kernel == 1 && self.stride == 1 {
            matmul(
                out,
                cout,
                pixels,
                cout,
                cin,
                Mat::rows(x, cin),
                Mat::rows(&self.weight, cout),
                true,
                1.0,
                true,
            );
            return;
        }
        let kdim = self.kernel * self.kernel * cin;
        let chunk_rows = (IM2COL_CHUNK / kdim).clamp(1, pixels);
        if scratch.len() < chunk_rows * kdim {
            scratch.resize(chunk_rows * kdim, 0.0);
        }
        let mut start = 0;
        while start < pixels {
            let rows = chunk_rows.min(pixels - start);
            let cols = &mut scratch[..rows * kdim];
            self.im2col(x, h, w, ho, wo, start, cols);
            matmul(
                &mut out[start * cout..],
                cout,
                rows,
                cout,
                kdim,
                Mat::rows(cols, kdim),
                Mat::rows(&self.weight, cout),
                true,
                1.0,
                true,
            );
            start += rows;
        }
    }

    /// Fills `cols` with the patches of output pixels `first..first + cols.len() / kdim`.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        ho: usize,
        wo: usize,
        first: usize,
        cols: &mut [f32],
    ) {
        let (k, s, p, cin) = (self.kernel, self.stride, self.padding(), self.cin);
        cols.par_chunks_exact_mut(k * k * cin)
            .enumerate()
            .for_each(|(i, patch)| {
                let pix = first + i;
                let (b, rem) = (pix / (ho * wo), pix % (ho * wo));
                let (oy, ox) = (rem / wo, rem % wo);
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - p as isize;
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - p as isize;
                        let dst = &mut patch[(ky * k + kx) * cin..][..cin];
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            dst.fill(0.0);
                        } else {
                            let src = ((b * h + iy as usize) * w + ix as usize) * cin;
                            dst.copy_from_slice(&x[src..src + cin]);
                        }
                    }
                }
            });
    }
}
