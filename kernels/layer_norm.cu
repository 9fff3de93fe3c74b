// LayerNorm over the last axis and the exact (erf) GELU: the transformer ops of the text encoder
// (BERT, src/text/bert.rs). Storage T in {float, __half, __nv_bfloat16}, f32 math.
// CPU references: src/ops/layer_norm.rs (`LayerNorm::forward`, statistics in f64; `gelu`).
//
//   layer_norm_{f32,f16,bf16}(LayerNormArgs's fields):
//   x      [rows, width]  storage T
//   gamma  f32 [width], beta f32 [width]
//   y      [rows, width]  storage T; may alias x (each element is read, then written, by the same
//          thread, after the whole block has finished reading the row for its statistics)
//   y[r, j] = (x[r, j] - mean_r) * rstd_r * gamma[j] + beta[j], with mean_r and the biased
//   variance var_r of row r and rstd_r = 1 / sqrt(var_r + eps), as torch.nn.LayerNorm.
//   Statistics in f32, two passes over the row (mean, then the mean of squared deviations), both
//   on values shifted by the row's first element p: s = sum(x - p), m = s / width (mean = p + m),
//   d_j = (x_j - p) - m, var = sum(d_j^2) / width. The shift keeps the mean exact to f32 rounding
//   of the deviations even when the row sits far from 0 (x - p is exact for nearby values).
//   Each thread sums a fixed strided subset in order, then a fixed reduction tree: deterministic.
//   Launch: grid (rows, 1, 1), block (128, 1, 1) (LN_THREADS, also the launch bound), no
//   dynamic shared memory. Block r normalises row r; any width >= 1 (strided loops).
//
//   gelu_{f32,f16,bf16}(GeluArgs's fields)
//   x [len] storage T, in place: x = 0.5 x (1 + erf(x / sqrt 2)) in f32 (erff), rounded to T.
//   Launch: grid (ceil(len / 256), 1, 1), block (256, 1, 1) (GELU_THREADS), one element per
//   thread.
#include "common.cuh"

#define LayerNormArgs_FIELDS(F)                                                                     \
    F(const void*, x) F(const float* __restrict__, gamma) F(const float* __restrict__, beta)        \
    F(void*, y) F(int, rows) F(int, width) F(float, eps)
MCDM_ARGS(LayerNormArgs)
#define GeluArgs_FIELDS(F) F(void*, x) F(long long, len)
MCDM_ARGS(GeluArgs)

#define LN_THREADS 128
#define GELU_THREADS 256

template <typename T>
MCDM_DEV void layer_norm(const T* x, const float* __restrict__ gamma, const float* __restrict__ beta, T* y,
                         int rows, int width, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows || width <= 0) return;  // uniform per block
    const long long base = (long long)r * width;
    const float p = to_float(x[base]);  // the shift (every thread reads the same element)
    float s = 0.0f;
    for (int j = threadIdx.x; j < width; j += blockDim.x) s += to_float(x[base + j]) - p;
    const float m = block_sum(s, scratch) / (float)width;
    float q = 0.0f;
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        const float d = (to_float(x[base + j]) - p) - m;
        q += d * d;
    }
    const float var = block_sum(q, scratch) / (float)width;
    const float rstd = 1.0f / sqrtf(var + eps);
    // block_sum ended with a barrier after every thread's last read of the statistics passes, so
    // writing y (possibly x itself) cannot disturb another thread.
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        const float d = (to_float(x[base + j]) - p) - m;
        y[base + j] = from_float<T>(d * rstd * gamma[j] + beta[j]);
    }
}

// 1 / sqrt(2) as f32 (0.70710677, std::f32::consts::FRAC_1_SQRT_2).
#define GELU_FRAC_1_SQRT_2 __uint_as_float(0x3F3504F3u)

template <typename T>
MCDM_DEV void gelu(T* x, long long len) {
    const long long i = global_index();
    if (i >= len) return;
    const float v = to_float(x[i]);
    x[i] = from_float<T>(0.5f * v * (1.0f + erff(v * GELU_FRAC_1_SQRT_2)));
}

#define MCDM_LAYER_NORM(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(LN_THREADS)                                        \
        layer_norm_##SUFFIX(MCDM_PARAMS(LayerNormArgs)) {                                           \
        layer_norm<T>((const T*)x, gamma, beta, (T*)y, rows, width, eps);                           \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GELU_THREADS) gelu_##SUFFIX(MCDM_PARAMS(GeluArgs)) { \
        gelu<T>((T*)x, len);                                                                        \
    }

MCDM_LAYER_NORM(f32, float)
MCDM_LAYER_NORM(f16, __half)
MCDM_LAYER_NORM(bf16, __nv_bfloat16)
