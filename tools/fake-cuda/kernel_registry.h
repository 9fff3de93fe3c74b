// The emulated kernels the fake driver can launch, registered by name. The driver side
// (driver.cpp, which includes <cuda.h>) and the kernel side (the generated kernels_<file>.cpp,
// which include the emulator) only meet through this header, so the two never share a
// translation unit.
#pragma once
#include <cstddef>

namespace fake_cuda {

struct LaunchShape {
    unsigned grid[3];
    unsigned block[3];
    size_t dynamic_shared_bytes;
};

// Runs one launch to completion, reading each argument through `params` (cuLaunchKernel's
// kernelParams: one pointer per argument, to a value of the parameter's type). Returns false
// when the launch cannot be emulated or the emulator reported errors (already printed).
using KernelRunner = bool (*)(const char* name, const LaunchShape& shape, void** params);

struct KernelEntry {
    const char* name;         // the extern "C" entry point, as cuModuleGetFunction names it
    const char* file;         // kernels/<file>.cu
    int max_threads_per_block;  // __launch_bounds__, else 1024
    KernelRunner run;
    // The size of each parameter, so that a captured launch can keep copies of its arguments.
    const size_t* param_sizes;
    size_t param_count;
};

// Called by the generated kernel files at load time.
bool register_kernel(const KernelEntry& entry);
// The kernel called `name`, or nullptr.
const KernelEntry* find_kernel(const char* name);

// Whether `address` lies in a live device allocation (or just past its end), for the argument
// checks of a launch.
bool is_device_address(const void* address);

}  // namespace fake_cuda
