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
//
// Non-finite probabilities (docs/kernel_contract.md): an entry whose p is NaN or +-inf goes to a discarded
// histogram slot of its own (hard bin M + 1; soft state M + 2, whose whole unit weight lands in slot M + 1), so the
// count of slot M + 1, summed over classes, is the number of such entries at no extra cost in the scatter; its
// gradient-table entries are 0 and the activation chain rule is masked to 0 there. Voxels masked by their label
// (hard bin M, soft state M + 1) keep their slot whatever p is, so they are never counted as non-finite.
//
// Hard binning with C <= 16 and M <= 30 (AVX2 / AVX-512 builds) takes the fused path further down instead: one
// register-resident pass per group of 8 / 16 voxels (load -> activation -> bin -> backward: gradient lookup,
// chain, masked store, non-temporal for large gradients; forward: float64 (1, p) pairs scattered per class plus
// one integer label count per voxel). It performs the same IEEE operations in the same order as the generic
// path, so every build and both paths agree bitwise (tests/test_cpu_backend.py checks it).
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

// p is NaN or +-inf: an all-ones exponent. A bit test, not isnan / isinf, so it holds under any floating-point
// flags (-ffinite-math-only may fold those away) and vectorises as two integer operations.
static inline bool nonfinite(float p) { return (f2u(p) & 0x7f800000u) == 0x7f800000u; }

// Entries of the per-state tables: hard bins 0..M-1, M (masked voxel), M + 1 (non-finite p); soft states 0..M,
// M + 1 (masked), M + 2 (non-finite p).
static inline i64 table_size(const Problem& pb) { return pb.M + 3; }

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

constexpr i64 kSub = 128;  // voxels per sub-block of the fused hard forward (its pairs stay in L1)

struct Layout {
  i64 x, y, bins, g, lab, rowa, rowb, ea, eb, pk, ftab, lo_of, dtab, total;
};

static Layout layout(const Problem& pb) {
  const i64 T = pb.tile, C = pb.C, S = table_size(pb);
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
  // [T][4] float64 quads (generic forward) or [C][kSub][2] float64 (1, p) pairs (fused hard forward, labels)
  const i64 pk_floats = 8 * T > 4 * C * kSub ? 8 * T : 4 * C * kSub;
  L.ftab = L.pk + pk_floats;   // [3][C][S] backward gradient tables (S = table_size)
  L.lo_of = L.ftab + 3 * C * S;           // [S] int32 soft state -> low bin
  L.dtab = ((L.lo_of + S + 15) / 16) * 16;  // [3][S] float64 soft state -> (c_hi, 1/d, base)
  L.total = L.dtab + 6 * S + 16;
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

// Hard: bins[c][i] = bucketize(p, e[1:], right).clamp(max=M-1), M + 1 for non-finite p, M for masked voxels (both
// discarded slots). Soft: bins[c][i] = u = t + 1 in 0..M, t = #{k : centre[k] < p} - 1, M + 2 for non-finite p,
// M + 1 for masked voxels.
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
          out[i] = nonfinite(p[i]) ? M + 1 : (j < M - 1 ? j : M - 1);
        }
      } else {
        for (i64 i = 0; i < n; ++i) {
          const i32 j0 = out[i];
          const i32 j = j0 - static_cast<i32>((j0 > 0) & (p[i] < ea[i])) + static_cast<i32>(p[i] >= eb[i]);
          out[i] = nonfinite(p[i]) ? M + 1 : (j < M - 1 ? j : M - 1);
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
        out[i] = nonfinite(p[i]) ? M + 2 : t0 - dec + inc + 1;
      }
    }
    if (pb.labels)
      for (i64 i = 0; i < n; ++i) out[i] = lab[i] >= 0 ? out[i] : drop;
  }
}

// Soft state u -> (low bin, c_hi, 1/(c_hi - c_lo), base) so that w_lo = (c_hi - p) / d in the interior states
// 1..M-1 and w_lo = base (a constant, whatever p, NaN included) outside: below the first centre all weight goes
// to bin 0, above the last to bin M-1; masked voxels (u = M + 1) put their weight in the discarded slot M,
// non-finite p (u = M + 2) in the discarded slot M + 1 (whose count is then the number of non-finite entries).
static inline i32 soft_low_bin(i32 u, i32 M) {
  const i32 top = M - 2 > 0 ? M - 2 : 0;
  const i32 l = u - 1 > 0 ? u - 1 : 0;
  return u > M ? M : (l < top ? l : top);
}

static inline bool soft_interior(i32 u, i32 M) { return static_cast<u32>(u - 1) < static_cast<u32>(M - 1); }

static inline float soft_outside_weight(i32 u, i32 M) {
  return ((u == 0) | (u == M + 1) | ((M == 1) & (u <= M))) ? 1.0f : 0.0f;
}

static void soft_tables(const Problem& pb, i32* lo_of, double* chi, double* invd, double* base) {
  const i64 M = pb.M;
  const float* c = pb.edges;
  const i32 Mi = static_cast<i32>(M);
  for (i32 u = 0; u <= Mi + 2; ++u) {
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
// above the last centre (u = M) and for non-finite p (u = M + 2) w_lo = 0. Out: wl (w_lo) and lo (the low bin; M for masked voxels), which may
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

// ---------------------------------------------------------------------------------------------------------
// Fused hard path (hard binning, C <= 16 classes, M <= 30 bins: the usual segmentation case).
//
// One pass over groups of VL voxels, everything in registers: load the C class values -> activation ->
// bin -> (backward) per-bin gradient lookup, chain through the activation, mask, store. The generic path above
// makes ~15 passes over [C][T] tile rows instead. The arithmetic is the same sequence of IEEE operations
// (no FMA, same association) written once over a small vector abstraction: VL = 16 (AVX-512), 8 (AVX2) or 1
// (base: plain scalar code), so every build gives bitwise the same results, and the same as the generic path.

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
static inline VM fnonfinite(VF a) { return nonfinite(a); }
static inline void store_pairs(double* dst, VF p) {
  dst[0] = 1.0;
  dst[1] = static_cast<double>(p);
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

constexpr int kMaxFusedC = 16;
constexpr i64 kStreamMinFloats = i64{1} << 20;  // 4 MiB of float32 gradient

// Base build (VL = 1): only on request (fused == 2); its scalar code is slower than the generic path there.
static bool fused_hard_ok(const Problem& pb) {
  return pb.fused >= (VL > 1 ? 1 : 2) && !pb.soft && pb.C >= 1 && pb.C <= kMaxFusedC && pb.M + 2 <= 32;
}

// Loop-invariant state of the fused hard path; the tables live in the caller's frame (base build: pointers).
struct HardCtx {
  int act;
  bool right, labels;
  i32 M;
  float Mf, top;
  Tab e0, e1;  // e[j0], e[j0 + 1]
};

struct HardTables {
  alignas(64) float e0[32];
  alignas(64) float e1[32];
};

static HardCtx hard_ctx(const Problem& pb, HardTables& t) {
  const i64 M = pb.M;
  for (int k = 0; k < 32; ++k) {
    t.e0[k] = k <= M ? pb.edges[k] : 0.0f;
    t.e1[k] = k < M ? pb.edges[k + 1] : 0.0f;
  }
  HardCtx k;
  k.act = pb.activation;
  k.right = pb.right;
  k.labels = pb.labels;
  k.M = static_cast<i32>(M);
  k.Mf = static_cast<float>(M);
  k.top = static_cast<float>(M - 1);
  k.e0 = make_tab(t.e0);
  k.e1 = make_tab(t.e1);
  return k;
}

// G groups of VL voxels (group g at offset g * VL): class c's values at x + c * xs; labels (already range-checked,
// -1 = masked) at lab. Out: p[g][c] (probabilities) and bin[g][c] (hard bin, M + 1 for non-finite p, M for masked
// voxels), exactly as activate + compute_bins. G > 1 interleaves independent groups so their long dependency chains (exp) overlap.
template <int CC, int G>
static CALIBOPS_INLINE void hard_front(const HardCtx& k, i64 C_rt, const float* x, i64 xs, const i32* lab,
                              VF (*p)[kMaxFusedC], VI (*bin)[kMaxFusedC]) {
  const i64 C = CC > 0 ? CC : C_rt;
  for (i64 c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) p[g][c] = fload(x + c * xs + g * VL);
  VM nfv[G] = {};  // softmax: the voxel's p are all non-finite (a NaN / +inf logit, or every logit -inf) or none
  if (k.act == 1) {
    VF m[G], s[G], r[G];
    for (int g = 0; g < G; ++g) m[g] = p[g][0];
    for (i64 c = 1; c < C; ++c)
      for (int g = 0; g < G; ++g) m[g] = fmax_(p[g][c], m[g]);
    for (int g = 0; g < G; ++g) s[g] = fset(0.0f);
    for (i64 c = 0; c < C; ++c)
      for (int g = 0; g < G; ++g) {
        p[g][c] = vexp<true>(fsub(p[g][c], m[g]));
        s[g] = fadd(s[g], p[g][c]);
      }
    for (int g = 0; g < G; ++g) {
      nfv[g] = fnonfinite(s[g]);  // s in [1, C] unless NaN: one test per voxel instead of one per class
      r[g] = fdiv(fset(1.0f), s[g]);
    }
    for (i64 c = 0; c < C; ++c)
      for (int g = 0; g < G; ++g) p[g][c] = fmul(p[g][c], r[g]);
  } else if (k.act == 2) {
    for (i64 c = 0; c < C; ++c)
      for (int g = 0; g < G; ++g) p[g][c] = fdiv(fset(1.0f), fadd(fset(1.0f), vexp(fneg(p[g][c]))));
  }
  const VF Mf = fset(k.Mf), top = fset(k.top), zero = fset(0.0f);
  const VI izero = iset(0), last = iset(k.M - 1), nfbin = iset(k.M + 1);
  VM masked[G], drop[G];
  VI dval[G];
  if (k.labels)
    for (int g = 0; g < G; ++g) masked[g] = ilt(iload(lab + g * VL), izero);
  if (k.act == 1)  // one select per class: masked voxels -> M, else non-finite voxels -> M + 1
    for (int g = 0; g < G; ++g) {
      drop[g] = k.labels ? mor(masked[g], nfv[g]) : nfv[g];
      dval[g] = k.labels ? isel(masked[g], iset(k.M), nfbin) : nfbin;
    }
  for (i64 c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) {
      const VF pc = p[g][c];
      // q >= 0 ? q : 0 then q <= top ? q : top, as max / min: they differ only for q = -0 (-> +0) and NaN
      // (also -> 0), where the truncated integer is the same.
      VF q = fmax_(fmul(pc, Mf), zero);
      q = fmin_(q, top);
      const VI j0 = cvtt(q);
      const VF ea = look(k.e0, j0), eb = look(k.e1, j0);
      VI j = k.right ? bin_adjust<true>(j0, pc, ea, eb) : bin_adjust<false>(j0, pc, ea, eb);
      j = imin(j, last);
      if (k.act == 1) {
        j = isel(drop[g], dval[g], j);
      } else {
        j = isel(fnonfinite(pc), nfbin, j);
        if (k.labels) j = isel(masked[g], iset(k.M), j);
      }
      bin[g][c] = j;
    }
}

// Forward front end of n voxels. src / ss: the class rows (stride ss) of the input (float32) or of the converted
// tile; lab: their labels or nullptr; bins (row stride T) gets the hard bins. PAIRS (labels): pk (class stride pks
// doubles) gets the float64 (1, p) pairs and ybin (may alias lab) the label's slot lab * (M + 2) + bin[lab] (M for
// masked voxels: class 0's discarded slot); otherwise x (row stride T) gets p.
template <int CC, bool PAIRS>
static void hard_front_tile(const HardCtx& k, const Problem& pb, const float* src, i64 ss, const i32* lab, float* x,
                            i32* bins, double* pk, i64 pks, i32* ybin, i64 n) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C;
  const i32 M2 = static_cast<i32>(pb.M + 2);
  constexpr int G = 2;
  VF p[G][kMaxFusedC];
  VI bn[G][kMaxFusedC];
  auto emit = [&](int g, const i32* lg, double* pkd, i64 pkstride, i32* bd, i64 bstride, float* xd, i64 xstride,
                  i32* yd) {
    for (i64 c = 0; c < C; ++c) {
      if (PAIRS)
        store_pairs(pkd + c * pkstride, p[g][c]);
      else
        fstore(xd + c * xstride, p[g][c]);
      istore(bd + c * bstride, bn[g][c]);
    }
    if (PAIRS) {
      const VI lv = iload(lg);
      VI yb = iset(k.M);
      for (i64 c = 0; c < C; ++c)
        yb = isel(ieq(lv, iset(static_cast<i32>(c))), iadd(bn[g][c], iset(static_cast<i32>(c) * M2)), yb);
      istore(yd, yb);
    }
  };
  auto emit_at = [&](int g, i64 i) {
    const i32* lg = lab != nullptr ? lab + i : nullptr;
    emit(g, lg, PAIRS ? pk + 2 * i : nullptr, pks, bins + i, T, PAIRS ? nullptr : x + i, T,
         PAIRS ? ybin + i : nullptr);
  };
  i64 i = 0;
  for (; i + G * VL <= n; i += G * VL) {
    hard_front<CC, G>(k, C, src + i, ss, lab != nullptr ? lab + i : nullptr, p, bn);
    for (int g = 0; g < G; ++g) emit_at(g, i + g * VL);
  }
  for (; i + VL <= n; i += VL) {
    hard_front<CC, 1>(k, C, src + i, ss, lab != nullptr ? lab + i : nullptr, p, bn);
    emit_at(0, i);
  }
  if (i < n) {  // tail: through zero-padded buffers
    alignas(64) float xb[kMaxFusedC * VL];
    alignas(64) i32 lb[VL], ib[kMaxFusedC * VL], yb[VL];
    alignas(64) double pb2[kMaxFusedC * 2 * VL];
    const i64 r = n - i;
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < VL; ++v) xb[c * VL + v] = v < r ? src[c * ss + i + v] : 0.0f;
    for (i64 v = 0; v < VL; ++v) lb[v] = (lab != nullptr && v < r) ? lab[i + v] : -1;
    hard_front<CC, 1>(k, C, xb, VL, lb, p, bn);
    emit(0, lb, pb2, 2 * VL, ib, VL, xb, VL, yb);
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < r; ++v) {
        if (PAIRS) {
          pk[c * pks + 2 * (i + v)] = pb2[c * 2 * VL + 2 * v];
          pk[c * pks + 2 * (i + v) + 1] = pb2[c * 2 * VL + 2 * v + 1];
        } else {
          x[c * T + i + v] = xb[c * VL + v];
        }
        bins[c * T + i + v] = ib[c * VL + v];
      }
    if (PAIRS)
      for (i64 v = 0; v < r; ++v) ybin[i + v] = yb[v];
  }
}

// Backward of G groups: d loss / d input of the G * VL voxels, written to out + c * os.
template <int CC, int G, bool NT = false>
static CALIBOPS_INLINE void hard_back_group(const HardCtx& k, i64 C_rt, const Tab* k0, const float* x, i64 xs,
                                   const i32* lab, float* out, i64 os) {
  const i64 C = CC > 0 ? CC : C_rt;
  VF p[G][kMaxFusedC];
  VI bn[G][kMaxFusedC];
  hard_front<CC, G>(k, C, x, xs, lab, p, bn);
  VF (&gr)[G][kMaxFusedC] = p;  // the gradient replaces p once p is used
  for (int g = 0; g < G; ++g) {
    VF gg[kMaxFusedC];
    // Non-finite p: the table gives 0 (bin M + 1), which activation 0 passes on as is; the chain rules below would
    // turn it into NaN (0 * NaN), so their result is masked. Softmax: p is NaN for every class of the voxel or for
    // none (a NaN / +inf logit makes the sum NaN), so class 0 decides for the voxel.
    for (i64 c = 0; c < C; ++c) gg[c] = look(k0[c], bn[g][c]);
    if (k.act == 1) {
      VF s = fset(0.0f);
      for (i64 c = 0; c < C; ++c) s = fadd(s, fmul(p[g][c], gg[c]));
      for (i64 c = 0; c < C; ++c) gg[c] = fmul(p[g][c], fsub(gg[c], s));
      VM drop = fnonfinite(p[g][0]);
      if (k.labels) drop = mor(drop, ilt(iload(lab + g * VL), iset(0)));
      for (i64 c = 0; c < C; ++c) gg[c] = fsel(drop, fset(0.0f), gg[c]);
    } else {
      if (k.act == 2)
        for (i64 c = 0; c < C; ++c)
          gg[c] = fsel(fnonfinite(p[g][c]), fset(0.0f), fmul(gg[c], fmul(p[g][c], fsub(fset(1.0f), p[g][c]))));
      if (k.labels) {
        const VM masked = ilt(iload(lab + g * VL), iset(0));
        for (i64 c = 0; c < C; ++c) gg[c] = fsel(masked, fset(0.0f), gg[c]);
      }
    }
    for (i64 c = 0; c < C; ++c) gr[g][c] = gg[c];
  }
  for (i64 c = 0; c < C; ++c)
    for (int g = 0; g < G; ++g) {
      if (NT)
        fstore_nt(out + c * os + g * VL, gr[g][c]);
      else
        fstore(out + c * os + g * VL, gr[g][c]);
    }
}

// NT: out + c * os is VL-float aligned for every c (non-temporal stores for the full groups).
template <int CC, bool NT>
static void hard_back_tile(const HardCtx& k, const Problem& pb, const Tab* k0, const float* src, i64 ss,
                           const i32* lab, float* out, i64 os, i64 n) {
  const i64 C = CC > 0 ? CC : pb.C;
  i64 i = 0;
  for (; i + 2 * VL <= n; i += 2 * VL)
    hard_back_group<CC, 2, NT>(k, C, k0, src + i, ss, lab != nullptr ? lab + i : nullptr, out + i, os);
  for (; i + VL <= n; i += VL)
    hard_back_group<CC, 1>(k, C, k0, src + i, ss, lab != nullptr ? lab + i : nullptr, out + i, os);
  if (i < n) {
    alignas(64) float xb[kMaxFusedC * VL], gb[kMaxFusedC * VL];
    alignas(64) i32 lb[VL];
    const i64 r = n - i;
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < VL; ++v) xb[c * VL + v] = v < r ? src[c * ss + i + v] : 0.0f;
    for (i64 v = 0; v < VL; ++v) lb[v] = (lab != nullptr && v < r) ? lab[i + v] : -1;
    hard_back_group<CC, 1>(k, C, k0, xb, VL, lb, gb, VL);
    for (i64 c = 0; c < C; ++c)
      for (i64 v = 0; v < r; ++v) out[c * os + i + v] = gb[c * VL + v];
  }
}

#if defined(__GNUC__) || defined(__clang__)
typedef double v2d __attribute__((vector_size(16), aligned(8)));
static inline void pair_one(double* h, i32 j, const double* v) {
  *reinterpret_cast<v2d*>(h + 2 * j) += *reinterpret_cast<const v2d*>(v);
}
#else
static inline void pair_one(double* h, i32 j, const double* v) {
  h[2 * j] += v[0];
  h[2 * j + 1] += v[1];
}
#endif

// (count, sum_p) of one class row into h [copies][M + 2][2]; voxel i goes to copy i % copies.
static void scatter_pairs(const Problem& pb, const double* __restrict pk, const i32* __restrict idx,
                          double* __restrict h, i64 n) {
  const i64 stride = (pb.M + 2) * 2;
  i64 i = 0;
  if (pb.copies == 8) {
    for (; i + 8 <= n; i += 8) {
      pair_one(h, idx[i], pk + 2 * i);
      pair_one(h + stride, idx[i + 1], pk + 2 * i + 2);
      pair_one(h + 2 * stride, idx[i + 2], pk + 2 * i + 4);
      pair_one(h + 3 * stride, idx[i + 3], pk + 2 * i + 6);
      pair_one(h + 4 * stride, idx[i + 4], pk + 2 * i + 8);
      pair_one(h + 5 * stride, idx[i + 5], pk + 2 * i + 10);
      pair_one(h + 6 * stride, idx[i + 6], pk + 2 * i + 12);
      pair_one(h + 7 * stride, idx[i + 7], pk + 2 * i + 14);
    }
  }
  for (; i < n; ++i) pair_one(h + (i & (pb.copies - 1)) * stride, idx[i], pk + 2 * i);
}

// Integer labels: sum_y[c][j] counts the voxels labelled c whose class-c bin is j, so one integer increment per
// voxel (into hy [copies][C][M + 2], at the slot ybin from hard_front_tile) replaces C float additions.
static void count_labels(const Problem& pb, const i32* __restrict yb, i64* __restrict hy, i64 n) {
  const i64 stride = pb.C * (pb.M + 2);
  i64 i = 0;
  if (pb.copies == 8) {
    for (; i + 8 <= n; i += 8) {
      hy[yb[i]] += 1;
      hy[stride + yb[i + 1]] += 1;
      hy[2 * stride + yb[i + 2]] += 1;
      hy[3 * stride + yb[i + 3]] += 1;
      hy[4 * stride + yb[i + 4]] += 1;
      hy[5 * stride + yb[i + 5]] += 1;
      hy[6 * stride + yb[i + 6]] += 1;
      hy[7 * stride + yb[i + 7]] += 1;
    }
  }
  for (; i < n; ++i) hy[(i & (pb.copies - 1)) * stride + yb[i]] += 1;
}

template <int CC>
static i64 forward_hard_fused_t(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch,
                                double* hist, i64* nonfinite_out) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C, N = pb.N, M = pb.M, M2 = M + 2, K = pb.copies;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  double* pk = reinterpret_cast<double*>(scratch + L.pk);
  HardTables tabs;
  const HardCtx k = hard_ctx(pb, tabs);
  // hist: labels: (count, sum_p) pairs [C][K][M2][2] then label counts [K][C][M2] (int64); dense: the generic
  // [C][K][M2][4] quads. Both fit hist_doubles().
  double* hp = hist;
  i64* hy = reinterpret_cast<i64*>(hist + C * K * M2 * 2);
  const i64 hsize = pb.labels ? C * K * M2 * 3 : C * K * M2 * 4;
  for (i64 q = 0; q < hsize; ++q) hist[q] = 0.0;
  if (!pb.labels) pack_init(pk, T);
  const float* in32 = static_cast<const float*>(pb.input);

  i64 bad = 0;
  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    const float* src = x;
    i64 ss = T;
    if (pb.in_kind == kF32) {
      src = in32 + b * C * N + i0;
      ss = N;
    } else {
      for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
    }
    if (pb.labels) {
      bad += load_labels(pb, b * N + i0, n, lab);
      // Sub-blocks of kSub voxels: (1, p) pairs of every class and the bins, then the scatters, all in L1.
      for (i64 s0 = 0; s0 < n; s0 += kSub) {
        const i64 ns = n - s0 < kSub ? n - s0 : kSub;
        hard_front_tile<CC, true>(k, pb, src + s0, ss, lab + s0, nullptr, bins + s0, pk, 2 * kSub, lab + s0, ns);
        for (i64 c = 0; c < C; ++c) scatter_pairs(pb, pk + c * 2 * kSub, bins + c * T + s0, hp + c * K * M2 * 2, ns);
        count_labels(pb, lab + s0, hy, ns);
      }
    } else {
      hard_front_tile<CC, false>(k, pb, src, ss, nullptr, x, bins, nullptr, 0, nullptr, n);
      for (i64 c = 0; c < C; ++c) {
        load_float_row(pb.target, pb.target_kind, (b * C + c) * N + i0, n, y + c * T);
        pack_row(x + c * T, y + c * T, pk, n);
        scatter_row<false>(pb, pk, bins + c * T, nullptr, hist + c * K * M2 * 4, n);
      }
    }
  }
  // Merge the interleaved copies in a fixed order; the counts of slot M + 1 are the non-finite entries.
  double nf = 0.0;
  for (i64 c = 0; c < C; ++c)
    for (i64 q = 0; q < K; ++q)
      nf += pb.labels ? hp[((c * K + q) * M2 + M + 1) * 2] : hist[((c * K + q) * M2 + M + 1) * 4];
  *nonfinite_out = static_cast<i64>(nf);
  for (i64 c = 0; c < C; ++c)
    for (i64 j = 0; j < M; ++j) {
      double* o = out + (c * M + j) * 3;
      if (pb.labels) {
        double n0 = 0.0, s0 = 0.0, y0 = 0.0;
        for (i64 q = 0; q < K; ++q) {
          n0 += hp[((c * K + q) * M2 + j) * 2];
          s0 += hp[((c * K + q) * M2 + j) * 2 + 1];
          y0 += static_cast<double>(hy[(q * C + c) * M2 + j]);
        }
        o[0] = n0;
        o[1] = s0;
        o[2] = y0;
      } else {
        for (i64 s = 0; s < 3; ++s) {
          double acc = 0.0;
          for (i64 q = 0; q < K; ++q) acc += hist[((c * K + q) * M2 + j) * 4 + s];
          o[s] = acc;
        }
      }
    }
  return bad;
}

static i64 forward_hard_fused(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch,
                              double* hist, i64* nonfinite_out) {
  switch (pb.C) {
    case 2:
      return forward_hard_fused_t<2>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
    case 3:
      return forward_hard_fused_t<3>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
    case 4:
      return forward_hard_fused_t<4>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
    default:
      return forward_hard_fused_t<0>(pb, b, begin, end, out, scratch, hist, nonfinite_out);
  }
}

template <int CC>
static void backward_hard_fused_t(const Problem& pb, const float* grad_sum_p, void* grad, i64 b, i64 begin, i64 end,
                                  float* scratch) {
  const i64 T = pb.tile, C = CC > 0 ? CC : pb.C, N = pb.N, M = pb.M;
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* g = scratch + L.g;
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  HardTables tabs;
  const HardCtx k = hard_ctx(pb, tabs);
  // Per class: K0[j] = G_p[b, c, j] for j < M, 0 for the discarded slot M (masked voxels).
  alignas(64) float k0f[kMaxFusedC][32];
  Tab k0[kMaxFusedC];
  for (i64 c = 0; c < C; ++c) {
    for (i64 j = 0; j < 32; ++j) k0f[c][j] = j < M ? grad_sum_p[(b * C + c) * M + j] : 0.0f;
    k0[c] = make_tab(k0f[c]);
  }
  const float* in32 = static_cast<const float*>(pb.input);
  float* out32 = static_cast<float*>(grad);
  // A gradient much larger than the caches is written with non-temporal stores (no read-for-ownership of the
  // fresh buffer: a third less memory traffic); needs every row start aligned to the vector width.
  const bool stream = VL > 1 && pb.in_kind == kF32 && pb.B * C * N >= kStreamMinFloats && N % VL == 0 &&
                      reinterpret_cast<uintptr_t>(grad) % (VL * sizeof(float)) == 0;
  for (i64 i0 = begin; i0 < end; i0 += T) {
    const i64 n = end - i0 < T ? end - i0 : T;
    if (pb.labels) load_labels(pb, b * N + i0, n, lab);
    const i32* lp = pb.labels ? lab : nullptr;
    if (pb.in_kind == kF32) {
      float* o = out32 + b * C * N + i0;
      if (stream)
        hard_back_tile<CC, true>(k, pb, k0, in32 + b * C * N + i0, N, lp, o, N, n);
      else
        hard_back_tile<CC, false>(k, pb, k0, in32 + b * C * N + i0, N, lp, o, N, n);
    } else {
      for (i64 c = 0; c < C; ++c) load_float_row(pb.input, pb.in_kind, (b * C + c) * N + i0, n, x + c * T);
      hard_back_tile<CC, false>(k, pb, k0, x, T, lp, g, T, n);
      for (i64 c = 0; c < C; ++c) store_row(grad, pb.in_kind, (b * C + c) * N + i0, n, g + c * T);
    }
  }
  if (stream) stream_fence();
}

static void backward_hard_fused(const Problem& pb, const float* grad_sum_p, void* grad, i64 b, i64 begin, i64 end,
                                float* scratch) {
  switch (pb.C) {
    case 2:
      return backward_hard_fused_t<2>(pb, grad_sum_p, grad, b, begin, end, scratch);
    case 3:
      return backward_hard_fused_t<3>(pb, grad_sum_p, grad, b, begin, end, scratch);
    case 4:
      return backward_hard_fused_t<4>(pb, grad_sum_p, grad, b, begin, end, scratch);
    default:
      return backward_hard_fused_t<0>(pb, grad_sum_p, grad, b, begin, end, scratch);
  }
}

static i64 forward(const Problem& pb, i64 b, i64 begin, i64 end, double* out, float* scratch, double* hist,
                   i64* nonfinite_out) {
  if (fused_hard_ok(pb)) return forward_hard_fused(pb, b, begin, end, out, scratch, hist, nonfinite_out);
  const i64 T = pb.tile, C = pb.C, N = pb.N, M = pb.M, M2 = M + 2, S = table_size(pb);
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  i32* lo_of = reinterpret_cast<i32*>(scratch + L.lo_of);
  double* dt = reinterpret_cast<double*>(scratch + L.dtab);
  double *chi = dt, *invd = dt + S, *base = dt + 2 * S;
  float* chi_f = scratch + L.ftab;  // float copies of c_hi and 1/d for the vectorised weights
  float* invd_f = chi_f + S;
  if (pb.soft) {
    soft_tables(pb, lo_of, chi, invd, base);
    for (i64 k = 0; k < S; ++k) {
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
        gather_row(chi_f, S, bins + c * T, ea, n);
        gather_row(invd_f, S, bins + c * T, eb, n);
        soft_weights_row(pb, p, bins + c * T, ea, eb, ea, reinterpret_cast<i32*>(eb), n);
        scatter_row<true>(pb, pk, reinterpret_cast<const i32*>(eb), ea, h, n);
      } else {
        scatter_row<false>(pb, pk, bins + c * T, nullptr, h, n);
      }
    }
  }
  // Merge the interleaved copies in a fixed order; the counts of slot M + 1 are the non-finite entries.
  for (i64 c = 0; c < C; ++c)
    for (i64 j = 0; j < M; ++j)
      for (i64 s = 0; s < 3; ++s) {
        double acc = 0.0;
        for (i64 k = 0; k < pb.copies; ++k) acc += hist[((c * pb.copies + k) * M2 + j) * 4 + s];
        out[(c * M + j) * 3 + s] = acc;
      }
  double nf = 0.0;
  for (i64 c = 0; c < C; ++c)
    for (i64 k = 0; k < pb.copies; ++k) nf += hist[((c * pb.copies + k) * M2 + M + 1) * 4];
  *nonfinite_out = static_cast<i64>(nf);
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
  const i64 C = pb.C, M = pb.M, S = table_size(pb);
  for (i64 c = 0; c < C; ++c) {
    const i64 o = (b * C + c) * M;
    float* K0 = k0 + c * S;
    float* K1 = k1 + c * S;
    float* K2 = k2 + c * S;
    if (!pb.soft) {
      for (i64 j = 0; j < M; ++j) K0[j] = gp[o + j];
      for (i64 j = M; j < S; ++j) K0[j] = 0.0f;  // masked voxels (M), non-finite p (M + 1)
      for (i64 j = 0; j < S; ++j) K1[j] = K2[j] = 0.0f;
      continue;
    }
    // states M + 1 (masked) and M + 2 (non-finite) have both bins in the discarded slots: all three entries 0
    for (i64 u = 0; u < S; ++u) {
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
  const i64 S = pb.soft ? table_size(pb) : pb.M + 2;  // hard bins stop at M + 1
  gather_row(K0, S, u, g, n);
  if (pb.soft) {
    gather_row(K1, S, u, ea, n);
    gather_row(K2, S, u, eb, n);
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
  if (fused_hard_ok(pb)) return backward_hard_fused(pb, grad_sum_p, grad, b, begin, end, scratch);
  const i64 T = pb.tile, C = pb.C, N = pb.N, S = table_size(pb);
  const Layout L = layout(pb);
  float* x = scratch + L.x;
  float* y = scratch + L.y;
  float* g = scratch + L.g;
  float* rowa = scratch + L.rowa;
  i32* bins = reinterpret_cast<i32*>(scratch + L.bins);
  i32* lab = reinterpret_cast<i32*>(scratch + L.lab);
  i32* lo_of = reinterpret_cast<i32*>(scratch + L.lo_of);
  double* dt = reinterpret_cast<double*>(scratch + L.dtab);
  double *chi = dt, *invd = dt + S, *base = dt + 2 * S;
  float *k0 = scratch + L.ftab, *k1 = k0 + C * S, *k2 = k1 + C * S;
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
      const i64 t = c * S;
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
    // Masked voxels and non-finite p get 0. With activation 0 the gradient tables already gave exactly 0 for
    // non-finite p; the chain rules above turn that into NaN (0 * NaN), hence the mask.
    if (pb.labels) {
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gc = g + c * T;
        for (i64 i = 0; i < n; ++i) gc[i] = (lab[i] >= 0) & !nonfinite(p[i]) ? gc[i] : 0.0f;
      }
    } else if (pb.activation != 0) {
      for (i64 c = 0; c < C; ++c) {
        const float* __restrict p = x + c * T;
        float* __restrict gc = g + c * T;
        for (i64 i = 0; i < n; ++i) gc[i] = nonfinite(p[i]) ? 0.0f : gc[i];
      }
    }
    for (i64 c = 0; c < C; ++c) store_row(grad, pb.in_kind, (b * C + c) * N + i0, n, g + c * T);
  }
}

static const KernelTable kTable = {CALIBOPS_ISA_NAME, scratch_floats, hist_doubles, forward, backward};

}  // namespace CALIBOPS_ISA_NS
}  // namespace cpu
}  // namespace calibops
