// The device's own peaks, the yardsticks of `mcdm bench --kernels`: tensor-core throughput of
// mma.sync m16n8k16 (the instruction of the f16/bf16 conv and attention kernels), f32 FMA
// throughput (the f32 kernels) and DRAM bandwidth (a streaming copy). The compute loops touch
// registers only. CPU reference: src/bench/peak.rs; the values are chosen there so that every sum
// is exact, so the output checks that all the timed work was done.
//
//   peak_mma_{f16,bf16}(PeakArgs: out, iters, u = a, v = b): every warp keeps PEAK_CHAINS
//     independent accumulator tiles, tile c starting at c in every element (distinct chains,
//     which the compiler cannot merge); each of `iters` rounds adds A*B to every tile, every
//     element of A being a and of B being b (rounded to T), i.e. 16 ab to every element.
//     out[thread] = the sum, over its chains in order and then its 4 elements in order, of its
//     accumulators.
//     Work: iters * PEAK_CHAINS * 4096 flop per warp.
//   peak_fma_f32(PeakArgs: out, iters, u = b, v = c): every thread keeps PEAK_CHAINS chains,
//     chain j starting at j; each round sets x = fmaf(x, b, c) in every chain. out[thread] = the
//     sum of its chains in order. Work: 2 * iters * PEAK_CHAINS flop per thread.
//   copy_u4(CopyArgs: x, y, n): y[i] = x[i] for n 16-byte words (x, y 16-byte aligned, not
//     overlapping).
// Launch: any grid, block PEAK_BLOCK (256) threads; out holds grid * 256 floats.
#include "common.cuh"

// The compute kernels' arguments: `out` gets one value per thread after `iters` rounds with the
// operands u, v (mma: every A element u, every B element v; FMA: x = fma(x, u, v)).
#define PeakArgs_FIELDS(F) F(float* __restrict__, out) F(int, iters) F(float, u) F(float, v)
MCDM_ARGS(PeakArgs)
// copy_u4: y = x over n 16-byte words.
#define CopyArgs_FIELDS(F) F(const void* __restrict__, x) F(void* __restrict__, y) F(int, n)
MCDM_ARGS(CopyArgs)

#define PEAK_CHAINS 8
#define PEAK_BLOCK 256

template <typename T>
MCDM_DEV void peak_mma(float* __restrict__ out, int iters, float a, float b) {
    const unsigned pa = pack2<T>(a, a), pb = pack2<T>(b, b);
    const unsigned af[4] = {pa, pa, pa, pa}, bf[2] = {pb, pb};
    float acc[PEAK_CHAINS][4];
#pragma unroll
    for (int c = 0; c < PEAK_CHAINS; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[c][e] = (float)c;
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int c = 0; c < PEAK_CHAINS; ++c) mma16816<T>(acc[c], af, bf);
    }
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < PEAK_CHAINS; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) sum += acc[c][e];
    out[global_index()] = sum;
}

extern "C" __global__ void __launch_bounds__(PEAK_BLOCK) peak_mma_f16(MCDM_PARAMS(PeakArgs)) {
    peak_mma<__half>(out, iters, u, v);
}

extern "C" __global__ void __launch_bounds__(PEAK_BLOCK) peak_mma_bf16(MCDM_PARAMS(PeakArgs)) {
    peak_mma<__nv_bfloat16>(out, iters, u, v);
}

MCDM_DEV void peak_fma(float* __restrict__ out, int iters, float b, float c) {
    float x[PEAK_CHAINS];
#pragma unroll
    for (int j = 0; j < PEAK_CHAINS; ++j) x[j] = (float)j;
#pragma unroll 4
    for (int i = 0; i < iters; ++i) {
#pragma unroll
        for (int j = 0; j < PEAK_CHAINS; ++j) x[j] = fmaf(x[j], b, c);
    }
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < PEAK_CHAINS; ++j) sum += x[j];
    out[global_index()] = sum;
}

extern "C" __global__ void __launch_bounds__(PEAK_BLOCK) peak_fma_f32(MCDM_PARAMS(PeakArgs)) {
    peak_fma(out, iters, u, v);
}

// Four independent 16-byte loads in flight per thread before their stores (grid-stride).
MCDM_DEV void copy_words(const uint4* __restrict__ x, uint4* __restrict__ y, int n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = global_index();
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 v0 = x[i], v1 = x[i + stride], v2 = x[i + 2 * stride], v3 = x[i + 3 * stride];
        y[i] = v0;
        y[i + stride] = v1;
        y[i + 2 * stride] = v2;
        y[i + 3 * stride] = v3;
    }
    for (; i < n; i += stride) y[i] = x[i];
}

extern "C" __global__ void __launch_bounds__(PEAK_BLOCK) copy_u4(MCDM_PARAMS(CopyArgs)) {
    copy_words((const uint4*)x, (uint4*)y, n);
}
