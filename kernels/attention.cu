// Multi-head softmax attention of the AttentionBlock, flash style (online softmax, scores never
// stored beyond one 64-key tile). CPU reference: src/ops/attention.rs (`attend`).
//
//   attention_{f32,f16,bf16}(qkv, out, n, t, c, heads)
//   qkv [n, t, 3c] in the "new" order: q = channels [0, c), k = [c, 2c), v = [2c, 3c); head h
//       uses channels h*d .. h*d + d - 1 of each (d = c / heads, d <= 128, d % 8 == 0)
//   out [n, t, c]: out[b, i, h*d + j] = sum_s softmax_s(q_i . k_s / sqrt(d)) v_s[j]
//       (scores and softmax in f32; 16-bit types multiply P (rounded to T) by V on tensor cores)
//
// Launch (every type): grid (ceil(t / 64), heads, n), block 128 threads; block (qb, h, b)
// handles queries 64*qb .. 64*qb + 63 of head h of image b. Static shared memory: 35 KiB
// (f16/bf16), 16 KiB (f32).
#include "common.cuh"

#define ATT_BQ 64     // queries per block
#define ATT_BKV 64    // keys per tile (16-bit path)
#define ATT_DMAX 128  // largest head dimension
// Shared row strides in 16-bit elements. Ks rows (keys; also the Q staging rows) hold up to
// 128 dims + 8 padding = 272 bytes; Vt rows (dims) hold 64 keys + 8 = 144 bytes. Both are
// 16-byte aligned, and a fragment load (8 rows g x 4 words q) hits 32 distinct banks
// (row stride 68 resp. 36 words = 4 mod 32).
#define ATT_KS (ATT_DMAX + 8)
#define ATT_VS (ATT_BKV + 8)
// f32 path: keys staged per tile.
#define ATTF_BKV 16

// Loads 8 consecutive 16-bit elements (16 bytes): one vector load when `vec` (16-byte aligned
// source), else 8 scalar loads.
MCDM_DEV uint4 load8(const unsigned short* __restrict__ src, bool vec) {
    if (vec) return *reinterpret_cast<const uint4*>(src);
    uint4 r;
    r.x = (unsigned)src[0] | ((unsigned)src[1] << 16);
    r.y = (unsigned)src[2] | ((unsigned)src[3] << 16);
    r.z = (unsigned)src[4] | ((unsigned)src[5] << 16);
    r.w = (unsigned)src[6] | ((unsigned)src[7] << 16);
    return r;
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16, tensor cores. Warp wp owns query rows 16*wp .. 16*wp + 15 of the block.
//   S = Q K^T:  A = Q (16 x d, row-major), B = K^T (d x 64 keys; "col" = K rows [key][d]).
//   O += P V:   A = P (16 x 64 keys, from the S accumulators, rounded to T),
//               B = V (64 keys x d; "col" = V transposed, Vt[d][key]).
// The head dimension is padded to D16 = roundup(d, 16) with zeros for the k16 steps of Q K^T;
// O has d / 8 n8-tiles. Fragment/accumulator layouts: mma16816 in common.cuh (g = lane / 4,
// q = lane % 4): this thread holds rows g and g + 8 of the warp's 16, columns 2q, 2q + 1 of
// every 8-column tile.
template <typename T>
MCDM_DEV void attention_mma(const T* __restrict__ qkv_, T* __restrict__ out_, int n, int t, int c, int heads) {
    __shared__ __align__(16) unsigned short Ks[ATT_BKV][ATT_KS];   // K tile, and Q staging first
    __shared__ __align__(16) unsigned short Vt[ATT_DMAX][ATT_VS];  // V tile transposed
    const unsigned short* __restrict__ qkv = reinterpret_cast<const unsigned short*>(qkv_);
    unsigned short* __restrict__ out = reinterpret_cast<unsigned short*>(out_);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int q0 = blockIdx.x * ATT_BQ, h = blockIdx.y, b = blockIdx.z;
    if (b >= n || h >= heads) return;  // uniform per block
    const int d = c / heads;
    const int d16 = (d + 15) & ~15;  // padded head dim (<= 128)
    const int kd_steps = d16 / 16;   // k16 steps of Q K^T
    const int d_tiles = d / 8;       // n8 tiles of O
    const long long row_stride = 3LL * c;
    const unsigned short* qkv_b = qkv + (long long)b * t * row_stride;
    const bool vec = aligned16(qkv_);  // offsets below are multiples of 8 elements (c % 8 == 0)
    const float scale = 1.0f / sqrtf((float)d);

    // Stage Q (64 rows x d16, zero beyond t and d) in Ks, then keep this warp's A fragments.
    // Chunk id -> row id / (d16/8), dims 8 * (id % (d16/8)).
    {
        const int cpr = d16 / 8;  // chunks per row
        for (int id = tid; id < ATT_BQ * cpr; id += blockDim.x) {
            const int row = id / cpr, col = (id - row * cpr) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (q0 + row < t && col < d) v = load8(qkv_b + (q0 + row) * row_stride + h * d + col, vec);
            *reinterpret_cast<uint4*>(&Ks[row][col]) = v;
        }
    }
    __syncthreads();
    unsigned qa[ATT_DMAX / 16][4];
#pragma unroll
    for (int kd = 0; kd < ATT_DMAX / 16; ++kd) {
        if (kd < kd_steps) {
            const int r = warp * 16 + g, col = kd * 16 + 2 * q;
            qa[kd][0] = lds32(&Ks[r][col]);
            qa[kd][1] = lds32(&Ks[r + 8][col]);
            qa[kd][2] = lds32(&Ks[r][col + 8]);
            qa[kd][3] = lds32(&Ks[r + 8][col + 8]);
        } else {
            qa[kd][0] = qa[kd][1] = qa[kd][2] = qa[kd][3] = 0u;
        }
    }

    float o[ATT_DMAX / 8][4];
#pragma unroll
    for (int dt = 0; dt < ATT_DMAX / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m_lo = -MCDM_INF, m_hi = -MCDM_INF;  // running max of rows g and g + 8
    float l_lo = 0.0f, l_hi = 0.0f;            // this thread's part of the running sums

    for (int kv0 = 0; kv0 < t; kv0 += ATT_BKV) {
        __syncthreads();  // Q staging / the previous tile is no longer read
        // K tile: Ks[j][dims] = k of key kv0 + j (zero beyond t and d), chunks as for Q.
        {
            const int cpr = d16 / 8;
            for (int id = tid; id < ATT_BKV * cpr; id += blockDim.x) {
                const int j = id / cpr, col = (id - j * cpr) * 8;
                uint4 v = make_uint4(0u, 0u, 0u, 0u);
                if (kv0 + j < t && col < d) v = load8(qkv_b + (kv0 + j) * row_stride + c + h * d + col, vec);
                *reinterpret_cast<uint4*>(&Ks[j][col]) = v;
            }
        }
        // V tile transposed: Vt[dim][j] = v[key kv0 + j][dim] (zero beyond t). Chunk id ->
        // dims 8 * (id / 64), key id % 64 (a warp writes 32 consecutive keys of each row).
        for (int id = tid; id < ATT_BKV * d_tiles; id += blockDim.x) {
            const int j = id & (ATT_BKV - 1), col = (id >> 6) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (kv0 + j < t) v = load8(qkv_b + (kv0 + j) * row_stride + 2 * c + h * d + col, vec);
            const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                Vt[col + 2 * e][j] = (unsigned short)(words[e] & 0xffffu);
                Vt[col + 2 * e + 1][j] = (unsigned short)(words[e] >> 16);
            }
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows x 64 keys: s[nt] is keys 8*nt .. 8*nt + 7.
        float s[ATT_BKV / 8][4];
#pragma unroll
        for (int nt = 0; nt < ATT_BKV / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kd = 0; kd < ATT_DMAX / 16; ++kd) {
            if (kd < kd_steps) {
#pragma unroll
                for (int nt = 0; nt < ATT_BKV / 8; ++nt) {
                    unsigned kb[2];
                    kb[0] = lds32(&Ks[nt * 8 + g][kd * 16 + 2 * q]);
                    kb[1] = lds32(&Ks[nt * 8 + g][kd * 16 + 2 * q + 8]);
                    mma16816<T>(s[nt], qa[kd], kb);
                }
            }
        }

        // Scale, mask keys >= t, online softmax update (rows g: e = 0, 1; g + 8: e = 2, 3).
        float mx_lo = -MCDM_INF, mx_hi = -MCDM_INF;
#pragma unroll
        for (int nt = 0; nt < ATT_BKV / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kv0 + nt * 8 + 2 * q + (e & 1);
                const float v = key < t ? s[nt][e] * scale : -MCDM_INF;
                s[nt][e] = v;
                if (e < 2) mx_lo = fmaxf(mx_lo, v); else mx_hi = fmaxf(mx_hi, v);
            }
        // The 4 threads of a quad (same g) hold the 64 keys of the same two rows.
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
        }
        // Every tile has a key < t, so the new maxima are finite; exp(-inf) = 0 on the first tile.
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float corr_lo = expf(m_lo - mn_lo), corr_hi = expf(m_hi - mn_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= corr_lo;
        l_hi *= corr_hi;
#pragma unroll
        for (int dt = 0; dt < ATT_DMAX / 8; ++dt) {
            o[dt][0] *= corr_lo;
            o[dt][1] *= corr_lo;
            o[dt][2] *= corr_hi;
            o[dt][3] *= corr_hi;
        }
#pragma unroll
        for (int nt = 0; nt < ATT_BKV / 8; ++nt) {
            s[nt][0] = expf(s[nt][0] - mn_lo);
            s[nt][1] = expf(s[nt][1] - mn_lo);
            s[nt][2] = expf(s[nt][2] - mn_hi);
            s[nt][3] = expf(s[nt][3] - mn_hi);
            l_lo += s[nt][0] + s[nt][1];
            l_hi += s[nt][2] + s[nt][3];
        }

        // O += P V, k16 step ks = keys 16*ks .. 16*ks + 15 = S tiles 2ks (a0, a1) and 2ks+1 (a2, a3).
#pragma unroll
        for (int ks = 0; ks < ATT_BKV / 16; ++ks) {
            unsigned pa[4];
            pa[0] = pack2<T>(s[2 * ks][0], s[2 * ks][1]);
            pa[1] = pack2<T>(s[2 * ks][2], s[2 * ks][3]);
            pa[2] = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            pa[3] = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
            for (int dt = 0; dt < ATT_DMAX / 8; ++dt) {
                if (dt < d_tiles) {
                    unsigned vb[2];
                    vb[0] = lds32(&Vt[dt * 8 + g][ks * 16 + 2 * q]);
                    vb[1] = lds32(&Vt[dt * 8 + g][ks * 16 + 2 * q + 8]);
                    mma16816<T>(o[dt], pa, vb);
                }
            }
        }
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
    for (int dt = 0; dt < ATT_DMAX / 8; ++dt) {
        if (dt < d_tiles) {
            const int col = h * d + dt * 8 + 2 * q;  // and col + 1 (both < h*d + d: d % 8 == 0)
            if (row_lo < t) {
                const long long at = ((long long)b * t + row_lo) * c + col;
                const unsigned v = pack2<T>(o[dt][0] * inv_lo, o[dt][1] * inv_lo);
                out[at] = (unsigned short)(v & 0xffffu);
                out[at + 1] = (unsigned short)(v >> 16);
            }
            if (row_hi < t) {
                const long long at = ((long long)b * t + row_hi) * c + col;
                const unsigned v = pack2<T>(o[dt][2] * inv_hi, o[dt][3] * inv_hi);
                out[at] = (unsigned short)(v & 0xffffu);
                out[at + 1] = (unsigned short)(v >> 16);
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

extern "C" __global__ void __launch_bounds__(128)
    attention_f32(const float* __restrict__ qkv, float* __restrict__ out, int n, int t, int c, int heads) {
    attention_simt(qkv, out, n, t, c, heads);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_f16(const __half* __restrict__ qkv, __half* __restrict__ out, int n, int t, int c, int heads) {
    attention_mma<__half>(qkv, out, n, t, c, heads);
}

extern "C" __global__ void __launch_bounds__(128) attention_bf16(const __nv_bfloat16* __restrict__ qkv,
                                                                 __nv_bfloat16* __restrict__ out, int n,
                                                                 int t, int c, int heads) {
    attention_mma<__nv_bfloat16>(qkv, out, n, t, c, heads);
}
