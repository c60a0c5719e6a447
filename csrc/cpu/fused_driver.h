// Drivers of the fused hard path (fused_front.h, fused_hard.h): the tile loops of one (image, chunk) task, the
// histogram layout and the fixed-order merge. Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

#if defined(__GNUC__) || defined(__clang__)
typedef double v2d __attribute__((vector_size(16), aligned(8)));
static inline void pair_one(double* h, i32 j, const double* v) {
  *reinterpret_cast<v2d*>(h + 2 * j) += *reinterpret_cast<const v2d*>(v);
}
#else
static inline void pair_one(double* h, i32 j, const double* v) {
  h[2 * j] += v[0];
  h[2 * j + 1] += v[1];
}
#endif

// (count, sum_p) of one class row into h [copies][M + 2][2]; voxel i goes to copy i % copies.
static void scatter_pairs(const Problem& pb, const double* __restrict pk, const i32* __restrict idx,
                          double* __restrict h, i64 n) {
  const i64 stride = (pb.M + 2) * 2;
  i64 i = 0;
  if (pb.copies == 8) {
    for (; i + 8 <= n; i += 8) {
      pair_one(h, idx[i], pk + 2 * i);
      pair_one(h + stride, idx[i + 1], pk + 2 * i + 2);
      pair_one(h + 2 * stride, idx[i + 2], pk + 2 * i + 4);
      pair_one(h + 3 * stride, idx[i + 3], pk + 2 * i + 6);
      pair_one(h + 4 * stride, idx[i + 4], pk + 2 * i + 8);
      pair_one(h + 5 * stride, idx[i + 5], pk + 2 * i + 10);
      pair_one(h + 6 * stride, idx[i + 6], pk + 2 * i + 12);
      pair_one(h + 7 * stride, idx[i + 7], pk + 2 * i + 14);
    }
  }
  for (; i < n; ++i) pair_one(h + (i & (pb.copies - 1)) * stride, idx[i], pk + 2 * i);
}

// Integer labels: sum_y[r][k][j] counts the voxels whose rater-r label is row k's target (marginal: labelled k;
// top-label: label == argmax) and whose row-k bin is j, so one integer increment per voxel and rater (into hy
// [copies][R][K][M + 2], at the slot from hard_front_tile / top_front_tile) replaces K float additions.
static void count_labels(const Problem& pb, const i32* __restrict yb, i64* __restrict hy, i64 n) {
  const i64 stride = pb.R * pb.K * (pb.M + 2);
  i64 i = 0;
  if (pb.copies == 8) {
    for (; i + 8 <= n; i += 8) {
      hy[yb[i]] += 1;
      hy[stride + yb[i + 1]] += 1;
      hy[2 * stride + yb[i + 2]] += 1;
      hy[3 * stride + yb[i + 3]] += 1;
      hy[4 * stride + yb[i + 4]] += 1;
      hy[5 * stride + yb[i + 5]] += 1;
      hy[6 * stride + yb[i + 6]] += 1;
      hy[7 * stride + yb[i + 7]] += 1;
    }
  }
  for (; i < n; ++i) hy[(i & (pb.copies - 1)) * stride + yb[i]] += 1;
}

// The statistics of one (image, chunk) task. MOM (moments): labels scatter (1, q, q², q·ȳ) quads per statistic row
// instead of the (1, q) pairs (sum_y still from the integer label counts); dense targets the generic entry
// vectors (pack_general). Every slot sums the same float64 terms in the same order as the generic path.
template <int CC, bool MOM>
static i64 forward_hard_fused_t(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch,
                                double* hist, i64* nonfinite_out) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C, N = pb.N, M = pb.M, M2 = M + 2, Q = pb.copies, R = pb.R;
  const i64 K = pb.K, NS = pb.NS;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  i32* nfrow = reinterpret_cast<i32*>(scratch + L.tn);
  double* pk = reinterpret_cast<double*>(scratch + L.pk);
  HardTables tabs;
  const HardCtx k = hard_ctx(pb, tabs);
  // hist: labels: (count, sum_p) pairs [K][Q][M2][2] (MOM: (count, sum_p, sum_p2, sum_py) quads [K][Q][M2][4])
  // then label counts [Q][R][K][M2] (int64); dense (marginal): the generic entry vectors [C][Q][M2][W] (W = 4
  // without moments). Both fit hist_doubles().
  constexpr i64 PW = MOM ? 4 : 2;  // doubles per (row, bin) entry of the labels' float histogram
  const i64 W = pb.W;
  double* hp = hist;
  i64* hy = reinterpret_cast<i64*>(hist + K * Q * M2 * PW);
  const i64 hsize = pb.labels ? K * Q * M2 * PW + Q * R * K * M2 : C * Q * M2 * W;
  for (i64 q = 0; q < hsize; ++q) hist[q] = 0.0;
  if (!pb.labels && !MOM) pack_init(pk, T);
  const float* in32 = static_cast<const float*>(pb.input);

  i64 bad = 0, nf_top = 0;
  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    const float* src = x;
    i64 ss = T;
    if (pb.in_kind == kF32) {
      src = in32 + b * C * N + i0;
      ss = N;
    } else {
      for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
    }
    if (pb.labels) {
      bad += load_labels(pb, b, i0, n, lab);
      // Sub-blocks of kSub voxels: (1, q) pairs of every row and the bins, then the scatters, all in L1.
      for (i64 s0 = 0; s0 < n; s0 += kSub) {
        const i64 ns = n - s0 < kSub ? n - s0 : kSub;
        if (pb.top) {
          top_front_tile<CC, MOM>(k, pb, src + s0, ss, lab + s0, bins + s0, pk, nfrow + s0, ns);
          if (MOM)
            scatter_row<false, 1>(pb, pk, bins + s0, nullptr, hp, ns);
          else
            scatter_pairs(pb, pk, bins + s0, hp, ns);
          for (i64 v = 0; v < ns; ++v) nf_top += nfrow[s0 + v];
        } else {
          if (CC > 0 && R == 1)  // (C = 16 at run time measured more instructions with R = 1 compiled in)
            hard_front_tile<CC, true, true, MOM>(k, pb, src + s0, ss, lab + s0, nullptr, bins + s0, pk, PW * kSub,
                                                 ns);
          else
            hard_front_tile<CC, true, false, MOM>(k, pb, src + s0, ss, lab + s0, nullptr, bins + s0, pk, PW * kSub,
                                                  ns);
          for (i64 c = 0; c < C; ++c) {
            if (MOM)
              scatter_row<false, 1>(pb, pk + c * 4 * kSub, bins + c * T + s0, nullptr, hp + c * Q * M2 * 4, ns);
            else
              scatter_pairs(pb, pk + c * 2 * kSub, bins + c * T + s0, hp + c * Q * M2 * 2, ns);
          }
        }
        for (i64 r = 0; r < R; ++r) count_labels(pb, lab + r * T + s0, hy, ns);
      }
    } else {
      hard_front_tile<CC, false>(k, pb, src, ss, nullptr, x, bins, nullptr, 0, n);
      for (i64 c = 0; c < C; ++c) {
        load_float_row(pb.target, pb.target_kind, (b * C + c) * N + i0, n, y + c * T);
        if (MOM) {
          pack_general(pb, x + c * T, nullptr, static_cast<i32>(c), nullptr, y + c * T, pk, n);
          scatter_row<false, 2>(pb, pk, bins + c * T, nullptr, hist + c * Q * M2 * W, n);  // dense: R = 1, W = 8
        } else {
          pack_row(x + c * T, y + c * T, pk, n);
          scatter_row<false, 1>(pb, pk, bins + c * T, nullptr, hist + c * Q * M2 * 4, n);
        }
      }
    }
  }
  // Merge the interleaved copies in a fixed order. Marginal: the counts of slot M + 1 are the non-finite entries.
  if (pb.top) {
    *nonfinite_out = nf_top;
  } else {
    double nf = 0.0;
    for (i64 c = 0; c < C; ++c)
      for (i64 q = 0; q < Q; ++q)
        nf += pb.labels ? hp[((c * Q + q) * M2 + M + 1) * PW] : hist[((c * Q + q) * M2 + M + 1) * W];
    *nonfinite_out = static_cast<i64>(nf);
  }
  for (i64 r0 = 0; r0 < K; ++r0)
    for (i64 j = 0; j < M; ++j) {
      double* o = out + (r0 * M + j) * NS;
      if (pb.labels) {
        double acc[PW] = {};
        for (i64 q = 0; q < Q; ++q)
          for (i64 s = 0; s < PW; ++s) acc[s] += hp[((r0 * Q + q) * M2 + j) * PW + s];
        o[0] = acc[0];
        o[1] = acc[1];
        for (i64 r = 0; r < R; ++r) {
          double y0 = 0.0;
          for (i64 q = 0; q < Q; ++q) y0 += static_cast<double>(hy[((q * R + r) * K + r0) * M2 + j]);
          o[2 + r] = y0;
        }
        if (MOM) {
          o[2 + R] = acc[2];
          o[3 + R] = acc[3];
        }
      } else {
        for (i64 s = 0; s < NS; ++s) {
          double acc = 0.0;
          for (i64 q = 0; q < Q; ++q) acc += hist[((r0 * Q + q) * M2 + j) * W + s];
          o[s] = acc;
        }
      }
    }
  return bad;
}

// MOM: with the second moments' terms (labels, at most kMaxFusedMomR raters).
template <int CC, bool TOP, bool MOM>
static void backward_hard_fused_t(const Problem& pb, const float* grad_sum_p, const float* grad_sum_p2,
                                  const float* grad_sum_py, void* grad, i64 b, i64 begin, i64 end, float* scratch) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C, N = pb.N, M = pb.M, K = pb.K;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* g = scratch + L.g;
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  HardTables tabs;
  const HardCtx k = hard_ctx(pb, tabs);
  // Per statistic row: K0[j] = G_p[b, k, j] for j < M, 0 for the discarded slots M (masked), M + 1 (non-finite).
  alignas(64) float k0f[kMaxFusedC][32];
  Tab k0[kMaxFusedC];
  for (i64 r = 0; r < K; ++r) {
    for (i64 j = 0; j < 32; ++j) k0f[r][j] = j < M ? grad_sum_p[(b * K + r) * M + j] : 0.0f;
    k0[r] = make_tab(k0f[r]);
  }
  // MOM: K1 = 2 Gp2[j] (as the generic path: doubled in float64, rounded once) and K4 = Gpy[j].
  alignas(64) float k1f[MOM ? kMaxFusedC : 1][32], k4f[MOM ? kMaxFusedC : 1][32];
  Tab k1[MOM ? kMaxFusedC : 1], k4[MOM ? kMaxFusedC : 1];
  MomTabs mt{k1, k4, pb.R, T, 1.0f / static_cast<float>(pb.R)};
  if (MOM)
    for (i64 r = 0; r < K; ++r) {
      for (i64 j = 0; j < 32; ++j) {
        k1f[r][j] = j < M ? static_cast<float>(2.0 * grad_sum_p2[(b * K + r) * M + j]) : 0.0f;
        k4f[r][j] = j < M ? grad_sum_py[(b * K + r) * M + j] : 0.0f;
      }
      k1[r] = make_tab(k1f[r]);
      k4[r] = make_tab(k4f[r]);
    }
  const MomTabs* mp = MOM ? &mt : nullptr;
  const float* in32 = static_cast<const float*>(pb.input);
  float* out32 = static_cast<float*>(grad);
  // A gradient much larger than the caches is written with non-temporal stores (no read-for-ownership of the
  // fresh buffer: a third less memory traffic); needs every row start aligned to the vector width.
  const bool stream = VL > 1 && pb.in_kind == kF32 && pb.B * C * N >= kStreamMinFloats && N % VL == 0 &&
                      reinterpret_cast<uintptr_t>(grad) % (VL * sizeof(float)) == 0;
  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    if (pb.labels) load_labels(pb, b, i0, n, lab);
    const i32* lp = pb.labels ? lab : nullptr;
    if (pb.in_kind == kF32) {
      float* o = out32 + b * C * N + i0;
      if (stream)
        hard_back_tile<CC, TOP, true, MOM>(k, pb, k0, mp, in32 + b * C * N + i0, N, lp, o, N, n);
      else
        hard_back_tile<CC, TOP, false, MOM>(k, pb, k0, mp, in32 + b * C * N + i0, N, lp, o, N, n);
    } else {
      for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
      hard_back_tile<CC, TOP, false, MOM>(k, pb, k0, mp, x, T, lp, g, T, n);
      for (i64 c = 0; c < C; ++c) store_row(grad, pb.in_kind, (b * C + c) * N + i0, n, g + c * T);
    }
  }
  if (stream) stream_fence();
}

// Specialised for the usual class counts (the class loops unroll, p stays in registers).
template <bool MOM>
static i64 forward_hard_fused_m(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch,
                                double* hist, i64* nonfinite_out) {
  switch (pb.C) {
    case 2:
      return forward_hard_fused_t<2, MOM>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
    case 3:
      return forward_hard_fused_t<3, MOM>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
    case 4:
      return forward_hard_fused_t<4, MOM>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
    default:
      return forward_hard_fused_t<0, MOM>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
  }
}

static i64 forward_hard_fused(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch,
                              double* hist, i64* nonfinite_out) {
  if (pb.moments) return forward_hard_fused_m<true>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
  return forward_hard_fused_m<false>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
}

template <bool TOP, bool MOM>
static void backward_hard_fused_c(const Problem& pb, const float* gp, const float* gp2, const float* gpy, void* grad,
                                  i64 b, i64 begin, i64 end, float* scratch) {
  switch (pb.C) {
    case 2:
      return backward_hard_fused_t<2, TOP, MOM>(pb, gp, gp2, gpy, grad, b, begin, end, scratch);
    case 3:
      return backward_hard_fused_t<3, TOP, MOM>(pb, gp, gp2, gpy, grad, b, begin, end, scratch);
    case 4:
      return backward_hard_fused_t<4, TOP, MOM>(pb, gp, gp2, gpy, grad, b, begin, end, scratch);
    default:
      return backward_hard_fused_t<0, TOP, MOM>(pb, gp, gp2, gpy, grad, b, begin, end, scratch);
  }
}

static void backward_hard_fused(const Problem& pb, const float* gp, const float* gp2, const float* gpy, void* grad,
                                i64 b, i64 begin, i64 end, float* scratch) {
  if (pb.moments) {
    if (pb.top)
      backward_hard_fused_c<true, true>(pb, gp, gp2, gpy, grad, b, begin, end, scratch);
    else
      backward_hard_fused_c<false, true>(pb, gp, gp2, gpy, grad, b, begin, end, scratch);
  } else if (pb.top) {
    backward_hard_fused_c<true, false>(pb, gp, nullptr, nullptr, grad, b, begin, end, scratch);
  } else {
    backward_hard_fused_c<false, false>(pb, gp, nullptr, nullptr, grad, b, begin, end, scratch);
  }
}
