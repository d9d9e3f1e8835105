// Stands in for <torch/extension.h> when sparse_ffn_cpu.cpp is compiled into a library without
// Python (sparse_ffn_library.cpp): ATen/libtorch only, and the file's PYBIND11_MODULE block
// becomes an unused function (the Python bindings are the extension's, not this library's).
#pragma once
#include <torch/all.h>

namespace lte_no_python {
struct Module {  // accepts the block's m.def(...) calls and does nothing
  template <class... Args>
  void def(Args&&...) {}
};
}  // namespace lte_no_python

#define PYBIND11_MODULE(name, m) [[maybe_unused]] static void lte_no_python_bindings(lte_no_python::Module& m)
