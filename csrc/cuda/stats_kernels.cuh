// The block programs of the CUDA statistics kernels, written once for two executors:
// - the GPU (binned_stats.cu): each phase runs on every thread of the block, then __syncthreads();
// - the host emulation (tests/cuda_emulation, tests only): each phase runs for t = 0 .. T-1 in turn.
// A phase only reads shared memory written by earlier phases (or by the same thread), so both executors compute
// bit-for-bit the same data flow. No warp intrinsic or atomic is used inside a phase.
//
// One kernel body per op, specialised at compile time by a Variant: input element kind, mode (marginal /
// top-label), MULTI (R > 1 rater label maps) and MOM (moments). The v1 configurations (marginal, one rater, no
// moments) therefore compile to the same code as before: the new features cost nothing when off. The binning
// scheme is a membership function (schemes.cuh) the body is instantiated with.
// Semantics: docs/kernel_contract.md; the plan (threads, tiles, histogram slots, shared-memory layout) and the
// design notes: launchers.cuh.
#pragma once

#include <cstdint>

#include "launchers.cuh"
#include "numerics.cuh"
#include "schemes.cuh"

namespace calibops_cuda {

// The compile-time specialisation of a kernel.
template <int INK_, int MODE_, bool MULTI_, bool MOM_>
struct Variant {
  static constexpr int INK = INK_;      // input element kind (kF32, kF16, kBF16)
  static constexpr int MODE = MODE_;    // kModeMarginal / kModeTopLabel
  static constexpr bool MULTI = MULTI_; // label target with R > 1 raters
  static constexpr bool MOM = MOM_;     // moments (sum_p2, sum_py)
};

// Calls f(Variant<...>{}) for the call's variant; false when the input kind is not a kernel input kind.
template <int INK, int MODE, bool MULTI, class F>
bool with_moments(const StatsArgs& a, F& f) {
  if (a.moments) {
    f(Variant<INK, MODE, MULTI, true>{});
  } else {
    f(Variant<INK, MODE, MULTI, false>{});
  }
  return true;
}

template <int INK, int MODE, class F>
bool with_raters(const StatsArgs& a, F& f) {
  return (a.labels && a.R > 1) ? with_moments<INK, MODE, true>(a, f) : with_moments<INK, MODE, false>(a, f);
}

template <int INK, class F>
bool with_mode(const StatsArgs& a, F& f) {
  return a.mode == kModeTopLabel ? with_raters<INK, kModeTopLabel>(a, f) : with_raters<INK, kModeMarginal>(a, f);
}

template <class F>
bool with_variant(const StatsArgs& a, F&& f) {
  switch (a.input_kind) {
    case kF32:
      return with_mode<kF32>(a, f);
    case kF16:
      return with_mode<kF16>(a, f);
    case kBF16:
      return with_mode<kBF16>(a, f);
    default:
      return false;
  }
}

// Gradients of one image, [K, M] each (sum_y: [K, R, M]); in shared memory or global memory.
struct GradView {
  const float* count;
  const float* sum_p;
  const float* sum_y;
  const float* sum_p2;
  const float* sum_py;
};

// ---- phases shared by forward and backward ----

// Copies the edges (and, backward, the gradients of image b) into shared memory; zeroes the histograms.
CB_HD void phase_init(const StatsArgs& a, const Plan& pl, float* sm, int64_t b, const GradPtrs* g, int t) {
  const int M = static_cast<int>(a.M);
  const int ne = a.scheme == kSchemeSoft ? M : M + 1;
  for (int i = t; i < ne; i += pl.threads) sm[pl.off_edges + i] = a.edges[i];
  if (pl.off_hist >= 0) {
    float* h = sm + pl.off_hist;
    const int64_t nh = int64_t{pl.nstat} * M * pl.slot_stride;
    for (int64_t i = t; i < nh; i += pl.threads) h[i] = 0.0f;
  }
  if (pl.grads_in_smem && g != nullptr) {
    const int64_t km = a.K * a.M, krm = km * a.R;
    float* d = sm + pl.off_grads;
    for (int64_t i = t; i < km; i += pl.threads) {
      d[i] = g->count[b * km + i];
      d[km + i] = g->sum_p[b * km + i];
    }
    for (int64_t i = t; i < krm; i += pl.threads) d[2 * km + i] = g->sum_y[b * krm + i];
    if (a.moments) {
      for (int64_t i = t; i < km; i += pl.threads) {
        d[2 * km + krm + i] = g->sum_p2[b * km + i];
        d[3 * km + krm + i] = g->sum_py[b * km + i];
      }
    }
  }
}

// Loads the tile of voxels [n0, n0 + valid) of image b: x[c][v] (float32) and the labels (rater r at
// st[r * V + v], int32 in 0..C-1; st[v] = -1 marks a voxel that is not used: some rater's label is ignored or
// out of range, or v is past the end) or the dense target y[c][v]. Returns the number of out-of-range label
// entries (over all raters).
template <int INK, bool MULTI>
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
    const int R = MULTI ? static_cast<int>(a.R) : 1;
    const int64_t lab0 = b * R * N + n0;  // offset of [b, 0, n0] in the [B, R, N] labels
    for (int v = t; v < V; v += T) {
      bool used = v < valid;
      for (int r = 0; r < R; ++r) {  // for each r, the threads of a warp read consecutive voxels
        int lab = -1;
        if (v < valid) {
          const int64_t L = load_label(a.target, a.target_elem, lab0 + static_cast<int64_t>(r) * N + v);
          if (a.has_ignore && L == a.ignore_index) {
            used = false;
          } else if (L >= 0 && L < a.C) {
            lab = static_cast<int>(L);
          } else {
            used = false;
            ++bad;
          }
        }
        st[r * V + v] = lab;
      }
      if (!used) st[v] = -1;
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
                   ? load_dense(a.target, a.target_elem, img + static_cast<int64_t>(e >> lg) * N + v)
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

// Top-label entry of the probability column col[c * V]: q = max_c p, cls = argmax (ties: the lowest index,
// comparing float32 values exactly and replacing only on >). Returns the number of non-finite p in the column.
CB_HD int top_label(const float* col, int C, int V, float& q, int& cls) {
  q = col[0];
  cls = 0;
  int nf = is_nonfinite(q) ? 1 : 0;
  for (int c = 1; c < C; ++c) {
    const float p = col[c * V];
    nf += is_nonfinite(p) ? 1 : 0;
    if (p > q) {
      q = p;
      cls = c;
    }
  }
  return nf;
}

// Number of raters whose label at voxel v (labs = st + v, rater stride V) is cls.
CB_HD int rater_matches(const int* labs, int R, int V, int cls) {
  int n = 0;
  for (int r = 0; r < R; ++r) n += labs[r * V] == cls ? 1 : 0;
  return n;
}

// ---- forward ----

CB_HD void phase_activate(const StatsArgs& a, const Plan& pl, float* sm, int valid, int t) {
  if (a.activation == 0) return;
  for (int v = t; v < valid; v += pl.threads) {
    activate_column(sm + pl.off_x + v, static_cast<int>(a.C), pl.tile, a.activation);
  }
}

// Thread t owns histogram slots s = t, t + T, ...: slot s = row s / G, voxels v = s % G (step G) of the tile.
// Marginal: row = class, one entry (class, voxel); top-label: one row, the entry (argmax, voxel). Each entry is
// visited by exactly one thread; entries with a non-finite p (top-label: a voxel with any) are left out and their
// non-finite p counted. Returns this thread's count of them.
template <int MODE, bool MULTI, bool MOM>
CB_HD int phase_accumulate(const StatsArgs& a, const Plan& pl, float* sm, int valid, int t) {
  int nonfinite = 0;
  const int C = static_cast<int>(a.C), M = static_cast<int>(a.M), V = pl.tile, G = pl.group, S = pl.slot_stride;
  const int R = MULTI ? static_cast<int>(a.R) : 1;
  const int MS = M * S;  // distance between two statistics' columns
  const float* e = sm + pl.off_edges;
  const int* st = reinterpret_cast<const int*>(sm + pl.off_t);
  const float* sy = sm + pl.off_t;
  for (int s = t; s < pl.slots; s += pl.threads) {
    const int k = s / G;
    const int g = s - k * G;
    float* h = sm + pl.off_hist + s;  // column of statistic i, bin j: h[i * MS + j * S]
    const float* px = sm + pl.off_x + k * V;
    for (int v = g; v < valid; v += G) {
      if (a.labels && st[v] < 0) continue;
      float q;
      int cls;
      if (MODE == kModeMarginal) {
        q = px[v];
        cls = k;
        if (is_nonfinite(q)) {
          ++nonfinite;
          continue;
        }
      } else {
        const int nf = top_label(sm + pl.off_x + v, C, V, q, cls);
        if (nf != 0) {
          nonfinite += nf;
          continue;
        }
      }
      float y = 0.0f;  // R == 1: the target of the entry
      if (!MULTI) y = a.labels ? (st[v] == cls ? 1.0f : 0.0f) : sy[cls * V + v];
      float ybar = y;  // rater mean (moments)
      if (MULTI && MOM) ybar = div_rn(static_cast<float>(rater_matches(st + v, R, V, cls)), static_cast<float>(R));
      auto deposit = [&](int jS, float w) {
        const float wq = w * q;
        h[jS] += w;
        h[MS + jS] += wq;
        if (MULTI) {
          for (int r = 0; r < R; ++r) h[(2 + r) * MS + jS] += st[r * V + v] == cls ? w : 0.0f;
        } else {
          h[2 * MS + jS] += w * y;
        }
        if (MOM) {
          h[(2 + R) * MS + jS] += wq * q;
          h[(3 + R) * MS + jS] += wq * ybar;
        }
      };
      with_membership(a.scheme, q, e, M, a.right, [&](const Membership& mb) {
        deposit(mb.j * S, mb.w);
        if (mb.split) deposit((mb.j + 1) * S, 1.0f - mb.w);
      });
    }
  }
  return nonfinite;
}

// Sums the G slot columns of each (stat, row, bin) in slot order into this block's partial [nstat][K][M].
CB_HD void phase_write_partial(const StatsArgs& a, const Plan& pl, const float* sm, double* partial, int t) {
  const int64_t KM = a.K * a.M;
  const int M = static_cast<int>(a.M), G = pl.group, S = pl.slot_stride;
  const float* h = sm + pl.off_hist;
  for (int64_t r = t; r < pl.nstat * KM; r += pl.threads) {
    const int64_t stat = r / KM, rem = r - stat * KM;
    const int64_t k = rem / M, j = rem - k * M;
    const float* col = h + (stat * M + j) * S + k * G;
    double acc = 0.0;
    for (int g = 0; g < G; ++g) acc += static_cast<double>(col[g]);
    partial[r] = acc;
  }
}

// The image's P block partials of output entry r (in [0, B * nstat * K * M)) are summed by a warp: lane l adds
// blocks l, l + 32, ... in order (float64), then the lanes are combined by the fixed tree
// v[l] += v[l + 16], v[l] += v[l + 8], ..., v[0] += v[1] (shuffle-down on the GPU), and lane 0 rounds once to
// float32. Fixed order everywhere: deterministic; 32 independent load streams: no latency-bound serial chain.
constexpr int kReduceLanes = 32;

CB_HD double reduce_lane_sum(const StatsArgs& a, const Plan& pl, const double* partial, int64_t r, int lane) {
  const int64_t E = pl.nstat * a.K * a.M, P = pl.blocks_per_image;
  const int64_t b = r / E, q = r - b * E;
  const double* src = partial + b * P * E + q;
  double acc = 0.0;
  for (int64_t p = lane; p < P; p += kReduceLanes) acc += src[p * E];
  return acc;
}

CB_HD void reduce_store(const StatsArgs& a, const Plan& pl, const OutPtrs& out, int64_t r, double v) {
  const int64_t KM = a.K * a.M, E = pl.nstat * KM;
  const int64_t b = r / E, q = r - b * E;
  const int64_t stat = q / KM, rem = q - stat * KM;
  const float f = static_cast<float>(v);
  if (stat == 0) {
    out.count[b * KM + rem] = f;
  } else if (stat == 1) {
    out.sum_p[b * KM + rem] = f;
  } else if (stat < 2 + a.R) {
    const int64_t k = rem / a.M, m = rem - k * a.M;
    out.sum_y[((b * a.K + k) * a.R + (stat - 2)) * a.M + m] = f;
  } else if (stat == 2 + a.R) {
    out.sum_p2[b * KM + rem] = f;
  } else {
    out.sum_py[b * KM + rem] = f;
  }
}

// Host form of the warp reduction (the emulation): the same per-lane sums and the same tree.
inline void reduce_partials_host(const StatsArgs& a, const Plan& pl, const double* partial, const OutPtrs& out,
                                 int64_t r) {
  double v[kReduceLanes];
  for (int l = 0; l < kReduceLanes; ++l) v[l] = reduce_lane_sum(a, pl, partial, r, l);
  for (int off = kReduceLanes / 2; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) v[l] += v[l + off];
  reduce_store(a, pl, out, r, v[0]);
}

// ---- backward ----

// g_q of one used entry (docs/kernel_contract.md, "Backward") from the gradients of its row (gv, row k):
// with (j, w, dw) its membership, W / D the weights / slopes of bins j, j + 1,
//   g_q = sum_m W_m A_m + D_m B_m,  A_m = Gp + 2q Gp2 + ybar Gpy,  B_m = Gc + q Gp + sum_r Gy_r y_r + q^2 Gp2 + q ybar Gpy
// (the moment terms only with MOM). labs: the raters' labels of the voxel (stride V), MULTI only.
template <bool MULTI, bool MOM>
CB_HD float entry_grad(const StatsArgs& a, const float* e, const GradView& gv, int k, float q, int cls, float y,
                       float ybar, const int* labs, int V) {
  const int M = static_cast<int>(a.M);
  const int R = MULTI ? static_cast<int>(a.R) : 1;
  const float* gc = gv.count + k * M;
  const float* gp = gv.sum_p + k * M;
  const float* gy = gv.sum_y + static_cast<int64_t>(k) * R * M;
  const float* gp2 = MOM ? gv.sum_p2 + k * M : nullptr;
  const float* gpy = MOM ? gv.sum_py + k * M : nullptr;
  auto ygy = [&](int m) {  // sum_r Gy_r[m] y_r
    if (!MULTI) return y * gy[m];
    float s = 0.0f;
    for (int r = 0; r < R; ++r) s += labs[r * V] == cls ? gy[r * M + m] : 0.0f;
    return s;
  };
  auto A = [&](int m) { return MOM ? gp[m] + 2.0f * q * gp2[m] + ybar * gpy[m] : gp[m]; };
  auto B = [&](int m) {
    const float base = gc[m] + q * gp[m] + ygy(m);
    return MOM ? base + q * q * gp2[m] + q * ybar * gpy[m] : base;
  };
  float g = 0.0f;
  with_membership(a.scheme, q, e, M, a.right, [&](const Membership& mb) {
    g = mb.w * A(mb.j);
    if (mb.split) g += (1.0f - mb.w) * A(mb.j + 1) + mb.dw * (B(mb.j) - B(mb.j + 1));
  });
  return g;
}

// Each thread turns its voxel columns into gradients and writes them ([b, c, n0 + v], coalesced over v).
template <int INK, int MODE, bool MULTI, bool MOM>
CB_HD void phase_backward(const StatsArgs& a, const Plan& pl, float* sm, const GradView& gv, void* grad, int64_t b,
                          int64_t n0, int valid, int t) {
  const int C = static_cast<int>(a.C), V = pl.tile;
  const int R = MULTI ? static_cast<int>(a.R) : 1;
  const int64_t N = a.N;
  const int64_t img = b * a.C * N + n0;
  const float* e = sm + pl.off_edges;
  const int* st = reinterpret_cast<const int*>(sm + pl.off_t);
  const float* sy = sm + pl.off_t;
  for (int v = t; v < valid; v += pl.threads) {
    auto zero_voxel = [&]() {
      for (int c = 0; c < C; ++c) store_out<INK>(grad, img + static_cast<int64_t>(c) * N + v, 0.0f);
    };
    if (a.labels && st[v] < 0) {
      zero_voxel();
      continue;
    }
    float* col = sm + pl.off_x + v;
    activate_column(col, C, V, a.activation);
    // target of entry (cls, v): y (R == 1) and the rater mean ybar
    auto target_of = [&](int cls, float& y, float& ybar) {
      y = MULTI ? 0.0f : (a.labels ? (st[v] == cls ? 1.0f : 0.0f) : sy[cls * V + v]);
      ybar = y;
      if (MULTI && MOM) ybar = div_rn(static_cast<float>(rater_matches(st + v, R, V, cls)), static_cast<float>(R));
    };
    if (MODE == kModeMarginal) {
      // Non-finite p: gradient 0, and no part in the softmax dot product (there p is NaN for every class of the
      // voxel or for none, so the voxel's whole gradient is 0).
      float dot = 0.0f;
      for (int c = 0; c < C; ++c) {
        const float p = col[c * V];
        const bool skip = is_nonfinite(p);
        float g = 0.0f;
        if (!skip) {
          float y, ybar;
          target_of(c, y, ybar);
          g = entry_grad<MULTI, MOM>(a, e, gv, c, p, c, y, ybar, st + v, V);
        }
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
    } else {
      // Top-label: only the argmax class has g_p = g_q; a voxel with any non-finite p gets gradient 0.
      float q;
      int cls;
      if (top_label(col, C, V, q, cls) != 0) {
        zero_voxel();
        continue;
      }
      float y, ybar;
      target_of(cls, y, ybar);
      const float g = entry_grad<MULTI, MOM>(a, e, gv, 0, q, cls, y, ybar, st + v, V);
      const float dot = q * g;  // softmax: sum_k p_k g_p[k]
      for (int c = 0; c < C; ++c) {
        const float p = col[c * V];
        const float gpc = c == cls ? g : 0.0f;
        float out;
        if (a.activation == 1) {
          out = p * (gpc - dot);
        } else if (a.activation == 2) {
          out = gpc * p * (1.0f - p);
        } else {
          out = gpc;
        }
        store_out<INK>(grad, img + static_cast<int64_t>(c) * N + v, out);
      }
    }
  }
}

// ---- block programs (Exec: phase(f) runs f(t) for every thread t of the block, then synchronises) ----

// What a forward block counts and leaves out (the two entries of the op's `bad`).
struct BadCounts {
  int64_t labels;     // label entries outside [0, C) other than ignore_index (all raters)
  int64_t nonfinite;  // non-finite probability entries of used voxels
};

// Forward block `blk` (image blk / P, tiles (blk % P) * K ...): writes its partial [nstat][K][M], returns the
// counts seen by the calling thread (device) / by the whole block (host).
template <class Var, class Exec>
CB_HD BadCounts forward_block(Exec& ex, const StatsArgs& a, const Plan& pl, float* sm, double* partial,
                              int64_t blk) {
  const int64_t P = pl.blocks_per_image;
  const int64_t b = blk / P, pb = blk - b * P;
  BadCounts bad{0, 0};
  ex.phase([&](int t) { phase_init(a, pl, sm, b, nullptr, t); });
  for (int k = 0; k < pl.tiles_per_block; ++k) {
    const int64_t n0 = (pb * pl.tiles_per_block + k) * pl.tile;
    if (n0 >= a.N) break;  // uniform across the block
    const int valid = static_cast<int>(a.N - n0 < pl.tile ? a.N - n0 : pl.tile);
    ex.phase([&](int t) { bad.labels += phase_load<Var::INK, Var::MULTI>(a, pl, sm, b, n0, valid, t); });
    ex.phase([&](int t) { phase_activate(a, pl, sm, valid, t); });
    ex.phase([&](int t) { bad.nonfinite += phase_accumulate<Var::MODE, Var::MULTI, Var::MOM>(a, pl, sm, valid, t); });
  }
  double* out = partial + blk * pl.nstat * a.K * a.M;
  ex.phase([&](int t) { phase_write_partial(a, pl, sm, out, t); });
  return bad;
}

template <class Var, class Exec>
CB_HD void backward_block(Exec& ex, const StatsArgs& a, const Plan& pl, float* sm, const GradPtrs& g, void* grad,
                          int64_t blk) {
  const int64_t P = pl.blocks_per_image;
  const int64_t b = blk / P, pb = blk - b * P;
  const int64_t km = a.K * a.M, krm = km * a.R;
  ex.phase([&](int t) { phase_init(a, pl, sm, b, &g, t); });
  GradView gv;
  if (pl.grads_in_smem) {
    const float* d = sm + pl.off_grads;
    gv = GradView{d, d + km, d + 2 * km, d + 2 * km + krm, d + 3 * km + krm};
  } else {
    gv = GradView{g.count + b * km, g.sum_p + b * km, g.sum_y + b * krm, Var::MOM ? g.sum_p2 + b * km : nullptr,
                  Var::MOM ? g.sum_py + b * km : nullptr};
  }
  for (int k = 0; k < pl.tiles_per_block; ++k) {
    const int64_t n0 = (pb * pl.tiles_per_block + k) * pl.tile;
    if (n0 >= a.N) break;  // uniform across the block
    const int valid = static_cast<int>(a.N - n0 < pl.tile ? a.N - n0 : pl.tile);
    ex.phase([&](int t) { phase_load<Var::INK, Var::MULTI>(a, pl, sm, b, n0, valid, t); });
    ex.phase([&](int t) {
      phase_backward<Var::INK, Var::MODE, Var::MULTI, Var::MOM>(a, pl, sm, gv, grad, b, n0, valid, t);
    });
  }
}

}  // namespace calibops_cuda
