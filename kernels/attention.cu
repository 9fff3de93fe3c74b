// Multi-head softmax attention of the AttentionBlock, flash style (online softmax, scores never
// stored beyond one key tile). CPU reference: src/ops/attention.rs (`attend`).
//
//   attention_{f32,f16,bf16}(AttentionArgs's fields), attention_d64_{f16,bf16} (d <= 64):
//   n images of t pixels, c channels, `heads` heads, and
//   qkv [n, t, 3c] in the "new" order: q = channels [0, c), k = [c, 2c), v = [2c, 3c); head h
//       uses channels h*d .. h*d + d - 1 of each (d = c / heads, d <= 128, d % 8 == 0)
//   out [n, t, c]: out[b, i, h*d + j] = sum_s softmax_s(q_i . k_s / sqrt(d)) v_s[j]
//       (scores and softmax in f32; 16-bit types multiply P (rounded to T) by V on tensor cores)
//
// Launch (every type): grid (ceil(t / 64), heads, n), block 128 threads; block (qb, h, b)
// handles queries 64*qb .. 64*qb + 63 of head h of image b. 16-bit: qkv 16-byte aligned, and
// ATT_SMEM(DMAX, BKV) bytes of dynamic shared memory (attention_d64_*: DMAX 64, BKV 64, 36 KiB;
// attention_{f16,bf16}: DMAX 128, BKV 32, 34 KiB; the ATT_*_DMAX and _BKV constants). f32:
// 16 KiB static.
#include "common.cuh"

#define AttentionArgs_FIELDS(F)                                                                     \
    F(const void* __restrict__, qkv) F(void* __restrict__, out) F(int, n) F(int, t) F(int, c)       \
    F(int, heads)
MCDM_ARGS(AttentionArgs)

#define ATT_BQ 64  // queries per block
#define ATT_THREADS 128
// The 16-bit kernels: head width and keys per tile of each.
#define ATT_WIDE_DMAX 128
#define ATT_WIDE_BKV 32
#define ATT_D64_DMAX 64
#define ATT_D64_BKV 64
// f32 path: largest head dimension, keys staged per tile.
#define ATT_DMAX 128
#define ATTF_BKV 16
// 16-bit path: a K or V tile row holds DMAX dims + 8 padding (16-byte aligned; the 8 rows an
// ldmatrix reads then start in 8 distinct 16-byte bank groups). Two stages of (K, V) tiles.
#define ATT_ROW_BYTES(DMAX) (((DMAX) + 8) * 2)
#define ATT_SMEM(DMAX, BKV) (2 * 2 * (BKV) * ATT_ROW_BYTES(DMAX))

extern __shared__ __align__(16) unsigned char att_dyn_smem[];

// ---------------------------------------------------------------------------------------------
// f16 / bf16, tensor cores. Warp wp owns query rows 16*wp .. 16*wp + 15 of the block.
//   S = Q K^T:  A = Q (16 x d, row-major, kept in registers), B = K^T (d x BKV keys: the K tile
//               [key][dim] read with ldmatrix).
//   O += P V:   A = P (16 x BKV keys, from the S accumulators, rounded to T),
//               B = V (BKV keys x d: the V tile [key][dim] read with ldmatrix.trans).
// K and V tiles arrive by cp.async, two stages: tile i+1 is in flight while tile i is used.
// The head dimension is padded to D16 = roundup(d, 16) with zeros for the k16 steps of Q K^T;
// O has d / 8 n8-tiles. Fragment/accumulator layouts: mma16816 in common.cuh (g = lane / 4,
// q = lane % 4): this thread holds rows g and g + 8 of the warp's 16, columns 2q, 2q + 1 of
// every 8-column tile. Scores are kept in log2 units (scaled by log2(e) / sqrt(d)), so the
// softmax's exponentials are exp2f.
template <typename T, int DMAX, int BKV>
MCDM_DEV void attention_mma(const T* __restrict__ qkv_, T* __restrict__ out_, int n, int t, int c, int heads) {
    constexpr int ROW = ATT_ROW_BYTES(DMAX);
    constexpr int STAGE = 2 * BKV * ROW;  // K tile, then V tile
    const unsigned short* __restrict__ qkv = reinterpret_cast<const unsigned short*>(qkv_);
    unsigned short* __restrict__ out = reinterpret_cast<unsigned short*>(out_);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int q0 = blockIdx.x * ATT_BQ, h = blockIdx.y, b = blockIdx.z;
    if (b >= n || h >= heads) return;  // uniform per block
    const int d = c / heads;
    const int d16 = (d + 15) & ~15;  // padded head dim (<= DMAX)
    const int kd_steps = d16 / 16;   // k16 steps of Q K^T
    const int d_tiles = d / 8;       // n8 tiles of O
    const int cpr = d16 / 8;         // 16-byte chunks per K / Q row
    const long long row_stride = 3LL * c;
    const unsigned short* qkv_b = qkv + (long long)b * t * row_stride + h * d;
    const float scale = 1.4426950408889634f / sqrtf((float)d);  // log2(e) / sqrt(d)

    // Stage Q (64 rows x d16, zero beyond t and d) at the start of the buffer, keep this warp's
    // A fragments, then free the buffer for the tiles.
    {
        unsigned char* qs = att_dyn_smem;
        for (int id = tid; id < ATT_BQ * cpr; id += blockDim.x) {
            const int row = id / cpr, col = (id - row * cpr) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (q0 + row < t && col < d) v = *reinterpret_cast<const uint4*>(qkv_b + (q0 + row) * row_stride + col);
            *reinterpret_cast<uint4*>(qs + row * ROW + col * 2) = v;
        }
    }
    __syncthreads();
    unsigned qa[DMAX / 16][4];
#pragma unroll
    for (int kd = 0; kd < DMAX / 16; ++kd) {
        const unsigned short* qs = reinterpret_cast<const unsigned short*>(att_dyn_smem);
        const int r = warp * 16 + g, col = kd * 16 + 2 * q;
        if (kd < kd_steps) {
            qa[kd][0] = lds32(qs + r * (ROW / 2) + col);
            qa[kd][1] = lds32(qs + (r + 8) * (ROW / 2) + col);
            qa[kd][2] = lds32(qs + r * (ROW / 2) + col + 8);
            qa[kd][3] = lds32(qs + (r + 8) * (ROW / 2) + col + 8);
        } else {
            qa[kd][0] = qa[kd][1] = qa[kd][2] = qa[kd][3] = 0u;
        }
    }
    __syncthreads();

    // Tile kt's K and V rows (zero beyond t; K also zero in dims d .. d16) into stage st.
    auto load_tile = [&](int kt, int st) {
        unsigned char* ks = att_dyn_smem + st * STAGE;
        unsigned char* vs = ks + BKV * ROW;
        const int kv0 = kt * BKV;
        for (int id = tid; id < BKV * cpr; id += blockDim.x) {
            const int j = id / cpr, col = (id - j * cpr) * 8;
            const bool key_ok = kv0 + j < t;
            const unsigned short* src = qkv_b + (long long)(key_ok ? kv0 + j : 0) * row_stride + c + col;
            cp_async16(ks + j * ROW + col * 2, src, key_ok && col < d);
            if (col < d) cp_async16(vs + j * ROW + col * 2, src + c, key_ok);
        }
    };

    float o[DMAX / 8][4];
#pragma unroll
    for (int dt = 0; dt < DMAX / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m_lo = -MCDM_INF, m_hi = -MCDM_INF;  // running max of rows g and g + 8 (log2 units)
    float l_lo = 0.0f, l_hi = 0.0f;            // this thread's part of the running sums

    // ldmatrix row addresses of this lane: matrix mi = lane / 8, row lane % 8.
    const int mi = lane >> 3, mr = lane & 7;
    const int tiles = (t + BKV - 1) / BKV;
    load_tile(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < tiles; ++kt) {
        // Prefetch tile kt + 1 into the other stage (freed by the barrier ending iteration
        // kt - 1), then wait for tile kt. One commit per iteration keeps the group count exact.
        if (kt + 1 < tiles) load_tile(kt + 1, (kt + 1) & 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const unsigned char* ks = att_dyn_smem + (kt & 1) * STAGE;
        const unsigned char* vs = ks + BKV * ROW;
        const int kv0 = kt * BKV;

        // S = Q K^T for this warp's 16 rows x BKV keys: s[nt] is keys 8*nt .. 8*nt + 7. One
        // ldmatrix.x4 gives the B fragments of two key tiles: matrices (keys +0..7 | +8..15) x
        // (dims lo | hi).
        float s[BKV / 8][4];
#pragma unroll
        for (int nt = 0; nt < BKV / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < DMAX / 16; ++kd) {
            if (kd < kd_steps) {
#pragma unroll
                for (int np = 0; np < BKV / 16; ++np) {
                    unsigned kb[4];
                    ldsm_x4(kb, ks + (np * 16 + (mi >> 1) * 8 + mr) * ROW + (kd * 16 + (mi & 1) * 8) * 2);
                    mma16816<T>(s[2 * np], qa[kd], kb);
                    mma16816<T>(s[2 * np + 1], qa[kd], kb + 2);
                }
            }
        }

        // Scale, mask keys >= t, online softmax update (rows g: e = 0, 1; g + 8: e = 2, 3).
        float mx_lo = -MCDM_INF, mx_hi = -MCDM_INF;
#pragma unroll
        for (int nt = 0; nt < BKV / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kv0 + nt * 8 + 2 * q + (e & 1);
                const float v = key < t ? s[nt][e] * scale : -MCDM_INF;
                s[nt][e] = v;
                if (e < 2) mx_lo = fmaxf(mx_lo, v); else mx_hi = fmaxf(mx_hi, v);
            }
        // The 4 threads of a quad (same g) hold the BKV keys of the same two rows.
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
        }
        // Every tile has a key < t, so the new maxima are finite; exp2(-inf) = 0 on the first tile.
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float corr_lo = exp2f(m_lo - mn_lo), corr_hi = exp2f(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= corr_lo;
        l_hi *= corr_hi;
#pragma unroll
        for (int dt = 0; dt < DMAX / 8; ++dt) {
            o[dt][0] *= corr_lo;
            o[dt][1] *= corr_lo;
            o[dt][2] *= corr_hi;
            o[dt][3] *= corr_hi;
        }
#pragma unroll
        for (int nt = 0; nt < BKV / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - mn_lo);
            s[nt][1] = exp2f(s[nt][1] - mn_lo);
            s[nt][2] = exp2f(s[nt][2] - mn_hi);
            s[nt][3] = exp2f(s[nt][3] - mn_hi);
            l_lo += s[nt][0] + s[nt][1];
            l_hi += s[nt][2] + s[nt][3];
        }

        // O += P V, k16 step ks = keys 16*ks .. 16*ks + 15 = S tiles 2ks (a0, a1) and 2ks+1
        // (a2, a3). ldmatrix.x4.trans gives the B fragments of two dim tiles: matrices
        // (keys +0..7 | +8..15) x (dim tile dt | dt + 1); an odd last tile takes .x2.
#pragma unroll
        for (int ks16 = 0; ks16 < BKV / 16; ++ks16) {
            unsigned pa[4];
            pa[0] = pack2<T>(s[2 * ks16][0], s[2 * ks16][1]);
            pa[1] = pack2<T>(s[2 * ks16][2], s[2 * ks16][3]);
            pa[2] = pack2<T>(s[2 * ks16 + 1][0], s[2 * ks16 + 1][1]);
            pa[3] = pack2<T>(s[2 * ks16 + 1][2], s[2 * ks16 + 1][3]);
            const unsigned char* vrow = vs + (ks16 * 16 + (mi & 1) * 8 + mr) * ROW;
#pragma unroll
            for (int dp = 0; dp < DMAX / 16; ++dp) {
                if (2 * dp + 1 < d_tiles) {
                    unsigned vb[4];
                    ldsm_x4_trans(vb, vrow + (2 * dp + (mi >> 1)) * 16);
                    mma16816<T>(o[2 * dp], pa, vb);
                    mma16816<T>(o[2 * dp + 1], pa, vb + 2);
                } else if (2 * dp < d_tiles) {
                    unsigned vb[2];
                    ldsm_x2_trans(vb, vrow + 2 * dp * 16);
                    mma16816<T>(o[2 * dp], pa, vb);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // Row sums over the quad, normalise, store rows < t.
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
        l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
        l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
    }
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
    const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;
#pragma unroll
    for (int dt = 0; dt < DMAX / 8; ++dt) {
        if (dt < d_tiles) {
            const int col = h * d + dt * 8 + 2 * q;  // and col + 1 (both < h*d + d: d % 8 == 0)
            if (row_lo < t) {
                const long long at = ((long long)b * t + row_lo) * c + col;
                *reinterpret_cast<unsigned*>(out + at) = pack2<T>(o[dt][0] * inv_lo, o[dt][1] * inv_lo);
            }
            if (row_hi < t) {
                const long long at = ((long long)b * t + row_hi) * c + col;
                *reinterpret_cast<unsigned*>(out + at) = pack2<T>(o[dt][2] * inv_hi, o[dt][3] * inv_hi);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f32, SIMT. Thread pair (2i, 2i+1) handles query q0 + i; thread `half` = tid % 2 owns the head
// dims j = 2*jj + half, jj < d/2 (interleaved, so the pair reads neighbouring banks). Each
// score is the pair's two partial dot products added (a + b == b + a: both threads get the same
// bits), so both run the same online softmax, one key at a time (the running max only moves,
// and O and l are only rescaled, when a score exceeds it). Keys staged in tiles of 16:
// Ks/Vs[key][dim].
MCDM_DEV void attention_simt(const float* __restrict__ qkv, float* __restrict__ out, int n, int t, int c,
                             int heads) {
    __shared__ float Ks[ATTF_BKV][ATT_DMAX];
    __shared__ float Vs[ATTF_BKV][ATT_DMAX];
    const int tid = threadIdx.x, half = tid & 1;
    const int q0 = blockIdx.x * ATT_BQ, h = blockIdx.y, b = blockIdx.z;
    if (b >= n || h >= heads) return;  // uniform per block
    const int d = c / heads, dh = d / 2;
    const int row = q0 + (tid >> 1);
    const long long row_stride = 3LL * c;
    const float* qkv_b = qkv + (long long)b * t * row_stride;
    const float scale = 1.0f / sqrtf((float)d);

    float qr[ATT_DMAX / 2], o[ATT_DMAX / 2];
#pragma unroll
    for (int jj = 0; jj < ATT_DMAX / 2; ++jj) {
        qr[jj] = (jj < dh && row < t) ? qkv_b[row * row_stride + h * d + 2 * jj + half] : 0.0f;
        o[jj] = 0.0f;
    }
    float m = -MCDM_INF, l = 0.0f;

    for (int kv0 = 0; kv0 < t; kv0 += ATTF_BKV) {
        __syncthreads();  // the previous tile is no longer read
        for (int id = tid; id < ATTF_BKV * d; id += blockDim.x) {
            const int j = id / d, col = id - j * d;
            const bool ok = kv0 + j < t;
            const float* src = qkv_b + (kv0 + j) * row_stride + h * d + col;
            Ks[j][col] = ok ? src[c] : 0.0f;
            Vs[j][col] = ok ? src[2 * c] : 0.0f;
        }
        __syncthreads();
        const int keys = min(ATTF_BKV, t - kv0);  // uniform: every lane shuffles every key
#pragma unroll 1
        for (int kk = 0; kk < keys; ++kk) {
            float part = 0.0f;
#pragma unroll
            for (int jj = 0; jj < ATT_DMAX / 2; ++jj)
                if (jj < dh) part += qr[jj] * Ks[kk][2 * jj + half];
            const float sc = (part + __shfl_xor_sync(0xffffffffu, part, 1)) * scale;
            if (sc > m) {  // same branch for both threads of the pair
                const float corr = expf(m - sc);  // 0 for the first key (m = -inf)
                l *= corr;
#pragma unroll
                for (int jj = 0; jj < ATT_DMAX / 2; ++jj) o[jj] *= corr;
                m = sc;
            }
            const float p = expf(sc - m);
            l += p;
#pragma unroll
            for (int jj = 0; jj < ATT_DMAX / 2; ++jj)
                if (jj < dh) o[jj] += p * Vs[kk][2 * jj + half];
        }
    }

    if (row < t) {
        const float inv = 1.0f / l;
        float* dst = out + ((long long)b * t + row) * c + h * d;
#pragma unroll
        for (int jj = 0; jj < ATT_DMAX / 2; ++jj)
            if (jj < dh) dst[2 * jj + half] = o[jj] * inv;
    }
}

// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_f32(MCDM_PARAMS(AttentionArgs)) {
    attention_simt((const float*)qkv, (float*)out, n, t, c, heads);
}

// V names the ATT_*_ constants of one variant.
#define MCDM_ATTENTION_MMA(NAME, T, V, MIN_BLOCKS)                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, MIN_BLOCKS)                          \
        NAME(MCDM_PARAMS(AttentionArgs)) {                                                         \
        attention_mma<T, V##_DMAX, V##_BKV>((const T*)qkv, (T*)out, n, t, c, heads);               \
    }

MCDM_ATTENTION_MMA(attention_f16, __half, ATT_WIDE, 2)
MCDM_ATTENTION_MMA(attention_bf16, __nv_bfloat16, ATT_WIDE, 2)
MCDM_ATTENTION_MMA(attention_d64_f16, __half, ATT_D64, 3)
MCDM_ATTENTION_MMA(attention_d64_bf16, __nv_bfloat16, ATT_D64, 3)
