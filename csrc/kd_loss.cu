// Fused knowledge-distillation loss, forward: per-row loss and the gradient with respect to the student logits.
//
// The same math as kernels/kd_loss.py (derived there): for row i, z_s = s/T, z_t = t/T, p = softmax(z_t),
// q = softmax(z_s), r = softmax(s), y = target,
//   loss_i = kd_loss_scale * KL(p || q) + coef_i * CE_i,      coef_i = ce_scale * w[y_i] (/ *wsum if given)
//   grad_ij = kd_grad_scale * (q_j - p_j) + coef_i * (r_j - [j == y_i])
//
// Why it is shaped this way:
// - A row is a reduction, so a row belongs to one warp when C is small (<= kWarpMaxC: 32 lanes stride the row,
//   shuffles reduce, eight rows per 256-thread block so 256 x 7 is 32 blocks, not 256 mostly idle ones) and to
//   one 512-thread block when C is large (e.g. 32,000: warp shuffles, then one shared-memory step).
// - Pass 1: every thread keeps online-softmax statistics of its strided columns (running student max shared by
//   softmax(s/T) and softmax(s) since T > 0, running teacher max, rescaled sums), then threads merge theirs
//   (merging two partials rescales both sums to the larger max). Pass 2 re-reads the row (it was just read, so
//   mostly from L2) and writes the KL terms and the gradient. Nothing [N, C] is allocated besides the gradient.
// - A non-finite logit in row i (NaN or +-inf, in either matrix) or a target outside [0, C) makes loss_i and that
//   gradient row NaN; the target logit is found by comparing column indices, and the class weight is read only
//   for an in-range target, so no input makes the kernel read or write out of bounds.
// - Tensors cross as raw addresses; the stream as an integer. Inputs are validated in Python and again here.
#include "cuda_check.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dermfast {

namespace {

constexpr int kWarpMaxC = 2048;     // C up to this: a warp per row
constexpr int kRowsPerBlock = 8;     // warp-per-row kernel: 8 warps of 32 threads
constexpr int kBlockThreads = 512;   // block-per-row kernel
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename G>
__device__ __forceinline__ G from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Online-softmax statistics of a set of columns. An empty set has max -inf and zero sums.
struct Stats {
    float m_s;    // max of student logits
    float sum_q;  // sum exp((s - m_s) / T)
    float sum_r;  // sum exp(s - m_s)
    float m_t;    // max of teacher logits
    float sum_t;  // sum exp((t - m_t) / T)
    float s_y;    // the target's student logit (0 if not among these columns)
    int bad;      // a non-finite logit was seen
};

__device__ __forceinline__ Stats empty_stats() {
    return Stats{-INFINITY, 0.f, 0.f, -INFINITY, 0.f, 0.f, 0};
}

// sum * exp((m_old - m_new) * k), with an empty partial (sum == 0, m_old == -inf) staying 0 instead of NaN.
__device__ __forceinline__ float rescale(float sum, float m_old, float m_new, float k) {
    return sum == 0.f ? 0.f : sum * __expf((m_old - m_new) * k);
}

__device__ __forceinline__ void merge(Stats& a, const Stats& b, float inv_t) {
    const float m_s = fmaxf(a.m_s, b.m_s);
    const float m_t = fmaxf(a.m_t, b.m_t);
    a.sum_q = rescale(a.sum_q, a.m_s, m_s, inv_t) + rescale(b.sum_q, b.m_s, m_s, inv_t);
    a.sum_r = rescale(a.sum_r, a.m_s, m_s, 1.f) + rescale(b.sum_r, b.m_s, m_s, 1.f);
    a.sum_t = rescale(a.sum_t, a.m_t, m_t, inv_t) + rescale(b.sum_t, b.m_t, m_t, inv_t);
    a.m_s = m_s;
    a.m_t = m_t;
    a.s_y += b.s_y;
    a.bad |= b.bad;
}

__device__ __forceinline__ bool nonfinite(float x) { return !isfinite(x); }

// One column into a thread's statistics.
__device__ __forceinline__ void push(Stats& st, float s, float t, bool is_target, float inv_t) {
    st.bad |= static_cast<int>(nonfinite(s) || nonfinite(t));
    if (s > st.m_s) {
        st.sum_q = rescale(st.sum_q, st.m_s, s, inv_t);
        st.sum_r = rescale(st.sum_r, st.m_s, s, 1.f);
        st.m_s = s;
    }
    st.sum_q += __expf((s - st.m_s) * inv_t);
    st.sum_r += __expf(s - st.m_s);
    if (t > st.m_t) {
        st.sum_t = rescale(st.sum_t, st.m_t, t, inv_t);
        st.m_t = t;
    }
    st.sum_t += __expf((t - st.m_t) * inv_t);
    if (is_target) st.s_y = s;
}

__device__ __forceinline__ Stats shfl_xor(const Stats& a, int lane_mask) {
    Stats b;
    b.m_s = __shfl_xor_sync(kFullMask, a.m_s, lane_mask);
    b.sum_q = __shfl_xor_sync(kFullMask, a.sum_q, lane_mask);
    b.sum_r = __shfl_xor_sync(kFullMask, a.sum_r, lane_mask);
    b.m_t = __shfl_xor_sync(kFullMask, a.m_t, lane_mask);
    b.sum_t = __shfl_xor_sync(kFullMask, a.sum_t, lane_mask);
    b.s_y = __shfl_xor_sync(kFullMask, a.s_y, lane_mask);
    b.bad = __shfl_xor_sync(kFullMask, a.bad, lane_mask);
    return b;
}

// Butterfly merge: every lane ends with the warp's statistics.
__device__ __forceinline__ void warp_merge(Stats& st, float inv_t) {
    for (int off = 16; off > 0; off >>= 1) merge(st, shfl_xor(st, off), inv_t);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}

struct Params {
    const std::int64_t* y;  // [N] or null
    const float* w;         // [C] or null
    const float* wsum;      // 0-dim or null
    float* loss;            // [N]
    std::int64_t n, c, stride_s, stride_t;
    float inv_t, kd_loss_scale, kd_grad_scale, ce_scale;
};

// Pass 2 over a thread's columns: KL partial sum, gradient written when g != null.
template <typename TS, typename TT, typename TG>
__device__ __forceinline__ float row_terms(const TS* srow, const TT* trow, TG* grow, std::int64_t first,
                                           std::int64_t step, std::int64_t c, const Stats& st, float log_sq,
                                           float log_st, float coef, std::int64_t y, bool has_target,
                                           bool invalid, float inv_t, float kd_grad_scale) {
    float kl = 0.f;
    const float inv_sum_r = 1.f / st.sum_r;
    for (std::int64_t j = first; j < c; j += step) {
        const float s = to_float(srow[j]);
        const float t = to_float(trow[j]);
        const float log_q = (s - st.m_s) * inv_t - log_sq;
        const float log_p = (t - st.m_t) * inv_t - log_st;
        const float p = __expf(log_p);
        kl += p * (log_p - log_q);
        if (grow != nullptr) {
            float g = kd_grad_scale * (__expf(log_q) - p);
            if (has_target) g += coef * (__expf(s - st.m_s) * inv_sum_r - (j == y ? 1.f : 0.f));
            grow[j] = from_float<TG>(invalid ? NAN : g);
        }
    }
    return kl;
}

// Per-row coefficient of CE and the validity of the target.
__device__ __forceinline__ void target_coef(const Params& p, std::int64_t row, std::int64_t* y, float* coef,
                                            bool* y_ok) {
    *y = -1;
    *coef = 0.f;
    *y_ok = true;
    if (p.y == nullptr) return;
    *y = p.y[row];
    *y_ok = *y >= 0 && *y < p.c;
    float c = p.ce_scale;
    if (p.w != nullptr) c *= *y_ok ? p.w[*y] : 0.f;
    if (p.wsum != nullptr) c /= *p.wsum;
    *coef = c;
}

template <typename TS, typename TT, typename TG>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    kd_loss_warp_kernel(const TS* __restrict__ s, const TT* __restrict__ t, TG* __restrict__ g, Params p) {
    const int lane = threadIdx.x & 31;
    const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
    if (row >= p.n) return;  // a whole warp leaves together, so the shuffles below keep full masks
    const TS* srow = s + row * p.stride_s;
    const TT* trow = t + row * p.stride_t;
    std::int64_t y;
    float coef;
    bool y_ok;
    target_coef(p, row, &y, &coef, &y_ok);

    Stats st = empty_stats();
    for (std::int64_t j = lane; j < p.c; j += 32) push(st, to_float(srow[j]), to_float(trow[j]), j == y, p.inv_t);
    warp_merge(st, p.inv_t);
    const float log_sq = __logf(st.sum_q);
    const float log_st = __logf(st.sum_t);
    const bool invalid = st.bad != 0 || !y_ok;
    TG* grow = g != nullptr ? g + row * p.c : nullptr;
    float kl = row_terms(srow, trow, grow, lane, 32, p.c, st, log_sq, log_st, coef, y, p.y != nullptr, invalid,
                         p.inv_t, p.kd_grad_scale);
    kl = warp_sum(kl);
    if (lane == 0) {
        const float ce = p.y != nullptr ? __logf(st.sum_r) - (st.s_y - st.m_s) : 0.f;
        p.loss[row] = invalid ? NAN : p.kd_loss_scale * kl + coef * ce;
    }
}

template <typename TS, typename TT, typename TG>
__global__ void __launch_bounds__(kBlockThreads)
    kd_loss_block_kernel(const TS* __restrict__ s, const TT* __restrict__ t, TG* __restrict__ g, Params p) {
    constexpr int kWarps = kBlockThreads / 32;
    __shared__ Stats warp_stats[kWarps];
    __shared__ float warp_kl[kWarps];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const std::int64_t row = blockIdx.x;
    const TS* srow = s + row * p.stride_s;
    const TT* trow = t + row * p.stride_t;
    std::int64_t y;
    float coef;
    bool y_ok;
    target_coef(p, row, &y, &coef, &y_ok);

    Stats st = empty_stats();
    for (std::int64_t j = threadIdx.x; j < p.c; j += kBlockThreads) {
        push(st, to_float(srow[j]), to_float(trow[j]), j == y, p.inv_t);
    }
    warp_merge(st, p.inv_t);
    if (lane == 0) warp_stats[warp] = st;
    __syncthreads();
    st = warp_stats[0];
    for (int k = 1; k < kWarps; ++k) merge(st, warp_stats[k], p.inv_t);  // every thread, same order: same result
    const float log_sq = __logf(st.sum_q);
    const float log_st = __logf(st.sum_t);
    const bool invalid = st.bad != 0 || !y_ok;
    TG* grow = g != nullptr ? g + row * p.c : nullptr;
    float kl = row_terms(srow, trow, grow, threadIdx.x, kBlockThreads, p.c, st, log_sq, log_st, coef, y,
                         p.y != nullptr, invalid, p.inv_t, p.kd_grad_scale);
    kl = warp_sum(kl);
    if (lane == 0) warp_kl[warp] = kl;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int k = 0; k < kWarps; ++k) total += warp_kl[k];
        const float ce = p.y != nullptr ? __logf(st.sum_r) - (st.s_y - st.m_s) : 0.f;
        p.loss[row] = invalid ? NAN : p.kd_loss_scale * total + coef * ce;
    }
}

// Switches to `device` for the lifetime of the guard if it is not already current (the launch goes to the
// logits' device, whatever the caller's current device is).
template <typename TS, typename TT, typename TG>
void launch(std::uintptr_t s, std::uintptr_t t, std::uintptr_t g, const Params& p, cudaStream_t stream) {
    const auto* sp = reinterpret_cast<const TS*>(s);
    const auto* tp = reinterpret_cast<const TT*>(t);
    auto* gp = reinterpret_cast<TG*>(g);
    if (p.c <= kWarpMaxC) {
        const std::int64_t blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock;
        kd_loss_warp_kernel<TS, TT, TG><<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, stream>>>(
            sp, tp, gp, p);
    } else {
        kd_loss_block_kernel<TS, TT, TG><<<static_cast<unsigned>(p.n), kBlockThreads, 0, stream>>>(sp, tp, gp, p);
    }
    DF_CUDA_CHECK_LAUNCH();
}

template <typename TS, typename TG>
void dispatch_teacher(int t_dtype, std::uintptr_t s, std::uintptr_t t, std::uintptr_t g, const Params& p,
                      cudaStream_t stream) {
    switch (t_dtype) {
        case 0: return launch<TS, float, TG>(s, t, g, p, stream);
        case 1: return launch<TS, __half, TG>(s, t, g, p, stream);
        default: return launch<TS, __nv_bfloat16, TG>(s, t, g, p, stream);
    }
}

}  // namespace

// dtype codes: 0 float32, 1 float16, 2 bfloat16. The gradient is float32 for float32 / float16 students and
// bfloat16 for bfloat16 ones (kernels/kd_loss.py `grad_dtype_for` says why), contiguous [N, C].
void kd_loss_fwd(std::uintptr_t s, std::uintptr_t t, std::uintptr_t y, std::uintptr_t w, std::uintptr_t wsum,
                 std::uintptr_t loss, std::uintptr_t grad, std::int64_t n, std::int64_t c, std::int64_t stride_s,
                 std::int64_t stride_t, int s_dtype, int t_dtype, double inv_t, double kd_loss_scale,
                 double kd_grad_scale, double ce_scale, int device, std::uintptr_t stream) {
    DF_CHECK(n >= 1 && c >= 1, "kd_loss_fwd: need n >= 1 and c >= 1, got n=" << n << ", c=" << c);
    DF_CHECK(n <= 0x7fffffffLL, "kd_loss_fwd: at most 2**31 - 1 rows, got " << n);
    DF_CHECK(s != 0 && t != 0 && loss != 0, "kd_loss_fwd: null student, teacher or loss pointer");
    DF_CHECK(stride_s >= c && stride_t >= c,
             "kd_loss_fwd: row strides must be >= c (unit column stride), got " << stride_s << ", " << stride_t);
    DF_CHECK(s_dtype >= 0 && s_dtype <= 2 && t_dtype >= 0 && t_dtype <= 2,
             "kd_loss_fwd: dtype codes must be 0 (f32), 1 (f16) or 2 (bf16), got " << s_dtype << ", " << t_dtype);
    DF_CHECK(w == 0 || y != 0, "kd_loss_fwd: class weights need a target");
    DF_CHECK(wsum == 0 || w != 0, "kd_loss_fwd: a weight sum needs class weights");
    DF_CHECK(inv_t > 0.0 && inv_t < 1e30, "kd_loss_fwd: inv_t must be finite and > 0, got " << inv_t);
    DF_CHECK(device >= 0, "kd_loss_fwd: device must be a CUDA ordinal >= 0, got " << device);
    DeviceGuard guard(device);
    Params p{reinterpret_cast<const std::int64_t*>(y), reinterpret_cast<const float*>(w),
             reinterpret_cast<const float*>(wsum), reinterpret_cast<float*>(loss), n, c, stride_s, stride_t,
             static_cast<float>(inv_t), static_cast<float>(kd_loss_scale), static_cast<float>(kd_grad_scale),
             static_cast<float>(ce_scale)};
    auto st = reinterpret_cast<cudaStream_t>(stream);
    switch (s_dtype) {
        case 0: return dispatch_teacher<float, float>(t_dtype, s, t, grad, p, st);
        case 1: return dispatch_teacher<__half, float>(t_dtype, s, t, grad, p, st);
        default: return dispatch_teacher<__nv_bfloat16, __nv_bfloat16>(t_dtype, s, t, grad, p, st);
    }
}

}  // namespace dermfast
