// Host emulation of the CUDA statistics kernels, for tests on machines without a GPU. Test code, not part of the
// package build (setup.py compiles csrc/cuda/*.cu and *.cpp only). It runs exactly the block programs of
// csrc/cuda/stats_kernels.cuh (the code the GPU runs), with every phase executed for thread 0 .. T-1 in turn over
// a shared-memory buffer of the plan's size (filled with NaN bytes first, so a read of an unwritten word shows),
// every block of the grid in turn, and then the same fixed-order reduction. The probabilities are bit-identical
// to the GPU's (exp_f and div_rn use the same exact-FMA / IEEE operations on both); only warp scheduling and
// nvcc's FMA contraction of the histogram updates (w * p + sum) differ.
//
// Built by tests/cuda_emulation/__init__.py: emulation_lib.cpp (ctypes library) and asan_sweep.cpp (a memory-safety
// sweep under AddressSanitizer + UBSan), both with the host compiler and -I csrc/cuda.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "stats_kernels.cuh"

namespace calibops_cuda {
namespace emu {

struct HostExec {
  int threads;
  template <class F>
  void phase(F&& f) {
    for (int t = 0; t < threads; ++t) f(t);
  }
};

// Element size in bytes of an ElemKind.
inline int64_t elem_size(int kind) {
  switch (kind) {
    case kF32:
    case kI32:
      return 4;
    case kF16:
    case kBF16:
    case kI16:
      return 2;
    case kI64:
      return 8;
    default:
      return 1;
  }
}

// p - bytes, as an address (the image-only runs below: the kernels add the offset back).
inline const void* rebase(const void* p, int64_t bytes) {
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) - static_cast<uintptr_t>(bytes));
}

// The forward op's blocks and reduction for image b only (blocks b * P .. b * P + P - 1, output entries of
// image b). The caller rebases the pointers so that only image b's data exists.
inline const char* run_forward_image(const StatsArgs& a, int64_t smem_limit, const OutPtrs& out, int64_t* bad,
                                     int64_t b) {
  const Plan pl = make_plan(a, false, smem_limit);
  if (pl.error) return pl.error;
  bad[0] = bad[1] = 0;
  const int64_t P = a.N > 0 ? pl.blocks_per_image : 0;
  const int64_t E = pl.nstat * a.K * a.M;
  std::vector<double> partial(static_cast<size_t>(P * E));
  // block blk writes partial + blk * E: rebase so block b * P lands at partial[0]
  double* base = reinterpret_cast<double*>(reinterpret_cast<uintptr_t>(partial.data()) -
                                           static_cast<uintptr_t>(b * P * E * 8));
  std::vector<float> smem(pl.smem_bytes / 4);
  HostExec ex{pl.threads};
  const bool known = with_variant(a, [&](auto var) {
    using Var = decltype(var);
    for (int64_t blk = b * P; blk < (b + 1) * P; ++blk) {
      std::memset(smem.data(), 0xff, smem.size() * 4);
      const BadCounts n = forward_block<Var>(ex, a, pl, smem.data(), base, blk);
      bad[0] += n.labels;
      bad[1] += n.nonfinite;
    }
  });
  if (!known) return "unsupported input dtype";
  for (int64_t r = b * E; r < (b + 1) * E; ++r) reduce_partials_host(a, pl, base, out, r);
  return nullptr;
}

inline const char* run_backward_image(const StatsArgs& a, int64_t smem_limit, const GradPtrs& g, void* grad,
                                      int64_t b) {
  const Plan pl = make_plan(a, true, smem_limit);
  if (pl.error) return pl.error;
  if (a.N == 0) return nullptr;
  const int64_t P = pl.blocks_per_image;
  std::vector<float> smem(pl.smem_bytes / 4);
  HostExec ex{pl.threads};
  const bool known = with_variant(a, [&](auto var) {
    using Var = decltype(var);
    for (int64_t blk = b * P; blk < (b + 1) * P; ++blk) {
      std::memset(smem.data(), 0xff, smem.size() * 4);
      backward_block<Var>(ex, a, pl, smem.data(), g, grad, blk);
    }
  });
  return known ? nullptr : "unsupported input dtype";
}

// The forward op through the emulated kernels: the same plan, blocks, partials and reduction as
// launch_binned_stats. bad: int64 [2]. Returns nullptr or an error message.
inline const char* run_forward(const StatsArgs& a, int64_t smem_limit, const OutPtrs& out, int64_t* bad) {
  const Plan pl = make_plan(a, false, smem_limit);
  if (pl.error) return pl.error;
  bad[0] = bad[1] = 0;  // label entries outside [0, C), non-finite probability entries
  const int64_t blocks = a.N > 0 ? a.B * pl.blocks_per_image : 0;
  std::vector<double> partial(stats_workspace_doubles(a, pl));
  std::vector<float> smem(pl.smem_bytes / 4);
  HostExec ex{pl.threads};
  const bool known = with_variant(a, [&](auto var) {
    using Var = decltype(var);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::memset(smem.data(), 0xff, smem.size() * 4);
      const BadCounts n = forward_block<Var>(ex, a, pl, smem.data(), partial.data(), blk);
      bad[0] += n.labels;
      bad[1] += n.nonfinite;
    }
  });
  if (!known) return "unsupported input dtype";
  for (int64_t r = 0; r < a.B * pl.nstat * a.K * a.M; ++r) reduce_partials_host(a, pl, partial.data(), out, r);
  return nullptr;
}

// The backward op through the emulated kernels (grad written in input_kind).
inline const char* run_backward(const StatsArgs& a, int64_t smem_limit, const GradPtrs& g, void* grad) {
  const Plan pl = make_plan(a, true, smem_limit);
  if (pl.error) return pl.error;
  if (a.B == 0 || a.N == 0) return nullptr;
  const int64_t blocks = a.B * pl.blocks_per_image;
  std::vector<float> smem(pl.smem_bytes / 4);
  HostExec ex{pl.threads};
  const bool known = with_variant(a, [&](auto var) {
    using Var = decltype(var);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      std::memset(smem.data(), 0xff, smem.size() * 4);
      backward_block<Var>(ex, a, pl, smem.data(), g, grad, blk);
    }
  });
  return known ? nullptr : "unsupported input dtype";
}

// StatsArgs from the op's arguments (as the torch binding fills them from calibops::Call).
inline StatsArgs make_args(const void* input, int input_kind, const void* target, int target_elem,
                           const float* edges, int64_t B, int64_t C, int64_t N, int64_t R, int64_t M, int scheme,
                           int activation, int target_kind, int mode, int moments, int has_ignore,
                           int64_t ignore_index, int right) {
  StatsArgs a{};
  a.input = input;
  a.input_kind = input_kind;
  a.target = target;
  a.target_elem = target_elem;
  a.edges = edges;
  a.labels = target_kind == calibops::kTargetLabels;
  a.B = B;
  a.C = C;
  a.N = N;
  a.R = a.labels ? R : 1;
  a.K = mode == kModeTopLabel ? 1 : C;
  a.M = M;
  a.scheme = scheme;
  a.activation = activation;
  a.mode = mode;
  a.moments = moments != 0;
  a.has_ignore = a.labels && has_ignore != 0;
  a.ignore_index = a.has_ignore ? ignore_index : 0;
  a.right = right != 0;
  return a;
}

}  // namespace emu
}  // namespace calibops_cuda
