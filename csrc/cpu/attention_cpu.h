// Self-attention over packed sequences on the CPU: the raw kernel (attention_cpu.cpp), which knows nothing about
// tensors; attention_op.cpp is its torch glue. Each (sequence, head) item is computed alone, by the same code
// whatever else shares the call, so a sequence's result is bit-identical alone, in any batch and at any thread count.
#pragma once

#include <cstdint>

namespace ufb {

struct AttentionProblem {
  const float* qkv;        // [n_tokens, qkv_stride]: per token q (heads x head_dim), then k, then v
  int64_t qkv_stride;      // elements between consecutive tokens of qkv (at least 3 * heads * head_dim)
  int64_t heads;
  int64_t head_dim;
  const int64_t* starts;   // [seqs] first token of each sequence
  const int64_t* lengths;  // [seqs] its token count
  float* out;              // [n_tokens, heads * head_dim] contiguous, written for every token of every sequence
  float scale;             // multiplies q . k (1 / sqrt(head_dim))
};

// Items [begin, end) on the calling thread; item i is head i % heads of sequence i / heads.
void attention_items(const AttentionProblem& p, int64_t begin, int64_t end);

}  // namespace ufb
