//! 2-D convolution, NHWC: 3x3 (padding 1, stride 1 or 2) and 1x1 (stride 1).
//!
//! The CPU reference lowers to GEMM: im2col rows `[pixels, k*k*cin]` times the weight
//! `[k*k*cin, cout]`, in chunks of rows so the scratch stays small; 3x3 stride-1 convolutions
//! with 64+ input channels use Winograd's F(2x2, 3x3) instead (16 GEMMs of 4x fewer rows,
//! 2.25x fewer multiply-adds), checked against a direct f64 convolution in the tests below.

use std::sync::OnceLock;

use cudarc::driver::LaunchConfig;
use multiversion::multiversion;
use rayon::prelude::*;

use super::matmul::{matmul, Mat};
use super::{check_len, elements, int_product};
use crate::cuda::interface::{self as k, ConvArgs};
use crate::cuda::{Gpu, GpuBuffer, GpuFloat};
use crate::error::{Error, Result};

/// Scratch floats per im2col chunk (16 MiB).
const IM2COL_CHUNK: usize = 1 << 22;

#[derive(Clone)]
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
    /// The Winograd transform of `weight` (`[16][cin][cout]`), made at the first CPU forward
    /// that uses it, so that GPU-only models never hold it.
    winograd: OnceLock<Vec<f32>>,
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
            winograd: OnceLock::new(),
        }
    }

    /// A convolution of this shape with no parameters, a placeholder never run.
    pub fn empty(cin: usize, cout: usize, kernel: usize, stride: usize) -> Self {
        Conv2d {
            cin,
            cout,
            kernel,
            stride,
            weight: Vec::new(),
            bias: Vec::new(),
            winograd: OnceLock::new(),
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
        if self.kernel == 3 && self.stride == 1 && cin >= WINOGRAD_MIN_CHANNELS {
            self.forward_winograd(x, n, h, w, out, scratch);
            return;
        }
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

    /// out += conv(x) for a 3x3 stride-1 convolution by Winograd's F(2x2, 3x3) (Lavin and Gray,
    /// 2015): each 2x2 output tile comes from a 4x4 input tile through 16 element-wise products
    /// per (cin, cout) pair where direct convolution needs 36, i.e. 16 GEMMs
    /// `[tiles, cin] x [cin, cout]` with 2.25x fewer multiply-adds than im2col + GEMM. Per tile:
    /// V = B^T d B, M = V . U with U = G g G^T, y = A^T M A.
    fn forward_winograd(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        // Chunks of whole tile rows (a tile row covers output rows 2ty, 2ty + 1 of one image),
        // so that each chunk's output is one contiguous range of `out`.
        let tile_rows = n * th;
        let per_tile_row = 16 * (cin + cout) * tw;
        let chunk_rows = (WINOGRAD_CHUNK / per_tile_row).clamp(1, tile_rows);
        let need = chunk_rows * per_tile_row;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let rest = &mut scratch[..need];
        let u = self
            .winograd
            .get_or_init(|| winograd_weights(&self.weight, cin, cout));
        // Where tile row tr = b * th + ty starts in `out` (2ty <= h - 1, so within image b).
        let row_start = |tr: usize| ((tr / th) * h + 2 * (tr % th)) * w * cout;
        let mut first = 0;
        while first < tile_rows {
            let rows = chunk_rows.min(tile_rows - first);
            let tiles = rows * tw;
            let (v, m) = rest.split_at_mut(16 * tiles * cin);
            let m = &mut m[..16 * tiles * cout];
            // V [tile][16][cin].
            v.par_chunks_mut(16 * cin * tw).enumerate().for_each_init(
                || (vec![0f32; 16 * cin], vec![0f32; 16 * cin]),
                |(patch, t), (r, v_row)| {
                    let tr = first + r;
                    let (b, ty) = (tr / th, tr % th);
                    for (tx, v_tile) in v_row.chunks_exact_mut(16 * cin).enumerate() {
                        gather_patch(x, b, h, w, cin, 2 * ty, 2 * tx, patch);
                        winograd_input(patch, cin, t, v_tile);
                    }
                },
            );
            // M [tile][16][cout]: for each of the 16 positions, rows of V times U.
            for xi in 0..16 {
                matmul(
                    &mut m[xi * cout..],
                    16 * cout,
                    tiles,
                    cout,
                    cin,
                    Mat {
                        data: &v[xi * cin..],
                        rs: 16 * cin,
                        cs: 1,
                    },
                    Mat::rows(&u[xi * cin * cout..][..cin * cout], cout),
                    false,
                    1.0,
                    true,
                );
            }
            // out += A^T M A, one tile row of output (two image rows, one if h is odd) per task.
            let region = &mut out[row_start(first)..row_start(first + rows)];
            let mut parts = Vec::with_capacity(rows);
            let mut rest_out = region;
            for tr in first..first + rows {
                let (part, tail) = rest_out.split_at_mut(row_start(tr + 1) - row_start(tr));
                parts.push(part);
                rest_out = tail;
            }
            parts
                .into_par_iter()
                .zip(m.par_chunks(16 * cout * tw))
                .for_each_init(
                    || vec![0f32; 12 * cout],
                    |s, (out_rows, m_row)| {
                        let img_rows = out_rows.len() / (w * cout);
                        for (tx, m_tile) in m_row.chunks_exact(16 * cout).enumerate() {
                            let cols = (w - 2 * tx).min(2);
                            winograd_output(m_tile, cout, out_rows, w, 2 * tx, img_rows, cols, s);
                        }
                    },
                );
            first += rows;
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

/// 3x3 stride-1 convolutions with at least this many input channels use Winograd on the CPU:
/// below, its transforms and short GEMMs cost more than the multiply-adds they save (criterion,
/// n8 32x32 32->32: 1.1-1.6 ms against 0.96-1.0 ms with im2col; at 64 channels Winograd wins).
const WINOGRAD_MIN_CHANNELS: usize = 64;
/// Scratch floats per Winograd chunk of tiles (16 MiB).
const WINOGRAD_CHUNK: usize = 1 << 22;

/// The 4x4 input patch at (y0 - 1, x0 - 1) of image `b`, zero outside: `patch` [16][cin].
#[allow(clippy::too_many_arguments)]
fn gather_patch(
    x: &[f32],
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    y0: usize,
    x0: usize,
    patch: &mut [f32],
) {
    for (i, row) in patch.chunks_exact_mut(4 * cin).enumerate() {
        let iy = (y0 + i).wrapping_sub(1);
        for (j, px) in row.chunks_exact_mut(cin).enumerate() {
            let ix = (x0 + j).wrapping_sub(1);
            if iy < h && ix < w {
                px.copy_from_slice(&x[((b * h + iy) * w + ix) * cin..][..cin]);
            } else {
                px.fill(0.0);
            }
        }
    }
}

/// V = B^T d B per channel, B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]: `d`, `v` [16][cin],
/// `t` scratch of 16 * cin. Written as whole-row operations, so that each loop vectorises.
#[multiversion(targets = "simd")]
fn winograd_input(d: &[f32], cin: usize, t: &mut [f32], v: &mut [f32]) {
    let row = |k: usize| k * cin..(k + 1) * cin;
    // t = B^T d: the 4 rows of each column c combined.
    for c in 0..4 {
        let [d0, d1, d2, d3] = [c, 4 + c, 8 + c, 12 + c].map(|k| &d[row(k)]);
        lanes2(&mut t[row(c)], d0, d2, |a, b| a - b);
        lanes2(&mut t[row(4 + c)], d1, d2, |a, b| a + b);
        lanes2(&mut t[row(8 + c)], d2, d1, |a, b| a - b);
        lanes2(&mut t[row(12 + c)], d1, d3, |a, b| a - b);
    }
    // v = t B: the same along each row i.
    for i in 0..4 {
        let [t0, t1, t2, t3] = [0, 1, 2, 3].map(|c| &t[row(4 * i + c)]);
        lanes2(&mut v[row(4 * i)], t0, t2, |a, b| a - b);
        lanes2(&mut v[row(4 * i + 1)], t1, t2, |a, b| a + b);
        lanes2(&mut v[row(4 * i + 2)], t2, t1, |a, b| a - b);
        lanes2(&mut v[row(4 * i + 3)], t1, t3, |a, b| a - b);
    }
}

/// out[y0 + i, x0 + j] += (A^T M A)[i][j] for i < `rows`, j < `cols`, A^T = [1 1 1 0; 0 1 -1 -1]:
/// `m` [16][cout], `out` the tile row's image rows, `w` wide; `s` scratch of 12 * cout.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets = "simd")]
fn winograd_output(
    m: &[f32],
    cout: usize,
    out: &mut [f32],
    w: usize,
    x0: usize,
    rows: usize,
    cols: usize,
    s: &mut [f32],
) {
    let row = |k: usize| k * cout..(k + 1) * cout;
    // s = A^T m (8 rows: 2 x 4), then y = s A (4 rows: the 2 x 2 outputs).
    let (s, y) = s.split_at_mut(8 * cout);
    for c in 0..4 {
        let [m0, m1, m2, m3] = [c, 4 + c, 8 + c, 12 + c].map(|k| &m[row(k)]);
        lanes3(&mut s[row(c)], m0, m1, m2, |a, b, c| a + b + c);
        lanes3(&mut s[row(4 + c)], m1, m2, m3, |a, b, c| a - b - c);
    }
    for i in 0..2 {
        let [s0, s1, s2, s3] = [0, 1, 2, 3].map(|c| &s[row(4 * i + c)]);
        lanes3(&mut y[row(2 * i)], s0, s1, s2, |a, b, c| a + b + c);
        lanes3(&mut y[row(2 * i + 1)], s1, s2, s3, |a, b, c| a - b - c);
    }
    for i in 0..rows {
        for j in 0..cols {
            let dst = &mut out[(i * w + x0 + j) * cout..][..cout];
            dst.iter_mut()
                .zip(&y[row(2 * i + j)])
                .for_each(|(o, &v)| *o += v);
        }
    }
}

/// out[k] = f(a[k], b[k]).
#[inline(always)]
fn lanes2(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = f(a, b);
    }
}

/// out[k] = f(a[k], b[k], c[k]).
#[inline(always)]
fn lanes3(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *o = f(a, b, c);
    }
}

/// U = G g G^T for every (ci, co), G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]: `weight`
/// `[3, 3, cin, cout]` -> `[16][cin][cout]`.
fn winograd_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cin * cout];
    const G: [[f32; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    u.par_chunks_mut(cout).enumerate().for_each(|(row, u_row)| {
        let (xi, ci) = (row / cin, row % cin);
        let (i, j) = (xi / 4, xi % 4);
        for ky in 0..3 {
            for kx in 0..3 {
                let coef = G[i][ky] * G[j][kx];
                if coef != 0.0 {
                    let g = &weight[((ky * 3 + kx) * cin + ci) * cout..][..cout];
                    u_row.iter_mut().zip(g).for_each(|(u, &g)| *u += coef * g);
                }
            }
        }
    });
    u
}

/// The residual added in a convolution's epilogue, for output buffers of type `B`.
pub enum Residual<'a, B> {
    None,
    /// `y += conv(x) + bias`.
    Output,
    /// `y = conv(x) + bias + r`.
    Buffer(&'a B),
    /// `y = conv(x) + bias + upsample2x(r)`: r `[n, ho/2, wo/2, cout]` (ho, wo even), nearest
    /// 2x (an upsampling ResBlock's identity skip).
    Upsampled(&'a B),
    /// `y = conv(x) + bias + avg_pool2x(r)`: r `[n, 2ho, 2wo, cout]`, 2x2 means (a
    /// downsampling ResBlock's identity skip).
    Pooled(&'a B),
}

/// Where a GPU convolution reads its input from: one tensor, or the channel concatenation of
/// two (the decoder's skip), either stored at half size and upsampled (nearest 2x) on read, and
/// normalised as it is read. The kernels fold these passes into their loads (`kernels/conv.cu`'s
/// header).
pub struct ConvInput<'a, T> {
    /// The first channels: `[n, h, w, cin - c2]`, or `[n, h/2, w/2, ..]` when `upsampled`.
    pub x: &'a GpuBuffer<T>,
    /// The last `c2` channels, laid out as `x`.
    pub second: Option<(&'a GpuBuffer<T>, usize)>,
    pub upsampled: bool,
    /// The input's group norm: f32 `[n, cin, 2]`, each image's and channel's `(mul, add)`
    /// (`GpuGroupNorm::channel_table`), then SiLU when the flag says so. Padding stays zero.
    pub norm: Option<(&'a GpuBuffer<f32>, bool)>,
}

impl<T> Clone for ConvInput<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ConvInput<'_, T> {}

impl<'a, T> From<&'a GpuBuffer<T>> for ConvInput<'a, T> {
    fn from(x: &'a GpuBuffer<T>) -> Self {
        ConvInput {
            x,
            second: None,
            upsampled: false,
            norm: None,
        }
    }
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
    /// `conv2d_m256n128_{f16,bf16}`: 256x128 tiles, 8 warps of 64x64 (fewer fragment reads per
    /// MMA), 4 stages, ldmatrix. Forced only (`MCDM_CONV_KERNEL`, `bench --kernels`): auto does
    /// not pick it until a GPU run shows where it wins.
    Tile256x128,
}

/// Auto picks a large tile only when it still gives at least this many blocks: 2 per SM of a
/// 132-SM H200 (what 128x128 tiles keep resident: 126 registers x 256 threads, 64 KiB shared).
/// Fewer large blocks leave SMs idle or end in a ragged last wave, where 4x as many 64x64 tiles
/// balance better.
const LARGE_TILE_MIN_BLOCKS: usize = 264;

impl ConvKernel {
    pub const ALL: [ConvKernel; 4] = [
        ConvKernel::Tile64,
        ConvKernel::Tile128,
        ConvKernel::Tile128x64,
        ConvKernel::Tile256x128,
    ];

    /// The name `MCDM_CONV_KERNEL` and `mcdm bench --kernels` use.
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Tile64 => "tile64",
            ConvKernel::Tile128 => "tile128",
            ConvKernel::Tile128x64 => "tile128x64",
            ConvKernel::Tile256x128 => "tile256x128",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// (tile rows, tile columns, threads a block, dynamic shared bytes): `kernels/conv.cu`'s
    /// constants. The large tiles stage CONVB_STAGES x (BM + BN) rows of CONVB_ROW_BYTES (32
    /// 16-bit k values, swizzled, no padding).
    fn geometry(self) -> (usize, usize, u32, u32) {
        let big = |bm: usize, bn: usize, threads: usize| {
            let shared = k::CONVB_STAGES * (bm + bn) * k::CONVB_ROW_BYTES;
            (bm, bn, threads as u32, shared as u32)
        };
        match self {
            ConvKernel::Tile64 => (k::CONV_BM, k::CONV_BN, k::CONV_THREADS as u32, 0),
            ConvKernel::Tile128 => big(
                k::CONV_M128N128_BM,
                k::CONV_M128N128_BN,
                k::CONV_M128N128_THREADS,
            ),
            ConvKernel::Tile128x64 => big(
                k::CONV_M128N64_BM,
                k::CONV_M128N64_BN,
                k::CONV_M128N64_THREADS,
            ),
            ConvKernel::Tile256x128 => big(
                k::CONV_M256N128_BM,
                k::CONV_M256N128_BN,
                k::CONV_M256N128_THREADS,
            ),
        }
    }

    fn function(self, suffix: &str) -> String {
        match self {
            ConvKernel::Tile64 => format!("conv2d{suffix}"),
            ConvKernel::Tile128 => format!("conv2d_m128n128{suffix}"),
            ConvKernel::Tile128x64 => format!("conv2d_m128n64{suffix}"),
            ConvKernel::Tile256x128 => format!("conv2d_m256n128{suffix}"),
        }
    }
}

/// `MCDM_CONV_KERNEL`: `tile64`, `tile128`, `tile128x64` or `tile256x128` forces that kernel
/// wherever it applies (for benchmarking); unset or `auto` leaves the choice to the heuristic.
/// An unknown name is an error for the caller to report (the CLI warns); it then counts as
/// `auto`.
pub fn conv_kernel_setting() -> std::result::Result<Option<ConvKernel>, String> {
    match std::env::var("MCDM_CONV_KERNEL") {
        Err(_) => Ok(None),
        Ok(v) if v == "auto" => Ok(None),
        Ok(v) => ConvKernel::parse(&v).map(Some).ok_or_else(|| {
            format!(
                "MCDM_CONV_KERNEL={v} is not tile64, tile128, tile128x64, tile256x128 or auto; ignored"
            )
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
    // Crate-visible only: they must stay those of the uploaded parameters.
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    weight: GpuBuffer<T>,
    bias: GpuBuffer<f32>,
}

impl Conv2d {
    /// Uploads the parameters, repacked from `[k, k, cin, cout]` to OHWI.
    pub fn upload<T: GpuFloat>(&self, gpu: &Gpu) -> Result<GpuConv2d<T>> {
        let (k, cin, cout) = (self.kernel, self.cin, self.cout);
        let weights = elements("conv weight", &[k, k, cin, cout])?;
        if k % 2 == 0 || self.stride == 0 || cin == 0 || cout == 0 {
            return Err(Error::Input(format!(
                "a {k}x{k} conv of stride {} from {cin} to {cout} channels: the kernels take an \
                 odd size, a positive stride and channels",
                self.stride
            )));
        }
        if self.weight.len() != weights || self.bias.len() != cout {
            return Err(Error::Input(format!(
                "a {k}x{k} conv from {cin} to {cout} channels needs {weights} weights and {cout} \
                 biases, got {} and {}",
                self.weight.len(),
                self.bias.len()
            )));
        }
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
    /// The output size for an `h x w` input (0 for an empty side).
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        // Odd kernel, padding k / 2: a side s gives (s - 1) / stride + 1.
        let side = |s: usize| s.checked_sub(1).map_or(0, |s| s / self.stride + 1);
        (side(h), side(w))
    }

    /// Whether `kernel` can run this convolution on `x`. Tile64 always can; the large tiles
    /// take only their fast path: 16-bit storage, cin and cout multiples of 8, x (both its
    /// tensors, split at a multiple of 8 channels) and the weight 16-byte aligned (whole 16-byte
    /// cp.async chunks of one filter tap, paired stores).
    pub fn supports<'a>(
        &self,
        gpu: &Gpu,
        kernel: ConvKernel,
        x: impl Into<ConvInput<'a, T>>,
    ) -> bool
    where
        T: 'a,
    {
        let x = x.into();
        let second_ok = x.second.is_none_or(|(x2, c2)| {
            x2.ptr(gpu).is_multiple_of(16) && (self.cin - c2.min(self.cin)).is_multiple_of(8)
        });
        kernel == ConvKernel::Tile64
            || (self.large_tiles_apply()
                && second_ok
                && x.x.ptr(gpu).is_multiple_of(16)
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
    pub fn choose_kernel<'a>(
        &self,
        gpu: &Gpu,
        x: impl Into<ConvInput<'a, T>>,
        n: usize,
        h: usize,
        w: usize,
    ) -> ConvKernel
    where
        T: 'a,
    {
        let x = x.into();
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
    pub fn forward<'a>(
        &self,
        gpu: &Gpu,
        x: impl Into<ConvInput<'a, T>>,
        n: usize,
        h: usize,
        w: usize,
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
    ) -> Result<()>
    where
        T: 'a,
    {
        let x = x.into();
        let kernel = self.choose_kernel(gpu, x, n, h, w);
        self.forward_with(gpu, kernel, x, n, h, w, y, residual)
    }

    /// `forward` with the given kernel (tests, benchmarks): an error where it does not apply.
    /// `h` and `w` are the size the convolution sees (twice the stored one when upsampled).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with<'a>(
        &self,
        gpu: &Gpu,
        kernel: ConvKernel,
        x: impl Into<ConvInput<'a, T>>,
        n: usize,
        h: usize,
        w: usize,
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
    ) -> Result<()>
    where
        T: 'a,
    {
        self.launch(gpu, kernel, x.into(), [n, h, w], y, residual, 0)
    }

    /// How many row tiles per image the per-channel moments of `kernel`'s epilogue come in,
    /// for this conv's `ho x wo` output; None where the kernel cannot make them (a row tile
    /// must lie in one image: `kernels/conv.cu`'s header).
    pub fn moment_chunks(&self, kernel: ConvKernel, ho: usize, wo: usize) -> Option<usize> {
        let (bm, _, _, _) = kernel.geometry();
        (ho * wo > 0 && (ho * wo).is_multiple_of(bm)).then(|| ho * wo / bm)
    }

    /// The kernel `forward` would launch for an `n x h x w` input and its moment chunks
    /// ([`GpuConv2d::moment_chunks`]), where it can make the moments.
    pub fn moments_plan<'a>(
        &self,
        gpu: &Gpu,
        x: impl Into<ConvInput<'a, T>>,
        [n, h, w]: [usize; 3],
    ) -> Option<(ConvKernel, usize)>
    where
        T: 'a,
    {
        let kernel = self.choose_kernel(gpu, x, n, h, w);
        let (ho, wo) = self.out_size(h, w);
        self.moment_chunks(kernel, ho, wo)
            .map(|chunks| (kernel, chunks))
    }

    /// `forward_with`, and from the kernel's epilogue the moments of y's channels: `part` f32
    /// `[n, chunks, cout, 3]`, the count, mean and M2 of each channel over each row tile
    /// (chunks from [`GpuConv2d::moment_chunks`], an error where there are none), from which
    /// `GpuGroupNorm::forward_from_moments` takes a norm's statistics instead of a pass over y.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_moments<'a>(
        &self,
        gpu: &Gpu,
        kernel: ConvKernel,
        x: impl Into<ConvInput<'a, T>>,
        nhw: [usize; 3],
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
        part: &mut GpuBuffer<f32>,
    ) -> Result<()>
    where
        T: 'a,
    {
        let [n, h, w] = nhw;
        let (ho, wo) = self.out_size(h, w);
        let chunks = self.moment_chunks(kernel, ho, wo).ok_or_else(|| {
            Error::Cuda(format!(
                "conv kernel {} cannot make the channel moments of {ho}x{wo} images",
                kernel.name()
            ))
        })?;
        check_len(
            "conv channel moments",
            part.len(),
            elements("conv channel moments", &[n, chunks, self.cout, 3])?,
        )?;
        let moments = part.ptr(gpu);
        self.launch(gpu, kernel, x.into(), nhw, y, residual, moments)
    }

    /// The launch of `forward_with`, with the epilogue's channel moments when `moments` is
    /// their buffer's address (not 0; checked by the caller).
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        gpu: &Gpu,
        kernel: ConvKernel,
        input: ConvInput<'_, T>,
        [n, h, w]: [usize; 3],
        y: &mut GpuBuffer<T>,
        residual: Residual<'_, GpuBuffer<T>>,
        moments: u64,
    ) -> Result<()> {
        let (ho, wo) = self.out_size(h, w);
        let out_len = elements("conv output", &[n, ho, wo, self.cout])?;
        // The kernels count output pixels (their GEMM rows) in 32 bits.
        int_product("conv output pixels", &[n, ho, wo])?;
        let (sh, sw) = if input.upsampled {
            if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
                return Err(Error::Input(format!(
                    "an upsampled conv input of odd size {h}x{w}"
                )));
            }
            (h / 2, w / 2)
        } else {
            (h, w)
        };
        let c2 = input.second.map_or(0, |(_, c2)| c2);
        if input.second.is_some() && (c2 == 0 || c2 >= self.cin) {
            return Err(Error::Input(format!(
                "a conv over {} channels cannot take {c2} of them from a second tensor",
                self.cin
            )));
        }
        let stored = |c: usize| elements("conv input", &[n, sh, sw, c]);
        check_len("conv input", input.x.len(), stored(self.cin - c2)?)?;
        if let Some((x2, _)) = input.second {
            check_len("conv input (second tensor)", x2.len(), stored(c2)?)?;
        }
        check_len("conv output", y.len(), out_len)?;
        let (norm, norm_silu) = match input.norm {
            Some((table, silu)) => {
                check_len(
                    "conv input norm table",
                    table.len(),
                    elements("conv input norm table", &[n, self.cin, 2])?,
                )?;
                // The kernels read a chunk's (mul, add) pairs as float4.
                if !table.ptr(gpu).is_multiple_of(16) {
                    return Err(Error::Cuda(
                        "conv input norm table: not 16-byte aligned".into(),
                    ));
                }
                (table.ptr(gpu), silu)
            }
            None => (0, false),
        };
        if !self.supports(gpu, kernel, input) {
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
        let res_up = matches!(residual, Residual::Upsampled(_));
        let res_down = matches!(residual, Residual::Pooled(_));
        let res = match residual {
            Residual::None => 0,
            Residual::Output => y.ptr(gpu),
            Residual::Buffer(r) => {
                check_len("conv residual", r.len(), out_len)?;
                r.ptr(gpu)
            }
            Residual::Upsampled(r) => {
                if !ho.is_multiple_of(2) || !wo.is_multiple_of(2) {
                    return Err(Error::Input(format!(
                        "an upsampled residual for an output of odd size {ho}x{wo}"
                    )));
                }
                let len = elements("conv residual", &[n, ho / 2, wo / 2, self.cout])?;
                check_len("conv residual (half size)", r.len(), len)?;
                r.ptr(gpu)
            }
            Residual::Pooled(r) => {
                let len = elements("conv residual", &[n, 2 * ho, 2 * wo, self.cout])?;
                check_len("conv residual (double size)", r.len(), len)?;
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
        let i = |v: usize| v as i32;
        let args = ConvArgs {
            x: input.x.ptr(gpu),
            weight: self.weight.ptr(gpu),
            bias: self.bias.ptr(gpu),
            residual: res,
            y: y.ptr(gpu),
            n: i(n),
            h: i(h),
            w: i(w),
            cin: i(self.cin),
            cout: i(self.cout),
            ksize: i(self.kernel),
            stride: i(self.stride),
            ho: i(ho),
            wo: i(wo),
            x2: input.second.map_or(0, |(x2, _)| x2.ptr(gpu)),
            cin1: i(self.cin - c2),
            up: input.upsampled as i32,
            res_up: res_up as i32,
            moments,
            res_down: res_down as i32,
            norm,
            norm_silu: norm_silu as i32,
            ..Default::default()
        };
        gpu.launch("conv", &name, cfg, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::{Conv2d, IM2COL_CHUNK, WINOGRAD_CHUNK, WINOGRAD_MIN_CHANNELS};

    /// Direct convolution in f64 from PyTorch's weight layout (padding k / 2, as the UNet's
    /// convolutions): the independent reference.
    fn direct(
        x: &[f32],
        tw: &[f32],
        bias: &[f32],
        [n, h, w, cin]: [usize; 4],
        k: usize,
        stride: usize,
    ) -> Vec<f64> {
        let cout = bias.len();
        let pad = k / 2;
        let (ho, wo) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let mut out = vec![0f64; n * ho * wo * cout];
        for b in 0..n {
            for y in 0..ho {
                for xx in 0..wo {
                    for co in 0..cout {
                        let mut acc = bias[co] as f64;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (y * stride + ky).wrapping_sub(pad);
                                let ix = (xx * stride + kx).wrapping_sub(pad);
                                if iy >= h || ix >= w {
                                    continue;
                                }
                                for ci in 0..cin {
                                    acc += x[((b * h + iy) * w + ix) * cin + ci] as f64
                                        * tw[((co * cin + ci) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                        out[((b * ho + y) * wo + xx) * cout + co] = acc;
                    }
                }
            }
        }
        out
    }

    fn value(i: usize, salt: usize) -> f32 {
        (((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.5) - 1.0
    }

    /// Runs `conv` (PyTorch weights `tw`) with and without accumulation against [`direct`]
    /// (rel L2 <= 1e-6); returns the scratch it grew.
    fn check(
        tw: &[f32],
        cout: usize,
        [n, h, w, cin]: [usize; 4],
        k: usize,
        stride: usize,
    ) -> usize {
        let x: Vec<f32> = (0..n * h * w * cin).map(|i| value(i, 1)).collect();
        let bias: Vec<f32> = (0..cout).map(|i| value(i, 3)).collect();
        let conv = Conv2d::from_torch(tw, bias.clone(), k, stride);
        let want = direct(&x, tw, &bias, [n, h, w, cin], k, stride);
        let mut scratch = Vec::new();
        for accumulate in [false, true] {
            let start: Vec<f32> = (0..want.len()).map(|i| value(i, 4)).collect();
            let mut out = if accumulate {
                start.clone()
            } else {
                vec![f32::NAN; want.len()]
            };
            conv.forward(&x, n, h, w, &mut out, accumulate, &mut scratch);
            let (mut num, mut den) = (0f64, 0f64);
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                let want = want + if accumulate { start[i] as f64 } else { 0.0 };
                num += (got as f64 - want).powi(2);
                den += want * want;
            }
            let rel = (num / den).sqrt();
            assert!(
                rel <= 1e-6,
                "n{n} {h}x{w} {cin}->{cout} k{k} s{stride} accumulate {accumulate}: rel L2 {rel:e}"
            );
        }
        scratch.len()
    }

    #[test]
    fn winograd_3x3_matches_direct_convolution() {
        // Odd and even sizes, 1x1 images, channel counts off the SIMD widths.
        for (n, h, w, cin, cout) in [
            (1, 1, 1, WINOGRAD_MIN_CHANNELS, 8),
            (2, 5, 7, WINOGRAD_MIN_CHANNELS, 24),
            (3, 8, 8, WINOGRAD_MIN_CHANNELS + 16, 32),
            (1, 9, 4, WINOGRAD_MIN_CHANNELS + 1, 5),
            (2, 3, 2, WINOGRAD_MIN_CHANNELS + 17, 33),
            // 21 tile rows of 128 tiles: two chunks of WINOGRAD_CHUNK, the second partial.
            (1, 41, 256, WINOGRAD_MIN_CHANNELS, 64),
        ] {
            let tw: Vec<f32> = (0..cout * cin * 9).map(|i| value(i, 2) / 8.0).collect();
            let scratch = check(&tw, cout, [n, h, w, cin], 3, 1);
            // Chunks of whole tile rows keep the scratch within WINOGRAD_CHUNK (or one row).
            let tile_row = 16 * (cin + cout) * w.div_ceil(2);
            assert!(
                scratch <= WINOGRAD_CHUNK.max(tile_row),
                "{h}x{w}: scratch {scratch}"
            );
        }
    }

    /// The im2col path (3x3 below the Winograd width, stride-2 downsampling) and the 1x1 GEMM.
    #[test]
    fn im2col_and_1x1_match_direct_convolution() {
        let narrow = WINOGRAD_MIN_CHANNELS - 1;
        // The last field: the output spans two chunks of IM2COL_CHUNK floats of 3x3 patches.
        for (n, h, w, cin, cout, k, stride, two_chunks) in [
            (1, 80, 100, narrow, 8, 3, 1, true),
            (1, 180, 170, narrow, 4, 3, 2, true),
            (2, 9, 7, 5, 6, 3, 2, false),
            (3, 1, 1, 3, 4, 3, 2, false),
            (2, 6, 5, 7, 3, 1, 1, false),
            (1, 4, 3, 70, 17, 1, 1, false),
        ] {
            if two_chunks {
                let pixels = n * ((h - 1) / stride + 1) * ((w - 1) / stride + 1);
                assert!(
                    pixels > IM2COL_CHUNK / (9 * cin),
                    "{h}x{w} s{stride}: one chunk"
                );
            }
            let tw: Vec<f32> = (0..cout * cin * k * k).map(|i| value(i, 2) / 8.0).collect();
            let scratch = check(&tw, cout, [n, h, w, cin], k, stride);
            assert!(scratch <= IM2COL_CHUNK, "{h}x{w} k{k}: scratch {scratch}");
        }
    }
}
