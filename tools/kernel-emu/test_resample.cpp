// kernels/resample.cu: upsample2x, avgpool2x, concat_channels, add_channel_bias (grid
// ceil(outputs / V / RESAMPLE_THREADS), block RESAMPLE_THREADS; V = RESAMPLE_VEC channels a
// thread where src/ops/resample.rs sets `vec`: every channel count a multiple of it), against
// double references.
#include "resample.cu"
#include "check.h"

Checker checker("resample");
Rng rng(99);

dim3 grid_for(size_t outputs, int vec) {
    const size_t threads = vec ? (outputs + RESAMPLE_VEC - 1) / RESAMPLE_VEC : outputs;
    return {(unsigned)((threads + RESAMPLE_THREADS - 1) / RESAMPLE_THREADS), 1, 1};
}
const dim3 block{RESAMPLE_THREADS, 1, 1};

template <typename T, typename Up, typename Pool, typename Cat, typename Bias>
void run(Up up, Pool pool, Cat cat, Bias add_bias, int n, int h, int w, int c) {
    const int vec = c % 8 == 0;  // and the skip of the concat below: c + 8
    char shape[64];
    snprintf(shape, sizeof shape, "_%s n%d %dx%d c%d%s", type_name<T>(), n, h, w, c, vec ? " vec" : "");
    std::vector<double> x;
    auto xs = uniform_values<T>((size_t)n * h * w * c, rng, -1, 1, &x);
    auto X = [&](int b, int yy, int xx, int ch) { return x[(((size_t)b * h + yy) * w + xx) * c + ch]; };
    {
        auto ys = nan_filled<T>((size_t)n * 4 * h * w * c);
        std::vector<double> ref(ys.size());
        for (int b = 0; b < n; ++b)
            for (int yo = 0; yo < 2 * h; ++yo)
                for (int xo = 0; xo < 2 * w; ++xo)
                    for (int ch = 0; ch < c; ++ch) ref[(((size_t)b * 2 * h + yo) * 2 * w + xo) * c + ch] = X(b, yo / 2, xo / 2, ch);
        const ResampleArgs args{xs.data(), ys.data(), n, h, w, c, vec};
        emu_launch_serial(grid_for(ys.size(), vec), block, [&] { MCDM_CALL(up, ResampleArgs, args); });
        checker.close(std::string("upsample2x") + shape, ref, widen(ys), 0, 0);
    }
    {
        const int ho = h / 2, wo = w / 2;  // an odd last row / column is dropped
        auto ys = nan_filled<T>((size_t)n * ho * wo * c);
        std::vector<double> ref(ys.size());
        for (int b = 0; b < n; ++b)
            for (int yo = 0; yo < ho; ++yo)
                for (int xo = 0; xo < wo; ++xo)
                    for (int ch = 0; ch < c; ++ch)
                        ref[(((size_t)b * ho + yo) * wo + xo) * c + ch] =
                            (X(b, 2 * yo, 2 * xo, ch) + X(b, 2 * yo, 2 * xo + 1, ch) + X(b, 2 * yo + 1, 2 * xo, ch) +
                             X(b, 2 * yo + 1, 2 * xo + 1, ch)) * 0.25;
        const ResampleArgs args{xs.data(), ys.data(), n, h, w, c, vec};
        emu_launch_serial(grid_for(ys.size(), vec), block, [&] { MCDM_CALL(pool, ResampleArgs, args); });
        checker.close(std::string("avgpool2x") + shape, ref, widen(ys), 2 * storage_eps<T>(), 0);
    }
    {
        const int cb = c + (vec ? 8 : 3);
        std::vector<double> skip;
        auto skips = uniform_values<T>((size_t)n * h * w * cb, rng, -1, 1, &skip);
        auto ys = nan_filled<T>((size_t)n * h * w * (c + cb));
        std::vector<double> ref(ys.size());
        for (size_t p = 0; p < (size_t)n * h * w; ++p) {
            for (int ch = 0; ch < c; ++ch) ref[p * (c + cb) + ch] = x[p * c + ch];
            for (int ch = 0; ch < cb; ++ch) ref[p * (c + cb) + c + ch] = skip[p * cb + ch];
        }
        const ConcatArgs args{xs.data(), skips.data(), ys.data(), n, h * w, c, cb, vec};
        emu_launch_serial(grid_for(ys.size(), vec), block, [&] { MCDM_CALL(cat, ConcatArgs, args); });
        checker.close(std::string("concat_channels") + shape, ref, widen(ys), 0, 0);
    }
    {
        std::vector<float> bias((size_t)n * c);
        for (auto& v : bias) v = rng.uniform();
        std::vector<T> ys = xs;  // in place
        std::vector<double> ref(ys.size());
        for (size_t i = 0; i < ys.size(); ++i) ref[i] = x[i] + bias[(i / ((size_t)h * w * c)) * c + i % c];
        const BiasArgs args{ys.data(), bias.data(), n, h * w, c, vec};
        emu_launch_serial(grid_for(ys.size(), vec), block, [&] { MCDM_CALL(add_bias, BiasArgs, args); });
        checker.close(std::string("add_channel_bias") + shape, ref, widen(ys), storage_eps<T>(), 0);
    }
}

int main() {
    run<float>(upsample2x_f32, avgpool2x_f32, concat_channels_f32, add_channel_bias_f32, 2, 3, 5, 7);
    run<__half>(upsample2x_f16, avgpool2x_f16, concat_channels_f16, add_channel_bias_f16, 1, 4, 6, 8);
    run<__nv_bfloat16>(upsample2x_bf16, avgpool2x_bf16, concat_channels_bf16, add_channel_bias_bf16, 2, 4, 4, 3);
    // Eight channels a thread.
    run<float>(upsample2x_f32, avgpool2x_f32, concat_channels_f32, add_channel_bias_f32, 2, 3, 5, 16);
    run<__half>(upsample2x_f16, avgpool2x_f16, concat_channels_f16, add_channel_bias_f16, 1, 6, 4, 8);
    run<__nv_bfloat16>(upsample2x_bf16, avgpool2x_bf16, concat_channels_bf16, add_channel_bias_bf16, 3, 5, 7, 24);
    return checker.finish();
}
