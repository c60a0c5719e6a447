// C interface of the CUDA host emulation (host_emulation.h) for ctypes (tests/cuda_emulation/__init__.py).
// Arguments are those of the v2 ops (docs/kernel_contract.md) as ids, plus raw pointers to contiguous buffers.
#include "host_emulation.h"

extern "C" {

// Forward statistics, emulated. sum_p2 / sum_py may be null when moments is 0; bad: int64 [2].
// Returns nullptr or the plan's error message.
const char* calibops_emu_forward(const void* input, int input_kind, const void* target, int target_elem,
                                 const float* edges, int64_t B, int64_t C, int64_t N, int64_t R, int64_t M,
                                 int scheme, int activation, int target_kind, int mode, int moments, int has_ignore,
                                 int64_t ignore_index, int right, int64_t smem_limit, float* count, float* sum_p,
                                 float* sum_y, float* sum_p2, float* sum_py, int64_t* bad) {
  using namespace calibops_cuda;
  const StatsArgs a = emu::make_args(input, input_kind, target, target_elem, edges, B, C, N, R, M, scheme,
                                     activation, target_kind, mode, moments, has_ignore, ignore_index, right);
  return emu::run_forward(a, smem_limit, OutPtrs{count, sum_p, sum_y, sum_p2, sum_py}, bad);
}

// Backward (grad w.r.t. the input, written in input_kind), emulated.
const char* calibops_emu_backward(const void* input, int input_kind, const void* target, int target_elem,
                                  const float* edges, int64_t B, int64_t C, int64_t N, int64_t R, int64_t M,
                                  int scheme, int activation, int target_kind, int mode, int moments,
                                  int has_ignore, int64_t ignore_index, int right, int64_t smem_limit,
                                  const float* grad_count, const float* grad_sum_p, const float* grad_sum_y,
                                  const float* grad_sum_p2, const float* grad_sum_py, void* grad_input) {
  using namespace calibops_cuda;
  const StatsArgs a = emu::make_args(input, input_kind, target, target_elem, edges, B, C, N, R, M, scheme,
                                     activation, target_kind, mode, moments, has_ignore, ignore_index, right);
  return emu::run_backward(a, smem_limit, GradPtrs{grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py},
                           grad_input);
}

// The launch plan, for tests: {threads, tile, tiles_per_block, group, slots, slot_stride, P, smem_bytes, nstat}.
const char* calibops_emu_plan(int64_t B, int64_t C, int64_t N, int64_t R, int64_t M, int scheme, int activation,
                              int target_kind, int mode, int moments, int backward, int64_t smem_limit,
                              int64_t* out9) {
  using namespace calibops_cuda;
  const StatsArgs a = emu::make_args(nullptr, kF32, nullptr, kI64, nullptr, B, C, N, R, M, scheme, activation,
                                     target_kind, mode, moments, 0, 0, 0);
  const Plan pl = make_plan(a, backward != 0, smem_limit);
  const int64_t v[9] = {pl.threads,          pl.tile,
                        pl.tiles_per_block,  pl.group,
                        pl.slots,            pl.slot_stride,
                        pl.blocks_per_image, static_cast<int64_t>(pl.smem_bytes),
                        pl.nstat};
  for (int i = 0; i < 9; ++i) out9[i] = v[i];
  return pl.error;
}

// One image b of a B-image problem whose buffers hold only that image (the other images are never read): the
// kernels' 64-bit offsets (b * C * N, b * R * N, b * K * M, block b * P ...) are exercised past 2^31 elements
// without allocating them. Pointers are rebased by the image's offset, so a 32-bit overflow anywhere reads or
// writes outside the buffers (caught by the comparison with the same data run as image 0, or by ASan).
const char* calibops_emu_forward_image(const void* input, int input_kind, const void* target, int target_elem,
                                       const float* edges, int64_t B, int64_t C, int64_t N, int64_t R, int64_t M,
                                       int scheme, int activation, int target_kind, int mode, int moments,
                                       int has_ignore, int64_t ignore_index, int right, int64_t smem_limit,
                                       int64_t b, float* count, float* sum_p, float* sum_y, float* sum_p2,
                                       float* sum_py, int64_t* bad) {
  using namespace calibops_cuda;
  StatsArgs a = emu::make_args(input, input_kind, target, target_elem, edges, B, C, N, R, M, scheme, activation,
                               target_kind, mode, moments, has_ignore, ignore_index, right);
  const int64_t in_size = input_kind == kF32 ? 4 : 2;
  const int64_t t_size = emu::elem_size(target_elem);
  const int64_t t_per_image = a.labels ? a.R * N : C * N;
  a.input = emu::rebase(input, b * C * N * in_size);
  a.target = emu::rebase(target, b * t_per_image * t_size);
  const int64_t km = a.K * a.M;
  OutPtrs out{count - b * km, sum_p - b * km, sum_y - b * km * a.R, sum_p2 ? sum_p2 - b * km : nullptr,
              sum_py ? sum_py - b * km : nullptr};
  return emu::run_forward_image(a, smem_limit, out, bad, b);
}

const char* calibops_emu_backward_image(const void* input, int input_kind, const void* target, int target_elem,
                                        const float* edges, int64_t B, int64_t C, int64_t N, int64_t R, int64_t M,
                                        int scheme, int activation, int target_kind, int mode, int moments,
                                        int has_ignore, int64_t ignore_index, int right, int64_t smem_limit,
                                        int64_t b, const float* grad_count, const float* grad_sum_p,
                                        const float* grad_sum_y, const float* grad_sum_p2,
                                        const float* grad_sum_py, void* grad_input) {
  using namespace calibops_cuda;
  StatsArgs a = emu::make_args(input, input_kind, target, target_elem, edges, B, C, N, R, M, scheme, activation,
                               target_kind, mode, moments, has_ignore, ignore_index, right);
  const int64_t in_size = input_kind == kF32 ? 4 : 2;
  const int64_t t_size = emu::elem_size(target_elem);
  const int64_t t_per_image = a.labels ? a.R * N : C * N;
  a.input = emu::rebase(input, b * C * N * in_size);
  a.target = emu::rebase(target, b * t_per_image * t_size);
  const int64_t km = a.K * a.M;
  GradPtrs g{grad_count - b * km, grad_sum_p - b * km, grad_sum_y - b * km * a.R,
             grad_sum_p2 ? grad_sum_p2 - b * km : nullptr, grad_sum_py ? grad_sum_py - b * km : nullptr};
  void* grad = const_cast<void*>(emu::rebase(grad_input, b * C * N * in_size));
  return emu::run_backward_image(a, smem_limit, g, grad, b);
}
}
