// CPU implementations of calibops::binned_stats and calibops::binned_stats_backward (schemas: csrc/ops.cpp,
// semantics: docs/kernel_contract.md). This file checks arguments, picks the instruction-set build of the
// kernels (kernel_<isa>.cpp), splits the work and merges the results; the voxel loops are in kernel_impl.h.
//
// Parallelism and determinism: every image is cut into chunks whose boundaries depend only on (N, C, M),
// never on the thread count. at::parallel_for threads claim the (image, chunk) tasks; each task writes its float64
// partial histogram [C][M][3] to its own slot, and the slots are summed afterwards in chunk order. Results
// are therefore bitwise identical for any number of threads. Extra memory: the partial slots
// (B x chunks x C x M x 3 doubles, chunks <= 256) plus tens of KiB of tile scratch per thread.
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

#include "kernel_api.h"

namespace calibops {
namespace cpu {
namespace {

using at::Tensor;

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

int input_kind(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK(false, "calibops cpu: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return kF32;
}

int target_kind(const Tensor& t, bool labels) {
  const auto s = t.scalar_type();
  if (labels) {
    switch (s) {
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
        TORCH_CHECK(false, "calibops cpu: target labels must be uint8, int8, int16, int32 or int64, got ", s);
    }
  }
  switch (s) {
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
      TORCH_CHECK(false, "calibops cpu: dense target must be float32, float16, bfloat16, bool or uint8, got ", s);
  }
  return kF32;
}

struct Prepared {
  Problem pb;
  Tensor input, target, edges;  // contiguous owners of the pointers in pb
  int64_t chunk_len = 1, chunks = 0;
};

Prepared prepare(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins, bool soft,
                 int64_t activation, bool labels, std::optional<int64_t> ignore_index, bool right) {
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu() && edges.device().is_cpu(),
              "calibops cpu: input, target and edges must be CPU tensors");
  TORCH_CHECK(input.dim() == 3, "calibops cpu: input must be [B, C, N], got ", input.sizes());
  TORCH_CHECK(num_bins >= 1, "calibops cpu: num_bins must be >= 1, got ", num_bins);
  TORCH_CHECK(activation >= 0 && activation <= 2, "calibops cpu: activation must be 0, 1 or 2, got ", activation);
  const int64_t B = input.size(0), C = input.size(1), N = input.size(2);
  if (labels) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == N,
                "calibops cpu: target labels must be [B, N] = [", B, ", ", N, "], got ", target.sizes());
  } else {
    TORCH_CHECK(target.sizes() == input.sizes(), "calibops cpu: dense target must have input's shape ",
                input.sizes(), ", got ", target.sizes());
  }
  TORCH_CHECK(edges.scalar_type() == at::kFloat && edges.dim() == 1 &&
                  edges.numel() == (soft ? num_bins : num_bins + 1),
              "calibops cpu: edges must be float32 [", soft ? num_bins : num_bins + 1, "] (", soft ? "centres" : "edges",
              " for num_bins=", num_bins, "), got ", edges.scalar_type(), " ", edges.sizes());
  TORCH_CHECK(num_bins <= (int64_t{1} << 24), "calibops cpu: num_bins must be <= 2^24, got ", num_bins);

  Prepared P;
  P.input = input.contiguous();
  P.target = target.contiguous();
  P.edges = edges.contiguous();
  Problem& pb = P.pb;
  pb.input = P.input.data_ptr();
  pb.in_kind = input_kind(input, "input");
  pb.target = P.target.data_ptr();
  pb.target_kind = target_kind(target, labels);
  pb.labels = labels;
  pb.has_ignore = labels && ignore_index.has_value();
  pb.ignore_index = ignore_index.value_or(0);
  pb.edges = P.edges.data_ptr<float>();
  pb.M = num_bins;
  pb.soft = soft;
  pb.activation = static_cast<int>(activation);
  pb.right = right;
  pb.B = B;
  pb.C = C;
  pb.N = N;
  // [C][T] tiles of ~2048 floats per row set: T a multiple of 16 in [16, 1024].
  pb.tile = std::clamp<int64_t>((2048 / std::max<int64_t>(C, 1)) / 16 * 16, 16, 1024);
  // Interleaved histogram copies while the per-class histograms stay small (L1/L2 resident).
  pb.copies = C * (num_bins + 2) <= 2048 ? 8 : 1;
  // The fused hard path (kernel_impl.h) gives bitwise the same results as the generic one. CALIBOPS_CPU_FUSED=0
  // turns it off and =2 also uses it in the base build (scalar there, slower than the generic path's
  // auto-vectorised loops), so the tests can compare them all.
  const char* fused_env = std::getenv("CALIBOPS_CPU_FUSED");
  pb.fused = fused_env == nullptr ? 1 : std::strcmp(fused_env, "0") == 0 ? 0 : std::strcmp(fused_env, "2") == 0 ? 2 : 1;
  if (N > 0) {
    const int64_t M3 = C * num_bins * 3;
    const int64_t mem_cap = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(B * M3, 1));
    const int64_t want = std::min({(N + kChunkVoxels - 1) / kChunkVoxels, kMaxChunks, mem_cap});
    int64_t len = (N + want - 1) / want;
    len = (len + pb.tile - 1) / pb.tile * pb.tile;  // chunk starts are multiples of the tile
    P.chunk_len = len;
    P.chunks = (N + len - 1) / len;
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

std::tuple<Tensor, Tensor, Tensor, Tensor> binned_stats_cpu(const Tensor& input, const Tensor& target,
                                                             const Tensor& edges, int64_t num_bins, bool soft,
                                                             int64_t activation, bool labels,
                                                             std::optional<int64_t> ignore_index, bool right) {
  Prepared P = prepare(input, target, edges, num_bins, soft, activation, labels, ignore_index, right);
  const Problem& pb = P.pb;
  const int64_t B = pb.B, C = pb.C, M = pb.M;
  auto opts = input.options().dtype(at::kFloat);
  // bad = [labels outside [0, C) other than ignore_index, non-finite probability entries]
  Tensor bad = at::zeros({2}, input.options().dtype(at::kLong));
  if (B == 0 || P.chunks == 0 || C == 0) {  // C = 0: empty statistics and nothing counted (kernel contract)
    Tensor count = at::zeros({B, C, M}, opts), sum_p = at::zeros({B, C, M}, opts), sum_y = at::zeros({B, C, M}, opts);
    return {count, sum_p, sum_y, bad};
  }
  // Every entry is written by the merge below.
  Tensor count = at::empty({B, C, M}, opts), sum_p = at::empty({B, C, M}, opts), sum_y = at::empty({B, C, M}, opts);

  const KernelTable* K = select_kernels();
  const int64_t ntask = B * P.chunks, slot = C * M * 3;
  std::vector<double> partial(static_cast<size_t>(ntask * slot));
  std::vector<int64_t> bad_part(static_cast<size_t>(ntask), 0), nonfinite_part(static_cast<size_t>(ntask), 0);
  const size_t sf = K->scratch_floats(pb), hd = K->hist_doubles(pb);
  run_tasks(ntask, sf, hd, [&](int64_t t, const Workspace& ws) {
    const int64_t b = t / P.chunks, k = t % P.chunks;
    const int64_t begin = k * P.chunk_len, end = std::min(pb.N, begin + P.chunk_len);
    bad_part[t] = K->forward(pb, b, begin, end, partial.data() + t * slot, ws.scratch, ws.hist, &nonfinite_part[t]);
  });

  // Fixed-order merge of the chunk partials (float64), rounded once to float32.
  float* outs[3] = {count.data_ptr<float>(), sum_p.data_ptr<float>(), sum_y.data_ptr<float>()};
  int64_t nbad = 0, nnonfinite = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = 0; e < C * M; ++e) {
      for (int64_t s = 0; s < 3; ++s) {
        double acc = 0.0;
        for (int64_t k = 0; k < P.chunks; ++k) acc += partial[(b * P.chunks + k) * slot + e * 3 + s];
        outs[s][b * C * M + e] = static_cast<float>(acc);
      }
    }
    for (int64_t k = 0; k < P.chunks; ++k) {
      nbad += bad_part[b * P.chunks + k];
      nnonfinite += nonfinite_part[b * P.chunks + k];
    }
  }
  int64_t* bad_out = bad.data_ptr<int64_t>();
  bad_out[0] = nbad;
  bad_out[1] = nnonfinite;
  return {count, sum_p, sum_y, bad};
}

Tensor binned_stats_backward_cpu(const Tensor& grad_count, const Tensor& grad_sum_p, const Tensor& grad_sum_y,
                                 const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins,
                                 bool soft, int64_t activation, bool labels, std::optional<int64_t> ignore_index,
                                 bool right) {
  Prepared P = prepare(input, target, edges, num_bins, soft, activation, labels, ignore_index, right);
  const Problem& pb = P.pb;
  const int64_t B = pb.B, C = pb.C, M = pb.M;
  const Tensor* grads[3] = {&grad_count, &grad_sum_p, &grad_sum_y};
  const char* names[3] = {"grad_count", "grad_sum_p", "grad_sum_y"};
  Tensor g[3];
  for (int k = 0; k < 3; ++k) {
    const Tensor& t = *grads[k];
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 3 && t.size(0) == B && t.size(1) == C && t.size(2) == M,
                "calibops cpu: ", names[k], " must be a CPU tensor [B, C, M] = [", B, ", ", C, ", ", M, "], got ",
                t.sizes());
    g[k] = t.to(at::kFloat).contiguous();
  }
  Tensor grad = at::empty({B, C, pb.N}, P.input.options());
  if (grad.numel() == 0) return grad;

  const KernelTable* K = select_kernels();
  const int64_t ntask = B * P.chunks;
  const size_t sf = K->scratch_floats(pb);
  const float *gc = g[0].data_ptr<float>(), *gp = g[1].data_ptr<float>(), *gy = g[2].data_ptr<float>();
  void* out = grad.data_ptr();
  run_tasks(ntask, sf, 0, [&](int64_t t, const Workspace& ws) {
    const int64_t b = t / P.chunks, k = t % P.chunks;
    const int64_t begin = k * P.chunk_len, end = std::min(pb.N, begin + P.chunk_len);
    K->backward(pb, gc, gp, gy, out, b, begin, end, ws.scratch);
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
