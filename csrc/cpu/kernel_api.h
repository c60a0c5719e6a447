// The plain-C++ interface between the torch-facing CPU ops (binned_stats_cpu.cpp) and the per-ISA kernel
// builds (kernel_base.cpp, kernel_avx2.cpp, kernel_avx512.cpp). No torch header and no inline function here:
// the per-ISA translation units are compiled for different instruction sets, so they must not share any
// inline code with the rest of the library (a linker could otherwise keep an AVX2 copy for everyone).
#pragma once

#include <cstddef>
#include <cstdint>

namespace calibops {
namespace cpu {

// Element types the kernels read (and, for the gradient, write).
enum ScalarKind : int {
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

// One call of the forward or backward op (semantics: docs/kernel_contract.md).
struct Problem {
  const void* input;     // [B, C, N] contiguous, kind in_kind (kF32 / kF16 / kBF16)
  int in_kind;
  const void* target;    // labels: [B, N] integer (kU8..kI64); dense: [B, C, N] (kF32/kF16/kBF16/kBool/kU8)
  int target_kind;
  bool labels;
  bool has_ignore;
  int64_t ignore_index;
  const float* edges;    // hard: [M + 1] edges; soft: [M] centres
  int64_t M;
  bool soft;
  int activation;        // 0 none, 1 softmax over C, 2 sigmoid
  bool right;
  int64_t B, C, N;
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
  // Statistics of voxels [begin, end) of image b, written (not added) to out [C][M][3] (count, sum_p, sum_y)
  // in float64. begin must be a multiple of pb.tile. Returns the number of out-of-range labels seen and writes
  // the number of non-finite probability entries (of the other voxels) to *nonfinite.
  int64_t (*forward)(const Problem& pb, int64_t b, int64_t begin, int64_t end, double* out, float* scratch,
                     double* hist, int64_t* nonfinite);
  // grad_input for voxels [begin, end) of image b, written to grad (kind in_kind, layout [B, C, N]).
  // grad_count / grad_sum_p / grad_sum_y: float32 [B, C, M].
  void (*backward)(const Problem& pb, const float* grad_count, const float* grad_sum_p, const float* grad_sum_y,
                   void* grad, int64_t b, int64_t begin, int64_t end, float* scratch);
};

// nullptr where that ISA was not compiled in (non-x86 or an unsupported compiler).
const KernelTable* kernels_base();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace cpu
}  // namespace calibops
