// The kernel contract's ids and the description of one op call, as plain C++ (no torch header, no inline code):
// included by the kernels of every backend (csrc/cpu/kernel_*.cpp, csrc/cuda/*.cu) and, through csrc/contract.h,
// by the torch bindings. The ids match calibops/_contract.py; the rules are in docs/kernel_contract.md.
#pragma once

#include <cstdint>

namespace calibops {

// Element type of a tensor the kernels read (input, target) or write (the input gradient).
enum ElemKind : int {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kU8 = 3,
  kI8 = 4,
  kI16 = 5,
  kI32 = 6,
  kI64 = 7,
  kBool = 8,
};

// Op arguments as ids (the same numbers as calibops/_contract.py).
enum Scheme : int { kSchemeHard = 0, kSchemeSoft = 1 };
enum Activation : int { kActNone = 0, kActSoftmax = 1, kActSigmoid = 2 };
enum TargetKind : int { kTargetLabels = 0, kTargetDense = 1 };
enum Mode : int { kModeMarginal = 0, kModeTopLabel = 1 };

constexpr int64_t kMaxBins = int64_t{1} << 24;  // num_bins in [1, 2**24]

// One checked call of binned_stats / binned_stats_backward (filled by contract::check_args).
//   input  [B, C, N] (kind input_kind); target [B, R, N] labels (target_kind 0) or [B, C, N] dense (1, R = 1);
//   outputs count / sum_p [B, K, M], sum_y [B, K, R, M], sum_p2 / sum_py [B, K, M] when moments (else [0]).
struct Call {
  int64_t B = 0, C = 0, N = 0;
  int64_t R = 1;  // raters (label maps per image); 1 for a dense target
  int64_t K = 0;  // statistic rows per image: C (marginal) or 1 (top-label)
  int64_t M = 1;  // bins
  int scheme = kSchemeHard;
  int activation = kActNone;
  int target_kind = kTargetLabels;
  int mode = kModeMarginal;
  bool moments = false;
  bool has_ignore = false;  // labels only
  int64_t ignore_index = 0;
  bool right = false;
  int input_kind = kF32;   // ElemKind of input (and of the input gradient)
  int target_elem = kI64;  // ElemKind of target
};

}  // namespace calibops
