// Generic backward of the CPU kernels: every scheme, mode, rater count and moments setting (formula:
// docs/kernel_contract.md, "Backward"). Per statistic row and scheme state u, with the membership
// w(q) = A - id q on the low bin lo and 1 - w on lo + 1 (A = base + id chi; schemes.h), d loss / d q is
//   g = K0 + q (K1 + q K3) + Σ_r K2_r y_r + ȳ (K4 + q K5)
//   K0 = Gp[hi] + A (Gp[lo] - Gp[hi]) + id (Gc[hi] - Gc[lo])     K1 = 2 id (Gp[hi] - Gp[lo]) + 2 (A Gp2[lo] + (1 - A) Gp2[hi])
//   K2_r = id (Gy_r[hi] - Gy_r[lo])                             K3 = 3 id (Gp2[hi] - Gp2[lo])
//   K4 = Gpy[hi] + A (Gpy[lo] - Gpy[hi])                        K5 = 2 id (Gpy[hi] - Gpy[lo])
// (hard: K0 = Gp[j], K1 = 2 Gp2[j], K4 = Gpy[j], the rest 0). Marginal: g_p[c] = g of row c; top-label:
// g_p[c] = g of the one row when c == argmax, else 0. Then the chain rule through the activation and the mask.
// Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

// Gradient of bin j of the row at offset o (0 for the discarded slots j >= M).
static inline double bin_grad(const float* g, i64 o, i64 j, i64 M) {
  return g != nullptr && j < M ? static_cast<double>(g[o + j]) : 0.0;
}

// Tables [6 + R][K][S] floats: K0, K1, K3, K4, K5, (unused), then K2_r for r = 0 .. R-1. The discarded states
// (masked voxel, non-finite q) have every entry 0.
static void grad_tables(const Problem& pb, i64 b, const float* gc, const float* gp, const float* gy,
                        const float* gp2, const float* gpy, float* tab, const SchemeTables& st) {
  const i64 K = pb.K, M = pb.M, S = table_size(pb), R = pb.R, KS = K * S;
  for (i64 k = 0; k < K; ++k) {
    const i64 o = (b * K + k) * M;
    float *K0 = tab + k * S, *K1 = K0 + KS, *K3 = K1 + KS, *K4 = K3 + KS, *K5 = K4 + KS, *K2 = K5 + 2 * KS;
    for (i64 u = 0; u < S; ++u) {
      const i64 lo = st.lo_of[u], hi = lo + 1;
      if (lo >= M) {  // discarded states
        K0[u] = K1[u] = K3[u] = K4[u] = K5[u] = 0.0f;
        for (i64 r = 0; r < R; ++r) K2[r * KS + u] = 0.0f;
        continue;
      }
      if (!pb.soft) {
        K0[u] = gp[o + lo];
        K1[u] = gp2 != nullptr ? static_cast<float>(2.0 * gp2[o + lo]) : 0.0f;
        K4[u] = gpy != nullptr ? gpy[o + lo] : 0.0f;
        K3[u] = K5[u] = 0.0f;
        for (i64 r = 0; r < R; ++r) K2[r * KS + u] = 0.0f;
        continue;
      }
      const double id = st.id[u], A = st.base[u] + id * st.chi[u];
      const double a = bin_grad(gp, o, lo, M), bb = bin_grad(gp, o, hi, M);
      const double dgc = bin_grad(gc, o, hi, M) - bin_grad(gc, o, lo, M);
      K0[u] = static_cast<float>(bb + (a - bb) * A + id * dgc);
      double k1 = 2.0 * id * (bb - a);  // through w_lo, w_hi and through q itself
      if (pb.moments) {
        const double p2l = bin_grad(gp2, o, lo, M), p2h = bin_grad(gp2, o, hi, M);
        const double pyl = bin_grad(gpy, o, lo, M), pyh = bin_grad(gpy, o, hi, M);
        k1 += 2.0 * (A * p2l + (1.0 - A) * p2h);
        K3[u] = static_cast<float>(3.0 * id * (p2h - p2l));
        K4[u] = static_cast<float>(pyh + A * (pyl - pyh));
        K5[u] = static_cast<float>(2.0 * id * (pyh - pyl));
      } else {
        K3[u] = K4[u] = K5[u] = 0.0f;
      }
      K1[u] = static_cast<float>(k1);
      for (i64 r = 0; r < R; ++r) {
        const i64 oy = ((b * K + k) * R + r) * M;
        K2[r * KS + u] = static_cast<float>(id * (bin_grad(gy, oy, hi, M) - bin_grad(gy, oy, lo, M)));
      }
    }
  }
}

// The usual case (moments off and R = 1 or hard): g = K0[u] (+ K1[u] q + K2[u] y in the soft interior states),
// through vectorised gathers. y: the row's target (soft only).
static void grad_row_simple(const Problem& pb, const float* __restrict q, const float* __restrict y,
                            const i32* __restrict u, const float* K0, const float* K1, const float* K2,
                            float* __restrict g, float* __restrict ea, float* __restrict eb, i64 n) {
  const i64 S = pb.soft ? table_size(pb) : pb.M + 2;  // hard states stop at M + 1
  gather_row(K0, S, u, g, n);
  if (pb.soft) {
    gather_row(K1, S, u, ea, n);
    gather_row(K2, S, u, eb, n);
    // K1 = K2 = 0 outside the interior states 1..M-1: skip the products there so NaN / inf q cannot leak in.
    const i32 M = static_cast<i32>(pb.M);
    for (i64 i = 0; i < n; ++i) {
      const float lin = ea[i] * q[i] + eb[i] * y[i];
      g[i] += soft_interior(u[i], M) ? lin : 0.0f;
    }
  }
}

// Every other case: the full formula per entry (labels: y_r = [lab_r == class], class = cls or ta[i]; dense:
// y_0 = y[i]); 0 for the discarded states.
static void grad_row_full(const Problem& pb, const float* __restrict q, const i32* __restrict lab, i32 cls,
                          const i32* __restrict ta, const float* __restrict y, const i32* __restrict u,
                          const float* tab, i64 k, const SchemeTables& st, float* __restrict g, i64 n) {
  const i64 S = table_size(pb), KS = pb.K * S, R = pb.R, T = pb.tile;
  const float* K0 = tab + k * S;
  const float *K1 = K0 + KS, *K3 = K1 + KS, *K4 = K3 + KS, *K5 = K4 + KS, *K2 = K5 + 2 * KS;
  const float inv_r = 1.0f / static_cast<float>(R);
  const i32 M = static_cast<i32>(pb.M);
  for (i64 i = 0; i < n; ++i) {
    const i32 s = u[i];
    const float qi = q[i];
    const i32 c = ta != nullptr ? ta[i] : cls;
    float ysum = 0.0f, yterm = 0.0f;
    if (pb.labels) {
      for (i64 r = 0; r < R; ++r) {
        const float yr = lab[r * T + i] == c ? 1.0f : 0.0f;
        ysum += yr;
        yterm += K2[r * KS + s] * yr;
      }
    } else {
      ysum = y[i];
      yterm = K2[s] * ysum;
    }
    const float ybar = ysum * inv_r;
    const float v = K0[s] + qi * (K1[s] + qi * K3[s]) + yterm + ybar * (K4[s] + qi * K5[s]);
    g[i] = st.lo_of[s] < M ? v : 0.0f;
  }
}

static void backward_generic(const Problem& pb, const float* gc, const float* gp, const float* gy, const float* gp2,
                             const float* gpy, void* grad, i64 b, i64 begin, i64 end, float* scratch) {
  const i64 T = pb.tile, C = pb.C, N = pb.N, S = table_size(pb), K = pb.K, KS = K * S;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  float* g = scratch + L.g;
  float* rowa = scratch + L.rowa;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  float* tq = scratch + L.tq;
  i32* ta = reinterpret_cast<i32*>(scratch + L.ta);
  float* gq = scratch + L.tn;  // top-label: g of the one row
  float* ytmp = scratch + L.rowb;
  float* tab = scratch + L.ftab;
  const SchemeTables st = scheme_tables_at(pb, scratch, L);
  scheme_tables(pb, st);
  grad_tables(pb, b, gc, gp, gy, gp2, gpy, tab, st);
  const bool simple = !pb.moments && (pb.R == 1 || !pb.soft);
  const bool need_y = pb.soft || pb.moments;

  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
    if (pb.labels)
      load_labels(pb, b, i0, n, lab);
    else if (need_y)
      for (i64 c = 0; c < C; ++c) load_float_row(pb.target, pb.target_kind, (b * C + c) * N + i0, n, y + c * T);
    const i32* used = pb.labels ? lab : nullptr;
    activate(pb, x, rowa, scratch + L.rowb, n);
    if (pb.top) top_rows(pb, x, used, tq, reinterpret_cast<i32*>(ta), reinterpret_cast<i32*>(gq), n);
    compute_states(pb, pb.top ? tq : x, K, used, bins, scratch + L.ea, scratch + L.eb, n);
    for (i64 k = 0; k < K; ++k) {
      const float* q = pb.top ? tq : x + k * T;
      const i32* tak = pb.top ? ta : nullptr;
      float* gk = pb.top ? gq : g + k * T;
      const i32 cls = static_cast<i32>(k);
      if (simple) {
        const float* yk = pb.soft ? target_row(pb, lab, cls, tak, y, ytmp, n) : nullptr;
        grad_row_simple(pb, q, yk, bins + k * T, tab + k * S, tab + KS + k * S, tab + 6 * KS + k * S, gk,
                        scratch + L.ea, scratch + L.eb, n);
      } else {
        // dense: the row's target (top-label: target[a], gathered per voxel); labels: read from lab
        const float* yk = pb.labels ? nullptr : target_row(pb, lab, cls, tak, y, ytmp, n);
        grad_row_full(pb, q, lab, cls, tak, yk, bins + k * T, tab, k, st, gk, n);
      }
    }
    if (pb.top)  // the gradient goes to the argmax class only
      for (i64 c = 0; c < C; ++c) {
        float* __restrict gc_row = g + c * T;
        const i32 ci = static_cast<i32>(c);
        for (i64 i = 0; i < n; ++i) gc_row[i] = ta[i] == ci ? gq[i] : 0.0f;
      }
    // Chain through the activation (in place in g).
    if (pb.activation == 1) {
      for (i64 i = 0; i < n; ++i) rowa[i] = 0.0f;
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        const float* __restrict gcr = g + c * T;
        for (i64 i = 0; i < n; ++i) rowa[i] += p[i] * gcr[i];
      }
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gcr = g + c * T;
        for (i64 i = 0; i < n; ++i) gcr[i] = p[i] * (gcr[i] - rowa[i]);
      }
    } else if (pb.activation == 2) {
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gcr = g + c * T;
        for (i64 i = 0; i < n; ++i) gcr[i] = gcr[i] * (p[i] * (1.0f - p[i]));
      }
    }
    // Unused voxels and non-finite p get 0. With activation 0 the gradient tables already gave exactly 0 for
    // non-finite p; the chain rules above turn that into NaN (0 * NaN), hence the mask. Top-label: a voxel with a
    // non-finite p has q = NaN (discarded state, g = 0): its finite classes keep 0 through the chain (softmax:
    // every p of it is NaN), the non-finite ones are masked here.
    if (pb.labels) {
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gcr = g + c * T;
        for (i64 i = 0; i < n; ++i) gcr[i] = (lab[i] >= 0) & !nonfinite(p[i]) ? gcr[i] : 0.0f;
      }
    } else if (pb.activation != 0 || pb.top) {
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gcr = g + c * T;
        for (i64 i = 0; i < n; ++i) gcr[i] = nonfinite(p[i]) ? 0.0f : gcr[i];
      }
    }
    for (i64 c = 0; c < C; ++c) store_row(grad, pb.in_kind, (b * C + c) * N + i0, n, g + c * T);
  }
}
