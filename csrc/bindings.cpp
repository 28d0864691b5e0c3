// The one pybind11 module of dermfast: `dermfast._C`.
//
// A thin surface: plain ints/strings in and out. Device buffers cross as raw addresses (e.g. tensor.data_ptr())
// and streams as integers (e.g. torch.cuda.current_stream().cuda_stream); no libtorch is linked. The
// implementations live in the .cu files; this file needs no CUDA headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dermfast {
// device_info.cu
int cuda_runtime_version();
int cuda_driver_version();
int device_count();
std::string device_query_error();
std::string device_name(int device);
std::pair<int, int> compute_capability(int device);
std::string compiled_cuda_archs();
void fill_iota_u32(std::uintptr_t ptr, std::int64_t n, std::uintptr_t stream);
// mae_loss.cu
void mae_loss_fwd(std::uintptr_t imgs, std::uintptr_t pred, std::uintptr_t mask, std::uintptr_t partials,
                  std::uintptr_t loss, std::vector<std::int64_t> shape, std::int64_t patch,
                  std::vector<std::int64_t> imgs_strides, std::vector<std::int64_t> pred_strides,
                  std::vector<std::int64_t> mask_strides, int imgs_dtype, int pred_dtype, int mask_dtype,
                  bool norm_pix, double eps, int device, std::uintptr_t stream);
void mae_loss_bwd(std::uintptr_t grad, std::uintptr_t imgs, std::uintptr_t pred, std::uintptr_t mask,
                  std::uintptr_t scale, std::uintptr_t out, std::vector<std::int64_t> shape, std::int64_t patch,
                  std::vector<std::int64_t> imgs_strides, std::vector<std::int64_t> pred_strides,
                  std::vector<std::int64_t> mask_strides, int imgs_dtype, int pred_dtype, int mask_dtype,
                  bool norm_pix, double eps, int device, std::uintptr_t stream);
// kd_loss.cu
void kd_loss_fwd(std::uintptr_t s, std::uintptr_t t, std::uintptr_t y, std::uintptr_t w, std::uintptr_t wsum,
                 std::uintptr_t loss, std::uintptr_t grad, std::int64_t n, std::int64_t c, std::int64_t stride_s,
                 std::int64_t stride_t, int s_dtype, int t_dtype, double inv_t, double kd_loss_scale,
                 double kd_grad_scale, double ce_scale, int device, std::uintptr_t stream);
// random_masking.cu
void random_masking_fwd(std::uintptr_t x, std::uintptr_t pos, std::uintptr_t vis, std::uintptr_t mask,
                        std::uintptr_t ids_restore, std::uintptr_t ids_keep, std::uintptr_t cu_seqlens,
                        std::int64_t B, std::int64_t L, std::int64_t D, int dtype, int mask_dtype,
                        std::int64_t h_step, std::int64_t sample_offset, int device, std::uintptr_t stream);
}  // namespace dermfast

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() =
        "dermfast's compiled CUDA extension (csrc/). The CUDA runtime is linked statically, so this module "
        "imports without a GPU or driver; device queries then report 0 devices. Errors raise: ValueError for "
        "bad arguments, IndexError for bad device ordinals, RuntimeError for failed CUDA calls.";

    m.def("cuda_runtime_version", &dermfast::cuda_runtime_version,
          "CUDA runtime version this module was built with, as 1000*major + 10*minor (e.g. 13000).");
    m.def("cuda_driver_version", &dermfast::cuda_driver_version,
          "Latest CUDA version the installed driver supports (1000*major + 10*minor); 0 when no driver is "
          "installed.");
    m.def("device_count", &dermfast::device_count,
          "Number of visible CUDA devices; 0 (never an exception) when there is no driver or no GPU. "
          "device_query_error() says why.");
    m.def("device_query_error", &dermfast::device_query_error,
          "Why device_count() is 0: the cudaGetDeviceCount error as 'cudaErrorName: description', or '' when "
          "the query succeeded.");
    m.def("device_name", &dermfast::device_name, py::arg("device"),
          "Name of CUDA device `device` (e.g. 'NVIDIA H100 80GB HBM3'). IndexError if the ordinal is not in "
          "[0, device_count()).");
    m.def("compute_capability", &dermfast::compute_capability, py::arg("device"),
          "(major, minor) compute capability of CUDA device `device`, e.g. (9, 0). IndexError if the ordinal "
          "is not in [0, device_count()).");
    m.def("compiled_cuda_archs", &dermfast::compiled_cuda_archs,
          "CMAKE_CUDA_ARCHITECTURES the extension was compiled for, comma-separated, e.g. '80,90'.");
    m.def("fill_iota_u32", &dermfast::fill_iota_u32, py::arg("ptr"), py::arg("n"), py::arg("stream") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "Launch smoke test: asynchronously write out[i] = i (uint32) for i in [0, n) on `stream`.\n\n"
          "ptr: device address of a 4-byte-aligned buffer of >= n uint32/int32 elements (tensor.data_ptr()).\n"
          "n: element count, 0 <= n <= 2**32; n == 0 is a no-op.\n"
          "stream: cudaStream_t as int (torch.cuda.current_stream().cuda_stream); 0 is the default stream.\n"
          "Raises ValueError for bad arguments or non-device memory, RuntimeError if the launch fails. "
          "Synchronize the stream before reading the result.");
    m.def("mae_loss_fwd", &dermfast::mae_loss_fwd, py::arg("imgs"), py::arg("pred"), py::arg("mask"),
          py::arg("partials"), py::arg("loss"), py::arg("shape"), py::arg("patch"), py::arg("imgs_strides"),
          py::arg("pred_strides"), py::arg("mask_strides"), py::arg("imgs_dtype"), py::arg("pred_dtype"),
          py::arg("mask_dtype"), py::arg("norm_pix"), py::arg("eps"), py::arg("device"), py::arg("stream") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "MAE loss forward (csrc/mae_loss.cu), asynchronous on `stream`: writes the fp32 scalar loss.\n\n"
          "imgs [B, C, H, W], pred [B, L, P], mask [B, L]: device addresses with element strides; shape = "
          "(B, C, H, W); partials: >= 2 * B * (H / patch) fp32 scratch; dtype codes 0 f32, 1 f16, 2 bf16 "
          "(imgs, pred), mask also 3 f64, 4 u8/bool, 5 i32, 6 i64. Use dermfast.ops.mae_loss, which validates.");
    m.def("mae_loss_bwd", &dermfast::mae_loss_bwd, py::arg("grad"), py::arg("imgs"), py::arg("pred"),
          py::arg("mask"), py::arg("scale"), py::arg("out"), py::arg("shape"), py::arg("patch"),
          py::arg("imgs_strides"), py::arg("pred_strides"), py::arg("mask_strides"), py::arg("imgs_dtype"),
          py::arg("pred_dtype"), py::arg("mask_dtype"), py::arg("norm_pix"), py::arg("eps"), py::arg("device"),
          py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
          "MAE loss backward (csrc/mae_loss.cu): out [B, L, P] contiguous, pred's dtype = grad * dloss/dpred "
          "(zeros on kept patches). grad: fp32 scalar address; scale: 1 fp32 scratch. Arguments as mae_loss_fwd.");
    m.def("kd_loss_fwd", &dermfast::kd_loss_fwd, py::arg("s"), py::arg("t"), py::arg("y"), py::arg("w"),
          py::arg("wsum"), py::arg("loss"), py::arg("grad"), py::arg("n"), py::arg("c"), py::arg("stride_s"),
          py::arg("stride_t"), py::arg("s_dtype"), py::arg("t_dtype"), py::arg("inv_t"), py::arg("kd_loss_scale"),
          py::arg("kd_grad_scale"), py::arg("ce_scale"), py::arg("device"), py::arg("stream") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "KD loss forward (csrc/kd_loss.cu), asynchronous on `stream`: per-row loss [n] fp32 and, when grad != 0, "
          "d loss / d student [n, c] contiguous (fp32 for f32/f16 students, bf16 for bf16).\n\n"
          "s, t: [n, c] logits, unit column stride, row strides stride_s / stride_t; dtype codes 0 f32, 1 f16, "
          "2 bf16. y: [n] int64 targets or 0; w: [c] fp32 class weights or 0; wsum: fp32 scalar dividing the CE "
          "coefficient or 0. Use dermfast.ops.kd_loss, which validates and computes the scales.");
    m.def("random_masking_fwd", &dermfast::random_masking_fwd, py::arg("x"), py::arg("pos"), py::arg("vis"),
          py::arg("mask"), py::arg("ids_restore"), py::arg("ids_keep"), py::arg("cu_seqlens"), py::arg("B"),
          py::arg("L"), py::arg("D"), py::arg("dtype"), py::arg("mask_dtype"), py::arg("h_step"),
          py::arg("sample_offset"), py::arg("device"), py::arg("stream") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "MAE random masking forward (csrc/random_masking.cu), one block per sample, asynchronous on `stream`.\n\n"
          "x [B, L, D], pos [L, D] (or 0), vis [T, D]: contiguous device addresses, dtype code 0 f32, 1 f16, "
          "2 bf16; mask [B, L] (mask_dtype code, 0 keep 1 remove), ids_restore [B, L] int64, ids_keep [T] int64; "
          "cu_seqlens [B+1] int32 input (row b keeps cu[b+1]-cu[b] patches); 1 <= L <= 4096; D == 0: indices "
          "only. h_step = hash(hash(seed) ^ step) (uint32). Use dermfast.ops.random_masking, which validates.");
}
