// Conditional matrix multiplication (CMM) on the CPU: the inference path of a fast feedforward layer.
// See engine/cmm.py for the semantics; this header is the boundary between the torch glue (register.cpp)
// and the raw kernel (cmm_cpu.cpp), which knows nothing about tensors.
#pragma once

#include <cstdint>

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
  float* y;              // [n, d_out], written (not accumulated)
  int64_t* leaves;       // [n, trees] or nullptr
};

// Runs the problem on the calling thread for tokens [begin, end).
void cmm_range(const CmmProblem& p, int64_t begin, int64_t end);

// Name of the instruction-set path chosen at run time ("avx2-fma" or "portable"). float16 weights need F16C
// as well; on an AVX2 CPU without it (none known) they take the portable path, and the name says so.
const char* cmm_cpu_path();

// Forces the portable path (tests use it to check both paths on machines that have AVX2).
void cmm_force_portable(bool on);

}  // namespace ufb
