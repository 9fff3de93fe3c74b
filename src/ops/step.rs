//! The fused sampling step (`kernels/step.cu`): the eps combination
//! `eps_u + sum_i w_i (eps_i - eps_u)` and the DDIM or DDPM update with Philox noise, in one
//! pass. [`diffusion_step`] is its CPU reference: [`crate::diffusion::compose`] followed by
//! [`crate::diffusion::Diffusion::ddim_step`] / `ddpm_step`, element by element, with the same
//! [`StepParams`] (bit for bit).

use super::{check_len, elements};
use crate::cuda::interface::{NormalsArgs, StepArgs, STEP_THREADS};
use crate::cuda::{grid_1d, Gpu, GpuBuffer};
pub use crate::diffusion::StepParams;
use crate::error::{Error, Result};
use crate::rng::{check_image_keys, fill_normals};

/// x = update(x, composed eps) in place for `b` images of `len` elements: `eps` holds `terms`
/// blocks of `[b, len]` (the experts first, the unconditional term last), `weights` the
/// experts' weights, `var` the learned-variance channels of a learned-range DDPM step. The
/// noise of image k is `fill_normals(seed, first_image + k, step)`. A multistep solver's step
/// (mode 2) takes its `history` `[3, b, len]` (see [`StepParams::update_multistep`]) and
/// updates it; other modes take none.
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
    mut history: Option<&mut [f32]>,
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
            if let Some(h) = history.as_deref_mut() {
                let (h1, rest) = h.split_at_mut(total);
                let (h2, last) = rest.split_at_mut(total);
                *xv = params.update_multistep(*xv, m, [&mut h1[i], &mut h2[i], &mut last[i]]);
                continue;
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
    history: Option<&mut GpuBuffer<f32>>,
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
    let history_ptr = match (history, params.mode) {
        (Some(h), 2) => {
            check_len("solver history", h.len(), 3 * size)?;
            h.ptr(gpu)
        }
        (None, 2) => {
            return Err(Error::Input(
                "a multistep solver step needs its history buffers".into(),
            ))
        }
        _ => 0,
    };
    let i = |v: usize| v as i32;
    let args = StepArgs {
        // x and x_out: the kernel reads each element before writing it.
        x: x.ptr(gpu),
        eps: eps.ptr(gpu),
        weights: weights.ptr(gpu),
        var: var_ptr,
        x_out: x.ptr(gpu),
        terms: i(terms),
        b: i(b),
        len: i(len),
        // The image's noise key, as on the CPU: the low 32 bits.
        first_image: first_image as u32 as i32,
        p: params,
        history: history_ptr,
    };
    gpu.launch("step", "diffusion_step", grid_1d(size, STEP_THREADS), &args)
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
    let args = NormalsArgs {
        out: out.ptr(gpu),
        b: b as i32,
        len: len as i32,
        // The kernels use the low 32 bits: the image's noise key, as on the CPU.
        first_image: first_image as u32 as i32,
        seed_lo: seed as u32,
        seed_hi: (seed >> 32) as u32,
        step,
    };
    gpu.launch("step", "fill_normals", grid_1d(size, STEP_THREADS), &args)
}
