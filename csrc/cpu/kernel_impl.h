// The fused CPU kernels (forward statistics and backward gradient), written once and compiled once per
// instruction set: kernel_<isa>.cpp defines CALIBOPS_ISA_NS / CALIBOPS_ISA_NAME, selects the target and
// includes this file. Everything lives in the namespace calibops::cpu::<isa>, with internal linkage, and uses
// no torch or standard-library inline code, so the ISA builds never share machine code by accident.
//
// Work unit: a tile of T voxels of one image, held as [C][T] float rows in L1:
//   load (own dtype -> f32) -> activation (softmax over C / sigmoid, vectorised exp) -> bin index per
//   (class, voxel) -> forward: scatter into small per-worker float64 histograms; backward: gather the
//   per-bin gradient, chain through the activation, store in the input dtype.
// The inner loops over the T voxels of a row are branch-free so the compiler vectorises them.
#if !defined(CALIBOPS_ISA_NS) || !defined(CALIBOPS_ISA_LEVEL)
#error "kernel_impl.h is included by kernel_<isa>.cpp only"
#endif

namespace calibops {
namespace cpu {
namespace CALIBOPS_ISA_NS {

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

// ---------------------------------------------------------------------------------------------------------
// Scratch layout (floats) for one worker: rows of T floats, T a multiple of 16 (64-byte aligned rows).

struct Layout {
  i64 x, y, bins, g, lab, rowa, rowb, ea, eb, pk, ftab, lo_of, dtab, total;
};

static Layout layout(const Problem& pb) {
  const i64 T = pb.tile, C = pb.C, M2 = pb.M + 2;
  Layout L;
  L.x = 0;                 // [C][T] input, then p
  L.y = L.x + C * T;       // [C][T] dense target as float
  L.bins = L.y + C * T;    // [C][T] int32 hard bin / soft state u
  L.g = L.bins + C * T;    // [C][T] backward: d loss / d p
  L.lab = L.g + C * T;     // [T] int32 label or -1 (ignored / out of range)
  L.rowa = L.lab + T;      // [T] softmax max, then 1 / sum; backward: sum_c p g
  L.rowb = L.rowa + T;     // [T] softmax sum
  L.ea = L.rowb + T;       // [T] binning / backward gathers
  L.eb = L.ea + T;         // [T]
  L.pk = L.eb + T;         // [T][4] float64 packed (1, p, y, 0) of one class row (T a multiple of 16)
  L.ftab = L.pk + 8 * T;   // [3][C][M + 2] backward gradient tables
  L.lo_of = L.ftab + 3 * C * M2;           // [M + 2] int32 soft state -> low bin
  L.dtab = ((L.lo_of + M2 + 15) / 16) * 16;  // [3][M + 2] float64 soft state -> (c_hi, 1/d, base)
  L.total = L.dtab + 6 * M2 + 16;
  return L;
}

static size_t scratch_floats(const Problem& pb) { return static_cast<size_t>(layout(pb).total); }

static size_t hist_doubles(const Problem& pb) {
  return static_cast<size_t>(pb.C * pb.copies * (pb.M + 2) * 4);
}

// ---------------------------------------------------------------------------------------------------------
// Tile loading.

static void load_float_row(const void* base, int kind, i64 off, i64 n, float* __restrict dst) {
  if (kind == kF32) {
    const float* __restrict s = static_cast<const float*>(base) + off;
    for (i64 i = 0; i < n; ++i) dst[i] = s[i];
  } else if (kind == kF16) {
    const u16* __restrict s = static_cast<const u16*>(base) + off;
    for (i64 i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else if (kind == kBF16) {
    const u16* __restrict s = static_cast<const u16*>(base) + off;
    for (i64 i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else if (kind == kBool) {
    const unsigned char* __restrict s = static_cast<const unsigned char*>(base) + off;
    for (i64 i = 0; i < n; ++i) dst[i] = s[i] != 0 ? 1.0f : 0.0f;
  } else {  // kU8
    const unsigned char* __restrict s = static_cast<const unsigned char*>(base) + off;
    for (i64 i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  }
}

static void store_row(void* base, int kind, i64 off, i64 n, const float* __restrict src) {
  if (kind == kF32) {
    float* __restrict d = static_cast<float*>(base) + off;
    for (i64 i = 0; i < n; ++i) d[i] = src[i];
  } else if (kind == kF16) {
    u16* __restrict d = static_cast<u16*>(base) + off;
    for (i64 i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
  } else {  // kBF16
    u16* __restrict d = static_cast<u16*>(base) + off;
    for (i64 i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  }
}

// lab[i] = label when in [0, C) and not ignore_index, else -1; returns how many were neither in range nor ignore_index.
template <typename T>
static i64 load_labels_t(const T* __restrict s, i64 n, i64 C, bool has_ignore, i64 ignore, i32* __restrict lab) {
  i64 bad = 0;
  for (i64 i = 0; i < n; ++i) {
    const i64 v = static_cast<i64>(s[i]);
    const bool in = (v >= 0) & (v < C);
    const bool ign = has_ignore & (v == ignore);
    lab[i] = (in & !ign) ? static_cast<i32>(v) : -1;
    bad += static_cast<i64>(!in & !ign);
  }
  return bad;
}

static i64 load_labels(const Problem& pb, i64 off, i64 n, i32* lab) {
  const bool hi = pb.has_ignore;
  const i64 ig = pb.ignore_index, C = pb.C;
  switch (pb.target_kind) {
    case kU8:
      return load_labels_t(static_cast<const uint8_t*>(pb.target) + off, n, C, hi, ig, lab);
    case kI8:
      return load_labels_t(static_cast<const int8_t*>(pb.target) + off, n, C, hi, ig, lab);
    case kI16:
      return load_labels_t(static_cast<const int16_t*>(pb.target) + off, n, C, hi, ig, lab);
    case kI32:
      return load_labels_t(static_cast<const int32_t*>(pb.target) + off, n, C, hi, ig, lab);
    default:
      return load_labels_t(static_cast<const int64_t*>(pb.target) + off, n, C, hi, ig, lab);
  }
}

// x [C][T] in place: logits -> probabilities.
static void activate(const Problem& pb, float* __restrict x, float* __restrict rowa, float* __restrict rowb,
                     i64 n) {
  const i64 T = pb.tile, C = pb.C;
  if (pb.activation == 1) {
    for (i64 i = 0; i < n; ++i) rowa[i] = x[i];
    for (i64 c = 1; c < C; ++c) {
      const float* __restrict xc = x + c * T;
      for (i64 i = 0; i < n; ++i) rowa[i] = xc[i] > rowa[i] ? xc[i] : rowa[i];
    }
    for (i64 i = 0; i < n; ++i) rowb[i] = 0.0f;
    for (i64 c = 0; c < C; ++c) {
      float* __restrict xc = x + c * T;
      for (i64 i = 0; i < n; ++i) {
        const float e = exp_f(xc[i] - rowa[i]);
        xc[i] = e;
        rowb[i] += e;
      }
    }
    for (i64 i = 0; i < n; ++i) rowa[i] = 1.0f / rowb[i];
    for (i64 c = 0; c < C; ++c) {
      float* __restrict xc = x + c * T;
      for (i64 i = 0; i < n; ++i) xc[i] *= rowa[i];
    }
  } else if (pb.activation == 2) {
    for (i64 c = 0; c < C; ++c) {
      float* __restrict xc = x + c * T;
      for (i64 i = 0; i < n; ++i) xc[i] = 1.0f / (1.0f + exp_f(-xc[i]));
    }
  }
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

// Hard: bins[c][i] = bucketize(p, e[1:], right).clamp(max=M-1), or M (a discarded slot) for masked voxels.
// Soft: bins[c][i] = u = t + 1 in 0..M, t = #{k : centre[k] < p} - 1, or M + 1 for masked voxels.
// Both estimate from p * M (clamped first, so NaN / inf give a valid index) and correct by one step against
// the given edges / centres (gathered into rows ea, eb), so every backend bins identically.
static void compute_bins(const Problem& pb, const float* __restrict x, const i32* __restrict lab,
                         i32* __restrict bins, float* ea, float* eb, i64 n) {
  const i64 T = pb.tile, C = pb.C;
  const i32 M = static_cast<i32>(pb.M);
  const float Mf = static_cast<float>(pb.M), top = static_cast<float>(pb.M - 1);
  const float* e = pb.edges;
  i32* ia = reinterpret_cast<i32*>(ea);
  i32* ib = reinterpret_cast<i32*>(eb);
  const i32 drop = pb.soft ? M + 1 : M;
  for (i64 c = 0; c < C; ++c) {
    const float* __restrict p = x + c * T;
    i32* __restrict out = bins + c * T;
    if (!pb.soft) {
      for (i64 i = 0; i < n; ++i) {
        float q = p[i] * Mf;
        q = q >= 0.0f ? q : 0.0f;  // also maps NaN to 0
        q = q <= top ? q : top;
        out[i] = static_cast<i32>(q);
      }
      gather_row(e, M + 1, out, ea, n);  // e[j0]
      gather_row(e + 1, M, out, eb, n);  // e[j0 + 1]
      if (!pb.right) {
        for (i64 i = 0; i < n; ++i) {
          const i32 j0 = out[i];
          const i32 j = j0 - static_cast<i32>((j0 > 0) & (p[i] <= ea[i])) + static_cast<i32>(p[i] > eb[i]);
          out[i] = j < M - 1 ? j : M - 1;
        }
      } else {
        for (i64 i = 0; i < n; ++i) {
          const i32 j0 = out[i];
          const i32 j = j0 - static_cast<i32>((j0 > 0) & (p[i] < ea[i])) + static_cast<i32>(p[i] >= eb[i]);
          out[i] = j < M - 1 ? j : M - 1;
        }
      }
    } else {
      for (i64 i = 0; i < n; ++i) {
        float q = p[i] * Mf - 0.5f;
        q = q >= -1.0f ? q : -1.0f;  // also maps NaN to -1
        q = q <= top ? q : top;
        const i32 t0 = static_cast<i32>(q + 1.0f) - 1;  // floor, since q + 1 >= 0
        out[i] = t0;
        ia[i] = t0 >= 0 ? t0 : 0;
        ib[i] = t0 + 1 < M ? t0 + 1 : M - 1;
      }
      gather_row(e, M, ia, ea, n);  // c[t0], in place
      gather_row(e, M, ib, eb, n);  // c[t0 + 1], in place
      for (i64 i = 0; i < n; ++i) {
        const i32 t0 = out[i];
        const i32 dec = static_cast<i32>((t0 >= 0) & !(ea[i] < p[i]));
        const i32 inc = static_cast<i32>((t0 + 1 < M) & (eb[i] < p[i]));
        out[i] = t0 - dec + inc + 1;
      }
    }
    if (pb.labels)
      for (i64 i = 0; i < n; ++i) out[i] = lab[i] >= 0 ? out[i] : drop;
  }
}

// Soft state u -> (low bin, c_hi, 1/(c_hi - c_lo), base) so that w_lo = (c_hi - p) / d in the interior states
// 1..M-1 and w_lo = base (a constant, whatever p, NaN included) outside: below the first centre all weight goes
// to bin 0, above the last to bin M-1, masked voxels go to the discarded slots M and M+1.
static inline i32 soft_low_bin(i32 u, i32 M) {
  const i32 top = M - 2 > 0 ? M - 2 : 0;
  const i32 l = u - 1 > 0 ? u - 1 : 0;
  return u == M + 1 ? M : (l < top ? l : top);
}

static inline bool soft_interior(i32 u, i32 M) { return static_cast<u32>(u - 1) < static_cast<u32>(M - 1); }

static inline float soft_outside_weight(i32 u, i32 M) { return ((u == 0) | (u == M + 1) | (M == 1)) ? 1.0f : 0.0f; }

static void soft_tables(const Problem& pb, i32* lo_of, double* chi, double* invd, double* base) {
  const i64 M = pb.M;
  const float* c = pb.edges;
  const i32 Mi = static_cast<i32>(M);
  for (i32 u = 0; u <= Mi + 1; ++u) {
    lo_of[u] = soft_low_bin(u, Mi);
    base[u] = soft_outside_weight(u, Mi);
    chi[u] = 0.0;
    invd[u] = 0.0;
    if (soft_interior(u, Mi)) {
      const i32 t = u - 1;
      chi[u] = static_cast<double>(c[t + 1]);
      invd[u] = 1.0 / (static_cast<double>(c[t + 1]) - static_cast<double>(c[t]));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward.

// pk[4 i .. 4 i + 3] = (1, p_i, y_i, 0) in float64, so that the scatter below is one 256-bit load-add-store
// per voxel and bin. The constant lanes are written once per call (pack_init), each row writes p and y.
static void pack_init(double* __restrict pk, i64 T) {
  for (i64 i = 0; i < T; ++i) {
    pk[4 * i] = 1.0;
    pk[4 * i + 3] = 0.0;
  }
}

static void pack_row(const float* __restrict p, const float* __restrict y, double* __restrict pk, i64 n) {
#if CALIBOPS_ISA_LEVEL >= 2
  // (p, y) pairs of 8 voxels -> lanes 1, 2 of 8 packed entries: one permute and one masked store per 2 voxels.
  const __m512i idx = _mm512_set_epi64(0, 9, 1, 0, 0, 8, 0, 0);  // lanes 1, 2: p, y of voxel 0; 5, 6: voxel 1
  i64 i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d pv = _mm512_cvtps_pd(_mm256_loadu_ps(p + i));
    const __m512d yv = _mm512_cvtps_pd(_mm256_loadu_ps(y + i));
    for (int k = 0; k < 4; ++k) {
      const __m512i sh = _mm512_add_epi64(idx, _mm512_set1_epi64(2 * k));
      _mm512_mask_storeu_pd(pk + 4 * (i + 2 * k), 0x66, _mm512_permutex2var_pd(pv, sh, yv));
    }
  }
  for (; i < n; ++i) {
    pk[4 * i + 1] = static_cast<double>(p[i]);
    pk[4 * i + 2] = static_cast<double>(y[i]);
  }
#else
  for (i64 i = 0; i < n; ++i) {
    pk[4 * i + 1] = static_cast<double>(p[i]);
    pk[4 * i + 2] = static_cast<double>(y[i]);
  }
#endif
}

// h[0..3] += w * v[0..3] (count, sum_p, sum_y, unused).
#if defined(__GNUC__) || defined(__clang__)
typedef double v4d __attribute__((vector_size(32), aligned(8)));
static inline void hard_one(double* hc, i32 j, const double* v) {
  *reinterpret_cast<v4d*>(hc + j * 4) += *reinterpret_cast<const v4d*>(v);
}
static inline void soft_one(double* hc, i32 lo, float wl, const double* v) {
  const double w = static_cast<double>(wl);
  const v4d pv = *reinterpret_cast<const v4d*>(v);
  *reinterpret_cast<v4d*>(hc + lo * 4) += pv * w;
  *reinterpret_cast<v4d*>(hc + lo * 4 + 4) += pv * (1.0 - w);  // "the rest" of the voxel's unit weight
}
#else
static inline void hard_one(double* hc, i32 j, const double* v) {
  for (int k = 0; k < 4; ++k) hc[j * 4 + k] += v[k];
}
static inline void soft_one(double* hc, i32 lo, float wl, const double* v) {
  const double w = static_cast<double>(wl);
  for (int k = 0; k < 4; ++k) hc[lo * 4 + k] += v[k] * w;
  for (int k = 0; k < 4; ++k) hc[lo * 4 + 4 + k] += v[k] * (1.0 - w);
}
#endif

// Soft memberships of one class row from the states u (vectorised): w_lo = (c_hi - p) / (c_hi - c_lo) in the
// interior states 1..M-1; below the first centre (u = 0), for M = 1 and for masked voxels (u = M + 1) w_lo = 1,
// above the last centre (u = M) w_lo = 0. Out: wl (w_lo) and lo (the low bin; M for masked voxels), which may
// alias the c_hi / 1/d lookups chi, invd.
static void soft_weights_row(const Problem& pb, const float* __restrict p, const i32* __restrict u,
                             const float* chi, const float* invd, float* wl, i32* lo, i64 n) {
  const i32 M = static_cast<i32>(pb.M);
  for (i64 i = 0; i < n; ++i) {
    const i32 s = u[i];
    const float w = soft_interior(s, M) ? (chi[i] - p[i]) * invd[i] : soft_outside_weight(s, M);
    wl[i] = w;
    lo[i] = soft_low_bin(s, M);
  }
}

// One class row of a tile into its histograms h [copies][M + 2][4] (count, sum_p, sum_y, unused); voxel i
// goes to copy i % copies, so consecutive voxels in one bin do not wait on each other's stores.
// Hard: idx = bin; soft: idx = low bin, wl = its weight.
template <bool SOFT>
static void scatter_row(const Problem& pb, const double* __restrict pk, const i32* __restrict idx,
                        const float* __restrict wl, double* __restrict h, i64 n) {
  const i64 stride = (pb.M + 2) * 4;
  i64 i = 0;
#define CALIBOPS_ONE(hc, k)                    \
  if (SOFT)                                    \
    soft_one(hc, idx[k], wl[k], pk + 4 * (k)); \
  else                                         \
    hard_one(hc, idx[k], pk + 4 * (k))
  if (pb.copies == 8) {
    double *h0 = h, *h1 = h + stride, *h2 = h + 2 * stride, *h3 = h + 3 * stride;
    double *h4 = h + 4 * stride, *h5 = h + 5 * stride, *h6 = h + 6 * stride, *h7 = h + 7 * stride;
    for (; i + 8 <= n; i += 8) {
      CALIBOPS_ONE(h0, i);
      CALIBOPS_ONE(h1, i + 1);
      CALIBOPS_ONE(h2, i + 2);
      CALIBOPS_ONE(h3, i + 3);
      CALIBOPS_ONE(h4, i + 4);
      CALIBOPS_ONE(h5, i + 5);
      CALIBOPS_ONE(h6, i + 6);
      CALIBOPS_ONE(h7, i + 7);
    }
  }
  for (; i < n; ++i) {
    CALIBOPS_ONE(h + (i & (pb.copies - 1)) * stride, i);
  }
#undef CALIBOPS_ONE
}

// y [C][T] = [lab == c] as float (0 for masked voxels, whose bins are discarded anyway).
static void labels_to_rows(const Problem& pb, const i32* __restrict lab, float* __restrict y, i64 n) {
  for (i64 c = 0; c < pb.C; ++c) {
    float* __restrict yc = y + c * pb.tile;
    const i32 ci = static_cast<i32>(c);
    for (i64 i = 0; i < n; ++i) yc[i] = lab[i] == ci ? 1.0f : 0.0f;
  }
}

static i64 forward(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch, double* hist) {
  const i64 T = pb.tile, C = pb.C, N = pb.N, M = pb.M, M2 = M + 2;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  i32* lo_of = reinterpret_cast<i32*>(scratch + L.lo_of);
  double* dt = reinterpret_cast<double*>(scratch + L.dtab);
  double *chi = dt, *invd = dt + M2, *base = dt + 2 * M2;
  float* chi_f = scratch + L.ftab;  // float copies of c_hi and 1/d for the vectorised weights
  float* invd_f = chi_f + M2;
  if (pb.soft) {
    soft_tables(pb, lo_of, chi, invd, base);
    for (i64 k = 0; k < M2; ++k) {
      chi_f[k] = static_cast<float>(chi[k]);
      invd_f[k] = static_cast<float>(invd[k]);
    }
  }
  const i64 hsize = C * pb.copies * M2 * 4;
  for (i64 k = 0; k < hsize; ++k) hist[k] = 0.0;
  double* pk = reinterpret_cast<double*>(scratch + L.pk);
  pack_init(pk, T);

  i64 bad = 0;
  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
    if (pb.labels) {
      bad += load_labels(pb, b * N + i0, n, lab);
      labels_to_rows(pb, lab, y, n);
    } else {
      for (i64 c = 0; c < C; ++c) load_float_row(pb.target, pb.target_kind, (b * C + c) * N + i0, n, y + c * T);
    }
    activate(pb, x, scratch + L.rowa, scratch + L.rowb, n);
    compute_bins(pb, x, lab, bins, scratch + L.ea, scratch + L.eb, n);
    for (i64 c = 0; c < C; ++c) {
      double* h = hist + c * pb.copies * M2 * 4;
      const float* p = x + c * T;
      pack_row(p, y + c * T, pk, n);
      if (pb.soft) {
        float* ea = scratch + L.ea;
        float* eb = scratch + L.eb;
        gather_row(chi_f, M2, bins + c * T, ea, n);
        gather_row(invd_f, M2, bins + c * T, eb, n);
        soft_weights_row(pb, p, bins + c * T, ea, eb, ea, reinterpret_cast<i32*>(eb), n);
        scatter_row<true>(pb, pk, reinterpret_cast<const i32*>(eb), ea, h, n);
      } else {
        scatter_row<false>(pb, pk, bins + c * T, nullptr, h, n);
      }
    }
  }
  // Merge the interleaved copies in a fixed order.
  for (i64 c = 0; c < C; ++c)
    for (i64 j = 0; j < M; ++j)
      for (i64 s = 0; s < 3; ++s) {
        double acc = 0.0;
        for (i64 k = 0; k < pb.copies; ++k) acc += hist[((c * pb.copies + k) * M2 + j) * 4 + s];
        out[(c * M + j) * 3 + s] = acc;
      }
  return bad;
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// Gradient of bin j of the row at offset o (0 for the discarded slots j >= M).
static inline double bin_grad(const float* g, i64 o, i64 j, i64 M) {
  return j < M ? static_cast<double>(g[o + j]) : 0.0;
}

// Per class, per bin state: d loss / d p = K0 + K1 * p + K2 * y  (hard: K0 = G_p[bin], K1 = K2 = 0).
// Soft, with w_lo = (c_hi - p)/d + base, w_hi = 1 - w_lo, dw_hi/dp = -dw_lo/dp = 1/d (0 outside the interior):
//   g = Gp[lo] w_lo + Gp[hi] w_hi + (1/d) (Gc[hi] - Gc[lo] + p (Gp[hi] - Gp[lo]) + y (Gy[hi] - Gy[lo])).
static void grad_tables(const Problem& pb, i64 b, const float* gc, const float* gp, const float* gy, float* k0,
                        float* k1, float* k2, const i32* lo_of, const double* chi, const double* invd,
                        const double* base) {
  const i64 C = pb.C, M = pb.M, M2 = M + 2;
  for (i64 c = 0; c < C; ++c) {
    const i64 o = (b * C + c) * M;
    float* K0 = k0 + c * M2;
    float* K1 = k1 + c * M2;
    float* K2 = k2 + c * M2;
    if (!pb.soft) {
      for (i64 j = 0; j < M; ++j) K0[j] = gp[o + j];
      K0[M] = K0[M + 1] = 0.0f;  // masked voxels
      for (i64 j = 0; j < M2; ++j) K1[j] = K2[j] = 0.0f;
      continue;
    }
    for (i64 u = 0; u < M2; ++u) {
      const i64 lo = lo_of[u], hi = lo + 1;
      const double a = bin_grad(gp, o, lo, M), bb = bin_grad(gp, o, hi, M), id = invd[u];
      // g = bb + (a - bb) w_lo + id (dGc + p dGp + y dGy),  w_lo = base + id chi - id p
      const double dgc = bin_grad(gc, o, hi, M) - bin_grad(gc, o, lo, M);
      K0[u] = static_cast<float>(bb + (a - bb) * (base[u] + id * chi[u]) + id * dgc);
      K1[u] = static_cast<float>(2.0 * id * (bb - a));  // through w_lo, w_hi and through p itself
      K2[u] = static_cast<float>(id * (bin_grad(gy, o, hi, M) - bin_grad(gy, o, lo, M)));
    }
  }
}

// g = d loss / d p for one class row: K0[u] + K1[u] p + K2[u] y (gathers from the per-class tables).
static void grad_p_row(const Problem& pb, const float* __restrict p, const float* __restrict y,
                       const i32* __restrict u, const float* K0, const float* K1, const float* K2,
                       float* __restrict g, float* __restrict ea, float* __restrict eb, i64 n) {
  const i64 M2 = pb.M + 2;
  gather_row(K0, M2, u, g, n);
  if (pb.soft) {
    gather_row(K1, M2, u, ea, n);
    gather_row(K2, M2, u, eb, n);
    // K1 = K2 = 0 outside the interior states 1..M-1: skip the products there so NaN / inf p cannot leak in.
    const i32 M = static_cast<i32>(pb.M);
    for (i64 i = 0; i < n; ++i) {
      const float lin = ea[i] * p[i] + eb[i] * y[i];
      g[i] += soft_interior(u[i], M) ? lin : 0.0f;
    }
  }
}

static void backward(const Problem& pb, const float* grad_count, const float* grad_sum_p, const float* grad_sum_y,
                     void* grad, i64 b, i64 begin, i64 end, float* scratch) {
  const i64 T = pb.tile, C = pb.C, N = pb.N, M2 = pb.M + 2;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  float* g = scratch + L.g;
  float* rowa = scratch + L.rowa;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  i32* lo_of = reinterpret_cast<i32*>(scratch + L.lo_of);
  double* dt = reinterpret_cast<double*>(scratch + L.dtab);
  double *chi = dt, *invd = dt + M2, *base = dt + 2 * M2;
  float *k0 = scratch + L.ftab, *k1 = k0 + C * M2, *k2 = k1 + C * M2;
  if (pb.soft) soft_tables(pb, lo_of, chi, invd, base);
  grad_tables(pb, b, grad_count, grad_sum_p, grad_sum_y, k0, k1, k2, lo_of, chi, invd, base);

  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
    if (pb.labels) {
      load_labels(pb, b * N + i0, n, lab);
      if (pb.soft) labels_to_rows(pb, lab, y, n);
    } else if (pb.soft) {
      for (i64 c = 0; c < C; ++c) load_float_row(pb.target, pb.target_kind, (b * C + c) * N + i0, n, y + c * T);
    }
    activate(pb, x, rowa, scratch + L.rowb, n);
    compute_bins(pb, x, lab, bins, scratch + L.ea, scratch + L.eb, n);
    for (i64 c = 0; c < C; ++c) {
      const i64 t = c * M2;
      grad_p_row(pb, x + c * T, y + c * T, bins + c * T, k0 + t, k1 + t, k2 + t, g + c * T, scratch + L.ea,
                 scratch + L.eb, n);
    }
    // Chain through the activation (in place in g).
    if (pb.activation == 1) {
      for (i64 i = 0; i < n; ++i) rowa[i] = 0.0f;
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        const float* __restrict gc = g + c * T;
        for (i64 i = 0; i < n; ++i) rowa[i] += p[i] * gc[i];
      }
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gc = g + c * T;
        for (i64 i = 0; i < n; ++i) gc[i] = p[i] * (gc[i] - rowa[i]);
      }
    } else if (pb.activation == 2) {
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gc = g + c * T;
        for (i64 i = 0; i < n; ++i) gc[i] = gc[i] * (p[i] * (1.0f - p[i]));
      }
    }
    if (pb.labels) {
      for (i64 c = 0; c < C; ++c) {
        float* __restrict gc = g + c * T;
        for (i64 i = 0; i < n; ++i) gc[i] = lab[i] >= 0 ? gc[i] : 0.0f;
      }
    }
    for (i64 c = 0; c < C; ++c) store_row(grad, pb.in_kind, (b * C + c) * N + i0, n, g + c * T);
  }
}

static const KernelTable kTable = {CALIBOPS_ISA_NAME, scratch_floats, hist_doubles, forward, backward};

}  // namespace CALIBOPS_ISA_NS
}  // namespace cpu
}  // namespace calibops
