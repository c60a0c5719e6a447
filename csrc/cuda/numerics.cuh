// Scalar numerics shared by the CUDA kernels and their host emulation (tests/cuda_emulation): the non-finite
// test, IEEE division, a float32 exp that is bit-identical on the GPU and the host, element loads / stores.
// Only the CUDA headers for half / bfloat16 are included (no torch header).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.cuh"

#if defined(__CUDACC__)
#define CB_HD __host__ __device__ __forceinline__
#else
#define CB_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define CB_UNROLL _Pragma("unroll")
#else
#define CB_UNROLL
#endif

namespace calibops_cuda {

// ---- scalar helpers (IEEE round-to-nearest where it matters, also under --use_fast_math) ----

// p is NaN or +-inf (the contract's non-finite rule): an all-ones exponent. A bit test on purpose: under
// --use_fast_math (setup.py's nvcc flags) or a host -ffinite-math-only the compiler may assume no NaN / inf and
// fold isnan / isinf / `p != p` to false; integer operations on the bits cannot be folded that way.
CB_HD bool is_nonfinite(float p) {
#if defined(__CUDA_ARCH__)
  const unsigned u = __float_as_uint(p);
#else
  unsigned u;
  std::memcpy(&u, &p, 4);
#endif
  return (u & 0x7f800000u) == 0x7f800000u;
}

CB_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// exp(x) in float32 to ~1 ulp, with the same operations on the GPU and on the host (so the host emulation
// computes bit-identical probabilities). Written out because --use_fast_math (setup.py's nvcc flags) turns
// expf into __expf, whose error grows with |x| (~1e-6 relative at x = -20): enough to move soft memberships
// by ~1e-5 and hard bins at the edges. exp(x) = 2^n exp(r), r = x - n ln2 (Cody-Waite, exact FMAs),
// |r| <= ln2 / 2, degree-7 Taylor polynomial (truncation < 1e-8 relative); 2^n applied in two halves so no
// exponent overflows. NaN propagates, x < -104 gives 0 and x > 88.8 gives inf, as expf does.
CB_HD float exp_f(float x) {
  if (x != x) return x;
  if (x < -104.0f) return 0.0f;
  if (x > 88.8f) return INFINITY;
#if defined(__CUDA_ARCH__)
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, x);
  r = fmaf(n, -1.42860682030941723212e-6f, r);
  float q = 1.98412698e-4f;
  q = fmaf(q, r, 1.38888889e-3f);
  q = fmaf(q, r, 8.33333333e-3f);
  q = fmaf(q, r, 4.16666667e-2f);
  q = fmaf(q, r, 1.66666667e-1f);
  q = fmaf(q, r, 0.5f);
  q = fmaf(q, r, 1.0f);
  q = fmaf(q, r, 1.0f);
#else
  const float n = std::rint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.42860682030941723212e-6f, r);
  float q = 1.98412698e-4f;
  q = std::fma(q, r, 1.38888889e-3f);
  q = std::fma(q, r, 8.33333333e-3f);
  q = std::fma(q, r, 4.16666667e-2f);
  q = std::fma(q, r, 1.66666667e-1f);
  q = std::fma(q, r, 0.5f);
  q = std::fma(q, r, 1.0f);
  q = std::fma(q, r, 1.0f);
#endif
  const int ni = static_cast<int>(n);  // -150 .. 128
  const int h1 = ni / 2, h2 = ni - h1;  // each in -75 .. 64
  const int b1 = (h1 + 127) << 23, b2 = (h2 + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float s1 = __int_as_float(b1), s2 = __int_as_float(b2);
#else
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
#endif
  return q * s1 * s2;
}

template <int K>
CB_HD float load_in(const void* p, int64_t i) {
  if (K == kF16) return __half2float(__ushort_as_half(static_cast<const unsigned short*>(p)[i]));
  if (K == kBF16) return __bfloat162float(__ushort_as_bfloat16(static_cast<const unsigned short*>(p)[i]));
  return static_cast<const float*>(p)[i];
}

template <int K>
CB_HD void store_out(void* p, int64_t i, float v) {
  if (K == kF16) {
    static_cast<unsigned short*>(p)[i] = __half_as_ushort(__float2half_rn(v));
  } else if (K == kBF16) {
    static_cast<unsigned short*>(p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// Dense target value as float32 (kind is uniform across the launch, so the switch does not diverge).
CB_HD float load_dense(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF16:
      return load_in<kF16>(p, i);
    case kBF16:
      return load_in<kBF16>(p, i);
    case kU8:
    case kBool:  // one byte, 0 / 1
      return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    default:
      return load_in<kF32>(p, i);
  }
}

CB_HD int64_t load_label(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kU8:
      return static_cast<const uint8_t*>(p)[i];
    case kI8:
      return static_cast<const int8_t*>(p)[i];
    case kI16:
      return static_cast<const int16_t*>(p)[i];
    case kI32:
      return static_cast<const int32_t*>(p)[i];
    default:
      return static_cast<const int64_t*>(p)[i];
  }
}

}  // namespace calibops_cuda
