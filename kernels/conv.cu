// 2-D convolution, NHWC, as an implicit GEMM, with bias and an optional residual add fused in
// the epilogue. CPU reference: src/ops/conv.rs (note: the GPU weight layout is OHWI, see below).
//
//   conv2d_{f32,f16,bf16}(ConvArgs's fields):
//   x        [n, h, w, cin]                      storage T
//   weight   [cout, ksize, ksize, cin]  (OHWI)   storage T
//   bias     f32 [cout] (NULL: none)
//   residual [n, ho, wo, cout] or NULL; may alias y (each element is read, then written, by
//            the same thread)
//   y        [n, ho, wo, cout] = conv(x, weight, padding ksize/2, stride) + bias (+ residual)
//   ksize 1 or 3, stride 1 or 2, any cin, cout >= 1; ho, wo as the caller computed them
//   ((h + 2*(ksize/2) - ksize) / stride + 1).
// The copies a UNet would otherwise make before a conv are folded into its addressing:
//   x2       NULL, or the channels cin1 .. cin-1 of the input: the input is then the channel
//            concatenation cat([x, x2]) (the decoder's skip), x [.., cin1] and x2 [.., cin - cin1]
//            (0 < cin1 < cin; ignored when x2 is NULL)
//   up       1: x (and x2) hold an [n, h/2, w/2, ..] image (h, w even) read as its nearest 2x
//            upsampling (the UNet's Upsample before a conv)
//   res_up   1: residual holds [n, ho/2, wo/2, cout] (ho, wo even), added nearest-2x-upsampled
//            (an upsampling ResBlock's identity skip); it does not alias y then
//   res_down 1: residual holds [n, 2*ho, 2*wo, cout], added 2x2-average-pooled (a downsampling
//            ResBlock's identity skip); it does not alias y then (res_up and res_down not both)
// And what a group norm of y needs, so that it makes no statistics pass of its own over y
// (group_norm_merge_channels in kernels/group_norm.cu merges these into its groups):
//   moments  NULL, or f32 [n, chunks = ho*wo / BM, cout, 3]: the (count, mean, M2) of each
//            channel over the BM output pixels of each row tile (see conv_channel_moments). The
//            launcher passes it only when (ho*wo) % BM == 0 (a row tile lies in one image).
// And the group norm of x itself, applied as the input is read, so that the normalised tensor is
// never stored (group_norm_channel_affine in kernels/group_norm.cu makes the table):
//   norm      NULL, or f32 [n, cin, 2]: (mul, add) of each image and input channel (of the
//             concatenation, with x2); the conv then reads x[.., ci] * mul + add of image b
//             (and its SiLU when norm_silu != 0), rounded to T as a stored normalised tensor would
//             be. Padding stays zero: it is the normalised tensor that is padded.
//
// GEMM view: M = n*ho*wo output pixels (row m = (b*ho + oy)*wo + ox, i.e. y's row order),
// N = cout, K = ksize*ksize*cin with k = (ky*ksize + kx)*cin + ci, which is exactly the order of
// one OHWI weight row: B[k][co] = w[co*K + k]. A[m][k] = x[b, oy*stride + ky - pad,
// ox*stride + kx - pad, ci], zero outside the image (pad = ksize/2).
//
// Launch (every type): grid (ceil(M / 64), ceil(cout / 64)), block 128 threads; each block
// computes the 64x64 tile y[m0 .. m0+63][n0 .. n0+63], m0 = 64*blockIdx.x, n0 = 64*blockIdx.y.
// Static shared memory: 20 KiB (f16/bf16), 8.5 KiB (f32).
//
// Large-tile variants (f16/bf16 only), same arguments and results, tiles and blocks as the
// CONV_M*_ constants below say, dynamic shared CONVB_STAGES * (BM + BN) * CONVB_ROW_BYTES:
//   conv2d_m128n128_{f16,bf16}: 128x128 tiles, block 256 threads, dynamic shared 65536 bytes
//   conv2d_m128n64_{f16,bf16}:  128x64 tiles,  block 128 threads, dynamic shared 49152 bytes
//   conv2d_m256n128_{f16,bf16}: 256x128 tiles, block 256 threads, dynamic shared 98304 bytes
// grid (ceil(M / BM) * ceil(cout / BN), 1, 1): block b computes the tile
// m0 = BM * (b / ceil(cout / BN)), n0 = BN * (b % ceil(cout / BN)) (the column tiles of one row
// block run back to back, so its input rows are fetched from DRAM once and then hit L2).
// Preconditions (the launcher checks them, else it uses conv2d_{f16,bf16}): cin % 8 == 0,
// cout % 8 == 0, x, x2 and w 16-byte aligned, cin1 % 8 == 0 with x2. The launcher raises the function's
// MAX_DYNAMIC_SHARED_SIZE_BYTES to the dynamic size (64 KiB is over the 48 KiB default).
#include "common.cuh"

#define ConvArgs_FIELDS(F)                                                                          \
    F(const void* __restrict__, x) F(const void* __restrict__, weight)                              \
    F(const float* __restrict__, bias) F(const void*, residual) F(void*, y) F(int, n) F(int, h)     \
    F(int, w) F(int, cin) F(int, cout) F(int, ksize) F(int, stride) F(int, ho) F(int, wo)            \
    F(const void* __restrict__, x2) F(int, cin1) F(int, up) F(int, res_up)                         \
    F(float* __restrict__, moments) F(int, res_down) F(const float* __restrict__, norm) F(int, norm_silu)
MCDM_ARGS(ConvArgs)

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
    int cin1, cin2;  // channels read from x and from x2 (cin2 = 0: x holds them all)
    int up;          // x holds [n, sh, sw, ..] = [n, h/2, w/2, ..], upsampled on read
    int sh, sw;      // the stored input's height and width
    int res_up;      // the residual holds [n, ho/2, wo/2, cout]
    int res_down;    // the residual holds [n, 2ho, 2wo, cout]
    const float* norm;  // NULL, or the input's (mul, add) per image and channel
    int norm_silu;      // SiLU after the norm
};

MCDM_DEV ConvShape conv_shape(int n, int h, int w, int cin, int cout, int ks, int stride, int ho, int wo,
                              bool two_sources, int cin1, int up, int res_up, int res_down, const float* norm,
                              int norm_silu) {
    ConvShape s;
    s.n = n; s.h = h; s.w = w; s.cin = cin; s.cout = cout; s.ks = ks; s.stride = stride;
    s.ho = ho; s.wo = wo;
    s.pad = ks / 2;
    s.hwo = ho * wo;
    s.M = n * ho * wo;
    s.K = ks * ks * cin;
    s.cin1 = two_sources ? cin1 : cin;
    s.cin2 = cin - s.cin1;
    s.up = up;
    s.sh = up ? h >> 1 : h;
    s.sw = up ? w >> 1 : w;
    s.res_up = res_up;
    s.res_down = res_down;
    s.norm = norm;
    s.norm_silu = norm_silu;
    return s;
}

// Where input channel ci lies: in x, or in x2 past x's cin1 channels; the pixel stride there,
// and the channel within that tensor.
template <typename E>
struct ConvChannel {
    const E* base;
    int stride;
    int c;
};
template <typename E>
MCDM_DEV ConvChannel<E> conv_channel(const E* x, const E* x2, const ConvShape& s, int ci) {
    const bool second = ci >= s.cin1;
    return {second ? x2 : x, second ? s.cin2 : s.cin1, second ? ci - s.cin1 : ci};
}

// The stored pixel of the (logical, inside the image) input pixel (b, iy, ix): (iy/2, ix/2) of
// the half-size tensor when it is upsampled on read.
MCDM_DEV long long conv_pixel(const ConvShape& s, int b, int iy, int ix) {
    if (s.up) {
        iy >>= 1;
        ix >>= 1;
    }
    return ((long long)b * s.sh + iy) * s.sw + ix;
}

// Whether the (logical) input pixel (iy, ix) is inside the image, not padding.
MCDM_DEV bool conv_inside(const ConvShape& s, int iy, int ix) { return iy >= 0 && iy < s.h && ix >= 0 && ix < s.w; }

// Input channel ci of image b as the conv reads it when the input is normalised (s.norm): the
// stored value v, times mul, plus add, SiLU'd when s.norm_silu (see the header).
MCDM_DEV float conv_norm(const ConvShape& s, int b, int ci, float v) {
    const float* ma = s.norm + ((long long)b * s.cin + ci) * 2;
    v = fmaf(v, ma[0], ma[1]);
    return s.norm_silu ? silu_f(v) : v;
}

// conv_norm on a raw element: an f32 value, or the bits of a 16-bit T (rounded back to T).
template <typename T>
MCDM_DEV float conv_norm_raw(const ConvShape& s, int b, int ci, float v) {
    return conv_norm(s, b, ci, v);
}
template <typename T>
MCDM_DEV unsigned short conv_norm_raw(const ConvShape& s, int b, int ci, unsigned short v) {
    return (unsigned short)(pack2<T>(conv_norm(s, b, ci, bits_to_float<T>(v)), 0.0f) & 0xffffu);
}

// Normalises in place the 16-byte chunk of shared memory at `chunk` that one cp.async brought
// (landed, for the thread that issued it): the eight channels ci .. ci+7 of one input pixel of
// image b (ci % 8 == 0, so their four float4 of (mul, add) pairs are 16-byte aligned).
template <typename T>
MCDM_DEV void conv_norm_chunk(const ConvShape& s, int b, int ci, void* chunk) {
    // Word by word: 16-byte accesses keep the whole chunk live, which spills the 128x64 tile's
    // registers on sm_80-89.
    unsigned* words = reinterpret_cast<unsigned*>(chunk);
    const float4* table = reinterpret_cast<const float4*>(s.norm + ((long long)b * s.cin + ci) * 2);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float4 ma = table[p];  // (mul, add) of channels ci + 2p and ci + 2p + 1
        float lo = fmaf(bits_to_float<T>((unsigned short)(words[p] & 0xffffu)), ma.x, ma.y);
        float hi = fmaf(bits_to_float<T>((unsigned short)(words[p] >> 16)), ma.z, ma.w);
        if (s.norm_silu) {
            lo = silu_f(lo);
            hi = silu_f(hi);
        }
        words[p] = pack2<T>(lo, hi);
    }
}

// A[m][k] (see the header), or 0 outside the GEMM or the image. E: the raw element type of T.
template <typename T, typename E>
MCDM_DEV E load_a(const E* __restrict__ x, const E* __restrict__ x2, const ConvShape& s, int m, int k) {
    if (m >= s.M || k >= s.K) return E(0);
    const int b = m / s.hwo;
    const int r = m - b * s.hwo;
    const int oy = r / s.wo, ox = r - oy * s.wo;
    const int tap = k / s.cin;           // ky*ks + kx
    const int ci = k - tap * s.cin;
    const int ky = tap / s.ks, kx = tap - ky * s.ks;
    const int iy = oy * s.stride + ky - s.pad;
    const int ix = ox * s.stride + kx - s.pad;
    if (!conv_inside(s, iy, ix)) return E(0);
    const ConvChannel<E> ch = conv_channel(x, x2, s, ci);
    const E v = ch.base[conv_pixel(s, b, iy, ix) * ch.stride + ch.c];
    return s.norm != nullptr ? conv_norm_raw<T>(s, b, ci, v) : v;
}

// GEMM row m (an output pixel): its image b and the input coordinates (iy0, ix0) of its top-left
// filter tap. Past the last row, iy0 is far below the image, so that every tap of the row is
// padding (no separate flag to keep: the large tiles are at their register limit on sm_86).
MCDM_DEV void conv_row_origin(const ConvShape& s, int m, int& b, int& iy0, int& ix0) {
    const bool inside = m < s.M;
    const int mm = inside ? m : 0;
    b = mm / s.hwo;
    const int r = mm - b * s.hwo;
    const int oy = r / s.wo, ox = r - oy * s.wo;
    iy0 = inside ? oy * s.stride - s.pad : -(1 << 28);
    ix0 = ox * s.stride - s.pad;
}

// GEMM column k: its input channel ci and filter tap (ky, kx); false, with zeros, past K.
MCDM_DEV bool conv_k_tap(const ConvShape& s, int k, int& ci, int& ky, int& kx) {
    const bool inside = k < s.K;
    const int tap = inside ? k / s.cin : 0;
    ci = inside ? k - tap * s.cin : 0;
    ky = tap / s.ks;
    kx = tap - ky * s.ks;
    return inside;
}

// B[k][co] = w[co*K + k], or 0 outside the GEMM.
template <typename E>
MCDM_DEV E load_b(const E* __restrict__ w, const ConvShape& s, int co, int k) {
    if (co >= s.cout || k >= s.K) return E(0);
    return w[(long long)co * s.K + k];
}

// The residual's element for output row (pixel) `row`, channel `col`: the same index as y's,
// that of pixel (oy/2, ox/2) of the half-size residual when it is upsampled, or that of the
// top-left pixel (2oy, 2ox) of the window of the full-size residual when it is pooled (the
// others are conv_residual_down_steps past it).
MCDM_DEV long long conv_residual_index(const ConvShape& s, int row, int col) {
    if (!s.res_up && !s.res_down) return (long long)row * s.cout + col;
    const int b = row / s.hwo;
    const int r = row - b * s.hwo;
    const int oy = r / s.wo, ox = r - oy * s.wo;
    if (s.res_down) return (((long long)b * 2 * s.ho + 2 * oy) * 2 * s.wo + 2 * ox) * s.cout + col;
    return (((long long)b * (s.ho >> 1) + (oy >> 1)) * (s.wo >> 1) + (ox >> 1)) * s.cout + col;
}

// The offsets of a pooled residual's window from its top-left element: right, down, down-right.
MCDM_DEV void conv_residual_down_steps(const ConvShape& s, long long steps[3]) {
    steps[0] = s.cout;
    steps[1] = 2LL * s.wo * s.cout;
    steps[2] = steps[0] + steps[1];
}

// The residual's value for (row, col): see conv_residual_index; the mean of the window when
// pooled.
template <typename T>
MCDM_DEV float conv_residual(const ConvShape& s, const T* residual, int row, int col) {
    const T* at = residual + conv_residual_index(s, row, col);
    if (!s.res_down) return to_float(*at);
    long long step[3];
    conv_residual_down_steps(s, step);
    return 0.25f * (to_float(at[0]) + to_float(at[step[0]]) + to_float(at[step[1]]) + to_float(at[step[2]]));
}

// Epilogue for one output element: y = acc + bias (+ residual).
template <typename T>
MCDM_DEV void conv_store(const ConvShape& s, const float* __restrict__ bias, const T* residual, T* y,
                         int row, int col, float acc) {
    if (row >= s.M || col >= s.cout) return;
    const long long idx = (long long)row * s.cout + col;
    float v = acc + (bias != nullptr ? bias[col] : 0.0f);
    if (residual != nullptr) v += conv_residual(s, residual, row, col);
    y[idx] = from_float<T>(v);
}

// The per-channel moments of the tile y[m0 .. m0+BM-1][n0 .. n0+BN-1] this block has just
// stored, into `moments` (see the header; the launcher's condition holds). The block reads its own
// tile back (visible after the barrier; it was just written, so it comes from cache, not DRAM):
// thread t sums column n0 + t % BN over rows t / BN, + THREADS / BN, ... (a warp reads whole
// rows), deviations from the first value it reads as group_norm_partial does (no cancellation
// when |mean| >> std); then thread j < BN merges the THREADS / BN sums of column n0 + j.
// slot: THREADS Moments of shared memory the block no longer uses.
template <typename T, int BM, int BN, int THREADS>
MCDM_DEV void conv_channel_moments(const ConvShape& s, const T* y, int m0, int n0, float* __restrict__ moments,
                                   Moments* slot) {
    constexpr int R = THREADS / BN;  // rows summed in parallel
    static_assert(THREADS % BN == 0, "a whole number of threads per column");
    __syncthreads();  // the tile's stores are made, and every warp is done with the shared tiles
    const int t = threadIdx.x, row0 = t / BN, col = n0 + t % BN;
    if (col < s.cout) {
        const T* at = y + (long long)(m0 + row0) * s.cout + col;
        const long long step = (long long)R * s.cout;
        const float shift = to_float(*at);
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll 4
        for (int i = row0; i < BM; i += R, at += step) {
            const float d = to_float(*at) - shift;
            s1 += d;
            s2 += d * d;
        }
        const float cnt = (float)(BM / R);
        slot[t] = Moments{cnt, shift + s1 / cnt, fmaxf(s2 - s1 * (s1 / cnt), 0.0f)};
    }
    __syncthreads();
    if (t < BN && col < s.cout) {
        Moments r = slot[t];
        for (int lane = 1; lane < R; ++lane) r = merge_moments(r, slot[lane * BN + t]);
        const int chunks = s.hwo / BM, b = m0 / s.hwo, chunk = (m0 - b * s.hwo) / BM;
        float* out = moments + (((long long)b * chunks + chunk) * s.cout + col) * 3;
        out[0] = r.n;
        out[1] = r.mean;
        out[2] = r.m2;
    }
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
MCDM_DEV void conv2d_mma(const T* x_, const T* x2_, const T* w_, const float* __restrict__ bias, const T* residual,
                         T* y, const ConvShape s, float* __restrict__ moments) {
    __shared__ __align__(16) unsigned short As[2][CONV_BM][CONV_SK];
    __shared__ __align__(16) unsigned short Bs[2][CONV_BN][CONV_SK];
    const unsigned short* __restrict__ x = reinterpret_cast<const unsigned short*>(x_);
    const unsigned short* __restrict__ x2 = reinterpret_cast<const unsigned short*>(x2_);
    const unsigned short* __restrict__ w = reinterpret_cast<const unsigned short*>(w_);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // warp's 32x32 sub-tile
    const int g = lane >> 2, q = lane & 3;     // mma fragment coordinates
    const int m0 = blockIdx.x * CONV_BM, n0 = blockIdx.y * CONV_BN;
    const int KT = (s.K + CONV_BK - 1) / CONV_BK;
    const bool vec = s.cin % 8 == 0 && s.cin1 % 8 == 0 && aligned16(x_) && aligned16(x2_) && aligned16(w_);  // uniform

    // Fast path: this thread's two A rows (pixels) and their top-left input coordinates.
    const int kc = (tid & 3) * 8;  // k offset of this thread's chunks within the stage
    int a_b[2], a_iy0[2], a_ix0[2];
#pragma unroll
    for (int c = 0; c < 2; ++c)
        conv_row_origin(s, m0 + (tid >> 2) + 32 * c, a_b[c], a_iy0[c], a_ix0[c]);

    // Fills stage `st` with the K step kt (k0 = 32*kt).
    auto load_stage = [&](int st, int kt) {
        const int k0 = kt * CONV_BK;
        if (vec) {
            const int k = k0 + kc;
            int ci, ky, kx;
            const bool k_ok = conv_k_tap(s, k, ci, ky, kx);
            const ConvChannel<unsigned short> ch = conv_channel(x, x2, s, ci);
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int row = (tid >> 2) + 32 * c;
                // A chunk: 8 channels ci..ci+7 of input pixel (a_b, a_iy0 + ky, a_ix0 + kx).
                const int iy = a_iy0[c] + ky, ix = a_ix0[c] + kx;
                const bool ok = k_ok && conv_inside(s, iy, ix);
                const unsigned short* src = ok ? ch.base + conv_pixel(s, a_b[c], iy, ix) * ch.stride + ch.c : x;
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
                As[st][row][kk] = load_a<T>(x, x2, s, m0 + row, k0 + kk);
                Bs[st][row][kk] = load_b<unsigned short>(w, s, n0 + row, k0 + kk);
            }
        }
    };

    // Fast path with s.norm: normalises this thread's A chunks of stage `st` (K step kt) once
    // they have landed, before the barrier that shows the stage to the other warps; padding
    // chunks stay zero.
    auto normalize_stage = [&](int st, int kt) {
        int ci, ky, kx;
        if (!conv_k_tap(s, kt * CONV_BK + kc, ci, ky, kx)) return;
#pragma unroll
        for (int c = 0; c < 2; ++c)
            if (conv_inside(s, a_iy0[c] + ky, a_ix0[c] + kx))
                conv_norm_chunk<T>(s, a_b[c], ci, &As[st][(tid >> 2) + 32 * c][kc]);
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
        if (vec && s.norm != nullptr) normalize_stage(cur, kt);
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
    if (moments != nullptr)
        conv_channel_moments<T, CONV_BM, CONV_BN, CONV_THREADS>(s, y, m0, n0, moments,
                                                               reinterpret_cast<Moments*>(&As[0][0][0]));
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16, large tiles: BM x BN (128 x 128, 128 x 64, 256 x 128), warps BM/64 (m) x BN/WN
// (n), each 64 x WN of the tile (WN = 32: 4 x 4 mma tiles of 16x8, 64 accumulators a thread;
// WN = 64: 4 x 8, 128), BK = 32, a 4-stage cp.async pipeline in dynamic shared memory,
// fragments loaded with ldmatrix. Wider warp tiles read fewer fragment bytes per mma (each A
// fragment serves WN/8 mmas).
//
// Shared layout per stage: A tile [BM rows][32 k] then B tile [BN rows][32 k], 16-bit, 64 bytes
// a row (no padding) = four 16-byte chunks; chunk c of row r is stored at chunk position
// c ^ ((r >> 1) & 3) (XOR swizzle). An ldmatrix phase reads one chunk column of 8 consecutive
// rows: rows r, r+1 share a 128-byte bank line and the swizzle gives the 4 row pairs 4 distinct
// chunk positions, so the 8 16-byte reads cover all 32 banks once. The cp.async stores (a
// quarter warp writes 2 rows x 4 chunks) are conflict-free for the same reason.
//
// Loads (as conv2d_mma's fast path): chunk column kc = tid % 4 (k offset 8 kc), rows
// tid / 4 + (THREADS / 4) * c; the 8 k of a chunk are 8 channels of one tap (cin % 8 == 0).
//
// Pipeline: stages 0..S-2 are issued up front; iteration kt waits until at most S-2 groups are
// pending (so stage kt has landed, for this thread), syncs (for every thread; and every warp has
// finished reading the stage of iteration kt-1), then refills that stage with K step kt+S-1 and
// computes on stage kt % S. One commit per iteration, empty or not, keeps the group count exact.
#define CONVB_BK 32
#define CONVB_STAGES 4
#define CONVB_ROW_BYTES 64  // CONVB_BK 16-bit values
// Each variant's tile rows and columns, warp tile columns, threads, and blocks per SM it is
// compiled for (__launch_bounds__). 128-row tiles: 2 blocks of 256 / 4 blocks of 128 threads per
// SM, at most 128 registers a thread, which the 64 accumulators + 24 fragment registers fit.
// 256 x 128 (warp tiles 64x64): one block of 256 threads per SM, for the 128 accumulators.
#define CONV_M128N128_BM 128
#define CONV_M128N128_BN 128
#define CONV_M128N128_WN 32
#define CONV_M128N128_THREADS 256
#define CONV_M128N128_MIN_BLOCKS 2
#define CONV_M128N64_BM 128
#define CONV_M128N64_BN 64
#define CONV_M128N64_WN 32
#define CONV_M128N64_THREADS 128
#define CONV_M128N64_MIN_BLOCKS 4
#define CONV_M256N128_BM 256
#define CONV_M256N128_BN 128
#define CONV_M256N128_WN 64
#define CONV_M256N128_THREADS 256
#define CONV_M256N128_MIN_BLOCKS 1

extern __shared__ __align__(16) unsigned char conv_dyn_smem[];

// Byte offset of 16-byte chunk `c` of tile row `r` within a tile (the swizzle above).
MCDM_DEV int convb_off(int r, int c) { return r * CONVB_ROW_BYTES + ((c ^ ((r >> 1) & 3)) << 4); }

// Epilogue for the column pair (col, col + 1) of one row (col even, cout % 8 == 0, so both or
// neither are inside). `pair`: y and residual are 4-byte aligned, so both values move as one word.
template <typename T>
MCDM_DEV void conv_store2(const ConvShape& s, const float* __restrict__ bias, const T* residual, T* y,
                          int row, int col, float a0, float a1, bool pair) {
    if (row >= s.M || col >= s.cout) return;
    if (!pair) {
        conv_store<T>(s, bias, residual, y, row, col, a0);
        conv_store<T>(s, bias, residual, y, row, col + 1, a1);
        return;
    }
    const long long idx = (long long)row * s.cout + col;
    float v0 = a0, v1 = a1;
    if (bias != nullptr) {
        v0 += bias[col];
        v1 += bias[col + 1];
    }
    if (residual != nullptr) {
        const T* at = residual + conv_residual_index(s, row, col);
        const unsigned r = *reinterpret_cast<const unsigned*>(at);
        float r0 = bits_to_float<T>((unsigned short)(r & 0xffffu));
        float r1 = bits_to_float<T>((unsigned short)(r >> 16));
        if (s.res_down) {
            long long step[3];
            conv_residual_down_steps(s, step);
#pragma unroll
            for (int q = 0; q < 3; ++q) {
                const unsigned rq = *reinterpret_cast<const unsigned*>(at + step[q]);
                r0 += bits_to_float<T>((unsigned short)(rq & 0xffffu));
                r1 += bits_to_float<T>((unsigned short)(rq >> 16));
            }
            r0 *= 0.25f;
            r1 *= 0.25f;
        }
        v0 += r0;
        v1 += r1;
    }
    *reinterpret_cast<unsigned*>(y + idx) = pack2<T>(v0, v1);
}

template <typename T, int BM, int BN, int WN>
MCDM_DEV void conv2d_mma_big(const T* x_, const T* x2_, const T* w_, const float* __restrict__ bias,
                             const T* residual, T* y, const ConvShape s, float* __restrict__ moments) {
    constexpr int BK = CONVB_BK, S = CONVB_STAGES;
    constexpr int WARPS_M = BM / 64, NT = WN / 8;  // warps along m; n8 tiles of a warp
    constexpr int THREADS = WARPS_M * (BN / WN) * 32;
    constexpr int RPP = THREADS / 4;  // tile rows filled per pass of the block (4 chunks a row)
    constexpr int A_PASSES = BM / RPP, B_PASSES = BN / RPP;
    constexpr int A_BYTES = BM * CONVB_ROW_BYTES;
    constexpr int STAGE_BYTES = (BM + BN) * CONVB_ROW_BYTES;
    static_assert((BM == 128 || BM == 256) && (BN == 64 || BN == 128) && (WN == 32 || WN == 64), "tile");
    const unsigned short* __restrict__ x = reinterpret_cast<const unsigned short*>(x_);
    const unsigned short* __restrict__ x2 = reinterpret_cast<const unsigned short*>(x2_);
    const unsigned short* __restrict__ w = reinterpret_cast<const unsigned short*>(w_);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;  // warp's sub-tile: rows 64 wm, cols WN wn
    const int g = lane >> 2, q = lane & 3;
    const int ntiles = (s.cout + BN - 1) / BN;
    const int m0 = (int)(blockIdx.x / ntiles) * BM, n0 = (int)(blockIdx.x % ntiles) * BN;
    const int KT = (s.K + BK - 1) / BK;

    // This thread's chunk column, its swizzled store offset (the same for all its rows: they
    // differ by multiples of RPP, itself a multiple of 8), and its A rows' input coordinates.
    const int kc = tid & 3;
    const int st_off = convb_off(tid >> 2, kc);
    int a_b[A_PASSES], a_iy0[A_PASSES], a_ix0[A_PASSES];
#pragma unroll
    for (int c = 0; c < A_PASSES; ++c)
        conv_row_origin(s, m0 + (tid >> 2) + RPP * c, a_b[c], a_iy0[c], a_ix0[c]);

    // Issues the copies of K step kt into stage st (zero-filled outside the image / GEMM).
    auto load_stage = [&](int st, int kt) {
        unsigned char* As = conv_dyn_smem + st * STAGE_BYTES;
        unsigned char* Bs = As + A_BYTES;
        const int k = kt * BK + kc * 8;
        int ci, ky, kx;
        const bool k_ok = conv_k_tap(s, k, ci, ky, kx);
        const ConvChannel<unsigned short> ch = conv_channel(x, x2, s, ci);
#pragma unroll
        for (int c = 0; c < A_PASSES; ++c) {
            const int iy = a_iy0[c] + ky, ix = a_ix0[c] + kx;
            const bool ok = k_ok && conv_inside(s, iy, ix);
            const unsigned short* src = ok ? ch.base + conv_pixel(s, a_b[c], iy, ix) * ch.stride + ch.c : x;
            cp_async16(As + st_off + RPP * CONVB_ROW_BYTES * c, src, ok);
        }
#pragma unroll
        for (int c = 0; c < B_PASSES; ++c) {
            const int co = n0 + (tid >> 2) + RPP * c;
            const bool ok = co < s.cout && k_ok;
            const unsigned short* src = ok ? w + (long long)co * s.K + k : w;
            cp_async16(Bs + st_off + RPP * CONVB_ROW_BYTES * c, src, ok);
        }
    };

    // With s.norm: normalises this thread's A chunks of stage st (K step kt) once they have
    // landed, before the barrier that shows the stage to the other warps; padding stays zero.
    auto normalize_stage = [&](int st, int kt) {
        unsigned char* As = conv_dyn_smem + st * STAGE_BYTES;
        int ci, ky, kx;
        if (!conv_k_tap(s, kt * BK + kc * 8, ci, ky, kx)) return;
#pragma unroll
        for (int c = 0; c < A_PASSES; ++c)
            if (conv_inside(s, a_iy0[c] + ky, a_ix0[c] + kx))
                conv_norm_chunk<T>(s, a_b[c], ci, As + st_off + RPP * CONVB_ROW_BYTES * c);
    };

    float acc[4][NT][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (st < KT) load_stage(st, st);
        cp_async_commit();
    }

    // ldmatrix rows of this lane: A matrices (rows +0..7 | +8..15) x (k lo | k hi), B matrices
    // (k lo | k hi) x (n-tile nt | nt + 1); offsets for the two k16 halves of a stage. Adding
    // 16 rows (the next m or n-tile pair) keeps the swizzle, so that is a plain 1024-byte step.
    const int a_row = wm * 64 + (lane & 15), a_chunk = lane >> 4;
    const int b_row = wn * WN + (lane & 7) + ((lane >> 4) << 3), b_chunk = (lane >> 3) & 1;
    const int a_off[2] = {convb_off(a_row, a_chunk), convb_off(a_row, 2 + a_chunk)};
    const int b_off[2] = {convb_off(b_row, b_chunk), convb_off(b_row, 2 + b_chunk)};

    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<S - 2>();
        if (s.norm != nullptr) normalize_stage(kt % S, kt);
        __syncthreads();
        if (kt + S - 1 < KT) load_stage((kt + S - 1) % S, kt + S - 1);
        cp_async_commit();

        const unsigned char* As = conv_dyn_smem + (kt % S) * STAGE_BYTES;
        const unsigned char* Bs = As + A_BYTES;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            unsigned a[4][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) ldsm_x4(a[mt], As + a_off[kk] + 16 * CONVB_ROW_BYTES * mt);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned r[4];
                ldsm_x4(r, Bs + b_off[kk] + 16 * CONVB_ROW_BYTES * np);
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a[mt], b[nt]);
        }
    }
    cp_async_wait<0>();  // only empty groups can remain; drain them before the block exits

    const unsigned long long yr =
        reinterpret_cast<unsigned long long>(y) | reinterpret_cast<unsigned long long>(residual);
    const bool pair = (yr & 3ull) == 0;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + wm * 64 + mt * 16 + g + 8 * h;
                const int col = n0 + wn * WN + nt * 8 + 2 * q;
                conv_store2<T>(s, bias, residual, y, row, col, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1],
                               pair);
            }
    if (moments != nullptr)
        conv_channel_moments<T, BM, BN, THREADS>(s, y, m0, n0, moments, reinterpret_cast<Moments*>(conv_dyn_smem));
}

// ---------------------------------------------------------------------------------------------
// f32: SIMT tiles. Shared tiles k-major: As[kk][i] = A[m0 + i][k0 + kk], Bs[kk][j] =
// B[k0 + kk][n0 + j] (kk < 16). Thread (tr = tid / 16, tc = tid % 16) computes rows
// 8*tr .. 8*tr+7 and columns 4*tc .. 4*tc+3 of the tile (8 x 4 accumulators).
// Loads: element id = tid + 128*e, tile row id / 16, k id % 16 (consecutive threads read
// consecutive channels).
MCDM_DEV void conv2d_simt(const float* __restrict__ x, const float* __restrict__ x2, const float* __restrict__ w,
                          const float* __restrict__ bias, const float* residual, float* y, const ConvShape s,
                          float* __restrict__ moments) {
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
            As[kk][row] = load_a<float>(x, x2, s, m0 + row, k0 + kk);
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
    if (moments != nullptr)
        conv_channel_moments<float, CONV_BM, CONV_BN, CONV_THREADS>(s, y, m0, n0, moments,
                                                                   reinterpret_cast<Moments*>(&As[0][0]));
}

// ---------------------------------------------------------------------------------------------

#define CONV_SHAPE                                                                                 \
    conv_shape(n, h, w, cin, cout, ksize, stride, ho, wo, x2 != nullptr, cin1, up, res_up, res_down, norm, \
               norm_silu)

extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv2d_f32(MCDM_PARAMS(ConvArgs)) {
    conv2d_simt((const float*)x, (const float*)x2, (const float*)weight, bias, (const float*)residual, (float*)y,
                CONV_SHAPE, moments);
}

#define CONV_SMALL_ENTRY(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(CONV_THREADS) NAME(MCDM_PARAMS(ConvArgs)) {        \
        conv2d_mma<T>((const T*)x, (const T*)x2, (const T*)weight, bias, (const T*)residual, (T*)y,   \
                      CONV_SHAPE, moments);                                              \
    }
CONV_SMALL_ENTRY(conv2d_f16, __half)
CONV_SMALL_ENTRY(conv2d_bf16, __nv_bfloat16)

// Large-tile variants: V names the CONV_M*_ constants of one.
#define CONV_BIG_ENTRY(NAME, T, V)                                                                  \
    extern "C" __global__ void __launch_bounds__(V##_THREADS, V##_MIN_BLOCKS)                       \
        NAME(MCDM_PARAMS(ConvArgs)) {                                                               \
        conv2d_mma_big<T, V##_BM, V##_BN, V##_WN>((const T*)x, (const T*)x2, (const T*)weight, bias, \
                                                  (const T*)residual, (T*)y, CONV_SHAPE, moments);  \
    }
CONV_BIG_ENTRY(conv2d_m128n128_f16, __half, CONV_M128N128)
CONV_BIG_ENTRY(conv2d_m128n128_bf16, __nv_bfloat16, CONV_M128N128)
CONV_BIG_ENTRY(conv2d_m128n64_f16, __half, CONV_M128N64)
CONV_BIG_ENTRY(conv2d_m128n64_bf16, __nv_bfloat16, CONV_M128N64)
CONV_BIG_ENTRY(conv2d_m256n128_f16, __half, CONV_M256N128)
CONV_BIG_ENTRY(conv2d_m256n128_bf16, __nv_bfloat16, CONV_M256N128)
