// kernels/step.cu: fill_normals and diffusion_step (grid ceil(b * len / 256), block 256). The
// kernels are specified bit for bit against src/rng.rs and src/diffusion/step.rs; that is the
// GPU tests' job. Here: Philox4x32-10 of common.cuh against the Random123 known answers, the
// normals against an independent Philox + double Box-Muller, and every DDIM / DDPM / solver
// branch against a double evaluation of the same update on the same StepParams.
#include "step.cu"
#include "check.h"

Checker checker("step");
Rng rng(11);

struct Words {
    unsigned w[4];
};

// Philox4x32-10 from Salmon et al. (SC'11), written independently of common.cuh.
Words philox_reference(Words ctr, unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = 0xD2511F53ull * ctr.w[0], p1 = 0xCD9E8D57ull * ctr.w[2];
        ctr = {{(unsigned)(p1 >> 32) ^ ctr.w[1] ^ k0, (unsigned)p1, (unsigned)(p0 >> 32) ^ ctr.w[3] ^ k1, (unsigned)p0}};
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return ctr;
}

// The stream layout of src/rng.rs (module docs), evaluated in double.
double normal_reference(unsigned long long e, unsigned image, unsigned step, unsigned long long seed) {
    const Words w = philox_reference({{(unsigned)(e / 4), image, step, 0}}, (unsigned)seed, (unsigned)(seed >> 32));
    const int lane = (int)(e % 4);
    const unsigned a = w.w[lane < 2 ? 0 : 2], b = w.w[lane < 2 ? 1 : 3];
    const double u = ((a >> 8) + 1) * 0x1p-24, v = (b >> 8) * 0x1p-24;
    const double r = std::sqrt(-2 * std::log(u));
    return lane & 1 ? r * std::sin(2 * M_PI * v) : r * std::cos(2 * M_PI * v);
}

void check_philox_known_answers() {
    // tests/kat_vectors of the Random123 distribution: counter, key, result.
    const unsigned kat[3][10] = {
        {0, 0, 0, 0, 0, 0, 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0, 0xd16cfe09, 0x94fdcceb, 0x5001e420,
         0x24126ea1},
    };
    bool kernel_ok = true, reference_ok = true;
    for (const auto& k : kat) {
        const Philox4 got = philox4x32_10(k[0], k[1], k[2], k[3], k[4], k[5]);
        const Words ref = philox_reference({{k[0], k[1], k[2], k[3]}}, k[4], k[5]);
        for (int i = 0; i < 4; ++i) {
            kernel_ok &= got.w[i] == k[6 + i];
            reference_ok &= ref.w[i] == k[6 + i];
        }
    }
    checker.record("philox4x32_10 (common.cuh) Random123 known answers", kernel_ok, kernel_ok ? "3 of 3" : "mismatch", 0);
    checker.record("philox reference of this test, Random123 known answers", reference_ok, reference_ok ? "3 of 3" : "mismatch", 0);
}

dim3 grid_for(long long elements) { return {(unsigned)((elements + STEP_THREADS - 1) / STEP_THREADS), 1, 1}; }
const dim3 block{STEP_THREADS, 1, 1};

void check_fill_normals(int b, int len, int first, unsigned long long seed, unsigned step) {
    std::vector<float> out((size_t)b * len, NAN);
    std::vector<double> ref(out.size());
    for (int k = 0; k < b; ++k)
        for (int e = 0; e < len; ++e) ref[(size_t)k * len + e] = normal_reference(e, first + k, step, seed);
    const auto t0 = std::chrono::steady_clock::now();
    const NormalsArgs args{out.data(), b, len, first, (unsigned)seed, (unsigned)(seed >> 32), step};
    emu_launch_serial(grid_for(out.size()), block, [&] { MCDM_CALL(fill_normals, NormalsArgs, args); });
    char name[100];
    snprintf(name, sizeof name, "fill_normals b%d len%d first%d step %08x", b, len, first, step);
    checker.close(name, ref, widen(out), 2e-6, seconds_since(t0));  // f32 ln / sincos polynomials
}

struct StepCase {
    int mode, predict_xstart, clip;
    bool learned;  // DDPM learned-range variance (var != NULL)
    float eta;
    int i;  // spaced step index: i > 0 adds noise (DDIM: when sigma != 0)
    int terms;
    bool in_place;
};

// StepParams as the host fills them (common.cuh) from a made-up schedule at step i.
StepParams params_for(const StepCase& c, unsigned long long seed) {
    const double abar = 0.3 + 0.05 * c.i, abar_prev = abar + 0.07;
    StepParams p{};
    p.mode = c.mode;
    p.predict_xstart = c.predict_xstart;
    p.clip = c.clip;
    p.sqrt_recip = (float)std::sqrt(1 / abar);
    p.sqrt_recipm1 = (float)std::sqrt(1 / abar - 1);
    const float alpha_bar = (float)abar, alpha_bar_prev = (float)abar_prev;
    p.sigma = c.eta * std::sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * std::sqrt(1 - alpha_bar / alpha_bar_prev);
    p.sqrt_alpha_bar_prev = std::sqrt(alpha_bar_prev);
    p.eps_coef = std::sqrt(1 - alpha_bar_prev - p.sigma * p.sigma);
    p.coef1 = (float)(0.2 + 0.01 * c.i);
    p.coef2 = (float)(0.7 - 0.01 * c.i);
    const double log_var_clipped = std::log(0.015 + 0.001 * c.i);
    p.min_log = (float)log_var_clipped;
    p.max_log = (float)std::log(0.02 + 0.001 * c.i);
    p.noise_std = std::exp(0.5f * (float)log_var_clipped);
    p.add_noise = c.mode == 0 ? (c.i > 0 && p.sigma != 0) : c.i > 0;
    p.seed_lo = (unsigned)seed;
    p.seed_hi = (unsigned)(seed >> 32);
    p.step = 1000 + c.i;
    return p;
}

void check_step(const StepCase& c) {
    const int b = 2, len = 3 * 9 * 7, first = 1;
    const long long total = (long long)b * len;
    const unsigned long long seed = 0x123456789abcdef0ull;
    const StepParams p = params_for(c, seed);
    std::vector<float> x(total), eps((size_t)c.terms * total), var(total), out(total, NAN);
    const std::vector<float> weights = {1.5f, -0.5f};
    for (auto& v : x) v = rng.uniform(-3, 3);
    for (auto& v : eps) v = rng.uniform(-2, 2);
    for (auto& v : var) v = rng.uniform(-1, 1);

    std::vector<double> ref(total);
    for (long long idx = 0; idx < total; ++idx) {
        const double u = eps[(size_t)(c.terms - 1) * total + idx], xv = x[idx];
        double m = u;
        for (int t = 0; t + 1 < c.terms; ++t) m += weights[t] * (eps[(size_t)t * total + idx] - u);
        double x0 = p.predict_xstart ? m : p.sqrt_recip * xv - p.sqrt_recipm1 * m;
        if (p.clip) x0 = std::min(1.0, std::max(-1.0, x0));
        const double z = p.add_noise ? normal_reference(idx % len, first + idx / len, p.step, seed) : 0;
        if (p.mode == 0) {
            const double eps_dir = (p.sqrt_recip * xv - x0) / p.sqrt_recipm1;
            ref[idx] = x0 * p.sqrt_alpha_bar_prev + p.eps_coef * eps_dir + p.sigma * z;
        } else {
            const double frac = (var[idx] + 1) / 2;
            const double sd = c.learned ? std::exp(0.5 * (frac * p.max_log + (1 - frac) * p.min_log)) : p.noise_std;
            ref[idx] = p.coef1 * x0 + p.coef2 * xv + sd * z;
        }
    }
    float* dst = c.in_place ? x.data() : out.data();
    const StepArgs args{x.data(), eps.data(), c.terms > 1 ? weights.data() : nullptr, c.learned ? var.data() : nullptr,
                        dst, c.terms, b, len, first, p};
    emu_launch_serial(grid_for(total), block, [&] { MCDM_CALL(diffusion_step, StepArgs, args); });
    char name[120];
    snprintf(name, sizeof name, "diffusion_step %s xstart%d clip%d noise%d learned%d terms%d%s", c.mode ? "DDPM" : "DDIM",
             c.predict_xstart, c.clip, p.add_noise, (int)c.learned, c.terms, c.in_place ? " in-place" : "");
    checker.close(name, ref, widen(c.in_place ? x : out), 1e-5, 0);
}

// Mode 2 (the multistep solvers): x_0, UniPC's corrector when `corrector`, the predictor, and
// the history [h1, h2, last] rewritten, against a double evaluation on the same StepParams.
void check_multistep(int corrector, int predict_xstart, int clip, bool in_place) {
    const int b = 3, len = 3 * 5 * 4, first = 2, terms = 3;
    const long long total = (long long)b * len;
    StepParams p{};
    p.mode = 2;
    p.predict_xstart = predict_xstart;
    p.clip = clip;
    p.sqrt_recip = 1.7f;
    p.sqrt_recipm1 = 1.37f;
    p.corrector = corrector;
    float* coefs[8] = {&p.ca, &p.c0, &p.c1, &p.c2, &p.pa, &p.p0, &p.p1, &p.p2};
    for (float* f : coefs) *f = rng.uniform(-1.5f, 1.5f);
    std::vector<float> x(total), eps((size_t)terms * total), hist(3 * total), out(total, NAN);
    const std::vector<float> weights = {1.5f, -0.5f};
    for (auto& v : x) v = rng.uniform(-3, 3);
    for (auto& v : eps) v = rng.uniform(-2, 2);
    for (auto& v : hist) v = rng.uniform(-1, 1);
    std::vector<double> ref(total), ref_hist(3 * total);
    for (long long i = 0; i < total; ++i) {
        const double u = eps[(size_t)(terms - 1) * total + i], xv = x[i];
        double m = u;
        for (int t = 0; t + 1 < terms; ++t) m += weights[t] * (eps[(size_t)t * total + i] - u);
        double x0 = predict_xstart ? m : p.sqrt_recip * xv - p.sqrt_recipm1 * m;
        if (clip) x0 = std::min(1.0, std::max(-1.0, x0));
        const double h1 = hist[i], h2 = hist[total + i], last = hist[2 * total + i];
        const double xc = corrector ? p.ca * last + p.c0 * x0 + p.c1 * h1 + p.c2 * h2 : xv;
        ref[i] = p.pa * xc + p.p0 * x0 + p.p1 * h1 + p.p2 * h2;
        ref_hist[i] = x0;
        ref_hist[total + i] = h1;
        ref_hist[2 * total + i] = xc;
    }
    float* dst = in_place ? x.data() : out.data();
    const StepArgs args{x.data(), eps.data(), weights.data(), nullptr, dst, terms, b, len, first, p, hist.data()};
    emu_launch_serial(grid_for(total), block, [&] { MCDM_CALL(diffusion_step, StepArgs, args); });
    char name[120];
    snprintf(name, sizeof name, "diffusion_step solver corrector%d xstart%d clip%d%s", corrector, predict_xstart, clip,
             in_place ? " in-place" : "");
    checker.close(name, ref, widen(in_place ? x : out), 1e-5, 0);
    checker.close(std::string(name) + " history", ref_hist, widen(hist), 1e-5, 0);
}

int main() {
    check_philox_known_answers();
    check_fill_normals(3, 100003, 5, 0x123456789abcdef0ull, 0xFFFFFFFFu);  // x_T's step word
    check_fill_normals(2, 1001, 0, 42, 7);
    // mode, predict_xstart, clip, learned, eta, i, terms, in_place
    check_step({0, 0, 1, false, 1.0f, 5, 3, false});
    check_step({0, 0, 0, false, 0.0f, 5, 3, false});  // eta 0: no noise
    check_step({0, 1, 1, false, 0.5f, 3, 1, false});
    check_step({0, 0, 1, false, 1.0f, 0, 3, true});  // last step: no noise
    check_step({1, 0, 1, false, 0.0f, 5, 3, false});
    check_step({1, 0, 0, true, 0.0f, 4, 3, true});
    check_step({1, 1, 1, true, 0.0f, 2, 1, false});
    check_step({1, 0, 1, true, 0.0f, 0, 3, false});
    // corrector, predict_xstart, clip, in_place
    check_multistep(0, 0, 1, true);
    check_multistep(1, 0, 0, true);
    check_multistep(1, 1, 1, false);
    return checker.finish();
}
