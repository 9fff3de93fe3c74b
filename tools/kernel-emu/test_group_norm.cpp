// kernels/group_norm.cu: group_norm_partial_* -> group_norm_merge -> group_norm_apply_* with the
// launch geometry of src/ops/group_norm.rs (`stats_rows`, `forward`), against a double reference.
#include "group_norm.cu"
#include "check.h"

Checker checker("group_norm");
Rng rng(77);

// Pixels per block of the statistics kernel (src/ops/group_norm.rs `stats_rows`).
int stats_rows(int n, int hw) { return std::max(32, (n * hw + 1023) / 1024); }

struct GnCase {
    int n, hw, c;
    float offset, spread;  // x = offset + spread * N(0, 1) + a per-channel ramp
    bool scale_shift;
    int silu;
    bool in_place = false;  // y aliases x
    int c2 = 0;  // > 0: x is read as the concatenation of two tensors, the second of c2 channels
    int groups = 32;
};

template <typename T, typename Partial, typename Apply>
void run(Partial partial, Apply apply, const GnCase& k) {
    const int n = k.n, hw = k.hw, c = k.c, groups = k.groups, cg = c / groups;
    std::vector<double> x;
    auto xs = stored_values<T>((size_t)n * hw * c, [&](size_t i) { return k.offset + k.spread * rng.normal() + 0.3f * (i % c) / c; }, &x);
    std::vector<float> gamma(c), beta(c), ss((size_t)n * 2 * c);
    for (auto& v : gamma) v = 1 + 0.2f * rng.normal();
    for (auto& v : beta) v = 0.2f * rng.normal();
    for (auto& v : ss) v = 0.3f * rng.normal();

    const int rows = stats_rows(n, hw), chunks = (hw + rows - 1) / rows;
    std::vector<float> scratch((size_t)n * groups * (2 + 3 * chunks), NAN);  // stats, then part
    float* stats = scratch.data();
    float* part = stats + n * groups * 2;
    std::vector<T> ys = k.in_place ? xs : nan_filled<T>(xs.size());
    T* y = ys.data();
    const T* xin = k.in_place ? y : xs.data();
    // The split: the first c - c2 channels of each pixel in one tensor, the others in a second.
    const int c1 = c - k.c2;
    std::vector<T> first, second;
    if (k.c2 > 0) {
        for (size_t px = 0; px < (size_t)n * hw; ++px) {
            first.insert(first.end(), xs.begin() + px * c, xs.begin() + px * c + c1);
            second.insert(second.end(), xs.begin() + px * c + c1, xs.begin() + (px + 1) * c);
        }
        xin = first.data();
    }
    const T* x2in = k.c2 > 0 ? second.data() : nullptr;

    const auto t0 = std::chrono::steady_clock::now();
    const GroupNormStatsArgs stats_args{xin, part, hw, c, rows, x2in, c1, groups, cg};
    emu_launch({(unsigned)chunks, (unsigned)n, 1}, {GN_THREADS, 1, 1}, [&] { MCDM_CALL(partial, GroupNormStatsArgs, stats_args); });
    const GroupNormMergeArgs merge_args{part, stats, chunks, 1e-5f, groups};
    emu_launch({(unsigned)groups, (unsigned)n, 1}, {GN_MERGE_THREADS, 1, 1}, [&] { MCDM_CALL(group_norm_merge, GroupNormMergeArgs, merge_args); });
    const int per_block = GN_APPLY_THREADS * GN_VEC * GN_APPLY_ITERS;
    const GroupNormApplyArgs apply_args{
        xin, stats, gamma.data(), beta.data(), k.scale_shift ? ss.data() : nullptr, y, hw, c, k.silu, x2in, c1, groups, cg};
    emu_launch({(unsigned)((hw * c + per_block - 1) / per_block), (unsigned)n, 1}, {GN_APPLY_THREADS, 1, 1},
               [&] { MCDM_CALL(apply, GroupNormApplyArgs, apply_args); });
    // The same norm as the per-channel table a conv applies as it reads its input.
    std::vector<float> table((size_t)n * c * 2, NAN);
    const GroupNormChannelAffineArgs affine_args{
        stats, gamma.data(), beta.data(), k.scale_shift ? ss.data() : nullptr, table.data(), c, groups, cg};
    emu_launch({(unsigned)((c + GN_AFFINE_THREADS - 1) / GN_AFFINE_THREADS), (unsigned)n, 1}, {GN_AFFINE_THREADS, 1, 1},
               [&] { MCDM_CALL(group_norm_channel_affine, GroupNormChannelAffineArgs, affine_args); });
    const double secs = seconds_since(t0);

    // Reference statistics in double. The kernels store the mean in f32: y inherits that
    // rounding, |mean| 2^-24 (times rstd, gamma, 1 + scale), which large offsets make visible;
    // it is allowed as slack (4 half-ulps: the f32 merge adds a few roundings).
    std::vector<double> ref(x.size()), slack(x.size()), via_table(x.size()), mean_err, rstd_err, zeros;
    for (int b = 0; b < n; ++b)
        for (int g = 0; g < groups; ++g) {
            double s = 0, q = 0;
            const double count = (double)hw * cg;
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) s += x[((size_t)b * hw + p) * c + g * cg + j];
            const double mean = s / count;
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) q += std::pow(x[((size_t)b * hw + p) * c + g * cg + j] - mean, 2);
            const double rstd = 1 / std::sqrt(q / count + 1e-5);
            const double mean_storage = 4 * 0x1p-24 * std::fabs(mean);
            // Statistics: the mean's error in units of the std, rstd's relative error, both beyond
            // what the f32 means imply (Chan's merge subtracts them: their rounding, in units of the
            // std, reaches the variance too).
            const double storage_in_std = mean_storage * rstd;
            mean_err.push_back(std::max(0.0, std::fabs(stats[(b * groups + g) * 2] - mean) * rstd - storage_in_std));
            rstd_err.push_back(std::max(0.0, std::fabs(stats[(b * groups + g) * 2 + 1] / rstd - 1) - storage_in_std));
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) {
                    const int ch = g * cg + j;
                    const size_t i = ((size_t)b * hw + p) * c + ch;
                    double v = (x[i] - mean) * rstd * gamma[ch] + beta[ch];
                    double gain = std::fabs(gamma[ch]) * rstd;
                    if (k.scale_shift) {
                        v = v * (1 + ss[(size_t)b * 2 * c + ch]) + ss[(size_t)b * 2 * c + c + ch];
                        gain *= std::fabs(1 + ss[(size_t)b * 2 * c + ch]);
                    }
                    if (k.silu) v = v / (1 + std::exp(-v));  // slope <= 1.1
                    ref[i] = v;
                    const float* ma = &table[((size_t)b * c + ch) * 2];
                    double t = x[i] * ma[0] + ma[1];
                    via_table[i] = k.silu ? t / (1 + std::exp(-t)) : t;
                    slack[i] = 1.1 * gain * mean_storage;
                }
        }
    char name[200];
    snprintf(name, sizeof name, "n%d hw%d c%d groups %d offset %g spread %g rows %d chunks %d%s%s%s%s", n, hw, c, groups, k.offset,
             k.spread, rows, chunks, k.scale_shift ? " ss" : "", k.silu ? " silu" : "", k.in_place ? " in-place" : "",
             k.c2 ? (" x2 c" + std::to_string(k.c2)).c_str() : "");
    zeros.assign(mean_err.size(), 0.0);
    checker.close(std::string("group_norm stats (mean) ") + type_name<T>() + " " + name, zeros, mean_err, 1e-5, secs);
    checker.close(std::string("group_norm stats (rstd) ") + type_name<T>() + " " + name, zeros, rstd_err, 1e-5, 0);
    // 16-bit: the output's rounding to T, with room for the roundings of f32 math before it.
    const double tol = std::is_same<T, float>::value ? 1e-5 : 2.5 * storage_eps<T>();
    checker.close(std::string("group_norm_apply_") + type_name<T>() + " " + name, ref, widen(ys), tol, 0, &slack);
    // x * mul + add in f32 loses |mean| * rstd * gamma * 2^-24 a rounding (mul, add and the
    // sum: within the slack); otherwise only the statistics' error.
    checker.close(std::string("group_norm_channel_affine ") + type_name<T>() + " " + name, ref, via_table, 1e-5, 0, &slack);
}

// group_norm_partial_* -> group_norm_merge -> group_norm_apply_pool_* (a downsampling block's
// normalised branch, pooled 2x2 as it is written) against the double reference: group norm (+ SiLU),
// then the mean of each 2x2 window.
template <typename T, typename Partial, typename Pool>
void run_pool(Partial partial, Pool pool, int n, int h, int w, int c, int groups, int silu) {
    const int hw = h * w, cg = c / groups, ho = h / 2, wo = w / 2;
    std::vector<double> x;
    auto xs = stored_values<T>((size_t)n * hw * c, [&](size_t i) { return 0.5f + rng.normal() + 0.3f * (i % c) / c; }, &x);
    std::vector<float> gamma(c), beta(c);
    for (auto& v : gamma) v = 1 + 0.2f * rng.normal();
    for (auto& v : beta) v = 0.2f * rng.normal();
    const int rows = stats_rows(n, hw), chunks = (hw + rows - 1) / rows;
    std::vector<float> scratch((size_t)n * groups * (2 + 3 * chunks), NAN);
    float* stats = scratch.data();
    float* part = stats + n * groups * 2;
    std::vector<T> ys = nan_filled<T>((size_t)n * ho * wo * c);
    const auto t0 = std::chrono::steady_clock::now();
    const GroupNormStatsArgs stats_args{xs.data(), part, hw, c, rows, nullptr, c, groups, cg};
    emu_launch({(unsigned)chunks, (unsigned)n, 1}, {GN_THREADS, 1, 1}, [&] { MCDM_CALL(partial, GroupNormStatsArgs, stats_args); });
    const GroupNormMergeArgs merge_args{part, stats, chunks, 1e-5f, groups};
    emu_launch({(unsigned)groups, (unsigned)n, 1}, {GN_MERGE_THREADS, 1, 1}, [&] { MCDM_CALL(group_norm_merge, GroupNormMergeArgs, merge_args); });
    const int per_block = GN_APPLY_THREADS * GN_VEC;
    const GroupNormApplyPoolArgs pool_args{xs.data(), stats, gamma.data(), beta.data(), ys.data(), h, w, c, silu, groups, cg};
    emu_launch({(unsigned)((ho * wo * c + per_block - 1) / per_block), (unsigned)n, 1}, {GN_APPLY_THREADS, 1, 1},
               [&] { MCDM_CALL(pool, GroupNormApplyPoolArgs, pool_args); });
    const double secs = seconds_since(t0);

    std::vector<double> normed(x.size()), ref(ys.size());
    for (int b = 0; b < n; ++b)
        for (int g = 0; g < groups; ++g) {
            double s = 0, q = 0;
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) s += x[((size_t)b * hw + p) * c + g * cg + j];
            const double mean = s / ((double)hw * cg);
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) q += std::pow(x[((size_t)b * hw + p) * c + g * cg + j] - mean, 2);
            const double rstd = 1 / std::sqrt(q / ((double)hw * cg) + 1e-5);
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) {
                    const int ch = g * cg + j;
                    const size_t i = ((size_t)b * hw + p) * c + ch;
                    double v = (x[i] - mean) * rstd * gamma[ch] + beta[ch];
                    normed[i] = silu ? v / (1 + std::exp(-v)) : v;
                }
        }
    for (int b = 0; b < n; ++b)
        for (int oy = 0; oy < ho; ++oy)
            for (int ox = 0; ox < wo; ++ox)
                for (int ch = 0; ch < c; ++ch) {
                    auto at = [&](int y, int xx) { return normed[(((size_t)b * h + y) * w + xx) * c + ch]; };
                    ref[(((size_t)b * ho + oy) * wo + ox) * c + ch] =
                        0.25 * (at(2 * oy, 2 * ox) + at(2 * oy, 2 * ox + 1) + at(2 * oy + 1, 2 * ox) + at(2 * oy + 1, 2 * ox + 1));
                }
    char name[120];
    snprintf(name, sizeof name, "n%d h%d w%d c%d groups %d%s", n, h, w, c, groups, silu ? " silu" : "");
    const double tol = std::is_same<T, float>::value ? 1e-5 : 2.5 * storage_eps<T>();
    checker.close(std::string("group_norm_apply_pool_") + type_name<T>() + " " + name, ref, widen(ys), tol, secs);
}

// group_norm_merge_channels: per-channel moments as convs' epilogues make them (per row tile of
// hw / chunks pixels; a concatenation's two parts with their own tiles) against the group
// statistics of the same values in double: the mean's error in units of the std, rstd's relative
// error.
void run_merge_channels(int n, int hw, int c, int c1, int chunks, int chunks2, int groups, float offset) {
    const int cg = c / groups;
    std::vector<double> x((size_t)n * hw * c);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (float)(offset + rng.normal() + 0.3f * (i % c) / c);
    // Channels [lo, hi) of x in `ch_chunks` row tiles -> [n, ch_chunks, hi - lo, 3].
    auto moments = [&](int lo, int hi, int ch_chunks) {
        std::vector<float> part;
        const int rows = hw / ch_chunks;
        for (int b = 0; b < n; ++b)
            for (int k = 0; k < ch_chunks; ++k)
                for (int ch = lo; ch < hi; ++ch) {
                    double s = 0, q = 0;
                    for (int p = k * rows; p < (k + 1) * rows; ++p) s += x[((size_t)b * hw + p) * c + ch];
                    const double mean = s / rows;
                    for (int p = k * rows; p < (k + 1) * rows; ++p) q += std::pow(x[((size_t)b * hw + p) * c + ch] - mean, 2);
                    part.insert(part.end(), {(float)rows, (float)mean, (float)q});
                }
        return part;
    };
    const std::vector<float> part = moments(0, c1, chunks), part2 = c1 < c ? moments(c1, c, chunks2) : std::vector<float>();
    std::vector<float> stats((size_t)n * groups * 2, NAN);
    const auto t0 = std::chrono::steady_clock::now();
    const GroupNormMergeChannelsArgs args{part.data(), chunks, c1, part2.empty() ? nullptr : part2.data(), chunks2, c,
                                          stats.data(), 1e-5f, groups, cg};
    emu_launch({(unsigned)groups, (unsigned)n, 1}, {GN_MERGE_THREADS, 1, 1},
               [&] { MCDM_CALL(group_norm_merge_channels, GroupNormMergeChannelsArgs, args); });
    const double secs = seconds_since(t0);
    std::vector<double> mean_err, rstd_err;
    for (int b = 0; b < n; ++b)
        for (int g = 0; g < groups; ++g) {
            double s = 0, q = 0;
            const double count = (double)hw * cg;
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) s += x[((size_t)b * hw + p) * c + g * cg + j];
            const double mean = s / count;
            for (int p = 0; p < hw; ++p)
                for (int j = 0; j < cg; ++j) q += std::pow(x[((size_t)b * hw + p) * c + g * cg + j] - mean, 2);
            const double std = std::sqrt(q / count), rstd = 1 / std::sqrt(q / count + 1e-5);
            mean_err.push_back((stats[((size_t)b * groups + g) * 2] - mean) / std);
            rstd_err.push_back(stats[((size_t)b * groups + g) * 2 + 1] / rstd - 1);
        }
    char name[120];
    snprintf(name, sizeof name, "n%d hw%d c%d (%d + %d) chunks %d + %d groups %d offset %g", n, hw, c, c1, c - c1, chunks,
             chunks2, groups, offset);
    const std::vector<double> zeros(mean_err.size(), 0.0);
    checker.close(std::string("group_norm_merge_channels (mean) ") + name, zeros, mean_err, 1e-5, secs);
    checker.close(std::string("group_norm_merge_channels (rstd) ") + name, zeros, rstd_err, 1e-5, 0);
}

int main() {
    // n, hw, c, offset, spread, scale_shift, silu, in_place
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {2, 13, 64, 0, 1, true, 1});
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 1, 32, 0, 1, false, 0});  // one pixel: var 0
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 300, 96, 0, 1, false, 0});  // R = 2, 10 chunks
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {3, 100, 192, 0, 1, true, 1, true});
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 4096, 32, 0, 1, false, 1});  // 128 chunks, R = 8
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 70, 256, 0, 1, false, 0});  // c == block
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {2, 40, 384, 0, 1, true, 0});  // c > 256
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 33, 1536, 0, 1, false, 1});
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 9, 2048, 0, 1, false, 1});  // GN_MAX_CHANNELS
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 2048, 64, 100, 0.1f, false, 0});  // |mean| >> std
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {2, 777, 160, -50, 0.01f, true, 1});
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 1200, 320, 1000, 1, false, 0});  // 38 chunks
    run<__half>(group_norm_partial_f16, group_norm_apply_f16, {2, 130, 96, 0, 1, true, 1});
    run<__half>(group_norm_partial_f16, group_norm_apply_f16, {1, 64, 768, 3, 1, false, 1, true});
    run<__half>(group_norm_partial_f16, group_norm_apply_f16, {1, 100, 2048, 0, 1, true, 0});
    run<__nv_bfloat16>(group_norm_partial_bf16, group_norm_apply_bf16, {1, 200, 192, 0, 2, true, 1});
    run<__nv_bfloat16>(group_norm_partial_bf16, group_norm_apply_bf16, {2, 50, 640, 20, 1, false, 0});
    // The decoder's concatenation read from its two tensors (c1 = c - c2): in each case one
    // group has channels in both (c1 56 of groups of 3, 128 of 6, 256 of 12).
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {2, 37, 96, 0, 1, true, 1, false, 40});
    run<__half>(group_norm_partial_f16, group_norm_apply_f16, {1, 300, 192, 1, 1, false, 1, false, 64});
    run<__nv_bfloat16>(group_norm_partial_bf16, group_norm_apply_bf16, {2, 64, 384, 0, 1, true, 1, false, 128});
    // Other group counts (diffusers' norm_num_groups): groups of 4 channels (two per thread's pack),
    // one group, the most groups the kernels take (one per thread), 40-channel groups across a
    // concatenation.
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {2, 50, 16, 0, 1, true, 1, false, 0, 4});
    run<float>(group_norm_partial_f32, group_norm_apply_f32, {1, 300, 64, 2, 1, false, 0, false, 0, 1});
    run<__half>(group_norm_partial_f16, group_norm_apply_f16, {1, 40, 1024, 0, 1, false, 1, false, 0, 256});
    run<__nv_bfloat16>(group_norm_partial_bf16, group_norm_apply_bf16, {2, 30, 320, 0, 1, true, 0, false, 120, 8});
    // Pooled as normalised: odd output counts (a block's last threads idle), channels over the
    // block, other group counts.
    run_pool<float>(group_norm_partial_f32, group_norm_apply_pool_f32, 2, 6, 10, 64, 32, 1);
    run_pool<float>(group_norm_partial_f32, group_norm_apply_pool_f32, 1, 16, 16, 384, 32, 0);
    run_pool<__half>(group_norm_partial_f16, group_norm_apply_pool_f16, 2, 8, 4, 96, 8, 1);
    run_pool<__nv_bfloat16>(group_norm_partial_bf16, group_norm_apply_pool_bf16, 1, 12, 6, 128, 4, 1);
    // Per-channel moments from conv epilogues: one tensor (more items than threads: 32 chunks of
    // 12-channel groups); concatenations whose parts have their own tile counts, with groups in
    // the first part, across both, and wholly in the second; one group; |mean| >> std.
    run_merge_channels(2, 4096, 384, 384, 32, 0, 32, 0);
    run_merge_channels(1, 256, 96, 40, 4, 2, 32, 0.5f);
    run_merge_channels(2, 64, 64, 32, 1, 1, 4, 0);
    run_merge_channels(1, 512, 48, 16, 8, 2, 1, 0);
    run_merge_channels(1, 1024, 64, 64, 16, 0, 32, 20);
    return checker.finish();
}
