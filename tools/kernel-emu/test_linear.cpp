// kernels/linear.cu: linear_f32 (grid (ceil(out / LINEAR_OUTPUTS), ceil(n / LINEAR_ROWS)), block
// LINEAR_THREADS), timestep_embedding_f32, add_rows_f32 (grid n, block EMBEDDING_THREADS) and
// silu_f32, against double references.
#include "linear.cu"
#include "check.h"

Checker checker("linear");
Rng rng(7);

void run_linear(int n, int in, int out, int silu, bool bias) {
    std::vector<float> x((size_t)n * in), w((size_t)out * in), b(out), y((size_t)n * out, NAN);
    for (auto& v : x) v = rng.uniform(-3, 3);
    for (auto& v : w) v = rng.uniform();
    for (auto& v : b) v = rng.uniform();
    std::vector<double> ref(y.size());
    for (int i = 0; i < n; ++i)
        for (int o = 0; o < out; ++o) {
            double s = bias ? b[o] : 0.0;
            for (int k = 0; k < in; ++k) {
                double a = x[(size_t)i * in + k];
                if (silu) a = a / (1 + std::exp(-a));
                s += a * w[(size_t)o * in + k];
            }
            ref[(size_t)i * out + o] = s;
        }
    const auto t0 = std::chrono::steady_clock::now();
    const LinearArgs args{x.data(), w.data(), bias ? b.data() : nullptr, y.data(), n, in, out, silu};
    const dim3 grid{(unsigned)((out + LINEAR_OUTPUTS - 1) / LINEAR_OUTPUTS), (unsigned)((n + LINEAR_ROWS - 1) / LINEAR_ROWS), 1};
    emu_launch(grid, {LINEAR_THREADS, 1, 1}, [&] { MCDM_CALL(linear_f32, LinearArgs, args); });
    char name[100];
    snprintf(name, sizeof name, "linear_f32 n%d in%d out%d%s%s", n, in, out, silu ? " silu" : "", bias ? "" : " nobias");
    checker.close(name, ref, widen(y), 2e-5, seconds_since(t0));
}

// The arguments follow the documented f32 order (src/ops/embedding.rs), so a double cos / sin of
// the same f32 argument is the reference.
void run_timestep_embedding(int dim, int flip = 1, float shift = 0.f) {
    const std::vector<float> t = {0.f, 37.5f, 999.f};
    const int n = (int)t.size(), half = dim / 2;
    std::vector<float> y((size_t)n * dim, NAN);
    std::vector<double> ref(y.size(), 0.0);
    const float log_period = -(float)std::log(10000.0);
    const int cos_at = flip ? 0 : half, sin_at = flip ? half : 0;
    for (int r = 0; r < n; ++r)
        for (int i = 0; i < half; ++i) {
            const float freq = (float)std::exp((double)(log_period * (float)i / ((float)half - shift)));
            const float arg = t[r] * freq;
            ref[(size_t)r * dim + cos_at + i] = std::cos((double)arg);
            ref[(size_t)r * dim + sin_at + i] = std::sin((double)arg);
        }
    const TimestepArgs args{t.data(), y.data(), n, dim, flip, shift};
    emu_launch_serial({(unsigned)n, 1, 1}, {EMBEDDING_THREADS, 1, 1}, [&] { MCDM_CALL(timestep_embedding_f32, TimestepArgs, args); });
    checker.close("timestep_embedding_f32 dim" + std::to_string(dim) + (flip ? "" : " sin first") +
                      (shift != 0.f ? " shift" : ""),
                  ref, widen(y), 1e-6, 0);
}

int main() {
    run_linear(2, 300, 257, 1, true);
    run_linear(1, 2500, 130, 0, true);  // in > LINEAR_CHUNK: three staged chunks
    run_linear(11, 768, 100, 1, true);  // two row blocks, the second partial
    run_linear(16, 1100, 40, 0, false);
    run_linear(3, 5, 1, 1, false);
    run_timestep_embedding(7);
    run_timestep_embedding(128);
    run_timestep_embedding(640);  // more frequencies than threads
    run_timestep_embedding(128, 0, 1.f);  // diffusers' DDPM layout: [sin | cos], freq_shift 1
    {
        const int n = 4, dim = 300;
        std::vector<float> y((size_t)n * dim), table(5 * dim);
        // -1: no class; 5: past the table's 5 rows. Neither adds anything.
        const std::vector<long long> labels = {4, -1, 0, 5};
        for (auto& v : y) v = rng.uniform();
        for (auto& v : table) v = rng.uniform();
        std::vector<double> ref(y.begin(), y.end());
        for (int i = 0; i < n; ++i)
            if (labels[i] >= 0 && labels[i] < 5)
                for (int k = 0; k < dim; ++k) ref[(size_t)i * dim + k] += table[labels[i] * dim + k];
        const RowsArgs rows{y.data(), table.data(), labels.data(), n, dim, 5};
        emu_launch_serial({(unsigned)n, 1, 1}, {EMBEDDING_THREADS, 1, 1}, [&] { MCDM_CALL(add_rows_f32, RowsArgs, rows); });
        checker.close("add_rows_f32", ref, widen(y), 1e-7, 0);
        std::vector<double> silu_ref(y.size());
        for (size_t i = 0; i < y.size(); ++i) silu_ref[i] = y[i] / (1 + std::exp(-(double)y[i]));
        const SiluArgs silu{y.data(), (int)y.size()};
        emu_launch_serial({(unsigned)((y.size() + EMBEDDING_THREADS - 1) / EMBEDDING_THREADS), 1, 1},
                          {EMBEDDING_THREADS, 1, 1}, [&] { MCDM_CALL(silu_f32, SiluArgs, silu); });
        checker.close("silu_f32", silu_ref, widen(y), 1e-6, 0);
    }
    return checker.finish();
}
