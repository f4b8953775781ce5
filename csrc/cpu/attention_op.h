// torch.ops.ufb.varlen_attention on CPU tensors: argument checks, the split of (sequence, head) items over torch's
// thread pool, and the eager runner the Python fast path (csrc/python/fast_path.cpp) shares. The raw kernel is
// attention_cpu.h.
#pragma once

#include <torch/extension.h>

namespace ufb {

// The op's body. qkv [N, >= 3 * heads * head_dim] float32 CPU (rows may be strided, columns adjacent): per token
// q, k, v of every head, as BERT's fused projection writes them; starts and lengths [B] int64 CPU, the sequences
// lying one after another over all N rows (starts[0] = 0, starts[i + 1] = starts[i] + lengths[i], the lengths
// summing to N). Returns softmax(q k^T / sqrt(head_dim)) v per sequence and head, [N, heads * head_dim], heads
// side by side; throws c10::Error naming what is wrong. With release_gil, a call worth more than one thread runs
// without the GIL.
at::Tensor varlen_attention(const at::Tensor& qkv, const at::Tensor& starts, const at::Tensor& lengths,
                            int64_t num_heads, bool release_gil);

// Whether the eager fast path takes this call: float32 CPU qkv, and nothing for autograd to record or CPU
// autocast to convert (anything else runs torch's scaled_dot_product_attention per length group).
bool varlen_attention_applies(const at::Tensor& qkv);

}  // namespace ufb
