// Conditional matrix multiplication (CMM) on the CPU: the inference path of a fast feedforward layer.
// See engine/cmm.py for the semantics; this header is the boundary between the torch glue (cmm_op.cpp)
// and the raw kernel (cmm_cpu.cpp), which knows nothing about tensors.
#pragma once

#include <cstdint>
#include <string>

namespace ufb {

// Storage type of w_in / w_out. Activations, biases and outputs are always float32.
enum class WeightType : uint8_t {
  kFloat32,
  kBFloat16,  // uint16_t bits: the top half of a float32
  kFloat16,   // IEEE binary16 (torch.float16)
};

struct CmmProblem {
  const float* x;        // [n, x_stride], first d_in columns used
  int64_t x_stride;      // elements between consecutive tokens
  int64_t n;             // tokens
  int64_t d_in;
  int64_t d_out;
  int64_t trees;         // K
  int64_t depth;         // D: a token visits D + 1 nodes per tree
  const void* w_in;      // [trees, nodes, d_in], float32, bfloat16 or float16 (wtype)
  const float* b_in;     // [trees, nodes]
  const void* w_out;     // [trees, nodes, d_out], same dtype as w_in
  WeightType wtype;      // storage type of w_in and w_out
  const float* b_out;    // [d_out] output bias, or nullptr (BERT-layout FFFs keep their teacher FFN's)
  float* y;              // [n, d_out], written (not accumulated): b_out + the visited rows' weighted sum
  int64_t* leaves;       // [n, trees] or nullptr
};

// Runs the problem on the calling thread for tokens [begin, end).
void cmm_range(const CmmProblem& p, int64_t begin, int64_t end);

// The two-pass descent for large batches (why: cmm_driver.inc). The caller owns the scratch and the threads:
// cmm_prefix over all tokens, then cmm_sort_tokens, then cmm_suffix over all positions of `order`.
struct CmmSplit {
  int64_t split;         // levels descended by the prefix pass, in [1, depth]
  float* pre;            // [n, trees, split]: the prefix's pre-activations
  int32_t* node;         // [n, trees]: heap index, within its tree, of the node reached at level `split`
  int64_t* order;        // [n]: tokens sorted by tree 0's node at level `split` (written by cmm_sort_tokens)
};

// The split level worth taking for this problem (0: one pass is faster). Only trees whose rows outgrow a core's
// L3 share (16 MB) sort; the split is then chosen so that one subtree below it fits in L2 and holds enough tokens
// to share its rows (docs/kernel.md).
int64_t cmm_split_level(const CmmProblem& p);

// Tests and the benchmark pin the choice: -1 = automatic (the default), 0 = always one pass, s > 0 = split at s
// whenever 1 <= s <= depth.
void cmm_force_split(int64_t split);

void cmm_prefix(const CmmProblem& p, const CmmSplit& s, int64_t begin, int64_t end);
void cmm_sort_tokens(const CmmProblem& p, const CmmSplit& s);  // stable counting sort, O(n + 2^split)
void cmm_suffix(const CmmProblem& p, const CmmSplit& s, int64_t begin, int64_t end);

// Name of the instruction-set path chosen at run time ("avx512", "avx2-fma" or "portable"). float16 weights need
// F16C as well; on an AVX2 CPU without it (none known) they take the portable path, and the name says so.
const char* cmm_cpu_path();

// Caps the path at "avx2" or "portable", or restores "auto" (tests check every path this CPU can run; the
// benchmark compares them). Returns false for an unknown name.
bool cmm_force_path(const std::string& name);

}  // namespace ufb
