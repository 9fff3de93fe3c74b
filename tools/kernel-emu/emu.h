// CPU emulation of the CUDA features kernels/*.cu use, so that their real source can be
// compiled with g++ and checked without a GPU (see README.md). One fiber per CUDA thread, all on
// the launching host thread and switched at barriers; the blocks of a launch one after another.
// Compile with -ffp-contract=off: step.cu, the file that must match the CPU bit for bit, is built
// with --fmad=false for the GPU too; elsewhere the GPU build may contract into FMAs, a last-bit
// difference that those kernels' tolerances cover.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>
#include <sys/mman.h>
#include "asan.h"
using std::max;
using std::min;

// ---------------------------------------------------------------------------------------------
// Language: qualifiers, built-in variables, vector types.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// A block's static shared arrays are function-local statics: blocks run one at a time, so one
// copy serves them all; prep.py follows each declaration with emu_shared_fresh (below), which
// refills the array for every block.
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// Plain globals: all CUDA threads run on the launching host thread, and the scheduler of
// emu_launch sets threadIdx (and swaps the per-thread state below) at every switch.
inline dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// 16-byte aligned as in CUDA's vector_types.h, so that UBSan flags a misaligned vector access,
// which faults on a GPU ("misaligned address").
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

// ---------------------------------------------------------------------------------------------
// Intrinsics. The explicitly rounded ones are plain IEEE operations on the CPU.

inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// 16-bit storage types, converted with round to nearest even.
struct __half {
    unsigned short b;
};
struct __nv_bfloat16 {
    unsigned short b;
};

// Exact by construction: the f16 exponent is rebiased and the mantissa moved into place (the
// hot path of the mma emulation, so no ldexp).
inline float half_bits_to_float(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000) << 16, exp = (h >> 10) & 31, mant = h & 1023;
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
    if (exp == 0) {                                                              // zero, subnormal
        const float v = (float)mant * 5.9604644775390625e-8f;                     // mant 2^-24, exact
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112) << 23) | (mant << 13));
}
inline unsigned short float_to_half_bits(float f) {
    const unsigned short sign = (__float_as_uint(f) >> 16) & 0x8000;
    if (std::isnan(f)) return 0x7e00;
    const double a = std::fabs((double)f);
    if (a >= 65520.0) return sign | 0x7c00;  // rounds to infinity
    // Round to a multiple of the f16 quantum of a's binade (2^-24 below the normal range);
    // scaling by a power of two is exact, so nearbyint does the whole rounding (ties to even).
    int e;
    std::frexp(a, &e);
    const double quantum = std::ldexp(1.0, std::max(e - 1, -14) - 10);
    const double v = std::nearbyint(a / quantum) * quantum;
    if (v == 0) return sign;
    std::frexp(v, &e);  // the rounding may have carried into the next binade
    if (e - 1 < -14) return sign | (unsigned short)(v / std::ldexp(1.0, -24));
    const unsigned mant = (unsigned)std::ldexp(v, 10 - (e - 1)) - 1024;
    return sign | (unsigned short)(((e - 1 + 15) << 10) | mant);
}
inline float __half2float(__half h) { return half_bits_to_float(h.b); }
inline __half __float2half_rn(float f) { return __half{float_to_half_bits(f)}; }
inline unsigned short __half_as_ushort(__half h) { return h.b; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.b << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
    const unsigned u = __float_as_uint(f);
    return __nv_bfloat16{(unsigned short)((u + 0x7fff + ((u >> 16) & 1)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.b; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }

// ---------------------------------------------------------------------------------------------
// Barriers and warp exchange.

// The CUDA threads of a block are fibers on the launching host thread (see emu_launch): a
// thread waiting at a barrier yields to the next one until the last arrives.
inline void emu_yield();
struct Barrier;
// Per thread of the running block: the barrier it waits at (null: none) and that barrier's
// generation then; the scheduler does not resume a thread whose barrier has not opened.
struct EmuWait {
    const Barrier* barrier = nullptr;
    long generation = 0;
};
inline std::vector<EmuWait> g_wait;
struct Barrier {
    int arrived = 0, size = 0;
    long generation = 0;
    void init(int n) {
        size = n;
        arrived = 0;
        generation = 0;
    }
    void wait() {
        const long g = generation;
        if (++arrived == size) {
            arrived = 0;
            ++generation;
        } else {
            g_wait[threadIdx.x] = {this, g};
            while (generation == g) emu_yield();
            g_wait[threadIdx.x].barrier = nullptr;
        }
    }
};
inline bool emu_waiting(int thread) {
    const EmuWait& w = g_wait[thread];
    return w.barrier != nullptr && w.barrier->generation == w.generation;
}
inline Barrier g_block_barrier;
inline Barrier g_warp_barrier[32];
// Set by emu_launch_serial, which runs threads one after another: a barrier there would hang.
inline bool g_serial_launch = false;

inline void emu_require_parallel(const char* what) {
    if (g_serial_launch) {
        fprintf(stderr, "EMU: %s in a kernel launched with emu_launch_serial; use emu_launch\n", what);
        abort();
    }
}

// Barrier phase of this thread: how many __syncthreads it has passed. The race checker of the
// dynamic shared memory compares phases.
inline int t_phase = 0;
inline void __syncthreads() {
    emu_require_parallel("__syncthreads");
    g_block_barrier.wait();
    ++t_phase;
}
inline int emu_warp() { return threadIdx.x / 32; }
inline int emu_lane() { return threadIdx.x % 32; }
inline void emu_warp_sync() {
    emu_require_parallel("a warp collective");
    g_warp_barrier[emu_warp()].wait();
}

// Exchange slots [warp][lane]: written before a warp barrier, read after it, and not rewritten
// before a second barrier.
inline float g_shfl_slot[32][32];
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const int w = emu_warp(), l = emu_lane();
    g_shfl_slot[w][l] = v;
    emu_warp_sync();
    const float r = g_shfl_slot[w][l ^ lane_mask];
    emu_warp_sync();
    return r;
}

// ---------------------------------------------------------------------------------------------
// Dynamic shared memory (extern __shared__, mapped here by prep.py): one buffer, filled with
// 0xFF bytes (NaN in f16, bf16 and f32) before every block. Shadow state per 16-byte chunk
// drives the race checker: cp.async writes and ldmatrix reads of one chunk must be separated by
// a __syncthreads, and a cp.async must be completed by its thread's wait_group before that.

constexpr size_t EMU_DYN_MAX = 256 * 1024;
alignas(1024) inline unsigned char g_dyn_smem[EMU_DYN_MAX];
inline size_t g_dyn_bytes = 0;  // the launch's dynamic size; accesses past it are errors
// cp.async modes: immediate (the data lands at the cp.async) or delayed (the destination is
// poisoned at the cp.async and the data lands at the wait_group that completes it).
inline bool g_cp_async_delayed = false;
inline std::atomic<long> g_emu_errors{0}, g_ldsm_conflicts{0}, g_ldsm_calls{0}, g_cp_async_calls{0};
inline std::atomic<int> g_chunk_in_flight[EMU_DYN_MAX / 16], g_chunk_completed_phase[EMU_DYN_MAX / 16],
    g_chunk_read_phase[EMU_DYN_MAX / 16];

inline void emu_error(const char* what, long chunk) {
    if (g_emu_errors.fetch_add(1) < 10)
        fprintf(stderr, "EMU ERROR: %s (chunk %ld, thread %u, block %u, phase %d)\n", what, chunk, threadIdx.x,
                blockIdx.x, t_phase);
}
// The 16-byte chunk index of a dynamic shared address, -1 for other memory.
inline long dyn_chunk(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < g_dyn_smem || c >= g_dyn_smem + EMU_DYN_MAX) return -1;
    const size_t off = c - g_dyn_smem;
    if (off + 16 > g_dyn_bytes) {
        emu_error("dynamic shared access past the launch's size", (long)(off / 16));
        return -1;
    }
    return (long)(off / 16);
}
// Under AddressSanitizer, plain loads and stores past the launch's dynamic size abort too.
inline void emu_dyn_smem_bound(size_t bytes) {
    g_dyn_bytes = bytes;
    ASAN_UNPOISON_MEMORY_REGION(g_dyn_smem, EMU_DYN_MAX);
    // From the end of the last 16-byte chunk: emu_block_start refills whole chunks.
    const size_t inside = std::min((bytes + 15) / 16 * 16, EMU_DYN_MAX);
    ASAN_POISON_MEMORY_REGION(g_dyn_smem + inside, EMU_DYN_MAX - inside);
}
inline long g_block_serial = 0;  // counts the blocks started, for emu_shared_fresh

// Called by every thread after the declaration of a static __shared__ array (prep.py adds the
// call, with a counter of its own per array): the first thread of a block to pass it fills the
// array with 0xff bytes, NaN in f32, f16 and bf16, so that reading an element the block has not
// written gives NaN (garbage on a GPU) rather than an earlier block's value.
inline void emu_shared_fresh(void* array, size_t bytes, long& filled_for_block) {
    if (filled_for_block == g_block_serial) return;
    filled_for_block = g_block_serial;
    memset(array, 0xff, bytes);
}

// Only the launch's dynamic size is reset: dyn_chunk rejects every access past it.
inline void emu_block_start() {
    ++g_block_serial;
    const size_t chunks = std::min((g_dyn_bytes + 15) / 16, EMU_DYN_MAX / 16);
    memset(g_dyn_smem, 0xff, 16 * chunks);
    for (size_t i = 0; i < chunks; ++i) {
        g_chunk_in_flight[i] = 0;
        g_chunk_completed_phase[i] = -1;
        g_chunk_read_phase[i] = -1;
    }
}

struct EmuCopy {
    unsigned char* dst;
    const unsigned char* src;
    bool valid;
    long chunk;
};
inline std::vector<EmuCopy> t_cp_open;                  // since the last commit
inline std::deque<std::vector<EmuCopy>> t_cp_committed;  // oldest group first

inline void emu_cp_async16(void* dst, const void* src, bool valid) {
    ++g_cp_async_calls;
    if ((reinterpret_cast<uintptr_t>(dst) & 15) != 0 || (valid && (reinterpret_cast<uintptr_t>(src) & 15) != 0)) {
        emu_error("cp.async address not 16-byte aligned", -1);
        return;
    }
    const EmuCopy e{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), valid, dyn_chunk(dst)};
    if (e.chunk >= 0) {
        if (g_chunk_read_phase[e.chunk] == t_phase) emu_error("cp.async into a chunk read in the same barrier phase", e.chunk);
        if (g_chunk_in_flight[e.chunk] != 0) emu_error("two cp.async in flight to one chunk", e.chunk);
        g_chunk_in_flight[e.chunk] += 1;
    }
    if (g_cp_async_delayed) memset(dst, 0xff, 16);  // the old contents are gone, the new not there yet
    else if (valid) memcpy(dst, src, 16);
    else memset(dst, 0, 16);
    t_cp_open.push_back(e);
}
inline void emu_cp_land(const EmuCopy& e) {
    if (g_cp_async_delayed) {
        if (e.valid) memcpy(e.dst, e.src, 16);
        else memset(e.dst, 0, 16);
    }
    if (e.chunk >= 0) {
        g_chunk_completed_phase[e.chunk] = t_phase;
        g_chunk_in_flight[e.chunk] -= 1;
    }
}
inline void emu_cp_commit() {
    t_cp_committed.push_back(std::move(t_cp_open));
    t_cp_open.clear();
}
// cp.async.wait_group n: all but the newest n committed groups have landed.
inline void emu_cp_wait(int n) {
    while ((int)t_cp_committed.size() > n) {
        for (const EmuCopy& e : t_cp_committed.front()) emu_cp_land(e);
        t_cp_committed.pop_front();
    }
}
inline void emu_thread_end() {
    bool pending = !t_cp_open.empty();
    for (const auto& g : t_cp_committed) pending |= !g.empty();
    if (pending) emu_error("cp.async copies still pending when the thread exits", -1);
}

// An ldmatrix row read (16 bytes of shared memory).
inline void emu_check_ldmatrix_read(const void* p) {
    const long c = dyn_chunk(p);
    if (c < 0) return;
    g_chunk_read_phase[c] = t_phase;
    if (g_chunk_in_flight[c] != 0) emu_error("read of a chunk whose cp.async is still in flight", c);
    else if (g_chunk_completed_phase[c] == t_phase) emu_error("read of a chunk completed in the same barrier phase", c);
}

// ldmatrix .x1/.x2/.x4: lane t gives the row address of row t % 8 of matrix t / 8 (lanes from
// 8 * count on are ignored); register j of lane l gets the 32-bit word (row l / 4, columns
// 2 (l % 4), +1) of matrix j, or with .trans (`trans`) the 16-bit elements (rows 2 (l % 4), +1;
// column l / 4), the first in the low half. Counts bank-conflicted matrices: the 8 rows of one
// matrix must cover the 8 distinct 16-byte bank groups of a 128-byte line.
inline const void* g_ldsm_row[32][32];
inline void emu_ldmatrix(unsigned* r, const void* p, int count, bool trans = false) {
    ++g_ldsm_calls;
    const int w = emu_warp(), l = emu_lane();
    g_ldsm_row[w][l] = p;
    emu_warp_sync();
    if (l < 8 * count) {
        if ((reinterpret_cast<uintptr_t>(p) & 15) != 0) emu_error("ldmatrix row address not 16-byte aligned", -1);
        emu_check_ldmatrix_read(p);
    }
    if (l == 0) {
        for (int j = 0; j < count; ++j) {
            unsigned groups = 0;
            for (int i = 0; i < 8; ++i) groups |= 1u << ((reinterpret_cast<uintptr_t>(g_ldsm_row[w][8 * j + i]) >> 4) & 7);
            if (groups != 0xffu) ++g_ldsm_conflicts;
        }
    }
    for (int j = 0; j < count; ++j) {
        if (trans) {
            unsigned short lo, hi;
            memcpy(&lo, static_cast<const unsigned char*>(g_ldsm_row[w][8 * j + 2 * (l % 4)]) + 2 * (l / 4), 2);
            memcpy(&hi, static_cast<const unsigned char*>(g_ldsm_row[w][8 * j + 2 * (l % 4) + 1]) + 2 * (l / 4), 2);
            r[j] = (unsigned)lo | ((unsigned)hi << 16);
        } else {
            const unsigned char* row = static_cast<const unsigned char*>(g_ldsm_row[w][8 * j + l / 4]);
            memcpy(&r[j], row + 4 * (l % 4), 4);
        }
    }
    emu_warp_sync();
}

// mma.sync m16n8k16 with 16-bit A/B and f32 accumulators: each lane decodes its own fragments,
// then gathers the rows of A and columns of B of its outputs from the PTX ISA fragment layouts
// (as documented in kernels/common.cuh) and accumulates D = A B + D in double, rounded to f32
// once. `to_float` decodes one 16-bit element; always inlined, so that each caller's constant
// `to_float` is too (the emulator's hot path).
inline float g_mma_a[32][32][8], g_mma_b[32][32][4];  // [warp][lane][2 register + half]
__attribute__((always_inline)) inline void emu_mma16816(float* d, const unsigned* a, const unsigned* b,
                                                        float (*to_float)(unsigned short)) {
    const int w = emu_warp(), l = emu_lane();
    for (int i = 0; i < 8; ++i) g_mma_a[w][l][i] = to_float(i % 2 ? a[i / 2] >> 16 : a[i / 2] & 0xffff);
    for (int i = 0; i < 4; ++i) g_mma_b[w][l][i] = to_float(i % 2 ? b[i / 2] >> 16 : b[i / 2] & 0xffff);
    emu_warp_sync();
    // A[row][k] is in lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8); B[k][col] in
    // lane 4 col + (k % 8) / 2, register k / 8; the low half holds the even k.
    const int g = l / 4, q = l % 4;
    float A[2][16], B[16][2];  // rows g, g + 8; columns 2q, 2q + 1
    for (int k = 0; k < 16; ++k) {
        for (int i = 0; i < 2; ++i) {
            A[i][k] = g_mma_a[w][4 * g + (k % 8) / 2][2 * (i + 2 * (k / 8)) + k % 2];
            B[k][i] = g_mma_b[w][4 * (2 * q + i) + (k % 8) / 2][2 * (k / 8) + k % 2];
        }
    }
    emu_warp_sync();
    for (int e = 0; e < 4; ++e) {  // d[e] = D[g + 8 (e >> 1)][2q + (e & 1)]
        double s = d[e];
        for (int k = 0; k < 16; ++k) s += (double)A[e >> 1][k] * B[k][e & 1];
        d[e] = (float)s;
    }
}

// ---------------------------------------------------------------------------------------------
// Launches. `kernel` is a callable running the kernel body for the current thread, e.g.
// [&] { conv2d_f16(x, w, ...); }.

// One fiber per CUDA thread of the running block, holding the per-thread state (t_phase,
// t_cp_open, t_cp_committed) while the fiber is switched out.
struct EmuFiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    char* stack = nullptr;
    bool finished = false;
    int phase = 0;
    std::vector<EmuCopy> cp_open;
    std::deque<std::vector<EmuCopy>> cp_committed;
};

// emu_switch(&from->sp, to->sp): saves the callee-saved registers and the FP control words on the
// current stack, switches stacks and restores the other side. ucontext's swapcontext would do,
// but it makes a sigprocmask system call per switch, and a block switches millions of times.
#if !defined(__x86_64__)
#error "emu.h: the fiber switch is written for x86-64"
#endif
// File-local symbol (no .globl): each translation unit that includes emu.h gets its own copy.
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

constexpr size_t EMU_FIBER_STACK = 256 * 1024;
inline std::vector<EmuFiber> g_fibers;  // grown to the largest block; stacks kept
inline void* g_scheduler_sp = nullptr;
inline EmuFiber* g_running = nullptr;
inline void (*g_fiber_body)(void*) = nullptr;
inline void* g_fiber_kernel = nullptr;

inline void emu_yield() { emu_switch(&g_running->sp, g_scheduler_sp); }
[[noreturn]] inline void emu_fiber_main() {
    g_fiber_body(g_fiber_kernel);
    emu_thread_end();
    g_running->finished = true;
    emu_switch(&g_running->sp, g_scheduler_sp);
    __builtin_unreachable();
}
// A fresh fiber's stack as emu_switch leaves a switched-out one: FP control words, six zeroed
// registers, then emu_fiber_main as the return address (with a slot above it, so that it starts
// with the stack alignment of a called function).
inline void emu_fiber_reset(EmuFiber& f) {
    void** top = reinterpret_cast<void**>(f.stack + EMU_FIBER_STACK);
    *--top = nullptr;
    *--top = reinterpret_cast<void*>(&emu_fiber_main);
    for (int i = 0; i < 6; ++i) *--top = nullptr;
    const uint32_t control[2] = {0x1f80, 0x037f};  // MXCSR and x87 defaults: exceptions masked
    memcpy(--top, control, 8);
    f.sp = top;
    f.finished = false;
    f.phase = 0;
}
inline void emu_fibers_reserve(size_t n) {
    while (g_fibers.size() < n) {
        // A guard page under each stack turns an overflow into a crash, not corruption.
        void* mem = mmap(nullptr, EMU_FIBER_STACK + 4096, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) {
            perror("EMU: fiber stack");
            abort();
        }
        mprotect(mem, 4096, PROT_NONE);
        g_fibers.emplace_back();
        g_fibers.back().stack = static_cast<char*>(mem) + 4096;
    }
}
// The order in which the threads of a block, and the blocks of a grid, run (EMU_SCHEDULE):
// `forward` (ascending), `reverse`, or `shuffle` (a fresh permutation for every round and every
// launch, from EMU_SEED). By default every thread runs in turn until it waits at a barrier, so
// the warps of a block advance together from one warp collective (mma, ldmatrix, shuffle) to
// the next; with the suffix `-by-warp` (e.g. `reverse-by-warp`) one warp at a time runs until
// all its threads wait at __syncthreads, so a warp finishes its barrier phase before the next
// starts. A kernel that reads, without a barrier between, shared memory another thread writes,
// or whose blocks depend on each other, is right in at most some of these schedules: on a GPU
// its result depends on timing.
enum class EmuOrder { forward, reverse, shuffle };
struct EmuSchedule {
    EmuOrder order = EmuOrder::forward;
    bool by_warp = false;
    uint64_t state = 0x9e3779b97f4a7c15ull;  // xorshift64 state for `shuffle`
};
inline EmuSchedule& emu_schedule() {
    static EmuSchedule s = [] {
        EmuSchedule r;
        std::string name = getenv("EMU_SCHEDULE") ? getenv("EMU_SCHEDULE") : "forward";
        const std::string suffix = "-by-warp";
        if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
            r.by_warp = true;
            name.resize(name.size() - suffix.size());
        }
        if (name == "forward") r.order = EmuOrder::forward;
        else if (name == "reverse") r.order = EmuOrder::reverse;
        else if (name == "shuffle") r.order = EmuOrder::shuffle;
        else {
            fprintf(stderr, "EMU: EMU_SCHEDULE=%s: expected forward, reverse or shuffle, optionally with -by-warp\n",
                    getenv("EMU_SCHEDULE"));
            abort();
        }
        if (const char* seed = getenv("EMU_SEED")) r.state ^= strtoull(seed, nullptr, 0) * 0xbf58476d1ce4e5b9ull;
        if (r.state == 0) r.state = 1;
        return r;
    }();
    return s;
}
// Fills `order` with 0 .. n-1 in the schedule's order.
inline void emu_order(std::vector<int>& order, int n) {
    order.resize(n);
    EmuSchedule& s = emu_schedule();
    for (int i = 0; i < n; ++i) order[i] = s.order == EmuOrder::reverse ? n - 1 - i : i;
    if (s.order != EmuOrder::shuffle) return;
    for (int i = n - 1; i > 0; --i) {
        s.state ^= s.state << 13;
        s.state ^= s.state >> 7;
        s.state ^= s.state << 17;
        std::swap(order[i], order[s.state % (uint64_t)(i + 1)]);
    }
}

// Resumes thread t until it waits at a barrier or ends; false if it had ended or waits at a
// barrier that has not opened.
inline bool emu_resume(int t) {
    EmuFiber& f = g_fibers[t];
    if (f.finished || emu_waiting(t)) return false;
    threadIdx = {(unsigned)t, 0, 0};
    std::swap(t_phase, f.phase);
    t_cp_open.swap(f.cp_open);
    t_cp_committed.swap(f.cp_committed);
    g_running = &f;
    emu_switch(&g_scheduler_sp, f.sp);
    std::swap(t_phase, f.phase);
    t_cp_open.swap(f.cp_open);
    t_cp_committed.swap(f.cp_committed);
    return true;
}

// Runs the block's threads in rounds, in the schedule's order, until all have ended.
inline void emu_run_block(int threads) {
    for (int t = 0; t < threads; ++t) emu_fiber_reset(g_fibers[t]);
    g_wait.assign(threads, EmuWait{});
    const bool by_warp = emu_schedule().by_warp;
    const int warps = (threads + 31) / 32;
    static std::vector<int> order, warp_order;
    for (;;) {
        bool ran = false;
        if (by_warp) {
            emu_order(warp_order, warps);
            for (const int w : warp_order) {
                const int lanes = std::min(32, threads - 32 * w);
                // This warp until each of its threads has ended or waits at __syncthreads.
                for (bool warp_ran = true; warp_ran;) {
                    warp_ran = false;
                    emu_order(order, lanes);
                    for (const int l : order) warp_ran |= emu_resume(32 * w + l);
                    ran |= warp_ran;
                }
            }
        } else {
            emu_order(order, threads);
            for (const int t : order) ran |= emu_resume(t);
        }
        int running = 0;
        for (int t = 0; t < threads; ++t) running += !g_fibers[t].finished;
        if (running == 0) return;
        if (!ran) {
            // Threads that returned early never arrive either: undefined behaviour on a GPU.
            fprintf(stderr, "EMU: deadlock in block (%u, %u, %u): %d threads wait at a barrier others never reach\n",
                    blockIdx.x, blockIdx.y, blockIdx.z, running);
            abort();
        }
    }
}

// The blocks of a grid in the schedule's order (x fastest in `forward`).
inline std::vector<dim3> emu_block_order(dim3 grid) {
    const long count = (long)grid.x * grid.y * grid.z;
    if (count > (1L << 30)) {
        fprintf(stderr, "EMU: a grid of %ld blocks\n", count);
        abort();
    }
    std::vector<int> order;
    emu_order(order, (int)count);
    std::vector<dim3> blocks;
    blocks.reserve(order.size());
    for (const int i : order)
        blocks.push_back({i % grid.x, i / grid.x % grid.y, i / (grid.x * grid.y)});
    return blocks;
}

template <typename F>
void emu_launch(dim3 grid, dim3 block, F kernel, size_t dynamic_shared_bytes = 0) {
    if (block.y != 1 || block.z != 1) {
        fprintf(stderr, "EMU: only 1-D blocks are modelled\n");
        abort();
    }
    gridDim = grid;
    blockDim = block;
    emu_dyn_smem_bound(dynamic_shared_bytes);
    g_serial_launch = false;
    const int threads = (int)block.x;
    emu_fibers_reserve(threads);
    g_fiber_body = [](void* k) { (*static_cast<F*>(k))(); };
    g_fiber_kernel = &kernel;
    for (const dim3 b : emu_block_order(grid)) {
        g_block_barrier.init(threads);
        for (int w = 0; w < (threads + 31) / 32; ++w) g_warp_barrier[w].init(std::min(32, threads - 32 * w));
        emu_block_start();
        blockIdx = b;
        emu_run_block(threads);
    }
    g_fiber_kernel = nullptr;  // `kernel` dies here
}

// For kernels without barriers, warp collectives or shared memory (elementwise ones): runs every
// thread in turn on the calling thread, much faster. A barrier or collective aborts.
template <typename F>
void emu_launch_serial(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    g_serial_launch = true;
    std::vector<int> threads;
    for (const dim3 b : emu_block_order(grid)) {
        emu_order(threads, (int)block.x);
        for (const int t : threads) {
            blockIdx = b;
            threadIdx = {(unsigned)t, 0, 0};
            kernel();
        }
    }
    g_serial_launch = false;
}
