// kernels/conv.cu: every conv kernel with its launch geometry from src/ops/conv.rs, against a
// double reference on the same (rounded) inputs.
//   test_conv [delayed|immediate] [quick]
// delayed (default): cp.async data lands at the wait_group that completes it, the destination
// poisoned until then; immediate: it lands at once. quick: the shapes of the mutation check.
#include "conv.cu"
#include "check.h"

struct ConvCase {
    int n, h, w, cin, cout, ks, stride;
    bool residual;  // y starts as the residual and is passed as both (the UNet's aliasing)
    bool bias;
    int x_offset = 0;  // elements: 1 misaligns x (the 64x64 kernel's scalar load path)
    int y_offset = 0;  // elements: 1 misaligns y (the large tiles' unpaired epilogue)
    int cin2 = 0;      // > 0: the last cin2 input channels come from a second tensor (x2)
    bool up = false;   // the input is stored at half size and upsampled on read
    bool res_up = false;  // the residual is stored at half size (then in its own buffer)
    bool moments = false;  // the epilogue's per-channel moments are made and checked too
    bool res_down = false;  // the residual is stored at twice the size, pooled 2x2 (own buffer)
    int norm = 0;  // 1: the input is normalised as it is read (a random (mul, add) table); 2: and SiLU'd
    bool own_residual() const { return res_up || res_down; }
    int cin1() const { return cin - cin2; }
    int ho() const { return (h + 2 * (ks / 2) - ks) / stride + 1; }
    int wo() const { return (w + 2 * (ks / 2) - ks) / stride + 1; }
    int M() const { return n * ho() * wo(); }
    int K() const { return ks * ks * cin; }
    std::string describe() const {
        char s[160];
        snprintf(s, sizeof s, "n%d %dx%d cin%d cout%d k%d s%d M%d%s%s%s%s%s%s", n, h, w, cin, cout, ks, stride, M(),
                 residual ? (res_up ? " +res_up" : res_down ? " +res_down" : " +res=y") : "", bias ? "" : " nobias", x_offset ? " x+1" : "",
                 y_offset ? " y+1" : "", cin2 ? (" x2 cin" + std::to_string(cin2)).c_str() : "", up ? " up" : "");
        return s + std::string(moments ? " moments" : "") + (norm == 1 ? " norm" : norm == 2 ? " norm+silu" : "");
    }
};

using ConvKernelFn = decltype(&conv2d_f32);

// Launch geometry as src/ops/conv.rs `ConvKernel::geometry` and `forward_with` make it, from the
// same constants of conv.cu.
struct Variant {
    const char* name;
    int bm, bn, threads;
    size_t dynamic_shared;
    bool large;  // 1-D grid, cin % 8 == 0 and cout % 8 == 0 required
};
#define CONV_VARIANT(NAME, V) \
    Variant { NAME, V##_BM, V##_BN, V##_THREADS, CONVB_STAGES * (V##_BM + V##_BN) * CONVB_ROW_BYTES, true }
const Variant TILE64{"conv2d", CONV_BM, CONV_BN, CONV_THREADS, 0, false};
const Variant TILE128 = CONV_VARIANT("conv2d_m128n128", CONV_M128N128);
const Variant TILE128X64 = CONV_VARIANT("conv2d_m128n64", CONV_M128N64);
const Variant TILE256X128 = CONV_VARIANT("conv2d_m256n128", CONV_M256N128);

Checker checker("conv");
Rng rng(1234);

// The output's rounding to T dominates; f32 accumulates in f32 (SIMT path).
template <typename T> double tolerance() { return std::is_same<T, float>::value ? 1e-5 : 2.5 * storage_eps<T>(); }

// The launcher's condition for the epilogue's moments (src/ops/conv.rs): a row tile in one image.
bool moments_apply(const Variant& v, const ConvCase& c) { return c.moments && (c.ho() * c.wo()) % v.bm == 0; }

// moments [n, chunks, cout, 3] against the moments, in double, of the stored output y: each
// (count, mean, M2 / count) of channel ch over the pixels of row tile `chunk` of image b.
void check_moments(const Variant& v, const ConvCase& c, const std::vector<float>& part, const std::vector<double>& y,
                   const std::string& name) {
    const int hwo = c.ho() * c.wo(), chunks = hwo / v.bm;
    std::vector<double> ref, got;
    for (int b = 0; b < c.n; ++b)
        for (int chunk = 0; chunk < chunks; ++chunk)
            for (int ch = 0; ch < c.cout; ++ch) {
                double sum = 0, sq = 0;
                for (int p = chunk * v.bm; p < (chunk + 1) * v.bm; ++p) {
                    const double val = y[((size_t)b * hwo + p) * c.cout + ch];
                    sum += val;
                    sq += val * val;
                }
                const double mean = sum / v.bm;
                ref.insert(ref.end(), {(double)v.bm, mean, sq / v.bm - mean * mean});
                const float* at = &part[(((size_t)b * chunks + chunk) * c.cout + ch) * 3];
                got.insert(got.end(), {at[0], at[1], at[2] / at[0]});
            }
    checker.close(name + ": its moments", ref, got, 5e-6, 0.0);  // measured at most 8e-7
}

template <typename T>
void run(const Variant& v, ConvKernelFn kernel, const ConvCase& c) {
    const int ho = c.ho(), wo = c.wo(), M = c.M(), K = c.K(), pad = c.ks / 2;
    const int cin1 = c.cin1(), sh = c.up ? c.h / 2 : c.h, sw = c.up ? c.w / 2 : c.w;
    std::vector<double> x, x2, w, res;
    auto xs = uniform_values<T>((size_t)c.n * sh * sw * cin1 + c.x_offset, rng, -1, 1, &x);
    auto x2s = uniform_values<T>((size_t)c.n * sh * sw * c.cin2, rng, -1, 1, &x2);
    // The input's normalisation: (mul, add) per image and channel.
    std::vector<float> table(c.norm ? (size_t)c.n * c.cin * 2 : 0);
    for (size_t i = 0; i < table.size(); i += 2) {
        table[i] = rng.uniform(0.5f, 1.5f);
        table[i + 1] = rng.uniform(-0.5f, 0.5f);
    }
    // Channel ci of the logical input pixel (b, iy, ix): cat([x, x2]), upsampled when c.up;
    // normalised (and rounded to T, as a stored normalised tensor is) when c.norm.
    auto input = [&](int b, int iy, int ix, int ci) {
        if (c.up) iy /= 2, ix /= 2;
        const size_t pixel = (size_t)(b * sh + iy) * sw + ix;
        const double v = ci < cin1 ? x[c.x_offset + pixel * cin1 + ci] : x2[pixel * c.cin2 + ci - cin1];
        if (!c.norm) return v;
        const float* ma = &table[((size_t)b * c.cin + ci) * 2];
        double normed = v * ma[0] + ma[1];
        if (c.norm == 2) normed /= 1 + std::exp(-normed);
        return (double)to_float(from_float<T>((float)normed));
    };
    const float wscale = 2.0f / std::sqrt((float)K);
    auto ws = uniform_values<T>((size_t)c.cout * K, rng, -wscale, wscale, &w);
    std::vector<float> bias(c.cout);
    for (auto& b : bias) b = rng.uniform();
    const size_t out = (size_t)M * c.cout;
    // The residual is y itself (the UNet's aliasing), or with res_up / res_down its own half-size
    // / double-size buffer.
    const size_t res_len = c.res_up     ? (size_t)c.n * (ho / 2) * (wo / 2) * c.cout
                           : c.res_down ? (size_t)c.n * (2 * ho) * (2 * wo) * c.cout
                                        : out;
    std::vector<T> ys = c.residual && !c.own_residual() ? uniform_values<T>(out + c.y_offset, rng, -1, 1, &res)
                                                         : nan_filled<T>(out + c.y_offset);
    std::vector<T> rs = c.own_residual() ? uniform_values<T>(res_len, rng, -1, 1, &res) : std::vector<T>();
    // The residual's value at output pixel (b, oy, ox), channel co (o: y's index).
    auto residual_at = [&](int b, int oy, int ox, int co, size_t o) {
        if (c.res_up) return res[((size_t)(b * (ho / 2) + oy / 2) * (wo / 2) + ox / 2) * c.cout + co];
        if (!c.res_down) return res[c.y_offset + o];
        double sum = 0;
        for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx)
                sum += res[((size_t)(b * 2 * ho + 2 * oy + dy) * (2 * wo) + 2 * ox + dx) * c.cout + co];
        return sum / 4;
    };

    std::vector<double> ref(out);
    for (int b = 0; b < c.n; ++b)
        for (int oy = 0; oy < ho; ++oy)
            for (int ox = 0; ox < wo; ++ox)
                for (int co = 0; co < c.cout; ++co) {
                    double s = c.bias ? bias[co] : 0.0;
                    for (int ky = 0; ky < c.ks; ++ky)
                        for (int kx = 0; kx < c.ks; ++kx) {
                            const int iy = oy * c.stride + ky - pad, ix = ox * c.stride + kx - pad;
                            if (iy < 0 || ix < 0 || iy >= c.h || ix >= c.w) continue;
                            const double* wp = &w[((size_t)co * c.ks * c.ks + ky * c.ks + kx) * c.cin];  // OHWI
                            for (int ci = 0; ci < c.cin; ++ci) s += input(b, iy, ix, ci) * wp[ci];
                        }
                    const size_t o = ((size_t)(b * ho + oy) * wo + ox) * c.cout + co;
                    ref[o] = s + (c.residual ? residual_at(b, oy, ox, co, o) : 0.0);
                }

    const T* xp = xs.data() + c.x_offset;
    T* yp = ys.data() + c.y_offset;
    const unsigned row_tiles = (M + v.bm - 1) / v.bm, col_tiles = (c.cout + v.bn - 1) / v.bn;
    const dim3 grid = v.large ? dim3{row_tiles * col_tiles, 1, 1} : dim3{row_tiles, col_tiles, 1};
    const auto t0 = std::chrono::steady_clock::now();
    const T* rp = !c.residual ? nullptr : c.own_residual() ? rs.data() : yp;
    const bool moments = moments_apply(v, c);
    std::vector<float> part(moments ? (size_t)c.n * (ho * wo / v.bm) * c.cout * 3 : 0, NAN);
    const ConvArgs args{xp,   ws.data(), c.bias ? bias.data() : nullptr, rp, yp, c.n, c.h, c.w, c.cin, c.cout, c.ks,
                        c.stride, ho, wo, c.cin2 ? x2s.data() : nullptr, cin1, c.up, c.res_up,
                        moments ? part.data() : nullptr, c.res_down, c.norm ? table.data() : nullptr, c.norm == 2};
    emu_launch(grid, {(unsigned)v.threads, 1, 1}, [&] { MCDM_CALL(kernel, ConvArgs, args); }, v.dynamic_shared);
    const double secs = seconds_since(t0);
    std::vector<double> got = widen(ys);
    got.erase(got.begin(), got.begin() + c.y_offset);
    const std::string name = std::string(v.name) + "_" + type_name<T>() + " " + c.describe();
    checker.close(name, ref, got, tolerance<T>(), secs);
    if (moments) check_moments(v, c, part, got, name);
}

int main(int argc, char** argv) {
    bool quick = false;
    g_cp_async_delayed = true;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "delayed") g_cp_async_delayed = true;
        else if (a == "immediate") g_cp_async_delayed = false;
        else if (a == "quick") quick = true;
        else {
            fprintf(stderr, "usage: test_conv [delayed|immediate] [quick]\n");
            return 2;
        }
    }
    printf("cp.async %s\n", g_cp_async_delayed ? "delayed (lands at its wait_group)" : "immediate");

    // n, h, w, cin, cout, ks, stride, residual, bias, x_offset, y_offset
    const ConvCase m198{2, 9, 11, 16, 72, 3, 1, true, true};  // M tail (198), cout 72, 5 K steps
    const ConvCase stride2{2, 9, 10, 40, 136, 3, 2, true, true};  // K steps straddle taps (cin 40)
    const ConvCase folded{1, 12, 12, 40, 16, 3, 2, true, true, 0, 0, 24, true, true};  // x2, up, res_up
    const ConvCase pooled_residual{2, 4, 5, 16, 24, 3, 1, true, true, 0, 0, 0, false, false, false, true};
    // The input normalised as it is read (+ SiLU): two images (their own tables), 5 K steps.
    const ConvCase normed{2, 9, 11, 16, 72, 3, 1, true, true, 0, 0, 0, false, false, false, false, 2};
    // Shapes every kernel supports (cin, cout multiples of 8).
    std::vector<ConvCase> common = {
        {1, 5, 7, 8, 8, 3, 1, true, true},      // tiny: M 35, cout 8, cin 8 (K 72: 3 K steps)
        m198,
        {1, 6, 13, 32, 200, 3, 1, true, false},  // cout 200: ragged last column tile, no bias
        stride2,
        {3, 6, 7, 40, 64, 1, 1, true, true},     // 1x1, K 40: the second K step half empty
        {2, 8, 8, 16, 128, 3, 1, false, true},   // M 128 and cout 128 exactly, y NaN-filled
        {1, 3, 3, 8, 16, 3, 2, true, true},      // stride 2 on 3x3 -> 2x2, mostly padding
        {1, 5, 6, 24, 48, 3, 1, true, true, 0, 1},  // y misaligned by one element
        {1, 16, 21, 16, 136, 3, 1, true, true},  // M 336: a full and a partial 256-row tile
        // The copies folded into the conv: the decoder's concatenation (cin1 16 + cin2 32, and
        // a 1x1 skip conv over 24 + 40), a 2x upsampled input, an upsampled residual, and all
        // three at once (stride 2 on an upsampled input: the addressing allows it).
        {2, 6, 7, 48, 40, 3, 1, true, true, 0, 0, 32},
        {2, 8, 8, 64, 72, 1, 1, true, true, 0, 0, 40},
        {1, 10, 12, 16, 64, 3, 1, false, true, 0, 0, 0, true},
        {2, 8, 6, 16, 24, 3, 1, true, true, 0, 0, 0, false, true},
        // A pooled residual (a downsampling ResBlock's identity skip), paired and (y misaligned)
        // element by element.
        pooled_residual,
        {1, 4, 6, 24, 48, 3, 1, true, true, 0, 1, 0, false, false, false, true},
        folded,
        // The input's group norm applied as it is read: with SiLU over two images; without, K
        // steps straddling taps at stride 2; a 1x1 conv (the attention's qkv); the decoder's
        // concatenation upsampled; with the output's moments and residual (a ResBlock's
        // out-conv).
        normed,
        {2, 9, 10, 40, 136, 3, 2, true, true, 0, 0, 0, false, false, false, false, 1},
        {3, 6, 7, 40, 64, 1, 1, false, true, 0, 0, 0, false, false, false, false, 1},
        {2, 6, 8, 40, 16, 3, 1, true, true, 0, 0, 24, true, false, false, false, 2},
        {1, 16, 16, 16, 72, 3, 1, true, true, 0, 0, 0, false, false, true, false, 2},
    };
    // With the per-channel moments of the output: row tiles of 64, 128 and 256 pixels in
    // 16x16 images (the last column tile partly outside cout 72), 64-pixel images after a
    // stride-2 conv (the 64-row tiles only), the folded copies, and a pooled residual.
    const std::vector<ConvCase> with_moments = {
        {1, 16, 16, 16, 72, 3, 1, true, true, 0, 0, 0, false, false, true},
        {1, 16, 16, 24, 64, 1, 1, false, true, 0, 0, 0, false, false, true},
        {2, 16, 16, 16, 128, 3, 2, true, true, 0, 0, 0, false, false, true},
        {1, 16, 16, 24, 64, 3, 1, true, true, 0, 0, 8, true, true, true},
        {1, 8, 8, 16, 64, 3, 1, true, true, 0, 0, 0, false, false, true, true},
    };
    // cin 8 but cin1 3: the concatenation element by element (64x64 only).
    const ConvCase concat_scalar{1, 5, 6, 8, 16, 3, 1, true, true, 0, 0, 5};
    // The 3-channel input conv over two images, normalised element by element.
    const ConvCase normed_scalar{2, 9, 6, 3, 8, 3, 2, false, true, 0, 0, 0, false, false, false, false, 2};
    const ConvCase cin264{1, 4, 5, 264, 24, 3, 1, false, true};  // K 2376: 75 K steps
    // 64x64 only: cin not a multiple of 8, cout not a multiple of 8, misaligned x.
    const std::vector<ConvCase> scalar_loads = {
        {1, 9, 6, 3, 5, 3, 2, false, true},    // the 3-channel input conv, stride 2
        {1, 3, 3, 6, 64, 3, 1, false, true},
        {1, 6, 5, 16, 33, 3, 1, false, true, 1},
        concat_scalar,
        normed_scalar,
        {1, 6, 5, 16, 33, 3, 1, false, true, 1, 0, 0, false, false, false, false, 1},  // misaligned x
    };

    if (quick) {
        for (const ConvCase& c : {m198, stride2, folded, with_moments[0], pooled_residual, normed}) {
            run<__half>(TILE128, conv2d_m128n128_f16, c);
            run<__half>(TILE128X64, conv2d_m128n64_f16, c);
            run<__half>(TILE256X128, conv2d_m256n128_f16, c);
            run<__half>(TILE64, conv2d_f16, c);
        }
        run<__half>(TILE64, conv2d_f16, concat_scalar);
        run<__half>(TILE64, conv2d_f16, normed_scalar);
        return checker.finish();
    }
    if (!g_cp_async_delayed) common = {m198, stride2};  // the pipeline's ordering is what differs
    else common.insert(common.end(), with_moments.begin(), with_moments.end());

    for (const ConvCase& c : common) {
        run<__half>(TILE128, conv2d_m128n128_f16, c);
        run<__half>(TILE128X64, conv2d_m128n64_f16, c);
        run<__nv_bfloat16>(TILE128, conv2d_m128n128_bf16, c);
        run<__nv_bfloat16>(TILE128X64, conv2d_m128n64_bf16, c);
        run<__half>(TILE256X128, conv2d_m256n128_f16, c);
        run<__nv_bfloat16>(TILE256X128, conv2d_m256n128_bf16, c);
        run<__half>(TILE64, conv2d_f16, c);
        run<__nv_bfloat16>(TILE64, conv2d_bf16, c);
        run<float>(TILE64, conv2d_f32, c);
    }
    if (g_cp_async_delayed) {
        run<__half>(TILE128X64, conv2d_m128n64_f16, cin264);
        run<__half>(TILE256X128, conv2d_m256n128_f16, cin264);
        run<__half>(TILE64, conv2d_f16, cin264);
        run<float>(TILE64, conv2d_f32, cin264);
        for (const ConvCase& c : scalar_loads) {
            run<__half>(TILE64, conv2d_f16, c);
            run<__nv_bfloat16>(TILE64, conv2d_bf16, c);
            run<float>(TILE64, conv2d_f32, c);
        }
    }
    return checker.finish();
}
