// Tiles of the CPU kernels: the per-worker scratch layout, loading a tile's rows (input and dense target in their
// own dtype -> float32, label maps of every rater -> int32 with the voxel's "used" rule), the activation, and
// storing the gradient in the input dtype. Part of the per-ISA build (kernel_impl.h).
//
// Work unit: a tile of T voxels of one image, held as [C][T] float rows in L1 (T a multiple of 16, so rows are
// 64-byte aligned). The inner loops over the T voxels of a row are branch-free so the compiler vectorises them.
#if !defined(CALIBOPS_ISA_NS)
#error "included by kernel_impl.h only"
#endif

constexpr i64 kSub = 128;  // voxels per sub-block of the fused hard forward (its pairs stay in L1)

struct Layout {
  i64 x, y, bins, g, lab, rowa, rowb, ea, eb, tq, ta, tn, pk, ftab, lo_of, dtab, total;
};

static Layout layout(const Problem& pb) {
  const i64 T = pb.tile, C = pb.C, S = table_size(pb);
  Layout L;
  L.x = 0;                     // [C][T] input, then p
  L.y = L.x + C * T;           // [C][T] dense target as float (or one row of targets)
  L.bins = L.y + C * T;        // [C][T] int32 scheme state per (row, voxel)
  L.g = L.bins + C * T;        // [C][T] backward: d loss / d p
  L.lab = L.g + C * T;         // [R][T] int32 label of each rater, -1 in every rater's row for an unused voxel
  L.rowa = L.lab + pb.R * T;   // [T] softmax max, then 1 / sum; backward: sum_c p g
  L.rowb = L.rowa + T;         // [T] softmax sum
  L.ea = L.rowb + T;           // [T] binning / backward gathers
  L.eb = L.ea + T;             // [T]
  L.tq = L.eb + T;             // [T] top-label: q = max_c p (NaN when any p of the voxel is non-finite)
  L.ta = L.tq + T;             // [T] top-label: int32 argmax a
  L.tn = L.ta + T;             // [T] top-label: int32 number of non-finite p of the voxel; backward: g_q
  L.pk = L.tn + T;             // generic forward: [T][W] float64 entry vectors; fused: [C][kSub][2] (1, p) pairs
                               // (moments: [C][kSub][4] (1, p, p², p·ȳ) quads)
  const i64 fused_pk = (pb.moments ? 8 : 4) * C * kSub;
  const i64 pk_floats = 2 * pb.W * T > fused_pk ? 2 * pb.W * T : fused_pk;
  L.ftab = L.pk + pk_floats;   // [6 + R][K][S] backward gradient tables; forward: float chi, id
  L.lo_of = L.ftab + (6 + pb.R) * pb.K * S + 2 * S;
  L.dtab = ((L.lo_of + S + 15) / 16) * 16;  // [3][S] float64 base, chi, id (SchemeTables)
  L.total = L.dtab + 6 * S + 16;
  return L;
}

static size_t scratch_floats(const Problem& pb) { return static_cast<size_t>(layout(pb).total); }

// Generic forward: [K][copies][M + 2][W] float64; fused hard forward (labels): (count, sum_p) pairs
// [C][copies][M + 2][2] (moments: quads [..][4]) then int64 label counts [copies][R][K][M + 2].
static size_t hist_doubles(const Problem& pb) {
  const i64 M2 = pb.M + 2;
  const i64 generic = pb.K * pb.copies * M2 * pb.W;
  const i64 fused = pb.C * pb.copies * M2 * (pb.moments ? 4 : 2) + pb.copies * pb.R * pb.K * M2;
  return static_cast<size_t>(generic > fused ? generic : fused);
}

static SchemeTables scheme_tables_at(const Problem& pb, float* scratch, const Layout& L) {
  const i64 S = table_size(pb);
  double* d = reinterpret_cast<double*>(scratch + L.dtab);
  return {reinterpret_cast<i32*>(scratch + L.lo_of), d, d + S, d + 2 * S};
}

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

static i64 load_labels_one(const Problem& pb, i64 off, i64 n, i32* lab) {
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

// The R label rows of voxels [i0, i0 + n) of image b into lab [R][T]. A voxel is used when every rater's label is
// valid; an unused voxel gets -1 in every rater's row (so row 0 alone tells whether a voxel is used). Returns the
// number of bad label entries (outside [0, C) and not ignore_index) over all raters.
static i64 load_labels(const Problem& pb, i64 b, i64 i0, i64 n, i32* lab) {
  const i64 T = pb.tile, R = pb.R, N = pb.N;
  i64 bad = 0;
  for (i64 r = 0; r < R; ++r) bad += load_labels_one(pb, (b * R + r) * N + i0, n, lab + r * T);
  if (R > 1) {
    i32* __restrict l0 = lab;
    for (i64 r = 1; r < R; ++r) {  // row 0 becomes min over raters: negative when any rater's label is invalid
      const i32* __restrict lr = lab + r * T;
      for (i64 i = 0; i < n; ++i) l0[i] = lr[i] < 0 ? -1 : l0[i];
    }
    for (i64 r = 1; r < R; ++r) {
      i32* __restrict lr = lab + r * T;
      for (i64 i = 0; i < n; ++i) lr[i] = l0[i] < 0 ? -1 : lr[i];
    }
  }
  return bad;
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

// Top-label rows of a tile: tq = max_c p (ties: the lowest class, replacing only on >), ta = argmax, tq = NaN when
// any p of the voxel is non-finite (so the entry takes the scheme's non-finite state); returns the number of
// non-finite p of the used voxels (lab row 0 >= 0, or every voxel when lab is nullptr).
static i64 top_rows(const Problem& pb, const float* __restrict x, const i32* __restrict lab, float* __restrict tq,
                    i32* __restrict ta, i32* __restrict tn, i64 n) {
  const i64 T = pb.tile, C = pb.C;
  for (i64 i = 0; i < n; ++i) {
    tq[i] = x[i];
    ta[i] = 0;
    tn[i] = static_cast<i32>(nonfinite(x[i]));
  }
  for (i64 c = 1; c < C; ++c) {
    const float* __restrict xc = x + c * T;
    const i32 ci = static_cast<i32>(c);
    for (i64 i = 0; i < n; ++i) {
      const bool gt = xc[i] > tq[i];
      tq[i] = gt ? xc[i] : tq[i];
      ta[i] = gt ? ci : ta[i];
      tn[i] += static_cast<i32>(nonfinite(xc[i]));
    }
  }
  i64 nf = 0;
  const float qnan = u2f(0x7fc00000u);
  for (i64 i = 0; i < n; ++i) {
    const bool used = lab == nullptr || lab[i] >= 0;
    tq[i] = tn[i] > 0 ? qnan : tq[i];
    nf += used ? tn[i] : 0;
  }
  return nf;
}
