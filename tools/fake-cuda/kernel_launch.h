// Launching an emulated kernel from cuLaunchKernel's untyped argument list. Included by the
// generated kernels_<file>.cpp after the emulated kernel source (and so after emu.h).
#pragma once
#include <array>
#include <cstdio>
#include <tuple>
#include <type_traits>
#include <utility>

#include "kernel_registry.h"

namespace fake_cuda {

template <size_t N>
bool register_kernels(const KernelEntry (&entries)[N]) {
    for (const KernelEntry& e : entries) register_kernel(e);
    return true;
}

// A pointer argument must be NULL or point into (or just past) a live device allocation: a
// host pointer, a freed buffer or a wrong offset passed as a kernel argument is reported here
// instead of being dereferenced.
template <typename T>
bool check_argument(const char* kernel, size_t index, const T& value) {
    if constexpr (std::is_pointer_v<T>) {
        if (value != nullptr && !is_device_address(value)) {
            fprintf(stderr, "fake-cuda: %s: argument %zu (%p) is not in any live device allocation\n", kernel,
                    index, static_cast<const void*>(value));
            return false;
        }
    }
    return true;
}

template <typename... Args, size_t... I>
bool run_with_arguments(void (*kernel)(Args...), const char* name, const LaunchShape& shape, void** params,
                        std::index_sequence<I...>) {
    // Each kernelParams entry points at a value of exactly the parameter's type (mcdm pushes one
    // field of the kernel's argument struct each: u64 device pointers, i32/u32/f32, StepParams).
    const std::tuple<std::decay_t<Args>...> args{*static_cast<const std::decay_t<Args>*>(params[I])...};
    bool valid = true;
    ((valid &= check_argument(name, I, std::get<I>(args))), ...);
    if (!valid) return false;
    if (shape.block[1] != 1 || shape.block[2] != 1) {
        fprintf(stderr, "fake-cuda: %s: block (%u, %u, %u): the emulator models 1-D blocks only\n", name,
                shape.block[0], shape.block[1], shape.block[2]);
        return false;
    }
    const long errors_before = g_emu_errors;
    emu_launch(dim3{shape.grid[0], shape.grid[1], shape.grid[2]}, dim3{shape.block[0], 1, 1},
               [&args, kernel] { std::apply(kernel, args); }, shape.dynamic_shared_bytes);
    const long errors = g_emu_errors - errors_before;
    if (errors > 0) fprintf(stderr, "fake-cuda: %s: the emulator reported %ld errors\n", name, errors);
    return errors == 0;
}

template <typename... Args>
bool run_kernel(void (*kernel)(Args...), const char* name, const LaunchShape& shape, void** params) {
    return run_with_arguments(kernel, name, shape, params, std::index_sequence_for<Args...>{});
}

template <typename... Args>
constexpr std::array<size_t, sizeof...(Args)> param_sizes_of(void (*)(Args...)) {
    return {sizeof(std::decay_t<Args>)...};
}

// The parameter sizes of one kernel (KernelEntry::param_sizes), from its function type.
template <auto Kernel>
inline constexpr auto kParamSizes = param_sizes_of(Kernel);

// The KernelRunner of one kernel; the parameter types come from its function type.
template <auto Kernel>
bool run_emulated(const char* name, const LaunchShape& shape, void** params) {
    return run_kernel(Kernel, name, shape, params);
}

}  // namespace fake_cuda
