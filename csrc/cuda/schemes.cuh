// Binning schemes of the CUDA kernels (docs/kernel_contract.md, "Binning schemes"): each maps a finite q to its
// membership (j, w, dw): weight w in bin j, 1 - w in bin j + 1 (only when `split`), dw = dw/dq (bin j + 1 has
// slope -dw). The forward and backward block programs (stats_kernels.cuh) are written once against a
// Membership and call with_membership(), which instantiates them per scheme, so each scheme's code is
// specialised at compile time (hard: w = 1, dw = 0 and no second bin fold away).
//
// Adding a scheme: write its membership function here, add a case to with_membership() and its id to
// csrc/contract_types.h (plus the other backends and the reference: docs/kernel_contract.md).
#pragma once

#include "numerics.cuh"

namespace calibops_cuda {

struct Membership {
  int j;       // first bin, 0 .. M-1
  float w;     // weight in bin j
  float dw;    // d w / d q
  bool split;  // bin j + 1 (< M) gets weight 1 - w and slope -dw
};

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

// Soft binning: t = #{k : c[k] < p} - 1 in -1 .. M-1 (right: c[k] <= p, so p exactly on a centre takes the slope
// of the interval above it); same walk as hard_bin.
CB_HD int soft_index(float p, const float* c, int M, bool right) {
  const float est = fminf(fmaxf(p * static_cast<float>(M) - 0.5f, -1.0f), static_cast<float>(M - 1));
  int t = static_cast<int>(floorf(est));
  if (right) {
    while (t < M - 1 && c[t + 1] <= p) ++t;
    while (t >= 0 && !(c[t] <= p)) --t;
  } else {
    while (t < M - 1 && c[t + 1] < p) ++t;
    while (t >= 0 && !(c[t] < p)) --t;
  }
  return t;
}

// Scheme 0, edges e[0..M]: (j, 1, 0).
CB_HD Membership hard_membership(float q, const float* e, int M, bool right) {
  return Membership{hard_bin(q, e, M, right), 1.0f, 0.0f, false};
}

// Scheme 1 (triangular), centres c[0..M-1]: t == -1 -> (0, 1, 0); t == M-1 -> (M-1, 1, 0); else
// (t, (c[t+1] - q) / d, -1 / d) with d = c[t+1] - c[t]. M == 1 -> (0, 1, 0).
CB_HD Membership soft_membership(float q, const float* c, int M, bool right) {
  const int t = soft_index(q, c, M, right);
  if (t < 0) return Membership{0, 1.0f, 0.0f, false};
  if (t >= M - 1) return Membership{M - 1, 1.0f, 0.0f, false};
  const float d = c[t + 1] - c[t];
  return Membership{t, div_rn(c[t + 1] - q, d), -div_rn(1.0f, d), true};
}

// Calls body(membership of q) with the scheme's membership function (scheme is uniform across a launch, so the
// branch does not diverge; body is instantiated once per scheme).
template <class F>
CB_HD void with_membership(int scheme, float q, const float* e, int M, bool right, F&& body) {
  if (scheme == kSchemeSoft) {
    body(soft_membership(q, e, M, right));
  } else {
    body(hard_membership(q, e, M, right));
  }
}

}  // namespace calibops_cuda
