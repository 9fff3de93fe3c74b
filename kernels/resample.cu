// Nearest x2 upsampling, 2x2 average pooling, channel concatenation and per-image channel bias,
// NHWC, storage T in {float, __half, __nv_bfloat16}. CPU references: src/ops/resample.rs.
//
// Launch (every kernel here): grid ceil(outputs / V / 256), block 256, `outputs` = the element
// count of the written tensor. With `vec` != 0 (the host sets it when every channel count is a
// multiple of 8 and every tensor 16-byte aligned) a thread moves V = 8 consecutive channels of
// one pixel in 16-byte accesses (Pack8); else V = 1 element. Either way the index arithmetic
// (64-bit divisions) is done once per thread.
#include "common.cuh"

// upsample2x, avgpool2x: x [n, h, w, c] -> y.
#define ResampleArgs_FIELDS(F)                                                                      \
    F(const void* __restrict__, x) F(void* __restrict__, y) F(int, n) F(int, h) F(int, w) F(int, c) \
    F(int, vec)
MCDM_ARGS(ResampleArgs)
#define ConcatArgs_FIELDS(F)                                                                        \
    F(const void* __restrict__, a) F(const void* __restrict__, b) F(void* __restrict__, y)          \
    F(int, n) F(int, hw) F(int, ca) F(int, cb) F(int, vec)
MCDM_ARGS(ConcatArgs)
#define BiasArgs_FIELDS(F)                                                                          \
    F(void* __restrict__, x) F(const float* __restrict__, bias) F(int, n) F(int, hw) F(int, c)      \
    F(int, vec)
MCDM_ARGS(BiasArgs)

#define RESAMPLE_THREADS 256
// Channels a thread moves with `vec`.
#define RESAMPLE_VEC 8

// x [n, h, w, c] -> y [n, 2h, 2w, c]: y[b, yo, xo, ch] = x[b, yo/2, xo/2, ch].
template <typename T>
MCDM_DEV void upsample2x(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c, int vec) {
    const long long i = global_index() * (vec ? 8 : 1);
    const long long total = (long long)n * (2 * h) * (2 * w) * c;
    if (i >= total) return;
    // i = ((b * 2h + yo) * 2w + xo) * c + ch
    const int ch = (int)(i % c);
    long long rest = i / c;
    const int xo = (int)(rest % (2 * w));
    rest /= (2 * w);
    const int yo = (int)(rest % (2 * h));
    const long long b = rest / (2 * h);
    const long long src = ((b * h + yo / 2) * w + xo / 2) * c + ch;
    if (vec) *reinterpret_cast<Pack8<T>*>(y + i) = *reinterpret_cast<const Pack8<T>*>(x + src);
    else y[i] = x[src];
}

// x [n, h, w, c] -> y [n, h/2, w/2, c] (h, w even; an odd last row/column is dropped):
// y = (x[2yo, 2xo] + x[2yo, 2xo+1] + x[2yo+1, 2xo] + x[2yo+1, 2xo+1]) * 0.25, summed in f32 in
// that order, as the CPU does.
template <typename T>
MCDM_DEV T pool4(T a, T b, T c, T d) {
    float s = to_float(a) + to_float(b);
    s = s + to_float(c);
    s = s + to_float(d);
    return from_float<T>(s * 0.25f);
}
template <typename T>
MCDM_DEV void avgpool2x(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c, int vec) {
    const int ho = h / 2, wo = w / 2;
    const long long i = global_index() * (vec ? 8 : 1);
    const long long total = (long long)n * ho * wo * c;
    if (i >= total) return;
    // i = ((b * ho + yo) * wo + xo) * c + ch
    const int ch = (int)(i % c);
    long long rest = i / c;
    const int xo = (int)(rest % wo);
    rest /= wo;
    const int yo = (int)(rest % ho);
    const long long b = rest / ho;
    const long long r0 = ((b * h + 2 * yo) * w + 2 * xo) * c + ch;  // x[b, 2yo, 2xo, ch]
    const long long r1 = r0 + (long long)w * c;                     // x[b, 2yo+1, 2xo, ch]
    if (vec) {
        const Pack8<T> p00 = *reinterpret_cast<const Pack8<T>*>(x + r0);
        const Pack8<T> p01 = *reinterpret_cast<const Pack8<T>*>(x + r0 + c);
        const Pack8<T> p10 = *reinterpret_cast<const Pack8<T>*>(x + r1);
        const Pack8<T> p11 = *reinterpret_cast<const Pack8<T>*>(x + r1 + c);
        Pack8<T> out;
#pragma unroll
        for (int e = 0; e < 8; ++e) out.v[e] = pool4(p00.v[e], p01.v[e], p10.v[e], p11.v[e]);
        *reinterpret_cast<Pack8<T>*>(y + i) = out;
    } else {
        y[i] = pool4(x[r0], x[r0 + c], x[r1], x[r1 + c]);
    }
}

// a [n, hw, ca], b [n, hw, cb] -> y [n, hw, ca + cb] (a's channels first, as torch.cat([h, skip])).
// With vec, ca % 8 == 0: a thread's eight channels all come from a or all from b.
template <typename T>
MCDM_DEV void concat_channels(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                              int n, int hw, int ca, int cb, int vec) {
    const int cy = ca + cb;
    const long long i = global_index() * (vec ? 8 : 1);
    const long long total = (long long)n * hw * cy;
    if (i >= total) return;
    const int ch = (int)(i % cy);
    const long long p = i / cy;  // pixel index over n * hw
    const T* src = ch < ca ? a + p * ca + ch : b + p * cb + (ch - ca);
    if (vec) *reinterpret_cast<Pack8<T>*>(y + i) = *reinterpret_cast<const Pack8<T>*>(src);
    else y[i] = *src;
}

// x [n, hw, c] += bias[b, c] (f32 [n, c]: one bias vector per image, e.g. the time embedding
// projection without scale-shift).
template <typename T>
MCDM_DEV void add_channel_bias(T* __restrict__ x, const float* __restrict__ bias, int n, int hw, int c, int vec) {
    const long long i = global_index() * (vec ? 8 : 1);
    const long long total = (long long)n * hw * c;
    if (i >= total) return;
    const int ch = (int)(i % c);
    const float* bias_b = bias + (i / ((long long)hw * c)) * c + ch;
    if (vec) {
        Pack8<T> v = *reinterpret_cast<const Pack8<T>*>(x + i);
#pragma unroll
        for (int e = 0; e < 8; ++e) v.v[e] = from_float<T>(to_float(v.v[e]) + bias_b[e]);
        *reinterpret_cast<Pack8<T>*>(x + i) = v;
    } else {
        x[i] = from_float<T>(to_float(x[i]) + bias_b[0]);
    }
}

#define MCDM_RESAMPLE(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(RESAMPLE_THREADS)                                  \
        upsample2x_##SUFFIX(MCDM_PARAMS(ResampleArgs)) {                                            \
        upsample2x<T>((const T*)x, (T*)y, n, h, w, c, vec);                                         \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(RESAMPLE_THREADS)                                  \
        avgpool2x_##SUFFIX(MCDM_PARAMS(ResampleArgs)) {                                             \
        avgpool2x<T>((const T*)x, (T*)y, n, h, w, c, vec);                                          \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(RESAMPLE_THREADS)                                  \
        concat_channels_##SUFFIX(MCDM_PARAMS(ConcatArgs)) {                                         \
        concat_channels<T>((const T*)a, (const T*)b, (T*)y, n, hw, ca, cb, vec);                    \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(RESAMPLE_THREADS)                                  \
        add_channel_bias_##SUFFIX(MCDM_PARAMS(BiasArgs)) {                                          \
        add_channel_bias<T>((T*)x, bias, n, hw, c, vec);                                            \
    }

MCDM_RESAMPLE(f32, float)
MCDM_RESAMPLE(f16, __half)
MCDM_RESAMPLE(bf16, __nv_bfloat16)
