// AVX-512 (F, BW, VL, DQ) build of the CPU kernels (x86-64, GCC or Clang); chosen at run time when the CPU has AVX-512.
// The target is set for this translation unit only, after the standard headers, so nothing outside
// kernel_impl.h (whose code has internal linkage in its own namespace) is compiled for AVX-512.
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CALIBOPS_ISA_LEVEL 2
#define CALIBOPS_ISA_NS isa_avx512
#define CALIBOPS_ISA_NAME "avx512"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#endif
#include "kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace calibops {
namespace cpu {
const KernelTable* kernels_avx512() { return &isa_avx512::kTable; }
}  // namespace cpu
}  // namespace calibops
#else
namespace calibops {
namespace cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace calibops
#endif
