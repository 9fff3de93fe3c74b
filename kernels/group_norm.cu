// GroupNorm(32 groups, eps 1e-5) over NHWC activations, in two kernels: statistics per
// (image, group), then the elementwise affine map fused with the optional scale-shift of
// use_scale_shift_norm and SiLU. Storage T in {float, __half, __nv_bfloat16}, f32 math.
// CPU reference: src/ops/group_norm.rs (which accumulates in f64; here two f32 passes).
#include "common.cuh"

#define GN_GROUPS 32
#define GN_EPS 1e-5f

// x [n, hw, c] (c % 32 == 0) -> stats f32 [n, 32, 2]: stats[(b*32 + g)*2 + 0] = mean,
// stats[(b*32 + g)*2 + 1] = rstd = 1 / sqrt(var + 1e-5), over the hw * (c/32) values of group g
// (channels g*cg .. g*cg + cg - 1 of every pixel of image b), biased variance.
// Two passes (mean, then the mean of squared deviations), each thread summing a fixed strided
// subset in order and a fixed reduction tree: deterministic.
// Launch: grid (32, n), block 256.
template <typename T>
MCDM_DEV void group_norm_stats(const T* __restrict__ x, float* __restrict__ stats, int n, int hw, int c) {
    __shared__ float scratch[32];
    const int g = blockIdx.x, b = blockIdx.y;
    if (g >= GN_GROUPS || b >= n) return;  // uniform per block
    const int cg = c / GN_GROUPS;
    const int count = hw * cg;  // values per group (< 2^31)
    // Value j (0 <= j < count) of the group: pixel j / cg, channel g*cg + j % cg, at
    // x[(b*hw + pixel) * c + g*cg + j % cg]; consecutive threads read consecutive channels.
    const T* base = x + (long long)b * hw * c + (long long)g * cg;
    float s = 0.0f;
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
        s += to_float(base[(long long)(j / cg) * c + (j % cg)]);
    }
    const float mean = block_sum(s, scratch) / (float)count;
    float q = 0.0f;
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
        const float d = to_float(base[(long long)(j / cg) * c + (j % cg)]) - mean;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / (float)count;
    if (threadIdx.x == 0) {
        stats[((long long)b * GN_GROUPS + g) * 2 + 0] = mean;
        stats[((long long)b * GN_GROUPS + g) * 2 + 1] = 1.0f / sqrtf(var + GN_EPS);
    }
}

// y [n, hw, c] = (x - mean) * rstd * gamma + beta with the group statistics of
// group_norm_stats; then, when scale_shift != NULL (f32 [n, 2c]: scale = [b, 0..c),
// shift = [b, c..2c), i.e. chunk(emb_out, 2)), y = y * (1 + scale) + shift; then y = SiLU(y) when
// silu != 0. gamma / beta f32 [c] (NULL: 1 / 0). y may alias x.
// Launch: grid ceil(n*hw*c / 256), block 256, one element per thread.
template <typename T>
MCDM_DEV void group_norm_apply(const T* x, const float* __restrict__ stats, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ scale_shift, T* y,
                               int n, int hw, int c, int silu) {
    const long long i = global_index();
    const long long total = (long long)n * hw * c;
    if (i >= total) return;
    // i = (b * hw + pixel) * c + ch
    const int ch = (int)(i % c);
    const long long b = i / ((long long)hw * c);
    const int g = ch / (c / GN_GROUPS);
    const float mean = stats[(b * GN_GROUPS + g) * 2 + 0];
    const float rstd = stats[(b * GN_GROUPS + g) * 2 + 1];
    float v = (to_float(x[i]) - mean) * rstd;
    v = v * (gamma != nullptr ? gamma[ch] : 1.0f) + (beta != nullptr ? beta[ch] : 0.0f);
    if (scale_shift != nullptr) {
        const float scale = scale_shift[b * 2 * c + ch];
        const float shift = scale_shift[b * 2 * c + c + ch];
        v = v * (1.0f + scale) + shift;
    }
    if (silu) v = silu_f(v);
    y[i] = from_float<T>(v);
}

#define MCDM_GROUP_NORM(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        group_norm_stats_##SUFFIX(const T* __restrict__ x, float* __restrict__ stats, int n, int hw, \
                                  int c) {                                                          \
        group_norm_stats<T>(x, stats, n, hw, c);                                                    \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) group_norm_apply_##SUFFIX(                     \
        const T* x, const float* __restrict__ stats, const float* __restrict__ gamma,                \
        const float* __restrict__ beta, const float* __restrict__ scale_shift, T* y, int n, int hw,  \
        int c, int silu) {                                                                          \
        group_norm_apply<T>(x, stats, gamma, beta, scale_shift, y, n, hw, c, silu);                 \
    }

MCDM_GROUP_NORM(f32, float)
MCDM_GROUP_NORM(f16, __half)
MCDM_GROUP_NORM(bf16, __nv_bfloat16)
