// Host emulation of the CUDA statistics kernels, for tests on machines without a GPU. NOT part of the package
// build (setup.py compiles csrc/cuda/*.cu and *.cpp only); tests/test_cuda_compile.py compiles it with the host
// compiler:
//   g++ -x c++ -shared -fPIC -DCALIBOPS_EMU_LIB  host_emulation.cuh -o libemu.so     (ctypes, values)
//   g++ -x c++ -fsanitize=address -DCALIBOPS_EMU_MAIN host_emulation.cuh -o emu     (memory safety sweep)
// It runs exactly the block programs of stats_kernels.cuh (the code the GPU runs), with every phase executed for
// thread 0 .. T-1 in turn over a shared-memory buffer of the plan's size, every block of the grid in turn, and
// then the same fixed-order reduction. The probabilities are bit-identical to the GPU's (exp_f and div_rn use
// the same exact-FMA / IEEE operations on both); only warp scheduling and nvcc's FMA contraction of the
// histogram updates (w * p + sum) differ.
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

template <int INK>
inline const char* forward_k(const StatsArgs& a, int64_t smem_limit, float* count, float* sum_p, float* sum_y,
                             int64_t* bad) {
  const Plan pl = make_plan(a, false, smem_limit);
  if (pl.error) return pl.error;
  bad[0] = bad[1] = 0;  // labels outside [0, C), non-finite probability entries
  const int64_t blocks = a.B * pl.blocks_per_image;
  std::vector<double> partial(stats_workspace_doubles(a, pl));
  std::vector<float> smem(pl.smem_bytes / 4);
  HostExec ex{pl.threads};
  for (int64_t blk = 0; blk < blocks; ++blk) {
    std::memset(smem.data(), 0xff, smem.size() * 4);
    const BadCounts n = forward_block<INK>(ex, a, pl, smem.data(), partial.data(), blk);
    bad[0] += n.labels;
    bad[1] += n.nonfinite;
  }
  for (int64_t r = 0; r < a.B * 3 * a.C * a.M; ++r) reduce_partials_host(a, pl, partial.data(), count, sum_p, sum_y, r);
  return nullptr;
}

template <int INK>
inline const char* backward_k(const StatsArgs& a, int64_t smem_limit, const float* gc, const float* gp,
                              const float* gy, void* grad) {
  const Plan pl = make_plan(a, true, smem_limit);
  if (pl.error) return pl.error;
  const int64_t blocks = a.B * pl.blocks_per_image;
  std::vector<float> smem(pl.smem_bytes / 4);
  HostExec ex{pl.threads};
  for (int64_t blk = 0; blk < blocks; ++blk) {
    std::memset(smem.data(), 0xff, smem.size() * 4);
    backward_block<INK>(ex, a, pl, smem.data(), gc, gp, gy, grad, blk);
  }
  return nullptr;
}

inline StatsArgs make_args(const void* input, int input_kind, const void* target, int target_kind, const float* edges,
                           int64_t B, int64_t C, int64_t N, int64_t M, int soft, int activation, int labels,
                           int has_ignore, int64_t ignore_index, int right) {
  StatsArgs a{};
  a.input = input;
  a.input_kind = input_kind;
  a.target = target;
  a.target_kind = target_kind;
  a.edges = edges;
  a.B = B;
  a.C = C;
  a.N = N;
  a.M = M;
  a.soft = soft != 0;
  a.activation = activation;
  a.labels = labels != 0;
  a.has_ignore = has_ignore != 0;
  a.ignore_index = ignore_index;
  a.right = right != 0;
  return a;
}

inline const char* run_forward(const StatsArgs& a, int64_t smem_limit, float* count, float* sum_p, float* sum_y,
                               int64_t* bad) {
  switch (a.input_kind) {
    case kF32:
      return forward_k<kF32>(a, smem_limit, count, sum_p, sum_y, bad);
    case kF16:
      return forward_k<kF16>(a, smem_limit, count, sum_p, sum_y, bad);
    case kBF16:
      return forward_k<kBF16>(a, smem_limit, count, sum_p, sum_y, bad);
    default:
      return "unsupported input dtype";
  }
}

inline const char* run_backward(const StatsArgs& a, int64_t smem_limit, const float* gc, const float* gp,
                                const float* gy, void* grad) {
  switch (a.input_kind) {
    case kF32:
      return backward_k<kF32>(a, smem_limit, gc, gp, gy, grad);
    case kF16:
      return backward_k<kF16>(a, smem_limit, gc, gp, gy, grad);
    case kBF16:
      return backward_k<kBF16>(a, smem_limit, gc, gp, gy, grad);
    default:
      return "unsupported input dtype";
  }
}

}  // namespace emu
}  // namespace calibops_cuda

#if defined(CALIBOPS_EMU_LIB)
extern "C" {
// Forward statistics (kernel contract), emulated; bad: int64 [2]. Returns nullptr or the plan's error message.
const char* calibops_emu_forward(const void* input, int input_kind, const void* target, int target_kind,
                                 const float* edges, int64_t B, int64_t C, int64_t N, int64_t M, int soft,
                                 int activation, int labels, int has_ignore, int64_t ignore_index, int right,
                                 int64_t smem_limit, float* count, float* sum_p, float* sum_y, int64_t* bad) {
  using namespace calibops_cuda;
  const StatsArgs a = emu::make_args(input, input_kind, target, target_kind, edges, B, C, N, M, soft, activation,
                                     labels, has_ignore, ignore_index, right);
  return emu::run_forward(a, smem_limit, count, sum_p, sum_y, bad);
}

// Backward (grad w.r.t. the input, written in input_kind), emulated.
const char* calibops_emu_backward(const void* input, int input_kind, const void* target, int target_kind,
                                  const float* edges, int64_t B, int64_t C, int64_t N, int64_t M, int soft,
                                  int activation, int labels, int has_ignore, int64_t ignore_index, int right,
                                  int64_t smem_limit, const float* grad_count, const float* grad_sum_p,
                                  const float* grad_sum_y, void* grad_input) {
  using namespace calibops_cuda;
  const StatsArgs a = emu::make_args(input, input_kind, target, target_kind, edges, B, C, N, M, soft, activation,
                                     labels, has_ignore, ignore_index, right);
  return emu::run_backward(a, smem_limit, grad_count, grad_sum_p, grad_sum_y, grad_input);
}

// The launch plan, for tests: {threads, tile, tiles_per_block, group, slots, slot_stride, P, smem_bytes}.
const char* calibops_emu_plan(int64_t B, int64_t C, int64_t N, int64_t M, int soft, int activation, int labels,
                              int backward, int64_t smem_limit, int64_t* out8) {
  using namespace calibops_cuda;
  const StatsArgs a = emu::make_args(nullptr, kF32, nullptr, kI64, nullptr, B, C, N, M, soft, activation, labels, 0,
                                     0, 0);
  const Plan pl = make_plan(a, backward != 0, smem_limit);
  const int64_t v[8] = {pl.threads, pl.tile,  pl.tiles_per_block, pl.group, pl.slots, pl.slot_stride,
                        pl.blocks_per_image, static_cast<int64_t>(pl.smem_bytes)};
  for (int i = 0; i < 8; ++i) out8[i] = v[i];
  return pl.error;
}
}
#endif

#if defined(CALIBOPS_EMU_MAIN)
#include <cstdio>
#include <random>

// Memory-safety sweep under AddressSanitizer: every buffer is a vector of exactly the contract's size, labels
// include out-of-range and ignored values, inputs NaN and +-inf, odd sizes cross tile and block boundaries.
int main() {
  using namespace calibops_cuda;
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> unif(-4.0f, 4.0f);
  const int64_t shapes[][4] = {{1, 1, 1, 1},   {2, 3, 1000, 7},   {1, 4, 16385, 20}, {3, 2, 33, 1},
                               {1, 16, 300, 20}, {1, 130, 70, 5}, {2, 5, 4097, 3}};
  const int target_kinds[] = {kU8, kI8, kI16, kI32, kI64, kF32, kF16, kBF16};
  int64_t runs = 0;
  for (const auto& s : shapes) {
    const int64_t B = s[0], C = s[1], N = s[2], M = s[3];
    for (int ink = 0; ink < 3; ++ink) {
      for (int tk : target_kinds) {
        const bool labels = tk >= kU8;
        for (int soft = 0; soft < 2; ++soft) {
          for (int act = 0; act < 3; ++act) {
            const int64_t n_in = B * C * N;
            const int64_t n_t = labels ? B * N : B * C * N;
            std::vector<float> in32(n_in);
            std::vector<unsigned short> in16(n_in);
            for (int64_t i = 0; i < n_in; ++i) {
              float x = act == 0 ? (unif(rng) + 4.0f) / 8.0f : unif(rng);
              if (i % 97 == 5) x = NAN;  // non-finite entries: left out, counted, never an index
              if (i % 101 == 7) x = INFINITY;
              if (i % 103 == 11) x = -INFINITY;
              in32[i] = x;
              in16[i] = ink == kF16 ? __half_as_ushort(__float2half_rn(x)) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
            }
            const void* input = ink == kF32 ? static_cast<const void*>(in32.data()) : in16.data();
            const int esz = (tk == kU8 || tk == kI8) ? 1 : (tk == kI16 || tk == kF16 || tk == kBF16) ? 2
                                                                                                         : (tk == kI64 ? 8 : 4);
            std::vector<unsigned char> target(static_cast<size_t>(n_t * esz));
            for (int64_t i = 0; i < n_t; ++i) {
              const int64_t lab = static_cast<int64_t>(rng() % (C + 3)) - 1;  // -1 .. C+1: some out of range
              switch (tk) {
                case kU8: target[i] = static_cast<unsigned char>(lab < 0 ? 255 : lab); break;
                case kI8: reinterpret_cast<int8_t*>(target.data())[i] = static_cast<int8_t>(lab); break;
                case kI16: reinterpret_cast<int16_t*>(target.data())[i] = static_cast<int16_t>(lab); break;
                case kI32: reinterpret_cast<int32_t*>(target.data())[i] = static_cast<int32_t>(lab); break;
                case kI64: reinterpret_cast<int64_t*>(target.data())[i] = lab; break;
                case kF32: reinterpret_cast<float*>(target.data())[i] = (rng() % 2) * 1.0f; break;
                default: reinterpret_cast<unsigned short*>(target.data())[i] = __half_as_ushort(__float2half_rn(0.5f));
              }
            }
            const int64_t ne = soft ? M : M + 1;
            std::vector<float> edges(ne);
            const float top = 1.0f + 1.1920929e-07f;
            for (int64_t k = 0; k < ne; ++k)
              edges[k] = soft ? top * (2 * k + 1) / (2 * M) : top * k / M;
            const int64_t BCM = B * C * M;
            std::vector<float> cnt(BCM), sp(BCM), sy(BCM), gc(BCM, 0.1f), gp(BCM, -0.2f), gy(BCM, 0.3f);
            int64_t bad[2] = {0, 0};
            const StatsArgs a = emu::make_args(input, ink, target.data(), tk, edges.data(), B, C, N, M, soft, act,
                                               labels, labels && (N % 2 == 0), 0, (N % 3 == 0));
            const char* err = emu::run_forward(a, 227 * 1024, cnt.data(), sp.data(), sy.data(), bad);
            if (err) { std::printf("forward error: %s\n", err); return 1; }
            std::vector<float> g32(n_in);
            std::vector<unsigned short> g16(n_in);
            void* grad = ink == kF32 ? static_cast<void*>(g32.data()) : g16.data();
            err = emu::run_backward(a, 227 * 1024, gc.data(), gp.data(), gy.data(), grad);
            if (err) { std::printf("backward error: %s\n", err); return 1; }
            ++runs;
          }
        }
      }
    }
  }
  std::printf("ok %lld runs\n", static_cast<long long>(runs));
  return 0;
}
#endif
