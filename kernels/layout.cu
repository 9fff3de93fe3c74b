// Layout changes between the sampler's f32 NCHW images and the network's NHWC activations,
// storage T in {float, __half, __nv_bfloat16}.
//
// Launch (every kernel here): grid ceil(elements / 256), block 256 (LAYOUT_THREADS), one element
// of the written tensor per thread. Each kernel's arguments are described above it.
#include "common.cuh"

#define PackArgs_FIELDS(F)                                                                          \
    F(const float* __restrict__, x) F(const float* __restrict__, cond) F(void* __restrict__, y)     \
    F(int, cond_count) F(int, first_image) F(int, b) F(int, hw) F(int, cc)
MCDM_ARGS(PackArgs)
#define UnpackArgs_FIELDS(F)                                                                        \
    F(const void* __restrict__, y) F(float* __restrict__, eps) F(float* __restrict__, var)          \
    F(int, oc) F(int, b) F(int, hw)
MCDM_ARGS(UnpackArgs)
// nchw_to_nhwc: x f32, y storage T; nhwc_to_nchw: x storage T, y f32.
#define TransposeArgs_FIELDS(F)                                                                     \
    F(const void* __restrict__, x) F(void* __restrict__, y) F(int, n) F(int, c) F(int, hw)
MCDM_ARGS(TransposeArgs)

#define LAYOUT_THREADS 256

// x f32 NCHW [b, 3, hw] (x_t), cond f32 NCHW [cond_count, cc, hw] or NULL (zeros; cc may be 0)
// -> y NHWC [b, hw, 3 + cc] (x_t ++ condition channels, e.g. the sketch expert's 6 inputs).
// Image k of the batch takes condition item (cond_count == 1 ? 0 : first_image + k); an item
// index outside [0, cond_count) reads zeros.
template <typename T>
MCDM_DEV void pack_input(const float* __restrict__ x, const float* __restrict__ cond, int cond_count,
                         int first_image, T* __restrict__ y, int b, int hw, int cc) {
    const int cy = 3 + cc;
    const long long i = global_index();
    const long long total = (long long)b * hw * cy;
    if (i >= total) return;
    // i = (k * hw + p) * cy + ch
    const int ch = (int)(i % cy);
    const long long rest = i / cy;
    const int p = (int)(rest % hw);
    const long long k = rest / hw;
    float v = 0.0f;
    if (ch < 3) {
        v = x[(k * 3 + ch) * hw + p];
    } else if (cond != nullptr) {
        const long long item = cond_count == 1 ? 0 : (long long)first_image + k;
        if (item >= 0 && item < cond_count) v = cond[(item * cc + (ch - 3)) * hw + p];
    }
    y[i] = from_float<T>(v);
}

// y NHWC [b, hw, oc] -> eps f32 NCHW [b, 3, hw] (channels 0..3) and, when var != NULL (and
// oc >= 6), var f32 NCHW [b, 3, hw] (channels 3..6, the learned-variance output).
// Launch over b * 3 * hw elements.
template <typename T>
MCDM_DEV void unpack_output(const T* __restrict__ y, int oc, float* __restrict__ eps,
                            float* __restrict__ var, int b, int hw) {
    const long long i = global_index();
    const long long total = (long long)b * 3 * hw;
    if (i >= total) return;
    // i = (k * 3 + ch) * hw + p
    const int p = (int)(i % hw);
    const long long rest = i / hw;
    const int ch = (int)(rest % 3);
    const long long k = rest / 3;
    const long long src = (k * hw + p) * oc;
    eps[i] = to_float(y[src + ch]);
    if (var != nullptr && oc >= 6) var[i] = to_float(y[src + 3 + ch]);
}

// x f32 NCHW [n, c, hw] -> y NHWC [n, hw, c].
template <typename T>
MCDM_DEV void nchw_to_nhwc(const float* __restrict__ x, T* __restrict__ y, int n, int c, int hw) {
    const long long i = global_index();
    const long long total = (long long)n * c * hw;
    if (i >= total) return;
    // i = (k * hw + p) * c + ch
    const int ch = (int)(i % c);
    const long long rest = i / c;
    const int p = (int)(rest % hw);
    const long long k = rest / hw;
    y[i] = from_float<T>(x[(k * c + ch) * hw + p]);
}

// x NHWC [n, hw, c] -> y f32 NCHW [n, c, hw].
template <typename T>
MCDM_DEV void nhwc_to_nchw(const T* __restrict__ x, float* __restrict__ y, int n, int c, int hw) {
    const long long i = global_index();
    const long long total = (long long)n * c * hw;
    if (i >= total) return;
    // i = (k * c + ch) * hw + p
    const int p = (int)(i % hw);
    const long long rest = i / hw;
    const int ch = (int)(rest % c);
    const long long k = rest / c;
    y[i] = to_float(x[(k * hw + p) * c + ch]);
}

#define MCDM_LAYOUT(SUFFIX, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(LAYOUT_THREADS)                                    \
        pack_input_##SUFFIX(MCDM_PARAMS(PackArgs)) {                                                \
        pack_input<T>(x, cond, cond_count, first_image, (T*)y, b, hw, cc);                          \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(LAYOUT_THREADS)                                    \
        unpack_output_##SUFFIX(MCDM_PARAMS(UnpackArgs)) {                                           \
        unpack_output<T>((const T*)y, oc, eps, var, b, hw);                                         \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(LAYOUT_THREADS)                                    \
        nchw_to_nhwc_##SUFFIX(MCDM_PARAMS(TransposeArgs)) {                                         \
        nchw_to_nhwc<T>((const float*)x, (T*)y, n, c, hw);                                         \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(LAYOUT_THREADS)                                    \
        nhwc_to_nchw_##SUFFIX(MCDM_PARAMS(TransposeArgs)) {                                         \
        nhwc_to_nchw<T>((const T*)x, (float*)y, n, c, hw);                                         \
    }

MCDM_LAYOUT(f32, float)
MCDM_LAYOUT(f16, __half)
MCDM_LAYOUT(bf16, __nv_bfloat16)
