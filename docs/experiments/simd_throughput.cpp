// How fast one core runs the CMM kernel's two inner loops when nothing else is in the way (docs/kernel.md: the
// 341x target at 16 tokens). Standalone: no torch, no threads.
//
//   g++ -O3 -o /tmp/simd_throughput docs/experiments/simd_throughput.cpp && /tmp/simd_throughput [GHz]
//
// * dots4: four 768-long dot products at once, each of an fp32 activation row with its own weight row, as
//   csrc/cpu/cmm_simd.inc's dots_m<4> does at every tree level (the x rows are in L1, the 64 weight rows in L1/L2).
// * rows12: one output row as the weighted sum of 12 weight rows, as weighted_rows does once per token, over 48
//   rows in turn (72 KB of 16-bit rows: more than L1, as a token's rows are).
// Each in float32, bfloat16 (widened with vpmovzxwd + vpslld, as the kernel does) and float16 (vcvtph2ps), plus
// bfloat16 rows stored pair-interleaved (one 64-byte load gives 32 values: vpslld for one half, vpandd for the
// other), a layout the kernel does not use. Prints the best of 7 rounds, in ns per call and per 512-bit FMA
// (cycles too, given the clock in GHz).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {
constexpr int kD = 768;
#define TARGET __attribute__((target("avx512f,avx512bw,f16c,fma,avx2"), noinline))

// 16 weights from element j of a row, widened to float32. W: 0 float32, 1 bfloat16, 2 float16, 3 bfloat16
// pair-interleaved (elements j..j+15 are the low halves of the 32-bit words of the 64-byte block at j & ~31,
// elements j+16..j+31 their high halves; the compiler loads each block once).
template <int W>
__attribute__((always_inline, target("avx512f,avx512bw,f16c,fma,avx2"))) inline __m512 ld(const void* p, int j) {
  if constexpr (W == 0) return _mm512_loadu_ps(static_cast<const float*>(p) + j);
  if constexpr (W == 1)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + j))),
        16));
  if constexpr (W == 2)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + j)));
  const __m512i words = _mm512_loadu_si512(static_cast<const uint16_t*>(p) + (j & ~31));
  return _mm512_castsi512_ps((j & 16) ? _mm512_and_si512(words, _mm512_set1_epi32(int32_t(0xFFFF0000u)))
                                      : _mm512_slli_epi32(words, 16));
}

template <int W>
TARGET void dots4(const float* x, const void* const* w, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int j = 0; j < kD; j += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
    a0 = _mm512_fmadd_ps(x0, ld<W>(w[0], j), a0);
    b0 = _mm512_fmadd_ps(x1, ld<W>(w[0], j + 16), b0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + kD + j), ld<W>(w[1], j), a1);
    b1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + kD + j + 16), ld<W>(w[1], j + 16), b1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + 2 * kD + j), ld<W>(w[2], j), a2);
    b2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + 2 * kD + j + 16), ld<W>(w[2], j + 16), b2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + 3 * kD + j), ld<W>(w[3], j), a3);
    b3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + 3 * kD + j + 16), ld<W>(w[3], j + 16), b3);
  }
  out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
  out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
  out[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
  out[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}

template <int W>
TARGET void rows12(float* y, const float* c, const void* const* rows) {
  for (int j = 0; j < kD; j += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int l = 0; l < 12; l += 2) {
      const __m512 cr = _mm512_set1_ps(c[l]), cs = _mm512_set1_ps(c[l + 1]);
      a0 = _mm512_fmadd_ps(cr, ld<W>(rows[l], j), a0);
      a1 = _mm512_fmadd_ps(cr, ld<W>(rows[l], j + 16), a1);
      a2 = _mm512_fmadd_ps(cr, ld<W>(rows[l], j + 32), a2);
      a3 = _mm512_fmadd_ps(cr, ld<W>(rows[l], j + 48), a3);
      b0 = _mm512_fmadd_ps(cs, ld<W>(rows[l + 1], j), b0);
      b1 = _mm512_fmadd_ps(cs, ld<W>(rows[l + 1], j + 16), b1);
      b2 = _mm512_fmadd_ps(cs, ld<W>(rows[l + 1], j + 32), b2);
      b3 = _mm512_fmadd_ps(cs, ld<W>(rows[l + 1], j + 48), b3);
    }
    _mm512_storeu_ps(y + j, _mm512_add_ps(a0, b0));
    _mm512_storeu_ps(y + j + 16, _mm512_add_ps(a1, b1));
    _mm512_storeu_ps(y + j + 32, _mm512_add_ps(a2, b2));
    _mm512_storeu_ps(y + j + 48, _mm512_add_ps(a3, b3));
  }
}

template <class F>
double best_ns(F&& call) {
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    constexpr int kCalls = 100000;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < kCalls; ++i) call(i);
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    if (ns / kCalls < best) best = ns / kCalls;
  }
  return best;
}
}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) {
    std::puts("needs AVX-512 (F, BW)");
    return 0;
  }
  const double ghz = argc > 1 ? std::atof(argv[1]) : 0.0;
  constexpr int kRows = 64;
  std::vector<float> w32(size_t(kRows) * kD), x(4 * kD), y(kD);
  std::vector<uint16_t> w16(size_t(kRows) * kD);
  for (size_t i = 0; i < w32.size(); ++i) {
    w32[i] = 1.0f / float(1 + i % 5);
    w16[i] = uint16_t(0x3c00 + i % 7);  // small positive values in both 16-bit formats
  }
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + float(i % 3);
  const float c[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  const void* r32[kRows];
  const void* r16[kRows];
  for (int i = 0; i < kRows; ++i) {
    r32[i] = w32.data() + size_t(i) * kD;
    r16[i] = w16.data() + size_t(i) * kD;
  }
  float out[4];
  volatile float sink = 0;
  auto report = [&](const char* name, double ns, int fmas) {
    std::printf("%-34s %7.1f ns per call  %5.3f ns per 512-bit FMA", name, ns, ns / fmas);
    if (ghz > 0) std::printf("  %4.2f cycles", ns / fmas * ghz);
    std::printf("\n");
  };
  constexpr int kDotFmas = 4 * kD / 16, kRowFmas = 12 * kD / 16;
  report("dots4  float32 rows", best_ns([&](int i) { dots4<0>(x.data(), r32 + (i % 16) * 4, out); sink = out[0]; }), kDotFmas);
  report("dots4  bfloat16 rows", best_ns([&](int i) { dots4<1>(x.data(), r16 + (i % 16) * 4, out); sink = out[0]; }), kDotFmas);
  report("dots4  float16 rows", best_ns([&](int i) { dots4<2>(x.data(), r16 + (i % 16) * 4, out); sink = out[0]; }), kDotFmas);
  report("dots4  bfloat16 rows, interleaved", best_ns([&](int i) { dots4<3>(x.data(), r16 + (i % 16) * 4, out); sink = out[0]; }), kDotFmas);
  report("rows12 float32", best_ns([&](int i) { rows12<0>(y.data(), c, r32 + (i % 4) * 12); sink = y[5]; }), kRowFmas);
  report("rows12 bfloat16", best_ns([&](int i) { rows12<1>(y.data(), c, r16 + (i % 4) * 12); sink = y[5]; }), kRowFmas);
  report("rows12 float16", best_ns([&](int i) { rows12<2>(y.data(), c, r16 + (i % 4) * 12); sink = y[5]; }), kRowFmas);
  report("rows12 bfloat16, interleaved", best_ns([&](int i) { rows12<3>(y.data(), c, r16 + (i % 4) * 12); sink = y[5]; }), kRowFmas);
  (void)sink;
  return 0;
}
