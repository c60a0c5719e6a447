// CUDA kernels and launchers of calibops::binned_stats / binned_stats_backward (docs/kernel_contract.md).
// Includes only the CUDA runtime (no torch header), so `nvcc -c binned_stats.cu` works on any machine with nvcc.
// The block programs live in stats_kernels.cuh (shared with the host emulation the tests run without a GPU);
// the launch plan and the design (deterministic per-thread histogram columns, fixed-order partial sums) are
// described in launchers.cuh.
#include <cuda_runtime.h>

#include "launchers.cuh"
#include "stats_kernels.cuh"

namespace calibops_cuda {
namespace {

constexpr int kThreads = 256;  // == make_plan's T (checked by the launchers)

// Executor of a block program on the GPU: every thread runs the phase, then the block synchronises.
struct DeviceExec {
  template <class F>
  __device__ __forceinline__ void phase(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};

// grid.x = B * P blocks; block blk writes partial[blk] = [3][C][M] float64; bad: the two int64 counters.
template <int INK>
__global__ void __launch_bounds__(kThreads) stats_forward_kernel(StatsArgs a, Plan pl, double* __restrict__ partial,
                                                                 unsigned long long* __restrict__ bad) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  DeviceExec ex;
  const BadCounts nbad = forward_block<INK>(ex, a, pl, sm, partial, static_cast<int64_t>(blockIdx.x));
  // Integer atomics: the totals are exact and independent of the order. bad[0]: labels, bad[1]: non-finite p.
  if (nbad.labels != 0) atomicAdd(bad, static_cast<unsigned long long>(nbad.labels));
  if (nbad.nonfinite != 0) atomicAdd(bad + 1, static_cast<unsigned long long>(nbad.nonfinite));
}

// One warp per output entry r in [0, B * 3 * C * M): sums the image's P block partials (reduce_lane_sum: fixed
// per-lane order, then a fixed shuffle-down tree), lane 0 writes.
__global__ void stats_reduce_kernel(StatsArgs a, Plan pl, const double* __restrict__ partial, float* count,
                                    float* sum_p, float* sum_y) {
  const int64_t total = a.B * 3 * a.C * a.M;
  const int lane = static_cast<int>(threadIdx.x) & (kReduceLanes - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kReduceLanes;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kReduceLanes;
  for (int64_t r = warp; r < total; r += warps) {  // uniform across the warp
    double v = reduce_lane_sum(a, pl, partial, r, lane);
    for (int off = kReduceLanes / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) reduce_store(a, count, sum_p, sum_y, r, v);
  }
}

template <int INK>
__global__ void __launch_bounds__(kThreads) stats_backward_kernel(StatsArgs a, Plan pl, const float* __restrict__ gc,
                                                                  const float* __restrict__ gp,
                                                                  const float* __restrict__ gy, void* grad) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  DeviceExec ex;
  backward_block<INK>(ex, a, pl, sm, gc, gp, gy, grad, static_cast<int64_t>(blockIdx.x));
}

template <class Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

const char* check_plan(const Plan& pl) {
  if (pl.error != nullptr) return pl.error;
  if (pl.threads != kThreads) return "internal error: plan thread count does not match the kernels";
  return nullptr;
}

const char* last_error(cudaError_t err) {
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int INK>
cudaError_t launch_forward(const StatsArgs& a, const Plan& pl, double* ws, unsigned long long* bad,
                           cudaStream_t stream) {
  const cudaError_t err = allow_smem(stats_forward_kernel<INK>, pl.smem_bytes);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(a.B * pl.blocks_per_image);
  stats_forward_kernel<INK><<<blocks, kThreads, pl.smem_bytes, stream>>>(a, pl, ws, bad);
  return cudaGetLastError();
}

template <int INK>
cudaError_t launch_backward(const StatsArgs& a, const Plan& pl, const float* gc, const float* gp, const float* gy,
                            void* grad, cudaStream_t stream) {
  const cudaError_t err = allow_smem(stats_backward_kernel<INK>, pl.smem_bytes);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(a.B * pl.blocks_per_image);
  stats_backward_kernel<INK><<<blocks, kThreads, pl.smem_bytes, stream>>>(a, pl, gc, gp, gy, grad);
  return cudaGetLastError();
}

}  // namespace

int64_t device_smem_limit(int device) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return -1;
  return value;
}

const char* launch_binned_stats(const StatsArgs& a, const Plan& pl, double* workspace, float* count, float* sum_p,
                                float* sum_y, int64_t* bad, cudaStream_t stream) {
  if (const char* msg = check_plan(pl)) return msg;
  cudaError_t err = cudaMemsetAsync(bad, 0, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return last_error(err);
  if (a.B == 0) return nullptr;
  auto* bad_u = reinterpret_cast<unsigned long long*>(bad);
  if (a.N > 0) {
    switch (a.input_kind) {
      case kF32:
        err = launch_forward<kF32>(a, pl, workspace, bad_u, stream);
        break;
      case kF16:
        err = launch_forward<kF16>(a, pl, workspace, bad_u, stream);
        break;
      case kBF16:
        err = launch_forward<kBF16>(a, pl, workspace, bad_u, stream);
        break;
      default:
        return "unsupported input dtype";
    }
    if (err != cudaSuccess) return last_error(err);
  }
  const int64_t outputs = a.B * 3 * a.C * a.M;
  const int64_t want = (outputs * kReduceLanes + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
  stats_reduce_kernel<<<blocks, 256, 0, stream>>>(a, pl, workspace, count, sum_p, sum_y);
  return last_error(cudaSuccess);
}

const char* launch_binned_stats_backward(const StatsArgs& a, const Plan& pl, const float* grad_count,
                                         const float* grad_sum_p, const float* grad_sum_y, void* grad_input,
                                         cudaStream_t stream) {
  if (const char* msg = check_plan(pl)) return msg;
  if (a.B == 0 || a.N == 0) return nullptr;
  cudaError_t err;
  switch (a.input_kind) {
    case kF32:
      err = launch_backward<kF32>(a, pl, grad_count, grad_sum_p, grad_sum_y, grad_input, stream);
      break;
    case kF16:
      err = launch_backward<kF16>(a, pl, grad_count, grad_sum_p, grad_sum_y, grad_input, stream);
      break;
    case kBF16:
      err = launch_backward<kBF16>(a, pl, grad_count, grad_sum_p, grad_sum_y, grad_input, stream);
      break;
    default:
      return "unsupported input dtype";
  }
  return last_error(err);
}

}  // namespace calibops_cuda
