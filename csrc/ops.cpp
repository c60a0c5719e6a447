// Every calibops op schema, in one place. Implementations are registered per dispatch key in
// csrc/cpu (CPU) and csrc/cuda (CUDA); fake kernels and autograd formulas are registered from Python
// (calibops/_ops.py). Semantics: docs/kernel_contract.md; argument checks: csrc/contract.h.
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
  // input [B, C, N]; target [B, R, N] labels (target_kind 0) or [B, C, N] dense (1); edges [M+1] (scheme 0 hard)
  // or [M] centres (scheme 1 soft); activation 0 none / 1 softmax / 2 sigmoid; mode 0 marginal (K = C rows) /
  // 1 top-label (K = 1)
  // -> count [B, K, M] f32, sum_p [B, K, M] f32, sum_y [B, K, R, M] f32, sum_p2 / sum_py [B, K, M] f32 (moments)
  //    or [0], bad (2,) int64 = [labels outside [0, C) other than ignore_index, non-finite p of used voxels]
  m.def(
      "binned_stats(Tensor input, Tensor target, Tensor edges, int num_bins, int scheme, int activation, "
      "int target_kind, int mode, bool moments, int? ignore_index, bool right) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> grad_input [B, C, N] in input's dtype
  m.def(
      "binned_stats_backward(Tensor grad_count, Tensor grad_sum_p, Tensor grad_sum_y, Tensor grad_sum_p2, "
      "Tensor grad_sum_py, Tensor input, Tensor target, Tensor edges, int num_bins, int scheme, int activation, "
      "int target_kind, int mode, bool moments, int? ignore_index, bool right) -> Tensor");
}
