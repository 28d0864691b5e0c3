// Device/runtime queries and a tiny launch smoke-test kernel for dermfast._C.
//
// Nothing here links libtorch: tensors cross from Python as raw device addresses (int) plus a cudaStream_t
// (as int, e.g. torch.cuda.current_stream().cuda_stream). The CUDA runtime is linked statically, so the module
// imports on a machine without a driver or GPU; the queries then report 0 devices instead of throwing.
#include "cuda_check.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#ifndef DF_CUDA_ARCHS
#define DF_CUDA_ARCHS "unknown"
#endif

namespace dermfast {

namespace {

cudaError_t query_device_count(int* n) {
    *n = 0;
    const cudaError_t err = cudaGetDeviceCount(n);
    if (err != cudaSuccess) {
        *n = 0;
        (void)cudaGetLastError();  // clear it: "no driver / no device" must not poison later calls
    }
    return err;
}

void check_ordinal(int device) {
    int n = 0;
    const cudaError_t err = query_device_count(&n);
    DF_CHECK_INDEX(device >= 0 && device < n,
                   "CUDA device ordinal " << device << " is out of range: " << n << " device(s) visible"
                                          << (err != cudaSuccess ? std::string(" (") + cudaGetErrorName(err) +
                                                                       ": " + cudaGetErrorString(err) + ")"
                                                                 : std::string()));
}

const char* memory_type_name(cudaMemoryType type) {
    switch (type) {
        case cudaMemoryTypeUnregistered: return "unregistered host memory (pageable)";
        case cudaMemoryTypeHost: return "pinned host memory";
        case cudaMemoryTypeDevice: return "device memory";
        case cudaMemoryTypeManaged: return "managed memory";
    }
    return "unknown memory type";
}

__global__ void fill_iota_u32_kernel(std::uint32_t* __restrict__ out, std::int64_t n) {
    const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = static_cast<std::uint32_t>(i);
    }
}

}  // namespace

int cuda_runtime_version() {
    int v = 0;
    DF_CUDA_CHECK(cudaRuntimeGetVersion(&v));  // needs no driver: the runtime is linked in statically
    return v;
}

int cuda_driver_version() {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) {  // returns success with v == 0 when no driver is installed
        (void)cudaGetLastError();
        return 0;
    }
    return v;
}

int device_count() {
    int n = 0;
    (void)query_device_count(&n);
    return n;
}

std::string device_query_error() {
    int n = 0;
    const cudaError_t err = query_device_count(&n);
    if (err == cudaSuccess) return std::string();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

std::string device_name(int device) {
    check_ordinal(device);
    cudaDeviceProp prop{};
    DF_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    return std::string(prop.name);
}

std::pair<int, int> compute_capability(int device) {
    check_ordinal(device);
    int major = 0;
    int minor = 0;
    DF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    DF_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return {major, minor};
}

std::string compiled_cuda_archs() { return DF_CUDA_ARCHS; }

void fill_iota_u32(std::uintptr_t ptr, std::int64_t n, std::uintptr_t stream) {
    DF_CHECK(n >= 0, "fill_iota_u32: n must be >= 0, got " << n);
    if (n == 0) return;  // nothing to write: touches neither the pointer nor the CUDA runtime
    DF_CHECK(ptr != 0, "fill_iota_u32: ptr is null but n = " << n);
    DF_CHECK(ptr % alignof(std::uint32_t) == 0, "fill_iota_u32: ptr 0x" << std::hex << ptr << std::dec
                                                                       << " is not 4-byte aligned");
    DF_CHECK(n <= (std::int64_t{1} << 32), "fill_iota_u32: n = " << n << " exceeds 2**32 (values are uint32)");

    // Only device memory of the current device is accepted. cudaPointerGetAttributes also answers for host
    // memory: pinned (cudaMemoryTypeHost), managed (cudaMemoryTypeManaged) and pageable (Unregistered). On
    // drivers with HMM / ATS pageable host memory is reachable from the GPU, so a launch on it may "work" or
    // fault depending on the machine; and a pointer of another device would need that device's stream. So all
    // of these are refused with ValueError before any launch, whatever the driver says about accessibility.
    cudaPointerAttributes attr{};
    const cudaError_t perr = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
    if (perr != cudaSuccess) {
        (void)cudaGetLastError();  // older runtimes report unregistered host pointers as cudaErrorInvalidValue
    }
    int current = -1;
    DF_CUDA_CHECK(cudaGetDevice(&current));
    DF_CHECK(perr == cudaSuccess && attr.type == cudaMemoryTypeDevice,
             "fill_iota_u32: ptr 0x" << std::hex << ptr << std::dec
                                     << " is not CUDA device memory of the current device (cudaMemoryType "
                                     << (perr == cudaSuccess ? static_cast<int>(attr.type) : -1) << ": "
                                     << memory_type_name(perr == cudaSuccess ? attr.type : cudaMemoryTypeUnregistered)
                                     << ")");
    DF_CHECK(attr.device == current,
             "fill_iota_u32: ptr 0x" << std::hex << ptr << std::dec << " is device memory of device " << attr.device
                                     << ", not of the current device " << current
                                     << "; make that device current (torch.cuda.device) and pass its stream");

    constexpr int kThreads = 256;
    constexpr std::int64_t kMaxBlocks = std::int64_t{1} << 16;  // grid-stride loop covers the rest
    const std::int64_t blocks = std::min<std::int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
    fill_iota_u32_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<std::uint32_t*>(ptr), n);
    DF_CUDA_CHECK_LAUNCH();
}

}  // namespace dermfast
