//! 2-D convolution, NHWC: 3x3 (padding 1, stride 1 or 2) and 1x1 (stride 1).
//!
//! The CPU reference lowers to GEMM: im2col rows `[pixels, k*k*cin]` times the weight
//! `[k*k*cin, cout]`, in chunks of rows so the scratch stays small.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use super::matmul::{matmul, Mat};
use crate::cuda::{Arg, Gpu, GpuBuffer, GpuFloat};
use crate::error::Result;

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

/// The residual added in a convolution's epilogue.
pub enum Residual<'a, T> {
    None,
    /// `y += conv(x) + bias`.
    Output,
    /// `y = conv(x) + bias + r`.
    Buffer(&'a GpuBuffer<T>),
}

/// A convolution's parameters on the device: weight OHWI `[cout, k, k, cin]` in `T`, bias f32.
pub struct GpuConv2d<T> {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    weight: GpuBuffer<T>,
    bias: GpuBuffer<f32>,
}

impl Conv2d {
    /// Uploads the parameters, repacked from `[k, k, cin, cout]` to OHWI.
    pub fn upload<T: GpuFloat>(&self, gpu: &Gpu) -> Result<GpuConv2d<T>> {
        let (k, cin, cout) = (self.kernel, self.cin, self.cout);
        let mut ohwi = vec![0.0; self.weight.len()];
        for co in 0..cout {
            for tap in 0..k * k {
                for ci in 0..cin {
                    ohwi[(co * k * k + tap) * cin + ci] = self.weight[(tap * cin + ci) * cout + co];
                }
            }
        }
        Ok(GpuConv2d {
            cin,
            cout,
            kernel: k,
            stride: self.stride,
            weight: gpu.upload(&ohwi)?,
            bias: gpu.upload(&self.bias)?,
        })
    }
}

impl<T: GpuFloat> GpuConv2d<T> {
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.kernel / 2;
        (
            (h + 2 * p - self.kernel) / self.stride + 1,
            (w + 2 * p - self.kernel) / self.stride + 1,
        )
    }

    /// `kernels/conv.cu`: x `[n, h, w, cin]` -> y `[n, ho, wo, cout]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        n: usize,
        h: usize,
        w: usize,
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, T>,
    ) -> Result<()> {
        let (ho, wo) = self.out_size(h, w);
        let out_len = n * ho * wo * self.cout;
        check_len("conv input", x.len(), n * h * w * self.cin)?;
        check_len("conv output", y.len(), out_len)?;
        let res = match residual {
            Residual::None => 0,
            Residual::Output => y.ptr(gpu),
            Residual::Buffer(r) => {
                check_len("conv residual", r.len(), out_len)?;
                r.ptr(gpu)
            }
        };
        let m = n * ho * wo;
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(64) as u32, self.cout.div_ceil(64) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let i = |v: usize| Arg::I32(v as i32);
        gpu.launch(
            "conv",
            &format!("conv2d{}", T::SUFFIX),
            cfg,
            &[
                Arg::Ptr(x.ptr(gpu)),
                Arg::Ptr(self.weight.ptr(gpu)),
                Arg::Ptr(self.bias.ptr(gpu)),
                Arg::Ptr(res),
                Arg::Ptr(y.ptr(gpu)),
                i(n),
                i(h),
                i(w),
                i(self.cin),
                i(self.cout),
                i(self.kernel),
                i(self.stride),
                i(ho),
                i(wo),
            ],
        )
    }
}

/// A launch's buffer must hold exactly what the kernel will touch.
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(crate::Error::Cuda(format!(
            "{what}: buffer of {have} elements, kernel needs {need}"
        )));
    }
    Ok(())
}
