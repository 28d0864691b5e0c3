// MAE random masking forward: one thread block per sample.
//
// Why it is shaped this way: a row has at most 4096 patches, so its sort keys fit in shared memory
// (8 bytes each, 32 KiB at L = 4096). The block hashes its keys in place (the chain of
// dermfast/ops/random_masking_op.py: the host passes h_step = hash(hash(seed) ^ step), the block finishes
// hash(hash(h_step ^ sample) ^ patch) in uint32 arithmetic), packs key = (hash << 20) | patch (unique, so ties
// go to the lower patch index), bitonic-sorts the padded power-of-two row in shared memory, scatters
// ids_restore / mask and writes ids_keep from the sorted keys' low 20 bits, then gathers its K visible rows
// (one warp per row, lanes along D) and adds the position embedding in the input dtype (computed in float and
// rounded once, which equals torch's own half / bfloat16 add). cu_seqlens (int32 [B+1], from Python) gives each
// row's keep count and first output row, so dense and ragged layouts are one kernel. D == 0: indices only.
//
// No libtorch: raw device addresses and a cudaStream_t cross from Python as integers. Python validates every
// shape, dtype and range before the launch; the checks here only guard against null / misaligned pointers.
#include "cuda_check.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dermfast {

namespace {

constexpr int kMaxL = 4096;
constexpr int kThreads = 512;

__device__ __forceinline__ std::uint32_t lowbias32(std::uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, typename M>
__global__ void __launch_bounds__(kThreads) random_masking_fwd_kernel(
    const T* __restrict__ x, const T* __restrict__ pos, T* __restrict__ vis, M* __restrict__ mask,
    std::int64_t* __restrict__ ids_restore, std::int64_t* __restrict__ ids_keep, const std::int32_t* __restrict__ cu,
    int L, int P, std::int64_t D, std::uint32_t h_step, std::uint64_t sample_offset) {
    extern __shared__ unsigned long long keys[];  // [P], P = next power of two >= L
    const std::int64_t row = blockIdx.x;
    const std::uint32_t hs = lowbias32(h_step ^ static_cast<std::uint32_t>(sample_offset + row));
    for (int j = threadIdx.x; j < P; j += blockDim.x) {
        keys[j] = j < L ? (static_cast<unsigned long long>(lowbias32(hs ^ static_cast<std::uint32_t>(j))) << 20) |
                              static_cast<unsigned long long>(j)
                        : ~0ull;  // padding sorts last
    }
    __syncthreads();
    // Bitonic sort, ascending, over P keys.
    for (int k = 2; k <= P; k <<= 1) {
        for (int s = k >> 1; s > 0; s >>= 1) {
            for (int i = threadIdx.x; i < P; i += blockDim.x) {
                const int partner = i ^ s;
                if (partner > i) {
                    const bool up = (i & k) == 0;
                    const unsigned long long a = keys[i], b = keys[partner];
                    if ((a > b) == up) {
                        keys[i] = b;
                        keys[partner] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    const int start = cu[row];
    const int k_row = cu[row + 1] - start;
    const std::int64_t row_l = row * static_cast<std::int64_t>(L);
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        const int patch = static_cast<int>(keys[j] & 0xFFFFFull);
        ids_restore[row_l + patch] = j;
        mask[row_l + patch] = from_f<M>(j >= k_row ? 1.0f : 0.0f);
        if (j < k_row) ids_keep[start + j] = patch;
    }
    if (D == 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    for (int j = warp; j < k_row; j += n_warps) {
        const std::int64_t patch = static_cast<std::int64_t>(keys[j] & 0xFFFFFull);
        const T* src = x + (row_l + patch) * D;
        const T* psrc = pos != nullptr ? pos + patch * D : nullptr;
        T* dst = vis + (static_cast<std::int64_t>(start) + j) * D;
        for (std::int64_t d = lane; d < D; d += 32) {
            dst[d] = psrc != nullptr ? from_f<T>(to_f<T>(src[d]) + to_f<T>(psrc[d])) : src[d];
        }
    }
}

template <typename T, typename M>
void launch(std::uintptr_t x, std::uintptr_t pos, std::uintptr_t vis, std::uintptr_t mask, std::uintptr_t restore,
            std::uintptr_t keep, std::uintptr_t cu, std::int64_t B, int L, int P, std::int64_t D,
            std::uint32_t h_step, std::uint64_t sample_offset, cudaStream_t stream) {
    const size_t smem = static_cast<size_t>(P) * sizeof(unsigned long long);
    random_masking_fwd_kernel<T, M><<<static_cast<unsigned int>(B), kThreads, smem, stream>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(pos), reinterpret_cast<T*>(vis),
        reinterpret_cast<M*>(mask), reinterpret_cast<std::int64_t*>(restore), reinterpret_cast<std::int64_t*>(keep),
        reinterpret_cast<const std::int32_t*>(cu), L, P, D, h_step, sample_offset);
    DF_CUDA_CHECK_LAUNCH();
}

template <typename T>
void dispatch_mask(int mask_dtype, std::uintptr_t x, std::uintptr_t pos, std::uintptr_t vis, std::uintptr_t mask,
                   std::uintptr_t restore, std::uintptr_t keep, std::uintptr_t cu, std::int64_t B, int L, int P,
                   std::int64_t D, std::uint32_t h_step, std::uint64_t sample_offset, cudaStream_t stream) {
    switch (mask_dtype) {
        case 0: launch<T, float>(x, pos, vis, mask, restore, keep, cu, B, L, P, D, h_step, sample_offset, stream); break;
        case 1: launch<T, __half>(x, pos, vis, mask, restore, keep, cu, B, L, P, D, h_step, sample_offset, stream); break;
        case 2:
            launch<T, __nv_bfloat16>(x, pos, vis, mask, restore, keep, cu, B, L, P, D, h_step, sample_offset, stream);
            break;
        default: DF_CHECK(false, "random_masking_fwd: mask_dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << mask_dtype);
    }
}

}  // namespace

void random_masking_fwd(std::uintptr_t x, std::uintptr_t pos, std::uintptr_t vis, std::uintptr_t mask,
                        std::uintptr_t ids_restore, std::uintptr_t ids_keep, std::uintptr_t cu_seqlens,
                        std::int64_t B, std::int64_t L, std::int64_t D, int dtype, int mask_dtype,
                        std::int64_t h_step, std::int64_t sample_offset, int device, std::uintptr_t stream) {
    DF_CHECK(B >= 0, "random_masking_fwd: B must be >= 0, got " << B);
    DF_CHECK(L >= 1 && L <= kMaxL, "random_masking_fwd: L must be in [1, " << kMaxL << "], got " << L);
    DF_CHECK(D >= 0, "random_masking_fwd: D must be >= 0, got " << D);
    DF_CHECK(B < (std::int64_t{1} << 31), "random_masking_fwd: B must be < 2^31, got " << B);
    DF_CHECK(h_step >= 0 && h_step <= 0xFFFFFFFFll, "random_masking_fwd: h_step must be a uint32, got " << h_step);
    DF_CHECK(sample_offset >= 0, "random_masking_fwd: sample_offset must be >= 0, got " << sample_offset);
    if (B == 0) return;
    DF_CHECK(mask != 0 && ids_restore != 0 && ids_keep != 0 && cu_seqlens != 0,
             "random_masking_fwd: null output / cu_seqlens pointer");
    DF_CHECK(D == 0 || (x != 0 && vis != 0), "random_masking_fwd: null x / visible pointer with D = " << D);
    DF_CHECK(ids_restore % 8 == 0 && ids_keep % 8 == 0 && cu_seqlens % 4 == 0,
             "random_masking_fwd: misaligned index pointer");
    int P = 1;
    while (P < L) P <<= 1;
    int prev = 0;
    DF_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) DF_CUDA_CHECK(cudaSetDevice(device));
    struct Restore {
        int prev, now;
        ~Restore() {
            if (prev != now) (void)cudaSetDevice(prev);  // never throw from a destructor
        }
    } restore_device{prev, device};
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    const auto hs = static_cast<std::uint32_t>(h_step);
    const auto off = static_cast<std::uint64_t>(sample_offset);
    const int Li = static_cast<int>(L);
    switch (dtype) {
        case 0: dispatch_mask<float>(mask_dtype, x, pos, vis, mask, ids_restore, ids_keep, cu_seqlens, B, Li, P, D, hs, off, s); break;
        case 1: dispatch_mask<__half>(mask_dtype, x, pos, vis, mask, ids_restore, ids_keep, cu_seqlens, B, Li, P, D, hs, off, s); break;
        case 2:
            dispatch_mask<__nv_bfloat16>(mask_dtype, x, pos, vis, mask, ids_restore, ids_keep, cu_seqlens, B, Li, P, D, hs, off, s);
            break;
        default: DF_CHECK(false, "random_masking_fwd: dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
    }
}

}  // namespace dermfast
