//! Layout and dtype conversion at the network's boundary: PyTorch's NCHW f32 outside, NHWC in
//! the storage type inside; and the sampler's packing of x_t with image conditions.

use super::conv::check_len;
use crate::cuda::{grid_1d, Arg, Gpu, GpuBuffer, GpuFloat};
use crate::error::Result;

/// `[n, c, hw]` -> `[n, hw, c]`.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, hw: usize, out: &mut [f32]) {
    for b in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                out[(b * hw + p) * c + ch] = x[(b * c + ch) * hw + p];
            }
        }
    }
}

/// `[n, hw, c]` -> `[n, c, hw]`.
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, hw: usize, out: &mut [f32]) {
    for b in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                out[(b * c + ch) * hw + p] = x[(b * hw + p) * c + ch];
            }
        }
    }
}

fn launch<T: GpuFloat>(gpu: &Gpu, kernel: &str, outputs: usize, args: &[Arg]) -> Result<()> {
    gpu.launch(
        "layout",
        &format!("{kernel}{}", T::SUFFIX),
        grid_1d(outputs),
        args,
    )
}

/// `kernels/layout.cu`: f32 `[n, c, hw]` -> `T` `[n, hw, c]`.
pub fn nchw_to_nhwc_gpu<T: GpuFloat>(
    gpu: &Gpu,
    x: &GpuBuffer<f32>,
    n: usize,
    c: usize,
    hw: usize,
    y: &mut GpuBuffer<T>,
) -> Result<()> {
    check_len("nchw input", x.len(), n * c * hw)?;
    check_len("nhwc output", y.len(), n * c * hw)?;
    let i = |v: usize| Arg::I32(v as i32);
    launch::<T>(
        gpu,
        "nchw_to_nhwc",
        n * c * hw,
        &[
            Arg::Ptr(x.ptr(gpu)),
            Arg::Ptr(y.ptr(gpu)),
            i(n),
            i(c),
            i(hw),
        ],
    )
}

/// `kernels/layout.cu`: `T` `[n, hw, c]` -> f32 `[n, c, hw]`.
pub fn nhwc_to_nchw_gpu<T: GpuFloat>(
    gpu: &Gpu,
    x: &GpuBuffer<T>,
    n: usize,
    c: usize,
    hw: usize,
    y: &mut GpuBuffer<f32>,
) -> Result<()> {
    check_len("nhwc input", x.len(), n * c * hw)?;
    check_len("nchw output", y.len(), n * c * hw)?;
    let i = |v: usize| Arg::I32(v as i32);
    launch::<T>(
        gpu,
        "nhwc_to_nchw",
        n * c * hw,
        &[
            Arg::Ptr(x.ptr(gpu)),
            Arg::Ptr(y.ptr(gpu)),
            i(n),
            i(c),
            i(hw),
        ],
    )
}

/// `kernels/layout.cu`: the network input of one term: x_t f32 `[b, 3, hw]` and the image
/// condition f32 `[count, cc, hw]` (item `first_image + k`, or 0 when shared; zeros when
/// absent) -> `T` `[b, hw, 3 + cc]` at element `y_offset` of `y`.
#[allow(clippy::too_many_arguments)]
pub fn pack_input_gpu<T: GpuFloat>(
    gpu: &Gpu,
    x: &GpuBuffer<f32>,
    cond: Option<(&GpuBuffer<f32>, usize)>,
    first_image: usize,
    b: usize,
    hw: usize,
    cc: usize,
    y: &mut GpuBuffer<T>,
    y_offset: usize,
) -> Result<()> {
    check_len("x_t", x.len(), b * 3 * hw)?;
    check_len("packed input", y.len(), y_offset + b * hw * (3 + cc))?;
    let (cond_ptr, count) = match cond {
        Some((c, count)) => {
            check_len("image condition", c.len(), count * cc * hw)?;
            (c.ptr(gpu), count)
        }
        None => (0, 0),
    };
    let i = |v: usize| Arg::I32(v as i32);
    launch::<T>(
        gpu,
        "pack_input",
        b * hw * (3 + cc),
        &[
            Arg::Ptr(x.ptr(gpu)),
            Arg::Ptr(cond_ptr),
            i(count),
            i(first_image),
            Arg::Ptr(y.ptr_at(gpu, y_offset)),
            i(b),
            i(hw),
            i(cc),
        ],
    )
}

/// `kernels/layout.cu`: network output `T` `[b, hw, oc]` -> eps f32 `[b, 3, hw]` and, when
/// given, the variance channels 3..6 as f32 `[b, 3, hw]`.
#[allow(clippy::too_many_arguments)]
pub fn unpack_output_gpu<T: GpuFloat>(
    gpu: &Gpu,
    y: &GpuBuffer<T>,
    offset: usize,
    oc: usize,
    eps: &mut GpuBuffer<f32>,
    eps_offset: usize,
    var: Option<&mut GpuBuffer<f32>>,
    b: usize,
    hw: usize,
) -> Result<()> {
    check_len("network output", y.len(), offset + b * hw * oc)?;
    check_len("eps", eps.len(), eps_offset + b * 3 * hw)?;
    let var_ptr = match var {
        Some(v) => {
            check_len("variance", v.len(), b * 3 * hw)?;
            v.ptr(gpu)
        }
        None => 0,
    };
    let i = |v: usize| Arg::I32(v as i32);
    launch::<T>(
        gpu,
        "unpack_output",
        b * 3 * hw,
        &[
            Arg::Ptr(y.ptr_at(gpu, offset)),
            i(oc),
            Arg::Ptr(eps.ptr_at(gpu, eps_offset)),
            Arg::Ptr(var_ptr),
            i(b),
            i(hw),
        ],
    )
}
