// GroupNorm(the model's groups, 32 in guided-diffusion, and eps) over NHWC activations: statistics per
// (image, group) in two kernels, then the elementwise affine map fused with the optional scale-shift of
// use_scale_shift_norm and SiLU. Storage T in {float, __half, __nv_bfloat16}, f32 math.
// CPU reference: src/ops/group_norm.rs (which accumulates in f64).
// Every kernel that reads x takes it as one tensor, or as the channel concatenation of two (the
// decoder's skip, normalised without being copied first): x2 NULL, or x holds channels
// 0 .. c1-1 ([n, hw, c1]) and x2 channels c1 .. c-1 ([n, hw, c - c1]); c1 % 8 == 0, x2 16-byte
// aligned.
#include "common.cuh"

// The arguments of each kernel, described below with it.
#define GroupNormStatsArgs_FIELDS(F)                                                                \
    F(const void* __restrict__, x) F(float* __restrict__, part) F(int, hw) F(int, c) F(int, rows)     \
    F(const void* __restrict__, x2) F(int, c1) F(int, groups) F(int, group_channels)
MCDM_ARGS(GroupNormStatsArgs)
#define GroupNormMergeArgs_FIELDS(F)                                                                \
    F(const float* __restrict__, part) F(float* __restrict__, stats) F(int, chunks) F(float, eps)   \
    F(int, groups)
MCDM_ARGS(GroupNormMergeArgs)
#define GroupNormMergeChannelsArgs_FIELDS(F)                                                        \
    F(const float* __restrict__, part) F(int, chunks) F(int, c1) F(const float* __restrict__, part2) \
    F(int, chunks2) F(int, c) F(float* __restrict__, stats) F(float, eps) F(int, groups)             \
    F(int, group_channels)
MCDM_ARGS(GroupNormMergeChannelsArgs)
#define GroupNormApplyArgs_FIELDS(F)                                                                \
    F(const void*, x) F(const float* __restrict__, stats) F(const float* __restrict__, gamma)       \
    F(const float* __restrict__, beta) F(const float* __restrict__, scale_shift) F(void*, y)        \
    F(int, hw) F(int, c) F(int, silu) F(const void*, x2) F(int, c1) F(int, groups)                  \
    F(int, group_channels)
MCDM_ARGS(GroupNormApplyArgs)
#define GroupNormApplyPoolArgs_FIELDS(F)                                                            \
    F(const void* __restrict__, x) F(const float* __restrict__, stats)                              \
    F(const float* __restrict__, gamma) F(const float* __restrict__, beta) F(void* __restrict__, y)  \
    F(int, h) F(int, w) F(int, c) F(int, silu) F(int, groups) F(int, group_channels)
MCDM_ARGS(GroupNormApplyPoolArgs)
#define GroupNormChannelAffineArgs_FIELDS(F)                                                       \
    F(const float* __restrict__, stats) F(const float* __restrict__, gamma)                          \
    F(const float* __restrict__, beta) F(const float* __restrict__, scale_shift)                     \
    F(float* __restrict__, table) F(int, c) F(int, groups) F(int, group_channels)
MCDM_ARGS(GroupNormChannelAffineArgs)

// Statistics in two kernels, both deterministic (fixed partition, fixed merge order):
//
// group_norm_partial: x [n, hw, c] (c % 8 == 0, c % groups == 0, c <= 2048, groups <= 256) ->
//   part f32 [n, chunks, groups, 3] (group_channels = c / groups):
//   (count, mean, M2) of each group over the pixels [chunk*rows, chunk*rows + rows) of image b.
//   Launch: grid (chunks = ceil(hw / rows), n), block 256. Thread t owns the eight channels
//   8*(t % L) .. +7 (L = c / 8 threads span a pixel row, one 16-byte load each for 16-bit T) of
//   rows t / L, t / L + R, ... (R = 256 / L rows in parallel), so a warp reads whole rows and
//   every thread keeps several wide loads in flight. Each thread sums deviations from the first
//   value it reads (shifted sums, no cancellation when |mean| >> std), then thread g < groups
//   merges the (count, mean, M2) of its group's channels with Chan's formula.
// group_norm_merge: part -> stats f32 [n, groups, 2] (mean, rstd = 1 / sqrt(var + eps), biased
//   variance), merging the chunks of (b, g). Launch: grid (groups, n), block 128.
#define GN_THREADS 256
#define GN_MAX_CHANNELS 2048
#define GN_MERGE_THREADS 128
#define GN_VEC 8  // channels per thread and access

// The stride between pixels of channel ch of one image: in x, or in x2 past x's c1 channels
// (x2 NULL: all in x).
MCDM_DEV int gn_stride(const void* x2, int c, int c1, int ch) {
    return x2 == nullptr ? c : (ch < c1 ? c1 : c - c1);
}

// Channel ch (the first of eight, ch % 8 == 0) of pixel 0 of image b: see gn_stride.
template <typename T>
MCDM_DEV const T* gn_at(const T* x, const T* x2, int hw, int c, int c1, int b, int ch) {
    const int stride = gn_stride(x2, c, c1, ch);
    const bool second = x2 != nullptr && ch >= c1;
    return (second ? x2 + (ch - c1) : x + ch) + (long long)b * hw * stride;
}

template <typename T>
MCDM_DEV void group_norm_partial(const T* __restrict__ x, const T* __restrict__ x2, float* __restrict__ part, int hw,
                                 int c, int c1, int rows, int groups, int cg) {
    __shared__ Moments slot[GN_MAX_CHANNELS];  // 24 KiB: one per (channel, parallel row)
    const int chunk = blockIdx.x, chunks = gridDim.x, b = blockIdx.y, t = threadIdx.x;
    const int p0 = chunk * rows, p1 = min(hw, p0 + rows);
    const int L = c / GN_VEC, R = GN_THREADS / L;  // R * c <= 2048 slots
    if (t < R * L) {
        const int ch0 = (t % L) * GN_VEC, r0 = p0 + t / L;
        const T* src = gn_at(x, x2, hw, c, c1, b, ch0);
        const int stride = gn_stride(x2, c, c1, ch0);
        float shift[GN_VEC], s1[GN_VEC], s2[GN_VEC], cnt = 0.0f;
        if (r0 < p1) {
            const Pack8<T> first = *reinterpret_cast<const Pack8<T>*>(src + (long long)r0 * stride);
#pragma unroll
            for (int e = 0; e < GN_VEC; ++e) {
                shift[e] = to_float(first.v[e]);
                s1[e] = s2[e] = 0.0f;
            }
            // Four loads in flight (two for f32, whose packs take twice the registers: no spills).
            const T* at = src + (long long)r0 * stride;
            const long long step = (long long)R * stride;
#pragma unroll(sizeof(T) == 4 ? 2 : 4)
            for (int p = r0; p < p1; p += R, at += step) {
                const Pack8<T> in = *reinterpret_cast<const Pack8<T>*>(at);
#pragma unroll
                for (int e = 0; e < GN_VEC; ++e) {
                    const float d = to_float(in.v[e]) - shift[e];
                    s1[e] += d;
                    s2[e] += d * d;
                }
                cnt += 1.0f;
            }
        }
        Moments* out = slot + (t / L) * c + ch0;
#pragma unroll
        for (int e = 0; e < GN_VEC; ++e)
            out[e] = cnt == 0.0f ? Moments{0.0f, 0.0f, 0.0f}
                                 : Moments{cnt, shift[e] + s1[e] / cnt, fmaxf(s2[e] - s1[e] * (s1[e] / cnt), 0.0f)};
    }
    __syncthreads();
    if (t < groups) {
        Moments m{0.0f, 0.0f, 0.0f};
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < cg; ++j) m = merge_moments(m, slot[r * c + t * cg + j]);
        float* out = part + (((long long)b * chunks + chunk) * groups + t) * 3;
        out[0] = m.n;
        out[1] = m.mean;
        out[2] = m.m2;
    }
}

// The end of both merge kernels: block (g, b) reduces its threads' moments m in a fixed tree,
// then stores group g's (mean, rstd) of image b.
MCDM_DEV void gn_store_group_stats(Moments m, float* __restrict__ stats, float eps, int groups) {
    __shared__ Moments tree[GN_MERGE_THREADS];
    const int g = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
    tree[t] = m;
    __syncthreads();
    for (int half = GN_MERGE_THREADS / 2; half > 0; half >>= 1) {
        if (t < half) tree[t] = merge_moments(tree[t], tree[t + half]);
        __syncthreads();
    }
    if (t == 0) {
        const Moments r = tree[0];
        stats[((long long)b * groups + g) * 2 + 0] = r.mean;
        stats[((long long)b * groups + g) * 2 + 1] = 1.0f / sqrtf(r.m2 / r.n + eps);
    }
}

MCDM_DEV void group_norm_merge_chunks(const float* __restrict__ part, float* __restrict__ stats, int chunks,
                                      float eps, int groups) {
    const int g = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
    Moments m{0.0f, 0.0f, 0.0f};
    for (int k = t; k < chunks; k += GN_MERGE_THREADS) {
        const float* p = part + (((long long)b * chunks + k) * groups + g) * 3;
        m = merge_moments(m, Moments{p[0], p[1], p[2]});
    }
    gn_store_group_stats(m, stats, eps, groups);
}

// group_norm_merge_channels: the statistics (as group_norm_merge's) from per-channel moments
//   that the convs producing x made in their epilogues (kernels/conv.cu's `moments`): part f32
//   [n, chunks, c1, 3] for channels 0 .. c1-1, and, when x is a concatenation, part2 f32
//   [n, chunks2, c - c1, 3] for the others (part2 NULL: c1 == c). Group g of image b merges the
//   (chunk, channel) items of its channels, those of part first, in a fixed order.
//   Launch: grid (groups, n), block 128.
MCDM_DEV void group_norm_merge_channel_moments(const float* __restrict__ part, int chunks, int c1,
                                               const float* __restrict__ part2, int chunks2, int c,
                                               float* __restrict__ stats, float eps, int groups, int cg) {
    const int g = blockIdx.x, b = blockIdx.y, t = threadIdx.x;
    // The group's channels [lo, hi): [lo, mid) from part, [mid, hi) from part2.
    const int lo = g * cg, hi = lo + cg, mid = max(lo, min(hi, c1));
    const int na = mid - lo, nb = hi - mid, items_a = chunks * na, items = items_a + chunks2 * nb;
    Moments m{0.0f, 0.0f, 0.0f};
    for (int k = t; k < items; k += GN_MERGE_THREADS) {
        const float* p;
        if (k < items_a) {
            const int chunk = k / na, ch = lo + (k - chunk * na);
            p = part + (((long long)b * chunks + chunk) * c1 + ch) * 3;
        } else {
            const int k2 = k - items_a, chunk = k2 / nb, ch = mid + (k2 - chunk * nb);
            p = part2 + (((long long)b * chunks2 + chunk) * (c - c1) + (ch - c1)) * 3;
        }
        m = merge_moments(m, Moments{p[0], p[1], p[2]});
    }
    gn_store_group_stats(m, stats, eps, groups);
}

// y [n, hw, c] = (x - mean) * rstd * gamma + beta with the group statistics of
// group_norm_merge; then, when scale_shift != NULL (f32 [n, 2c]: scale = [b, 0..c),
// shift = [b, c..2c), i.e. chunk(emb_out, 2)), y = y * (1 + scale) + shift; then y = SiLU(y) when
// silu != 0. gamma / beta f32 [c] (NULL: 1 / 0). Each block first folds these into
// y = (x - mean[ch]) * mul[ch] + add[ch] for every channel of its image (shared memory: no
// division or parameter load per element), while each thread's GN_APPLY_ITERS packs of eight
// channels are loading; all are loaded before any is stored: y may alias x (a thread writes
// only what it read) when x2 is NULL.
// group_channels = c / groups, given so that the kernel does not divide while its loads are in
// flight (64 registers at most, for 4 blocks per SM). x and y 16-byte aligned (pool buffers are).
// Launch: grid (ceil(hw*c / (256 * 8 * GN_APPLY_ITERS)), n), block 256.
#define GN_APPLY_THREADS 256
#define GN_APPLY_ITERS 4

template <typename T>
MCDM_DEV void group_norm_apply(const T* x, const T* x2, const float* __restrict__ stats,
                               const float* __restrict__ gamma, const float* __restrict__ beta,
                               const float* __restrict__ scale_shift, T* y, int hw, int c, int c1, int silu,
                               int groups, int cg) {
    __shared__ float ch_mean[GN_MAX_CHANNELS];  // 3 x 8 KiB
    __shared__ float ch_mul[GN_MAX_CHANNELS];
    __shared__ float ch_add[GN_MAX_CHANNELS];
    const int b = blockIdx.y, t = threadIdx.x;
    // This thread's packs first: their loads are in flight while the table is built.
    const long long per_image = (long long)hw * c;
    const long long first = (long long)blockIdx.x * GN_APPLY_ITERS * GN_APPLY_THREADS * GN_VEC + t * GN_VEC;
    const long long base = (long long)b * per_image;
    Pack8<T> in[GN_APPLY_ITERS];
#pragma unroll
    for (int it = 0; it < GN_APPLY_ITERS; ++it) {
        const long long j = first + (long long)it * GN_APPLY_THREADS * GN_VEC;
        if (j < per_image) {
            if (x2 == nullptr) {
                in[it] = *reinterpret_cast<const Pack8<T>*>(x + base + j);
            } else {
                // One image's index fits in 32 bits (the launcher checks): a 32-bit division.
                const int p = (int)j / c, ch0 = (int)j - p * c;
                const T* src = gn_at(x, x2, hw, c, c1, b, ch0);
                in[it] = *reinterpret_cast<const Pack8<T>*>(src + (long long)p * gn_stride(x2, c, c1, ch0));
            }
        }
    }
    for (int ch = t; ch < c; ch += GN_APPLY_THREADS) {
        const float* st = stats + ((long long)b * groups + ch / cg) * 2;
        float mul = st[1] * (gamma != nullptr ? gamma[ch] : 1.0f);
        float add = beta != nullptr ? beta[ch] : 0.0f;
        if (scale_shift != nullptr) {
            const float* ss = scale_shift + (long long)b * 2 * c;
            mul *= 1.0f + ss[ch];
            add = add * (1.0f + ss[ch]) + ss[c + ch];
        }
        ch_mean[ch] = st[0];
        ch_mul[ch] = mul;
        ch_add[ch] = add;
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < GN_APPLY_ITERS; ++it) {
        const long long j = first + (long long)it * GN_APPLY_THREADS * GN_VEC;
        if (j >= per_image) break;
        const int ch0 = (int)(j % c);
        Pack8<T> out;
#pragma unroll
        for (int e = 0; e < GN_VEC; ++e) {
            float v = (to_float(in[it].v[e]) - ch_mean[ch0 + e]) * ch_mul[ch0 + e] + ch_add[ch0 + e];
            if (silu) v = silu_f(v);
            out.v[e] = from_float<T>(v);
        }
        *reinterpret_cast<Pack8<T>*>(y + base + j) = out;
    }
}

// group_norm_channel_affine: the norm as one affine map per image and channel, for a conv that
//   applies it as it reads its input (kernels/conv.cu's `norm`): table f32 [n, c, 2] = (mul, add)
//   with group_norm_apply's y = x * mul + add before the SiLU, i.e. mul = rstd * gamma *
//   (1 + scale), add = (beta - mean * rstd * gamma) * (1 + scale) + shift (stats, gamma, beta and
//   scale_shift as group_norm_apply takes them). Launch: grid (ceil(c / 128), n), block 128.
#define GN_AFFINE_THREADS 128

MCDM_DEV void group_norm_channel_affine_table(const float* __restrict__ stats, const float* __restrict__ gamma,
                                              const float* __restrict__ beta, const float* __restrict__ scale_shift,
                                              float* __restrict__ table, int c, int groups, int cg) {
    const int b = blockIdx.y, ch = blockIdx.x * GN_AFFINE_THREADS + threadIdx.x;
    if (ch >= c) return;
    const float* st = stats + ((long long)b * groups + ch / cg) * 2;
    float mul = st[1] * (gamma != nullptr ? gamma[ch] : 1.0f);
    float add = (beta != nullptr ? beta[ch] : 0.0f) - st[0] * mul;
    if (scale_shift != nullptr) {
        const float* ss = scale_shift + (long long)b * 2 * c;
        mul *= 1.0f + ss[ch];
        add = add * (1.0f + ss[ch]) + ss[c + ch];
    }
    float* out = table + ((long long)b * c + ch) * 2;
    out[0] = mul;
    out[1] = add;
}

// y [n, h/2, w/2, c] = the 2x2 mean of group_norm_apply's output (without scale-shift or a
// second source) over x [n, h, w, c], h and w even: a downsampling ResBlock's normalised branch,
// which is pooled before its conv, so the full-size result is never stored. Thread t of block
// (k, b) makes the eight channels of output element k*256*8 + 8t of image b from four 16-byte
// loads, in flight while the block builds its table as group_norm_apply does; each input value
// is normalised (and SiLU'd) in f32, then the four are averaged. x and y 16-byte aligned.
// Launch: grid (ceil((h/2)*(w/2)*c / (256 * 8)), n), block 256.
template <typename T>
MCDM_DEV void group_norm_apply_pool(const T* __restrict__ x, const float* __restrict__ stats,
                                    const float* __restrict__ gamma, const float* __restrict__ beta,
                                    T* __restrict__ y, int h, int w, int c, int silu, int groups, int cg) {
    __shared__ float ch_mean[GN_MAX_CHANNELS];
    __shared__ float ch_mul[GN_MAX_CHANNELS];
    __shared__ float ch_add[GN_MAX_CHANNELS];
    const int b = blockIdx.y, t = threadIdx.x, wo = w >> 1;
    const long long per_image = (long long)(h >> 1) * wo * c;
    const long long j = (long long)blockIdx.x * GN_APPLY_THREADS * GN_VEC + t * GN_VEC;
    const bool active = j < per_image;
    Pack8<T> in[4];
    int ch0 = 0;
    if (active) {
        // One image's index fits in 32 bits (the launcher checks).
        const int p = (int)j / c, oy = p / wo, ox = p - oy * wo;
        ch0 = (int)j - p * c;
        const T* src = x + (long long)b * h * w * c + ((long long)(2 * oy) * w + 2 * ox) * c + ch0;
        const long long down = (long long)w * c;
        in[0] = *reinterpret_cast<const Pack8<T>*>(src);
        in[1] = *reinterpret_cast<const Pack8<T>*>(src + c);
        in[2] = *reinterpret_cast<const Pack8<T>*>(src + down);
        in[3] = *reinterpret_cast<const Pack8<T>*>(src + down + c);
    }
    for (int ch = t; ch < c; ch += GN_APPLY_THREADS) {
        const float* st = stats + ((long long)b * groups + ch / cg) * 2;
        ch_mean[ch] = st[0];
        ch_mul[ch] = st[1] * (gamma != nullptr ? gamma[ch] : 1.0f);
        ch_add[ch] = beta != nullptr ? beta[ch] : 0.0f;
    }
    __syncthreads();
    if (!active) return;
    Pack8<T> out;
#pragma unroll
    for (int e = 0; e < GN_VEC; ++e) {
        float sum = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float v = (to_float(in[q].v[e]) - ch_mean[ch0 + e]) * ch_mul[ch0 + e] + ch_add[ch0 + e];
            if (silu) v = silu_f(v);
            sum += v;
        }
        out.v[e] = from_float<T>(0.25f * sum);
    }
    *reinterpret_cast<Pack8<T>*>(y + (long long)b * per_image + j) = out;
}

// The statistics kernel's bounds ask for one block per SM at least: left free to pick, ptxas
// aims for more blocks and spills the f32 variant's registers.
#define MCDM_GROUP_NORM(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(GN_THREADS, 1)                                     \
        group_norm_partial_##SUFFIX(MCDM_PARAMS(GroupNormStatsArgs)) {                              \
        group_norm_partial<T>((const T*)x, (const T*)x2, part, hw, c, c1, rows, groups,             \
                              group_channels);                                                      \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GN_APPLY_THREADS, 4)                               \
        group_norm_apply_##SUFFIX(MCDM_PARAMS(GroupNormApplyArgs)) {                                \
        group_norm_apply<T>((const T*)x, (const T*)x2, stats, gamma, beta, scale_shift, (T*)y, hw,  \
                            c, c1, silu, groups, group_channels);                                   \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GN_APPLY_THREADS, 4)                               \
        group_norm_apply_pool_##SUFFIX(MCDM_PARAMS(GroupNormApplyPoolArgs)) {                       \
        group_norm_apply_pool<T>((const T*)x, stats, gamma, beta, (T*)y, h, w, c, silu, groups,     \
                                 group_channels);                                                   \
    }

extern "C" __global__ void __launch_bounds__(GN_MERGE_THREADS) group_norm_merge(MCDM_PARAMS(GroupNormMergeArgs)) {
    group_norm_merge_chunks(part, stats, chunks, eps, groups);
}

extern "C" __global__ void __launch_bounds__(GN_MERGE_THREADS)
    group_norm_merge_channels(MCDM_PARAMS(GroupNormMergeChannelsArgs)) {
    group_norm_merge_channel_moments(part, chunks, c1, part2, chunks2, c, stats, eps, groups, group_channels);
}

extern "C" __global__ void __launch_bounds__(GN_AFFINE_THREADS)
    group_norm_channel_affine(MCDM_PARAMS(GroupNormChannelAffineArgs)) {
    group_norm_channel_affine_table(stats, gamma, beta, scale_shift, table, c, groups, group_channels);
}

MCDM_GROUP_NORM(f32, float)
MCDM_GROUP_NORM(f16, __half)
MCDM_GROUP_NORM(bf16, __nv_bfloat16)
