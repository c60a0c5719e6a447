// SIMD shim of the CPU kernels: one small vector abstraction (VF floats, VI int32, VM lane masks) with VL = 16
// (AVX-512), 8 (AVX2) or 1 (base: plain scalar code), the lane-wise exp, register-resident table lookups (Tab,
// look) and the row gather. Code written over it performs the same IEEE operations in the same order in every
// build (no FMA), so every ISA build gives bitwise the same results. Part of the per-ISA build (kernel_impl.h).
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

#if CALIBOPS_ISA_LEVEL >= 1
// dst[4 v .. 4 v + 3] = (1, p, p * p, p * (y * inv_r)) in float64 for 4 lanes (the moments' entry quads: exact
// conversions, then the same two IEEE products as the generic path's pack_general, no FMA).
static inline void store_quads4(double* dst, __m128 p4, __m128 y4, __m256d inv_r) {
  const __m256d one = _mm256_set1_pd(1.0), pd = _mm256_cvtps_pd(p4);
  const __m256d p2 = _mm256_mul_pd(pd, pd), py = _mm256_mul_pd(pd, _mm256_mul_pd(_mm256_cvtps_pd(y4), inv_r));
  const __m256d t0 = _mm256_unpacklo_pd(one, pd), t1 = _mm256_unpackhi_pd(one, pd);  // (1 p0 1 p2), (1 p1 1 p3)
  const __m256d t2 = _mm256_unpacklo_pd(p2, py), t3 = _mm256_unpackhi_pd(p2, py);    // (a0 b0 a2 b2), (a1 b1 a3 b3)
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + 4, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 8, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 12, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#endif

#if CALIBOPS_ISA_LEVEL >= 2
constexpr int VL = 16;
typedef __m512 VF;
typedef __m512i VI;
typedef __mmask16 VM;
static inline VF fload(const float* p) { return _mm512_loadu_ps(p); }
static inline void fstore(float* p, VF a) { _mm512_storeu_ps(p, a); }
static inline void fstore_nt(float* p, VF a) { _mm512_stream_ps(p, a); }  // p 64-byte aligned
static inline void stream_fence() { _mm_sfence(); }
static inline VI iload(const i32* p) { return _mm512_loadu_si512(p); }
static inline void istore(i32* p, VI a) { _mm512_storeu_si512(p, a); }
static inline VF fset(float a) { return _mm512_set1_ps(a); }
static inline VI iset(i32 a) { return _mm512_set1_epi32(a); }
static inline VF fadd(VF a, VF b) { return _mm512_add_ps(a, b); }
static inline VF fsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
static inline VF fmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
static inline VF fdiv(VF a, VF b) { return _mm512_div_ps(a, b); }
static inline VF fmax_(VF a, VF b) { return _mm512_max_ps(a, b); }  // a > b ? a : b
static inline VF fmin_(VF a, VF b) { return _mm512_min_ps(a, b); }  // a < b ? a : b
static inline VM fgt(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline VM fge(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
static inline VM flt(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline VM fle(VF a, VF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
static inline VF fsel(VM m, VF a, VF b) { return _mm512_mask_blend_ps(m, b, a); }
static inline VI isel(VM m, VI a, VI b) { return _mm512_mask_blend_epi32(m, b, a); }
static inline VM igt(VI a, VI b) { return _mm512_cmpgt_epi32_mask(a, b); }
static inline VM ilt(VI a, VI b) { return _mm512_cmplt_epi32_mask(a, b); }
static inline VM mand(VM a, VM b) { return static_cast<VM>(a & b); }
static inline VI iadd(VI a, VI b) { return _mm512_add_epi32(a, b); }
static inline VI isub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
static inline VI imin(VI a, VI b) { return _mm512_min_epi32(a, b); }
static inline VI ishl23(VI a) { return _mm512_slli_epi32(a, 23); }
static inline VI cvtt(VF a) { return _mm512_cvttps_epi32(a); }
static inline VF as_f(VI a) { return _mm512_castsi512_ps(a); }
static inline VI as_i(VF a) { return _mm512_castps_si512(a); }
static inline VF fneg(VF a) { return _mm512_xor_ps(a, fset(-0.0f)); }
static inline VM ieq(VI a, VI b) { return _mm512_cmpeq_epi32_mask(a, b); }
static inline VM mor(VM a, VM b) { return static_cast<VM>(a | b); }
static inline VI iinc(VI a, VM m) { return _mm512_mask_add_epi32(a, m, a, _mm512_set1_epi32(1)); }  // a + [m]
// Lanes whose p is NaN or +-inf: one vfpclassps (classes QNaN 0x01, +inf 0x08, -inf 0x10, SNaN 0x80), exact
// whatever the floating-point flags.
static inline VM fnonfinite(VF a) { return _mm512_fpclass_ps_mask(a, 0x99); }
// dst[2 v], dst[2 v + 1] = (1, p[v]) in float64 for the VL lanes.
static inline void store_pairs(double* dst, VF p) {
  const __m512d ones = _mm512_set1_pd(1.0);
  const __m512i ia = _mm512_set_epi64(11, 0, 10, 0, 9, 0, 8, 0), ib = _mm512_set_epi64(15, 0, 14, 0, 13, 0, 12, 0);
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(p)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(p, 1));
  _mm512_storeu_pd(dst, _mm512_permutex2var_pd(ones, ia, lo));
  _mm512_storeu_pd(dst + 8, _mm512_permutex2var_pd(ones, ib, lo));
  _mm512_storeu_pd(dst + 16, _mm512_permutex2var_pd(ones, ia, hi));
  _mm512_storeu_pd(dst + 24, _mm512_permutex2var_pd(ones, ib, hi));
}
static inline void store_quads(double* dst, VF p, VF y, double inv_r) {
  const __m256d ir = _mm256_set1_pd(inv_r);
  store_quads4(dst, _mm512_extractf32x4_ps(p, 0), _mm512_extractf32x4_ps(y, 0), ir);
  store_quads4(dst + 16, _mm512_extractf32x4_ps(p, 1), _mm512_extractf32x4_ps(y, 1), ir);
  store_quads4(dst + 32, _mm512_extractf32x4_ps(p, 2), _mm512_extractf32x4_ps(y, 2), ir);
  store_quads4(dst + 48, _mm512_extractf32x4_ps(p, 3), _mm512_extractf32x4_ps(y, 3), ir);
}
// j0 - [j0 > 0 and p (<= or <) lo] + [p (> or >=) hi]: the one-step correction of the estimated hard bin.
template <bool RIGHT>
static inline VI bin_adjust(VI j0, VF p, VF lo, VF hi) {
  const VM pos = _mm512_cmpgt_epi32_mask(j0, _mm512_setzero_si512());
  const VM dec = _mm512_mask_cmp_ps_mask(pos, p, lo, RIGHT ? _CMP_LT_OQ : _CMP_LE_OQ);
  const VM inc = _mm512_cmp_ps_mask(p, hi, RIGHT ? _CMP_GE_OQ : _CMP_GT_OQ);
  const VI one = _mm512_set1_epi32(1);
  const VI d = _mm512_mask_sub_epi32(j0, dec, j0, one);
  return _mm512_mask_add_epi32(d, inc, d, one);
}
struct Tab {
  __m512 lo, hi;
};
static inline Tab make_tab(const float* t32) { return {_mm512_load_ps(t32), _mm512_load_ps(t32 + 16)}; }
static inline VF look(const Tab& t, VI k) { return _mm512_permutex2var_ps(t.lo, k, t.hi); }
#elif CALIBOPS_ISA_LEVEL == 1
constexpr int VL = 8;
typedef __m256 VF;
typedef __m256i VI;
typedef __m256i VM;
static inline VF fload(const float* p) { return _mm256_loadu_ps(p); }
static inline void fstore(float* p, VF a) { _mm256_storeu_ps(p, a); }
static inline void fstore_nt(float* p, VF a) { _mm256_stream_ps(p, a); }  // p 32-byte aligned
static inline void stream_fence() { _mm_sfence(); }
static inline VI iload(const i32* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline void istore(i32* p, VI a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
static inline VF fset(float a) { return _mm256_set1_ps(a); }
static inline VI iset(i32 a) { return _mm256_set1_epi32(a); }
static inline VF fadd(VF a, VF b) { return _mm256_add_ps(a, b); }
static inline VF fsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
static inline VF fmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
static inline VF fdiv(VF a, VF b) { return _mm256_div_ps(a, b); }
static inline VF fmax_(VF a, VF b) { return _mm256_max_ps(a, b); }
static inline VF fmin_(VF a, VF b) { return _mm256_min_ps(a, b); }
static inline VM fgt(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
static inline VM fge(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
static inline VM flt(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
static inline VM fle(VF a, VF b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LE_OQ)); }
static inline VF fsel(VM m, VF a, VF b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
static inline VI isel(VM m, VI a, VI b) { return _mm256_blendv_epi8(b, a, m); }
static inline VM igt(VI a, VI b) { return _mm256_cmpgt_epi32(a, b); }
static inline VM ilt(VI a, VI b) { return _mm256_cmpgt_epi32(b, a); }
static inline VM mand(VM a, VM b) { return _mm256_and_si256(a, b); }
static inline VI iadd(VI a, VI b) { return _mm256_add_epi32(a, b); }
static inline VI isub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
static inline VI imin(VI a, VI b) { return _mm256_min_epi32(a, b); }
static inline VI ishl23(VI a) { return _mm256_slli_epi32(a, 23); }
static inline VI cvtt(VF a) { return _mm256_cvttps_epi32(a); }
static inline VF as_f(VI a) { return _mm256_castsi256_ps(a); }
static inline VI as_i(VF a) { return _mm256_castps_si256(a); }
static inline VF fneg(VF a) { return _mm256_xor_ps(a, fset(-0.0f)); }
static inline VM ieq(VI a, VI b) { return _mm256_cmpeq_epi32(a, b); }
static inline VM mor(VM a, VM b) { return _mm256_or_si256(a, b); }
static inline VI iinc(VI a, VM m) { return _mm256_sub_epi32(a, m); }  // a + [m] (m is -1 / 0)
// Lanes whose p is NaN or +-inf: the exponent bits are all ones (a bit test, exact whatever the flags).
static inline VM fnonfinite(VF a) {
  const VI ex = _mm256_set1_epi32(0x7f800000);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(a), ex), ex);
}
static inline void store_pairs4(double* dst, __m128 p4) {
  const __m256d ones = _mm256_set1_pd(1.0), pv = _mm256_cvtps_pd(p4);
  const __m256d lo = _mm256_unpacklo_pd(ones, pv), hi = _mm256_unpackhi_pd(ones, pv);  // (1 p0 1 p2), (1 p1 1 p3)
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(lo, hi, 0x20));
  _mm256_storeu_pd(dst + 4, _mm256_permute2f128_pd(lo, hi, 0x31));
}
static inline void store_pairs(double* dst, VF p) {
  store_pairs4(dst, _mm256_castps256_ps128(p));
  store_pairs4(dst + 8, _mm256_extractf128_ps(p, 1));
}
static inline void store_quads(double* dst, VF p, VF y, double inv_r) {
  const __m256d ir = _mm256_set1_pd(inv_r);
  store_quads4(dst, _mm256_castps256_ps128(p), _mm256_castps256_ps128(y), ir);
  store_quads4(dst + 16, _mm256_extractf128_ps(p, 1), _mm256_extractf128_ps(y, 1), ir);
}
template <bool RIGHT>
static inline VI bin_adjust(VI j0, VF p, VF lo, VF hi) {  // comparison masks are -1 / 0 per lane
  const VM dec = mand(igt(j0, _mm256_setzero_si256()), RIGHT ? flt(p, lo) : fle(p, lo));
  const VM inc = RIGHT ? fge(p, hi) : fgt(p, hi);
  return _mm256_sub_epi32(_mm256_add_epi32(j0, dec), inc);
}
struct Tab {
  __m256 t0, t1, t2, t3;
};
static inline Tab make_tab(const float* t32) {
  return {_mm256_load_ps(t32), _mm256_load_ps(t32 + 8), _mm256_load_ps(t32 + 16), _mm256_load_ps(t32 + 24)};
}
static inline VF look(const Tab& t, VI k) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(k, 28));
  const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(k, 27));
  const __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.t0, k), _mm256_permutevar8x32_ps(t.t1, k), bit3);
  const __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.t2, k), _mm256_permutevar8x32_ps(t.t3, k), bit3);
  return _mm256_blendv_ps(a, b, bit4);
}
#else
constexpr int VL = 1;
typedef float VF;
typedef i32 VI;
typedef bool VM;
static inline VF fload(const float* p) { return *p; }
static inline void fstore(float* p, VF a) { *p = a; }
static inline void fstore_nt(float* p, VF a) { *p = a; }
static inline void stream_fence() {}
static inline VI iload(const i32* p) { return *p; }
static inline void istore(i32* p, VI a) { *p = a; }
static inline VF fset(float a) { return a; }
static inline VI iset(i32 a) { return a; }
static inline VF fadd(VF a, VF b) { return a + b; }
static inline VF fsub(VF a, VF b) { return a - b; }
static inline VF fmul(VF a, VF b) { return a * b; }
static inline VF fdiv(VF a, VF b) { return a / b; }
static inline VF fmax_(VF a, VF b) { return a > b ? a : b; }
static inline VF fmin_(VF a, VF b) { return a < b ? a : b; }
static inline VM fgt(VF a, VF b) { return a > b; }
static inline VM fge(VF a, VF b) { return a >= b; }
static inline VM flt(VF a, VF b) { return a < b; }
static inline VM fle(VF a, VF b) { return a <= b; }
static inline VF fsel(VM m, VF a, VF b) { return m ? a : b; }
static inline VI isel(VM m, VI a, VI b) { return m ? a : b; }
static inline VM igt(VI a, VI b) { return a > b; }
static inline VM ilt(VI a, VI b) { return a < b; }
static inline VM mand(VM a, VM b) { return a & b; }
static inline VI iadd(VI a, VI b) { return static_cast<i32>(static_cast<u32>(a) + static_cast<u32>(b)); }
static inline VI isub(VI a, VI b) { return static_cast<i32>(static_cast<u32>(a) - static_cast<u32>(b)); }
static inline VI imin(VI a, VI b) { return a < b ? a : b; }
static inline VI ishl23(VI a) { return static_cast<i32>(static_cast<u32>(a) << 23); }
static inline VI cvtt(VF a) { return static_cast<i32>(a); }
static inline VF as_f(VI a) { return u2f(static_cast<u32>(a)); }
static inline VI as_i(VF a) { return static_cast<i32>(f2u(a)); }
static inline VF fneg(VF a) { return -a; }
static inline VM ieq(VI a, VI b) { return a == b; }
static inline VM mor(VM a, VM b) { return a | b; }
static inline VI iinc(VI a, VM m) { return a + static_cast<i32>(m); }
static inline VM fnonfinite(VF a) { return nonfinite(a); }
static inline void store_pairs(double* dst, VF p) {
  dst[0] = 1.0;
  dst[1] = static_cast<double>(p);
}
static inline void store_quads(double* dst, VF p, VF y, double inv_r) {
  const double pd = static_cast<double>(p);
  dst[0] = 1.0;
  dst[1] = pd;
  dst[2] = pd * pd;
  dst[3] = pd * (static_cast<double>(y) * inv_r);
}
template <bool RIGHT>
static inline VI bin_adjust(VI j0, VF p, VF lo, VF hi) {
  const bool dec = (j0 > 0) & (RIGHT ? p < lo : p <= lo);
  const bool inc = RIGHT ? p >= hi : p > hi;
  return j0 - static_cast<i32>(dec) + static_cast<i32>(inc);
}
struct Tab {
  const float* t;
};
static inline Tab make_tab(const float* t32) { return {t32}; }
static inline VF look(const Tab& t, VI k) { return t.t[k]; }
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CALIBOPS_INLINE inline __attribute__((always_inline))
#else
#define CALIBOPS_INLINE inline
#endif

// exp_f above, lane-wise: the same operations in the same order. NONPOS: the caller guarantees x <= 0 or NaN
// (softmax: x - max), where the upper clamp and the overflow select are identities and are left out.
template <bool NONPOS = false>
static CALIBOPS_INLINE VF vexp(VF x) {
  const VF hi = fset(88.0f), lo = fset(-87.33654f), magic = fset(12582912.0f);
  VF xc = NONPOS ? x : fmin_(hi, x);  // x > hi ? hi : x (NaN passes)
  xc = fmax_(lo, xc);                 // xc < lo ? lo : xc
  const VF t = fadd(fmul(xc, fset(1.44269504088896341f)), magic);
  const VF n = fsub(t, magic);
  const VI ni = isub(as_i(t), as_i(magic));
  VF r = fsub(xc, fmul(n, fset(0.693359375f)));
  r = fsub(r, fmul(n, fset(-2.12194440e-4f)));
  VF y = fset(1.9875691500e-4f);
  y = fadd(fmul(y, r), fset(1.3981999507e-3f));
  y = fadd(fmul(y, r), fset(8.3334519073e-3f));
  y = fadd(fmul(y, r), fset(4.1665795894e-2f));
  y = fadd(fmul(y, r), fset(1.6666665459e-1f));
  y = fadd(fmul(y, r), fset(5.0000001201e-1f));
  y = fadd(fadd(fmul(y, fmul(r, r)), r), fset(1.0f));
  const VF scale = as_f(ishl23(iadd(ni, iset(127))));
  VF e = fmul(y, scale);
  e = fsel(flt(x, lo), fset(0.0f), e);
  if (!NONPOS) e = fsel(fgt(x, hi), fset(u2f(0x7f800000u)), e);
  return e;
}

// out[i] = table[idx[i]] for a table of `size` floats, 0 <= idx[i] < size; out may alias idx (in-place
// gather of an index row). AVX2 / AVX-512 builds: tables of up to 32 entries (the usual case: M = 20 bins) are
// held in registers and looked up with permutes; larger ones use gather instructions.
static void gather_row(const float* table, i64 size, const i32* idx, float* out, i64 n) {
  i64 i = 0;
#if CALIBOPS_ISA_LEVEL >= 1
  if (size <= 32) {
    alignas(64) float t[32] = {0.0f};
    for (i64 k = 0; k < size; ++k) t[k] = table[k];
#if CALIBOPS_ISA_LEVEL >= 2
    const __m512 lo = _mm512_load_ps(t), hi = _mm512_load_ps(t + 16);
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(lo, _mm512_loadu_si512(idx + i), hi));
#else
    const __m256 t0 = _mm256_load_ps(t), t1 = _mm256_load_ps(t + 8), t2 = _mm256_load_ps(t + 16),
                 t3 = _mm256_load_ps(t + 24);
    for (; i + 8 <= n; i += 8) {
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i));
      const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(k, 28));  // index bit 3 -> sign bit
      const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(k, 27));  // index bit 4 -> sign bit
      const __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, k), _mm256_permutevar8x32_ps(t1, k), bit3);
      const __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t2, k), _mm256_permutevar8x32_ps(t3, k), bit3);
      _mm256_storeu_ps(out + i, _mm256_blendv_ps(a, b, bit4));
    }
#endif
  } else {
#if CALIBOPS_ISA_LEVEL >= 2
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, _mm512_i32gather_ps(_mm512_loadu_si512(idx + i), table, 4));
#else
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(
          out + i, _mm256_i32gather_ps(table, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i)), 4));
#endif
  }
#else
  (void)size;
#endif
  for (; i < n; ++i) out[i] = table[idx[i]];
}

// Hard: bins[c][i] = bucketize(p, e[1:], right).clamp(max=M-1), M + 1 for non-finite p, M for masked voxels (both
// discarded slots). Soft: bins[c][i] = u = t + 1 in 0..M, t = #{k : centre[k] < p} - 1, M + 2 for non-finite p,
