// torch.ops.ufb.cmm's CPU implementation: checks the tensors, splits tokens over torch's thread pool and runs the
// raw kernel (cmm_cpu.cpp). The op's schema is declared in csrc/ops.cpp; this file registers its CPU kernel.
#include "cpu/cmm_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <string>

namespace ufb {
namespace {

// Tokens per parallel chunk. Below two chunks' worth the call stays on the calling thread, where waking the
// pool would cost more than it saves.
constexpr int64_t kGrain = 4;

// Rows may be strided (a slice of a wider tensor); elements within a row must be adjacent.
at::Tensor rows_contiguous(const at::Tensor& x) {
  return (x.dim() == 2 && x.size(0) > 0 && x.stride(1) != 1) ? x.contiguous() : x;
}

// Runs a checked problem whose y (and leaves, if wanted) are set. Touches no Python object, so the eager binding
// calls it with the GIL released.
void run_problem(const CmmProblem& p) {
  const int64_t n = p.n;
  if (n == 0) return;
  const int64_t split = cmm_split_level(p);
  if (split > 0) {
    // Large batch: descend the top `split` levels, sort tokens by the subtree they entered, finish in that order.
    // Scratch left uninitialised (every element is written before it is read).
    const std::unique_ptr<float[]> pre(new float[size_t(n * p.trees * split)]);
    const std::unique_ptr<int32_t[]> node(new int32_t[size_t(n * p.trees)]);
    const std::unique_ptr<int64_t[]> order(new int64_t[size_t(n)]);
    const CmmSplit s{split, pre.get(), node.get(), order.get()};
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { cmm_prefix(p, s, begin, end); });
    cmm_sort_tokens(p, s);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { cmm_suffix(p, s, begin, end); });
  } else if (n < 2 * kGrain) {
    cmm_range(p, 0, n);
  } else {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) { cmm_range(p, begin, end); });
  }
}

// The custom op's CPU kernel (torch.ops.ufb.cmm): leaves is [N, K] when asked for, [0, K] otherwise.
std::tuple<at::Tensor, at::Tensor> cmm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in,
                                           const at::Tensor& w_out, int64_t depth, bool return_leaves,
                                           const std::optional<at::Tensor>& b_out) {
  const at::Tensor x = rows_contiguous(x_in);
  CmmProblem p = check_problem(x, w_in, b_in, w_out, depth, b_out.has_value() ? &*b_out : nullptr);
  at::Tensor y = at::empty({p.n, p.d_out}, x.options());
  at::Tensor leaves = at::empty({return_leaves ? p.n : 0, p.trees}, x.options().dtype(at::kLong));
  p.y = y.data_ptr<float>();
  p.leaves = return_leaves ? leaves.data_ptr<int64_t>() : nullptr;
  run_problem(p);
  return {y, leaves};
}

}  // namespace

CmmProblem check_problem(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                         const at::Tensor& w_out, int64_t depth, const at::Tensor* b_out) {
  TORCH_CHECK(x.dim() == 2, "cmm: x must be [N, d_in], got ", x.sizes());
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3 && b_in.dim() == 2,
              "cmm: expected w_in [K, nodes, d_in], b_in [K, nodes], w_out [K, nodes, d_out]");
  TORCH_CHECK(depth >= 0 && depth < 31, "cmm: depth must be in [0, 30], got ", depth);
  const int64_t trees = w_in.size(0), nodes = w_in.size(1), d_in = w_in.size(2), d_out = w_out.size(2);
  TORCH_CHECK(nodes == (int64_t(2) << depth) - 1, "cmm: depth ", depth, " needs ", (int64_t(2) << depth) - 1,
              " nodes per tree, weights have ", nodes);
  TORCH_CHECK(x.size(1) == d_in, "cmm: x has width ", x.size(1), ", w_in expects ", d_in);
  TORCH_CHECK(b_in.size(0) == trees && b_in.size(1) == nodes && w_out.size(0) == trees && w_out.size(1) == nodes,
              "cmm: b_in / w_out do not match w_in's trees and nodes");
  TORCH_CHECK(x.scalar_type() == at::kFloat && b_in.scalar_type() == at::kFloat,
              "cmm: x and b_in must be float32");
  TORCH_CHECK(w_in.scalar_type() == w_out.scalar_type() &&
                  (w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16 ||
                   w_in.scalar_type() == at::kHalf),
              "cmm: w_in and w_out must both be float32, both bfloat16 or both float16, got ",
              w_in.scalar_type(), " and ", w_out.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w_in.device().is_cpu() && w_out.device().is_cpu() && b_in.device().is_cpu(),
              "cmm: CPU tensors expected");
  TORCH_CHECK(w_in.is_contiguous() && w_out.is_contiguous() && b_in.is_contiguous(),
              "cmm: weights must be contiguous (pack them once with engine.cmm.pack_fff_weights)");
  TORCH_CHECK(x.size(0) == 0 || x.stride(1) == 1, "cmm: x's rows must be contiguous");  // callers ensure it
  if (b_out != nullptr) {
    TORCH_CHECK(b_out->dim() == 1 && b_out->size(0) == d_out, "cmm: b_out must be [d_out] = [", d_out,
                "], got ", b_out->sizes());
    TORCH_CHECK(b_out->scalar_type() == at::kFloat && b_out->device().is_cpu() && b_out->is_contiguous(),
                "cmm: b_out must be a contiguous float32 CPU tensor");
  }

  CmmProblem p{};
  p.x = x.data_ptr<float>();
  p.x_stride = x.stride(0);
  p.n = x.size(0);
  p.d_in = d_in;
  p.d_out = d_out;
  p.trees = trees;
  p.depth = depth;
  p.w_in = w_in.data_ptr();
  p.b_in = b_in.data_ptr<float>();
  p.w_out = w_out.data_ptr();
  p.wtype = w_in.scalar_type() == at::kBFloat16 ? WeightType::kBFloat16
            : w_in.scalar_type() == at::kHalf   ? WeightType::kFloat16
                                                : WeightType::kFloat32;
  p.b_out = b_out != nullptr ? b_out->data_ptr<float>() : nullptr;
  return p;
}

void run_eager(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
               int64_t depth, bool return_leaves, const at::Tensor* b_out, at::Tensor& y, at::Tensor& leaves) {
  const at::Tensor x = rows_contiguous(x_in);
  CmmProblem p = check_problem(x, w_in, b_in, w_out, depth, b_out);
  y = at::empty({p.n, p.d_out}, x.options());
  p.y = y.data_ptr<float>();
  if (return_leaves) {
    leaves = at::empty({p.n, p.trees}, x.options().dtype(at::kLong));
    p.leaves = leaves.data_ptr<int64_t>();
  }
  if (p.n < 2 * kGrain) {
    run_problem(p);  // one thread's worth: releasing and retaking the GIL would cost more than it lets others run
  } else {
    pybind11::gil_scoped_release no_gil;
    run_problem(p);
  }
}

void add_cpu_controls(pybind11::module_& m) {
  m.def("cpu_path", &cmm_cpu_path, "instruction-set path the CPU kernel uses");
  m.def(
      "force_path",
      [](const std::string& name) {
        TORCH_CHECK(cmm_force_path(name), "force_path: expected 'auto', 'avx2' or 'portable', got '", name, "'");
      },
      "cap the instruction-set path at 'avx2' or 'portable', or restore 'auto' (tests, benchmark)");
  m.def(
      "split_level",
      [](const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
         int64_t depth) { return cmm_split_level(check_problem(x, w_in, b_in, w_out, depth, nullptr)); },
      "the two-pass split level a call with these arguments takes (0: one pass); honours force_split (tests)");
  m.def("force_split", &cmm_force_split,
        "pin the two-pass split level: -1 automatic (default), 0 one pass, s > 0 split at s (tests, benchmark)");
}

}  // namespace ufb

TORCH_LIBRARY_IMPL(ufb, CPU, m) { m.impl("cmm", &ufb::cmm_cpu); }
