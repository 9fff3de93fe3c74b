// Nearest x2 upsampling, 2x2 average pooling, channel concatenation and per-image channel bias,
// NHWC, storage T in {float, __half, __nv_bfloat16}. CPU references: src/ops/resample.rs.
//
// Launch (every kernel here): grid ceil(outputs / 256), block 256, one output element per
// thread, `outputs` = the element count of the written tensor.
#include "common.cuh"

// x [n, h, w, c] -> y [n, 2h, 2w, c]: y[b, yo, xo, ch] = x[b, yo/2, xo/2, ch].
template <typename T>
MCDM_DEV void upsample2x(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) {
    const long long i = global_index();
    const long long total = (long long)n * (2 * h) * (2 * w) * c;
    if (i >= total) return;
    // i = ((b * 2h + yo) * 2w + xo) * c + ch
    const int ch = (int)(i % c);
    long long rest = i / c;
    const int xo = (int)(rest % (2 * w));
    rest /= (2 * w);
    const int yo = (int)(rest % (2 * h));
    const long long b = rest / (2 * h);
    y[i] = x[((b * h + yo / 2) * w + xo / 2) * c + ch];
}

// x [n, h, w, c] -> y [n, h/2, w/2, c] (h, w even; an odd last row/column is dropped):
// y = (x[2yo, 2xo] + x[2yo, 2xo+1] + x[2yo+1, 2xo] + x[2yo+1, 2xo+1]) * 0.25, summed in f32 in
// that order, as the CPU does.
template <typename T>
MCDM_DEV void avgpool2x(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) {
    const int ho = h / 2, wo = w / 2;
    const long long i = global_index();
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
    float s = to_float(x[r0]) + to_float(x[r0 + c]);
    s = s + to_float(x[r1]);
    s = s + to_float(x[r1 + c]);
    y[i] = from_float<T>(s * 0.25f);
}

// a [n, hw, ca], b [n, hw, cb] -> y [n, hw, ca + cb] (a's channels first, as torch.cat([h, skip])).
template <typename T>
MCDM_DEV void concat_channels(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                              int n, int hw, int ca, int cb) {
    const int cy = ca + cb;
    const long long i = global_index();
    const long long total = (long long)n * hw * cy;
    if (i >= total) return;
    const int ch = (int)(i % cy);
    const long long p = i / cy;  // pixel index over n * hw
    y[i] = ch < ca ? a[p * ca + ch] : b[p * cb + (ch - ca)];
}

// x [n, hw, c] += bias[b, c] (f32 [n, c]: one bias vector per image, e.g. the time embedding
// projection without scale-shift).
template <typename T>
MCDM_DEV void add_channel_bias(T* __restrict__ x, const float* __restrict__ bias, int n, int hw, int c) {
    const long long i = global_index();
    const long long total = (long long)n * hw * c;
    if (i >= total) return;
    const int ch = (int)(i % c);
    const long long b = i / ((long long)hw * c);
    x[i] = from_float<T>(to_float(x[i]) + bias[b * c + ch]);
}

#define MCDM_RESAMPLE(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        upsample2x_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) { \
        upsample2x<T>(x, y, n, h, w, c);                                                            \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        avgpool2x_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) {  \
        avgpool2x<T>(x, y, n, h, w, c);                                                             \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) concat_channels_##SUFFIX(                      \
        const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int n, int hw, int ca,  \
        int cb) {                                                                                   \
        concat_channels<T>(a, b, y, n, hw, ca, cb);                                                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        add_channel_bias_##SUFFIX(T* __restrict__ x, const float* __restrict__ bias, int n, int hw,  \
                                  int c) {                                                          \
        add_channel_bias<T>(x, bias, n, hw, c);                                                     \
    }

MCDM_RESAMPLE(f32, float)
MCDM_RESAMPLE(f16, __half)
MCDM_RESAMPLE(bf16, __nv_bfloat16)
