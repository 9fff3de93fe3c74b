// Shared device code for every kernels/*.cu translation unit: storage-type conversions, warp and
// block reductions, the 16-bit packing used by the tensor-core kernels, Philox4x32-10 with the
// Box-Muller normals of src/rng.rs (bit for bit), and the fused step's parameter block.
//
// Conventions (all kernels):
// - Storage type T is float (suffix _f32), __half (_f16) or __nv_bfloat16 (_bf16); arithmetic is
//   in f32; stores round to nearest even.
// - Activations are NHWC. Element indices are computed in 64-bit (`long long`) so that no
//   product overflows; loop bounds given as `int` are the ABI's.
// - Every thread checks its indices: odd sizes and batch 1 read nothing out of range.
// - Compiled without fast math (no --use_fast_math: IEEE division and sqrt, no flush to zero);
//   the bit-exact paths (Philox normals, the fused step) also spell out every rounding with
//   __fmul_rn / __fadd_rn / __fmaf_rn so that fmad contraction cannot change them.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define MCDM_DEV __device__ __forceinline__

// A kernel's arguments are declared once, as a field list: `NAME_FIELDS(F)` lists
// `F(type, field)` in order. `MCDM_ARGS(NAME)` defines the struct NAME of those fields, and a
// kernel declared `kernel(MCDM_PARAMS(NAME))` takes them, in that order, as its parameters
// (scalar parameters, which the compiler reads from the constant bank as it needs them; a struct
// parameter was loaded whole, into registers). build.rs mirrors each struct in Rust
// (`mcdm::cuda::interface`, pointers as u64 device addresses), asserts both layouts, and the
// launcher passes each field as one parameter.
#define MCDM_ARG_FIELD(type, name) type name;
#define MCDM_ARGS(NAME) struct NAME { NAME##_FIELDS(MCDM_ARG_FIELD) };
#define MCDM_COMMA_PARAM(type, name) , type name
#define MCDM_DROP_FIRST(first, ...) __VA_ARGS__
#define MCDM_APPLY(m, args) m args
#define MCDM_PARAMS(NAME) MCDM_APPLY(MCDM_DROP_FIRST, (~ NAME##_FIELDS(MCDM_COMMA_PARAM)))
// +infinity (NVRTC has no <math.h> INFINITY).
#define MCDM_INF __uint_as_float(0x7f800000u)

// ---------------------------------------------------------------------------------------------
// Storage conversions.

template <typename T> MCDM_DEV float to_float(T v);
template <> MCDM_DEV float to_float<float>(float v) { return v; }
template <> MCDM_DEV float to_float<__half>(__half v) { return __half2float(v); }
template <> MCDM_DEV float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> MCDM_DEV T from_float(float v);
template <> MCDM_DEV float from_float<float>(float v) { return v; }
template <> MCDM_DEV __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> MCDM_DEV __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two f32 values rounded to T (16-bit) and packed into one 32-bit register, `lo` in bits 0..15:
// the layout of one .b32 operand register of mma.sync (lower column / k index in the low half).
template <typename T> MCDM_DEV unsigned pack2(float lo, float hi);
template <> MCDM_DEV unsigned pack2<__half>(float lo, float hi) {
    return (unsigned)__half_as_ushort(__float2half_rn(lo)) |
           ((unsigned)__half_as_ushort(__float2half_rn(hi)) << 16);
}
template <> MCDM_DEV unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// The 16-bit storage types reinterpreted as raw bits (tensor-core kernels stage tiles as bits).
template <typename T> MCDM_DEV float bits_to_float(unsigned short b);
template <> MCDM_DEV float bits_to_float<__half>(unsigned short b) { return __half2float(__ushort_as_half(b)); }
template <> MCDM_DEV float bits_to_float<__nv_bfloat16>(unsigned short b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core MMA: D = A * B + D with A 16x16 (row), B 16x8 (col), f32 accumulators.
// Register layout (PTX ISA, mma.m16n8k16, 16-bit A/B), with g = lane / 4 and q = lane % 4:
//   a[0] = A[g][2q..2q+1]     a[1] = A[g+8][2q..2q+1]
//   a[2] = A[g][2q+8..2q+9]   a[3] = A[g+8][2q+8..2q+9]
//   b[0] = B[2q..2q+1][g]     b[1] = B[2q+8..2q+9][g]          (k index first)
//   d[0], d[1] = D[g][2q], D[g][2q+1]   d[2], d[3] = D[g+8][2q], D[g+8][2q+1]
template <typename T> MCDM_DEV void mma16816(float* d, const unsigned* a, const unsigned* b);
template <> MCDM_DEV void mma16816<__half>(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> MCDM_DEV void mma16816<__nv_bfloat16>(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 32-bit load of two consecutive 16-bit values from shared memory (4-byte aligned address).
MCDM_DEV unsigned lds32(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }

// cp.async (sm_80+): copy 16 bytes global -> shared; when `valid` is false nothing is read and
// the 16 destination bytes are zero-filled (src-size 0). Both addresses 16-byte aligned.
MCDM_DEV void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem_dst);
    int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
                 "r"(src_size));
}
MCDM_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> MCDM_DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ldmatrix (sm_75+): thread t gives the address of row t % 8 of matrix t / 8 (16 bytes, 16-byte
// aligned, shared; threads from 8 * count on are ignored); register j of thread l receives the
// 32-bit word (row l / 4, columns 2 (l % 4), +1) of matrix j, which is the mma16816 A / B
// fragment layout. `.trans` gives matrix j transposed: the 16-bit elements (rows 2 (l % 4),
// +1; column l / 4), the B fragment of a row-major [k][n] tile.
MCDM_DEV void ldsm_x4(unsigned* r, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
MCDM_DEV void ldsm_x4_trans(unsigned* r, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
MCDM_DEV void ldsm_x2_trans(unsigned* r, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
}

MCDM_DEV bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }

// ---------------------------------------------------------------------------------------------
// Reductions (fixed order: deterministic for a fixed launch configuration).

// The (count, mean, sum of squared deviations) of a set of values: group norm's statistics,
// made by kernels/group_norm.cu or by a conv's epilogue (kernels/conv.cu).
struct Moments {
    float n, mean, m2;
};

// Chan et al.: the moments of the union of two disjoint sets.
MCDM_DEV Moments merge_moments(Moments a, Moments b) {
    if (b.n == 0.0f) return a;
    if (a.n == 0.0f) return b;
    const float n = a.n + b.n;
    const float delta = b.mean - a.mean;
    const float wb = b.n / n;
    Moments r;
    r.n = n;
    r.mean = a.mean + delta * wb;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * wb;
    return r;
}

MCDM_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

MCDM_DEV float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` is __shared__ float[32]. Contains __syncthreads: call from all threads.
MCDM_DEV float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(r);  // every warp reduces the same 32 values in the same order
}

MCDM_DEV float silu_f(float v) { return v / (1.0f + expf(-v)); }

// Eight consecutive elements moved as one 16-byte access (two for f32): the address must be
// 16-byte aligned.
template <typename T>
struct alignas(16) Pack8 {
    T v[8];
};

// Global linear index of this thread for the 1-D elementwise launches (grid ceil(len/256)).
MCDM_DEV long long global_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }

// ---------------------------------------------------------------------------------------------
// Counter-based noise, identical to src/rng.rs (read its module docs). Every constant is given
// by its f32 bit pattern (the decimal of src/rng.rs in the comment), every rounding explicitly.

#define MCDM_PHILOX_M0 0xD2511F53u
#define MCDM_PHILOX_M1 0xCD9E8D57u
#define MCDM_PHILOX_W0 0x9E3779B9u
#define MCDM_PHILOX_W1 0xBB67AE85u

struct Philox4 {
    unsigned w[4];
};

// Philox4x32-10: c = counter, k = key; the key is bumped between rounds, not before the first.
// Round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2, c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0).
MCDM_DEV Philox4 philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3, unsigned k0,
                               unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += MCDM_PHILOX_W0;
            k1 += MCDM_PHILOX_W1;
        }
        const unsigned hi0 = __umulhi(MCDM_PHILOX_M0, c0), lo0 = MCDM_PHILOX_M0 * c0;
        const unsigned hi1 = __umulhi(MCDM_PHILOX_M1, c2), lo1 = MCDM_PHILOX_M1 * c2;
        const unsigned n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
    }
    Philox4 r;
    r.w[0] = c0;
    r.w[1] = c1;
    r.w[2] = c2;
    r.w[3] = c3;
    return r;
}

// rng::ln: natural log of a positive, finite, normal f32 (Cephes logf polynomial with FMA).
MCDM_DEV float mcdm_ln(float x) {
    const unsigned bits = __float_as_uint(x);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > __uint_as_float(0x3FB504F3u) /* SQRT_2 */) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float f = __fsub_rn(m, 1.0f);
    const float z = __fmul_rn(f, f);
    float p = __uint_as_float(0x3D9021BBu);            //  0.070376836
    p = __fmaf_rn(p, f, __uint_as_float(0xBDEBD1B8u));  // -0.1151461
    p = __fmaf_rn(p, f, __uint_as_float(0x3DEF251Bu));  //  0.11676999
    p = __fmaf_rn(p, f, __uint_as_float(0xBDFE5D4Fu));  // -0.12420141
    p = __fmaf_rn(p, f, __uint_as_float(0x3E11E9BFu));  //  0.14249323
    p = __fmaf_rn(p, f, __uint_as_float(0xBE2AAE50u));  // -0.16668057
    p = __fmaf_rn(p, f, __uint_as_float(0x3E4CCEADu));  //  0.20000716
    p = __fmaf_rn(p, f, __uint_as_float(0xBE7FFFFCu));  // -0.24999994
    p = __fmaf_rn(p, f, __uint_as_float(0x3EAAAAAAu));  //  0.3333333
    const float ef = (float)e;  // exact
    float y = __fmul_rn(__fmul_rn(f, z), p);
    y = __fmaf_rn(ef, __uint_as_float(0xB95E8083u) /* -2.1219444e-4 */, y);
    y = __fmaf_rn(-0.5f, z, y);
    const float r = __fadd_rn(f, y);
    return __fmaf_rn(ef, __uint_as_float(0x3F318000u) /* 355/512 */, r);
}

// rng::sincos_2pi: (sin 2 pi v, cos 2 pi v), reduction in turns: 4v = q + r, q integer (ties to
// even), |r| <= 1/2, Taylor polynomials of sin/cos(pi/2 r), quadrant swap by q & 3.
MCDM_DEV void mcdm_sincos_2pi(float v, float* sin_out, float* cos_out) {
    const float t = __fmul_rn(v, 4.0f);
    const float q = rintf(t);  // round half to even, like f32::round_ties_even
    const float r = __fsub_rn(t, q);
    const float r2 = __fmul_rn(r, r);
    float s = __uint_as_float(0x33747A1Bu);              //  5.692173e-8
    s = __fmaf_rn(s, r2, __uint_as_float(0xB67183A8u));  // -3.5988433e-6
    s = __fmaf_rn(s, r2, __uint_as_float(0x39283C1Au));  //  1.6044118e-4
    s = __fmaf_rn(s, r2, __uint_as_float(0xBB996966u));  // -0.004681754
    s = __fmaf_rn(s, r2, __uint_as_float(0x3DA335E3u));  //  0.079692625
    s = __fmaf_rn(s, r2, __uint_as_float(0xBF255DE7u));  // -0.6459641
    s = __fmaf_rn(s, r2, __uint_as_float(0x3FC90FDBu));  //  FRAC_PI_2
    s = __fmul_rn(s, r);
    float c = __uint_as_float(0x34FCE9C6u);              //  4.710875e-7
    c = __fmaf_rn(c, r2, __uint_as_float(0xB7D368F9u));  // -2.5202042e-5
    c = __fmaf_rn(c, r2, __uint_as_float(0x3A70FA83u));  //  9.1926026e-4
    c = __fmaf_rn(c, r2, __uint_as_float(0xBCAAE9E4u));  // -0.02086348
    c = __fmaf_rn(c, r2, __uint_as_float(0x3E81E0F8u));  //  0.2536695
    c = __fmaf_rn(c, r2, __uint_as_float(0xBF9DE9E7u));  // -1.2337006
    c = __fmaf_rn(c, r2, 1.0f);
    switch ((int)((long long)q & 3)) {  // (q as i64) & 3
        case 0: *sin_out = s; *cos_out = c; break;
        case 1: *sin_out = c; *cos_out = -s; break;
        case 2: *sin_out = -s; *cos_out = -c; break;
        default: *sin_out = -c; *cos_out = s; break;
    }
}

// rng::box_muller: u = ((a >> 8) + 1) 2^-24 in (0, 1], v = (b >> 8) 2^-24 in [0, 1),
// r = sqrt(-2 ln u), normals (r cos 2 pi v, r sin 2 pi v).
MCDM_DEV void mcdm_box_muller(unsigned a, unsigned b, float* n0, float* n1) {
    const float two_pow_m24 = __uint_as_float(0x33800000u);
    const float u = __fmul_rn((float)((a >> 8) + 1u), two_pow_m24);  // int -> f32 exact (<= 2^24)
    const float v = __fmul_rn((float)(b >> 8), two_pow_m24);
    const float r = __fsqrt_rn(__fmul_rn(-2.0f, mcdm_ln(u)));
    float s, c;
    mcdm_sincos_2pi(v, &s, &c);
    *n0 = __fmul_rn(r, c);
    *n1 = __fmul_rn(r, s);
}

// The standard normal of element `e` (NCHW index within one image) of `image` at `step`:
// Philox block counter [e / 4, image, step, 0], key [seed_lo, seed_hi], normal e % 4, where
// words (w0, w1) give normals 0 and 1 and (w2, w3) give normals 2 and 3 (rng::normals4).
// Only the needed Box-Muller pair is evaluated; the value is the same.
MCDM_DEV float mcdm_normal(unsigned long long e, unsigned image, unsigned step, unsigned seed_lo,
                           unsigned seed_hi) {
    const Philox4 w = philox4x32_10((unsigned)(e >> 2), image, step, 0u, seed_lo, seed_hi);
    const unsigned lane = (unsigned)(e & 3ull);
    float n0, n1;
    if (lane < 2) {
        mcdm_box_muller(w.w[0], w.w[1], &n0, &n1);
    } else {
        mcdm_box_muller(w.w[2], w.w[3], &n0, &n1);
    }
    return (lane & 1u) ? n1 : n0;
}

// ---------------------------------------------------------------------------------------------
// Parameters of the fused step kernel (step.cu), one spaced step `i` of src/diffusion/step.rs.
// Mirror it in Rust with #[repr(C)] and the same field order; every field is 4 bytes, so there
// is no padding (size 72 bytes). Passed by value as a kernel argument.
//
// How each field is computed on the host (f64 tables -> `as f32`, then f32 arithmetic exactly
// as ddim_step / ddpm_step do it):
//   mode           0 = DDIM (ddim_step), 1 = DDPM (ddpm_step)
//   predict_xstart 1 when the model predicts x_0 (ModelMeanType::StartX), 0 for eps (Epsilon)
//   clip           1 when clip_denoised: the predicted x_0 is clamped to [-1, 1]
//   add_noise      1 when this step adds noise: DDIM `i > 0 && sigma != 0.0`, DDPM `i > 0`
//   sqrt_recip     tables.sqrt_recip_alphas_cumprod[i] as f32
//   sqrt_recipm1   tables.sqrt_recipm1_alphas_cumprod[i] as f32
//   -- DDIM (mode 0; ignored by DDPM) --
//   sqrt_alpha_bar_prev  (tables.alphas_cumprod_prev[i] as f32).sqrt()
//   eps_coef       (1.0 - alpha_bar_prev - sigma * sigma).sqrt()  (all f32, as in ddim_step)
//   sigma          eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt()
//                      * (1.0 - alpha_bar / alpha_bar_prev).sqrt()  (f32, as in ddim_step)
//   -- DDPM (mode 1; ignored by DDIM) --
//   coef1          tables.posterior_mean_coef1[i] as f32
//   coef2          tables.posterior_mean_coef2[i] as f32
//   noise_std      fixed variances (var == NULL): (0.5 * log_var as f32).exp() with log_var the
//                  f64 of ddpm_step (posterior_log_variance_clipped[i]; or for fixed large
//                  betas[i].ln(), posterior_variance[1].ln() at i == 0)
//   min_log        learned range (var != NULL): tables.posterior_log_variance_clipped[i] as f32
//   max_log        learned range: tables.betas[i].ln() as f32
//   -- noise --
//   seed_lo        seed as u32
//   seed_hi        (seed >> 32) as u32
//   step           the Philox `step` word of this step's noise (what the CPU passes to
//                  rng::fill_normals for it)
//   reserved       0 (keeps the size a multiple of 8)
struct StepParams {
    int mode;
    int predict_xstart;
    int clip;
    int add_noise;
    float sqrt_recip;
    float sqrt_recipm1;
    float sqrt_alpha_bar_prev;
    float eps_coef;
    float sigma;
    float coef1;
    float coef2;
    float noise_std;
    float min_log;
    float max_log;
    unsigned seed_lo;
    unsigned seed_hi;
    unsigned step;
    unsigned reserved;
    // Mode 2, the multistep solvers (src/diffusion/solver.rs): xc = corrector ? ca last + c0 x0 +
    // c1 h1 + c2 h2 : x; x' = pa xc + p0 x0 + p1 h1 + p2 h2.
    int corrector;
    float ca, c0, c1, c2;
    float pa, p0, p1, p2;
    unsigned reserved2;
};
