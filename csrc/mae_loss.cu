// Fused MAE reconstruction loss (norm-pix MSE on removed patches), forward and backward, for dermfast._C.
//
// Same math and the same determinism as kernels/mae_loss.py (read its header for why the backward recomputes
// instead of saving a gradient):
//   per patch: mean = sum(x)/P, var = sum((x-mean)^2)/(P-1) (unbiased), t = (x-mean)/sqrt(var+eps) if norm_pix,
//   e = sum((y-t)^2)/P;  loss = sum m*e / max(sum m, 1);  dloss/dy = g * m * 2 (y-t) / (P * max(sum m, 1)).
//
// Shape of the kernels: one block per (patch row hi, sample b), grid (H/p, B): a block per sample alone would be
// only B = 64 blocks at ViT-H, fewer than an H100 has SMs. Each warp takes the patches wi = warp, warp + 4, ...
// of its row; a removed patch (mask != 0, warp-uniform branch) is loaded once into registers, lane k holding
// elements j = lane + 32 * i (i < kMaxPerLane, so P <= 1024: p 8 / 14 / 16 at C = 3), and the statistics are
// two-pass over registers with warp shuffles. Kept patches are not read. Target pixels come straight from imgs
// [B, C, H, W] through its strides (element j = (r*p + q)*C + c of patch (hi, wi) is imgs[b, c, hi*p+r, wi*p+q]),
// pred through its [B, L, P] strides; the gradient is written contiguous [B, L, P] (zeros on kept patches).
// Partials: each block writes (sum m*e, sum m) for its row; a one-block kernel adds them in a fixed order.
// No float atomics anywhere, so results are bitwise reproducible run to run.
//
// Raw device addresses + a cudaStream_t as integers; no libtorch. Python (dermfast/ops/mae_loss_op.py)
// validates shapes, dtypes and devices before calling; the checks here guard against misuse of the binding.
#include "cuda_check.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace dermfast {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxPerLane = 32;  // P <= 32 * 32 = 1024
constexpr int kReduceThreads = 1024;

// dtype codes shared with Python (mae_loss_op._CUDA_DTYPES / _CUDA_MASK_DTYPES)
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kU8 = 4, kI32 = 5, kI64 = 6 };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The mask is tiny ([B, L]); its dtype is a run-time switch, uniform across the warp.
__device__ __forceinline__ float load_mask(const void* mask, std::int64_t off, int dtype) {
    switch (dtype) {
        case kF32: return static_cast<const float*>(mask)[off];
        case kF16: return __half2float(static_cast<const __half*>(mask)[off]);
        case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(mask)[off]);
        case kF64: return static_cast<float>(static_cast<const double*>(mask)[off]);
        case kU8: return static_cast<float>(static_cast<const std::uint8_t*>(mask)[off]);
        case kI32: return static_cast<float>(static_cast<const std::int32_t*>(mask)[off]);
        default: return static_cast<float>(static_cast<const std::int64_t*>(mask)[off]);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

struct Geometry {
    std::int64_t L, Wp, C, p, P;
    std::int64_t s_ib, s_ic, s_ih, s_iw;  // imgs strides (elements)
    std::int64_t s_pb, s_pl, s_pp;        // pred strides
    std::int64_t s_mb, s_ml;              // mask strides
    int mask_dtype;
    bool norm_pix;
    float eps, inv_p, inv_pm1;
};

// Loads patch (b, hi, wi) into registers and leaves d[i] = y - t for this lane's elements (0 past P).
template <typename TI, typename TP>
__device__ __forceinline__ void patch_diff(const TI* __restrict__ imgs, const TP* __restrict__ pred,
                                           const Geometry& g, std::int64_t b, std::int64_t hi, std::int64_t wi,
                                           int lane, float (&d)[kMaxPerLane]) {
    const std::int64_t l = hi * g.Wp + wi;
    const TI* img_b = imgs + b * g.s_ib;
    const TP* pred_p = pred + b * g.s_pb + l * g.s_pl;
    float x[kMaxPerLane];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const std::int64_t j = lane + 32 * i;
        x[i] = 0.f;
        d[i] = 0.f;
        if (j < g.P) {
            const std::int64_t c = j % g.C, rq = j / g.C, q = rq % g.p, r = rq / g.p;
            x[i] = to_f32(img_b[c * g.s_ic + (hi * g.p + r) * g.s_ih + (wi * g.p + q) * g.s_iw]);
            d[i] = to_f32(pred_p[j * g.s_pp]);
            sum += x[i];
        }
    }
    float mean = 0.f, rstd = 1.f;
    if (g.norm_pix) {
        mean = warp_sum(sum) * g.inv_p;
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            const std::int64_t j = lane + 32 * i;
            if (j < g.P) ss += (x[i] - mean) * (x[i] - mean);
        }
        rstd = 1.f / sqrtf(warp_sum(ss) * g.inv_pm1 + g.eps);
    }
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const std::int64_t j = lane + 32 * i;
        if (j < g.P) d[i] -= (x[i] - mean) * rstd;
    }
}

template <typename TI, typename TP>
__global__ void __launch_bounds__(kThreads) mae_loss_fwd_kernel(const TI* __restrict__ imgs,
                                                                 const TP* __restrict__ pred, const void* mask,
                                                                 float* __restrict__ part, Geometry g) {
    const std::int64_t hi = blockIdx.x, b = blockIdx.y, h = gridDim.x;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float s = 0.f, n = 0.f;
    for (std::int64_t wi = warp; wi < g.Wp; wi += kWarps) {
        const float m = load_mask(mask, b * g.s_mb + (hi * g.Wp + wi) * g.s_ml, g.mask_dtype);
        n += m;
        if (m == 0.f) continue;  // kept patch: never read
        float d[kMaxPerLane];
        patch_diff(imgs, pred, g, b, hi, wi, lane, d);
        float e = 0.f;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) e += d[i] * d[i];
        s += m * (warp_sum(e) * g.inv_p);
    }
    __shared__ float ws[kWarps], wn[kWarps];
    if (lane == 0) {
        ws[warp] = s;
        wn[warp] = n;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float ts = 0.f, tn = 0.f;
        for (int w = 0; w < kWarps; ++w) {  // fixed order: deterministic
            ts += ws[w];
            tn += wn[w];
        }
        part[2 * (b * h + hi)] = ts;
        part[2 * (b * h + hi) + 1] = tn;
    }
}

__device__ float block_sum(float v, float* shared) {  // kReduceThreads threads; fixed tree
    v = warp_sum(v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < kReduceThreads / 32 ? shared[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    __syncthreads();
    return v;  // valid in thread 0
}

__global__ void __launch_bounds__(kReduceThreads) mae_loss_reduce_kernel(const float* __restrict__ part,
                                                                          float* __restrict__ loss,
                                                                          std::int64_t n_part) {
    __shared__ float sh[kReduceThreads / 32];
    float s = 0.f, n = 0.f;
    for (std::int64_t i = threadIdx.x; i < n_part; i += kReduceThreads) {
        s += part[2 * i];
        n += part[2 * i + 1];
    }
    s = block_sum(s, sh);
    n = block_sum(n, sh);
    if (threadIdx.x == 0) *loss = s / fmaxf(n, 1.f);
}

__global__ void __launch_bounds__(kReduceThreads) mae_loss_scale_kernel(const float* __restrict__ grad,
                                                                         const void* mask, float* __restrict__ scale,
                                                                         std::int64_t B, Geometry g) {
    __shared__ float sh[kReduceThreads / 32];
    float n = 0.f;
    for (std::int64_t i = threadIdx.x; i < B * g.L; i += kReduceThreads) {
        n += load_mask(mask, (i / g.L) * g.s_mb + (i % g.L) * g.s_ml, g.mask_dtype);
    }
    n = block_sum(n, sh);
    if (threadIdx.x == 0) *scale = *grad * 2.f * g.inv_p / fmaxf(n, 1.f);
}

// (kThreads, 1): with the thread count alone ptxas capped this kernel at 128 registers and spilled 4-8 B on sm_80
// and sm_90 (`python -m dermfast.info --resources`); one block per SM as the floor lets it use 143, spill-free.
template <typename TI, typename TP>
__global__ void __launch_bounds__(kThreads, 1) mae_loss_bwd_kernel(const TI* __restrict__ imgs,
                                                                    const TP* __restrict__ pred, const void* mask,
                                                                    const float* __restrict__ scale,
                                                                    TP* __restrict__ out, Geometry g) {
    const std::int64_t hi = blockIdx.x, b = blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float sc = *scale;
    for (std::int64_t wi = warp; wi < g.Wp; wi += kWarps) {
        const std::int64_t l = hi * g.Wp + wi;
        TP* out_p = out + (b * g.L + l) * g.P;
        const float m = load_mask(mask, b * g.s_mb + l * g.s_ml, g.mask_dtype);
        if (m == 0.f) {  // kept patch: zero gradient, inputs not read
            for (std::int64_t j = lane; j < g.P; j += 32) out_p[j] = from_f32<TP>(0.f);
            continue;
        }
        float d[kMaxPerLane];
        patch_diff(imgs, pred, g, b, hi, wi, lane, d);
        const float f = sc * m;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            const std::int64_t j = lane + 32 * i;
            if (j < g.P) out_p[j] = from_f32<TP>(f * d[i]);
        }
    }
}

Geometry make_geometry(const std::vector<std::int64_t>& shape, std::int64_t patch,
                       const std::vector<std::int64_t>& s_imgs, const std::vector<std::int64_t>& s_pred,
                       const std::vector<std::int64_t>& s_mask, int mask_dtype, bool norm_pix, double eps) {
    DF_CHECK(shape.size() == 4, "mae_loss: shape must be [B, C, H, W], got " << shape.size() << " values");
    DF_CHECK(s_imgs.size() == 4 && s_pred.size() == 3 && s_mask.size() == 2,
             "mae_loss: strides must have 4 (imgs), 3 (pred) and 2 (mask) values");
    const std::int64_t B = shape[0], C = shape[1], H = shape[2], W = shape[3];
    DF_CHECK(B >= 1 && B <= 65535, "mae_loss: batch must be in [1, 65535], got " << B);
    DF_CHECK(C >= 1 && patch >= 1, "mae_loss: channels and patch must be >= 1");
    DF_CHECK(H >= patch && W >= patch && H % patch == 0 && W % patch == 0,
             "mae_loss: image " << H << "x" << W << " is not a multiple of patch " << patch);
    DF_CHECK(H / patch <= 2147483647LL, "mae_loss: too many patch rows");
    const std::int64_t P = patch * patch * C;
    DF_CHECK(P <= 32 * kMaxPerLane, "mae_loss: patch of " << P << " values exceeds the CUDA kernel's "
                                                          << 32 * kMaxPerLane);
    DF_CHECK(!norm_pix || P >= 2, "mae_loss: norm_pix needs at least 2 values per patch");
    DF_CHECK(mask_dtype >= kF32 && mask_dtype <= kI64, "mae_loss: unknown mask dtype code " << mask_dtype);
    for (auto s : s_imgs) DF_CHECK(s >= 0, "mae_loss: negative imgs stride");
    for (auto s : s_pred) DF_CHECK(s >= 0, "mae_loss: negative pred stride");
    for (auto s : s_mask) DF_CHECK(s >= 0, "mae_loss: negative mask stride");
    Geometry g{};
    g.Wp = W / patch;
    g.L = (H / patch) * g.Wp;
    g.C = C;
    g.p = patch;
    g.P = P;
    g.s_ib = s_imgs[0]; g.s_ic = s_imgs[1]; g.s_ih = s_imgs[2]; g.s_iw = s_imgs[3];
    g.s_pb = s_pred[0]; g.s_pl = s_pred[1]; g.s_pp = s_pred[2];
    g.s_mb = s_mask[0]; g.s_ml = s_mask[1];
    g.mask_dtype = mask_dtype;
    g.norm_pix = norm_pix;
    g.eps = static_cast<float>(eps);
    g.inv_p = 1.f / static_cast<float>(P);
    g.inv_pm1 = P > 1 ? 1.f / static_cast<float>(P - 1) : 0.f;
    return g;
}

void check_ptr(std::uintptr_t p, const char* name) {
    DF_CHECK(p != 0, "mae_loss: " << name << " pointer is null");
}

void check_dtypes(int imgs_dtype, int pred_dtype) {
    DF_CHECK(imgs_dtype >= kF32 && imgs_dtype <= kBF16,
             "mae_loss: imgs dtype code " << imgs_dtype << " is not 0 (f32), 1 (f16) or 2 (bf16)");
    DF_CHECK(pred_dtype >= kF32 && pred_dtype <= kBF16,
             "mae_loss: pred dtype code " << pred_dtype << " is not 0 (f32), 1 (f16) or 2 (bf16)");
}

template <typename F>
void dispatch(int imgs_dtype, int pred_dtype, F&& f) {
    auto with_pred = [&](auto ti) {
        using TI = decltype(ti);
        switch (pred_dtype) {
            case kF32: f(TI{}, float{}); break;
            case kF16: f(TI{}, __half{}); break;
            case kBF16: f(TI{}, __nv_bfloat16{}); break;
            default: DF_CHECK(false, "mae_loss: pred dtype code " << pred_dtype << " is not float32/16/bfloat16");
        }
    };
    switch (imgs_dtype) {
        case kF32: with_pred(float{}); break;
        case kF16: with_pred(__half{}); break;
        case kBF16: with_pred(__nv_bfloat16{}); break;
        default: DF_CHECK(false, "mae_loss: imgs dtype code " << imgs_dtype << " is not float32/16/bfloat16");
    }
}

}  // namespace

void mae_loss_fwd(std::uintptr_t imgs, std::uintptr_t pred, std::uintptr_t mask, std::uintptr_t partials,
                  std::uintptr_t loss, std::vector<std::int64_t> shape, std::int64_t patch,
                  std::vector<std::int64_t> imgs_strides, std::vector<std::int64_t> pred_strides,
                  std::vector<std::int64_t> mask_strides, int imgs_dtype, int pred_dtype, int mask_dtype,
                  bool norm_pix, double eps, int device, std::uintptr_t stream) {
    const Geometry g = make_geometry(shape, patch, imgs_strides, pred_strides, mask_strides, mask_dtype, norm_pix, eps);
    check_ptr(imgs, "imgs"); check_ptr(pred, "pred"); check_ptr(mask, "mask");
    check_ptr(partials, "partials"); check_ptr(loss, "loss");
    check_dtypes(imgs_dtype, pred_dtype);
    DeviceGuard guard(device);
    const std::int64_t B = shape[0], h = shape[2] / patch;
    auto st = reinterpret_cast<cudaStream_t>(stream);
    dispatch(imgs_dtype, pred_dtype, [&](auto ti, auto tp) {
        using TI = decltype(ti);
        using TP = decltype(tp);
        mae_loss_fwd_kernel<TI, TP><<<dim3(static_cast<unsigned>(h), static_cast<unsigned>(B)), kThreads, 0, st>>>(
            reinterpret_cast<const TI*>(imgs), reinterpret_cast<const TP*>(pred),
            reinterpret_cast<const void*>(mask), reinterpret_cast<float*>(partials), g);
    });
    DF_CUDA_CHECK_LAUNCH();
    mae_loss_reduce_kernel<<<1, kReduceThreads, 0, st>>>(reinterpret_cast<const float*>(partials),
                                                         reinterpret_cast<float*>(loss), B * h);
    DF_CUDA_CHECK_LAUNCH();
}

void mae_loss_bwd(std::uintptr_t grad, std::uintptr_t imgs, std::uintptr_t pred, std::uintptr_t mask,
                  std::uintptr_t scale, std::uintptr_t out, std::vector<std::int64_t> shape, std::int64_t patch,
                  std::vector<std::int64_t> imgs_strides, std::vector<std::int64_t> pred_strides,
                  std::vector<std::int64_t> mask_strides, int imgs_dtype, int pred_dtype, int mask_dtype,
                  bool norm_pix, double eps, int device, std::uintptr_t stream) {
    const Geometry g = make_geometry(shape, patch, imgs_strides, pred_strides, mask_strides, mask_dtype, norm_pix, eps);
    check_ptr(grad, "grad"); check_ptr(imgs, "imgs"); check_ptr(pred, "pred"); check_ptr(mask, "mask");
    check_ptr(scale, "scale"); check_ptr(out, "out");
    check_dtypes(imgs_dtype, pred_dtype);
    DeviceGuard guard(device);
    const std::int64_t B = shape[0], h = shape[2] / patch;
    auto st = reinterpret_cast<cudaStream_t>(stream);
    mae_loss_scale_kernel<<<1, kReduceThreads, 0, st>>>(reinterpret_cast<const float*>(grad),
                                                        reinterpret_cast<const void*>(mask),
                                                        reinterpret_cast<float*>(scale), B, g);
    DF_CUDA_CHECK_LAUNCH();
    dispatch(imgs_dtype, pred_dtype, [&](auto ti, auto tp) {
        using TI = decltype(ti);
        using TP = decltype(tp);
        mae_loss_bwd_kernel<TI, TP><<<dim3(static_cast<unsigned>(h), static_cast<unsigned>(B)), kThreads, 0, st>>>(
            reinterpret_cast<const TI*>(imgs), reinterpret_cast<const TP*>(pred),
            reinterpret_cast<const void*>(mask), reinterpret_cast<const float*>(scale),
            reinterpret_cast<TP*>(out), g);
    });
    DF_CUDA_CHECK_LAUNCH();
}

}  // namespace dermfast
