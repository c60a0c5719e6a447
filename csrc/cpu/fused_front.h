// Front end of the fused hard path (hard binning, C <= 16 classes, M <= 30 bins: the usual segmentation case; with
// or without moments): one register-resident pass per group of VL voxels, load the C class values -> activation ->
// hard bin of every class (marginal) or of the confidence max_c p (top-label). The generic path makes ~15 passes
// over [C][T] tile rows instead. The arithmetic is the same sequence of IEEE operations as the generic path's
// (no FMA, same association), written once over the SIMD shim, so every build and both paths agree bitwise
// (tests/test_cpu_backend.py checks it). Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

constexpr int kMaxFusedC = 16;
constexpr i64 kStreamMinFloats = i64{1} << 20;  // 4 MiB of float32 gradient

// Base build (VL = 1): only on request (fused == 2); its scalar code is slower than the generic path there.
// Top-label with a dense target takes the generic path. The forward: with or without moments; the backward with
// moments: integer labels of at most 8 raters (the ȳ of its second-moment term; fused_hard.h's kMaxFusedMomR).
static bool fused_hard_fwd_ok(const Problem& pb) {
  return pb.fused >= (VL > 1 ? 1 : 2) && !pb.soft && (!pb.top || pb.labels) && pb.C >= 1 && pb.C <= kMaxFusedC &&
         pb.M + 2 <= 32;
}
static bool fused_hard_bwd_ok(const Problem& pb) {
  return fused_hard_fwd_ok(pb) && (!pb.moments || (pb.labels && pb.R <= 8));
}

// Loop-invariant state of the fused hard path; the tables live in the caller's frame (base build: pointers).
struct HardCtx {
  int act;
  bool right, labels;
  i32 M;
  float Mf, top;
  Tab e0, e1;  // e[j0], e[j0 + 1]
};

struct HardTables {
  alignas(64) float e0[32];
  alignas(64) float e1[32];
};

static HardCtx hard_ctx(const Problem& pb, HardTables& t) {
  const i64 M = pb.M;
  for (int k = 0; k < 32; ++k) {
    t.e0[k] = k <= M ? pb.edges[k] : 0.0f;
    t.e1[k] = k < M ? pb.edges[k + 1] : 0.0f;
  }
  HardCtx k;
  k.act = pb.activation;
  k.right = pb.right;
  k.labels = pb.labels;
  k.M = static_cast<i32>(M);
  k.Mf = static_cast<float>(M);
  k.top = static_cast<float>(M - 1);
  k.e0 = make_tab(t.e0);
  k.e1 = make_tab(t.e1);
  return k;
}


// G groups of VL voxels (group g at offset g * VL), class c's values at x + c * xs -> p[g][c] (probabilities), as
// activate(). nfv[g] (softmax only): the voxel's p are all non-finite (a NaN / +inf logit, or every logit -inf) or
// none. G > 1 interleaves independent groups so their long dependency chains (exp) overlap.
template <int CC, int G>
static CALIBOPS_INLINE void front_act(const HardCtx& k, i64 C_rt, const float* x, i64 xs, VF (*p)[kMaxFusedC],
                                      VM* nfv) {
  const i64 C = CC > 0 ? CC : C_rt;
  for (i64 c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) p[g][c] = fload(x + c * xs + g * VL);
  if (k.act == 1) {
    VF m[G], s[G], r[G];
    for (int g = 0; g < G; ++g) m[g] = p[g][0];
    for (i64 c = 1; c < C; ++c)
      for (int g = 0; g < G; ++g) m[g] = fmax_(p[g][c], m[g]);
    for (int g = 0; g < G; ++g) s[g] = fset(0.0f);
    for (i64 c = 0; c < C; ++c)
      for (int g = 0; g < G; ++g) {
        p[g][c] = vexp<true>(fsub(p[g][c], m[g]));
        s[g] = fadd(s[g], p[g][c]);
      }
    for (int g = 0; g < G; ++g) {
      nfv[g] = fnonfinite(s[g]);  // s in [1, C] unless NaN: one test per voxel instead of one per class
      r[g] = fdiv(fset(1.0f), s[g]);
    }
    for (i64 c = 0; c < C; ++c)
      for (int g = 0; g < G; ++g) p[g][c] = fmul(p[g][c], r[g]);
  } else if (k.act == 2) {
    for (i64 c = 0; c < C; ++c)
      for (int g = 0; g < G; ++g) p[g][c] = fdiv(fset(1.0f), fadd(fset(1.0f), vexp(fneg(p[g][c]))));
  }
}

// Hard bin of pc (no masking), as hard_states_row.
static CALIBOPS_INLINE VI bin_of(const HardCtx& k, VF pc) {
  // q >= 0 ? q : 0 then q <= top ? q : top, as max / min: they differ only for q = -0 (-> +0) and NaN
  // (also -> 0), where the truncated integer is the same.
  VF q = fmax_(fmul(pc, fset(k.Mf)), fset(0.0f));
  q = fmin_(q, fset(k.top));
  const VI j0 = cvtt(q);
  const VF ea = look(k.e0, j0), eb = look(k.e1, j0);
  const VI j = k.right ? bin_adjust<true>(j0, pc, ea, eb) : bin_adjust<false>(j0, pc, ea, eb);
  return imin(j, iset(k.M - 1));
}

// Marginal: p[g][c] and bin[g][c] (hard bin, M + 1 for non-finite p, M for masked voxels), exactly as activate +
// compute_states. lab: the voxels' labels (row 0 of the rater rows: -1 = unused), ignored unless k.labels.
template <int CC, int G>
static CALIBOPS_INLINE void hard_front(const HardCtx& k, i64 C_rt, const float* x, i64 xs, const i32* lab,
                                       VF (*p)[kMaxFusedC], VI (*bin)[kMaxFusedC]) {
  const i64 C = CC > 0 ? CC : C_rt;
  VM nfv[G] = {};
  front_act<CC, G>(k, C, x, xs, p, nfv);
  const VI nfbin = iset(k.M + 1);
  VM masked[G], drop[G];
  VI dval[G];
  if (k.labels)
    for (int g = 0; g < G; ++g) masked[g] = ilt(iload(lab + g * VL), iset(0));
  if (k.act == 1)  // one select per class: masked voxels -> M, else non-finite voxels -> M + 1
    for (int g = 0; g < G; ++g) {
      drop[g] = k.labels ? mor(masked[g], nfv[g]) : nfv[g];
      dval[g] = k.labels ? isel(masked[g], iset(k.M), nfbin) : nfbin;
    }
  for (i64 c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) {
      const VF pc = p[g][c];
      VI j = bin_of(k, pc);
      if (k.act == 1) {
        j = isel(drop[g], dval[g], j);
      } else {
        j = isel(fnonfinite(pc), nfbin, j);
        if (k.labels) j = isel(masked[g], iset(k.M), j);
      }
      bin[g][c] = j;
    }
}

// Top-label: p[g][c], the confidence q[g] = max_c p (replacing only on >), a[g] = argmax, bin[g] = hard bin of q
// (M + 1 when any p of the voxel is non-finite, M for masked voxels) and nfc[g] = the number of non-finite p of
// the voxel (0 for masked voxels), exactly as top_rows + compute_states.
template <int CC, int G>
static CALIBOPS_INLINE void top_front(const HardCtx& k, i64 C_rt, const float* x, i64 xs, const i32* lab,
                                      VF (*p)[kMaxFusedC], VF* qo, VI* a, VI* bin, VI* nfc) {
  const i64 C = CC > 0 ? CC : C_rt;
  VM nfv[G] = {};
  front_act<CC, G>(k, C, x, xs, p, nfv);
  for (int g = 0; g < G; ++g) {
    VF q = p[g][0];
    VI ag = iset(0), cnt = iset(0);
    if (k.act != 1) cnt = iinc(cnt, fnonfinite(q));
    for (i64 c = 1; c < C; ++c) {
      const VM gt = fgt(p[g][c], q);
      q = fsel(gt, p[g][c], q);
      ag = isel(gt, iset(static_cast<i32>(c)), ag);
      if (k.act != 1) cnt = iinc(cnt, fnonfinite(p[g][c]));
    }
    if (k.act == 1) cnt = isel(nfv[g], iset(static_cast<i32>(C)), iset(0));  // softmax: all or none non-finite
    VI j = bin_of(k, q);
    j = isel(igt(cnt, iset(0)), iset(k.M + 1), j);
    if (k.labels) {
      const VM masked = ilt(iload(lab + g * VL), iset(0));
      j = isel(masked, iset(k.M), j);
      cnt = isel(masked, iset(0), cnt);
    }
    qo[g] = q;
    a[g] = ag;
    bin[g] = j;
    nfc[g] = cnt;
  }
}
