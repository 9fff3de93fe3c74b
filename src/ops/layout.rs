//! Layout and dtype conversion at the network's boundary: PyTorch's NCHW f32 outside, NHWC in
//! the storage type inside; and the sampler's packing of x_t with image conditions.

use super::{check_len, elements};
use crate::cuda::interface::{PackArgs, TransposeArgs, UnpackArgs, LAYOUT_THREADS};
use crate::cuda::{grid_1d, Gpu, GpuBuffer, GpuFloat, KernelArgs};
use crate::error::{Error, Result};

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

/// A model's input for `b` images at `y[y_offset..]`, NHWC `[b, hw, 3 + cc]`: x_t `[b, 3, hw]`
/// (NCHW) in channels 0..3, then channel `ch` of the image condition `[count, cc, hw]`: item
/// `first_image + k` for image k (the only item when `count` is 1), zeros without a condition
/// or past its items.
#[allow(clippy::too_many_arguments)]
pub fn pack_input(
    x: &[f32],
    cond: Option<(&[f32], usize)>,
    first_image: usize,
    b: usize,
    hw: usize,
    cc: usize,
    y: &mut [f32],
    y_offset: usize,
) {
    let cy = 3 + cc;
    let y = &mut y[y_offset..][..b * hw * cy];
    for (k, img) in y.chunks_exact_mut(hw * cy).enumerate() {
        let xk = &x[k * 3 * hw..][..3 * hw];
        let item = cond.and_then(|(c, count)| {
            let item = if count == 1 { 0 } else { first_image + k };
            (item < count).then(|| &c[item * cc * hw..][..cc * hw])
        });
        for (p, px) in img.chunks_exact_mut(cy).enumerate() {
            for ch in 0..3 {
                px[ch] = xk[ch * hw + p];
            }
            for ch in 0..cc {
                px[3 + ch] = item.map_or(0.0, |c| c[ch * hw + p]);
            }
        }
    }
}

/// From a model's output `[b, hw, oc]` at `y[offset..]`: channels 0..3 into
/// `eps[eps_offset..]` and, when `var` is given (and `oc >= 6`), channels 3..6 into it, both
/// NCHW `[b, 3, hw]`.
#[allow(clippy::too_many_arguments)]
pub fn unpack_output(
    y: &[f32],
    offset: usize,
    oc: usize,
    eps: &mut [f32],
    eps_offset: usize,
    mut var: Option<&mut [f32]>,
    b: usize,
    hw: usize,
) {
    let y = &y[offset..][..b * hw * oc];
    let eps = &mut eps[eps_offset..][..b * 3 * hw];
    for (k, img) in y.chunks_exact(hw * oc).enumerate() {
        for (p, px) in img.chunks_exact(oc).enumerate() {
            for ch in 0..3 {
                let at = (k * 3 + ch) * hw + p;
                eps[at] = px[ch];
                if let Some(v) = var.as_deref_mut().filter(|_| oc >= 6) {
                    v[at] = px[3 + ch];
                }
            }
        }
    }
}

fn launch<T: GpuFloat, A: KernelArgs>(
    gpu: &Gpu,
    kernel: &str,
    outputs: usize,
    args: &A,
) -> Result<()> {
    gpu.launch(
        "layout",
        &format!("{kernel}{}", T::SUFFIX),
        grid_1d(outputs, LAYOUT_THREADS),
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
    let len = elements("nchw to nhwc", &[n, c, hw])?;
    check_len("nchw input", x.len(), len)?;
    check_len("nhwc output", y.len(), len)?;
    let args = TransposeArgs {
        x: x.ptr(gpu),
        y: y.ptr(gpu),
        n: n as i32,
        c: c as i32,
        hw: hw as i32,
        ..Default::default()
    };
    launch::<T, _>(gpu, "nchw_to_nhwc", len, &args)
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
    let len = elements("nhwc to nchw", &[n, c, hw])?;
    check_len("nhwc input", x.len(), len)?;
    check_len("nchw output", y.len(), len)?;
    let args = TransposeArgs {
        x: x.ptr(gpu),
        y: y.ptr(gpu),
        n: n as i32,
        c: c as i32,
        hw: hw as i32,
        ..Default::default()
    };
    launch::<T, _>(gpu, "nhwc_to_nchw", len, &args)
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
    check_len("x_t", x.len(), elements("x_t", &[b, 3, hw])?)?;
    let packed = elements("packed input", &[b, hw, cc.saturating_add(3)])?;
    check_len(
        "packed input",
        y.len(),
        end("packed input", y_offset, packed)?,
    )?;
    let (cond_ptr, count) = match cond {
        Some((c, count)) => {
            check_len(
                "image condition",
                c.len(),
                elements("image condition", &[count, cc, hw])?,
            )?;
            // Image `first_image + k` of a per-image condition.
            if count != 1 {
                check_len(
                    "image condition items",
                    count,
                    end("image", first_image, b)?,
                )?;
            }
            (c.ptr(gpu), count)
        }
        None => (0, 0),
    };
    let i = |v: usize| v as i32;
    let args = PackArgs {
        x: x.ptr(gpu),
        cond: cond_ptr,
        y: y.ptr_at(gpu, y_offset),
        cond_count: i(count),
        first_image: i(first_image),
        b: i(b),
        hw: i(hw),
        cc: i(cc),
        ..Default::default()
    };
    launch::<T, _>(gpu, "pack_input", packed, &args)
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
    // The kernel reads channels 0..3 (eps) and, for the variance, 3..6.
    let need = if var.is_some() { 6 } else { 3 };
    if oc < need {
        return Err(Error::Input(format!(
            "unpacking eps{}: the network output has {oc} channels, not {need} or more",
            if var.is_some() { " and variance" } else { "" }
        )));
    }
    let out = elements("network output", &[b, hw, oc])?;
    check_len(
        "network output",
        y.len(),
        end("network output", offset, out)?,
    )?;
    let len = elements("eps", &[b, 3, hw])?;
    check_len("eps", eps.len(), end("eps", eps_offset, len)?)?;
    let var_ptr = match var {
        Some(v) => {
            check_len("variance", v.len(), len)?;
            v.ptr(gpu)
        }
        None => 0,
    };
    let i = |v: usize| v as i32;
    let args = UnpackArgs {
        y: y.ptr_at(gpu, offset),
        eps: eps.ptr_at(gpu, eps_offset),
        var: var_ptr,
        oc: i(oc),
        b: i(b),
        hw: i(hw),
        ..Default::default()
    };
    launch::<T, _>(gpu, "unpack_output", len, &args)
}

/// `offset + len`, the end of a tensor at `offset` in its buffer, or an error where it overflows.
fn end(what: &str, offset: usize, len: usize) -> Result<usize> {
    offset
        .checked_add(len)
        .ok_or_else(|| Error::Input(format!("{what}: offset {offset} is past any buffer")))
}
