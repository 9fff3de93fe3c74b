// kernels/peak.cu: peak_mma_{f16,bf16}, peak_fma_f32 (any grid, block PEAK_BLOCK) and copy_u4, against
// double references. The operands keep every sum exact, so the tolerance is 0.
#include "peak.cu"
#include "check.h"

Checker checker("peak");
Rng rng(17);

// Every accumulator of chain c: c + iters * 16 a b (a, b as rounded to T); per thread the sum
// over chains, then elements, in the kernel's order.
template <typename T>
void run_mma(decltype(&peak_mma_f16) kernel, int blocks, int iters, float a, float b) {
    std::vector<float> out((size_t)blocks * PEAK_BLOCK, NAN);
    const double ab = (double)to_float(from_float<T>(a)) * to_float(from_float<T>(b));
    double sum = 0;
    for (int c = 0; c < PEAK_CHAINS; ++c)
        for (int e = 0; e < 4; ++e) sum += c + iters * 16 * ab;
    const std::vector<double> ref(out.size(), sum);
    const auto t0 = std::chrono::steady_clock::now();
    const PeakArgs args{out.data(), iters, a, b};
    emu_launch({(unsigned)blocks, 1, 1}, {PEAK_BLOCK, 1, 1}, [&] { MCDM_CALL(kernel, PeakArgs, args); });
    char name[100];
    snprintf(name, sizeof name, "peak_mma_%s blocks%d iters%d a%g b%g", type_name<T>(), blocks, iters, a, b);
    checker.close(name, ref, widen(out), 0, seconds_since(t0));
}

void run_fma(int blocks, int iters, float b, float c) {
    std::vector<float> out((size_t)blocks * PEAK_BLOCK, NAN);
    double sum = 0;
    for (int j = 0; j < PEAK_CHAINS; ++j) {
        float x = (float)j;
        for (int i = 0; i < iters; ++i) x = std::fma(x, b, c);
        sum += x;
    }
    const std::vector<double> ref(out.size(), sum);
    const PeakArgs args{out.data(), iters, b, c};
    emu_launch_serial({(unsigned)blocks, 1, 1}, {PEAK_BLOCK, 1, 1}, [&] { MCDM_CALL(peak_fma_f32, PeakArgs, args); });
    char name[100];
    snprintf(name, sizeof name, "peak_fma_f32 blocks%d iters%d b%g c%g", blocks, iters, b, c);
    checker.close(name, ref, widen(out), 0, 0);
}

// n 16-byte words on `blocks` blocks: with 2 blocks (stride 512) n = 5000 runs the 4-way loop
// and then the tail; n = 300 only the tail, with idle threads.
void run_copy(int blocks, int n) {
    std::vector<float> x = uniform_values<float>((size_t)4 * n, rng, -1, 1);
    std::vector<float> y = nan_filled<float>(x.size());
    const CopyArgs args{x.data(), y.data(), n};
    emu_launch_serial({(unsigned)blocks, 1, 1}, {PEAK_BLOCK, 1, 1}, [&] { MCDM_CALL(copy_u4, CopyArgs, args); });
    checker.close("copy_u4 blocks" + std::to_string(blocks) + " words" + std::to_string(n), widen(x), widen(y), 0, 0);
}

int main() {
    run_mma<__half>(peak_mma_f16, 2, 5, 0.25f, 0.25f);
    run_mma<__nv_bfloat16>(peak_mma_bf16, 2, 5, 0.25f, 0.25f);
    run_mma<__half>(peak_mma_f16, 1, 3, -0.375f, 1.5f);
    run_mma<__nv_bfloat16>(peak_mma_bf16, 1, 0, 0.25f, 0.25f);
    run_fma(3, 9, 1.0f, 1.0f);
    run_fma(1, 6, 0.5f, 0.25f);
    run_copy(2, 5000);
    run_copy(2, 300);
    run_copy(1, 1);
    return checker.finish();
}
