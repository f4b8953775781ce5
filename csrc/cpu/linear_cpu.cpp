// CPU kernels for the dense float32 linear y = x @ w^T + b. Two SIMD paths, AVX-512 and AVX2 + FMA, share one
// source (linear_simd.inc: register tiles of up to 3 rows of x times 4-8 rows of w, one accumulator per output over
// the whole of K); a portable path covers other CPUs. The path is the one the CMM kernel takes (isa.h), chosen at
// run time, so one binary runs anywhere.
#include "cpu/linear_cpu.h"

#include <immintrin.h>

#include <algorithm>

#include "cpu/isa.h"

namespace ufb {
namespace {

// Writes a block of tile results: `rows` rows from row r, `cols` columns from n0, out holding tiles `nr` columns
// wide side by side ([cols / nr][rows][nr]); adds the bias after the dot product's own sum, on every path.
inline void store_rows(const LinearProblem& p, int64_t r, int64_t rows, int64_t n0, int64_t cols, const float* out,
                       int64_t nr) {
  for (int64_t i = 0; i < rows; ++i) {
    float* y = p.y + (r + i) * p.n + n0;
    for (int64_t c = 0; c < cols; ++c) {
      const float s = out[(c / nr) * rows * nr + i * nr + c % nr];
      y[c] = p.b != nullptr ? s + p.b[n0 + c] : s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Portable path: each output's dot product in eight interleaved partial sums (the AVX2 path's lanes), which GCC
// vectorises for SSE2.
namespace portable {

float dot(const float* x, const float* w, int64_t k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= k; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += x[j + u] * w[j + u];
  for (int u = 0; j + u < k; ++u) acc[u] += x[j + u] * w[j + u];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void columns(const LinearProblem& p, int64_t col_begin, int64_t col_end) {
  for (int64_t r = 0; r < p.m; ++r) {
    const float* x = p.x + r * p.x_stride;
    float* y = p.y + r * p.n;
    for (int64_t c = col_begin; c < col_end; ++c) {
      const float s = dot(x, p.w + c * p.k, p.k);
      y[c] = p.b != nullptr ? s + p.b[c] : s;
    }
  }
}

}  // namespace portable

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA path.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

#include "vec_avx2.inc"
alignas(32) constexpr int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline V vload_part(const float* p, int64_t r) {
  return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - r)));
}
// Lane i of the result: ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) of the i-th argument.
inline __m128 vsum4(V a, V b, V c, V d) {
  const V abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#include "linear_simd.inc"

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AVX-512 path: the same tiles at twice the width.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {

#include "vec_avx512.inc"
inline V vload_part(const float* p, int64_t r) { return _mm512_maskz_loadu_ps(__mmask16((1u << r) - 1), p); }
// The two 256-bit halves added lane by lane, then the AVX2 path's reduction.
inline __m256 fold(V v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline __m128 vsum4(V a, V b, V c, V d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#include "linear_simd.inc"

}  // namespace avx512
#pragma GCC pop_options

}  // namespace

void linear_columns(const LinearProblem& p, int64_t col_begin, int64_t col_end) {
  if (p.m == 0 || col_begin >= col_end) return;
  switch (float32_isa()) {
    case Isa::kAvx512: avx512::columns(p, col_begin, col_end); break;
    case Isa::kAvx2: avx2::columns(p, col_begin, col_end); break;
    default: portable::columns(p, col_begin, col_end); break;
  }
}

}  // namespace ufb
