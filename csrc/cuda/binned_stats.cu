// CUDA kernels and launchers of calibops::binned_stats / binned_stats_backward (docs/kernel_contract.md).
// Includes only the CUDA runtime (no torch header), so `nvcc -c binned_stats.cu` works on any machine with nvcc.
// The block programs live in stats_kernels.cuh (shared with the host emulation the tests run without a GPU,
// tests/cuda_emulation); the launch plan and the design (deterministic per-thread histogram columns, fixed-order
// partial sums) are described in launchers.cuh. Each kernel is a template over the Variant (input kind, mode,
// raters, moments): 8 forward and 8 backward kernels per input kind, 24 of each in all.
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

// grid.x = B * P blocks; block blk writes partial[blk] = [nstat][K][M] float64; bad: the two int64 counters.
// At least 4 blocks per SM: the forward's shared memory (~50 KiB for the issue's shapes) allows 4 per H100 SM,
// and the bound lets ptxas use up to 64 registers (without it, it picks 40 and spills ~28 bytes in the v1
// variants; with it, no spill: benchmarks/bench_gpu.py --cuda-registers).
template <class Var>
__global__ void __launch_bounds__(kThreads, 4) stats_forward_kernel(StatsArgs a, Plan pl, double* __restrict__ partial,
                                                                 unsigned long long* __restrict__ bad) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  DeviceExec ex;
  const BadCounts nbad = forward_block<Var>(ex, a, pl, sm, partial, static_cast<int64_t>(blockIdx.x));
  // Integer atomics: the totals are exact and independent of the order. bad[0]: labels, bad[1]: non-finite p.
  if (nbad.labels != 0) atomicAdd(bad, static_cast<unsigned long long>(nbad.labels));
  if (nbad.nonfinite != 0) atomicAdd(bad + 1, static_cast<unsigned long long>(nbad.nonfinite));
}

// One warp per output entry r in [0, B * nstat * K * M): sums the image's P block partials (reduce_lane_sum:
// fixed per-lane order, then a fixed shuffle-down tree), lane 0 writes.
__global__ void stats_reduce_kernel(StatsArgs a, Plan pl, const double* __restrict__ partial, OutPtrs out) {
  const int64_t total = a.B * pl.nstat * a.K * a.M;
  const int lane = static_cast<int>(threadIdx.x) & (kReduceLanes - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kReduceLanes;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kReduceLanes;
  for (int64_t r = warp; r < total; r += warps) {  // uniform across the warp
    double v = reduce_lane_sum(a, pl, partial, r, lane);
    for (int off = kReduceLanes / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) reduce_store(a, pl, out, r, v);
  }
}

template <class Var>
__global__ void __launch_bounds__(kThreads) stats_backward_kernel(StatsArgs a, Plan pl, GradPtrs g, void* grad) {
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  DeviceExec ex;
  backward_block<Var>(ex, a, pl, sm, g, grad, static_cast<int64_t>(blockIdx.x));
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

}  // namespace

int64_t device_smem_limit(int device) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return -1;
  return value;
}

const char* launch_binned_stats(const StatsArgs& a, const Plan& pl, double* workspace, const OutPtrs& out,
                                int64_t* bad, cudaStream_t stream) {
  if (const char* msg = check_plan(pl)) return msg;
  cudaError_t err = cudaMemsetAsync(bad, 0, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return last_error(err);
  if (a.B == 0) return nullptr;
  auto* bad_u = reinterpret_cast<unsigned long long*>(bad);
  if (a.N > 0) {
    const unsigned blocks = static_cast<unsigned>(a.B * pl.blocks_per_image);
    const bool known = with_variant(a, [&](auto var) {
      using Var = decltype(var);
      err = allow_smem(stats_forward_kernel<Var>, pl.smem_bytes);
      if (err != cudaSuccess) return;
      stats_forward_kernel<Var><<<blocks, kThreads, pl.smem_bytes, stream>>>(a, pl, workspace, bad_u);
      err = cudaGetLastError();
    });
    if (!known) return "unsupported input dtype";
    if (err != cudaSuccess) return last_error(err);
  }
  const int64_t outputs = a.B * pl.nstat * a.K * a.M;
  const int64_t want = (outputs * kReduceLanes + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
  if (blocks > 0) stats_reduce_kernel<<<blocks, 256, 0, stream>>>(a, pl, workspace, out);
  return last_error(cudaSuccess);
}

const char* launch_binned_stats_backward(const StatsArgs& a, const Plan& pl, const GradPtrs& grads,
                                         void* grad_input, cudaStream_t stream) {
  if (const char* msg = check_plan(pl)) return msg;
  if (a.B == 0 || a.N == 0) return nullptr;
  cudaError_t err = cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(a.B * pl.blocks_per_image);
  const bool known = with_variant(a, [&](auto var) {
    using Var = decltype(var);
    err = allow_smem(stats_backward_kernel<Var>, pl.smem_bytes);
    if (err != cudaSuccess) return;
    stats_backward_kernel<Var><<<blocks, kThreads, pl.smem_bytes, stream>>>(a, pl, grads, grad_input);
    err = cudaGetLastError();
  });
  if (!known) return "unsupported input dtype";
  return last_error(err);
}

}  // namespace calibops_cuda
