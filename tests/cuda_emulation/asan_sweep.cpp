// Memory-safety sweep of the emulated CUDA kernels under AddressSanitizer + UBSan (tests/test_cuda_compile.py):
// every buffer is a vector of exactly the contract's size, labels include out-of-range and ignored values, inputs
// NaN and +-inf, odd sizes cross tile and block boundaries. The variant (mode, raters, moments) rotates with the
// run counter, so every (input dtype, target dtype, scheme, activation) is also run in every variant over the
// shapes. Prints "ok <runs>" and exits 0 when no run failed.
#include <cstdio>
#include <random>

#include "host_emulation.h"

int main() {
  using namespace calibops_cuda;
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> unif(-4.0f, 4.0f);
  const int64_t shapes[][4] = {{1, 1, 1, 1},     {2, 3, 1000, 7}, {1, 4, 16385, 20}, {3, 2, 33, 1},
                               {1, 16, 300, 20}, {1, 130, 70, 5}, {2, 5, 4097, 3}};
  const int target_elems[] = {kU8, kI8, kI16, kI32, kI64, kF32, kF16, kBF16, kBool};
  int64_t runs = 0;
  for (const auto& s : shapes) {
    const int64_t B = s[0], C = s[1], N = s[2], M = s[3];
    for (int ink = 0; ink < 3; ++ink) {
      for (int te : target_elems) {
        const bool labels = te >= kU8 && te != kBool;
        for (int scheme = 0; scheme < 2; ++scheme) {
          for (int act = 0; act < 3; ++act) {
            const int mode = static_cast<int>(runs % 2);
            const int moments = static_cast<int>((runs / 2) % 2);
            const int64_t R = labels && (runs / 4) % 2 ? 3 : 1;
            const int64_t K = mode ? 1 : C;
            const int64_t n_in = B * C * N;
            const int64_t n_t = labels ? B * R * N : B * C * N;
            std::vector<float> in32(n_in);
            std::vector<unsigned short> in16(n_in);
            for (int64_t i = 0; i < n_in; ++i) {
              float x = act == 0 ? (unif(rng) + 4.0f) / 8.0f : unif(rng);
              if (i % 97 == 5) x = NAN;  // non-finite entries: left out, counted, never an index
              if (i % 101 == 7) x = INFINITY;
              if (i % 103 == 11) x = -INFINITY;
              in32[i] = x;
              in16[i] = ink == kF16 ? __half_as_ushort(__float2half_rn(x))
                                    : __bfloat16_as_ushort(__float2bfloat16_rn(x));
            }
            const void* input = ink == kF32 ? static_cast<const void*>(in32.data()) : in16.data();
            std::vector<unsigned char> target(static_cast<size_t>(n_t * emu::elem_size(te)));
            for (int64_t i = 0; i < n_t; ++i) {
              const int64_t lab = static_cast<int64_t>(rng() % (C + 3)) - 1;  // -1 .. C+1: some out of range
              switch (te) {
                case kU8:
                  target[i] = static_cast<unsigned char>(lab < 0 ? 255 : lab);
                  break;
                case kBool:
                  target[i] = static_cast<unsigned char>(rng() % 2);
                  break;
                case kI8:
                  reinterpret_cast<int8_t*>(target.data())[i] = static_cast<int8_t>(lab);
                  break;
                case kI16:
                  reinterpret_cast<int16_t*>(target.data())[i] = static_cast<int16_t>(lab);
                  break;
                case kI32:
                  reinterpret_cast<int32_t*>(target.data())[i] = static_cast<int32_t>(lab);
                  break;
                case kI64:
                  reinterpret_cast<int64_t*>(target.data())[i] = lab;
                  break;
                case kF32:
                  reinterpret_cast<float*>(target.data())[i] = (rng() % 2) * 1.0f;
                  break;
                default:
                  reinterpret_cast<unsigned short*>(target.data())[i] = __half_as_ushort(__float2half_rn(0.5f));
              }
            }
            const int64_t ne = scheme ? M : M + 1;
            std::vector<float> edges(ne);
            const float top = 1.0f + 1.1920929e-07f;
            for (int64_t k = 0; k < ne; ++k) edges[k] = scheme ? top * (2 * k + 1) / (2 * M) : top * k / M;
            const int64_t BKM = B * K * M, BKRM = BKM * R, BKMm = moments ? BKM : 0;
            std::vector<float> cnt(BKM), sp(BKM), sy(BKRM), sp2(BKMm), spy(BKMm);
            std::vector<float> gc(BKM, 0.1f), gp(BKM, -0.2f), gy(BKRM, 0.3f), gp2(BKMm, 0.4f), gpy(BKMm, -0.5f);
            int64_t bad[2] = {0, 0};
            const StatsArgs a = emu::make_args(input, ink, target.data(), te, edges.data(), B, C, N, R, M, scheme,
                                               act, labels ? 0 : 1, mode, moments, labels && (N % 2 == 0), 0,
                                               (N % 3 == 0));
            const char* err = emu::run_forward(
                a, 227 * 1024, OutPtrs{cnt.data(), sp.data(), sy.data(), moments ? sp2.data() : nullptr,
                                       moments ? spy.data() : nullptr},
                bad);
            if (err) {
              std::printf("forward error: %s\n", err);
              return 1;
            }
            std::vector<float> g32(n_in);
            std::vector<unsigned short> g16(n_in);
            void* grad = ink == kF32 ? static_cast<void*>(g32.data()) : g16.data();
            err = emu::run_backward(a, 227 * 1024,
                                    GradPtrs{gc.data(), gp.data(), gy.data(), moments ? gp2.data() : nullptr,
                                             moments ? gpy.data() : nullptr},
                                    grad);
            if (err) {
              std::printf("backward error: %s\n", err);
              return 1;
            }
            ++runs;
          }
        }
      }
    }
  }
  std::printf("ok %lld runs\n", static_cast<long long>(runs));
  return 0;
}
