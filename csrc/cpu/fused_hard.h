// The fused hard path (front end: fused_front.h). Forward with integer labels: sub-blocks of kSub voxels whose
// float64 (1, q) pairs (moments: (1, q, q², q·ȳ) quads) are scattered per statistic row, plus one integer count per
// voxel and rater for sum_y (the rater's label class and bin); dense targets (marginal): the generic entry vectors.
// Backward: gradient lookup per bin, the chain rule through the activation, the mask and the store in one pass
// (non-temporal for large gradients). Marginal and top-label, any number of raters; the backward with moments and
// dense top-label take the generic path.
// Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

// Marginal forward front end of n voxels. src / ss: the class rows (stride ss) of the input (float32) or of the
// converted tile; lab: the rater rows [R][T] or nullptr; bins (row stride T) gets the hard bins. PAIRS (labels): pk
// (class stride pks doubles) gets the float64 (1, p) pairs, and each rater row of lab is overwritten with the
// rater's label slot r * C * (M + 2) + l * (M + 2) + bin[l] (l its label; M for unused voxels: a discarded slot);
// otherwise x (row stride T) gets p.
// R1: one rater (compile-time R = 1). MOM (with PAIRS): the moments' quads (1, p, p², p·ȳ) instead of the pairs,
// ȳ = (number of raters labelling the voxel c) / R, exactly as the generic path's pack_general.
template <int CC, bool PAIRS, bool R1 = false, bool MOM = false>
static void hard_front_tile(const HardCtx& k, const Problem& pb, const float* src, i64 ss, i32* lab, float* x,
                            i32* bins, double* pk, i64 pks, i64 n) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C, R = R1 ? 1 : pb.R;
  const i32 M2 = static_cast<i32>(pb.M + 2), RS = static_cast<i32>(C) * M2;
  const double inv_r = 1.0 / static_cast<double>(R);
  constexpr int G = 2;
  VF p[G][kMaxFusedC];
  VI bn[G][kMaxFusedC];
  auto emit = [&](int g, i64 i) {
    for (i64 c = 0; c < C; ++c) {
      if (PAIRS && MOM) {
        VF ys = fset(0.0f);  // raters labelling the voxel c (exact small integers)
        for (i64 r = 0; r < R; ++r)
          ys = fadd(ys, fsel(ieq(iload(lab + r * T + i), iset(static_cast<i32>(c))), fset(1.0f), fset(0.0f)));
        store_quads(pk + c * pks + 4 * i, p[g][c], ys, inv_r);
      } else if (PAIRS) {
        store_pairs(pk + c * pks + 2 * i, p[g][c]);
      } else {
        fstore(x + c * T + i, p[g][c]);
      }
      istore(bins + c * T + i, bn[g][c]);
    }
    if (PAIRS)
      for (i64 r = 0; r < R; ++r) {
        const VI lv = iload(lab + r * T + i);
        VI yb = iset(k.M);
        for (i64 c = 0; c < C; ++c)
          yb = isel(ieq(lv, iset(static_cast<i32>(c))), iadd(bn[g][c], iset(static_cast<i32>(c) * M2)), yb);
        istore(lab + r * T + i, r > 0 ? iadd(yb, iset(static_cast<i32>(r) * RS)) : yb);
      }
  };
  i64 i = 0;
  for (; i + G * VL <= n; i += G * VL) {
    hard_front<CC, G>(k, C, src + i, ss, lab != nullptr ? lab + i : nullptr, p, bn);
    for (int g = 0; g < G; ++g) emit(g, i + g * VL);
  }
  for (; i + VL <= n; i += VL) {
    hard_front<CC, 1>(k, C, src + i, ss, lab != nullptr ? lab + i : nullptr, p, bn);
    emit(0, i);
  }
  if (i < n) {  // tail: through zero-padded buffers
    alignas(64) float xb[kMaxFusedC * VL];
    alignas(64) i32 lb[VL], ib[kMaxFusedC * VL];
    alignas(64) double pb2[kMaxFusedC * 2 * VL];
    const i64 r = n - i;
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < VL; ++v) xb[c * VL + v] = v < r ? src[c * ss + i + v] : 0.0f;
    for (i64 v = 0; v < VL; ++v) lb[v] = (lab != nullptr && v < r) ? lab[i + v] : -1;
    hard_front<CC, 1>(k, C, xb, VL, lb, p, bn);
    for (i64 c = 0; c < C; ++c) {
      if (PAIRS && !MOM)
        store_pairs(pb2 + c * 2 * VL, p[0][c]);
      else
        fstore(xb + c * VL, p[0][c]);
      istore(ib + c * VL, bn[0][c]);
    }
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < r; ++v) {
        if (PAIRS && MOM) {  // the quads of store_quads, one lane at a time
          float ys = 0.0f;
          for (i64 rr = 0; rr < R; ++rr) ys += lab[rr * T + i + v] == static_cast<i32>(c) ? 1.0f : 0.0f;
          const double pd = static_cast<double>(xb[c * VL + v]);
          double* o = pk + c * pks + 4 * (i + v);
          o[0] = 1.0;
          o[1] = pd;
          o[2] = pd * pd;
          o[3] = pd * (static_cast<double>(ys) * inv_r);
        } else if (PAIRS) {
          pk[c * pks + 2 * (i + v)] = pb2[c * 2 * VL + 2 * v];
          pk[c * pks + 2 * (i + v) + 1] = pb2[c * 2 * VL + 2 * v + 1];
        } else {
          x[c * T + i + v] = xb[c * VL + v];
        }
        bins[c * T + i + v] = ib[c * VL + v];
      }
    if (PAIRS)
      for (i64 rr = 0; rr < R; ++rr)
        for (i64 v = 0; v < r; ++v) {
          const i32 lv = lab[rr * T + i + v];
          lab[rr * T + i + v] = (lv >= 0 ? ib[lv * VL + v] + lv * M2 : k.M) + static_cast<i32>(rr) * RS;
        }
  }
}

// Top-label forward front end (labels): pk gets the (1, q) pairs (MOM: the quads (1, q, q², q·ȳ), ȳ = the fraction
// of raters whose label is the argmax), bins the bin of q, nf the number of non-finite p per voxel, and each rater
// row of lab is overwritten with the rater's slot r * (M + 2) + (l == a ? bin : M).
template <int CC, bool MOM = false>
static void top_front_tile(const HardCtx& k, const Problem& pb, const float* src, i64 ss, i32* lab, i32* bins,
                           double* pk, i32* nf, i64 n) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C, R = pb.R;
  const i32 M2 = static_cast<i32>(pb.M + 2);
  const double inv_r = 1.0 / static_cast<double>(R);
  constexpr int G = 2;
  VF p[G][kMaxFusedC], q[G];
  VI a[G], bn[G], nfc[G];
  auto emit = [&](int g, i64 i) {
    if (MOM) {
      VF ys = fset(0.0f);
      for (i64 r = 0; r < R; ++r) ys = fadd(ys, fsel(ieq(iload(lab + r * T + i), a[g]), fset(1.0f), fset(0.0f)));
      store_quads(pk + 4 * i, q[g], ys, inv_r);
    } else {
      store_pairs(pk + 2 * i, q[g]);
    }
    istore(bins + i, bn[g]);
    istore(nf + i, nfc[g]);
    for (i64 r = 0; r < R; ++r) {
      const VI yb = isel(ieq(iload(lab + r * T + i), a[g]), bn[g], iset(k.M));
      istore(lab + r * T + i, r > 0 ? iadd(yb, iset(static_cast<i32>(r) * M2)) : yb);
    }
  };
  i64 i = 0;
  for (; i + G * VL <= n; i += G * VL) {
    top_front<CC, G>(k, C, src + i, ss, lab + i, p, q, a, bn, nfc);
    for (int g = 0; g < G; ++g) emit(g, i + g * VL);
  }
  for (; i + VL <= n; i += VL) {
    top_front<CC, 1>(k, C, src + i, ss, lab + i, p, q, a, bn, nfc);
    emit(0, i);
  }
  if (i < n) {  // tail: through zero-padded buffers
    alignas(64) float xb[kMaxFusedC * VL];
    alignas(64) i32 lb[VL], ab[VL], ib[VL], nb[VL];
    alignas(64) double pb2[2 * VL];
    const i64 r = n - i;
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < VL; ++v) xb[c * VL + v] = v < r ? src[c * ss + i + v] : 0.0f;
    for (i64 v = 0; v < VL; ++v) lb[v] = v < r ? lab[i + v] : -1;
    top_front<CC, 1>(k, C, xb, VL, lb, p, q, a, bn, nfc);
    alignas(64) float qb[VL];
    store_pairs(pb2, q[0]);
    fstore(qb, q[0]);
    istore(ab, a[0]);
    istore(ib, bn[0]);
    istore(nb, nfc[0]);
    for (i64 v = 0; v < r; ++v) {
      if (MOM) {  // the quads of store_quads, one lane at a time
        float ys = 0.0f;
        for (i64 rr = 0; rr < R; ++rr) ys += lab[rr * T + i + v] == ab[v] ? 1.0f : 0.0f;
        const double qd = static_cast<double>(qb[v]);
        double* o = pk + 4 * (i + v);
        o[0] = 1.0;
        o[1] = qd;
        o[2] = qd * qd;
        o[3] = qd * (static_cast<double>(ys) * inv_r);
      } else {
        pk[2 * (i + v)] = pb2[2 * v];
        pk[2 * (i + v) + 1] = pb2[2 * v + 1];
      }
      bins[i + v] = ib[v];
      nf[i + v] = nb[v];
      for (i64 rr = 0; rr < R; ++rr) {
        const i32 lv = lab[rr * T + i + v];
        lab[rr * T + i + v] = (lv == ab[v] ? ib[v] : k.M) + static_cast<i32>(rr) * M2;
      }
    }
  }
}

// d loss / d p of one group (gg[c], from the per-bin gradient) -> d loss / d input: chain through the activation,
// then 0 for unused voxels and non-finite p. The table gives 0 for non-finite p (bin M + 1), which activation 0
// passes on as is; the chain rules would turn it into NaN (0 * NaN), so their result is masked. Softmax: p is NaN
// for every class of the voxel or for none, so class 0 decides for the voxel.
template <int CC>
static CALIBOPS_INLINE void chain_mask(const HardCtx& k, i64 C_rt, const VF* p, const i32* lab, VF* gg) {
  const i64 C = CC > 0 ? CC : C_rt;
  if (k.act == 1) {
    VF s = fset(0.0f);
    for (i64 c = 0; c < C; ++c) s = fadd(s, fmul(p[c], gg[c]));
    for (i64 c = 0; c < C; ++c) gg[c] = fmul(p[c], fsub(gg[c], s));
    VM drop = fnonfinite(p[0]);
    if (k.labels) drop = mor(drop, ilt(iload(lab), iset(0)));
    for (i64 c = 0; c < C; ++c) gg[c] = fsel(drop, fset(0.0f), gg[c]);
  } else {
    if (k.act == 2)
      for (i64 c = 0; c < C; ++c)
        gg[c] = fsel(fnonfinite(p[c]), fset(0.0f), fmul(gg[c], fmul(p[c], fsub(fset(1.0f), p[c]))));
    if (k.labels) {
      const VM masked = ilt(iload(lab), iset(0));
      for (i64 c = 0; c < C; ++c) gg[c] = fsel(masked, fset(0.0f), gg[c]);
    }
  }
}

// The backward's second-moment terms (labels only): per statistic row, the tables K1 = 2 Gp2[j] and K4 = Gpy[j] (0 in
// the discarded slots), the rater rows of the labels (stride lts) and 1 / R.
struct MomTabs {
  const Tab* k1;
  const Tab* k4;
  i64 R, lts;
  float inv_r;
};

// g_q of a hard entry with moments, K0 + q (K1 + q K3) + yterm + ȳ (K4 + q K5) with K3 = K5 = yterm = 0, in the
// generic path's order of float operations (grad_row_full), and 0 in the discarded slots (bin >= M).
static CALIBOPS_INLINE VF mom_gq(const HardCtx& k, VF q, VI bn, const Tab& t0, const Tab& t1, const Tab& t4, VF ybar) {
  const VF z = fset(0.0f);
  VF v = fadd(look(t0, bn), fmul(q, fadd(look(t1, bn), fmul(q, z))));
  v = fadd(v, z);
  v = fadd(v, fmul(ybar, fadd(look(t4, bn), fmul(q, z))));
  return fsel(igt(bn, iset(k.M - 1)), z, v);
}

// ȳ of the voxels at lab (rater rows of stride mt.lts) for class cv: (Σ_r [l_r == cv]) / R, summed in rater order.
static CALIBOPS_INLINE VF mom_ybar(const MomTabs& mt, const i32* lab, VI cv) {
  VF ys = fset(0.0f);
  for (i64 r = 0; r < mt.R; ++r) ys = fadd(ys, fsel(ieq(iload(lab + r * mt.lts), cv), fset(1.0f), fset(0.0f)));
  return fmul(ys, fset(mt.inv_r));
}

// Backward of G groups: d loss / d input of the G * VL voxels, written to out + c * os. k0: per statistic row, the
// gradient of sum_p per bin (0 in the discarded slots). Top-label: only the argmax class gets g_q. MOM: also the
// second moments' terms (mt; labels).
template <int CC, int G, bool TOP, bool NT = false, bool MOM = false>
static CALIBOPS_INLINE void hard_back_group(const HardCtx& k, i64 C_rt, const Tab* k0, const MomTabs* mt,
                                            const float* x, i64 xs, const i32* lab, float* out, i64 os) {
  const i64 C = CC > 0 ? CC : C_rt;
  VF p[G][kMaxFusedC];
  VF gr[G][kMaxFusedC];
  if (TOP) {
    VF q[G];
    VI a[G], bn[G], nfc[G];
    top_front<CC, G>(k, C, x, xs, lab, p, q, a, bn, nfc);
    for (int g = 0; g < G; ++g) {
      VF gq;
      if (MOM)
        gq = mom_gq(k, q[g], bn[g], k0[0], mt->k1[0], mt->k4[0], mom_ybar(*mt, lab + g * VL, a[g]));
      else
        gq = look(k0[0], bn[g]);
      for (i64 c = 0; c < C; ++c) gr[g][c] = fsel(ieq(a[g], iset(static_cast<i32>(c))), gq, fset(0.0f));
    }
  } else {
    VI bn[G][kMaxFusedC];
    hard_front<CC, G>(k, C, x, xs, lab, p, bn);
    for (int g = 0; g < G; ++g)
      for (i64 c = 0; c < C; ++c) {
        if (MOM)
          gr[g][c] = mom_gq(k, p[g][c], bn[g][c], k0[c], mt->k1[c], mt->k4[c],
                            mom_ybar(*mt, lab + g * VL, iset(static_cast<i32>(c))));
        else
          gr[g][c] = look(k0[c], bn[g][c]);
      }
  }
  for (int g = 0; g < G; ++g) chain_mask<CC>(k, C, p[g], lab != nullptr ? lab + g * VL : nullptr, gr[g]);
  for (i64 c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) {
      if (NT)
        fstore_nt(out + c * os + g * VL, gr[g][c]);
      else
        fstore(out + c * os + g * VL, gr[g][c]);
    }
}

// NT: out + c * os is VL-float aligned for every c (non-temporal stores for the full groups). MOM: mt as in
// hard_back_group, at most kMaxFusedMomR raters.
constexpr i64 kMaxFusedMomR = 8;
template <int CC, bool TOP, bool NT, bool MOM = false>
static void hard_back_tile(const HardCtx& k, const Problem& pb, const Tab* k0, const MomTabs* mt, const float* src,
                           i64 ss, const i32* lab, float* out, i64 os, i64 n) {
  const i64 C = CC > 0 ? CC : pb.C;
  i64 i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL)
    hard_back_group<CC, 2, TOP, NT, MOM>(k, C, k0, mt, src + i, ss, lab != nullptr ? lab + i : nullptr, out + i,
                                         os);
  for (; i + VL <= n; i += VL)
    hard_back_group<CC, 1, TOP, false, MOM>(k, C, k0, mt, src + i, ss, lab != nullptr ? lab + i : nullptr, out + i,
                                            os);
  if (i < n) {
    alignas(64) float xb[kMaxFusedC * VL], gb[kMaxFusedC * VL];
    alignas(64) i32 lb[kMaxFusedMomR * VL];  // the rater rows (MOM), else row 0
    const i64 r = n - i, rows = MOM ? mt->R : 1;
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < VL; ++v) xb[c * VL + v] = v < r ? src[c * ss + i + v] : 0.0f;
    for (i64 rr = 0; rr < rows; ++rr) {
      const i32* lr = lab != nullptr ? lab + (MOM ? rr * mt->lts : 0) + i : nullptr;
      for (i64 v = 0; v < VL; ++v) lb[rr * VL + v] = (lr != nullptr && v < r) ? lr[v] : -1;
    }
    MomTabs mtail;
    if (MOM) {
      mtail = *mt;
      mtail.lts = VL;
    }
    hard_back_group<CC, 1, TOP, false, MOM>(k, C, k0, MOM ? &mtail : nullptr, xb, VL, lb, gb, VL);
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < r; ++v) out[c * os + i + v] = gb[c * VL + v];
  }
}
