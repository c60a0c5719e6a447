// CPU implementations of calibops::binned_stats and calibops::binned_stats_backward (schemas: csrc/ops.cpp,
// semantics: docs/kernel_contract.md). This file checks arguments (csrc/contract.h), picks the instruction-set build
// of the kernels (kernel_<isa>.cpp), splits the work and merges the results; the voxel loops are in kernel_impl.h.
//
// Parallelism and determinism: every image is cut into chunks whose boundaries depend only on (N, C, M),
// never on the thread count. at::parallel_for threads claim the (image, chunk) tasks; each task writes its float64
// partial histogram [K][M][NS] to its own slot, and the slots are summed afterwards in chunk order. Results
// are therefore bitwise identical for any number of threads. Extra memory: the partial slots
// (B x chunks x K x M x NS doubles, chunks <= 256) plus tens of KiB of tile scratch per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../contract.h"
#include "kernel_api.h"

namespace calibops {
namespace cpu {
namespace {

using at::Tensor;
using calibops::Call;

constexpr int64_t kChunkVoxels = 16384;  // target voxels per (image, chunk) task
constexpr int64_t kMaxChunks = 256;      // per image: bounds the partial-histogram memory

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool cpu_has(const char* isa) {
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
}
#else
bool cpu_has(const char* isa) { return std::strcmp(isa, "base") == 0; }
#endif

// The best build this CPU runs, or the one named by CALIBOPS_CPU_ISA (base / avx2 / avx512).
const KernelTable* select_kernels() {
  const char* env = std::getenv("CALIBOPS_CPU_ISA");
  const KernelTable* candidates[] = {kernels_avx512(), kernels_avx2(), kernels_base()};
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "auto") != 0) {
    for (const KernelTable* k : candidates) {
      if (k != nullptr && std::strcmp(k->isa, env) == 0) {
        TORCH_CHECK(cpu_has(env), "CALIBOPS_CPU_ISA=", env, ": this CPU does not support that instruction set");
        return k;
      }
    }
    TORCH_CHECK(false, "CALIBOPS_CPU_ISA must be one of auto, base, avx2, avx512 (a build present here), got ",
                env);
  }
  for (const KernelTable* k : candidates)
    if (k != nullptr && cpu_has(k->isa)) return k;
  return kernels_base();
}

constexpr const char* kBackend = "calibops (cpu)";

struct Prepared {
  Problem pb;
  contract::Prepared args;  // checked call and the contiguous owners of the pointers in pb
  int64_t chunk_len = 1, chunks = 0;
};

Prepared prepare(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins, int64_t scheme,
                 int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                 std::optional<int64_t> ignore_index, bool right) {
  Prepared P;
  P.args = contract::prepare(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments,
                             ignore_index, right, kBackend);
  TORCH_CHECK_VALUE(input.device().is_cpu(), kBackend, ": input must be a CPU tensor, got ", input.device());
  const Call& c = P.args.call;
  Problem& pb = P.pb;
  pb.input = P.args.input.data_ptr();
  pb.in_kind = c.input_kind;
  pb.target = P.args.target.data_ptr();
  pb.target_kind = c.target_elem;
  pb.labels = c.target_kind == kTargetLabels;
  pb.R = c.R;
  pb.has_ignore = c.has_ignore;
  pb.ignore_index = c.ignore_index;
  pb.edges = P.args.edges.data_ptr<float>();
  pb.M = c.M;
  pb.soft = c.scheme == kSchemeSoft;
  pb.activation = c.activation;
  pb.right = c.right;
  pb.top = c.mode == kModeTopLabel;
  pb.moments = c.moments;
  pb.B = c.B;
  pb.C = c.C;
  pb.N = c.N;
  pb.K = c.K;
  pb.NS = 2 + c.R + (c.moments ? 2 : 0);
  pb.W = (pb.NS + 3) / 4 * 4;
  // [C][T] tiles of ~2048 floats per row set: T a multiple of 16 in [16, 1024].
  pb.tile = std::clamp<int64_t>((2048 / std::max<int64_t>(c.C, 1)) / 16 * 16, 16, 1024);
  // Interleaved histogram copies while the per-row histograms stay small (L1/L2 resident).
  pb.copies = pb.K * (c.M + 2) * (pb.W / 4) <= 2048 ? 8 : 1;
  // The fused hard path (csrc/cpu/fused_*.h) gives bitwise the same results as the generic one.
  // CALIBOPS_CPU_FUSED=0 turns it off and =2 also uses it in the base build (scalar there, slower than the generic
  // path's auto-vectorised loops), so the tests can compare them all.
  const char* fused_env = std::getenv("CALIBOPS_CPU_FUSED");
  pb.fused = fused_env == nullptr ? 1 : std::strcmp(fused_env, "0") == 0 ? 0 : std::strcmp(fused_env, "2") == 0 ? 2 : 1;
  if (!contract::nothing_to_do(c)) {
    const int64_t slot = pb.K * c.M * pb.NS;
    const int64_t mem_cap = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(c.B * slot, 1));
    const int64_t want = std::min({(c.N + kChunkVoxels - 1) / kChunkVoxels, kMaxChunks, mem_cap});
    int64_t len = (c.N + want - 1) / want;
    len = (len + pb.tile - 1) / pb.tile * pb.tile;  // chunk starts are multiples of the tile
    P.chunk_len = len;
    P.chunks = (c.N + len - 1) / len;
  }
  return P;
}

// Per-worker buffers, 64-byte aligned.
struct Workspace {
  std::vector<float> fbuf;
  std::vector<double> dbuf;
  float* scratch = nullptr;
  double* hist = nullptr;
  Workspace(size_t floats, size_t doubles) : fbuf(floats + 16), dbuf(doubles + 8) {
    auto align = [](void* p) { return (reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63}; };
    scratch = reinterpret_cast<float*>(align(fbuf.data()));
    hist = reinterpret_cast<double*>(align(dbuf.data()));
  }
};

// Runs task(t, workspace) for t in [0, ntask) on the at::parallel_for threads. Tasks are claimed from a shared
// counter, not split statically: on a busy machine a thread that starts late finds the work already done
// instead of holding back the whole call. Which thread runs a task never changes its result.
template <typename F>
void run_tasks(int64_t ntask, size_t scratch_floats, size_t hist_doubles, const F& task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Workspace ws(scratch_floats, hist_doubles);
    for (int64_t t = next.fetch_add(1); t < ntask; t = next.fetch_add(1)) task(t, ws);
  });
}

using Stats = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Stats binned_stats_cpu(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins,
                       int64_t scheme, int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                       std::optional<int64_t> ignore_index, bool right) {
  Prepared P = prepare(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index,
                       right);
  const Problem& pb = P.pb;
  const Call& c = P.args.call;
  // B = 0, N = 0 or C = 0: zero statistics (K = 0 rows for marginal, zero [B, 1, ...] for top-label), bad = [0, 0].
  if (contract::nothing_to_do(c)) return contract::alloc_outputs(input, c, /*zero=*/true).tuple();
  contract::Outputs o = contract::alloc_outputs(input, c, /*zero=*/false);  // every entry written below

  const KernelTable* KT = select_kernels();
  const int64_t B = pb.B, K = pb.K, M = pb.M, R = pb.R, NS = pb.NS;
  const int64_t ntask = B * P.chunks, slot = K * M * NS;
  std::vector<double> partial(static_cast<size_t>(ntask * slot));
  std::vector<int64_t> bad_part(static_cast<size_t>(ntask), 0), nonfinite_part(static_cast<size_t>(ntask), 0);
  const size_t sf = KT->scratch_floats(pb), hd = KT->hist_doubles(pb);
  run_tasks(ntask, sf, hd, [&](int64_t t, const Workspace& ws) {
    const int64_t b = t / P.chunks, k = t % P.chunks;
    const int64_t begin = k * P.chunk_len, end = std::min(pb.N, begin + P.chunk_len);
    bad_part[t] = KT->forward(pb, b, begin, end, partial.data() + t * slot, ws.scratch, ws.hist, &nonfinite_part[t]);
  });

  // Fixed-order merge of the chunk partials (float64), rounded once to float32. Partial slot [K][M][NS]: count,
  // sum_p, sum_y[R], then sum_p2, sum_py.
  float* count = o.count.data_ptr<float>();
  float* sum_p = o.sum_p.data_ptr<float>();
  float* sum_y = o.sum_y.data_ptr<float>();
  float* sum_p2 = pb.moments ? o.sum_p2.data_ptr<float>() : nullptr;
  float* sum_py = pb.moments ? o.sum_py.data_ptr<float>() : nullptr;
  int64_t nbad = 0, nnonfinite = 0;
  std::vector<double> acc(static_cast<size_t>(NS));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < M; ++j) {
        const int64_t e = (k * M + j) * NS;
        for (int64_t s = 0; s < NS; ++s) acc[s] = 0.0;
        for (int64_t q = 0; q < P.chunks; ++q) {
          const double* src = partial.data() + (b * P.chunks + q) * slot + e;
          for (int64_t s = 0; s < NS; ++s) acc[s] += src[s];
        }
        const int64_t o3 = (b * K + k) * M + j;
        count[o3] = static_cast<float>(acc[0]);
        sum_p[o3] = static_cast<float>(acc[1]);
        for (int64_t r = 0; r < R; ++r) sum_y[((b * K + k) * R + r) * M + j] = static_cast<float>(acc[2 + r]);
        if (pb.moments) {
          sum_p2[o3] = static_cast<float>(acc[2 + R]);
          sum_py[o3] = static_cast<float>(acc[3 + R]);
        }
      }
    for (int64_t q = 0; q < P.chunks; ++q) {
      nbad += bad_part[b * P.chunks + q];
      nnonfinite += nonfinite_part[b * P.chunks + q];
    }
  }
  int64_t* bad_out = o.bad.data_ptr<int64_t>();
  bad_out[0] = nbad;  // label entries outside [0, C) other than ignore_index, over all raters
  bad_out[1] = nnonfinite;  // non-finite p of used voxels (all C counted)
  return o.tuple();
}

Tensor binned_stats_backward_cpu(const Tensor& grad_count, const Tensor& grad_sum_p, const Tensor& grad_sum_y,
                                 const Tensor& grad_sum_p2, const Tensor& grad_sum_py, const Tensor& input,
                                 const Tensor& target, const Tensor& edges, int64_t num_bins, int64_t scheme,
                                 int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                                 std::optional<int64_t> ignore_index, bool right) {
  Prepared P = prepare(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index,
                       right);
  const Problem& pb = P.pb;
  const Call& c = P.args.call;
  const contract::Grads g =
      contract::check_grads(c, input, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, kBackend);
  Tensor grad = contract::alloc_grad_input(input, c);
  if (grad.numel() == 0) return grad;
  if (contract::nothing_to_do(c)) return grad.zero_();

  const KernelTable* KT = select_kernels();
  const int64_t ntask = pb.B * P.chunks;
  const size_t sf = KT->scratch_floats(pb);
  const float *gc = g.count.data_ptr<float>(), *gp = g.sum_p.data_ptr<float>(), *gy = g.sum_y.data_ptr<float>();
  const float* gp2 = pb.moments ? g.sum_p2.data_ptr<float>() : nullptr;
  const float* gpy = pb.moments ? g.sum_py.data_ptr<float>() : nullptr;
  void* out = grad.data_ptr();
  run_tasks(ntask, sf, 0, [&](int64_t t, const Workspace& ws) {
    const int64_t b = t / P.chunks, k = t % P.chunks;
    const int64_t begin = k * P.chunk_len, end = std::min(pb.N, begin + P.chunk_len);
    KT->backward(pb, gc, gp, gy, gp2, gpy, out, b, begin, end, ws.scratch);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(calibops, CPU, m) {
  m.impl("binned_stats", &binned_stats_cpu);
  m.impl("binned_stats_backward", &binned_stats_backward_cpu);
}

}  // namespace cpu
}  // namespace calibops
