// GroupNorm(32 groups, eps 1e-5) over NHWC activations: statistics per (image, group) in two
// kernels, then the elementwise affine map fused with the optional scale-shift of
// use_scale_shift_norm and SiLU. Storage T in {float, __half, __nv_bfloat16}, f32 math.
// CPU reference: src/ops/group_norm.rs (which accumulates in f64).
#include "common.cuh"

#define GN_GROUPS 32
#define GN_EPS 1e-5f

// Statistics in two kernels, both deterministic (fixed partition, fixed merge order):
//
// group_norm_partial: x [n, hw, c] (c % 32 == 0, c <= 2048) -> part f32 [n, chunks, 32, 3]:
//   (count, mean, M2) of each group over the pixels [chunk*rows, chunk*rows + rows) of image b.
//   Launch: grid (chunks = ceil(hw / rows), n), block 256. Threads own channels, so a row of
//   pixels is read contiguously (coalesced): for c <= 256, R = 256 / c rows go in parallel and
//   thread t reads channel t % c of rows t / c, t / c + R, ...; for c > 256 thread t reads
//   channels t, t + 256, ... of every row. Each thread sums deviations from the first value it
//   reads (shifted sums, no cancellation when |mean| >> std), then thread g < 32 merges the
//   (count, mean, M2) of its group's channels with Chan's formula.
// group_norm_merge: part -> stats f32 [n, 32, 2] (mean, rstd = 1 / sqrt(var + 1e-5), biased
//   variance), merging the chunks of (b, g). Launch: grid (32, n), block 128.
#define GN_THREADS 256
#define GN_MAX_CHANNELS 2048
#define GN_MERGE_THREADS 128

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

template <typename T>
MCDM_DEV void group_norm_partial(const T* __restrict__ x, float* __restrict__ part, int hw, int c, int rows) {
    __shared__ Moments slot[GN_MAX_CHANNELS];  // 24 KiB: one per (channel, parallel row)
    const int chunk = blockIdx.x, chunks = gridDim.x, b = blockIdx.y, t = threadIdx.x;
    const int p0 = chunk * rows, p1 = min(hw, p0 + rows);
    const T* img = x + (long long)b * hw * c;
    // Channel ch of rows r0, r0 + dr, ... < p1: shifted sums into slot[s].
    auto moments_of = [&](int ch, int r0, int dr, int s) {
        Moments m{0.0f, 0.0f, 0.0f};
        if (r0 < p1) {
            const float shift = to_float(img[(long long)r0 * c + ch]);
            float s1 = 0.0f, s2 = 0.0f, cnt = 0.0f;
#pragma unroll 4
            for (int p = r0; p < p1; p += dr) {
                const float d = to_float(img[(long long)p * c + ch]) - shift;
                s1 += d;
                s2 += d * d;
                cnt += 1.0f;
            }
            m.n = cnt;
            m.mean = shift + s1 / cnt;
            m.m2 = fmaxf(s2 - s1 * (s1 / cnt), 0.0f);
        }
        slot[s] = m;
    };
    const int R = c <= GN_THREADS ? GN_THREADS / c : 1;  // rows in parallel
    if (c <= GN_THREADS) {
        if (t < R * c) moments_of(t % c, p0 + t / c, R, t);  // slot t = (t / c) * c + t % c
    } else {
        for (int ch = t; ch < c; ch += GN_THREADS) moments_of(ch, p0, 1, ch);
    }
    __syncthreads();
    if (t < GN_GROUPS) {
        const int cg = c / GN_GROUPS;
        Moments m{0.0f, 0.0f, 0.0f};
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < cg; ++j) m = merge_moments(m, slot[r * c + t * cg + j]);
        float* out = part + (((long long)b * chunks + chunk) * GN_GROUPS + t) * 3;
        out[0] = m.n;
        out[1] = m.mean;
        out[2] = m.m2;
    }
}

MCDM_DEV void group_norm_merge_chunks(const float* __restrict__ part, float* __restrict__ stats, int chunks) {
    __shared__ Moments tree[GN_MERGE_THREADS];
    const int g = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
    Moments m{0.0f, 0.0f, 0.0f};
    for (int k = t; k < chunks; k += GN_MERGE_THREADS) {
        const float* p = part + (((long long)b * chunks + k) * GN_GROUPS + g) * 3;
        m = merge_moments(m, Moments{p[0], p[1], p[2]});
    }
    tree[t] = m;
    __syncthreads();
    for (int half = GN_MERGE_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) tree[t] = merge_moments(tree[t], tree[t + half]);
        __syncthreads();
    }
    if (t == 0) {
        const Moments r = tree[0];
        stats[((long long)b * GN_GROUPS + g) * 2 + 0] = r.mean;
        stats[((long long)b * GN_GROUPS + g) * 2 + 1] = 1.0f / sqrtf(r.m2 / r.n + GN_EPS);
    }
}

// y [n, hw, c] = (x - mean) * rstd * gamma + beta with the group statistics of
// group_norm_merge; then, when scale_shift != NULL (f32 [n, 2c]: scale = [b, 0..c),
// shift = [b, c..2c), i.e. chunk(emb_out, 2)), y = y * (1 + scale) + shift; then y = SiLU(y) when
// silu != 0. gamma / beta f32 [c] (NULL: 1 / 0). y may alias x (each thread reads its four
// values before writing them). x and y 4-element aligned (pool buffers are).
// Launch: grid (ceil(hw*c / 1024), n), block 256: four consecutive channels of one pixel per
// thread (c % 4 == 0), moved as one 8-byte (16-bit T) or 16-byte (f32) access.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
    T v[4];
};

template <typename T>
MCDM_DEV void group_norm_apply(const T* x, const float* __restrict__ stats, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ scale_shift, T* y,
                               int hw, int c, int silu) {
    const int b = blockIdx.y;
    const int j = (blockIdx.x * blockDim.x + threadIdx.x) * 4;  // index within image b
    if (j >= hw * c) return;
    const long long i = (long long)b * hw * c + j;
    const int ch0 = j % c, cg = c / GN_GROUPS;
    const Pack4<T> in = *reinterpret_cast<const Pack4<T>*>(x + i);
    Pack4<T> out;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int ch = ch0 + e, g = ch / cg;
        const float mean = stats[(b * GN_GROUPS + g) * 2 + 0];
        const float rstd = stats[(b * GN_GROUPS + g) * 2 + 1];
        float v = (to_float(in.v[e]) - mean) * rstd;
        v = v * (gamma != nullptr ? gamma[ch] : 1.0f) + (beta != nullptr ? beta[ch] : 0.0f);
        if (scale_shift != nullptr) {
            const float* ss = scale_shift + (long long)b * 2 * c;
            v = v * (1.0f + ss[ch]) + ss[c + ch];
        }
        if (silu) v = silu_f(v);
        out.v[e] = from_float<T>(v);
    }
    *reinterpret_cast<Pack4<T>*>(y + i) = out;
}

#define MCDM_GROUP_NORM(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(GN_THREADS) group_norm_partial_##SUFFIX(            \
        const T* __restrict__ x, float* __restrict__ part, int hw, int c, int rows) {                \
        group_norm_partial<T>(x, part, hw, c, rows);                                                \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) group_norm_apply_##SUFFIX(                     \
        const T* x, const float* __restrict__ stats, const float* __restrict__ gamma,                \
        const float* __restrict__ beta, const float* __restrict__ scale_shift, T* y, int hw, int c,  \
        int silu) {                                                                                 \
        group_norm_apply<T>(x, stats, gamma, beta, scale_shift, y, hw, c, silu);                    \
    }

extern "C" __global__ void __launch_bounds__(GN_MERGE_THREADS)
    group_norm_merge(const float* __restrict__ part, float* __restrict__ stats, int chunks) {
    group_norm_merge_chunks(part, stats, chunks);
}

MCDM_GROUP_NORM(f32, float)
MCDM_GROUP_NORM(f16, __half)
MCDM_GROUP_NORM(bf16, __nv_bfloat16)
