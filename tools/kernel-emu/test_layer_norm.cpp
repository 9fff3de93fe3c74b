// kernels/layer_norm.cu: layer_norm_* (grid rows, block LN_THREADS) and gelu_* (grid
// ceil(len / GELU_THREADS), block GELU_THREADS), against double references.
#include "layer_norm.cu"
#include "check.h"

Checker checker("layer_norm");
Rng rng(31);

template <typename T, typename Kernel>
void run_layer_norm(Kernel kernel, int rows, int width, float offset, bool in_place) {
    const float eps = 1e-12f;  // BERT's
    std::vector<double> x;
    auto xs = stored_values<T>((size_t)rows * width, [&](size_t) { return offset + rng.normal(); }, &x);
    std::vector<float> gamma(width), beta(width);
    for (auto& v : gamma) v = 1 + 0.2f * rng.normal();
    for (auto& v : beta) v = 0.2f * rng.normal();
    std::vector<double> ref(x.size());
    for (int r = 0; r < rows; ++r) {
        const double* row = &x[(size_t)r * width];
        double mean = 0, var = 0;
        for (int j = 0; j < width; ++j) mean += row[j] / width;
        for (int j = 0; j < width; ++j) var += (row[j] - mean) * (row[j] - mean) / width;
        for (int j = 0; j < width; ++j) ref[(size_t)r * width + j] = (row[j] - mean) / std::sqrt(var + eps) * gamma[j] + beta[j];
    }
    std::vector<T> ys = in_place ? xs : nan_filled<T>(xs.size());
    const T* xin = in_place ? ys.data() : xs.data();
    const auto t0 = std::chrono::steady_clock::now();
    const LayerNormArgs args{xin, gamma.data(), beta.data(), ys.data(), rows, width, eps};
    emu_launch({(unsigned)rows, 1, 1}, {LN_THREADS, 1, 1}, [&] { MCDM_CALL(kernel, LayerNormArgs, args); });
    char name[100];
    snprintf(name, sizeof name, "layer_norm_%s rows%d width%d offset %g%s", type_name<T>(), rows, width, offset,
             in_place ? " in-place" : "");
    // f32: the row's shift keeps deviations exact, so the offset costs nothing.
    const double tol = std::is_same<T, float>::value ? 1e-5 : 2.5 * storage_eps<T>();
    checker.close(name, ref, widen(ys), tol, seconds_since(t0));
}

template <typename T, typename Kernel>
void run_gelu(Kernel kernel, long long len) {
    std::vector<double> x;
    auto xs = uniform_values<T>((size_t)len, rng, -6, 6, &x);
    std::vector<double> ref(x.size());
    for (size_t i = 0; i < x.size(); ++i) ref[i] = 0.5 * x[i] * (1 + std::erf(x[i] / std::sqrt(2.0)));
    const GeluArgs args{xs.data(), len};
    emu_launch_serial({(unsigned)((len + GELU_THREADS - 1) / GELU_THREADS), 1, 1}, {GELU_THREADS, 1, 1},
                      [&] { MCDM_CALL(kernel, GeluArgs, args); });
    const double tol = std::is_same<T, float>::value ? 1e-6 : storage_eps<T>();
    checker.close(std::string("gelu_") + type_name<T>() + " len" + std::to_string(len), ref, widen(xs), tol, 0);
}

int main() {
    run_layer_norm<float>(layer_norm_f32, 3, 384, 0, false);
    run_layer_norm<float>(layer_norm_f32, 2, 1000, 0, true);  // width not a multiple of the block
    run_layer_norm<float>(layer_norm_f32, 2, 768, 300, false);  // |mean| >> std
    run_layer_norm<float>(layer_norm_f32, 2, 5, 0, false);  // fewer elements than threads
    run_layer_norm<float>(layer_norm_f32, 1, 1, 0, false);  // var 0
    run_layer_norm<__half>(layer_norm_f16, 3, 384, 0, true);
    run_layer_norm<__half>(layer_norm_f16, 2, 130, 20, false);
    run_layer_norm<__nv_bfloat16>(layer_norm_bf16, 2, 384, 0, false);
    run_gelu<float>(gelu_f32, 1000);
    run_gelu<__half>(gelu_f16, 777);
    run_gelu<__nv_bfloat16>(gelu_bf16, 256);
    return checker.finish();
}
