//! The fused sampling step on the GPU (`kernels/step.cu`): the eps combination
//! `eps_u + sum_i w_i (eps_i - eps_u)` and the DDIM or DDPM update with in-kernel Philox noise.
//! The CPU reference is [`crate::diffusion::compose`] followed by
//! [`crate::diffusion::Diffusion::ddim_step`] / `ddpm_step`, with the same [`StepParams`].

use cudarc::driver::DeviceRepr;

use super::{check_len, elements};
use crate::cuda::{grid_1d, Arg, Gpu, GpuBuffer};
pub use crate::diffusion::StepParams;
use crate::error::{Error, Result};
use crate::sample::check_image_keys;

// SAFETY: #[repr(C)], only 4-byte plain fields, laid out as kernels/common.cuh's StepParams.
unsafe impl DeviceRepr for StepParams {}

/// x = update(x, composed eps) in place, for `b` images of `len` elements; `eps` holds `terms`
/// blocks of `[b, len]` (experts first, the unconditional term last), `weights` the experts'
/// weights. In place, so that the sampler's state keeps one address across steps (CUDA graphs).
#[allow(clippy::too_many_arguments)]
pub fn diffusion_step_gpu(
    gpu: &Gpu,
    x: &mut GpuBuffer<f32>,
    eps: &GpuBuffer<f32>,
    weights: &GpuBuffer<f32>,
    terms: usize,
    var: Option<&GpuBuffer<f32>>,
    b: usize,
    len: usize,
    first_image: usize,
    params: StepParams,
) -> Result<()> {
    if terms == 0 {
        return Err(Error::Input(
            "a diffusion step needs at least the unconditional term".into(),
        ));
    }
    let size = elements("diffusion step", &[b, len])?;
    check_image_keys(first_image, b)?;
    check_len("x", x.len(), size)?;
    check_len("eps", eps.len(), elements("eps", &[terms, b, len])?)?;
    check_len("weights", weights.len(), terms - 1)?;
    let var_ptr = match var {
        Some(v) => {
            check_len("variance", v.len(), size)?;
            v.ptr(gpu)
        }
        None => 0,
    };
    let i = |v: usize| Arg::I32(v as i32);
    gpu.launch(
        "step",
        "diffusion_step",
        grid_1d(size),
        &[
            // x and x_out: the kernel reads each element before writing it.
            Arg::Ptr(x.ptr(gpu)),
            Arg::Ptr(eps.ptr(gpu)),
            Arg::Ptr(weights.ptr(gpu)),
            i(terms),
            Arg::Ptr(var_ptr),
            Arg::Ptr(x.ptr(gpu)),
            i(b),
            i(len),
            Arg::I32(first_image as u32 as i32),
            Arg::Step(params),
        ],
    )
}

/// The Philox normals of [`crate::rng::fill_normals`] for images `first_image..first_image+b`.
pub fn fill_normals_gpu(
    gpu: &Gpu,
    out: &mut GpuBuffer<f32>,
    b: usize,
    len: usize,
    first_image: usize,
    seed: u64,
    step: u32,
) -> Result<()> {
    let size = elements("normals", &[b, len])?;
    check_image_keys(first_image, b)?;
    check_len("normals", out.len(), size)?;
    gpu.launch(
        "step",
        "fill_normals",
        grid_1d(size),
        &[
            Arg::Ptr(out.ptr(gpu)),
            Arg::I32(b as i32),
            Arg::I32(len as i32),
            // The kernels use the low 32 bits: the image's noise key, as on the CPU.
            Arg::I32(first_image as u32 as i32),
            Arg::U32(seed as u32),
            Arg::U32((seed >> 32) as u32),
            Arg::U32(step),
        ],
    )
}
