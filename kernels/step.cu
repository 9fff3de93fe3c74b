// The fused sampler step: composition of the expert predictions, the DDIM or DDPM update (or a
// multistep solver's, mode 2) and the Philox noise, one element per thread, bit-identical to the
// CPU path (src/diffusion/compose.rs, src/diffusion/step.rs, src/rng.rs) except where noted.
//
// Every f32 operation is written as an explicit correctly rounded intrinsic in the CPU's order
// (__fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn: never contracted into an FMA), and
// this file is also compiled with --fmad=false. StepParams is defined in common.cuh.
//
// The one place that is not bit-exact by construction: the learned-range DDPM variance needs a
// per-element exp, `(0.5 * log_var).exp()` on the CPU (the platform's expf). Here it is
// exp() in f64 rounded to f32, i.e. the correctly rounded expf in all but astronomically rare
// cases, which is what glibc's expf returns too (it is accurate to ~0.502 ulp).
#include "common.cuh"

// rust f32::clamp(-1.0, 1.0): NaN stays NaN.
MCDM_DEV float clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// p_mean_variance's x_0 prediction (XstartCoefs::pred_xstart):
// eps models: sqrt_recip * x - sqrt_recipm1 * m; x_0 models: m; then the optional clamp.
MCDM_DEV float pred_xstart(const StepParams& p, float x, float m) {
    float v = p.predict_xstart ? m : __fsub_rn(__fmul_rn(p.sqrt_recip, x), __fmul_rn(p.sqrt_recipm1, m));
    return p.clip ? clamp1(v) : v;
}

// x, x_out: f32 [b, len] (one NCHW image per row; x_out may alias x).
// eps: `terms` blocks of f32 [b, len]: the expert outputs 0 .. terms-2, then the unconditional
//   output (block terms-1). weights: f32 [terms - 1] (may be NULL when terms == 1).
//   composed = eps_u; then for each expert i in order: composed = composed + w_i * (eps_i - eps_u)
//   (compose::compose, no FMA).
// var: f32 [b, len] of the model's variance channels (v of learn_sigma) for a learned-range
//   DDPM step, NULL for the fixed variances (and for DDIM, which ignores it).
// Noise (when p.add_noise): element e (0 <= e < len) of batch row k is the normal of
//   rng::fill_normals(seed, image = first_image + k, step = p.step)[e].
// history: f32 [3, b, len] for mode 2 (the multistep solvers; NULL otherwise): the two previous
//   x_0 (h1, h2) and the previous step's start (last), each element read and rewritten by its
//   own thread (StepParams::update_multistep).
// StepArgs: these, and p. Launch: grid ceil(b * len / 256), block 256.
#define StepArgs_FIELDS(F)                                                                          \
    F(const float*, x) F(const float* __restrict__, eps) F(const float* __restrict__, weights)      \
    F(const float* __restrict__, var) F(float*, x_out) F(int, terms) F(int, b) F(int, len)          \
    F(int, first_image) F(StepParams, p) F(float*, history)
MCDM_ARGS(StepArgs)
#define STEP_THREADS 256

// a*u + b*v + c*w + d*z, rounded after each operation in that order (the CPU's f32 expression).
MCDM_DEV float combine4(float a, float u, float b, float v, float c, float w, float d, float z) {
    return __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(a, u), __fmul_rn(b, v)), __fmul_rn(c, w)), __fmul_rn(d, z));
}

MCDM_DEV void diffusion_step_at(const float* x, const float* __restrict__ eps, const float* __restrict__ weights,
                                int terms, const float* __restrict__ var, float* x_out, int b, int len,
                                int first_image, const StepParams& p, float* history) {
    const long long i = global_index();
    const long long total = (long long)b * len;
    if (i >= total || terms < 1) return;
    const long long k = i / len;  // batch row
    const long long e = i % len;  // element within the image (NCHW order)

    // Composition (compose.rs): out = uncond; out += w * (e - u) per expert, in order.
    const float u = eps[(long long)(terms - 1) * total + i];
    float m = u;
    for (int t = 0; t + 1 < terms; ++t) {
        const float ei = eps[(long long)t * total + i];
        m = __fadd_rn(m, __fmul_rn(weights[t], __fsub_rn(ei, u)));
    }

    const float xv = x[i];
    float z = 0.0f;
    if (p.add_noise) {
        z = mcdm_normal((unsigned long long)e, (unsigned)(first_image + k), p.step, p.seed_lo, p.seed_hi);
    }

    float out;
    if (p.mode == 2) {
        float* h1 = history + i;
        float* h2 = history + total + i;
        float* last = history + 2 * total + i;
        const float x0 = pred_xstart(p, xv, m);
        const float xc = p.corrector ? combine4(p.ca, *last, p.c0, x0, p.c1, *h1, p.c2, *h2) : xv;
        out = combine4(p.pa, xc, p.p0, x0, p.p1, *h1, p.p2, *h2);
        *last = xc;
        *h2 = *h1;
        *h1 = x0;
    } else if (p.mode == 0) {
        // ddim_step: x0 = pred_xstart; eps = (sqrt_recip * x - x0) / sqrt_recipm1;
        // mean = x0 * sqrt_alpha_bar_prev + eps_coef * eps; out = mean (+ sigma * noise).
        const float x0 = pred_xstart(p, xv, m);
        const float eps_dir = __fdiv_rn(__fsub_rn(__fmul_rn(p.sqrt_recip, xv), x0), p.sqrt_recipm1);
        const float mean = __fadd_rn(__fmul_rn(x0, p.sqrt_alpha_bar_prev), __fmul_rn(p.eps_coef, eps_dir));
        out = p.add_noise ? __fadd_rn(mean, __fmul_rn(p.sigma, z)) : mean;
    } else {
        // ddpm_step: mean = coef1 * pred_xstart + coef2 * x; out = mean (+ std * noise) with
        // std = exp(0.5 * log_var), log_var = frac * max_log + (1 - frac) * min_log and
        // frac = (v + 1) / 2 for a learned range, else the per-step p.noise_std.
        const float mean = __fadd_rn(__fmul_rn(p.coef1, pred_xstart(p, xv, m)), __fmul_rn(p.coef2, xv));
        if (p.add_noise) {
            float sd;
            if (var != nullptr) {
                const float frac = __fdiv_rn(__fadd_rn(var[i], 1.0f), 2.0f);
                const float log_var =
                    __fadd_rn(__fmul_rn(frac, p.max_log), __fmul_rn(__fsub_rn(1.0f, frac), p.min_log));
                sd = (float)exp((double)__fmul_rn(0.5f, log_var));
            } else {
                sd = p.noise_std;
            }
            out = __fadd_rn(mean, __fmul_rn(sd, z));
        } else {
            out = mean;
        }
    }
    x_out[i] = out;
}

extern "C" __global__ void __launch_bounds__(STEP_THREADS) diffusion_step(MCDM_PARAMS(StepArgs)) {
    diffusion_step_at(x, eps, weights, terms, var, x_out, b, len, first_image, p, history);
}

// out f32 [b, len]: out[k, e] = rng::fill_normals(seed, first_image + k, step)[e], seed =
// seed_lo | seed_hi << 32 (x_T uses step = 0xFFFFFFFF).
// Launch: grid ceil(b * len / 256), block 256, one element per thread.
#define NormalsArgs_FIELDS(F)                                                                       \
    F(float* __restrict__, out) F(int, b) F(int, len) F(int, first_image) F(unsigned, seed_lo)      \
    F(unsigned, seed_hi) F(unsigned, step)
MCDM_ARGS(NormalsArgs)

extern "C" __global__ void __launch_bounds__(STEP_THREADS) fill_normals(MCDM_PARAMS(NormalsArgs)) {
    const long long i = global_index();
    const long long total = (long long)b * len;
    if (i >= total) return;
    const long long k = i / len;
    const long long e = i % len;
    out[i] = mcdm_normal((unsigned long long)e, (unsigned)(first_image + k), step, seed_lo, seed_hi);
}
