// CPU kernels for conditional matrix multiplication. Two instruction-set paths share one driver
// (cmm_driver.inc): AVX2 + FMA intrinsics where the CPU has them, and a portable path the compiler
// vectorises for the baseline ISA. The path is chosen once, at run time, so one binary runs anywhere.
#include "cmm_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>

#include <unistd.h>
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

void gelu_inplace(float* c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) c[i] = gelu(c[i]);
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

// M dot products at once, each over its own (x, w) pair: M weight rows stream in parallel.
template <int M, class W>
void dots_m(const float* const* xs, const W* const* ws, int64_t d, float* out) {
  // Named accumulators, not arrays: GCC kept `__m256 a[M]` arrays on the stack, storing every accumulator on
  // every iteration (seen in perf annotate), which put a store-to-load round trip into each FMA chain.
  const float* x0 = xs[0];
  const float* x1 = xs[M > 1 ? 1 : 0];
  const float* x2 = xs[M > 2 ? 2 : 0];
  const float* x3 = xs[M > 3 ? 3 : 0];
  const W* w0 = ws[0];
  const W* w1 = ws[M > 1 ? 1 : 0];
  const W* w2 = ws[M > 2 ? 2 : 0];
  const W* w3 = ws[M > 3 ? 3 : 0];
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    a0 = _mm256_fmadd_ps(load8(x0 + j), load8(w0 + j), a0);
    b0 = _mm256_fmadd_ps(load8(x0 + j + 8), load8(w0 + j + 8), b0);
    if constexpr (M > 1) {
      a1 = _mm256_fmadd_ps(load8(x1 + j), load8(w1 + j), a1);
      b1 = _mm256_fmadd_ps(load8(x1 + j + 8), load8(w1 + j + 8), b1);
    }
    if constexpr (M > 2) {
      a2 = _mm256_fmadd_ps(load8(x2 + j), load8(w2 + j), a2);
      b2 = _mm256_fmadd_ps(load8(x2 + j + 8), load8(w2 + j + 8), b2);
    }
    if constexpr (M > 3) {
      a3 = _mm256_fmadd_ps(load8(x3 + j), load8(w3 + j), a3);
      b3 = _mm256_fmadd_ps(load8(x3 + j + 8), load8(w3 + j + 8), b3);
    }
  }
  if (j + 8 <= d) {
    a0 = _mm256_fmadd_ps(load8(x0 + j), load8(w0 + j), a0);
    if constexpr (M > 1) a1 = _mm256_fmadd_ps(load8(x1 + j), load8(w1 + j), a1);
    if constexpr (M > 2) a2 = _mm256_fmadd_ps(load8(x2 + j), load8(w2 + j), a2);
    if constexpr (M > 3) a3 = _mm256_fmadd_ps(load8(x3 + j), load8(w3 + j), a3);
    j += 8;
  }
  const __m256 sums[4] = {_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)};
  for (int u = 0; u < M; ++u) {
    float s = hsum(sums[u]);
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

// GELU over the group's coefficients, 8 at a time. Scalar std::erf cost ~40 ns per neuron here (a third of a
// token's time with rows hot in cache); this is erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7,
// the approximation torch's own vectorised CPU GELU uses) with a Cephes-style exp. The tail goes through the
// same vector code in a padded buffer, so a value's result never depends on its position in the array.
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // keeps 2^n a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 q = _mm256_set1_ps(1.9875691500e-4f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
  q = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(q, _mm256_castsi256_ps(e));
}

inline __m256 gelu8(__m256 a) {
  const __m256 x = _mm256_mul_ps(a, _mm256_set1_ps(0.70710678118654752440f));
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, _mm256_set1_ps(1.0f)));
  __m256 q = _mm256_set1_ps(1.061405429f);
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.453152027f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.421413741f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.284496736f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.254829592f));
  q = _mm256_mul_ps(q, t);
  const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
  const __m256 erf_abs = _mm256_fnmadd_ps(q, e, _mm256_set1_ps(1.0f));
  const __m256 erf = _mm256_or_ps(erf_abs, sign);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), a), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

void gelu_inplace(float* c, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(c + i, gelu8(_mm256_loadu_ps(c + i)));
  if (i < n) {
    float pad[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(c + i, c + n, pad);
    _mm256_storeu_ps(pad, gelu8(_mm256_loadu_ps(pad)));
    std::copy(pad, pad + (n - i), c + i);
  }
}

#include "cmm_driver.inc"

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AVX-512 path (Intel from Skylake-SP, AMD from Zen 4): the AVX2 path's loops at twice the width. On a CPU with
// two 512-bit FMA units this halves the instructions per row, which is what the hot-row case is bound by.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512 {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int M, class W>
void dots_m(const float* const* xs, const W* const* ws, int64_t d, float* out) {
  // Named accumulators, for the reason given in the AVX2 path.
  const float* x0 = xs[0];
  const float* x1 = xs[M > 1 ? 1 : 0];
  const float* x2 = xs[M > 2 ? 2 : 0];
  const float* x3 = xs[M > 3 ? 3 : 0];
  const W* w0 = ws[0];
  const W* w1 = ws[M > 1 ? 1 : 0];
  const W* w2 = ws[M > 2 ? 2 : 0];
  const W* w3 = ws[M > 3 ? 3 : 0];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    a0 = _mm512_fmadd_ps(load16(x0 + j), load16(w0 + j), a0);
    b0 = _mm512_fmadd_ps(load16(x0 + j + 16), load16(w0 + j + 16), b0);
    if constexpr (M > 1) {
      a1 = _mm512_fmadd_ps(load16(x1 + j), load16(w1 + j), a1);
      b1 = _mm512_fmadd_ps(load16(x1 + j + 16), load16(w1 + j + 16), b1);
    }
    if constexpr (M > 2) {
      a2 = _mm512_fmadd_ps(load16(x2 + j), load16(w2 + j), a2);
      b2 = _mm512_fmadd_ps(load16(x2 + j + 16), load16(w2 + j + 16), b2);
    }
    if constexpr (M > 3) {
      a3 = _mm512_fmadd_ps(load16(x3 + j), load16(w3 + j), a3);
      b3 = _mm512_fmadd_ps(load16(x3 + j + 16), load16(w3 + j + 16), b3);
    }
  }
  if (j + 16 <= d) {
    a0 = _mm512_fmadd_ps(load16(x0 + j), load16(w0 + j), a0);
    if constexpr (M > 1) a1 = _mm512_fmadd_ps(load16(x1 + j), load16(w1 + j), a1);
    if constexpr (M > 2) a2 = _mm512_fmadd_ps(load16(x2 + j), load16(w2 + j), a2);
    if constexpr (M > 3) a3 = _mm512_fmadd_ps(load16(x3 + j), load16(w3 + j), a3);
    j += 16;
  }
  const __m512 sums[4] = {_mm512_add_ps(a0, b0), _mm512_add_ps(a1, b1), _mm512_add_ps(a2, b2), _mm512_add_ps(a3, b3)};
  for (int u = 0; u < M; ++u) {
    float s = _mm512_reduce_add_ps(sums[u]);
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
  for (; j + 64 <= d; j += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t l = 0;
    for (; l + 2 <= n_rows; l += 2) {
      const W* r = rows[l] + j;
      const W* s = rows[l + 1] + j;
      const __m512 cr = _mm512_set1_ps(c[l]);
      const __m512 cs = _mm512_set1_ps(c[l + 1]);
      a0 = _mm512_fmadd_ps(cr, load16(r), a0);
      a1 = _mm512_fmadd_ps(cr, load16(r + 16), a1);
      a2 = _mm512_fmadd_ps(cr, load16(r + 32), a2);
      a3 = _mm512_fmadd_ps(cr, load16(r + 48), a3);
      b0 = _mm512_fmadd_ps(cs, load16(s), b0);
      b1 = _mm512_fmadd_ps(cs, load16(s + 16), b1);
      b2 = _mm512_fmadd_ps(cs, load16(s + 32), b2);
      b3 = _mm512_fmadd_ps(cs, load16(s + 48), b3);
    }
    if (l < n_rows) {
      const W* r = rows[l] + j;
      const __m512 cr = _mm512_set1_ps(c[l]);
      a0 = _mm512_fmadd_ps(cr, load16(r), a0);
      a1 = _mm512_fmadd_ps(cr, load16(r + 16), a1);
      a2 = _mm512_fmadd_ps(cr, load16(r + 32), a2);
      a3 = _mm512_fmadd_ps(cr, load16(r + 48), a3);
    }
    _mm512_storeu_ps(y + j, _mm512_add_ps(a0, b0));
    _mm512_storeu_ps(y + j + 16, _mm512_add_ps(a1, b1));
    _mm512_storeu_ps(y + j + 32, _mm512_add_ps(a2, b2));
    _mm512_storeu_ps(y + j + 48, _mm512_add_ps(a3, b3));
  }
  for (; j + 16 <= d; j += 16) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t l = 0; l < n_rows; ++l) a = _mm512_fmadd_ps(_mm512_set1_ps(c[l]), load16(rows[l] + j), a);
    _mm512_storeu_ps(y + j, a);
  }
  for (; j < d; ++j) {
    float s = 0.0f;
    for (int64_t l = 0; l < n_rows; ++l) s += c[l] * to_float(rows[l][j]);
    y[j] = s;
  }
}

// GELU as in the AVX2 path (same approximation, same operations), 16 at a time.
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 q = _mm512_set1_ps(1.9875691500e-4f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
  q = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(q, _mm512_castsi512_ps(e));
}

inline __m512 gelu16(__m512 a) {
  const __m512 x = _mm512_mul_ps(a, _mm512_set1_ps(0.70710678118654752440f));
  const __m512i sign_bit = _mm512_set1_epi32(int32_t(0x80000000u));
  const __m512i xi = _mm512_castps_si512(x);
  const __m512i sign = _mm512_and_si512(xi, sign_bit);
  const __m512 ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, xi));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), ax, _mm512_set1_ps(1.0f)));
  __m512 q = _mm512_set1_ps(1.061405429f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
  q = _mm512_mul_ps(q, t);
  const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax)));
  const __m512 erf_abs = _mm512_fnmadd_ps(q, e, _mm512_set1_ps(1.0f));
  const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), a), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

void gelu_inplace(float* c, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(c + i, gelu16(_mm512_loadu_ps(c + i)));
  if (i < n) {
    float pad[16] = {0};
    std::copy(c + i, c + n, pad);
    _mm512_storeu_ps(pad, gelu16(_mm512_loadu_ps(pad)));
    std::copy(pad, pad + (n - i), c + i);
  }
}

#include "cmm_driver.inc"

}  // namespace avx512
#pragma GCC pop_options

enum class Path { kAuto, kAvx512, kAvx2, kPortable };
std::atomic<Path> g_forced_path{Path::kAuto};

bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
  return yes;
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

bool have_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
}

// The widest path this CPU runs, unless a test or the benchmark pinned a narrower one. float16 weights need F16C
// on the AVX2 path; no AVX2 CPU without it is known, but then they take the portable path.
Path path_for(const CmmProblem& p) {
  const Path forced = g_forced_path.load(std::memory_order_relaxed);
  if (forced == Path::kPortable) return Path::kPortable;
  if (forced != Path::kAvx2 && have_avx512()) return Path::kAvx512;
  if (have_avx2() && (p.wtype != WeightType::kFloat16 || have_f16c())) return Path::kAvx2;
  return Path::kPortable;
}

// pass: 0 whole descent, 1 prefix, 2 suffix (each ISA namespace has its own copy of the Pass enum).
void run_on_path(const CmmProblem& p, const CmmSplit* s, int pass, int64_t begin, int64_t end) {
  switch (path_for(p)) {
    case Path::kAvx512: avx512::run(p, s, static_cast<avx512::Pass>(pass), begin, end); break;
    case Path::kAvx2: avx2::run(p, s, static_cast<avx2::Pass>(pass), begin, end); break;
    default: portable::run(p, s, static_cast<portable::Pass>(pass), begin, end); break;
  }
}

std::atomic<int64_t> g_force_split{-1};

}  // namespace

void cmm_range(const CmmProblem& p, int64_t begin, int64_t end) { run_on_path(p, nullptr, 0, begin, end); }

void cmm_prefix(const CmmProblem& p, const CmmSplit& s, int64_t begin, int64_t end) {
  run_on_path(p, &s, 1, begin, end);
}

void cmm_suffix(const CmmProblem& p, const CmmSplit& s, int64_t begin, int64_t end) {
  run_on_path(p, &s, 2, begin, end);
}

void cmm_sort_tokens(const CmmProblem& p, const CmmSplit& s) {
  const int64_t first = (int64_t(1) << s.split) - 1;  // heap index of the first node at level `split`
  std::vector<int64_t> start(size_t(first) + 2, 0);
  for (int64_t t = 0; t < p.n; ++t) ++start[s.node[t * p.trees] - first + 1];
  for (int64_t b = 1; b <= first + 1; ++b) start[b] += start[b - 1];
  for (int64_t t = 0; t < p.n; ++t) s.order[start[s.node[t * p.trees] - first]++] = t;
}

int64_t cmm_split_level(const CmmProblem& p) {
  const int64_t forced = g_force_split.load(std::memory_order_relaxed);
  if (forced >= 0) return forced >= 1 && forced <= p.depth ? forced : 0;
  if (p.trees != 1) return 0;  // tokens are sorted by one tree's route; the shipped K > 1 models fit L2 anyway
  const int64_t bytes = p.wtype == WeightType::kFloat32 ? 4 : 2;
  const int64_t row_pair = (p.d_in + p.d_out) * bytes;  // one node's w_in and w_out rows
  // Half of this core's L2 for the subtree's rows (the x rows and y of the bucket need the rest).
  static const int64_t l2_budget = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return int64_t(l2 > 0 ? l2 : 512 * 1024) / 2;
  }();
  constexpr int64_t kMinTokensPerBucket = 8;
  // Sorting pays only when the whole tree does not already sit in L2.
  if (((int64_t(2) << p.depth) - 1) * row_pair <= l2_budget) return 0;
  // The shallowest split whose subtrees fit the budget ...
  int64_t split = 1;
  while (split < p.depth && ((int64_t(2) << (p.depth - split)) - 1) * row_pair > l2_budget) ++split;
  // ... provided its buckets still hold enough tokens to share their rows.
  return (p.n >> split) >= kMinTokensPerBucket ? split : 0;
}

void cmm_force_split(int64_t split) { g_force_split.store(split); }

const char* cmm_cpu_path() {
  CmmProblem fp16{};
  fp16.wtype = WeightType::kFloat16;
  switch (path_for(fp16)) {
    case Path::kAvx512: return "avx512";
    case Path::kAvx2: return "avx2-fma";
    default: break;
  }
  CmmProblem fp32{};
  return path_for(fp32) == Path::kAvx2 ? "avx2-fma (float16 weights: portable)" : "portable";
}

bool cmm_force_path(const std::string& name) {
  if (name == "auto") g_forced_path.store(Path::kAuto);
  else if (name == "avx2") g_forced_path.store(Path::kAvx2);
  else if (name == "portable") g_forced_path.store(Path::kPortable);
  else return false;
  return true;
}

}  // namespace ufb
