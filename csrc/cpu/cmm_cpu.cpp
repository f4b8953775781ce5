// CPU kernels for conditional matrix multiplication. Three instruction-set paths share one driver
// (cmm_driver.inc): AVX-512 and AVX2 + FMA, whose vector primitives are one source (cmm_simd.inc) over each
// width's register operations, and a portable path the compiler vectorises for the baseline ISA. The path is
// chosen once, at run time, so one binary runs anywhere.
#include "cpu/cmm_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>

#include <unistd.h>
#include <vector>

#include "cpu/isa.h"

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
float dot_one(const float* x, const W* w, int64_t d) {
  return dot(x, w, d);
}

template <class W>
void weighted_rows(float* y, const float* bias, const float* c, const W* const* rows, int64_t n_rows, int64_t d) {
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    float acc[16] = {0};
    if (bias != nullptr) std::copy(bias + j, bias + j + 16, acc);
    for (int64_t l = 0; l < n_rows; ++l) {
      const W* r = rows[l] + j;
      const float cl = c[l];
      for (int u = 0; u < 16; ++u) acc[u] += cl * to_float(r[u]);
    }
    for (int u = 0; u < 16; ++u) y[j + u] = acc[u];
  }
  for (; j < d; ++j) {
    float s = bias != nullptr ? bias[j] : 0.0f;
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

#include "vec_avx2.inc"
// 16-bit weights, which only the CMM kernel reads: bfloat16 (uint16_t bits) and float16 (Half).
inline V vload(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
// float16: one F16C conversion for 8 values (bfloat16 above needs a widen and a shift).
inline V vload(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

#include "cmm_simd.inc"
#include "cmm_driver.inc"

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AVX-512 path (Intel from Skylake-SP, AMD from Zen 4): the AVX2 path's loops at twice the width. On a CPU with
// two 512-bit FMA units this halves the instructions per row, which is what the hot-row case is bound by.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512 {

#include "vec_avx512.inc"
// 16-bit weights, which only the CMM kernel reads: bfloat16 (uint16_t bits) and float16 (Half).
inline V vload(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline V vload(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

#include "cmm_simd.inc"
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

Isa float32_isa() {
  const CmmProblem fp32{};
  switch (path_for(fp32)) {
    case Path::kAvx512: return Isa::kAvx512;
    case Path::kAvx2: return Isa::kAvx2;
    default: return Isa::kPortable;
  }
}

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
  // Sorting pays only for trees too big for the share of L3 a core can count on: below that the one-pass
  // descent's rows come from L3 with 8 tokens in flight, and the second pass, the sort and the scattered x rows
  // cost more than the L2 reuse saves. At depth 11, width 768 that sorts float32 rows (24 MB) and not 16-bit ones
  // (12 MB); docs/kernel.md and docs/experiments/two_pass_split.py have the measurements. sysconf's L3 size is no
  // guide: VMs report the host's.
  constexpr int64_t kMinTreeBytesToSort = int64_t(16) << 20;
  const int64_t tree_bytes = ((int64_t(2) << p.depth) - 1) * row_pair;
  if (tree_bytes <= l2_budget || tree_bytes < kMinTreeBytesToSort) return 0;
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
