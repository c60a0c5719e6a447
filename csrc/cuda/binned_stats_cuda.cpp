// Torch binding of the CUDA kernels: TORCH_LIBRARY_IMPL(calibops, CUDA, m) for the two ops declared in
// csrc/ops.cpp. Checks the kernel contract (docs/kernel_contract.md) with TORCH_CHECK, picks the element kinds,
// runs on the current torch CUDA stream of the input's device and allocates outputs / workspace through the
// torch caching allocator. The kernels themselves (binned_stats.cu) see no torch type.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.cuh"

namespace {

using at::Tensor;
namespace cc = calibops_cuda;

int input_kind(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cc::kF32;
    case at::kHalf:
      return cc::kF16;
    case at::kBFloat16:
      return cc::kBF16;
    default:
      TORCH_CHECK(false, "calibops (cuda): input must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

int target_kind(const Tensor& t, bool labels) {
  const auto st = t.scalar_type();
  if (labels) {
    switch (st) {
      case at::kByte:
        return cc::kU8;
      case at::kChar:
        return cc::kI8;
      case at::kShort:
        return cc::kI16;
      case at::kInt:
        return cc::kI32;
      case at::kLong:
        return cc::kI64;
      default:
        TORCH_CHECK(false, "calibops (cuda): label target must be uint8, int8, int16, int32 or int64, got ", st);
    }
  }
  switch (st) {
    case at::kFloat:
      return cc::kF32;
    case at::kHalf:
      return cc::kF16;
    case at::kBFloat16:
      return cc::kBF16;
    case at::kBool:
    case at::kByte:
      return cc::kU8;
    default:
      TORCH_CHECK(false, "calibops (cuda): dense target must be float32, float16, bfloat16, bool or uint8, got ", st);
  }
  return -1;
}

// Checks every tensor argument against the contract and fills the kernel arguments.
cc::StatsArgs make_args(const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins, bool soft,
                        int64_t activation, bool labels, std::optional<int64_t> ignore_index, bool right) {
  TORCH_CHECK(input.is_cuda(), "calibops (cuda): input must be a CUDA tensor");
  TORCH_CHECK(input.dim() == 3, "calibops (cuda): input must be [B, C, N], got ", input.dim(), " dims");
  TORCH_CHECK(input.is_contiguous(), "calibops (cuda): input must be contiguous");
  TORCH_CHECK(target.device() == input.device(), "calibops (cuda): target must be on the input's device");
  TORCH_CHECK(target.is_contiguous(), "calibops (cuda): target must be contiguous");
  TORCH_CHECK(edges.device() == input.device(), "calibops (cuda): edges must be on the input's device");
  TORCH_CHECK(edges.scalar_type() == at::kFloat && edges.dim() == 1 && edges.is_contiguous(),
              "calibops (cuda): edges must be a contiguous 1-D float32 tensor");
  TORCH_CHECK(num_bins >= 1, "calibops (cuda): num_bins must be >= 1, got ", num_bins);
  TORCH_CHECK(edges.numel() == (soft ? num_bins : num_bins + 1), "calibops (cuda): edges must have ",
              soft ? num_bins : num_bins + 1, " entries for num_bins=", num_bins, (soft ? " (soft centres)" : ""),
              ", got ", edges.numel());
  TORCH_CHECK(activation >= 0 && activation <= 2, "calibops (cuda): activation must be 0, 1 or 2, got ", activation);
  const int64_t B = input.size(0), C = input.size(1), N = input.size(2);
  if (labels) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == N,
                "calibops (cuda): label target must be [B, N] = [", B, ", ", N, "], got ", target.sizes());
  } else {
    TORCH_CHECK(target.sizes() == input.sizes(), "calibops (cuda): dense target must have the input's shape ",
                input.sizes(), ", got ", target.sizes());
  }
  cc::StatsArgs a{};
  a.input = input.data_ptr();
  a.input_kind = input_kind(input);
  a.target = target.data_ptr();
  a.target_kind = target_kind(target, labels);
  a.edges = edges.data_ptr<float>();
  a.B = B;
  a.C = C;
  a.N = N;
  a.M = num_bins;
  a.soft = soft;
  a.activation = static_cast<int>(activation);
  a.labels = labels;
  a.has_ignore = labels && ignore_index.has_value();
  a.ignore_index = a.has_ignore ? *ignore_index : 0;
  a.right = right;
  return a;
}

cc::Plan make_plan_checked(const cc::StatsArgs& a, bool backward, const Tensor& input) {
  const int64_t smem = cc::device_smem_limit(input.get_device());
  TORCH_CHECK(smem > 0, "calibops (cuda): cannot query the shared memory of device ", input.get_device());
  const cc::Plan pl = cc::make_plan(a, backward, smem);
  TORCH_CHECK(pl.error == nullptr, "calibops (cuda): ", pl.error, " (classes=", a.C, ", num_bins=", a.M,
              ", shared memory needed ", pl.smem_bytes, " bytes, device allows ", smem, ")");
  return pl;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> binned_stats_cuda(const Tensor& input, const Tensor& target,
                                                             const Tensor& edges, int64_t num_bins, bool soft,
                                                             int64_t activation, bool labels,
                                                             std::optional<int64_t> ignore_index, bool right) {
  const cc::StatsArgs a = make_args(input, target, edges, num_bins, soft, activation, labels, ignore_index, right);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto f32 = input.options().dtype(at::kFloat);
  Tensor count = at::empty({a.B, a.C, a.M}, f32);
  Tensor sum_p = at::empty({a.B, a.C, a.M}, f32);
  Tensor sum_y = at::empty({a.B, a.C, a.M}, f32);
  Tensor bad = at::empty({2}, input.options().dtype(at::kLong));  // [bad labels, non-finite p], zeroed by the launch
  if (a.C == 0) {  // no class: empty (B, 0, M) statistics and nothing bad, as every backend (kernel contract)
    bad.zero_();
    return {count, sum_p, sum_y, bad};
  }
  const cc::Plan pl = make_plan_checked(a, false, input);
  Tensor workspace =
      at::empty({static_cast<int64_t>(cc::stats_workspace_doubles(a, pl))}, input.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device()).stream();
  const char* err = cc::launch_binned_stats(a, pl, workspace.data_ptr<double>(), count.data_ptr<float>(),
                                            sum_p.data_ptr<float>(), sum_y.data_ptr<float>(),
                                            bad.data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == nullptr, "calibops (cuda): binned_stats failed: ", err);
  return {count, sum_p, sum_y, bad};
}

Tensor binned_stats_backward_cuda(const Tensor& grad_count, const Tensor& grad_sum_p, const Tensor& grad_sum_y,
                                  const Tensor& input, const Tensor& target, const Tensor& edges, int64_t num_bins,
                                  bool soft, int64_t activation, bool labels, std::optional<int64_t> ignore_index,
                                  bool right) {
  const cc::StatsArgs a = make_args(input, target, edges, num_bins, soft, activation, labels, ignore_index, right);
  const Tensor* grads[3] = {&grad_count, &grad_sum_p, &grad_sum_y};
  const char* names[3] = {"grad_count", "grad_sum_p", "grad_sum_y"};
  for (int i = 0; i < 3; ++i) {
    const Tensor& g = *grads[i];
    TORCH_CHECK(g.device() == input.device(), "calibops (cuda): ", names[i], " must be on the input's device");
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous(), "calibops (cuda): ", names[i],
                " must be a contiguous float32 tensor");
    TORCH_CHECK(g.dim() == 3 && g.size(0) == a.B && g.size(1) == a.C && g.size(2) == a.M, "calibops (cuda): ",
                names[i], " must be [B, C, num_bins] = [", a.B, ", ", a.C, ", ", a.M, "], got ", g.sizes());
  }
  const c10::cuda::CUDAGuard guard(input.device());
  Tensor grad_input = at::empty(input.sizes(), input.options());
  if (a.C == 0) return grad_input;  // (B, 0, N): nothing to write
  const cc::Plan pl = make_plan_checked(a, true, input);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device()).stream();
  const char* err =
      cc::launch_binned_stats_backward(a, pl, grad_count.data_ptr<float>(), grad_sum_p.data_ptr<float>(),
                                       grad_sum_y.data_ptr<float>(), grad_input.data_ptr(), stream);
  TORCH_CHECK(err == nullptr, "calibops (cuda): binned_stats_backward failed: ", err);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(calibops, CUDA, m) {
  m.impl("binned_stats", &binned_stats_cuda);
  m.impl("binned_stats_backward", &binned_stats_backward_cuda);
}
