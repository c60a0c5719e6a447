// Generic forward of the CPU kernels: every scheme, mode, rater count and moments setting, one tile of [C][T] rows
// at a time: load -> activation -> (top-label: max / argmax row) -> scheme states -> per statistic row, one float64
// entry vector per voxel, (1, q, y_0 .. y_{R-1}[, q², q·ȳ]) padded to W doubles, scattered with the scheme's
// membership weights into small per-worker histograms. The usual configuration (R = 1, moments off: W = 4, the
// vector (1, q, y, 0)) is one 256-bit load-add-store per voxel and bin. Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

// pk[4 i .. 4 i + 3] = (1, p_i, y_i, 0) in float64 (W = 4). The constant lanes are written once per call
// (pack_init), each row writes p and y.
static void pack_init(double* __restrict pk, i64 T) {
  for (i64 i = 0; i < T; ++i) {
    pk[4 * i] = 1.0;
    pk[4 * i + 3] = 0.0;
  }
}

static void pack_row(const float* __restrict p, const float* __restrict y, double* __restrict pk, i64 n) {
#if CALIBOPS_ISA_LEVEL >= 2
  // (p, y) pairs of 8 voxels -> lanes 1, 2 of 8 packed entries: one permute and one masked store per 2 voxels.
  const __m512i idx = _mm512_set_epi64(0, 9, 1, 0, 0, 8, 0, 0);  // lanes 1, 2: p, y of voxel 0; 5, 6: voxel 1
  i64 i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d pv = _mm512_cvtps_pd(_mm256_loadu_ps(p + i));
    const __m512d yv = _mm512_cvtps_pd(_mm256_loadu_ps(y + i));
    for (int k = 0; k < 4; ++k) {
      const __m512i sh = _mm512_add_epi64(idx, _mm512_set1_epi64(2 * k));
      _mm512_mask_storeu_pd(pk + 4 * (i + 2 * k), 0x66, _mm512_permutex2var_pd(pv, sh, yv));
    }
  }
  for (; i < n; ++i) {
    pk[4 * i + 1] = static_cast<double>(p[i]);
    pk[4 * i + 2] = static_cast<double>(y[i]);
  }
#else
  for (i64 i = 0; i < n; ++i) {
    pk[4 * i + 1] = static_cast<double>(p[i]);
    pk[4 * i + 2] = static_cast<double>(y[i]);
  }
#endif
}

// General entry vectors (R > 1 or moments): (1, q, y_0 .. y_{R-1}[, q², q·ȳ], 0 ...) with ȳ the rater mean. Labels: y_r =
// [lab_r == class] with class = cls (marginal) or ta[i] (top-label, ta != nullptr); dense: y_0 = y[i] (the row's
// target, from target_row).
static void pack_general(const Problem& pb, const float* __restrict q, const i32* __restrict lab, i32 cls,
                         const i32* __restrict ta, const float* __restrict y, double* __restrict pk, i64 n) {
  const i64 W = pb.W, R = pb.R, T = pb.tile;
  const double inv_r = 1.0 / static_cast<double>(R);
  for (i64 i = 0; i < n; ++i) {
    double* v = pk + i * W;
    const double qd = static_cast<double>(q[i]);
    const i32 k = ta != nullptr ? ta[i] : cls;
    double ys = 0.0;
    v[0] = 1.0;
    v[1] = qd;
    if (pb.labels) {
      for (i64 r = 0; r < R; ++r) {
        const double yr = lab[r * T + i] == k ? 1.0 : 0.0;
        v[2 + r] = yr;
        ys += yr;
      }
    } else {
      ys = static_cast<double>(y[i]);
      v[2] = ys;
    }
    i64 s = 2 + R;
    if (pb.moments) {
      v[s++] = qd * qd;
      v[s++] = qd * (ys * inv_r);
    }
    for (; s < W; ++s) v[s] = 0.0;
  }
}

// h[j W .. j W + W) += w * v (NQ quads of doubles; NQ = 0: pb.W / 4 at run time).
#if defined(__GNUC__) || defined(__clang__)
typedef double v4d __attribute__((vector_size(32), aligned(8)));
template <int NQ>
static inline void hard_one(double* hc, i32 j, const double* v, i64 nq) {
  const i64 Q = NQ > 0 ? NQ : nq;
  for (i64 k = 0; k < Q; ++k)
    *reinterpret_cast<v4d*>(hc + (j * Q + k) * 4) += *reinterpret_cast<const v4d*>(v + 4 * k);
}
template <int NQ>
static inline void soft_one(double* hc, i32 lo, float wl, const double* v, i64 nq) {
  const i64 Q = NQ > 0 ? NQ : nq;
  const double w = static_cast<double>(wl);
  double* h = hc + lo * Q * 4;  // bin lo; bin lo + 1 at h + 4 Q (one address for both, no 32-bit lo + 1)
  for (i64 k = 0; k < Q; ++k) {
    const v4d pv = *reinterpret_cast<const v4d*>(v + 4 * k);
    *reinterpret_cast<v4d*>(h + 4 * k) += pv * w;
    *reinterpret_cast<v4d*>(h + 4 * (Q + k)) += pv * (1.0 - w);  // "the rest" of the unit weight
  }
}
#else
template <int NQ>
static inline void hard_one(double* hc, i32 j, const double* v, i64 nq) {
  const i64 W = 4 * (NQ > 0 ? NQ : nq);
  for (i64 k = 0; k < W; ++k) hc[j * W + k] += v[k];
}
template <int NQ>
static inline void soft_one(double* hc, i32 lo, float wl, const double* v, i64 nq) {
  const i64 W = 4 * (NQ > 0 ? NQ : nq);
  const double w = static_cast<double>(wl);
  double* h = hc + lo * W;
  for (i64 k = 0; k < W; ++k) h[k] += v[k] * w;
  for (i64 k = 0; k < W; ++k) h[W + k] += v[k] * (1.0 - w);
}
#endif

// One statistic row of a tile into its histograms h [copies][M + 2][W]; voxel i goes to copy i % copies, so
// consecutive voxels in one bin do not wait on each other's stores. Hard: idx = bin; soft: idx = low bin, wl =
// its weight.
template <bool SOFT, int NQ>
static void scatter_row(const Problem& pb, const double* __restrict pk, const i32* __restrict idx,
                        const float* __restrict wl, double* __restrict h, i64 n) {
  // W compile-time for the usual entry width (NQ = 1): the per-voxel entry address pk + W k is then a constant offset.
  const i64 W = NQ > 0 ? 4 * NQ : pb.W, nq = W / 4, stride = (pb.M + 2) * W;
  i64 i = 0;
#define CALIBOPS_ONE(hc, k)                                   \
  if (SOFT)                                                   \
    soft_one<NQ>(hc, idx[k], wl[k], pk + W * (k), nq);        \
  else                                                        \
    hard_one<NQ>(hc, idx[k], pk + W * (k), nq)
  if (pb.copies == 8) {
    double *h0 = h, *h1 = h + stride, *h2 = h + 2 * stride, *h3 = h + 3 * stride;
    double *h4 = h + 4 * stride, *h5 = h + 5 * stride, *h6 = h + 6 * stride, *h7 = h + 7 * stride;
    for (; i + 8 <= n; i += 8) {
      CALIBOPS_ONE(h0, i);
      CALIBOPS_ONE(h1, i + 1);
      CALIBOPS_ONE(h2, i + 2);
      CALIBOPS_ONE(h3, i + 3);
      CALIBOPS_ONE(h4, i + 4);
      CALIBOPS_ONE(h5, i + 5);
      CALIBOPS_ONE(h6, i + 6);
      CALIBOPS_ONE(h7, i + 7);
    }
  }
  for (; i < n; ++i) {
    CALIBOPS_ONE(h + (i & (pb.copies - 1)) * stride, i);
  }
#undef CALIBOPS_ONE
}

// One target row of a tile (W = 4 packing): labels: y[i] = [lab[i] == class] with class = cls or ta[i]; dense
// top-label: y[i] = target row ta[i] (rows yd [C][T]); dense marginal rows are used as loaded.
static const float* target_row(const Problem& pb, const i32* __restrict lab, i32 cls, const i32* __restrict ta,
                               const float* __restrict yd, float* __restrict out, i64 n) {
  if (!pb.labels) {
    if (ta == nullptr) return yd + cls * pb.tile;
    for (i64 i = 0; i < n; ++i) out[i] = yd[ta[i] * pb.tile + i];
    return out;
  }
  if (ta == nullptr)
    for (i64 i = 0; i < n; ++i) out[i] = lab[i] == cls ? 1.0f : 0.0f;
  else
    for (i64 i = 0; i < n; ++i) out[i] = lab[i] == ta[i] ? 1.0f : 0.0f;
  return out;
}

template <bool SOFT, int NQ>
static i64 forward_generic_t(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch,
                             double* hist, i64* nonfinite_out) {
  const i64 T = pb.tile, C = pb.C, N = pb.N, M = pb.M, M2 = M + 2, S = table_size(pb), K = pb.K, W = pb.W;
  const i64 NS = pb.NS, copies = pb.copies;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  float* tq = scratch + L.tq;
  i32* ta = reinterpret_cast<i32*>(scratch + L.ta);
  i32* tn = reinterpret_cast<i32*>(scratch + L.tn);
  float* ytmp = scratch + L.g;  // one target row (the gradient rows are unused in the forward)
  float* ea = scratch + L.ea;
  float* eb = scratch + L.eb;
  const SchemeTables st = scheme_tables_at(pb, scratch, L);
  float* chi_f = scratch + L.ftab;  // float copies of chi and id for the vectorised weights
  float* id_f = chi_f + S;
  if (SOFT) {
    scheme_tables(pb, st);
    for (i64 u = 0; u < S; ++u) {
      chi_f[u] = static_cast<float>(st.chi[u]);
      id_f[u] = static_cast<float>(st.id[u]);
    }
  }
  const i64 hsize = K * copies * M2 * W;
  for (i64 k = 0; k < hsize; ++k) hist[k] = 0.0;
  double* pk = reinterpret_cast<double*>(scratch + L.pk);
  const bool simple = pb.R == 1 && !pb.moments;  // entry vector (1, q, y, 0)
  if (simple) pack_init(pk, T);

  i64 bad = 0, nf_top = 0;
  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
    if (pb.labels)
      bad += load_labels(pb, b, i0, n, lab);
    else
      for (i64 c = 0; c < C; ++c) load_float_row(pb.target, pb.target_kind, (b * C + c) * N + i0, n, y + c * T);
    const i32* used = pb.labels ? lab : nullptr;
    activate(pb, x, scratch + L.rowa, scratch + L.rowb, n);
    if (pb.top) nf_top += top_rows(pb, x, used, tq, ta, tn, n);
    compute_states(pb, pb.top ? tq : x, K, used, bins, ea, eb, n);
    for (i64 k = 0; k < K; ++k) {
      double* h = hist + k * copies * M2 * W;
      const float* q = pb.top ? tq : x + k * T;
      const i32* tak = pb.top ? ta : nullptr;
      const i32 cls = static_cast<i32>(k);
      if (simple)
        pack_row(q, target_row(pb, lab, cls, tak, y, ytmp, n), pk, n);
      else
        pack_general(pb, q, lab, cls, tak, pb.labels ? nullptr : target_row(pb, lab, cls, tak, y, ytmp, n), pk, n);
      if (SOFT) {
        gather_row(chi_f, S, bins + k * T, ea, n);
        gather_row(id_f, S, bins + k * T, eb, n);
        soft_weights_row(pb, q, bins + k * T, ea, eb, ea, reinterpret_cast<i32*>(eb), n);
        scatter_row<true, NQ>(pb, pk, reinterpret_cast<const i32*>(eb), ea, h, n);
      } else {
        scatter_row<false, NQ>(pb, pk, bins + k * T, nullptr, h, n);
      }
    }
  }
  // Merge the interleaved copies in a fixed order. Marginal: the counts of slot M + 1 are the non-finite entries.
  for (i64 k = 0; k < K; ++k)
    for (i64 j = 0; j < M; ++j)
      for (i64 s = 0; s < NS; ++s) {
        double acc = 0.0;
        for (i64 q = 0; q < copies; ++q) acc += hist[((k * copies + q) * M2 + j) * W + s];
        out[(k * M + j) * NS + s] = acc;
      }
  if (pb.top) {
    *nonfinite_out = nf_top;
  } else {
    double nf = 0.0;
    for (i64 k = 0; k < K; ++k)
      for (i64 q = 0; q < copies; ++q) nf += hist[((k * copies + q) * M2 + M + 1) * W];
    *nonfinite_out = static_cast<i64>(nf);
  }
  return bad;
}

static i64 forward_generic(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch, double* hist,
                           i64* nonfinite_out) {
  if (pb.W == 4)
    return pb.soft ? forward_generic_t<true, 1>(pb, b, begin, end, out, scratch, hist, nonfinite_out)
                   : forward_generic_t<false, 1>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
  return pb.soft ? forward_generic_t<true, 0>(pb, b, begin, end, out, scratch, hist, nonfinite_out)
                 : forward_generic_t<false, 0>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
}
