//! 2-D convolution, NHWC: 3x3 (padding 1, stride 1 or 2) and 1x1 (stride 1).
//!
//! The CPU reference lowers to GEMM: im2col rows `[pixels, k*k*cin]` times the weight
//! `[k*k*cin, cout]`, in chunks of rows so the scratch stays small.

use std::sync::OnceLock;

use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
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

/// The implicit-GEMM kernel a GPU convolution launches (`kernels/conv.cu`, whose header gives
/// each one's launch geometry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// `conv2d_{f32,f16,bf16}`: 64x64 tiles, 4 warps, 2 cp.async stages. Every shape and type.
    Tile64,
    /// `conv2d_m128n128_{f16,bf16}`: 128x128 tiles, 8 warps of 64x32, 4 stages, ldmatrix.
    Tile128,
    /// `conv2d_m128n64_{f16,bf16}`: 128x64 tiles, 4 warps of 64x32, 4 stages, ldmatrix.
    Tile128x64,
}

/// Auto picks a large tile only when it still gives at least this many blocks: 2 per SM of a
/// 132-SM H200 (what 128x128 tiles keep resident: 126 registers x 256 threads, 64 KiB shared).
/// Fewer large blocks leave SMs idle or end in a ragged last wave, where 4x as many 64x64 tiles
/// balance better.
const LARGE_TILE_MIN_BLOCKS: usize = 264;

impl ConvKernel {
    pub const ALL: [ConvKernel; 3] = [
        ConvKernel::Tile64,
        ConvKernel::Tile128,
        ConvKernel::Tile128x64,
    ];

    /// The name `MCDM_CONV_KERNEL` and `mcdm bench --kernels` use.
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Tile64 => "tile64",
            ConvKernel::Tile128 => "tile128",
            ConvKernel::Tile128x64 => "tile128x64",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// (tile rows, tile columns, threads a block, dynamic shared bytes): `kernels/conv.cu`.
    fn geometry(self) -> (usize, usize, u32, u32) {
        match self {
            ConvKernel::Tile64 => (64, 64, 128, 0),
            // 4 stages x (128 + BN) rows x 64 bytes (32 16-bit k values, swizzled, no padding).
            ConvKernel::Tile128 => (128, 128, 256, 4 * 256 * 64),
            ConvKernel::Tile128x64 => (128, 64, 128, 4 * 192 * 64),
        }
    }

    /// Raises the function's dynamic shared memory limit to what the kernel uses (over the
    /// 48 KiB default), once at upload rather than on every launch.
    fn allow_shared_memory(self, gpu: &Gpu, suffix: &str) -> Result<()> {
        let smem = self.geometry().3 as i32;
        let name = self.function(suffix);
        let f = gpu.function("conv", &name)?;
        let attr = CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let err = |e| crate::Error::Cuda(format!("`{name}` shared memory limit: {e:?}"));
        if f.get_attribute(attr).map_err(err)? < smem {
            f.set_attribute(attr, smem).map_err(err)?;
        }
        Ok(())
    }

    fn function(self, suffix: &str) -> String {
        match self {
            ConvKernel::Tile64 => format!("conv2d{suffix}"),
            ConvKernel::Tile128 => format!("conv2d_m128n128{suffix}"),
            ConvKernel::Tile128x64 => format!("conv2d_m128n64{suffix}"),
        }
    }
}

/// `MCDM_CONV_KERNEL`: `tile64`, `tile128` or `tile128x64` forces that kernel wherever it
/// applies (for benchmarking); unset or `auto` leaves the choice to the heuristic. An unknown
/// name is an error for the caller to report (the CLI warns); it then counts as `auto`.
pub fn conv_kernel_setting() -> std::result::Result<Option<ConvKernel>, String> {
    match std::env::var("MCDM_CONV_KERNEL") {
        Err(_) => Ok(None),
        Ok(v) if v == "auto" => Ok(None),
        Ok(v) => ConvKernel::parse(&v).map(Some).ok_or_else(|| {
            format!("MCDM_CONV_KERNEL={v} is not tile64, tile128, tile128x64 or auto; ignored")
        }),
    }
}

/// [`conv_kernel_setting`], read once.
fn env_kernel() -> Option<ConvKernel> {
    static KERNEL: OnceLock<Option<ConvKernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| conv_kernel_setting().ok().flatten())
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
        let conv = GpuConv2d {
            cin,
            cout,
            kernel: k,
            stride: self.stride,
            weight: gpu.upload(&ohwi)?,
            bias: gpu.upload(&self.bias)?,
        };
        if conv.large_tiles_apply() {
            for kernel in [ConvKernel::Tile128, ConvKernel::Tile128x64] {
                kernel.allow_shared_memory(gpu, T::SUFFIX)?;
            }
        }
        Ok(conv)
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

    /// Whether `kernel` can run this convolution on `x`. Tile64 always can; the large tiles
    /// take only their fast path: 16-bit storage, cin and cout multiples of 8, x and the weight
    /// 16-byte aligned (whole 16-byte cp.async chunks of one filter tap, paired stores).
    pub fn supports(&self, gpu: &Gpu, kernel: ConvKernel, x: &GpuBuffer<T>) -> bool {
        kernel == ConvKernel::Tile64
            || (self.large_tiles_apply()
                && x.ptr(gpu).is_multiple_of(16)
                && self.weight.ptr(gpu).is_multiple_of(16))
    }

    /// The large tiles' conditions on the layer itself (the pointers are checked per launch).
    fn large_tiles_apply(&self) -> bool {
        T::SUFFIX != "_f32" && self.cin.is_multiple_of(8) && self.cout.is_multiple_of(8)
    }

    /// The kernel `forward` launches for an `n x h x w` input: `MCDM_CONV_KERNEL` where it
    /// applies, else the large tiles when they apply and still give `LARGE_TILE_MIN_BLOCKS`
    /// blocks: 128x128, unless 64-wide column tiles pad cout less (cout 192 or 576 fill 64-wide
    /// tiles exactly but waste 25% / 10% of 128-wide ones).
    pub fn choose_kernel(
        &self,
        gpu: &Gpu,
        x: &GpuBuffer<T>,
        n: usize,
        h: usize,
        w: usize,
    ) -> ConvKernel {
        if let Some(k) = env_kernel().filter(|&k| self.supports(gpu, k, x)) {
            return k;
        }
        if !self.supports(gpu, ConvKernel::Tile128, x) {
            return ConvKernel::Tile64;
        }
        let (ho, wo) = self.out_size(h, w);
        let m = n * ho * wo;
        let (bn, large) = if self.cout.div_ceil(128) * 128 <= self.cout.div_ceil(64) * 64 {
            (128, ConvKernel::Tile128)
        } else {
            (64, ConvKernel::Tile128x64)
        };
        if m.div_ceil(128) * self.cout.div_ceil(bn) >= LARGE_TILE_MIN_BLOCKS {
            large
        } else {
            ConvKernel::Tile64
        }
    }

    /// `kernels/conv.cu`: x `[n, h, w, cin]` -> y `[n, ho, wo, cout]`, with the kernel
    /// `choose_kernel` picks.
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
        let kernel = self.choose_kernel(gpu, x, n, h, w);
        self.forward_with(gpu, kernel, x, n, h, w, y, residual)
    }

    /// `forward` with the given kernel (tests, benchmarks): an error where it does not apply.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        gpu: &Gpu,
        kernel: ConvKernel,
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
        if !self.supports(gpu, kernel, x) {
            return Err(crate::Error::Cuda(format!(
                "conv kernel {} cannot run {}x{} cin {} cout {} in {}",
                kernel.name(),
                self.kernel,
                self.kernel,
                self.cin,
                self.cout,
                T::SUFFIX
            )));
        }
        let res = match residual {
            Residual::None => 0,
            Residual::Output => y.ptr(gpu),
            Residual::Buffer(r) => {
                check_len("conv residual", r.len(), out_len)?;
                r.ptr(gpu)
            }
        };
        let m = n * ho * wo;
        let name = kernel.function(T::SUFFIX);
        let (bm, bn, threads, smem) = kernel.geometry();
        let grid = match kernel {
            ConvKernel::Tile64 => (m.div_ceil(bm) as u32, self.cout.div_ceil(bn) as u32, 1),
            // One dimension: block b is row tile b / column tiles, column tile b % column tiles.
            _ => {
                let blocks = m.div_ceil(bm) * self.cout.div_ceil(bn);
                if blocks > i32::MAX as usize {
                    return Err(crate::Error::Cuda(format!(
                        "conv of {m} pixels: {blocks} blocks, over the grid limit"
                    )));
                }
                (blocks as u32, 1, 1)
            }
        };
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let i = |v: usize| Arg::I32(v as i32);
        gpu.launch(
            "conv",
            &name,
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
