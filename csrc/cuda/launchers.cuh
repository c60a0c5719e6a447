// The plain-C++ interface between the torch binding (binned_stats_cuda.cpp, compiled by the host compiler
// with torch headers) and the CUDA kernels (binned_stats.cu, compiled by nvcc without any torch header).
// Only CUDA runtime types cross it: pointers, sizes, ids, cudaStream_t. The ids (element kinds, schemes,
// activations, modes) are the contract's, from csrc/contract_types.h. Semantics of both ops:
// docs/kernel_contract.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../contract_types.h"

namespace calibops_cuda {

using calibops::ElemKind;
using calibops::kBF16;
using calibops::kBool;
using calibops::kF16;
using calibops::kF32;
using calibops::kI16;
using calibops::kI32;
using calibops::kI64;
using calibops::kI8;
using calibops::kModeMarginal;
using calibops::kModeTopLabel;
using calibops::kSchemeHard;
using calibops::kSchemeSoft;
using calibops::kU8;

// One call of the forward or backward op (the checked calibops::Call plus the device pointers).
struct StatsArgs {
  const void* input;   // [B, C, N] contiguous, input_kind in {kF32, kF16, kBF16}
  int input_kind;
  const void* target;  // labels: [B, R, N] (kU8 .. kI64); dense: [B, C, N] (kF32, kF16, kBF16, kU8, kBool)
  int target_elem;
  const float* edges;  // hard: [M + 1] edges; soft: [M] centres (float32, device memory)
  int64_t B, C, N, R, K, M;  // R raters (1 for dense), K statistic rows (C marginal, 1 top-label)
  int scheme;          // kSchemeHard / kSchemeSoft
  int activation;      // 0 none, 1 softmax over C, 2 sigmoid
  bool labels;         // target_kind == 0
  int mode;            // kModeMarginal / kModeTopLabel
  bool moments;        // also sum_p2, sum_py
  bool has_ignore;
  int64_t ignore_index;
  bool right;
};

// Statistics per (row, bin) of one image, in the order of the partials: count, sum_p, sum_y[0 .. R-1], and
// with moments sum_p2, sum_py.
inline int64_t num_stats(const StatsArgs& a) { return 2 + a.R + (a.moments ? 2 : 0); }

// Forward outputs (float32, contiguous): count / sum_p / sum_p2 / sum_py [B, K, M], sum_y [B, K, R, M].
struct OutPtrs {
  float* count;
  float* sum_p;
  float* sum_y;
  float* sum_p2;  // nullptr unless moments
  float* sum_py;
};

// Backward gradient arguments (float32, contiguous, shapes of OutPtrs).
struct GradPtrs {
  const float* count;
  const float* sum_p;
  const float* sum_y;
  const float* sum_p2;  // nullptr unless moments
  const float* sum_py;
};

// Launch configuration, a pure function of the problem shape and the device's shared-memory limit
// (so the statistics are bitwise reproducible run to run on one device). Shared by the CUDA launchers and the
// host emulation used by the tests on machines without a GPU (tests/cuda_emulation).
struct Plan {
  int threads;              // T: threads per block
  int tile;                 // V: voxels per tile (power of two, >= 32)
  int tile_log2;
  int tiles_per_block;      // K: consecutive tiles one block processes
  int group;                // G: forward histogram slots per row (threads sharing a row in a tile)
  int slots;                // NS = rows * G private histograms per block
  int slot_stride;          // NS rounded up to a multiple of 32 (bank-conflict-free columns) when NS >= 32
  int nstat;                // statistics per (row, bin): num_stats()
  int64_t blocks_per_image; // P
  int64_t off_edges, off_grads, off_hist, off_x, off_g, off_t;  // shared-memory offsets, in 4-byte words
  bool grads_in_smem;       // backward: the gradients of the image live in shared memory
  size_t smem_bytes;
  const char* error;        // nullptr, or why this problem cannot run on the CUDA backend
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Computes the plan. smem_limit: the device's opt-in shared memory per block, in bytes.
//
// Forward: a block of T = 256 threads owns K <= 16 consecutive tiles of V voxels of one image. Per tile it
// (1) loads the [C][V] input tile and the R label rows / dense target into shared memory with coalesced loads
// (a voxel is marked unused unless every rater's label is valid), (2) turns each voxel's column into
// probabilities (softmax / sigmoid in float32), (3) accumulates: thread s owns statistic row s / G (a class;
// top-label: the single row) and voxels v = s % G, s % G + G, ... of the tile, and adds them, in that order, to
// its own private [nstat][M] histogram column in shared memory (hist[(stat * M + bin) * slot_stride + s], so the
// 32 lanes of a warp always hit 32 different banks, whatever their bins). No two threads ever write the same
// word, so no atomics are needed and every sum has a fixed order. The block's G columns of a row are then
// summed in slot order (float64) into a per-block partial [nstat][rows][M]; a second kernel sums the P partials
// of an image in block order (float64) and rounds once to float32. G is halved until the histograms take at most
// 32 KiB (marginal, R = 1, no moments, C = 4 or 16, M = 20: G = 32 or 8, ~50 KiB of shared memory per block,
// 4 blocks per H100 SM), so several blocks per SM keep loads in flight while others accumulate. Hence: bitwise
// deterministic, no float atomics, and each float32 running sum has at most max(256, V / G) terms (K is chosen
// so). nstat = 3 for the v1 configurations (marginal, one rater, no moments): their plan is unchanged.
// Backward: a block owns K = 4 tiles; per tile the same loads, then each thread turns its voxel columns
// into gradients (the gradients of the image gathered from shared memory) and writes them coalesced.
inline Plan make_plan(const StatsArgs& a, bool backward, int64_t smem_limit) {
  Plan pl{};
  pl.error = nullptr;
  const int64_t C = a.C, M = a.M, R = a.labels ? a.R : 1, rows = a.K;
  const int T = 256;
  pl.threads = T;
  pl.nstat = static_cast<int>(2 + R + (a.moments ? 2 : 0));
  int V = 1024, lg = 10;
  while (V > 32 && (C * V > 4096 || R * V > 4096)) {
    V >>= 1;
    --lg;
  }
  pl.tile = V;
  pl.tile_log2 = lg;
  int64_t words = 0;
  auto take = [&words](int64_t n) {
    const int64_t off = words;
    words += round_up(n, 4);
    return off;
  };
  pl.off_edges = take(a.scheme == kSchemeSoft ? M : M + 1);
  pl.off_grads = pl.off_g = pl.off_hist = -1;
  pl.grads_in_smem = false;
  if (!backward) {
    int64_t G = rows <= T ? T / (rows < 1 ? 1 : rows) : 1;
    auto stride = [rows](int64_t g) {
      const int64_t ns = rows * g;
      return ns >= 32 ? round_up(ns, 32) : ns;
    };
    while (G > 1 && pl.nstat * M * stride(G) * 4 > 32 * 1024) G = (G + 1) / 2;
    // Each slot's float32 running sums get K * V / G terms: at most 256 (unless V / G alone exceeds it).
    const int64_t K = (256 * G) / V;
    pl.tiles_per_block = static_cast<int>(K < 1 ? 1 : (K > 16 ? 16 : K));
    pl.group = static_cast<int>(G);
    pl.slots = static_cast<int>(rows * G);
    pl.slot_stride = static_cast<int>(stride(G));
    pl.off_hist = take(pl.nstat * M * pl.slot_stride);
  } else {
    pl.tiles_per_block = 4;
    pl.group = pl.slots = pl.slot_stride = 0;
    pl.grads_in_smem = pl.nstat * rows * M * 4 <= 32 * 1024;
    if (pl.grads_in_smem) pl.off_grads = take(pl.nstat * rows * M);
    if (a.activation == 1 && a.mode == kModeMarginal) pl.off_g = take(C * V);
  }
  pl.off_x = take(C * V);
  pl.off_t = take(a.labels ? R * V : C * V);
  pl.smem_bytes = static_cast<size_t>(words) * 4;
  const int64_t tiles = (a.N + V - 1) / V;
  pl.blocks_per_image = (tiles + pl.tiles_per_block - 1) / pl.tiles_per_block;
  if (C < 1 || C > (int64_t{1} << 20) || M < 1 || M > (int64_t{1} << 20)) {
    pl.error = "number of classes and num_bins must lie in [1, 2^20]";
  } else if (R < 1 || R > (int64_t{1} << 20)) {
    pl.error = "number of raters must lie in [1, 2^20]";
  } else if (static_cast<int64_t>(pl.smem_bytes) > smem_limit) {
    pl.error = backward ? "the classes x bins of this problem need more shared memory than the device has "
                          "(backward tile); use the triton or reference backend"
                        : "num_bins x classes (x raters) too large for the shared-memory histograms of the cuda "
                          "backend; use the triton or reference backend";
  } else if (a.B * pl.blocks_per_image > 0x7fffffffLL) {
    pl.error = "too many images x voxels for one launch";
  }
  return pl;
}

// Number of float64 entries of the forward workspace (per-block partial histograms [B, P, nstat, K, M]).
inline size_t stats_workspace_doubles(const StatsArgs& a, const Plan& pl) {
  return static_cast<size_t>(a.B * pl.blocks_per_image * pl.nstat * a.K * a.M);
}

// Forward: the statistics (fully written), bad: int64 [2] = (label entries outside [0, C) other than
// ignore_index, non-finite probability entries of used voxels), zeroed and written here.
// workspace: stats_workspace_doubles() float64 entries. Returns nullptr on success, else an error message.
const char* launch_binned_stats(const StatsArgs& a, const Plan& pl, double* workspace, const OutPtrs& out,
                                int64_t* bad, cudaStream_t stream);

// Backward: grad_input [B, C, N] of input_kind (fully written). Returns nullptr on success, else an error message.
const char* launch_binned_stats_backward(const StatsArgs& a, const Plan& pl, const GradPtrs& grads,
                                         void* grad_input, cudaStream_t stream);

// The device's opt-in shared memory per block in bytes (the `smem_limit` of make_plan), or -1 on error.
int64_t device_smem_limit(int device);

}  // namespace calibops_cuda
