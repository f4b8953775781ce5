// torch.ops.ufb.linear's CPU implementation: checks the tensors, splits the output columns over torch's thread pool
// and runs the raw kernel (linear_cpu.cpp). The op's schema is declared in csrc/ops.cpp.
#include "cpu/linear_op.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu/linear_cpu.h"

namespace ufb {
namespace {

// Multiply-adds one thread's share must hold: below two shares the call stays on the calling thread, where waking
// the pool would cost more than it saves.
constexpr int64_t kMinThreadWork = int64_t(1) << 17;

void run(const LinearProblem& p) {
  const int64_t tiles = (p.n + kLinearColumnTile - 1) / kLinearColumnTile;
  const int64_t per_tile = std::max<int64_t>(1, p.m * std::max<int64_t>(p.k, 1) * kLinearColumnTile);
  const int64_t grain = std::max<int64_t>(1, kMinThreadWork / per_tile);
  if (tiles < 2 * grain || at::get_num_threads() == 1) {
    linear_columns(p, 0, p.n);
    return;
  }
  // Threads split the columns, never one output's sum, so the result does not depend on the thread count.
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    linear_columns(p, begin * kLinearColumnTile, std::min(p.n, end * kLinearColumnTile));
  });
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear_2d(x, weight, bias.has_value() ? &*bias : nullptr, false);
}

bool is_float_cpu(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && t.scalar_type() == at::kFloat;
}

}  // namespace

at::Tensor linear_2d(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor* bias, bool release_gil) {
  TORCH_CHECK(x_in.dim() == 2, "linear: x must be [M, K], got ", x_in.sizes());
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK(x_in.size(1) == weight.size(1), "linear: x has width ", x_in.size(1), ", weight expects ",
              weight.size(1));
  TORCH_CHECK(is_float_cpu(x_in) && is_float_cpu(weight), "linear: x and weight must be float32 CPU tensors, got ",
              x_in.scalar_type(), " on ", x_in.device(), " and ", weight.scalar_type(), " on ", weight.device());
  TORCH_CHECK(weight.is_contiguous(), "linear: weight must be contiguous (nn.Linear's [N, K] layout)");
  if (bias != nullptr) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear: bias must be [N] = [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(is_float_cpu(*bias) && bias->is_contiguous(), "linear: bias must be a contiguous float32 CPU tensor");
  }
  // Rows may be strided (a slice of a wider tensor); elements within a row must be adjacent.
  const at::Tensor x = x_in.size(0) > 0 && x_in.size(1) > 1 && x_in.stride(1) != 1 ? x_in.contiguous() : x_in;
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  LinearProblem p{};
  p.x = x.data_ptr<float>();
  p.x_stride = x.stride(0);
  p.m = x.size(0);
  p.k = x.size(1);
  p.n = weight.size(0);
  p.w = weight.data_ptr<float>();
  p.b = bias != nullptr ? bias->data_ptr<float>() : nullptr;
  p.y = y.data_ptr<float>();
  if (release_gil && p.m * p.n * p.k >= 2 * kMinThreadWork) {
    pybind11::gil_scoped_release no_gil;
    run(p);
  } else {
    run(p);
  }
  return y;
}

bool linear_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias) {
  if (!is_float_cpu(x) || !is_float_cpu(weight) || (bias != nullptr && !is_float_cpu(*bias))) return false;
  if (weight.dim() != 2 || !weight.is_contiguous() || x.dim() < 1 || x.size(-1) != weight.size(1)) return false;
  if (bias != nullptr && (bias->dim() != 1 || bias->size(0) != weight.size(0) || !bias->is_contiguous()))
    return false;
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias != nullptr && bias->requires_grad())))
    return false;
  return !at::autocast::is_autocast_enabled(at::kCPU);
}

at::Tensor linear_eager(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias) {
  if (x.dim() == 2) return linear_2d(x, weight, bias, true);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  const int64_t k = sizes.back();
  int64_t m = 1;
  for (size_t i = 0; i + 1 < sizes.size(); ++i) m *= sizes[i];
  const at::Tensor y = linear_2d(x.reshape({m, k}), weight, bias, true);
  sizes.back() = weight.size(0);
  return y.view(sizes);
}

}  // namespace ufb

TORCH_LIBRARY_IMPL(ufb, CPU, m) { m.impl("linear", &ufb::linear_cpu); }
