// Torch glue: validates tensors, splits tokens over threads and registers the op as torch.ops.ufb.cmm,
// a real custom op (dispatcher schema + CPU kernel), so it runs under torch.inference_mode() and
// torch.compile can trace it (its fake/meta implementation is registered from Python, engine/cmm.py).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cmm_cpu.h"

namespace {

// Tokens per parallel chunk. Below two chunks' worth the call stays on the calling thread, where waking the
// pool would cost more than it saves. Measured on 2 threads of a Xeon (Emerald Rapids), float16 weights, depth
// 11: threads from 8 tokens up are 1.3-1.6x faster per call than one thread (8 tokens 13.8 vs 19 us, 16: 24
// vs 33-38 us, 47: 58 vs 79-97 us); at 2-4 tokens one thread is as fast.
constexpr int64_t kGrain = 4;

std::tuple<at::Tensor, at::Tensor> cmm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in,
                                           const at::Tensor& w_out, int64_t depth, bool return_leaves) {
  TORCH_CHECK(x_in.dim() == 2, "ufb::cmm: x must be [N, d_in], got ", x_in.sizes());
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3 && b_in.dim() == 2,
              "ufb::cmm: expected w_in [K, nodes, d_in], b_in [K, nodes], w_out [K, nodes, d_out]");
  TORCH_CHECK(depth >= 0 && depth < 31, "ufb::cmm: depth must be in [0, 30], got ", depth);
  const int64_t trees = w_in.size(0), nodes = w_in.size(1), d_in = w_in.size(2), d_out = w_out.size(2);
  TORCH_CHECK(nodes == (int64_t(2) << depth) - 1, "ufb::cmm: depth ", depth, " needs ", (int64_t(2) << depth) - 1,
              " nodes per tree, weights have ", nodes);
  TORCH_CHECK(x_in.size(1) == d_in, "ufb::cmm: x has width ", x_in.size(1), ", w_in expects ", d_in);
  TORCH_CHECK(b_in.size(0) == trees && b_in.size(1) == nodes && w_out.size(0) == trees && w_out.size(1) == nodes,
              "ufb::cmm: b_in / w_out do not match w_in's trees and nodes");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && b_in.scalar_type() == at::kFloat,
              "ufb::cmm: x and b_in must be float32");
  TORCH_CHECK(w_in.scalar_type() == w_out.scalar_type() &&
                  (w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16 ||
                   w_in.scalar_type() == at::kHalf),
              "ufb::cmm: w_in and w_out must both be float32, both bfloat16 or both float16, got ",
              w_in.scalar_type(), " and ", w_out.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu() && w_out.device().is_cpu() && b_in.device().is_cpu(),
              "ufb::cmm: CPU tensors expected");
  TORCH_CHECK(w_in.is_contiguous() && w_out.is_contiguous() && b_in.is_contiguous(),
              "ufb::cmm: weights must be contiguous (pack them once with engine.cmm.pack_fff_weights)");

  // Rows may be strided (a slice of a wider tensor); elements within a row must be adjacent.
  const at::Tensor x = (x_in.size(0) > 0 && x_in.stride(1) != 1) ? x_in.contiguous() : x_in;
  const int64_t n = x.size(0);
  at::Tensor y = at::empty({n, d_out}, x.options());
  at::Tensor leaves = at::empty({return_leaves ? n : 0, trees}, x.options().dtype(at::kLong));
  if (n == 0) return {y, leaves};

  ufb::CmmProblem p;
  p.x = x.data_ptr<float>();
  p.x_stride = x.stride(0);
  p.n = n;
  p.d_in = d_in;
  p.d_out = d_out;
  p.trees = trees;
  p.depth = depth;
  p.w_in = w_in.data_ptr();
  p.b_in = b_in.data_ptr<float>();
  p.w_out = w_out.data_ptr();
  p.wtype = w_in.scalar_type() == at::kBFloat16 ? ufb::WeightType::kBFloat16
            : w_in.scalar_type() == at::kHalf   ? ufb::WeightType::kFloat16
                                                : ufb::WeightType::kFloat32;
  p.y = y.data_ptr<float>();
  p.leaves = return_leaves ? leaves.data_ptr<int64_t>() : nullptr;

  const int64_t split = ufb::cmm_split_level(p);
  if (split > 0) {
    // Large batch: descend the top `split` levels, sort tokens by the subtree they entered, finish in that order.
    at::Tensor pre = at::empty({n * trees * split}, x.options());
    at::Tensor node = at::empty({n * trees}, x.options().dtype(at::kInt));
    at::Tensor order = at::empty({n}, x.options().dtype(at::kLong));
    const ufb::CmmSplit s{split, pre.data_ptr<float>(), node.data_ptr<int32_t>(), order.data_ptr<int64_t>()};
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { ufb::cmm_prefix(p, s, begin, end); });
    ufb::cmm_sort_tokens(p, s);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { ufb::cmm_suffix(p, s, begin, end); });
  } else if (n < 2 * kGrain) {
    ufb::cmm_range(p, 0, n);
  } else {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { ufb::cmm_range(p, begin, end); });
  }
  return {y, leaves};
}

}  // namespace

TORCH_LIBRARY(ufb, m) {
  m.def("cmm(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int depth, bool return_leaves) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ufb, CPU, m) { m.impl("cmm", &cmm_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "UltraFastBERT conditional matrix multiplication kernels (registers torch.ops.ufb.*)";
  m.def("cpu_path", &ufb::cmm_cpu_path, "instruction-set path the CPU kernel uses");
  // The same function as torch.ops.ufb.cmm, bound without the dispatcher: calling a custom op from Python
  // costs about 6 µs of schema matching and boxing, more than the kernel itself on one token (README
  // "Kernel design"). engine.cmm uses this binding in eager mode and the op under torch.compile.
  m.def("cmm_eager", &cmm_cpu, "ufb::cmm without the dispatcher (eager calls)");
  m.def(
      "force_path",
      [](const std::string& name) {
        TORCH_CHECK(ufb::cmm_force_path(name), "force_path: expected 'auto', 'avx2' or 'portable', got '", name, "'");
      },
      "cap the instruction-set path at 'avx2' or 'portable', or restore 'auto' (tests, benchmark)");
  m.def("force_split", &ufb::cmm_force_split,
        "pin the two-pass split level: -1 automatic (default), 0 one pass, s > 0 split at s (tests, benchmark)");
}
