// lte::sparse_ffn registered in C++ (TORCH_LIBRARY): for runtimes without Python, such as an
// AOTInductor package (`lte.package`) loaded by torch::inductor::AOTIModelPackageLoader from C++.
//
// In Python the op is a torch.library.custom_op (kernels/ops.py) and this library must NOT be
// loaded beside it (both define the schema). Here the schema is the one the custom op declares
// (keep them equal: AOTInductor's proxy executor finds the op by name and checks the arguments
// against it), and the CPU kernel is the gathered C++ kernel of sparse_ffn_cpu.cpp, compiled in
// with the no-Python stand-in for <torch/extension.h> (no_python/) first on the include path:
//
//   g++ -std=c++20 -O3 -march=<cpu.isa()> -fopenmp -fPIC -shared -Ikernels/csrc/no_python \
//       -I<torch>/include -I<torch>/include/torch/csrc/api/include kernels/csrc/sparse_ffn_library.cpp \
//       -L<torch>/lib -ltorch -ltorch_cpu -lc10 <torch>/lib/libgomp.so.1 -o liblte_ops.so
//
// (`lte_compile.deploy.build_cpp_library(path)` runs it for this machine.) Link it into the
// runtime (or dlopen it) before loading the package. Differences from the Python op: every
// CPU call runs the gathered kernel (no timed choice of a dense path for large batches, which
// kernels/dispatch.py makes), and no soft-mode autograd (a package is inference only).
#include "sparse_ffn_cpu.cpp"

#include <torch/library.h>

namespace {

torch::Tensor sparse_ffn_op(torch::Tensor x, torch::Tensor gates, torch::Tensor w_up,
                            c10::optional<torch::Tensor> w_gate, torch::Tensor w_down,
                            c10::optional<torch::Tensor> b_up, c10::optional<torch::Tensor> b_gate,
                            c10::optional<torch::Tensor> b_down, std::string act, int64_t expert_size,
                            std::string mode, double tau) {
  auto y = sparse_ffn_cpu(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau);
  return nan_rows_like_eager(x, y);
}

}  // namespace

TORCH_LIBRARY(lte, m) {
  m.def("sparse_ffn(Tensor x, Tensor gates, Tensor w_up, Tensor? w_gate, Tensor w_down, Tensor? b_up, "
        "Tensor? b_gate, Tensor? b_down, str act, SymInt expert_size, str mode, float tau) -> Tensor");
}

TORCH_LIBRARY_IMPL(lte, CPU, m) { m.impl("sparse_ffn", &sparse_ffn_op); }
