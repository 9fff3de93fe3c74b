//! The fused sampling step (`kernels/step.cu`): the eps combination
//! `eps_u + sum_i w_i (eps_i - eps_u)` and the DDIM or DDPM update with Philox noise, in one
//! pass. [`diffusion_step`] is its CPU reference: [`crate::diffusion::compose`] followed by
//! [`crate::diffusion::Diffusion::ddim_step`] / `ddpm_step`, element by element, with the same
//! [`StepParams`] (bit for bit).

use super::{check_len, elements};
use crate::cuda::{grid_1d, Arg, Gpu, GpuBuffer};
pub use crate::diffusion::StepParams;
use crate::error::{Error, Result};
use crate::rng::{check_image_keys, fill_normals};

/// x = update(x, composed eps) in place for `b` images of `len` elements: `eps` holds `terms`
/// blocks of `[b, len]` (the experts first, the unconditional term last), `weights` the
/// experts' weights, `var` the learned-variance channels of a learned-range DDPM step. The
/// noise of image k is `fill_normals(seed, first_image + k, step)`.
#[allow(clippy::too_many_arguments)]
pub fn diffusion_step(
    x: &mut [f32],
    eps: &[f32],
    weights: &[f32],
    terms: usize,
    var: Option<&[f32]>,
    b: usize,
    len: usize,
    first_image: usize,
    params: StepParams,
) {
    let total = b * len;
    let (experts, uncond) = eps[..terms * total].split_at((terms - 1) * total);
    let seed = params.seed_lo as u64 | (params.seed_hi as u64) << 32;
    let mut noise = vec![0.0f32; if params.add_noise != 0 { len } else { 0 }];
    for (k, img) in x[..total].chunks_exact_mut(len).enumerate() {
        if params.add_noise != 0 {
            fill_normals(seed, (first_image + k) as u32, params.step, &mut noise);
        }
        for (e, xv) in img.iter_mut().enumerate() {
            let i = k * len + e;
            // compose(): out = u, then out += w (e_i - u) per expert in order.
            let u = uncond[i];
            let mut m = u;
            for (t, &w) in weights[..terms - 1].iter().enumerate() {
                m += w * (experts[t * total + i] - u);
            }
            let z = noise.get(e).copied().unwrap_or(0.0);
            *xv = params.update(*xv, m, var.map(|v| v[i]), z);
        }
    }
}

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
            Arg::plain(&params),
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
