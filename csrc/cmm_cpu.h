// Conditional matrix multiplication (CMM) on the CPU: the inference path of a fast feedforward layer.
// See engine/cmm.py for the semantics; this header is the boundary between the torch glue (register.cpp)
// and the raw kernel (cmm_cpu.cpp), which knows nothing about tensors.
#pragma once

#include <cstdint>

namespace ufb {

struct CmmProblem {
  const float* x;        // [n, x_stride], first d_in columns used
  int64_t x_stride;      // elements between consecutive tokens
  int64_t n;             // tokens
  int64_t d_in;
  int64_t d_out;
  int64_t trees;         // K
  int64_t depth;         // D: a token visits D + 1 nodes per tree
  const void* w_in;      // [trees, nodes, d_in], float or bfloat16 (bf16w)
  const float* b_in;     // [trees, nodes]
  const void* w_out;     // [trees, nodes, d_out], same dtype as w_in
  bool bf16w;            // weights stored as bfloat16
  float* y;              // [n, d_out], written (not accumulated)
  int64_t* leaves;       // [n, trees] or nullptr
};

// Runs the problem on the calling thread for tokens [begin, end).
void cmm_range(const CmmProblem& p, int64_t begin, int64_t end);

// Name of the instruction-set path chosen at run time ("avx2-fma" or "portable").
const char* cmm_cpu_path();

// Forces the portable path (tests use it to check both paths on machines that have AVX2).
void cmm_force_portable(bool on);

}  // namespace ufb
