// Op registration: the schema of torch.ops.ufb.cmm (a real custom op, so it runs under torch.inference_mode() and
// torch.compile can trace it; its fake implementation is registered from Python, engine/cmm.py), of the dense
// float32 linear torch.ops.ufb.linear (y = x @ weight^T + bias; engine/linear.py), of self-attention over packed
// sequences torch.ops.ufb.varlen_attention (engine/attention.py), and the extension module engine._cmm. Each
// device registers its kernels for the schemas where they live: csrc/cpu/cmm_op.cpp, csrc/cpu/linear_op.cpp and
// csrc/cpu/attention_op.cpp (TORCH_LIBRARY_IMPL(ufb, CPU, ...)); a GPU kernel goes in csrc/cuda/ (see its README.md).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cmm_op.h"
#include "python/fast_path.h"

TORCH_LIBRARY(ufb, m) {
  m.def("cmm(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int depth, bool return_leaves, Tensor? b_out=None) "
        "-> (Tensor, Tensor)");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("varlen_attention(Tensor qkv, Tensor starts, Tensor lengths, int num_heads) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "UltraFastBERT conditional matrix multiplication kernels (registers torch.ops.ufb.*)";
  ufb::add_cpu_controls(m);
  ufb::add_fast_path(m);
}
