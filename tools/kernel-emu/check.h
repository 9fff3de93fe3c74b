// Shared by the test drivers: random inputs, NaN-prefilled outputs, comparison against double
// references, one line per case, and a summary line that scripts/emulate-kernels.sh parses.
// Include after the kernel sources (it uses their to_float / from_float).
#pragma once
#include <chrono>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "running_kernel.h"

// Calls `kernel` with the fields of `args`, an argument struct NAME, in order: the parameters
// of a kernel declared `kernel(MCDM_PARAMS(NAME))`.
// Also notes the kernel's name for the SIGTERM handler (running_kernel.h).
#define MCDM_FIELD_VALUE(type, name) , mcdm_args_.name
#define MCDM_CALL(kernel, NAME, args)                                                                   \
    [&](const NAME& mcdm_args_) {                                                                       \
        g_running_kernel = #kernel;                                                                     \
        kernel(MCDM_APPLY(MCDM_DROP_FIRST, (~ NAME##_FIELDS(MCDM_FIELD_VALUE))));                       \
    }(args)

template <typename T> const char* type_name();
template <> const char* type_name<float>() { return "f32"; }
template <> const char* type_name<__half>() { return "f16"; }
template <> const char* type_name<__nv_bfloat16>() { return "bf16"; }

// Relative rounding error of one store in T (half an ulp).
template <typename T> double storage_eps() {
    return std::is_same<T, float>::value ? 0x1p-24 : std::is_same<T, __half>::value ? 0x1p-11 : 0x1p-8;
}

struct Rng {
    std::mt19937 gen;
    explicit Rng(unsigned seed) : gen(seed) {}
    float uniform(float lo = -1.0f, float hi = 1.0f) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
    float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(gen); }
};

// n values drawn by `draw`, stored as T; `exact` (if given) receives what the kernel will read.
template <typename T, typename Draw>
std::vector<T> stored_values(size_t n, Draw draw, std::vector<double>* exact = nullptr) {
    std::vector<T> v(n);
    if (exact) exact->resize(n);
    for (size_t i = 0; i < n; ++i) {
        v[i] = from_float<T>(draw(i));
        if (exact) (*exact)[i] = to_float(v[i]);
    }
    return v;
}
template <typename T> std::vector<T> uniform_values(size_t n, Rng& rng, float lo, float hi, std::vector<double>* exact = nullptr) {
    return stored_values<T>(n, [&](size_t) { return rng.uniform(lo, hi); }, exact);
}
// Outputs start as NaN, so that an element the kernel fails to write fails the comparison.
template <typename T> std::vector<T> nan_filled(size_t n) { return std::vector<T>(n, from_float<T>(NAN)); }
template <typename T> std::vector<double> widen(const std::vector<T>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = to_float(v[i]);
    return r;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class Checker {
  public:
    explicit Checker(const char* suite) : suite_(suite) {
        setvbuf(stdout, nullptr, _IOLBF, 0);
        name_running_kernel_on_sigterm(1, "HUNG: terminated while running kernel ", "(none)");
    }

    // Passes when every element has |got - ref| - slack <= tol (1 + |ref|) (slack: an optional
    // per-element allowance, e.g. for a documented f32 intermediate); NaN anywhere fails.
    bool close(const std::string& name, const std::vector<double>& ref, const std::vector<double>& got, double tol,
               double seconds, const std::vector<double>* slack = nullptr) {
        double worst = 0;
        size_t at = 0;
        const bool sizes_match = ref.size() == got.size();
        for (size_t i = 0; sizes_match && i < ref.size(); ++i) {
            const double beyond = std::fabs(got[i] - ref[i]) - (slack ? (*slack)[i] : 0.0);
            const double e = std::max(beyond, 0.0) / (1.0 + std::fabs(ref[i]));
            if (!(e <= worst)) {  // NaN compares false and sticks
                worst = e;
                at = i;
            }
        }
        const bool ok = sizes_match && !ref.empty() && worst <= tol;
        char detail[200];
        if (!sizes_match) snprintf(detail, sizeof detail, "size %zu, expected %zu", got.size(), ref.size());
        else if (ref.empty()) snprintf(detail, sizeof detail, "no elements");
        else snprintf(detail, sizeof detail, "max err %.2e (tol %.1e) at %zu: ref %.7g got %.7g", worst, tol, at,
                      ref[at], got[at]);
        return record(name, ok, detail, seconds);
    }

    bool record(const std::string& name, bool ok, const std::string& detail, double seconds) {
        ++cases_;
        failures_ += !ok;
        printf("%s %-58s %s  [%.1fs]\n", ok ? "ok  " : "FAIL", name.c_str(), detail.c_str(), seconds);
        return ok;
    }

    // Prints the emulator's own findings and the summary; the process exit status.
    int finish() {
        const long emu_errors = g_emu_errors.load(), conflicts = g_ldsm_conflicts.load();
        if (g_ldsm_calls > 0 || g_cp_async_calls > 0)
            printf("ldmatrix calls %ld (%ld bank-conflicted matrices), cp.async %ld\n", g_ldsm_calls.load(), conflicts,
                   g_cp_async_calls.load());
        const bool ok = failures_ == 0 && emu_errors == 0 && conflicts == 0;
        printf("SUMMARY %s cases=%d failed=%d emulator_errors=%ld bank_conflicts=%ld %s\n", suite_, cases_, failures_,
               emu_errors, conflicts, ok ? "PASS" : "FAIL");
        return ok ? 0 : 1;
    }

  private:
    const char* suite_;
    int cases_ = 0, failures_ = 0;
};
