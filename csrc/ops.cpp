// Every calibops op schema, in one place. Implementations are registered per dispatch key in
// csrc/cpu (CPU) and csrc/cuda (CUDA); fake kernels and autograd formulas are registered from Python
// (calibops/_ops.py). Semantics: docs/kernel_contract.md.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import calibops._C` load this shared library (which registers the ops below) like a module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(calibops, m) {
  // input [B, C, N]; target [B, N] labels or [B, C, N] dense; edges [M+1] (hard) / [M] centres (soft)
  // -> count [B, C, M] f32, sum_p [B, C, M] f32, sum_y [B, C, M] f32,
  //    bad (2,) int64 = [labels outside [0, C) other than ignore_index, non-finite probability entries]
  m.def(
      "binned_stats(Tensor input, Tensor target, Tensor edges, int num_bins, bool soft, int activation, "
      "bool labels, int? ignore_index, bool right) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> grad_input [B, C, N] in input's dtype
  m.def(
      "binned_stats_backward(Tensor grad_count, Tensor grad_sum_p, Tensor grad_sum_y, Tensor input, "
      "Tensor target, Tensor edges, int num_bins, bool soft, int activation, bool labels, int? ignore_index, "
      "bool right) -> Tensor");
}
