// Torch binding of the CUDA kernels: TORCH_LIBRARY_IMPL(calibops, CUDA, m) for the two ops declared in
// csrc/ops.cpp. The arguments are checked by csrc/contract.h (shared with the CPU binding; any strides accepted,
// made contiguous there), then this file picks the device, runs on the current torch CUDA stream of the input's
// device and allocates outputs / workspace through the torch caching allocator. The kernels themselves
// (binned_stats.cu) see no torch type.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../contract.h"
#include "launchers.cuh"

namespace {

using at::Tensor;
namespace cc = calibops_cuda;
namespace ct = calibops::contract;

constexpr const char* kBackend = "calibops (cuda)";

ct::Prepared prepare(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins, int64_t scheme,
                     int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                     std::optional<int64_t> ignore_index, bool right) {
  TORCH_CHECK_VALUE(input.is_cuda(), kBackend, ": input must be a CUDA tensor, got one on ", input.device());
  return ct::prepare(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index,
                     right, kBackend);
}

// The kernels' arguments from a checked call and its contiguous tensors.
cc::StatsArgs make_args(const ct::Prepared& p) {
  const calibops::Call& c = p.call;
  cc::StatsArgs a{};
  a.input = p.input.data_ptr();
  a.input_kind = c.input_kind;
  a.target = p.target.data_ptr();
  a.target_elem = c.target_elem;
  a.edges = p.edges.data_ptr<float>();
  a.B = c.B;
  a.C = c.C;
  a.N = c.N;
  a.R = c.R;
  a.K = c.K;
  a.M = c.M;
  a.scheme = c.scheme;
  a.activation = c.activation;
  a.labels = c.target_kind == calibops::kTargetLabels;
  a.mode = c.mode;
  a.moments = c.moments;
  a.has_ignore = c.has_ignore;
  a.ignore_index = c.ignore_index;
  a.right = c.right;
  return a;
}

cc::Plan make_plan_checked(const cc::StatsArgs& a, bool backward, const Tensor& input) {
  const int64_t smem = cc::device_smem_limit(input.get_device());
  TORCH_CHECK(smem > 0, kBackend, ": cannot query the shared memory of device ", input.get_device());
  const cc::Plan pl = cc::make_plan(a, backward, smem);
  TORCH_CHECK_VALUE(pl.error == nullptr, kBackend, ": ", pl.error, " (classes=", a.C, ", raters=", a.R,
                    ", num_bins=", a.M, ", shared memory needed ", pl.smem_bytes, " bytes, device allows ", smem, ")");
  return pl;
}

float* ptr_or_null(const Tensor& t) { return t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> binned_stats_cuda(
    const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins, int64_t scheme,
    int64_t activation, int64_t target_kind, int64_t mode, bool moments, std::optional<int64_t> ignore_index,
    bool right) {
  const c10::cuda::CUDAGuard guard(input.device());
  const ct::Prepared p =
      prepare(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right);
  const calibops::Call& c = p.call;
  if (ct::nothing_to_do(c)) return ct::alloc_outputs(p.input, c, /*zero=*/true).tuple();
  const ct::Outputs o = ct::alloc_outputs(p.input, c, /*zero=*/false);
  const cc::StatsArgs a = make_args(p);
  const cc::Plan pl = make_plan_checked(a, false, p.input);
  Tensor workspace =
      at::empty({static_cast<int64_t>(cc::stats_workspace_doubles(a, pl))}, p.input.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.input.get_device()).stream();
  const cc::OutPtrs out{o.count.data_ptr<float>(), o.sum_p.data_ptr<float>(), o.sum_y.data_ptr<float>(),
                        ptr_or_null(o.sum_p2), ptr_or_null(o.sum_py)};
  const char* err =
      cc::launch_binned_stats(a, pl, workspace.data_ptr<double>(), out, o.bad.data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == nullptr, kBackend, ": binned_stats failed: ", err);
  return o.tuple();
}

Tensor binned_stats_backward_cuda(const Tensor& grad_count, const Tensor& grad_sum_p, const Tensor& grad_sum_y,
                                  const Tensor& grad_sum_p2, const Tensor& grad_sum_py, const Tensor& input,
                                  const Tensor& target, const Tensor& edges, int64_t num_bins, int64_t scheme,
                                  int64_t activation, int64_t target_kind, int64_t mode, bool moments,
                                  std::optional<int64_t> ignore_index, bool right) {
  const c10::cuda::CUDAGuard guard(input.device());
  const ct::Prepared p =
      prepare(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right);
  const calibops::Call& c = p.call;
  const ct::Grads g =
      ct::check_grads(c, p.input, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, kBackend);
  Tensor grad_input = ct::alloc_grad_input(p.input, c);
  if (ct::nothing_to_do(c)) return grad_input.zero_();
  const cc::StatsArgs a = make_args(p);
  const cc::Plan pl = make_plan_checked(a, true, p.input);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.input.get_device()).stream();
  const cc::GradPtrs gp{g.count.data_ptr<float>(), g.sum_p.data_ptr<float>(), g.sum_y.data_ptr<float>(),
                        ptr_or_null(g.sum_p2), ptr_or_null(g.sum_py)};
  const char* err = cc::launch_binned_stats_backward(a, pl, gp, grad_input.data_ptr(), stream);
  TORCH_CHECK(err == nullptr, kBackend, ": binned_stats_backward failed: ", err);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(calibops, CUDA, m) {
  m.impl("binned_stats", &binned_stats_cuda);
  m.impl("binned_stats_backward", &binned_stats_backward_cuda);
}
