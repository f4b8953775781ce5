// Dense float32 linear on the CPU, y = x @ w^T + b: the raw kernel (linear_cpu.cpp), which knows nothing about
// tensors; linear_op.cpp is its torch glue. Every output is a dot product over the whole of K in one fixed order
// (per path), so a row's result never depends on how many rows share the call or on the thread split.
#pragma once

#include <cstdint>

namespace ufb {

struct LinearProblem {
  const float* x;    // [m, x_stride], first k columns used
  int64_t x_stride;  // elements between consecutive rows of x
  int64_t m;         // rows of x (and y)
  int64_t k;         // inner dimension
  int64_t n;         // rows of w, columns of y
  const float* w;    // [n, k] contiguous (nn.Linear's layout)
  const float* b;    // [n], or nullptr
  float* y;          // [m, n] contiguous, written
};

// Output columns are computed in tiles of this many; a thread's share of the columns is a multiple of it.
constexpr int64_t kLinearColumnTile = 8;

// Computes columns [col_begin, col_end) of y for every row, on the calling thread. col_begin must be a multiple
// of kLinearColumnTile (col_end may be n).
void linear_columns(const LinearProblem& p, int64_t col_begin, int64_t col_end);

}  // namespace ufb
