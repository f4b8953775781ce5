// torch.ops.ufb.cmm on CPU tensors: argument checks, the thread split, and the eager runner the Python fast path
// (csrc/python/fast_path.cpp) shares. The raw kernel behind it (cmm_cpu.h) knows nothing about tensors.
#pragma once

#include <torch/extension.h>

#include "cpu/cmm_cpu.h"

namespace ufb {

// Validates the arguments (throws c10::Error naming the problem) and describes them to the raw kernel. `y` and
// `leaves` are filled in by the caller once the output sizes are known (n, d_out, trees).
CmmProblem check_problem(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                         const at::Tensor& w_out, int64_t depth, const at::Tensor* b_out);

// The eager calls' common body: checks, allocates y (and leaves, if wanted, else leaves stays undefined) and runs.
// The GIL is released while more than one thread's worth of tokens computes, so other Python threads (the
// service's event loop) run meanwhile, as they do during torch's own operators.
void run_eager(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
               int64_t depth, bool return_leaves, const at::Tensor* b_out, at::Tensor& y, at::Tensor& leaves);

// The CPU kernel's test and benchmark controls on the extension module (cpu_path, force_path, split_level,
// force_split).
void add_cpu_controls(pybind11::module_& m);

}  // namespace ufb
