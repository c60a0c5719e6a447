// The CPU kernels (forward statistics and backward gradient), written once and compiled once per instruction
// set: kernel_<isa>.cpp defines CALIBOPS_ISA_NS / CALIBOPS_ISA_NAME / CALIBOPS_ISA_LEVEL, selects the target and
// includes this file. Everything lives in the namespace calibops::cpu::<isa>, with internal linkage, and uses no
// torch or standard-library inline code, so the ISA builds never share machine code by accident.
//
// The parts, each included here inside that namespace:
//   numerics.h          bit casts, non-finite test, float16 / bfloat16 conversions, exp
//   simd.h              the vector shim (AVX-512 / AVX2 / scalar), lane-wise exp, table lookups, row gather
//   schemes.h           binning schemes: q -> state -> membership (bin, weight, slope)
//   tile.h              scratch layout, loading rows and label maps, activation, top-label rows
//   generic_forward.h   the generic forward (every option)
//   generic_backward.h  the generic backward (every option)
//   fused_front.h       the fused hard path's register-resident front end (activation + hard bins)
//   fused_hard.h        the fused hard path's tiles (forward front ends, backward groups)
//   fused_driver.h      the fused hard path's tile loops and merges
// and the dispatch below.
//
// Non-finite probabilities (docs/kernel_contract.md): an entry whose q is NaN or +-inf goes to a discarded
// histogram slot of its own (hard bin M + 1; soft state M + 2, whose whole unit weight lands in slot M + 1), so the
// count of slot M + 1, summed over the rows, is the number of such marginal entries at no extra cost in the
// scatter (top-label counts the non-finite p per voxel instead); its gradient-table entries are 0 and the
// activation chain rule is masked to 0 there. Unused voxels (a rater's label out of range or ignore_index) keep
// their masked state whatever p is, so they are never counted as non-finite.
//
// Paths: hard binning with C <= 16, M <= 30, labels or marginal (AVX2 / AVX-512 builds) takes the fused hard path
// (the backward with moments: labels and at most 8 raters); everything else the generic path. The usual
// configurations are compile-time specialisations (entry vectors of W = 4 doubles, the simple gradient rows), so the
// options cost nothing when off.
#if !defined(CALIBOPS_ISA_NS) || !defined(CALIBOPS_ISA_LEVEL)
#error "kernel_impl.h is included by kernel_<isa>.cpp only"
#endif

namespace calibops {
namespace cpu {
namespace CALIBOPS_ISA_NS {

// clang-format off
#include "numerics.h"
#include "simd.h"
#include "schemes.h"
#include "tile.h"
#include "generic_forward.h"
#include "generic_backward.h"
#include "fused_front.h"
#include "fused_hard.h"
#include "fused_driver.h"
// clang-format on

static i64 forward(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch, double* hist,
                   i64* nonfinite_out) {
  if (fused_hard_fwd_ok(pb)) return forward_hard_fused(pb, b, begin, end, out, scratch, hist, nonfinite_out);
  return forward_generic(pb, b, begin, end, out, scratch, hist, nonfinite_out);
}

static void backward(const Problem& pb, const float* grad_count, const float* grad_sum_p, const float* grad_sum_y,
                     const float* grad_sum_p2, const float* grad_sum_py, void* grad, i64 b, i64 begin, i64 end,
                     float* scratch) {
  if (fused_hard_bwd_ok(pb))
    return backward_hard_fused(pb, grad_sum_p, grad_sum_p2, grad_sum_py, grad, b, begin, end, scratch);
  backward_generic(pb, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, grad, b, begin, end, scratch);
}

static const KernelTable kTable = {CALIBOPS_ISA_NAME, scratch_floats, hist_doubles, forward, backward};

}  // namespace CALIBOPS_ISA_NS
}  // namespace cpu
}  // namespace calibops
