// The f32 embedding path: linear layers (time embedding MLP, emb_layers), the sinusoidal
// timestep embedding, class-label rows and SiLU. CPU references: src/ops/linear.rs,
// src/ops/embedding.rs, src/ops/mod.rs (silu).
#include "common.cuh"

// The arguments of each kernel, described below with it.
#define LinearArgs_FIELDS(F)                                                                        \
    F(const float* __restrict__, x) F(const float* __restrict__, weight)                            \
    F(const float* __restrict__, bias) F(float* __restrict__, y) F(int, n) F(int, in_features)      \
    F(int, out_features) F(int, silu_in)
MCDM_ARGS(LinearArgs)
#define TimestepArgs_FIELDS(F)                                                                      \
    F(const float* __restrict__, t) F(float* __restrict__, y) F(int, n) F(int, dim)                 \
    F(int, flip_sin_to_cos) F(float, freq_shift)
MCDM_ARGS(TimestepArgs)
#define RowsArgs_FIELDS(F)                                                                          \
    F(float* __restrict__, y) F(const float* __restrict__, table)                                   \
    F(const long long* __restrict__, labels) F(int, n) F(int, dim) F(int, rows)
MCDM_ARGS(RowsArgs)
#define SiluArgs_FIELDS(F) F(float* __restrict__, x) F(int, len)
MCDM_ARGS(SiluArgs)

// Rows of x per block, and input floats of each staged in shared memory per pass (32 KiB).
#define LINEAR_ROWS 8
#define LINEAR_CHUNK 1024
// Threads of a linear block (4 warps), outputs a block computes.
#define LINEAR_THREADS 128
#define LINEAR_OUTPUTS 32
// Threads of the other kernels' blocks.
#define EMBEDDING_THREADS 256

// y [n, out] = b[out] + act(x) [n, in] * w^T, w [out, in] (PyTorch layout), act = SiLU when
// silu_in != 0 else identity. b may be NULL (no bias). LinearArgs: x, weight (w), bias (b), y, n,
// in_features (in), out_features (out), silu_in.
// Launch: grid (ceil(out / 32), ceil(n / 8)), block 128. Block (bx, by) computes outputs
// o = bx*32 .. bx*32+31 of rows by*8 .. by*8+7: warp `wp` (0..3) takes o = bx*32 + wp*8 + j,
// j = 0..7, one after the other; the 32 lanes read w[o, k] at consecutive k (coalesced) and use
// each for all the block's rows (a weight is read once per 8 rows, not once per row), each lane
// summing k = lane, lane + 32, ... in order, then a fixed shuffle tree (deterministic).
MCDM_DEV void linear(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                     float* __restrict__ y, int n, int in, int out, int silu_in) {
    __shared__ float xs[LINEAR_ROWS][LINEAR_CHUNK];
    const int row0 = blockIdx.y * LINEAR_ROWS, rows = min(LINEAR_ROWS, n - row0);
    const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5;
    const int o_first = blockIdx.x * 32 + wp * 8;
    if (rows <= 0) return;  // uniform per block
    float acc[8][LINEAR_ROWS];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int r = 0; r < LINEAR_ROWS; ++r) acc[j][r] = 0.0f;
    for (int k0 = 0; k0 < in; k0 += LINEAR_CHUNK) {
        const int len = min(LINEAR_CHUNK, in - k0);
        __syncthreads();  // the previous chunk is no longer read
        for (int r = 0; r < rows; ++r)
            for (int k = threadIdx.x; k < len; k += 128) {
                const float v = x[(long long)(row0 + r) * in + k0 + k];
                xs[r][k] = silu_in ? silu_f(v) : v;
            }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int o = o_first + j;
            if (o < out) {  // warp-uniform
                const float* wrow = w + (long long)o * in + k0;
                for (int k = lane; k < len; k += 32) {
                    const float wv = wrow[k];
#pragma unroll
                    for (int r = 0; r < LINEAR_ROWS; ++r)
                        if (r < rows) acc[j][r] += xs[r][k] * wv;  // block-uniform
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int o = o_first + j;
        if (o < out) {  // warp-uniform: all lanes take part in the shuffles
#pragma unroll
            for (int r = 0; r < LINEAR_ROWS; ++r) {
                if (r < rows) {
                    const float s = warp_sum(acc[j][r]);
                    if (lane == 0) y[(long long)(row0 + r) * out + o] = (b != nullptr ? b[o] : 0.0f) + s;
                }
            }
        }
    }
}

// Sinusoidal embedding of guided-diffusion: y [n, dim] = [cos(t f_0..f_{half-1}) |
// sin(t f_0..f_{half-1})] with half = dim / 2 and f_i = exp(log_period * i / (half - freq_shift)),
// log_period = -(ln 10000 as f32), in the f32 order of src/ops/embedding.rs; [sin | cos] when
// flip_sin_to_cos is 0 (diffusers' layouts; guided-diffusion's is 1 with shift 0); an odd dim gets a
extern "C" __global__ void __launch_bounds__(LINEAR_THREADS) linear_f32(MCDM_PARAMS(LinearArgs)) {
    linear(x, weight, bias, y, n, in_features, out_features, silu_in);
}

// trailing 0 column. t: f32 [n] (may be fractional). TimestepArgs: t, y, n, dim,
// flip_sin_to_cos, freq_shift.
// Launch: grid (n), block 256; row blockIdx.x, frequencies i = threadIdx.x, +256, ...
MCDM_DEV void timestep_embedding(const float* __restrict__ t, float* __restrict__ y, int n, int dim,
                                 int flip_sin_to_cos, float freq_shift) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const int half = dim / 2;
    const float divisor = __fsub_rn((float)half, freq_shift);
    // cos goes first with the flip, second without.
    const int cos_at = flip_sin_to_cos ? 0 : half, sin_at = flip_sin_to_cos ? half : 0;
    const float log_period = __uint_as_float(0xC1135D8Eu);  // -(10000f64.ln() as f32) = -9.2103405
    const float tv = t[row];
    float* yrow = y + (long long)row * dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        // (log_period * i as f32 / divisor).exp(): multiply, then divide (no contraction).
        const float freq = expf(__fdiv_rn(__fmul_rn(log_period, (float)i), divisor));
        const float arg = __fmul_rn(tv, freq);
        yrow[cos_at + i] = cosf(arg);
        yrow[sin_at + i] = sinf(arg);
    }
    if ((dim & 1) && threadIdx.x == 0) yrow[dim - 1] = 0.0f;
}

// y [n, dim] += table[labels[i], :] (class embedding, label_emb.weight [rows, dim]). A label
// outside 0..rows adds nothing: negative means no class, and one past the table is never read
extern "C" __global__ void __launch_bounds__(EMBEDDING_THREADS)
    timestep_embedding_f32(MCDM_PARAMS(TimestepArgs)) {
    timestep_embedding(t, y, n, dim, flip_sin_to_cos, freq_shift);
}

// (the host checks labels; the device cannot report them). RowsArgs: y, table, labels, n, dim,
// rows. Launch: grid (n), block 256.
MCDM_DEV void add_rows(float* __restrict__ y, const float* __restrict__ table, const long long* __restrict__ labels,
                       int n, int dim, int rows) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const long long label = labels[row];
    if (label < 0 || label >= rows) return;
    const float* src = table + label * dim;
    float* dst = y + (long long)row * dim;
    for (int k = threadIdx.x; k < dim; k += blockDim.x) dst[k] += src[k];
}

extern "C" __global__ void __launch_bounds__(EMBEDDING_THREADS) add_rows_f32(MCDM_PARAMS(RowsArgs)) {
    add_rows(y, table, labels, n, dim, rows);
}

// x [len] = SiLU(x) = x / (1 + exp(-x)), in place. SiluArgs: x, len.
// Launch: grid ceil(len / 256), block 256.
extern "C" __global__ void __launch_bounds__(EMBEDDING_THREADS) silu_f32(MCDM_PARAMS(SiluArgs)) {
    const long long i = global_index();
    if (i < len) x[i] = silu_f(x[i]);
}
