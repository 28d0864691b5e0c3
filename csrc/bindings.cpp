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
}
