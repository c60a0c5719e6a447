// Numerics of the CPU kernels: bit casts, the exponent-bit test for non-finite values, float16 / bfloat16
// conversions and the vectorisable exp. Part of the per-ISA build (included by kernel_impl.h inside the namespace
// calibops::cpu::<isa>); branch-free so the loops calling these functions vectorise.
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

using i32 = int32_t;
using i64 = int64_t;
using u16 = uint16_t;
using u32 = uint32_t;

static inline u32 f2u(float f) {
  u32 u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float u2f(u32 u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// p is NaN or +-inf: an all-ones exponent. A bit test, not isnan / isinf, so it holds under any floating-point
// flags (-ffinite-math-only may fold those away) and vectorises as two integer operations.
static inline bool nonfinite(float p) { return (f2u(p) & 0x7f800000u) == 0x7f800000u; }

// ---------------------------------------------------------------------------------------------------------
// Scalar conversions (branch-free: they sit inside vectorised loops).

// IEEE binary16 -> float32, exact for normals, subnormals, inf and NaN.
static inline float half_to_float(u16 h) {
  const u32 sign = static_cast<u32>(h & 0x8000u) << 16;
  const u32 em = h & 0x7fffu;
  const u32 scaled = f2u(u2f(em << 13) * 0x1p112f);  // rebias the exponent (also right for subnormals)
  const u32 special = (em << 13) | 0x7f800000u;       // inf / NaN keep their payload
  return u2f((em >= 0x7c00u ? special : scaled) | sign);
}

static inline float bf16_to_float(u16 h) { return u2f(static_cast<u32>(h) << 16); }

// float32 -> binary16, round to nearest even (overflow -> inf, NaN -> quiet NaN).
static inline u16 float_to_half(float f) {
  u32 u = f2u(f);
  const u32 sign = u & 0x80000000u;
  u ^= sign;
  const u32 o_special = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const u32 magic = 126u << 23;  // 0.5f: adding it rounds a subnormal half mantissa into the low bits
  const u32 o_sub = f2u(u2f(u) + u2f(magic)) - magic;
  const u32 mant_odd = (u >> 13) & 1u;
  const u32 o_norm = (u + (static_cast<u32>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const u32 o = u >= (143u << 23) ? o_special : (u < (113u << 23) ? o_sub : o_norm);
  return static_cast<u16>(o | (sign >> 16));
}

// float32 -> bfloat16, round to nearest even, NaN stays a (quiet) NaN.
static inline u16 float_to_bf16(float f) {
  const u32 u = f2u(f);
  const u32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u32 nan = (u >> 16) | 0x40u;
  return static_cast<u16>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// exp(x) for float32, ~1 ulp (Cephes polynomial on [-ln2/2, ln2/2]); exp(-inf) = 0, exp(+inf) = inf, NaN -> NaN.
// Written without branches or library calls so loops calling it vectorise.
static inline float exp_f(float x) {
  const float hi = 88.0f, lo = -87.33654f;
  float xc = x > hi ? hi : x;  // NaN passes through both clamps
  xc = xc < lo ? lo : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const i32 ni = static_cast<i32>(f2u(t) - f2u(magic));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float scale = u2f(static_cast<u32>(ni + 127) << 23);
  float e = y * scale;
  e = x < lo ? 0.0f : e;
  e = x > hi ? u2f(0x7f800000u) : e;  // +inf
  return e;
}

