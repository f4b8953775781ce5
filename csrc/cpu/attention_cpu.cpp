// CPU kernel for self-attention over packed sequences. AVX-512 and AVX2 + FMA share one source
// (attention_simd.inc) over each width's register operations; the portable path is plain loops. The path is the
// one the other float32 kernels take (isa.h), chosen at run time.
#include "cpu/attention_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/isa.h"

namespace ufb {
namespace {

// ---------------------------------------------------------------------------------------------------
// Portable path: the same steps in scalar loops.
namespace portable {

void item(const AttentionProblem& p, int64_t seq, int64_t head, float* scratch) {
  const int64_t t = p.lengths[seq];
  if (t <= 0) return;
  const int64_t d = p.head_dim, hidden = p.heads * d;
  float* s = scratch;
  const float* base = p.qkv + p.starts[seq] * p.qkv_stride + head * d;
  for (int64_t i = 0; i < t; ++i) {
    const float* q = base + i * p.qkv_stride;
    float mx = -3.0e38f;
    for (int64_t j = 0; j < t; ++j) {
      const float* k = base + j * p.qkv_stride + hidden;
      float acc = 0.0f;
      for (int64_t c = 0; c < d; ++c) acc += (q[c] * p.scale) * k[c];
      s[j] = acc;
      mx = std::max(mx, acc);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < t; ++j) sum += (s[j] = std::exp(s[j] - mx));
    const float inv = 1.0f / sum;
    float* o = p.out + (p.starts[seq] + i) * hidden + head * d;
    for (int64_t c = 0; c < d; ++c) {
      float acc = 0.0f;
      for (int64_t j = 0; j < t; ++j) acc += s[j] * base[j * p.qkv_stride + 2 * hidden + c];
      o[c] = acc * inv;
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

#include "attention_simd.inc"

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AVX-512 path: the same code at twice the width.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {

#include "vec_avx512.inc"

#include "attention_simd.inc"

}  // namespace avx512
#pragma GCC pop_options

}  // namespace

void attention_items(const AttentionProblem& p, int64_t begin, int64_t end) {
  if (begin >= end) return;
  int64_t longest = 0;
  for (int64_t i = begin; i < end; ++i) longest = std::max(longest, p.lengths[i / p.heads]);
  const int64_t padded = (longest + 15) / 16 * 16;  // a multiple of every path's lanes
  std::vector<float> scratch(size_t(p.head_dim * padded + padded + p.head_dim));
  const Isa isa = float32_isa();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t seq = i / p.heads, head = i % p.heads;
    switch (isa) {
      case Isa::kAvx512: avx512::item(p, seq, head, scratch.data()); break;
      case Isa::kAvx2: avx2::item(p, seq, head, scratch.data()); break;
      default: portable::item(p, seq, head, scratch.data()); break;
    }
  }
}

}  // namespace ufb
