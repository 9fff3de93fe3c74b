// kernels/attention.cu: attention_{f32,f16,bf16} and attention_d64_{f16,bf16} with the launch of
// src/ops/attention.rs (grid (ceil(t / 64), heads, n), block 128, the 16-bit kernels' dynamic
// shared memory), against a double softmax attention.
//   test_attention [delayed|immediate]   (cp.async data lands at its wait_group, or at once)
#include "attention.cu"
#include "check.h"

Checker checker("attention");
Rng rng(1234);

// 16-bit types round Q, K, V on input and P before P V: a few roundings of T.
template <typename T> double tolerance() { return std::is_same<T, float>::value ? 1e-5 : 6 * storage_eps<T>(); }

template <typename T, typename Kernel>
void run(Kernel kernel, size_t smem, int n, int t, int c, int heads) {
    const int d = c / heads;
    std::vector<double> qkv;
    auto qkvs = uniform_values<T>((size_t)n * t * 3 * c, rng, -2, 2, &qkv);
    auto outs = nan_filled<T>((size_t)n * t * c);
    std::vector<double> ref(outs.size());
    auto at = [&](int b, int key, int part, int hh, int k) { return qkv[((size_t)b * t + key) * 3 * c + part * c + hh * d + k]; };
    for (int b = 0; b < n; ++b)
        for (int hh = 0; hh < heads; ++hh)
            for (int i = 0; i < t; ++i) {
                std::vector<double> p(t);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < t; ++j) {
                    double dot = 0;
                    for (int k = 0; k < d; ++k) dot += at(b, i, 0, hh, k) * at(b, j, 1, hh, k);
                    p[j] = dot / std::sqrt((double)d);
                    mx = std::max(mx, p[j]);
                }
                for (double& v : p) sum += v = std::exp(v - mx);
                for (int k = 0; k < d; ++k) {
                    double o = 0;
                    for (int j = 0; j < t; ++j) o += p[j] * at(b, j, 2, hh, k);
                    ref[((size_t)b * t + i) * c + hh * d + k] = o / sum;
                }
            }
    const auto t0 = std::chrono::steady_clock::now();
    const AttentionArgs args{qkvs.data(), outs.data(), n, t, c, heads};
    emu_launch({(unsigned)((t + ATT_BQ - 1) / ATT_BQ), (unsigned)heads, (unsigned)n}, {ATT_THREADS, 1, 1},
               [&] { MCDM_CALL(kernel, AttentionArgs, args); }, smem);
    char name[120];
    snprintf(name, sizeof name, "attention_%s%s n%d t%d c%d heads%d (d%d)",
             smem == ATT_SMEM(ATT_D64_DMAX, ATT_D64_BKV) ? "d64_" : "",
             type_name<T>(), n, t, c, heads, d);
    checker.close(name, ref, widen(outs), tolerance<T>(), seconds_since(t0));
}

int main(int argc, char** argv) {
    g_cp_async_delayed = true;
    if (argc > 1) {
        const std::string a = argv[1];
        if (a == "immediate") g_cp_async_delayed = false;
        else if (a != "delayed") {
            fprintf(stderr, "usage: test_attention [delayed|immediate]\n");
            return 2;
        }
    }
    const size_t wide = ATT_SMEM(ATT_WIDE_DMAX, ATT_WIDE_BKV), d64 = ATT_SMEM(ATT_D64_DMAX, ATT_D64_BKV);
    // t: key tiles (64 or 32) with tails (5, 17, 65, 70, 100, 130); d: 8 .. 128, not always a
    // multiple of 16, with an odd number of 8-wide tiles (d 8, 24, 40, 120). d <= 64 takes the
    // d64 kernel in mcdm; the wide one serves any d and is checked on small ones too.
    run<float>(attention_f32, 0, 2, 70, 48, 2);
    run<float>(attention_f32, 0, 1, 5, 128, 1);
    run<float>(attention_f32, 0, 1, 17, 256, 2);
    run<__half>(attention_d64_f16, d64, 2, 70, 48, 2);
    run<__half>(attention_f16, wide, 1, 5, 128, 1);
    run<__half>(attention_d64_f16, d64, 1, 130, 64, 1);
    run<__half>(attention_f16, wide, 1, 17, 256, 2);
    run<__half>(attention_d64_f16, d64, 1, 9, 32, 4);
    run<__half>(attention_f16, wide, 1, 100, 120, 1);
    run<__half>(attention_f16, wide, 2, 70, 80, 2);
    run<__nv_bfloat16>(attention_d64_bf16, d64, 2, 70, 48, 2);
    run<__nv_bfloat16>(attention_d64_bf16, d64, 1, 65, 64, 1);
    run<__nv_bfloat16>(attention_bf16, wide, 1, 130, 64, 1);
    run<__nv_bfloat16>(attention_bf16, wide, 1, 33, 96, 1);
    return checker.finish();
}
