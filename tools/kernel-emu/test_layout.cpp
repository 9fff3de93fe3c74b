// kernels/layout.cu: pack_input, unpack_output, nchw_to_nhwc, nhwc_to_nchw (grid
// ceil(elements / LAYOUT_THREADS), block LAYOUT_THREADS): pure data movement plus one rounding to T, checked exactly.
#include "layout.cu"
#include "check.h"

Checker checker("layout");
Rng rng(5);

dim3 grid_for(size_t elements) { return {(unsigned)((elements + LAYOUT_THREADS - 1) / LAYOUT_THREADS), 1, 1}; }
const dim3 block{LAYOUT_THREADS, 1, 1};
template <typename T> double rounded(double v) { return to_float(from_float<T>((float)v)); }

template <typename T, typename Pack, typename Unpack, typename ToNhwc, typename ToNchw>
void run(Pack pack, Unpack unpack, ToNhwc to_nhwc, ToNchw to_nchw, int b, int hw, int cc, int cond_count, int first) {
    char shape[80];
    snprintf(shape, sizeof shape, "_%s b%d hw%d cc%d cond_count%d first%d", type_name<T>(), b, hw, cc, cond_count, first);
    std::vector<float> x((size_t)b * 3 * hw), cond((size_t)cond_count * cc * hw);
    for (auto& v : x) v = rng.uniform();
    for (auto& v : cond) v = rng.uniform();
    {
        const int cy = 3 + cc;
        auto ys = nan_filled<T>((size_t)b * hw * cy);
        std::vector<double> ref(ys.size());
        for (int k = 0; k < b; ++k)
            for (int p = 0; p < hw; ++p)
                for (int ch = 0; ch < cy; ++ch) {
                    const int item = cond_count == 1 ? 0 : first + k;  // outside [0, cond_count): zeros
                    double v = 0;
                    if (ch < 3) v = x[((size_t)k * 3 + ch) * hw + p];
                    else if (cc && item < cond_count) v = cond[((size_t)item * cc + ch - 3) * hw + p];
                    ref[((size_t)k * hw + p) * cy + ch] = rounded<T>(v);
                }
        const PackArgs args{x.data(), cc ? cond.data() : nullptr, ys.data(), cond_count, first, b, hw, cc};
        emu_launch_serial(grid_for(ys.size()), block, [&] { MCDM_CALL(pack, PackArgs, args); });
        checker.close(std::string("pack_input") + shape, ref, widen(ys), 0, 0);
    }
    {
        const int oc = 6;
        std::vector<double> y;
        auto ys = uniform_values<T>((size_t)b * hw * oc, rng, -1, 1, &y);
        std::vector<float> eps((size_t)b * 3 * hw, NAN), var(eps.size(), NAN);
        std::vector<double> ref_eps(eps.size()), ref_var(eps.size());
        for (int k = 0; k < b; ++k)
            for (int ch = 0; ch < 3; ++ch)
                for (int p = 0; p < hw; ++p) {
                    ref_eps[((size_t)k * 3 + ch) * hw + p] = y[((size_t)k * hw + p) * oc + ch];
                    ref_var[((size_t)k * 3 + ch) * hw + p] = y[((size_t)k * hw + p) * oc + 3 + ch];
                }
        const UnpackArgs args{ys.data(), eps.data(), var.data(), oc, b, hw};
        emu_launch_serial(grid_for(eps.size()), block, [&] { MCDM_CALL(unpack, UnpackArgs, args); });
        checker.close(std::string("unpack_output eps") + shape, ref_eps, widen(eps), 0, 0);
        checker.close(std::string("unpack_output var") + shape, ref_var, widen(var), 0, 0);
    }
    {
        const int c = 5;
        std::vector<float> xs((size_t)b * c * hw), back(xs.size(), NAN);
        for (auto& v : xs) v = rng.uniform();
        auto ys = nan_filled<T>(xs.size());
        std::vector<double> ref(ys.size()), ref_back(xs.size());
        for (int k = 0; k < b; ++k)
            for (int ch = 0; ch < c; ++ch)
                for (int p = 0; p < hw; ++p) {
                    const size_t nchw = ((size_t)k * c + ch) * hw + p;
                    ref[((size_t)k * hw + p) * c + ch] = ref_back[nchw] = rounded<T>(xs[nchw]);
                }
        const TransposeArgs there{xs.data(), ys.data(), b, c, hw};
        emu_launch_serial(grid_for(ys.size()), block, [&] { MCDM_CALL(to_nhwc, TransposeArgs, there); });
        checker.close(std::string("nchw_to_nhwc") + shape, ref, widen(ys), 0, 0);
        const TransposeArgs back_again{ys.data(), back.data(), b, c, hw};
        emu_launch_serial(grid_for(back.size()), block, [&] { MCDM_CALL(to_nchw, TransposeArgs, back_again); });
        checker.close(std::string("nhwc_to_nchw") + shape, ref_back, widen(back), 0, 0);
    }
}

int main() {
    run<float>(pack_input_f32, unpack_output_f32, nchw_to_nhwc_f32, nhwc_to_nchw_f32, 2, 37, 3, 4, 1);
    run<float>(pack_input_f32, unpack_output_f32, nchw_to_nhwc_f32, nhwc_to_nchw_f32, 3, 11, 3, 4, 2);  // item 4: zeros
    run<__half>(pack_input_f16, unpack_output_f16, nchw_to_nhwc_f16, nhwc_to_nchw_f16, 3, 20, 1, 1, 0);
    run<__nv_bfloat16>(pack_input_bf16, unpack_output_bf16, nchw_to_nhwc_bf16, nhwc_to_nchw_bf16, 1, 9, 0, 0, 0);
    return checker.finish();
}
