// The kernel contract's argument checks and output shapes for the C++ bindings, written once (the CPU binding
// csrc/cpu/binned_stats_cpu.cpp and the CUDA binding csrc/cuda/binned_stats_cuda.cpp both use it). The rules and
// argument names are those of calibops/_contract.py (the Python side); errors are c10::ValueError / c10::TypeError
// (Python ValueError / TypeError) naming the argument. The kernels themselves include only contract_types.h.
//
// Strides: any are accepted; prepare() makes input, target and edges contiguous (no copy when they already are).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <vector>

#include "contract_types.h"

namespace calibops {
namespace contract {

using at::Tensor;

inline ElemKind input_kind(const Tensor& t, const char* backend) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK_TYPE(false, backend, ": input must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return kF32;
}

inline ElemKind label_kind(const Tensor& t, const char* backend) {
  switch (t.scalar_type()) {
    case at::kByte:
      return kU8;
    case at::kChar:
      return kI8;
    case at::kShort:
      return kI16;
    case at::kInt:
      return kI32;
    case at::kLong:
      return kI64;
    default:
      TORCH_CHECK_TYPE(false, backend, ": target (labels) must be uint8, int8, int16, int32 or int64, got ",
                       t.scalar_type());
  }
  return kI64;
}

inline ElemKind dense_kind(const Tensor& t, const char* backend) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    case at::kBool:
      return kBool;
    case at::kByte:
      return kU8;
    default:
      TORCH_CHECK_TYPE(false, backend, ": target (dense) must be float32, float16, bfloat16, bool or uint8, got ",
                       t.scalar_type());
  }
  return kF32;
}

// Checks the forward op's arguments (docs/kernel_contract.md) and returns the call's description. Devices: target
// and edges must be on input's device (which device type a binding serves is its own check).
inline Call check_args(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins,
                       int64_t scheme, int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                       std::optional<int64_t> ignore_index, bool right, const char* backend) {
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxBins, backend, ": num_bins must be in [1, 2**24], got ",
                    num_bins);
  TORCH_CHECK_VALUE(scheme == kSchemeHard || scheme == kSchemeSoft, backend,
                    ": scheme must be 0 (hard) or 1 (soft), got ", scheme);
  TORCH_CHECK_VALUE(activation >= kActNone && activation <= kActSigmoid, backend,
                    ": activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got ", activation);
  TORCH_CHECK_VALUE(target_kind == kTargetLabels || target_kind == kTargetDense, backend,
                    ": target_kind must be 0 (labels) or 1 (dense), got ", target_kind);
  TORCH_CHECK_VALUE(mode == kModeMarginal || mode == kModeTopLabel, backend,
                    ": mode must be 0 (marginal) or 1 (top-label), got ", mode);
  TORCH_CHECK_VALUE(input.dim() == 3, backend, ": input must be [B, C, N], got shape ", input.sizes());
  Call c;
  c.input_kind = input_kind(input, backend);
  c.B = input.size(0);
  c.C = input.size(1);
  c.N = input.size(2);
  TORCH_CHECK_VALUE(target.device() == input.device(), backend, ": target is on ", target.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(edges.device() == input.device(), backend, ": edges is on ", edges.device(),
                    " but input is on ", input.device());
  if (target_kind == kTargetLabels) {
    TORCH_CHECK_VALUE(target.dim() == 3 && target.size(0) == c.B && target.size(2) == c.N && target.size(1) >= 1,
                      backend, ": target (labels) must be [B, R, N] = [", c.B, ", R >= 1, ", c.N, "], got ",
                      target.sizes());
    c.target_elem = label_kind(target, backend);
    c.R = target.size(1);
  } else {
    TORCH_CHECK_VALUE(target.dim() == 3 && target.size(0) == c.B && target.size(1) == c.C && target.size(2) == c.N,
                      backend, ": target (dense) must be [B, C, N] = [", c.B, ", ", c.C, ", ", c.N, "], got ",
                      target.sizes());
    c.target_elem = dense_kind(target, backend);
    c.R = 1;
  }
  const int64_t n_edges = scheme == kSchemeSoft ? num_bins : num_bins + 1;
  TORCH_CHECK_VALUE(edges.scalar_type() == at::kFloat && edges.dim() == 1 && edges.size(0) == n_edges, backend,
                    ": edges must be float32 of shape [", n_edges, "] (",
                    scheme == kSchemeSoft ? "M centres" : "M + 1 edges", " for num_bins=", num_bins, "), got ",
                    edges.scalar_type(), " ", edges.sizes());
  c.M = num_bins;
  c.scheme = static_cast<int>(scheme);
  c.activation = static_cast<int>(activation);
  c.target_kind = static_cast<int>(target_kind);
  c.mode = static_cast<int>(mode);
  c.moments = moments;
  c.has_ignore = target_kind == kTargetLabels && ignore_index.has_value();
  c.ignore_index = c.has_ignore ? *ignore_index : 0;
  c.right = right;
  c.K = mode == kModeMarginal ? c.C : 1;
  return c;
}

// A checked call and contiguous owners of the tensors the kernels read.
struct Prepared {
  Call call;
  Tensor input, target, edges;
};

inline Prepared prepare(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins,
                        int64_t scheme, int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                        std::optional<int64_t> ignore_index, bool right, const char* backend) {
  Prepared p;
  p.call = check_args(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index,
                      right, backend);
  p.input = input.contiguous();  // returns the tensor itself when already contiguous
  p.target = target.contiguous();
  p.edges = edges.contiguous();
  return p;
}

// True when the statistics are all zero without reading anything (B = 0, N = 0 or C = 0; bad = [0, 0]).
inline bool nothing_to_do(const Call& c) { return c.B == 0 || c.N == 0 || c.C == 0; }

// The forward outputs with the contract's shapes: float32 statistics, bad int64 [2]. zero: filled with zeros
// (the empty cases), else uninitialised (the kernels write every entry).
struct Outputs {
  Tensor count, sum_p, sum_y, sum_p2, sum_py, bad;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> tuple() const {
    return {count, sum_p, sum_y, sum_p2, sum_py, bad};
  }
};

inline Outputs alloc_outputs(const Tensor& input, const Call& c, bool zero) {
  const auto f32 = input.options().dtype(at::kFloat);
  auto make = [&](at::IntArrayRef shape, const at::TensorOptions& o) {
    return zero ? at::zeros(shape, o) : at::empty(shape, o);
  };
  Outputs o;
  o.count = make({c.B, c.K, c.M}, f32);
  o.sum_p = make({c.B, c.K, c.M}, f32);
  o.sum_y = make({c.B, c.K, c.R, c.M}, f32);
  if (c.moments) {
    o.sum_p2 = make({c.B, c.K, c.M}, f32);
    o.sum_py = make({c.B, c.K, c.M}, f32);
  } else {  // moments off: empty, nothing computed
    o.sum_p2 = at::empty({0}, f32);
    o.sum_py = at::empty({0}, f32);
  }
  o.bad = make({2}, input.options().dtype(at::kLong));
  return o;
}

// The backward's gradient arguments, checked against the forward outputs' shapes (float32, on input's device) and
// made contiguous. sum_p2 / sum_py are [0] when moments is off.
struct Grads {
  Tensor count, sum_p, sum_y, sum_p2, sum_py;
};

inline Grads check_grads(const Call& c, const Tensor& input, const Tensor& grad_count, const Tensor& grad_sum_p,
                         const Tensor& grad_sum_y, const Tensor& grad_sum_p2, const Tensor& grad_sum_py,
                         const char* backend) {
  const std::vector<int64_t> stat{c.B, c.K, c.M}, sy{c.B, c.K, c.R, c.M}, empty{0};
  const std::vector<int64_t>& mom = c.moments ? stat : empty;
  auto check = [&](const Tensor& t, const char* name, const std::vector<int64_t>& shape) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.sizes() == at::IntArrayRef(shape), backend, ": ", name,
                      " must be float32 of shape ", at::IntArrayRef(shape), ", got ", t.scalar_type(), " ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.device() == input.device(), backend, ": ", name, " is on ", t.device(), " but input is on ",
                      input.device());
    return t.contiguous();
  };
  Grads g;
  g.count = check(grad_count, "grad_count", stat);
  g.sum_p = check(grad_sum_p, "grad_sum_p", stat);
  g.sum_y = check(grad_sum_y, "grad_sum_y", sy);
  g.sum_p2 = check(grad_sum_p2, "grad_sum_p2", mom);
  g.sum_py = check(grad_sum_py, "grad_sum_py", mom);
  return g;
}

// grad_input [B, C, N] in input's dtype, contiguous, uninitialised (the kernels write every entry).
inline Tensor alloc_grad_input(const Tensor& input, const Call& c) {
  return at::empty({c.B, c.C, c.N}, input.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace contract
}  // namespace calibops
