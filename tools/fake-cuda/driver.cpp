// A fake CUDA driver (libcuda.so.1): the subset of the driver API that cudarc and mcdm call,
// with "device" memory in host memory (a CUdeviceptr is a host address) and cuLaunchKernel
// running the emulated kernels (kernel_registry.h). Every stream is synchronous: each call has
// finished when it returns, except on a stream being captured, where launches, device-to-device
// copies and memsets are recorded into a graph that cuGraphLaunch replays. See README.md.
//
// The functions are defined under their <cuda.h> names, whose macros give the exported symbols
// their versioned names (cuMemAlloc -> cuMemAlloc_v2) and let the compiler check every signature
// against the real header.
#include <cuda.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "asan.h"
#include "running_kernel.h"

#include "kernel_registry.h"

#define FAKE_API extern "C" __attribute__((visibility("default")))

namespace {
constexpr int kDriverVersion = 13000;
constexpr const char* kDeviceName = "Fake CUDA (CPU emulation)";
constexpr size_t kDefaultMemoryBytes = size_t(8) << 30;
constexpr size_t kAllocationAlignment = 256;  // what cuMemAlloc guarantees
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultDynamicSharedBytes = 48 * 1024;  // without cuFuncSetAttribute
constexpr int kMaxDynamicSharedBytes = 227 * 1024;     // sm_90 opt-in limit
constexpr unsigned char kUninitializedByte = 0xff;     // NaN in f32, f16 and bf16
constexpr int kMaxDevices = 16;
}  // namespace

// The objects behind the handle types of <cuda.h> (declared there, at global scope).
using Clock = std::chrono::steady_clock;

struct CUctx_st {
    int retain_count = 0;
    int device = 0;
};
// One operation recorded by stream capture, run when its graph is launched.
struct CapturedOp {
    enum class Kind { Launch, DeviceCopy, Fill } kind;
    const fake_cuda::KernelEntry* kernel = nullptr;
    fake_cuda::LaunchShape shape{};
    std::vector<std::vector<unsigned char>> args;  // a copy of each kernel argument's value
    CUdeviceptr dst = 0, src = 0;
    size_t bytes = 0;
    unsigned char value = 0;
};
struct CUstream_st {
    // Between cuStreamBeginCapture and cuStreamEndCapture work is recorded, not run.
    bool capturing = false;
    bool invalidated = false;  // by a call that failed during the capture
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    std::thread::id capture_thread;
    std::vector<CapturedOp> captured;
};
struct CUgraph_st {
    std::vector<CapturedOp> ops;
};
struct CUgraphExec_st {
    std::vector<CapturedOp> ops;
};
struct CUevent_st {
    bool timing;
    bool recorded = false;
    Clock::time_point when{};
};
struct CUfunc_st {
    const fake_cuda::KernelEntry* kernel;
    int max_dynamic_shared_bytes = kDefaultDynamicSharedBytes;
};
struct CUmod_st {
    std::unordered_map<std::string, std::unique_ptr<CUfunc_st>> functions;  // those present in the image
};
struct CUmemPoolHandle_st {
    cuuint64_t release_threshold = 0;
    int reuse_follow_event_dependencies = 1, reuse_allow_opportunistic = 1, reuse_allow_internal_dependencies = 1;
};

namespace {

// A message on stderr for every error returned, so that a failing test shows why.
CUresult fail(CUresult code, const char* format, ...) __attribute__((format(printf, 2, 3)));
CUresult fail(CUresult code, const char* format, ...) {
    va_list args;
    va_start(args, format);
    fprintf(stderr, "fake-cuda: ");
    vfprintf(stderr, format, args);
    fprintf(stderr, "\n");
    va_end(args);
    return code;
}

// Everything the driver owns, behind one mutex. Handles are checked against these sets, so that
// a destroyed or made-up handle gets CUDA_ERROR_INVALID_HANDLE instead of a crash.
struct Driver {
    std::mutex mutex;
    bool initialized = false;
    size_t total_memory = kDefaultMemoryBytes;
    int device_count = 1;
    size_t allocated[kMaxDevices] = {};       // per device
    std::map<uintptr_t, size_t> allocations;  // base -> requested size
    std::map<uintptr_t, int> allocation_device;
    CUctx_st primary_contexts[kMaxDevices];
    // FAKE_CUDA_FAIL_DEVICE / FAKE_CUDA_FAIL_AFTER: that device's launches fail (and keep failing,
    // as a GPU's do after a fault) once it has run this many.
    int fail_device = -1;
    long fail_after = 0;
    long launches[kMaxDevices] = {};
    CUmemPoolHandle_st default_pool;
    std::set<CUstream> streams;
    std::set<CUevent> events;
    std::set<CUmodule> modules;
    std::set<CUfunction> functions;
    std::set<CUgraph> graphs;
    std::set<CUgraphExec> graph_execs;
};
Driver& driver() {
    static Driver* d = new Driver;  // never destroyed: Rust destructors may call in at exit
    return *d;
}
thread_local CUcontext t_current_context = nullptr;

// The emulator keeps its state in globals: one launch at a time, across all host threads.
std::mutex g_launch_mutex;

// FAKE_CUDA_DEVICES=N: a machine of N identical devices (default 1).
int device_count_from_env() {
    const char* text = getenv("FAKE_CUDA_DEVICES");
    if (text == nullptr || *text == '\0') return 1;
    const int n = atoi(text);
    if (n < 1 || n > kMaxDevices) {
        fprintf(stderr, "fake-cuda: FAKE_CUDA_DEVICES=%s is not 1..%d; using 1\n", text, kMaxDevices);
        return 1;
    }
    return n;
}

size_t memory_limit_from_env() {
    const char* text = getenv("FAKE_CUDA_MEMORY_BYTES");
    if (text == nullptr || *text == '\0') return kDefaultMemoryBytes;
    char* end = nullptr;
    const unsigned long long bytes = strtoull(text, &end, 10);
    if (*end != '\0' || bytes == 0) {
        fprintf(stderr, "fake-cuda: FAKE_CUDA_MEMORY_BYTES=%s is not a positive byte count; using 8 GiB\n", text);
        return kDefaultMemoryBytes;
    }
    return bytes;
}

// FAKE_CUDA_LAUNCH_LOG=FILE: the name of every kernel this process runs (directly or in a graph)
// is appended to FILE once, so that a test can see which entry points its runs reached.
bool run_kernel(const fake_cuda::KernelEntry* kernel, const fake_cuda::LaunchShape& shape, void** params) {
    static std::mutex logged_mutex;
    static std::set<const fake_cuda::KernelEntry*> logged;
    if (const char* log = getenv("FAKE_CUDA_LAUNCH_LOG"); log != nullptr && *log != '\0') {
        std::lock_guard<std::mutex> lock(logged_mutex);
        if (logged.insert(kernel).second) {
            if (FILE* f = fopen(log, "a")) {
                fprintf(f, "%s\n", kernel->name);
                fclose(f);
            }
        }
    }
    g_running_kernel.store(kernel->name);
    const bool ok = kernel->run(kernel->name, shape, params);
    g_running_kernel.store(nullptr);
    return ok;
}

// FAKE_CUDA_COMPUTE_CAPABILITY=MAJOR.MINOR (default 9.0): an older GPU, for mcdm's refusal of it.
std::pair<int, int> compute_capability_from_env() {
    const char* text = getenv("FAKE_CUDA_COMPUTE_CAPABILITY");
    int major = 0, minor = 0;
    if (text == nullptr || *text == '\0') return {9, 0};
    if (sscanf(text, "%d.%d", &major, &minor) != 2 || major <= 0 || minor < 0) {
        fprintf(stderr, "fake-cuda: FAKE_CUDA_COMPUTE_CAPABILITY=%s is not MAJOR.MINOR; using 9.0\n", text);
        return {9, 0};
    }
    return {major, minor};
}

// Checks shared by most calls; each returns CUDA_SUCCESS or the error the real driver gives.
CUresult require_initialized(const Driver& d) {
    return d.initialized ? CUDA_SUCCESS : fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called");
}
CUresult require_context(const Driver& d, const char* call) {
    if (CUresult r = require_initialized(d)) return r;
    if (t_current_context == nullptr || t_current_context->retain_count == 0)
        return fail(CUDA_ERROR_INVALID_CONTEXT, "%s without a current context on this thread", call);
    return CUDA_SUCCESS;
}
CUresult require_device(CUdevice device) {
    const int count = driver().device_count;
    return device >= 0 && device < count
               ? CUDA_SUCCESS
               : fail(CUDA_ERROR_INVALID_DEVICE, "no device %d (the fake has %d: FAKE_CUDA_DEVICES)", device, count);
}
// The device of this thread's current context (require_context first).
int current_device() { return t_current_context->device; }
// A launch on the current device, or its failure when FAKE_CUDA_FAIL_DEVICE says it has failed.
CUresult count_launch(Driver& d, const char* call) {
    const int device = current_device();
    if (device != d.fail_device || ++d.launches[device] <= d.fail_after) return CUDA_SUCCESS;
    return fail(CUDA_ERROR_LAUNCH_FAILED, "%s: device %d failed (FAKE_CUDA_FAIL_DEVICE, after %ld launches)", call,
                device, d.fail_after);
}
// The null stream, the legacy and per-thread default streams, or one created here.
CUresult require_stream(const Driver& d, CUstream stream) {
    const bool builtin = stream == nullptr || stream == CU_STREAM_LEGACY || stream == CU_STREAM_PER_THREAD;
    return builtin || d.streams.count(stream) ? CUDA_SUCCESS
                                              : fail(CUDA_ERROR_INVALID_HANDLE, "unknown stream %p", (void*)stream);
}
bool is_builtin_stream(CUstream stream) {
    return stream == nullptr || stream == CU_STREAM_LEGACY || stream == CU_STREAM_PER_THREAD;
}
bool is_capturing(CUstream stream) { return !is_builtin_stream(stream) && stream->capturing; }

// During a capture in GLOBAL mode (anywhere) or THREAD_LOCAL mode (begun by this thread) the
// driver refuses "potentially unsafe" calls: synchronous copies and allocations,
// synchronisation, work on the legacy stream. As on a GPU, the call fails and invalidates
// those captures (cuStreamEndCapture then returns no graph).
CUresult refuse_if_capturing(Driver& d, const char* call) {
    bool refused = false;
    for (CUstream s : d.streams) {
        const bool forbids = s->mode == CU_STREAM_CAPTURE_MODE_GLOBAL ||
                             (s->mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
                              s->capture_thread == std::this_thread::get_id());
        if (s->capturing && forbids) {
            s->invalidated = true;
            refused = true;
        }
    }
    return refused ? fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "%s during a stream capture", call) : CUDA_SUCCESS;
}

// `call` on a stream being captured, which the fake cannot record (`why`): it fails and
// invalidates the capture.
CUresult refuse_in_capture(CUstream stream, CUresult code, const char* call, const char* why) {
    stream->invalidated = true;
    return fail(code, "%s on a capturing stream: %s", call, why);
}

CUresult require_event(const Driver& d, CUevent event) {
    return d.events.count(event) ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_HANDLE, "unknown event %p", (void*)event);
}

// [address, address + bytes) must lie inside one live allocation.
CUresult require_device_range(const Driver& d, CUdeviceptr address, size_t bytes, const char* call) {
    auto it = d.allocations.upper_bound(address);
    if (it != d.allocations.begin()) {
        --it;
        if (address >= it->first && address + bytes <= it->first + it->second) return CUDA_SUCCESS;
    }
    return fail(CUDA_ERROR_INVALID_VALUE, "%s: [0x%llx, +%zu) is not inside one live device allocation", call,
                (unsigned long long)address, bytes);
}

size_t padded(size_t bytes) { return (bytes + kAllocationAlignment - 1) / kAllocationAlignment * kAllocationAlignment; }

CUresult allocate(CUdeviceptr* out, size_t bytes, CUstream stream, const char* call) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, call)) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (is_capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_NOT_SUPPORTED, call, "graph memory nodes are not modelled");
    if (is_builtin_stream(stream))
        if (CUresult r = refuse_if_capturing(d, call)) return r;
    if (out == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "%s: NULL result pointer", call);
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "%s of 0 bytes", call);
    const int device = current_device();
    if (bytes > d.total_memory - d.allocated[device])
        return CUDA_ERROR_OUT_OF_MEMORY;  // mcdm handles this one itself (smaller batches)
    const size_t rounded = padded(bytes);
    void* memory = aligned_alloc(kAllocationAlignment, rounded);
    if (memory == nullptr) return fail(CUDA_ERROR_OUT_OF_MEMORY, "%s: the host is out of memory", call);
    // Device memory is not zeroed: make reads of never-written memory show up as NaN.
    memset(memory, kUninitializedByte, rounded);
    // Under AddressSanitizer (scripts/fake-gpu-test.sh builds the fake with it) a kernel that
    // touches the alignment padding past `bytes` aborts, as compute-sanitizer's memcheck would.
    ASAN_POISON_MEMORY_REGION(static_cast<char*>(memory) + bytes, rounded - bytes);
    *out = reinterpret_cast<CUdeviceptr>(memory);
    d.allocations[*out] = bytes;
    d.allocation_device[*out] = device;
    d.allocated[device] += bytes;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr address, CUstream stream, const char* call) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, call)) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (is_capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_NOT_SUPPORTED, call, "graph memory nodes are not modelled");
    if (is_builtin_stream(stream))
        if (CUresult r = refuse_if_capturing(d, call)) return r;
    auto it = d.allocations.find(address);
    if (it == d.allocations.end())
        return fail(CUDA_ERROR_INVALID_VALUE, "%s(0x%llx): not a live allocation (double free?)", call,
                    (unsigned long long)address);
    d.allocated[d.allocation_device[address]] -= it->second;
    d.allocation_device.erase(address);
    ASAN_UNPOISON_MEMORY_REGION(reinterpret_cast<void*>(address), padded(it->second));
    d.allocations.erase(it);
    free(reinterpret_cast<void*>(address));
    return CUDA_SUCCESS;
}

enum class CopyKind { HostToDevice, DeviceToHost, DeviceToDevice };

CUresult copy(void* dst, const void* src, size_t bytes, CopyKind kind, CUstream stream, const char* call) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, call)) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (bytes == 0) return CUDA_SUCCESS;
    if (kind != CopyKind::HostToDevice)
        if (CUresult r = require_device_range(d, reinterpret_cast<CUdeviceptr>(src), bytes, call)) return r;
    if (kind != CopyKind::DeviceToHost)
        if (CUresult r = require_device_range(d, reinterpret_cast<CUdeviceptr>(dst), bytes, call)) return r;
    if (is_builtin_stream(stream))
        if (CUresult r = refuse_if_capturing(d, call)) return r;
    if (is_capturing(stream)) {
        if (kind != CopyKind::DeviceToDevice)
            return refuse_in_capture(stream, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, call,
                                     "copies from or to host memory are not modelled");
        CapturedOp op{CapturedOp::Kind::DeviceCopy};
        op.dst = reinterpret_cast<CUdeviceptr>(dst);
        op.src = reinterpret_cast<CUdeviceptr>(src);
        op.bytes = bytes;
        stream->captured.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    memmove(dst, src, bytes);
    return CUDA_SUCCESS;
}

CUresult fill_bytes(CUdeviceptr dst, unsigned char value, size_t bytes, CUstream stream, const char* call) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, call)) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (bytes == 0) return CUDA_SUCCESS;
    if (CUresult r = require_device_range(d, dst, bytes, call)) return r;
    if (is_builtin_stream(stream))
        if (CUresult r = refuse_if_capturing(d, call)) return r;
    if (is_capturing(stream)) {
        CapturedOp op{CapturedOp::Kind::Fill};
        op.dst = dst;
        op.bytes = bytes;
        op.value = value;
        stream->captured.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    memset(reinterpret_cast<void*>(dst), value, bytes);
    return CUDA_SUCCESS;
}

// The size of a module image, which cuModuleLoadData gets without one: an ELF (CUBIN) ends
// with its section or program headers; PTX is NUL-terminated text.
size_t image_size(const unsigned char* image) {
    static const unsigned char kElfMagic[4] = {0x7f, 'E', 'L', 'F'};
    if (memcmp(image, kElfMagic, 4) != 0) return strlen(reinterpret_cast<const char*>(image));
    auto read = [&](size_t offset, size_t bytes) {
        uint64_t v = 0;
        memcpy(&v, image + offset, bytes);  // little-endian host and image
        return v;
    };
    const uint64_t section_headers_end = read(0x28, 8) + read(0x3a, 2) * read(0x3c, 2);
    const uint64_t program_headers_end = read(0x20, 8) + read(0x36, 2) * read(0x38, 2);
    return std::max(section_headers_end, program_headers_end);
}

// Whether `name` occurs in the image as a whole identifier (a symbol of the CUBIN, an .entry
// of the PTX), so that cuModuleGetFunction only finds the kernels of the module asked.
bool image_contains_symbol(const unsigned char* image, size_t size, const std::string& name) {
    auto is_identifier = [](unsigned char c) { return c == '_' || isalnum(c); };
    const unsigned char* end = image + size;
    for (const unsigned char* p = image; p + name.size() <= end; ++p) {
        p = std::search(p, end, name.begin(), name.end());
        if (p == end) return false;
        const bool starts = p == image || !is_identifier(p[-1]);
        const bool ends = p + name.size() == end || !is_identifier(p[name.size()]);
        if (starts && ends) return true;
    }
    return false;
}

// The kernel registry, filled by the generated kernels_<file>.cpp at load time.
std::map<std::string, const fake_cuda::KernelEntry*>& kernel_registry() {
    static auto* registry = new std::map<std::string, const fake_cuda::KernelEntry*>;
    return *registry;
}

}  // namespace

namespace fake_cuda {

bool register_kernel(const KernelEntry& entry) {
    const bool inserted = kernel_registry().emplace(entry.name, &entry).second;
    if (!inserted) fprintf(stderr, "fake-cuda: kernel %s registered twice\n", entry.name);
    return inserted;
}

const KernelEntry* find_kernel(const char* name) {
    auto it = kernel_registry().find(name);
    return it == kernel_registry().end() ? nullptr : it->second;
}

bool is_device_address(const void* address) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    const auto a = reinterpret_cast<uintptr_t>(address);
    auto it = d.allocations.upper_bound(a);
    return it != d.allocations.begin() && a <= std::prev(it)->first + std::prev(it)->second;
}

}  // namespace fake_cuda

// ---------------------------------------------------------------------------------------------
// Initialisation, errors, version.

FAKE_API CUresult cuInit(unsigned int flags) {
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit(%u): flags must be 0", flags);
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (!d.initialized) {
        d.total_memory = memory_limit_from_env();
        d.device_count = device_count_from_env();
        for (int i = 0; i < kMaxDevices; ++i) d.primary_contexts[i].device = i;
        if (const char* failing = getenv("FAKE_CUDA_FAIL_DEVICE")) {
            d.fail_device = atoi(failing);
            const char* after = getenv("FAKE_CUDA_FAIL_AFTER");
            d.fail_after = after ? atol(after) : 0;
        }
        d.initialized = true;
        name_running_kernel_on_sigterm(2, "fake-cuda: terminated while running kernel ",
                                       "(none: host code)");
    }
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDriverGetVersion(int* version) {
    if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *version = kDriverVersion;
    return CUDA_SUCCESS;
}

// NVRTC opens libcuda.so.1 and asks it for the driver's private export tables; the fake has
// none, and says so (without this symbol NVRTC crashes in a process that loaded the fake).
FAKE_API CUresult cuGetExportTable(const void** table, const CUuuid* id) {
    if (table == nullptr || id == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

namespace {
struct ErrorText {
    CUresult code;
    const char* name;
    const char* text;
};
// The codes this fake returns, and the few others a caller may ask about.
constexpr ErrorText kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
     "operation not permitted when stream is capturing"},
    {CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
    {CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
     "attempt to terminate a thread-local capture sequence from another thread"},
};
const ErrorText* error_text(CUresult code) {
    for (const ErrorText& e : kErrors)
        if (e.code == code) return &e;
    return nullptr;
}
}  // namespace

FAKE_API CUresult cuGetErrorName(CUresult error, const char** name) {
    if (name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const ErrorText* e = error_text(error);
    *name = e ? e->name : nullptr;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

FAKE_API CUresult cuGetErrorString(CUresult error, const char** text) {
    if (text == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const ErrorText* e = error_text(error);
    *text = e ? e->text : nullptr;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// ---------------------------------------------------------------------------------------------
// The devices: FAKE_CUDA_DEVICES (default 1) identical sm_90 GPUs, so that mcdm loads its embedded
// sm_90 CUBIN (never NVRTC). Each has its own memory count; their memory is all host memory.

FAKE_API CUresult cuDeviceGetCount(int* count) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_initialized(d)) return r;
    if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *count = d.device_count;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_initialized(d)) return r;
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = require_device(ordinal)) return r;
    *device = ordinal;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetName(char* name, int length, CUdevice device) {
    if (CUresult r = require_device(device)) return r;
    if (name == nullptr || length <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, length, "%s", kDeviceName);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice device) {
    if (CUresult r = require_device(device)) return r;
    if (uuid == nullptr) return CUDA_ERROR_INVALID_VALUE;
    memset(uuid->bytes, 0, sizeof uuid->bytes);
    memcpy(uuid->bytes, "fake-cuda", 9);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceTotalMem(size_t* bytes, CUdevice device) {
    if (CUresult r = require_device(device)) return r;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    *bytes = d.total_memory;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice device) {
    if (CUresult r = require_device(device)) return r;
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = compute_capability_from_env().first; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = compute_capability_from_env().second; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = kMaxThreadsPerBlock; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *value = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *value = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *value = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *value = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = kDefaultDynamicSharedBytes; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = kMaxDynamicSharedBytes; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *value = 228 * 1024; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 132; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *value = 2048; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *value = 65536; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *value = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *value = 5120; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *value = 50 * 1024 * 1024; break;
        default: *value = 0; break;  // not modelled: "no" / "none"
    }
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Contexts: each device's primary context, current per host thread.

FAKE_API CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_initialized(d)) return r;
    if (CUresult r = require_device(device)) return r;
    if (context == nullptr) return CUDA_ERROR_INVALID_VALUE;
    ++d.primary_contexts[device].retain_count;
    *context = &d.primary_contexts[device];
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDevicePrimaryCtxRelease(CUdevice device) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_initialized(d)) return r;
    if (CUresult r = require_device(device)) return r;
    if (d.primary_contexts[device].retain_count == 0)
        return fail(CUDA_ERROR_INVALID_CONTEXT, "cuDevicePrimaryCtxRelease without a matching retain");
    --d.primary_contexts[device].retain_count;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxSetCurrent(CUcontext context) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_initialized(d)) return r;
    const bool primary = context >= &d.primary_contexts[0] && context < &d.primary_contexts[d.device_count];
    if (context != nullptr && !primary)
        return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: unknown context %p", (void*)context);
    t_current_context = context;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxGetCurrent(CUcontext* context) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_initialized(d)) return r;
    if (context == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *context = t_current_context;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxGetDevice(CUdevice* device) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuCtxGetDevice")) return r;
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *device = current_device();
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuCtxSynchronize() {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuCtxSynchronize")) return r;
    return refuse_if_capturing(d, "cuCtxSynchronize");
}

// ---------------------------------------------------------------------------------------------
// Streams and events. Work is done when the call returns, so synchronising only checks handles
// and events record the host clock.

FAKE_API CUresult cuStreamCreate(CUstream* stream, unsigned int /*flags*/) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamCreate")) return r;
    if (stream == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *stream = new CUstream_st;
    d.streams.insert(*stream);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned int flags, int /*priority*/) {
    return cuStreamCreate(stream, flags);
}

FAKE_API CUresult cuStreamDestroy(CUstream stream) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamDestroy")) return r;
    if (d.streams.erase(stream) == 0) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: unknown stream");
    delete stream;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamSynchronize(CUstream stream) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamSynchronize")) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (is_capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize",
                                 "its work has not run");
    return is_builtin_stream(stream) ? refuse_if_capturing(d, "cuStreamSynchronize") : CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamQuery(CUstream stream) { return cuStreamSynchronize(stream); }

FAKE_API CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned int /*flags*/) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamWaitEvent")) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (is_capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_NOT_SUPPORTED, "cuStreamWaitEvent", "event nodes are not modelled");
    return require_event(d, event);
}

FAKE_API CUresult cuEventCreate(CUevent* event, unsigned int flags) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuEventCreate")) return r;
    if (event == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *event = new CUevent_st{(flags & CU_EVENT_DISABLE_TIMING) == 0};
    d.events.insert(*event);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuEventDestroy(CUevent event) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuEventDestroy")) return r;
    if (d.events.erase(event) == 0) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventDestroy: unknown event");
    delete event;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuEventRecord(CUevent event, CUstream stream) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuEventRecord")) return r;
    if (CUresult r = require_event(d, event)) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (is_capturing(stream))
        return refuse_in_capture(stream, CUDA_ERROR_NOT_SUPPORTED, "cuEventRecord", "event nodes are not modelled");
    event->recorded = true;
    event->when = Clock::now();
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuEventSynchronize(CUevent event) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuEventSynchronize")) return r;
    return require_event(d, event);
}

FAKE_API CUresult cuEventQuery(CUevent event) { return cuEventSynchronize(event); }

FAKE_API CUresult cuEventElapsedTime(float* milliseconds, CUevent start, CUevent end) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuEventElapsedTime")) return r;
    if (CUresult r = require_event(d, start)) return r;
    if (CUresult r = require_event(d, end)) return r;
    if (milliseconds == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (!start->timing || !end->timing)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was created with DISABLE_TIMING");
    if (!start->recorded || !end->recorded)
        return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was never recorded");
    *milliseconds = std::chrono::duration<float, std::milli>(end->when - start->when).count();
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Memory. FAKE_CUDA_MEMORY_BYTES sets the device size (default 8 GiB); allocations past it get
// CUDA_ERROR_OUT_OF_MEMORY, as a full GPU would give.

FAKE_API CUresult cuMemAlloc(CUdeviceptr* address, size_t bytes) {
    return allocate(address, bytes, nullptr, "cuMemAlloc");
}

FAKE_API CUresult cuMemAllocAsync(CUdeviceptr* address, size_t bytes, CUstream stream) {
    return allocate(address, bytes, stream, "cuMemAllocAsync");
}

FAKE_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr* address, size_t bytes, CUmemoryPool pool, CUstream stream) {
    if (pool != &driver().default_pool) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAllocFromPoolAsync: unknown pool");
    return cuMemAllocAsync(address, bytes, stream);
}

FAKE_API CUresult cuMemFree(CUdeviceptr address) { return release(address, nullptr, "cuMemFree"); }

FAKE_API CUresult cuMemFreeAsync(CUdeviceptr address, CUstream stream) {
    return release(address, stream, "cuMemFreeAsync");
}

FAKE_API CUresult cuMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuMemGetInfo")) return r;
    if (free_bytes == nullptr || total_bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *free_bytes = d.total_memory - d.allocated[current_device()];
    *total_bytes = d.total_memory;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t bytes) {
    return copy(reinterpret_cast<void*>(dst), src, bytes, CopyKind::HostToDevice, nullptr, "cuMemcpyHtoD");
}
FAKE_API CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
    return copy(reinterpret_cast<void*>(dst), src, bytes, CopyKind::HostToDevice, stream, "cuMemcpyHtoDAsync");
}
FAKE_API CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t bytes) {
    return copy(dst, reinterpret_cast<const void*>(src), bytes, CopyKind::DeviceToHost, nullptr, "cuMemcpyDtoH");
}
FAKE_API CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    return copy(dst, reinterpret_cast<const void*>(src), bytes, CopyKind::DeviceToHost, stream, "cuMemcpyDtoHAsync");
}
FAKE_API CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes, CopyKind::DeviceToDevice,
                nullptr, "cuMemcpyDtoD");
}
FAKE_API CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes, CopyKind::DeviceToDevice,
                stream, "cuMemcpyDtoDAsync");
}
FAKE_API CUresult cuMemsetD8(CUdeviceptr dst, unsigned char value, size_t bytes) {
    return fill_bytes(dst, value, bytes, nullptr, "cuMemsetD8");
}
FAKE_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t bytes, CUstream stream) {
    return fill_bytes(dst, value, bytes, stream, "cuMemsetD8Async");
}

// The default memory pool: its attributes are kept (mcdm raises the release threshold) and the
// usage ones report the live allocations.
FAKE_API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice device) {
    if (CUresult r = require_device(device)) return r;
    if (pool == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *pool = &driver().default_pool;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice device) {
    return cuDeviceGetDefaultMemPool(pool, device);
}

FAKE_API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attribute, void* value) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (pool != &d.default_pool) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute: unknown pool");
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: pool->release_threshold = *static_cast<cuuint64_t*>(value); break;
        case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
            pool->reuse_follow_event_dependencies = *static_cast<int*>(value);
            break;
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC: pool->reuse_allow_opportunistic = *static_cast<int*>(value); break;
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
            pool->reuse_allow_internal_dependencies = *static_cast<int*>(value);
            break;
        default: return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolSetAttribute: attribute %d not modelled", attribute);
    }
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attribute, void* value) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (pool != &d.default_pool) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute: unknown pool");
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *static_cast<cuuint64_t*>(value) = pool->release_threshold; break;
        case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
            *static_cast<int*>(value) = pool->reuse_follow_event_dependencies;
            break;
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC: *static_cast<int*>(value) = pool->reuse_allow_opportunistic; break;
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
            *static_cast<int*>(value) = pool->reuse_allow_internal_dependencies;
            break;
        case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT:
        case CU_MEMPOOL_ATTR_USED_MEM_CURRENT: {
            size_t used = 0;
            for (size_t bytes : d.allocated) used += bytes;
            *static_cast<cuuint64_t*>(value) = used;  // one pool object stands for every device's
            break;
        }
        default: return fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolGetAttribute: attribute %d not modelled", attribute);
    }
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t /*min_bytes_to_keep*/) {
    return pool == &driver().default_pool ? CUDA_SUCCESS
                                          : fail(CUDA_ERROR_INVALID_VALUE, "cuMemPoolTrimTo: unknown pool");
}

// ---------------------------------------------------------------------------------------------
// Modules and functions. The image's code is ignored; its symbols say which of the emulated
// kernels the module holds.

FAKE_API CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuModuleLoadData")) return r;
    if (module == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const auto* bytes = static_cast<const unsigned char*>(image);
    const size_t size = image_size(bytes);
    auto loaded = std::make_unique<CUmod_st>();
    for (const auto& [name, kernel] : kernel_registry()) {
        if (!image_contains_symbol(bytes, size, name)) continue;
        auto function = std::make_unique<CUfunc_st>();
        function->kernel = kernel;
        d.functions.insert(function.get());
        loaded->functions.emplace(name, std::move(function));
    }
    if (loaded->functions.empty())
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: the image (%zu bytes) names no emulated kernel", size);
    *module = loaded.release();
    d.modules.insert(*module);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuModuleUnload(CUmodule module) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuModuleUnload")) return r;
    if (d.modules.erase(module) == 0) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleUnload: unknown module");
    for (const auto& entry : module->functions) d.functions.erase(entry.second.get());
    delete module;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuModuleGetFunction")) return r;
    if (function == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (!d.modules.count(module)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleGetFunction: unknown module");
    auto it = module->functions.find(name);
    if (it == module->functions.end()) {
        const fake_cuda::KernelEntry* elsewhere = fake_cuda::find_kernel(name);
        if (elsewhere != nullptr)
            return fail(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction(%s): the kernel is in kernels/%s.cu, not this module",
                        name, elsewhere->file);
        return fail(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction(%s): no such kernel in kernels/*.cu", name);
    }
    *function = it->second.get();
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuFuncGetAttribute(int* value, CUfunction_attribute attribute, CUfunction function) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (!d.functions.count(function)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncGetAttribute: unknown function");
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = function->kernel->max_threads_per_block; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = function->max_dynamic_shared_bytes; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION:
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *value = 90; break;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: *value = -1; break;
        default: *value = 0; break;  // static shared, local and constant sizes, registers: not known
    }
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (!d.functions.count(function)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncSetAttribute: unknown function");
    switch (attribute) {
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
            if (value < 0 || value > kMaxDynamicSharedBytes)
                return fail(CUDA_ERROR_INVALID_VALUE, "%s: MAX_DYNAMIC_SHARED_SIZE_BYTES %d over the %d of sm_90",
                            function->kernel->name, value, kMaxDynamicSharedBytes);
            function->max_dynamic_shared_bytes = value;
            return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: return CUDA_SUCCESS;
        default: return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute: attribute %d not modelled", attribute);
    }
}

// ---------------------------------------------------------------------------------------------
// Launches: the real driver's limits are checked, then the kernel runs to completion.

FAKE_API CUresult cuLaunchKernel(CUfunction function, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                                 unsigned int block_x, unsigned int block_y, unsigned int block_z,
                                 unsigned int dynamic_shared_bytes, CUstream stream, void** params, void** extra) {
    const fake_cuda::KernelEntry* kernel;
    const fake_cuda::LaunchShape shape{{grid_x, grid_y, grid_z}, {block_x, block_y, block_z}, dynamic_shared_bytes};
    {
        Driver& d = driver();
        std::lock_guard<std::mutex> lock(d.mutex);
        if (CUresult r = require_context(d, "cuLaunchKernel")) return r;
        if (CUresult r = require_stream(d, stream)) return r;
        if (!d.functions.count(function)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: unknown function");
        kernel = function->kernel;
        const char* name = kernel->name;
        if (extra != nullptr) return fail(CUDA_ERROR_NOT_SUPPORTED, "%s: `extra` launch arguments not modelled", name);
        if (params == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, "%s: no kernel arguments", name);
        if (grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_x > 2147483647u || grid_y > 65535 || grid_z > 65535)
            return fail(CUDA_ERROR_INVALID_VALUE, "%s: grid (%u, %u, %u) out of range", name, grid_x, grid_y, grid_z);
        const unsigned long long threads = (unsigned long long)block_x * block_y * block_z;
        if (threads == 0 || block_x > 1024 || block_y > 1024 || block_z > 64 || threads > kMaxThreadsPerBlock)
            return fail(CUDA_ERROR_INVALID_VALUE, "%s: block (%u, %u, %u) out of range", name, block_x, block_y,
                        block_z);
        if (threads > (unsigned long long)kernel->max_threads_per_block)
            return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "%s: %llu threads a block, over its __launch_bounds__(%d)",
                        name, threads, kernel->max_threads_per_block);
        if ((int)dynamic_shared_bytes > function->max_dynamic_shared_bytes)
            return fail(CUDA_ERROR_INVALID_VALUE,
                        "%s: %u bytes of dynamic shared memory, over its limit of %d (cuFuncSetAttribute "
                        "MAX_DYNAMIC_SHARED_SIZE_BYTES raises it)",
                        name, dynamic_shared_bytes, function->max_dynamic_shared_bytes);
        if (is_builtin_stream(stream))
            if (CUresult r = refuse_if_capturing(d, "cuLaunchKernel")) return r;
        if (is_capturing(stream)) {
            CapturedOp op{CapturedOp::Kind::Launch};
            op.kernel = kernel;
            op.shape = shape;
            for (size_t i = 0; i < kernel->param_count; ++i) {
                const auto* value = static_cast<const unsigned char*>(params[i]);
                op.args.emplace_back(value, value + kernel->param_sizes[i]);
            }
            stream->captured.push_back(std::move(op));
            return CUDA_SUCCESS;
        }
        if (CUresult r = count_launch(d, "cuLaunchKernel")) return r;
    }
    std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
    return run_kernel(kernel, shape, params) ? CUDA_SUCCESS : CUDA_ERROR_LAUNCH_FAILED;
}

// ---------------------------------------------------------------------------------------------
// Stream capture and graphs: a captured stream records launches, device-to-device copies and
// memsets; an instantiated graph replays them in order, each checked again as it runs (a kernel
// argument or copy range that was freed since the capture is an error).

FAKE_API CUresult cuStreamBeginCapture(CUstream stream, CUstreamCaptureMode mode) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamBeginCapture")) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (is_builtin_stream(stream))
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: the legacy stream cannot be captured");
    if (stream->capturing) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture: the stream is capturing already");
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamBeginCapture: mode %d", (int)mode);
    stream->capturing = true;
    stream->invalidated = false;
    stream->mode = mode;
    stream->capture_thread = std::this_thread::get_id();
    stream->captured.clear();
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamEndCapture")) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (graph == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (!is_capturing(stream)) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture: the stream is not capturing");
    if (stream->mode != CU_STREAM_CAPTURE_MODE_RELAXED && stream->capture_thread != std::this_thread::get_id())
        return fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "cuStreamEndCapture from another thread");
    stream->capturing = false;
    std::vector<CapturedOp> ops = std::move(stream->captured);
    stream->captured.clear();
    if (stream->invalidated) {
        *graph = nullptr;
        return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "cuStreamEndCapture: a call failed during the capture");
    }
    *graph = new CUgraph_st{std::move(ops)};
    d.graphs.insert(*graph);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuStreamIsCapturing")) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    if (status == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *status = !is_capturing(stream)  ? CU_STREAM_CAPTURE_STATUS_NONE
              : stream->invalidated ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                                    : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long flags) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuGraphInstantiateWithFlags")) return r;
    if (exec == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (!d.graphs.count(graph)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphInstantiateWithFlags: unknown graph");
    if (flags != 0) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuGraphInstantiateWithFlags: flags %llu not modelled", flags);
    *exec = new CUgraphExec_st{graph->ops};
    d.graph_execs.insert(*exec);
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuGraphUpload(CUgraphExec exec, CUstream stream) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (CUresult r = require_context(d, "cuGraphUpload")) return r;
    if (CUresult r = require_stream(d, stream)) return r;
    return d.graph_execs.count(exec) ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphUpload: unknown graph");
}

FAKE_API CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
    std::vector<CapturedOp> ops;
    {
        Driver& d = driver();
        std::lock_guard<std::mutex> lock(d.mutex);
        if (CUresult r = require_context(d, "cuGraphLaunch")) return r;
        if (CUresult r = require_stream(d, stream)) return r;
        if (!d.graph_execs.count(exec)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphLaunch: unknown graph");
        if (is_capturing(stream))
            return refuse_in_capture(stream, CUDA_ERROR_NOT_SUPPORTED, "cuGraphLaunch", "child graphs are not modelled");
        if (is_builtin_stream(stream))
            if (CUresult r = refuse_if_capturing(d, "cuGraphLaunch")) return r;
        ops = exec->ops;
        if (CUresult r = count_launch(d, "cuGraphLaunch")) return r;
    }
    for (CapturedOp& op : ops) {
        CUresult r = CUDA_SUCCESS;
        switch (op.kind) {
            case CapturedOp::Kind::Launch: {
                std::vector<void*> params;
                for (auto& value : op.args) params.push_back(value.data());
                std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
                if (!run_kernel(op.kernel, op.shape, params.data())) r = CUDA_ERROR_LAUNCH_FAILED;
                break;
            }
            case CapturedOp::Kind::DeviceCopy:
                r = copy(reinterpret_cast<void*>(op.dst), reinterpret_cast<const void*>(op.src), op.bytes,
                         CopyKind::DeviceToDevice, stream, "cuGraphLaunch (a captured copy)");
                break;
            case CapturedOp::Kind::Fill:
                r = fill_bytes(op.dst, op.value, op.bytes, stream, "cuGraphLaunch (a captured memset)");
                break;
        }
        if (r != CUDA_SUCCESS) return r;
    }
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuGraphExecDestroy(CUgraphExec exec) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (d.graph_execs.erase(exec) == 0) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphExecDestroy: unknown graph");
    delete exec;
    return CUDA_SUCCESS;
}

FAKE_API CUresult cuGraphDestroy(CUgraph graph) {
    Driver& d = driver();
    std::lock_guard<std::mutex> lock(d.mutex);
    if (d.graphs.erase(graph) == 0) return fail(CUDA_ERROR_INVALID_HANDLE, "cuGraphDestroy: unknown graph");
    delete graph;
    return CUDA_SUCCESS;
}
