// The plain-C++ interface between the torch-facing CPU ops (binned_stats_cpu.cpp) and the per-ISA kernel
// builds (kernel_base.cpp, kernel_avx2.cpp, kernel_avx512.cpp). No torch header and no inline function here:
// the per-ISA translation units are compiled for different instruction sets, so they must not share any
// inline code with the rest of the library (a linker could otherwise keep an AVX2 copy for everyone).
// Element kinds and ids: csrc/contract_types.h (shared with the CUDA kernels and both bindings).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../contract_types.h"

namespace calibops {
namespace cpu {

// One call of the forward or backward op (semantics: docs/kernel_contract.md).
struct Problem {
  const void* input;     // [B, C, N] contiguous, kind in_kind (kF32 / kF16 / kBF16)
  int in_kind;
  const void* target;    // labels: [B, R, N] integer (kU8..kI64); dense: [B, C, N] (kF32/kF16/kBF16/kBool/kU8)
  int target_kind;       // ElemKind of target
  bool labels;           // target_kind 0 (labels) of the op
  int64_t R;             // raters (1 for dense)
  bool has_ignore;
  int64_t ignore_index;
  const float* edges;    // hard: [M + 1] edges; soft: [M] centres
  int64_t M;
  bool soft;             // scheme 1
  int activation;        // 0 none, 1 softmax over C, 2 sigmoid
  bool right;
  bool top;              // mode 1 (top-label): one statistic row per image
  bool moments;          // also sum_p2, sum_py
  int64_t B, C, N;
  int64_t K;             // statistic rows: C (marginal) or 1 (top-label)
  int64_t NS;            // statistics per (row, bin): count, sum_p, sum_y[R], then sum_p2, sum_py (moments)
  int64_t W;             // doubles per entry vector of the generic forward: NS rounded up to a multiple of 4
  int64_t tile;          // voxels per tile (multiple of 16); the kernels process [C][tile] tiles
  int64_t copies;        // interleaved histogram copies (1 or 8) that break store-to-load chains
  int fused;             // fused hard path: 1 where it is faster (SIMD builds), 0 never, 2 also in the base build
};

// Entry points of one ISA build. Every buffer is owned by the caller.
struct KernelTable {
  const char* isa;
  // float scratch the forward / backward need per worker (entries, 64-byte aligned by the caller).
  size_t (*scratch_floats)(const Problem& pb);
  // double histogram workspace the forward needs per worker (entries).
  size_t (*hist_doubles)(const Problem& pb);
  // Statistics of voxels [begin, end) of image b, written (not added) to out [K][M][NS] in float64. begin must be
  // a multiple of pb.tile. Returns the number of bad label entries seen (all raters) and writes the number of
  // non-finite probabilities of used voxels to *nonfinite.
  int64_t (*forward)(const Problem& pb, int64_t b, int64_t begin, int64_t end, double* out, float* scratch,
                     double* hist, int64_t* nonfinite);
  // grad_input for voxels [begin, end) of image b, written to grad (kind in_kind, layout [B, C, N]).
  // grad_count / grad_sum_p: float32 [B, K, M]; grad_sum_y [B, K, R, M]; grad_sum_p2 / grad_sum_py [B, K, M]
  // (nullptr when moments is off).
  void (*backward)(const Problem& pb, const float* grad_count, const float* grad_sum_p, const float* grad_sum_y,
                   const float* grad_sum_p2, const float* grad_sum_py, void* grad, int64_t b, int64_t begin,
                   int64_t end, float* scratch);
};

// nullptr where that ISA was not compiled in (non-x86 or an unsupported compiler).
const KernelTable* kernels_base();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace cpu
}  // namespace calibops
