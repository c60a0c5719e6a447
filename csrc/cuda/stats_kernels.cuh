// The block programs of the CUDA statistics kernels, written once for two executors:
// - the GPU (binned_stats.cu): each phase runs on every thread of the block, then __syncthreads();
// - the host emulation (host_emulation.cuh, tests only): each phase runs for t = 0 .. T-1 in turn.
// A phase only reads shared memory written by earlier phases (or by the same thread), so both executors compute
// bit-for-bit the same data flow. No warp intrinsic or atomic is used inside a phase.
// Only the CUDA headers for half / bfloat16 are included (no torch header). Semantics: docs/kernel_contract.md;
// the plan (threads, tiles, histogram slots, shared-memory layout) and the design notes: launchers.cuh.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.cuh"

#if defined(__CUDACC__)
#define CB_HD __host__ __device__ __forceinline__
#else
#define CB_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define CB_UNROLL _Pragma("unroll")
#else
#define CB_UNROLL
#endif

namespace calibops_cuda {

// ---- scalar helpers (IEEE round-to-nearest where it matters, also under --use_fast_math) ----

// p is NaN or +-inf (the contract's non-finite rule): an all-ones exponent. A bit test on purpose: under
// --use_fast_math (setup.py's nvcc flags) or a host -ffinite-math-only the compiler may assume no NaN / inf and
// fold isnan / isinf / `p != p` to false; integer operations on the bits cannot be folded that way.
CB_HD bool is_nonfinite(float p) {
#if defined(__CUDA_ARCH__)
  const unsigned u = __float_as_uint(p);
#else
  unsigned u;
  std::memcpy(&u, &p, 4);
#endif
  return (u & 0x7f800000u) == 0x7f800000u;
}

CB_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// exp(x) in float32 to ~1 ulp, with the same operations on the GPU and on the host (so the host emulation
// computes bit-identical probabilities). Written out because --use_fast_math (setup.py's nvcc flags) turns
// expf into __expf, whose error grows with |x| (~1e-6 relative at x = -20): enough to move soft memberships
// by ~1e-5 and hard bins at the edges. exp(x) = 2^n exp(r), r = x - n ln2 (Cody-Waite, exact FMAs),
// |r| <= ln2 / 2, degree-7 Taylor polynomial (truncation < 1e-8 relative); 2^n applied in two halves so no
// exponent overflows. NaN propagates, x < -104 gives 0 and x > 88.8 gives inf, as expf does.
CB_HD float exp_f(float x) {
  if (x != x) return x;
  if (x < -104.0f) return 0.0f;
  if (x > 88.8f) return INFINITY;
#if defined(__CUDA_ARCH__)
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, x);
  r = fmaf(n, -1.42860682030941723212e-6f, r);
  float q = 1.98412698e-4f;
  q = fmaf(q, r, 1.38888889e-3f);
  q = fmaf(q, r, 8.33333333e-3f);
  q = fmaf(q, r, 4.16666667e-2f);
  q = fmaf(q, r, 1.66666667e-1f);
  q = fmaf(q, r, 0.5f);
  q = fmaf(q, r, 1.0f);
  q = fmaf(q, r, 1.0f);
#else
  const float n = std::rint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.42860682030941723212e-6f, r);
  float q = 1.98412698e-4f;
  q = std::fma(q, r, 1.38888889e-3f);
  q = std::fma(q, r, 8.33333333e-3f);
  q = std::fma(q, r, 4.16666667e-2f);
  q = std::fma(q, r, 1.66666667e-1f);
  q = std::fma(q, r, 0.5f);
  q = std::fma(q, r, 1.0f);
  q = std::fma(q, r, 1.0f);
#endif
  const int ni = static_cast<int>(n);  // -150 .. 128
  const int h1 = ni / 2, h2 = ni - h1;  // each in -75 .. 64
  const int b1 = (h1 + 127) << 23, b2 = (h2 + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float s1 = __int_as_float(b1), s2 = __int_as_float(b2);
#else
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
#endif
  return q * s1 * s2;
}

template <int K>
CB_HD float load_in(const void* p, int64_t i) {
  if (K == kF16) return __half2float(__ushort_as_half(static_cast<const unsigned short*>(p)[i]));
  if (K == kBF16) return __bfloat162float(__ushort_as_bfloat16(static_cast<const unsigned short*>(p)[i]));
  return static_cast<const float*>(p)[i];
}

template <int K>
CB_HD void store_out(void* p, int64_t i, float v) {
  if (K == kF16) {
    static_cast<unsigned short*>(p)[i] = __half_as_ushort(__float2half_rn(v));
  } else if (K == kBF16) {
    static_cast<unsigned short*>(p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// Dense target value as float32 (kind is uniform across the launch, so the switch does not diverge).
CB_HD float load_dense(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF16:
      return load_in<kF16>(p, i);
    case kBF16:
      return load_in<kBF16>(p, i);
    case kU8:
      return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    default:
      return load_in<kF32>(p, i);
  }
}

CB_HD int64_t load_label(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kU8:
      return static_cast<const uint8_t*>(p)[i];
    case kI8:
      return static_cast<const int8_t*>(p)[i];
    case kI16:
      return static_cast<const int16_t*>(p)[i];
    case kI32:
      return static_cast<const int32_t*>(p)[i];
    default:
      return static_cast<const int64_t*>(p)[i];
  }
}

// Hard bin: j = #{k in 1..M : e[k] < p} (right: <=), clamped to M - 1. The estimate int(p * M) (clamped as a
// float first, so NaN / inf / out-of-range p cannot make an out-of-range index) is corrected by walking
// the edges; the walks end at exactly that j whatever the estimate, and stay in 0 .. M-1.
CB_HD int hard_bin(float p, const float* e, int M, bool right) {
  const float est = fminf(fmaxf(p * static_cast<float>(M), 0.0f), static_cast<float>(M - 1));
  int j = static_cast<int>(est);
  if (right) {
    while (j < M - 1 && e[j + 1] <= p) ++j;
    while (j > 0 && !(e[j] <= p)) --j;
  } else {
    while (j < M - 1 && e[j + 1] < p) ++j;
    while (j > 0 && !(e[j] < p)) --j;
  }
  return j;
}

// Soft binning: t = #{k : c[k] < p} - 1 in -1 .. M-1 (same walk as hard_bin).
CB_HD int soft_index(float p, const float* c, int M) {
  const float est = fminf(fmaxf(p * static_cast<float>(M) - 0.5f, -1.0f), static_cast<float>(M - 1));
  int t = static_cast<int>(floorf(est));
  while (t < M - 1 && c[t + 1] < p) ++t;
  while (t >= 0 && !(c[t] < p)) --t;
  return t;
}

// ---- phases shared by forward and backward ----

// Copies the edges (and, backward, the grads of image b) into shared memory.
CB_HD void phase_init(const StatsArgs& a, const Plan& pl, float* sm, int64_t b, const float* gc, const float* gp,
                      const float* gy, int t) {
  const int M = static_cast<int>(a.M);
  const int ne = a.soft ? M : M + 1;
  for (int i = t; i < ne; i += pl.threads) sm[pl.off_edges + i] = a.edges[i];
  if (pl.off_hist >= 0) {
    float* h = sm + pl.off_hist;
    const int64_t nh = int64_t{3} * M * pl.slot_stride;
    for (int64_t i = t; i < nh; i += pl.threads) h[i] = 0.0f;
  }
  if (pl.grads_in_smem) {
    const int64_t cm = a.C * a.M;
    float* g = sm + pl.off_grads;
    for (int64_t i = t; i < cm; i += pl.threads) {
      g[i] = gc[b * cm + i];
      g[cm + i] = gp[b * cm + i];
      g[2 * cm + i] = gy[b * cm + i];
    }
  }
}

// Loads the tile of voxels [n0, n0 + valid) of image b: x[c][v] (float32) and the labels (int32 in 0..C-1, or -1
// for ignored / out-of-range / past the end) or dense target y[c][v]. Returns the number of out-of-range labels.
template <int INK>
CB_HD int phase_load(const StatsArgs& a, const Plan& pl, float* sm, int64_t b, int64_t n0, int valid, int t) {
  const int T = pl.threads, V = pl.tile, lg = pl.tile_log2;
  const int total = static_cast<int>(a.C) * V;
  const int64_t N = a.N;
  const int64_t img = b * a.C * N + n0;  // offset of [b, 0, n0]
  float* sx = sm + pl.off_x;
  constexpr int U = 8;  // loads in flight per thread
  for (int base = t; base < total; base += U * T) {
    float r[U];
CB_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = base + u * T;
      const int v = e & (V - 1);
      r[u] = (e < total && v < valid) ? load_in<INK>(a.input, img + static_cast<int64_t>(e >> lg) * N + v) : 0.0f;
    }
CB_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = base + u * T;
      if (e < total) sx[e] = r[u];
    }
  }
  int bad = 0;
  if (a.labels) {
    int* st = reinterpret_cast<int*>(sm + pl.off_t);
    for (int v = t; v < V; v += T) {
      int lab = -1;
      if (v < valid) {
        const int64_t L = load_label(a.target, a.target_kind, b * N + n0 + v);
        if (a.has_ignore && L == a.ignore_index) {
          lab = -1;
        } else if (L >= 0 && L < a.C) {
          lab = static_cast<int>(L);
        } else {
          ++bad;
        }
      }
      st[v] = lab;
    }
  } else {
    float* sy = sm + pl.off_t;
    for (int base = t; base < total; base += U * T) {
      float r[U];
CB_UNROLL
      for (int u = 0; u < U; ++u) {
        const int e = base + u * T;
        const int v = e & (V - 1);
        r[u] = (e < total && v < valid)
                   ? load_dense(a.target, a.target_kind, img + static_cast<int64_t>(e >> lg) * N + v)
                   : 0.0f;
      }
CB_UNROLL
      for (int u = 0; u < U; ++u) {
        const int e = base + u * T;
        if (e < total) sy[e] = r[u];
      }
    }
  }
  return bad;
}

// Turns the column x[:, v] into probabilities in place (softmax over C max-subtracted, or sigmoid).
CB_HD void activate_column(float* col, int C, int V, int activation) {
  if (activation == 1) {
    float m = col[0];
    for (int c = 1; c < C; ++c) m = fmaxf(m, col[c * V]);
    float s = 0.0f;
    for (int c = 0; c < C; ++c) {
      const float ex = exp_f(col[c * V] - m);
      col[c * V] = ex;
      s += ex;
    }
    for (int c = 0; c < C; ++c) col[c * V] = div_rn(col[c * V], s);
  } else if (activation == 2) {
    for (int c = 0; c < C; ++c) col[c * V] = div_rn(1.0f, 1.0f + exp_f(-col[c * V]));
  }
}

// ---- forward ----

CB_HD void phase_activate(const StatsArgs& a, const Plan& pl, float* sm, int valid, int t) {
  if (a.activation == 0) return;
  for (int v = t; v < valid; v += pl.threads) activate_column(sm + pl.off_x + v, static_cast<int>(a.C), pl.tile, a.activation);
}

// Thread t owns histogram slots s = t, t + T, ...: slot s = class s / G, voxels v = s % G (step G) of the tile.
// Each (class, voxel) entry is visited by exactly one thread; entries with a non-finite p are left out and
// counted. Returns this thread's count of them.
CB_HD int phase_accumulate(const StatsArgs& a, const Plan& pl, float* sm, int valid, int t) {
  int nonfinite = 0;
  const int M = static_cast<int>(a.M), V = pl.tile, G = pl.group, S = pl.slot_stride;
  const float* e = sm + pl.off_edges;
  const int* st = reinterpret_cast<const int*>(sm + pl.off_t);
  const float* sy = sm + pl.off_t;
  for (int s = t; s < pl.slots; s += pl.threads) {
    const int c = s / G;
    const int g = s - c * G;
    float* hn = sm + pl.off_hist + s;  // count column, then sum_p at + M * S, sum_y at + 2 * M * S
    float* hp = hn + M * S;
    float* hy = hp + M * S;
    const float* px = sm + pl.off_x + c * V;
    for (int v = g; v < valid; v += G) {
      float y;
      if (a.labels) {
        const int lab = st[v];
        if (lab < 0) continue;
        y = lab == c ? 1.0f : 0.0f;
      } else {
        y = sy[c * V + v];
      }
      const float p = px[v];
      if (is_nonfinite(p)) {
        ++nonfinite;
        continue;
      }
      if (!a.soft) {
        const int j = hard_bin(p, e, M, a.right) * S;
        hn[j] += 1.0f;
        hp[j] += p;
        hy[j] += y;
      } else {
        const int k = soft_index(p, e, M);
        if (k < 0 || k >= M - 1) {
          const int j = (k < 0 ? 0 : M - 1) * S;
          hn[j] += 1.0f;
          hp[j] += p;
          hy[j] += y;
        } else {
          const float w0 = div_rn(e[k + 1] - p, e[k + 1] - e[k]);
          const float w1 = 1.0f - w0;
          const int j0 = k * S, j1 = (k + 1) * S;
          hn[j0] += w0;
          hp[j0] += w0 * p;
          hy[j0] += w0 * y;
          hn[j1] += w1;
          hp[j1] += w1 * p;
          hy[j1] += w1 * y;
        }
      }
    }
  }
  return nonfinite;
}

// Sums the G slot columns of each (stat, class, bin) in slot order into this block's partial [3][C][M].
CB_HD void phase_write_partial(const StatsArgs& a, const Plan& pl, const float* sm, double* partial, int t) {
  const int64_t CM = a.C * a.M;
  const int M = static_cast<int>(a.M), G = pl.group, S = pl.slot_stride;
  const float* h = sm + pl.off_hist;
  for (int64_t r = t; r < 3 * CM; r += pl.threads) {
    const int64_t stat = r / CM, rem = r - stat * CM;
    const int64_t c = rem / M, j = rem - c * M;
    const float* col = h + (stat * M + j) * S + c * G;
    double acc = 0.0;
    for (int g = 0; g < G; ++g) acc += static_cast<double>(col[g]);
    partial[r] = acc;
  }
}

// The image's P block partials of output entry r (in [0, B * 3 * C * M)) are summed by a warp: lane l adds
// blocks l, l + 32, ... in order (float64), then the lanes are combined by the fixed tree
// v[l] += v[l + 16], v[l] += v[l + 8], ..., v[0] += v[1] (shuffle-down on the GPU), and lane 0 rounds once to
// float32. Fixed order everywhere: deterministic; 32 independent load streams: no latency-bound serial chain.
constexpr int kReduceLanes = 32;

CB_HD double reduce_lane_sum(const StatsArgs& a, const Plan& pl, const double* partial, int64_t r, int lane) {
  const int64_t CM3 = 3 * a.C * a.M, P = pl.blocks_per_image;
  const int64_t b = r / CM3, q = r - b * CM3;
  const double* src = partial + b * P * CM3 + q;
  double acc = 0.0;
  for (int64_t p = lane; p < P; p += kReduceLanes) acc += src[p * CM3];
  return acc;
}

CB_HD void reduce_store(const StatsArgs& a, float* count, float* sum_p, float* sum_y, int64_t r, double v) {
  const int64_t CM = a.C * a.M;
  const int64_t b = r / (3 * CM), q = r - b * 3 * CM;
  const int64_t stat = q / CM, rem = q - stat * CM;
  float* out = stat == 0 ? count : (stat == 1 ? sum_p : sum_y);
  out[b * CM + rem] = static_cast<float>(v);
}

// Host form of the warp reduction (the emulation): the same per-lane sums and the same tree.
inline void reduce_partials_host(const StatsArgs& a, const Plan& pl, const double* partial, float* count,
                                 float* sum_p, float* sum_y, int64_t r) {
  double v[kReduceLanes];
  for (int l = 0; l < kReduceLanes; ++l) v[l] = reduce_lane_sum(a, pl, partial, r, l);
  for (int off = kReduceLanes / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) v[l] += v[l + off];
  reduce_store(a, count, sum_p, sum_y, r, v[0]);
}

// ---- backward ----

// dL/dp of one (voxel, class) from the grads gc/gp/gy ([M] of this image and class), per the contract.
CB_HD float grad_wrt_p(float p, float y, const float* e, int M, bool soft, bool right, const float* gc,
                       const float* gp, const float* gy) {
  if (!soft) return gp[hard_bin(p, e, M, right)];
  const int k = soft_index(p, e, M);
  if (k < 0) return gp[0];
  if (k >= M - 1) return gp[M - 1];
  const float d = e[k + 1] - e[k];
  const float inv = div_rn(1.0f, d);
  const float w0 = div_rn(e[k + 1] - p, d);
  const float w1 = 1.0f - w0;
  // sum_j Gc[j] dw_j + Gp[j] (w_j + p dw_j) + Gy[j] y dw_j with dw_k = -inv, dw_{k+1} = +inv
  const float lo = gc[k] + p * gp[k] + y * gy[k];
  const float hi = gc[k + 1] + p * gp[k + 1] + y * gy[k + 1];
  return gp[k] * w0 + gp[k + 1] * w1 + inv * (hi - lo);
}

// Each thread turns its voxel columns into gradients and writes them ([b, c, n0 + v], coalesced over v).
template <int INK>
CB_HD void phase_backward(const StatsArgs& a, const Plan& pl, float* sm, const float* gc_img, const float* gp_img,
                          const float* gy_img, void* grad, int64_t b, int64_t n0, int valid, int t) {
  const int C = static_cast<int>(a.C), M = static_cast<int>(a.M), V = pl.tile;
  const int64_t N = a.N;
  const int64_t img = b * a.C * N + n0;
  const float* e = sm + pl.off_edges;
  const int* st = reinterpret_cast<const int*>(sm + pl.off_t);
  const float* sy = sm + pl.off_t;
  for (int v = t; v < valid; v += pl.threads) {
    int lab = 0;
    if (a.labels) {
      lab = st[v];
      if (lab < 0) {
        for (int c = 0; c < C; ++c) store_out<INK>(grad, img + static_cast<int64_t>(c) * N + v, 0.0f);
        continue;
      }
    }
    float* col = sm + pl.off_x + v;
    activate_column(col, C, V, a.activation);
    // Non-finite p: gradient 0, and no part in the softmax dot product (there p is NaN for every class of the
    // voxel or for none, so the voxel's whole gradient is 0).
    float dot = 0.0f;
    for (int c = 0; c < C; ++c) {
      const float p = col[c * V];
      const float y = a.labels ? (lab == c ? 1.0f : 0.0f) : sy[c * V + v];
      const bool skip = is_nonfinite(p);
      const float g =
          skip ? 0.0f : grad_wrt_p(p, y, e, M, a.soft, a.right, gc_img + c * M, gp_img + c * M, gy_img + c * M);
      if (a.activation == 1) {
        sm[pl.off_g + c * V + v] = g;
        if (!skip) dot += p * g;
      } else {
        const float out = skip ? 0.0f : (a.activation == 2 ? g * p * (1.0f - p) : g);
        store_out<INK>(grad, img + static_cast<int64_t>(c) * N + v, out);
      }
    }
    if (a.activation == 1) {
      for (int c = 0; c < C; ++c) {
        const float p = col[c * V];
        const float out = is_nonfinite(p) ? 0.0f : p * (sm[pl.off_g + c * V + v] - dot);
        store_out<INK>(grad, img + static_cast<int64_t>(c) * N + v, out);
      }
    }
  }
}

// ---- block programs (Exec: phase(f) runs f(t) for every thread t of the block, then synchronises) ----

// What a forward block counts and leaves out (the two entries of the op's `bad`).
struct BadCounts {
  int64_t labels;     // label voxels outside [0, C) other than ignore_index
  int64_t nonfinite;  // non-finite probability entries of the other voxels
};

// Forward block `blk` (image blk / P, tiles (blk % P) * K ...): writes its partial [3][C][M], returns the counts
// seen by the calling thread (device) / by the whole block (host).
template <int INK, class Exec>
CB_HD BadCounts forward_block(Exec& ex, const StatsArgs& a, const Plan& pl, float* sm, double* partial,
                              int64_t blk) {
  const int64_t P = pl.blocks_per_image;
  const int64_t b = blk / P, pb = blk - b * P;
  BadCounts bad{0, 0};
  ex.phase([&](int t) { phase_init(a, pl, sm, b, nullptr, nullptr, nullptr, t); });
  for (int k = 0; k < pl.tiles_per_block; ++k) {
    const int64_t n0 = (pb * pl.tiles_per_block + k) * pl.tile;
    if (n0 >= a.N) break;  // uniform across the block
    const int valid = static_cast<int>(a.N - n0 < pl.tile ? a.N - n0 : pl.tile);
    ex.phase([&](int t) { bad.labels += phase_load<INK>(a, pl, sm, b, n0, valid, t); });
    ex.phase([&](int t) { phase_activate(a, pl, sm, valid, t); });
    ex.phase([&](int t) { bad.nonfinite += phase_accumulate(a, pl, sm, valid, t); });
  }
  double* out = partial + blk * 3 * a.C * a.M;
  ex.phase([&](int t) { phase_write_partial(a, pl, sm, out, t); });
  return bad;
}

template <int INK, class Exec>
CB_HD void backward_block(Exec& ex, const StatsArgs& a, const Plan& pl, float* sm, const float* gc, const float* gp,
                          const float* gy, void* grad, int64_t blk) {
  const int64_t P = pl.blocks_per_image;
  const int64_t b = blk / P, pb = blk - b * P;
  const int64_t cm = a.C * a.M;
  ex.phase([&](int t) { phase_init(a, pl, sm, b, gc, gp, gy, t); });
  const float* gci = pl.grads_in_smem ? sm + pl.off_grads : gc + b * cm;
  const float* gpi = pl.grads_in_smem ? sm + pl.off_grads + cm : gp + b * cm;
  const float* gyi = pl.grads_in_smem ? sm + pl.off_grads + 2 * cm : gy + b * cm;
  for (int k = 0; k < pl.tiles_per_block; ++k) {
    const int64_t n0 = (pb * pl.tiles_per_block + k) * pl.tile;
    if (n0 >= a.N) break;  // uniform across the block
    const int valid = static_cast<int>(a.N - n0 < pl.tile ? a.N - n0 : pl.tile);
    ex.phase([&](int t) { phase_load<INK>(a, pl, sm, b, n0, valid, t); });
    ex.phase([&](int t) { phase_backward<INK>(a, pl, sm, gci, gpi, gyi, grad, b, n0, valid, t); });
  }
}

}  // namespace calibops_cuda
