// Checks the fake driver's own behaviour where the GPU tests cannot: the errors it must give like
// a real driver (no context, unknown kernel, launch limits, bad copies, double free, a host
// pointer as a kernel argument, calls a stream capture forbids), one real kernel launch and a
// captured graph replayed twice, a second device with its own context and memory count, whose
// launches fail from the second on (FAKE_CUDA_FAIL_DEVICE). Linked against the fake libcuda.so
// by scripts/fake-gpu-test.sh, which runs it before the tests; exit status 1 on any mismatch.
#include <cuda.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void expect(const char* what, CUresult got, CUresult want) {
    if (got == want) return;
    fprintf(stderr, "self_test: %s returned %d, expected %d\n", what, (int)got, (int)want);
    ++failures;
}
#define EXPECT(call, want) expect(#call, call, want)

}  // namespace

int main() {
    CUdevice dev;
    CUcontext ctx;
    CUdeviceptr x;
    // Two devices; device 1 fails after one launch.
    setenv("FAKE_CUDA_DEVICES", "2", 1);
    setenv("FAKE_CUDA_FAIL_DEVICE", "1", 1);
    setenv("FAKE_CUDA_FAIL_AFTER", "1", 1);
    EXPECT(cuInit(0), CUDA_SUCCESS);
    EXPECT(cuDeviceGet(&dev, 0), CUDA_SUCCESS);
    EXPECT(cuMemAlloc(&x, 16), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuDevicePrimaryCtxRetain(&ctx, dev), CUDA_SUCCESS);
    EXPECT(cuCtxSetCurrent(ctx), CUDA_SUCCESS);

    // A module holds the kernels its image names (here PTX text), and only those.
    const char image[] = ".entry conv2d_m128n128_f16(\n.entry silu_f32(\n";
    CUmodule mod;
    CUfunction conv, silu, missing;
    EXPECT(cuModuleLoadData(&mod, image), CUDA_SUCCESS);
    EXPECT(cuModuleGetFunction(&missing, mod, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);
    EXPECT(cuModuleGetFunction(&missing, mod, "conv2d_f16"), CUDA_ERROR_NOT_FOUND);
    EXPECT(cuModuleGetFunction(&conv, mod, "conv2d_m128n128_f16"), CUDA_SUCCESS);
    EXPECT(cuModuleGetFunction(&silu, mod, "silu_f32"), CUDA_SUCCESS);

    // Launch limits: __launch_bounds__(256, 2), 1024 threads, 48 KiB of dynamic shared memory
    // until cuFuncSetAttribute raises it (at most 227 KiB). None of these launches runs.
    void* no_args[14] = {};
    EXPECT(cuLaunchKernel(conv, 1, 1, 1, 512, 1, 1, 0, nullptr, no_args, nullptr),
           CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES);
    EXPECT(cuLaunchKernel(conv, 1, 1, 1, 2048, 1, 1, 0, nullptr, no_args, nullptr), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(conv, 1, 1, 1, 256, 1, 1, 100000, nullptr, no_args, nullptr), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuFuncSetAttribute(conv, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 300000),
           CUDA_ERROR_INVALID_VALUE);

    // Copies stay inside one allocation; silu runs for real.
    const int len = 250;
    float values[len];
    for (int i = 0; i < len; ++i) values[i] = (float)(i - 100);
    EXPECT(cuMemAlloc(&x, sizeof values), CUDA_SUCCESS);
    EXPECT(cuMemcpyHtoD(x + 8, values, sizeof values), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemcpyHtoD(x, values, sizeof values), CUDA_SUCCESS);
    int n = len;
    void* silu_args[] = {&x, &n};
    EXPECT(cuLaunchKernel(silu, 1, 1, 1, 256, 1, 1, 0, nullptr, silu_args, nullptr), CUDA_SUCCESS);
    EXPECT(cuMemcpyDtoH(values, x, sizeof values), CUDA_SUCCESS);
    if (std::fabs(values[101] - 1.0f / (1.0f + std::exp(-1.0f))) > 1e-6f || values[100] != 0.0f) {
        fprintf(stderr, "self_test: silu_f32 gave %g at 1 and %g at 0\n", values[101], values[100]);
        ++failures;
    }
    CUdeviceptr host_address = reinterpret_cast<CUdeviceptr>(values);
    void* host_args[] = {&host_address, &n};
    EXPECT(cuLaunchKernel(silu, 1, 1, 1, 256, 1, 1, 0, nullptr, host_args, nullptr), CUDA_ERROR_LAUNCH_FAILED);

    // Stream capture records a launch and a copy without running them; each launch of the
    // graph runs both. A synchronous call during the capture fails and invalidates it.
    CUstream stream;
    CUdeviceptr y;
    CUgraph graph, no_graph;
    CUgraphExec exec;
    CUstreamCaptureStatus status;
    for (int i = 0; i < len; ++i) values[i] = (float)(i - 100);
    EXPECT(cuStreamCreate(&stream, 0), CUDA_SUCCESS);
    EXPECT(cuMemAlloc(&y, sizeof values), CUDA_SUCCESS);
    EXPECT(cuMemcpyHtoD(x, values, sizeof values), CUDA_SUCCESS);
    EXPECT(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
    EXPECT(cuStreamIsCapturing(stream, &status), CUDA_SUCCESS);
    EXPECT(cuLaunchKernel(silu, 1, 1, 1, 256, 1, 1, 0, stream, silu_args, nullptr), CUDA_SUCCESS);
    EXPECT(cuMemcpyDtoDAsync(y, x, sizeof values, stream), CUDA_SUCCESS);
    EXPECT(cuStreamEndCapture(stream, &graph), CUDA_SUCCESS);
    float got[len];
    EXPECT(cuMemcpyDtoH(got, x, sizeof got), CUDA_SUCCESS);
    if (status != CU_STREAM_CAPTURE_STATUS_ACTIVE || got[101] != 1.0f) {
        fprintf(stderr, "self_test: the capture ran its launch (status %d, x[101] %g)\n", (int)status, got[101]);
        ++failures;
    }
    EXPECT(cuGraphInstantiateWithFlags(&exec, graph, 0), CUDA_SUCCESS);
    EXPECT(cuGraphLaunch(exec, stream), CUDA_SUCCESS);
    EXPECT(cuGraphLaunch(exec, stream), CUDA_SUCCESS);
    EXPECT(cuMemcpyDtoH(got, y, sizeof got), CUDA_SUCCESS);
    const float once = 1.0f / (1.0f + std::exp(-1.0f));
    const float twice = once / (1.0f + std::exp(-once));
    if (std::fabs(got[101] - twice) > 1e-6f) {
        fprintf(stderr, "self_test: two graph launches gave %g, expected silu(silu(1)) = %g\n", got[101], twice);
        ++failures;
    }
    EXPECT(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
    EXPECT(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_ERROR_ILLEGAL_STATE);
    CUdeviceptr z;
    EXPECT(cuMemAlloc(&z, 16), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    EXPECT(cuStreamIsCapturing(stream, &status), CUDA_SUCCESS);
    EXPECT(cuStreamEndCapture(stream, &no_graph), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    if (status != CU_STREAM_CAPTURE_STATUS_INVALIDATED || no_graph != nullptr) {
        fprintf(stderr, "self_test: an allocation during the capture did not invalidate it\n");
        ++failures;
    }
    EXPECT(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), CUDA_SUCCESS);
    EXPECT(cuStreamSynchronize(stream), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
    EXPECT(cuStreamEndCapture(stream, &no_graph), CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    EXPECT(cuStreamEndCapture(stream, &no_graph), CUDA_ERROR_ILLEGAL_STATE);
    // A graph whose buffer was freed fails at launch instead of touching the freed memory.
    EXPECT(cuMemFree(y), CUDA_SUCCESS);
    EXPECT(cuGraphLaunch(exec, stream), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuGraphExecDestroy(exec), CUDA_SUCCESS);
    EXPECT(cuGraphDestroy(graph), CUDA_SUCCESS);
    EXPECT(cuGraphLaunch(exec, stream), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuStreamDestroy(stream), CUDA_SUCCESS);

    EXPECT(cuMemFree(x), CUDA_SUCCESS);
    EXPECT(cuMemFree(x), CUDA_ERROR_INVALID_VALUE);

    // A second device: its own primary context, memory count and (injected) failure.
    int count = 0;
    EXPECT(cuDeviceGetCount(&count), CUDA_SUCCESS);
    CUdevice dev1, device_of_context;
    EXPECT(cuDeviceGet(&dev1, 2), CUDA_ERROR_INVALID_DEVICE);
    EXPECT(cuDeviceGet(&dev1, 1), CUDA_SUCCESS);
    CUcontext ctx1;
    EXPECT(cuDevicePrimaryCtxRetain(&ctx1, dev1), CUDA_SUCCESS);
    EXPECT(cuCtxSetCurrent(ctx1), CUDA_SUCCESS);
    EXPECT(cuCtxGetDevice(&device_of_context), CUDA_SUCCESS);
    size_t free0, free1, total;
    EXPECT(cuMemAlloc(&x, 1 << 20), CUDA_SUCCESS);
    EXPECT(cuMemGetInfo(&free1, &total), CUDA_SUCCESS);
    EXPECT(cuCtxSetCurrent(ctx), CUDA_SUCCESS);
    EXPECT(cuMemGetInfo(&free0, &total), CUDA_SUCCESS);
    if (count != 2 || ctx1 == ctx || device_of_context != 1 || free0 - free1 != (1 << 20)) {
        fprintf(stderr, "self_test: 2 devices: count %d, context of device 1 %s, its device %d, free %zu vs %zu\n",
                count, ctx1 == ctx ? "shared" : "own", (int)device_of_context, free0, free1);
        ++failures;
    }
    EXPECT(cuCtxSetCurrent(ctx1), CUDA_SUCCESS);
    EXPECT(cuMemcpyHtoD(x, values, sizeof values), CUDA_SUCCESS);
    EXPECT(cuLaunchKernel(silu, 1, 1, 1, 256, 1, 1, 0, nullptr, silu_args, nullptr), CUDA_SUCCESS);
    EXPECT(cuLaunchKernel(silu, 1, 1, 1, 256, 1, 1, 0, nullptr, silu_args, nullptr), CUDA_ERROR_LAUNCH_FAILED);
    EXPECT(cuLaunchKernel(silu, 1, 1, 1, 256, 1, 1, 0, nullptr, silu_args, nullptr), CUDA_ERROR_LAUNCH_FAILED);
    EXPECT(cuMemFree(x), CUDA_SUCCESS);
    EXPECT(cuCtxSetCurrent(ctx), CUDA_SUCCESS);
    EXPECT(cuDevicePrimaryCtxRelease(dev1), CUDA_SUCCESS);

    EXPECT(cuModuleUnload(mod), CUDA_SUCCESS);
    EXPECT(cuModuleGetFunction(&silu, mod, "silu_f32"), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuDevicePrimaryCtxRelease(dev), CUDA_SUCCESS);

    fprintf(stderr, "self_test: %s (the fake-cuda messages above are the expected errors)\n",
            failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
