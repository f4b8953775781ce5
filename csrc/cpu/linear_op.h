// torch.ops.ufb.linear on CPU tensors (y = x @ weight^T + bias, float32): argument checks, the thread split, and
// the eager runner the Python fast path (csrc/python/fast_path.cpp) shares. The raw kernel is linear_cpu.h.
#pragma once

#include <torch/extension.h>

namespace ufb {

// The op's body: x [M, K] (rows may be strided; columns must be adjacent or x is copied), weight [N, K] contiguous,
// bias [N] contiguous or nullptr, all float32 CPU; throws c10::Error naming what is wrong. Returns y [M, N].
// With release_gil, a call big enough to use more than one thread's worth of work runs without the GIL.
at::Tensor linear_2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, bool release_gil);

// Whether the eager fast path takes this call rather than torch's F.linear: float32 strided CPU tensors, weight
// contiguous [N, K], bias contiguous [N] or none, x [..., K], and nothing for autograd to record or CPU autocast
// to convert.
bool linear_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias);

// linear_2d over x [..., K] -> [..., N], for a call linear_applies accepted; releases the GIL on big calls.
at::Tensor linear_eager(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias);

}  // namespace ufb
