// Binning schemes of the CPU kernels (docs/kernel_contract.md, "Binning schemes"): each maps a probability q to a
// state u, and each state to a membership (j, w, dw): weight w in bin j, 1 - w in bin j + 1, dw = dw/dq, with
//     w(q) = base[u] + id[u] * (chi[u] - q),   dw = -id[u]        (SchemeTables, filled once per call)
// so one kernel body (generic_forward.h / generic_backward.h) serves every scheme. A scheme is
//   - a states function: the rows of q of a tile -> states u (vectorised; estimate from q*M, then correct by one
//     step against the given edges, so every backend bins identically), and
//   - a table function: u -> (j = lo_of[u], base, chi, id).
// Every scheme reserves two discarded states at the end: "masked" (the voxel is not used) and "non-finite q"
// (whose whole weight lands in slot M + 1, so that slot's count is the number of non-finite entries). Adding a
// scheme: its two functions here, a case in compute_states / scheme_tables, and its id in csrc/contract_types.h.
// Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

// States per scheme: hard bins 0..M-1, M (masked voxel), M + 1 (non-finite q); soft states 0..M, M + 1 (masked),
// M + 2 (non-finite q). Tables are sized for the larger.
static inline i64 table_size(const Problem& pb) { return pb.M + 3; }

struct SchemeTables {
  i32* lo_of;    // [S] state -> low bin j (M / M + 1 for the discarded states: never merged)
  double* base;  // [S]
  double* chi;   // [S]
  double* id;    // [S]
};

// ---- hard (scheme 0): j = bucketize(q, e[1:], right).clamp(max=M-1), w = 1, dw = 0.
static void hard_states_row(const Problem& pb, const float* __restrict p, i32* __restrict out, float* ea,
                            float* eb, i64 n) {
  const i32 M = static_cast<i32>(pb.M);
  const float Mf = static_cast<float>(pb.M), top = static_cast<float>(pb.M - 1);
  const float* e = pb.edges;
  for (i64 i = 0; i < n; ++i) {
    float q = p[i] * Mf;
    q = q >= 0.0f ? q : 0.0f;  // also maps NaN to 0
    q = q <= top ? q : top;
    out[i] = static_cast<i32>(q);
  }
  gather_row(e, M + 1, out, ea, n);  // e[j0]
  gather_row(e + 1, M, out, eb, n);  // e[j0 + 1]
  if (!pb.right) {
    for (i64 i = 0; i < n; ++i) {
      const i32 j0 = out[i];
      const i32 j = j0 - static_cast<i32>((j0 > 0) & (p[i] <= ea[i])) + static_cast<i32>(p[i] > eb[i]);
      out[i] = nonfinite(p[i]) ? M + 1 : (j < M - 1 ? j : M - 1);
    }
  } else {
    for (i64 i = 0; i < n; ++i) {
      const i32 j0 = out[i];
      const i32 j = j0 - static_cast<i32>((j0 > 0) & (p[i] < ea[i])) + static_cast<i32>(p[i] >= eb[i]);
      out[i] = nonfinite(p[i]) ? M + 1 : (j < M - 1 ? j : M - 1);
    }
  }
}

static void hard_table(const Problem& pb, const SchemeTables& t) {
  for (i64 u = 0; u < table_size(pb); ++u) {
    t.lo_of[u] = static_cast<i32>(u < pb.M + 1 ? u : pb.M + 1);  // M: masked, M + 1: non-finite
    t.base[u] = 1.0;
    t.chi[u] = 0.0;
    t.id[u] = 0.0;
  }
}

// ---- soft (scheme 1, triangular): t = #{k : c[k] < q} - 1 (right: c[k] <= q, so q exactly on a centre takes the
// slope of the interval above it instead of below); state u = t + 1 in 0..M. Interior states 1..M-1: j = t,
// w = (c[t+1] - q) / (c[t+1] - c[t]); u = 0 (below the first centre): all weight in bin 0; u = M (above the
// last): all in bin M - 1; M == 1: all in bin 0.
static inline i32 soft_low_bin(i32 u, i32 M) {
  const i32 top = M - 2 > 0 ? M - 2 : 0;
  const i32 l = u - 1 > 0 ? u - 1 : 0;
  return u > M ? M : (l < top ? l : top);
}

static inline bool soft_interior(i32 u, i32 M) { return static_cast<u32>(u - 1) < static_cast<u32>(M - 1); }

// w_lo outside the interior: 1 below the first centre, for M = 1 and for masked voxels (u = M + 1: weight in the
// discarded slot M); 0 above the last centre and for non-finite q (u = M + 2: weight in the discarded slot M + 1).
static inline float soft_outside_weight(i32 u, i32 M) {
  return ((u == 0) | (u == M + 1) | ((M == 1) & (u <= M))) ? 1.0f : 0.0f;
}

static void soft_states_row(const Problem& pb, const float* __restrict p, i32* __restrict out, float* ea, float* eb,
                            i64 n) {
  const i32 M = static_cast<i32>(pb.M);
  const float Mf = static_cast<float>(pb.M), top = static_cast<float>(pb.M - 1);
  i32* ia = reinterpret_cast<i32*>(ea);
  i32* ib = reinterpret_cast<i32*>(eb);
  for (i64 i = 0; i < n; ++i) {
    float q = p[i] * Mf - 0.5f;
    q = q >= -1.0f ? q : -1.0f;  // also maps NaN to -1
    q = q <= top ? q : top;
    const i32 t0 = static_cast<i32>(q + 1.0f) - 1;  // floor, since q + 1 >= 0
    out[i] = t0;
    ia[i] = t0 >= 0 ? t0 : 0;
    ib[i] = t0 + 1 < M ? t0 + 1 : M - 1;
  }
  gather_row(pb.edges, M, ia, ea, n);  // c[t0], in place
  gather_row(pb.edges, M, ib, eb, n);  // c[t0 + 1], in place
  if (!pb.right) {
    for (i64 i = 0; i < n; ++i) {
      const i32 t0 = out[i];
      const i32 dec = static_cast<i32>((t0 >= 0) & !(ea[i] < p[i]));
      const i32 inc = static_cast<i32>((t0 + 1 < M) & (eb[i] < p[i]));
      out[i] = nonfinite(p[i]) ? M + 2 : t0 - dec + inc + 1;
    }
  } else {
    for (i64 i = 0; i < n; ++i) {
      const i32 t0 = out[i];
      const i32 dec = static_cast<i32>((t0 >= 0) & !(ea[i] <= p[i]));
      const i32 inc = static_cast<i32>((t0 + 1 < M) & (eb[i] <= p[i]));
      out[i] = nonfinite(p[i]) ? M + 2 : t0 - dec + inc + 1;
    }
  }
}

static void soft_table(const Problem& pb, const SchemeTables& t) {
  const float* c = pb.edges;
  const i32 M = static_cast<i32>(pb.M);
  for (i32 u = 0; u <= M + 2; ++u) {
    t.lo_of[u] = soft_low_bin(u, M);
    t.base[u] = soft_outside_weight(u, M);
    t.chi[u] = 0.0;
    t.id[u] = 0.0;
    if (soft_interior(u, M)) {
      const i32 k = u - 1;
      t.chi[u] = static_cast<double>(c[k + 1]);
      t.id[u] = 1.0 / (static_cast<double>(c[k + 1]) - static_cast<double>(c[k]));
    }
  }
}

// ---- dispatch.

// States of `rows` rows of q (row r at q + r * T) for the voxels of the tile; voxels with lab[i] < 0 (lab may be
// nullptr: every voxel used) get the masked state.
static void compute_states(const Problem& pb, const float* __restrict q, i64 rows, const i32* __restrict lab,
                           i32* __restrict states, float* ea, float* eb, i64 n) {
  const i64 T = pb.tile;
  const i32 masked = static_cast<i32>(pb.soft ? pb.M + 1 : pb.M);
  for (i64 r = 0; r < rows; ++r) {
    i32* __restrict out = states + r * T;
    if (pb.soft)
      soft_states_row(pb, q + r * T, out, ea, eb, n);
    else
      hard_states_row(pb, q + r * T, out, ea, eb, n);
    if (lab != nullptr)
      for (i64 i = 0; i < n; ++i) out[i] = lab[i] >= 0 ? out[i] : masked;
  }
}

static void scheme_tables(const Problem& pb, const SchemeTables& t) {
  if (pb.soft)
    soft_table(pb, t);
  else
    hard_table(pb, t);
}

// Soft: the membership weight of the low bin for a row of states (vectorised): wl[i] = w(q_i), lo[i] = j. chi / id are
// the float copies of the tables gathered per entry (they may alias wl / lo).
static void soft_weights_row(const Problem& pb, const float* __restrict p, const i32* __restrict u, const float* chi,
                        const float* id, float* wl, i32* lo, i64 n) {
  const i32 M = static_cast<i32>(pb.M);
  for (i64 i = 0; i < n; ++i) {
    const i32 s = u[i];
    const float w = soft_interior(s, M) ? (chi[i] - p[i]) * id[i] : soft_outside_weight(s, M);
    wl[i] = w;
    lo[i] = soft_low_bin(s, M);
  }
}
