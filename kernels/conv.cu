// 2-D convolution, NHWC, as an implicit GEMM, with bias and an optional residual add fused in
// the epilogue. CPU reference: src/ops/conv.rs (note: the GPU weight layout is OHWI, see below).
//
//   conv2d_{f32,f16,bf16}(x, w, bias, residual, y, n, h, w, cin, cout, ksize, stride, ho, wo)
//   x        [n, h, w, cin]                      storage T
//   w        [cout, ksize, ksize, cin]  (OHWI)   storage T
//   bias     f32 [cout] (NULL: none)
//   residual [n, ho, wo, cout] or NULL; may alias y (each element is read, then written, by
//            the same thread)
//   y        [n, ho, wo, cout] = conv(x, w, padding ksize/2, stride) + bias (+ residual)
//   ksize 1 or 3, stride 1 or 2, any cin, cout >= 1; ho, wo as the caller computed them
//   ((h + 2*(ksize/2) - ksize) / stride + 1).
//
// GEMM view: M = n*ho*wo output pixels (row m = (b*ho + oy)*wo + ox, i.e. y's row order),
// N = cout, K = ksize*ksize*cin with k = (ky*ksize + kx)*cin + ci, which is exactly the order of
// one OHWI weight row: B[k][co] = w[co*K + k]. A[m][k] = x[b, oy*stride + ky - pad,
// ox*stride + kx - pad, ci], zero outside the image (pad = ksize/2).
//
// Launch (every type): grid (ceil(M / 64), ceil(cout / 64)), block 128 threads; each block
// computes the 64x64 tile y[m0 .. m0+63][n0 .. n0+63], m0 = 64*blockIdx.x, n0 = 64*blockIdx.y.
// Static shared memory: 20 KiB (f16/bf16), 8.5 KiB (f32).
#include "common.cuh"

#define CONV_BM 64        // tile rows (output pixels)
#define CONV_BN 64        // tile columns (output channels)
#define CONV_THREADS 128  // 4 warps
// Tensor-core path (f16/bf16): K step per stage, and the shared row stride in 16-bit elements:
// 32 + 8 padding = 80 bytes, so that rows stay 16-byte aligned (cp.async) and the 8 rows x 4
// words of one fragment load fall in 32 distinct banks (row r starts at word 20r mod 32).
#define CONV_BK 32
#define CONV_SK 40
// SIMT path (f32): K step, and the shared row stride in floats (64 + 4: float4-aligned rows).
#define CONVF_BK 16
#define CONVF_SM 68

struct ConvShape {
    int n, h, w, cin, cout, ks, stride, ho, wo;
    int pad;  // ks / 2
    int hwo;  // ho * wo
    int M;    // n * ho * wo
    int K;    // ks * ks * cin
};

MCDM_DEV ConvShape conv_shape(int n, int h, int w, int cin, int cout, int ks, int stride, int ho, int wo) {
    ConvShape s;
    s.n = n; s.h = h; s.w = w; s.cin = cin; s.cout = cout; s.ks = ks; s.stride = stride;
    s.ho = ho; s.wo = wo;
    s.pad = ks / 2;
    s.hwo = ho * wo;
    s.M = n * ho * wo;
    s.K = ks * ks * cin;
    return s;
}

// A[m][k] (see the header), or 0 outside the GEMM or the image. E: the raw element type.
template <typename E>
MCDM_DEV E load_a(const E* __restrict__ x, const ConvShape& s, int m, int k) {
    if (m >= s.M || k >= s.K) return E(0);
    const int b = m / s.hwo;
    const int r = m - b * s.hwo;
    const int oy = r / s.wo, ox = r - oy * s.wo;
    const int tap = k / s.cin;           // ky*ks + kx
    const int ci = k - tap * s.cin;
    const int ky = tap / s.ks, kx = tap - ky * s.ks;
    const int iy = oy * s.stride + ky - s.pad;
    const int ix = ox * s.stride + kx - s.pad;
    if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) return E(0);
    return x[(((long long)b * s.h + iy) * s.w + ix) * s.cin + ci];
}

// B[k][co] = w[co*K + k], or 0 outside the GEMM.
template <typename E>
MCDM_DEV E load_b(const E* __restrict__ w, const ConvShape& s, int co, int k) {
    if (co >= s.cout || k >= s.K) return E(0);
    return w[(long long)co * s.K + k];
}

// Epilogue for one output element: y = acc + bias (+ residual).
template <typename T>
MCDM_DEV void conv_store(const ConvShape& s, const float* __restrict__ bias, const T* residual, T* y,
                         int row, int col, float acc) {
    if (row >= s.M || col >= s.cout) return;
    const long long idx = (long long)row * s.cout + col;
    float v = acc + (bias != nullptr ? bias[col] : 0.0f);
    if (residual != nullptr) v += to_float(residual[idx]);
    y[idx] = from_float<T>(v);
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16: tensor cores (mma.sync m16n8k16, f32 accumulation), double-buffered shared tiles.
//
// Shared tiles, both stored [row][k] with k contiguous (CONV_SK stride), two stages:
//   As[stage][i][kk] = A[m0 + i][k0 + kk]     (i < 64 pixels, kk < 32)
//   Bs[stage][j][kk] = B[k0 + kk][n0 + j]     (j < 64 channels: a row of w, contiguous)
// Warp wp (0..3) computes rows 32*(wp/2) .. +31 and columns 32*(wp%2) .. +31 of the tile as
// 2 (m) x 4 (n) mma tiles of 16x8; acc[mt][nt][0..3] follows the C layout of mma16816
// (common.cuh): acc[mt][nt][e] is tile element (g + 8*(e/2), 2q + e%2).
//
// Loads: fast path when cin % 8 == 0 and x, w are 16-byte aligned: each thread issues two
// 16-byte cp.async per operand per stage: chunk id = tid + 128*c (c = 0, 1), tile row id / 4,
// k offset 8 * (id % 4). Eight consecutive k of one chunk then share one filter tap (cin % 8 == 0,
// chunk start % 8 == 0), so they are 8 consecutive channels of one input pixel (or all padding),
// and K % 8 == 0 keeps a chunk either wholly inside or wholly outside K. Otherwise (e.g. the
// 3- or 6-channel input conv) every element is loaded on its own.
template <typename T>
MCDM_DEV void conv2d_mma(const T* x_, const T* w_, const float* __restrict__ bias, const T* residual, T* y,
                         const ConvShape s) {
    __shared__ __align__(16) unsigned short As[2][CONV_BM][CONV_SK];
    __shared__ __align__(16) unsigned short Bs[2][CONV_BN][CONV_SK];
    const unsigned short* __restrict__ x = reinterpret_cast<const unsigned short*>(x_);
    const unsigned short* __restrict__ w = reinterpret_cast<const unsigned short*>(w_);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // warp's 32x32 sub-tile
    const int g = lane >> 2, q = lane & 3;     // mma fragment coordinates
    const int m0 = blockIdx.x * CONV_BM, n0 = blockIdx.y * CONV_BN;
    const int KT = (s.K + CONV_BK - 1) / CONV_BK;
    const bool vec = (s.cin % 8 == 0) && aligned16(x_) && aligned16(w_);  // uniform

    // Fast path: this thread's two A rows (pixels) and their top-left input coordinates.
    const int kc = (tid & 3) * 8;  // k offset of this thread's chunks within the stage
    int a_b[2], a_iy0[2], a_ix0[2];
    bool a_ok[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const int m = m0 + (tid >> 2) + 32 * c;
        a_ok[c] = m < s.M;
        const int mm = a_ok[c] ? m : 0;
        const int b = mm / s.hwo;
        const int r = mm - b * s.hwo;
        const int oy = r / s.wo, ox = r - oy * s.wo;
        a_b[c] = b;
        a_iy0[c] = oy * s.stride - s.pad;
        a_ix0[c] = ox * s.stride - s.pad;
    }

    // Fills stage `st` with the K step kt (k0 = 32*kt).
    auto load_stage = [&](int st, int kt) {
        const int k0 = kt * CONV_BK;
        if (vec) {
            const int k = k0 + kc;
            int tap = 0, ci = 0, ky = 0, kx = 0;
            const bool k_ok = k < s.K;
            if (k_ok) {
                tap = k / s.cin;
                ci = k - tap * s.cin;
                ky = tap / s.ks;
                kx = tap - ky * s.ks;
            }
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int row = (tid >> 2) + 32 * c;
                // A chunk: 8 channels ci..ci+7 of input pixel (a_b, a_iy0 + ky, a_ix0 + kx).
                const int iy = a_iy0[c] + ky, ix = a_ix0[c] + kx;
                const bool ok = a_ok[c] && k_ok && iy >= 0 && iy < s.h && ix >= 0 && ix < s.w;
                const unsigned short* src =
                    ok ? x + (((long long)a_b[c] * s.h + iy) * s.w + ix) * s.cin + ci : x;
                cp_async16(&As[st][row][kc], src, ok);
                // B chunk: w[n0 + row][k .. k+7].
                const int co = n0 + row;
                const bool okb = co < s.cout && k_ok;
                const unsigned short* srcb = okb ? w + (long long)co * s.K + k : w;
                cp_async16(&Bs[st][row][kc], srcb, okb);
            }
        } else {
            // 64 x 32 elements per operand: element id = tid + 128*e, row id / 32, k id % 32.
#pragma unroll 4
            for (int e = 0; e < (CONV_BM * CONV_BK) / CONV_THREADS; ++e) {
                const int id = tid + CONV_THREADS * e;
                const int row = id >> 5, kk = id & 31;
                As[st][row][kk] = load_a<unsigned short>(x, s, m0 + row, k0 + kk);
                Bs[st][row][kk] = load_b<unsigned short>(w, s, n0 + row, k0 + kk);
            }
        }
    };

    float acc[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

    load_stage(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < KT; ++kt) {
        const int cur = kt & 1;
        // Prefetch the next K step into the other stage (last read in iteration kt-1, which
        // ended with __syncthreads), then wait until only that group is in flight.
        if (kt + 1 < KT) {
            load_stage(cur ^ 1, kt + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CONV_BK; kk += 16) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const int r = wm * 32 + mt * 16 + g;
                a[mt][0] = lds32(&As[cur][r][kk + 2 * q]);
                a[mt][1] = lds32(&As[cur][r + 8][kk + 2 * q]);
                a[mt][2] = lds32(&As[cur][r][kk + 2 * q + 8]);
                a[mt][3] = lds32(&As[cur][r + 8][kk + 2 * q + 8]);
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int cn = wn * 32 + nt * 8 + g;
                b[nt][0] = lds32(&Bs[cur][cn][kk + 2 * q]);
                b[nt][1] = lds32(&Bs[cur][cn][kk + 2 * q + 8]);
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma16816<T>(acc[mt][nt], a[mt], b[nt]);
        }
        __syncthreads();  // stage `cur` is refilled in the next iteration
    }

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm * 32 + mt * 16 + g + 8 * (e >> 1);
                const int col = n0 + wn * 32 + nt * 8 + 2 * q + (e & 1);
                conv_store<T>(s, bias, residual, y, row, col, acc[mt][nt][e]);
            }
}

// ---------------------------------------------------------------------------------------------
// f32: SIMT tiles. Shared tiles k-major: As[kk][i] = A[m0 + i][k0 + kk], Bs[kk][j] =
// B[k0 + kk][n0 + j] (kk < 16). Thread (tr = tid / 16, tc = tid % 16) computes rows
// 8*tr .. 8*tr+7 and columns 4*tc .. 4*tc+3 of the tile (8 x 4 accumulators).
// Loads: element id = tid + 128*e, tile row id / 16, k id % 16 (consecutive threads read
// consecutive channels).
MCDM_DEV void conv2d_simt(const float* __restrict__ x, const float* __restrict__ w,
                          const float* __restrict__ bias, const float* residual, float* y, const ConvShape s) {
    __shared__ __align__(16) float As[CONVF_BK][CONVF_SM];
    __shared__ __align__(16) float Bs[CONVF_BK][CONVF_SM];
    const int tid = threadIdx.x;
    const int tr = tid >> 4, tc = tid & 15;
    const int m0 = blockIdx.x * CONV_BM, n0 = blockIdx.y * CONV_BN;

    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < s.K; k0 += CONVF_BK) {
#pragma unroll
        for (int e = 0; e < (CONV_BM * CONVF_BK) / CONV_THREADS; ++e) {
            const int id = tid + CONV_THREADS * e;
            const int row = id >> 4, kk = id & 15;
            As[kk][row] = load_a<float>(x, s, m0 + row, k0 + kk);
            Bs[kk][row] = load_b<float>(w, s, n0 + row, k0 + kk);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CONVF_BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][8 * tr]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][8 * tr + 4]);
            const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][4 * tc]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
            conv_store<float>(s, bias, residual, y, m0 + 8 * tr + i, n0 + 4 * tc + j, acc[i][j]);
}

// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(CONV_THREADS)
    conv2d_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
               const float* residual, float* y, int n, int h, int w_, int cin, int cout, int ksize,
               int stride, int ho, int wo) {
    conv2d_simt(x, w, bias, residual, y, conv_shape(n, h, w_, cin, cout, ksize, stride, ho, wo));
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS)
    conv2d_f16(const __half* __restrict__ x, const __half* __restrict__ w, const float* __restrict__ bias,
               const __half* residual, __half* y, int n, int h, int w_, int cin, int cout, int ksize,
               int stride, int ho, int wo) {
    conv2d_mma<__half>(x, w, bias, residual, y, conv_shape(n, h, w_, cin, cout, ksize, stride, ho, wo));
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS)
    conv2d_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                const float* __restrict__ bias, const __nv_bfloat16* residual, __nv_bfloat16* y, int n,
                int h, int w_, int cin, int cout, int ksize, int stride, int ho, int wo) {
    conv2d_mma<__nv_bfloat16>(x, w, bias, residual, y,
                              conv_shape(n, h, w_, cin, cout, ksize, stride, ho, wo));
}
