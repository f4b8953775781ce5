// CPU kernels for conditional matrix multiplication. Two instruction-set paths share one driver
// (cmm_driver.inc): AVX2 + FMA intrinsics where the CPU has them, and a portable path the compiler
// vectorises for the baseline ISA. The path is chosen once, at run time, so one binary runs anywhere.
#include "cmm_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace ufb {
namespace {

constexpr int64_t kLine = 64;

inline float gelu(float a) { return 0.5f * a * (1.0f + std::erf(a * 0.70710678118654752440f)); }

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// IEEE binary16 bits. A type of its own (not uint16_t, which means bfloat16 here) so that the driver's
// templates and the load/convert overloads tell the two 16-bit formats apart.
struct Half {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2, "Half must have the layout of torch.float16");

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Exact float16 -> float32 for every input (normals, subnormals, +-0, +-inf, NaN), without branches so that
// the portable loops still vectorise. The half's exponent and mantissa are moved into a float's fields and
// rescaled by 2^-112 (the difference of the exponent biases, 127 - 15, after adding 224 to the exponent so that
// 31, inf/NaN, lands on 255); subnormal halves (exponent 0) are built as 0.5 + m * 2^-24 with a magic bias and
// the 0.5 subtracted. Both results are normal floats, so flush-to-zero modes cannot change them.
inline float f16_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // sign shifted out
  const float normalized = bits_float((two_w >> 4) + (uint32_t(0xE0) << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (uint32_t(126) << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (uint32_t(1) << 27) ? float_bits(denormalized) : float_bits(normalized);
  return bits_float(sign | magnitude);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(Half v) { return f16_to_float(v.bits); }

// Starts the fetch of a row whose address just became known; the hardware prefetcher follows the stream.
inline void prefetch_head(const void* p) {
  const char* c = static_cast<const char*>(p);
  _mm_prefetch(c, _MM_HINT_T0);
  _mm_prefetch(c + kLine, _MM_HINT_T0);
}

// ---------------------------------------------------------------------------------------------------
// Portable path: plain loops with independent partial sums, which GCC vectorises for SSE2.
namespace portable {

template <class W>
float dot(const float* x, const W* w, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += x[j + u] * to_float(w[j + u]);
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < d; ++j) s += x[j] * to_float(w[j]);
  return s;
}

template <class W>
void dots(int64_t m, const float* const* xs, const W* const* ws, int64_t d, float* out) {
  for (int64_t u = 0; u < m; ++u) out[u] = dot(xs[u], ws[u], d);
}

template <class W>
void weighted_rows(float* y, const float* c, const W* const* rows, int64_t n_rows, int64_t d) {
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    float acc[16] = {0};
    for (int64_t l = 0; l < n_rows; ++l) {
      const W* r = rows[l] + j;
      const float cl = c[l];
      for (int u = 0; u < 16; ++u) acc[u] += cl * to_float(r[u]);
    }
    for (int u = 0; u < 16; ++u) y[j + u] = acc[u];
  }
  for (; j < d; ++j) {
    float s = 0.0f;
    for (int64_t l = 0; l < n_rows; ++l) s += c[l] * to_float(rows[l][j]);
    y[j] = s;
  }
}

#include "cmm_driver.inc"

}  // namespace portable

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA path (+ F16C, used only by float16 weights: run-time dispatch sends those elsewhere without it).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
// float16: one F16C conversion for 8 values (bfloat16 above needs a widen and a shift).
inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

template <class W>
float dot(const float* x, const W* w, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t j = 0;
  for (; j + 64 <= d; j += 64) {
    a0 = _mm256_fmadd_ps(load8(x + j), load8(w + j), a0);
    a1 = _mm256_fmadd_ps(load8(x + j + 8), load8(w + j + 8), a1);
    a2 = _mm256_fmadd_ps(load8(x + j + 16), load8(w + j + 16), a2);
    a3 = _mm256_fmadd_ps(load8(x + j + 24), load8(w + j + 24), a3);
    a4 = _mm256_fmadd_ps(load8(x + j + 32), load8(w + j + 32), a4);
    a5 = _mm256_fmadd_ps(load8(x + j + 40), load8(w + j + 40), a5);
    a6 = _mm256_fmadd_ps(load8(x + j + 48), load8(w + j + 48), a6);
    a7 = _mm256_fmadd_ps(load8(x + j + 56), load8(w + j + 56), a7);
  }
  for (; j + 8 <= d; j += 8) a0 = _mm256_fmadd_ps(load8(x + j), load8(w + j), a0);
  a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  a4 = _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7));
  float s = hsum(_mm256_add_ps(a0, a4));
  for (; j < d; ++j) s += x[j] * to_float(w[j]);
  return s;
}

// M dot products at once, each over its own (x, w) pair: M weight rows stream in parallel.
template <int M, class W>
void dots_m(const float* const* xs, const W* const* ws, int64_t d, float* out) {
  __m256 a[M], b[M];
  for (int u = 0; u < M; ++u) a[u] = b[u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    for (int u = 0; u < M; ++u) {
      a[u] = _mm256_fmadd_ps(load8(xs[u] + j), load8(ws[u] + j), a[u]);
      b[u] = _mm256_fmadd_ps(load8(xs[u] + j + 8), load8(ws[u] + j + 8), b[u]);
    }
  }
  for (; j + 8 <= d; j += 8)
    for (int u = 0; u < M; ++u) a[u] = _mm256_fmadd_ps(load8(xs[u] + j), load8(ws[u] + j), a[u]);
  for (int u = 0; u < M; ++u) {
    float s = hsum(_mm256_add_ps(a[u], b[u]));
    for (int64_t r = j; r < d; ++r) s += xs[u][r] * to_float(ws[u][r]);
    out[u] = s;
  }
}

template <class W>
void dots(int64_t m, const float* const* xs, const W* const* ws, int64_t d, float* out) {
  switch (m) {
    case 4: dots_m<4>(xs, ws, d, out); break;
    case 3: dots_m<3>(xs, ws, d, out); break;
    case 2: dots_m<2>(xs, ws, d, out); break;
    default: dots_m<1>(xs, ws, d, out); break;
  }
}

template <class W>
void weighted_rows(float* y, const float* c, const W* const* rows, int64_t n_rows, int64_t d) {
  int64_t j = 0;
  // 32 outputs at a time, with even and odd rows in separate accumulators: 8 independent FMA chains.
  for (; j + 32 <= d; j += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t l = 0;
    for (; l + 2 <= n_rows; l += 2) {
      const W* r = rows[l] + j;
      const W* s = rows[l + 1] + j;
      const __m256 cr = _mm256_set1_ps(c[l]);
      const __m256 cs = _mm256_set1_ps(c[l + 1]);
      a0 = _mm256_fmadd_ps(cr, load8(r), a0);
      a1 = _mm256_fmadd_ps(cr, load8(r + 8), a1);
      a2 = _mm256_fmadd_ps(cr, load8(r + 16), a2);
      a3 = _mm256_fmadd_ps(cr, load8(r + 24), a3);
      b0 = _mm256_fmadd_ps(cs, load8(s), b0);
      b1 = _mm256_fmadd_ps(cs, load8(s + 8), b1);
      b2 = _mm256_fmadd_ps(cs, load8(s + 16), b2);
      b3 = _mm256_fmadd_ps(cs, load8(s + 24), b3);
    }
    if (l < n_rows) {
      const W* r = rows[l] + j;
      const __m256 cr = _mm256_set1_ps(c[l]);
      a0 = _mm256_fmadd_ps(cr, load8(r), a0);
      a1 = _mm256_fmadd_ps(cr, load8(r + 8), a1);
      a2 = _mm256_fmadd_ps(cr, load8(r + 16), a2);
      a3 = _mm256_fmadd_ps(cr, load8(r + 24), a3);
    }
    _mm256_storeu_ps(y + j, _mm256_add_ps(a0, b0));
    _mm256_storeu_ps(y + j + 8, _mm256_add_ps(a1, b1));
    _mm256_storeu_ps(y + j + 16, _mm256_add_ps(a2, b2));
    _mm256_storeu_ps(y + j + 24, _mm256_add_ps(a3, b3));
  }
  for (; j + 8 <= d; j += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t l = 0; l < n_rows; ++l) a = _mm256_fmadd_ps(_mm256_set1_ps(c[l]), load8(rows[l] + j), a);
    _mm256_storeu_ps(y + j, a);
  }
  for (; j < d; ++j) {
    float s = 0.0f;
    for (int64_t l = 0; l < n_rows; ++l) s += c[l] * to_float(rows[l][j]);
    y[j] = s;
  }
}

#include "cmm_driver.inc"

}  // namespace avx2
#pragma GCC pop_options

std::atomic<bool> g_force_portable{false};

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

bool have_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
}

}  // namespace

void cmm_range(const CmmProblem& p, int64_t begin, int64_t end) {
  if (have_avx2() && !g_force_portable.load(std::memory_order_relaxed) &&
      (p.wtype != WeightType::kFloat16 || have_f16c())) {
    avx2::run(p, begin, end);
  } else {
    portable::run(p, begin, end);
  }
}

const char* cmm_cpu_path() {
  if (!have_avx2() || g_force_portable.load()) return "portable";
  return have_f16c() ? "avx2-fma" : "avx2-fma (float16 weights: portable)";
}

void cmm_force_portable(bool on) { g_force_portable.store(on); }

}  // namespace ufb
