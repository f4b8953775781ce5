// torch.ops.ufb.varlen_attention's CPU implementation: checks the tensors, splits the (sequence, head) items over
// torch's thread pool by their cost, and runs the raw kernel (attention_cpu.cpp). The schema is in csrc/ops.cpp.
#include "cpu/attention_op.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention_cpu.h"

namespace ufb {
namespace {

// Multiply-adds one thread's share must hold before a call wakes the pool (as the linear's).
constexpr int64_t kMinThreadWork = int64_t(1) << 17;

void run(const AttentionProblem& p, int64_t seqs) {
  const int64_t items = seqs * p.heads;
  // An item costs about t^2 * head_dim twice (scores, weighted sum) plus its key transpose.
  std::vector<int64_t> cost_end(size_t(items) + 1, 0);
  for (int64_t i = 0; i < items; ++i) {
    const int64_t t = p.lengths[i / p.heads];
    cost_end[i + 1] = cost_end[i] + (2 * t * t + t) * p.head_dim;
  }
  const int64_t total = cost_end[items];
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || items < 2 || total < 2 * kMinThreadWork) {
    attention_items(p, 0, items);
    return;
  }
  // Contiguous runs of items of about equal cost, a few per thread: the packed order ascends in length, so equal
  // counts of items would leave the last thread the longest sequences.
  const int64_t chunks = std::min(items, std::min(threads * 4, total / kMinThreadWork));
  std::vector<int64_t> bound(size_t(chunks) + 1, items);
  bound[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = total * c / chunks;
    bound[c] = std::lower_bound(cost_end.begin(), cost_end.end(), target) - cost_end.begin();
  }
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) attention_items(p, std::min(bound[c], items), std::min(bound[c + 1], items));
  });
}

at::Tensor varlen_attention_cpu(const at::Tensor& qkv, const at::Tensor& starts, const at::Tensor& lengths,
                                int64_t num_heads) {
  return varlen_attention(qkv, starts, lengths, num_heads, false);
}

bool is_float_cpu(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && t.scalar_type() == at::kFloat;
}

}  // namespace

at::Tensor varlen_attention(const at::Tensor& qkv_in, const at::Tensor& starts_in, const at::Tensor& lengths_in,
                            int64_t num_heads, bool release_gil) {
  TORCH_CHECK(qkv_in.dim() == 2, "varlen_attention: qkv must be [N, 3 * hidden], got ", qkv_in.sizes());
  TORCH_CHECK(is_float_cpu(qkv_in), "varlen_attention: qkv must be a float32 CPU tensor, got ", qkv_in.scalar_type(),
              " on ", qkv_in.device());
  TORCH_CHECK(num_heads >= 1, "varlen_attention: num_heads must be at least 1, got ", num_heads);
  TORCH_CHECK(qkv_in.size(1) % (3 * num_heads) == 0, "varlen_attention: qkv's width ", qkv_in.size(1),
              " is not 3 * num_heads * head_dim for num_heads = ", num_heads);
  TORCH_CHECK(starts_in.dim() == 1 && lengths_in.dim() == 1 && starts_in.size(0) == lengths_in.size(0),
              "varlen_attention: starts and lengths must be 1-D of one size, got ", starts_in.sizes(), " and ",
              lengths_in.sizes());
  for (const at::Tensor* t : {&starts_in, &lengths_in})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong,
                "varlen_attention: starts and lengths must be int64 CPU tensors, got ", t->scalar_type(), " on ",
                t->device());
  const at::Tensor starts = starts_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t n = qkv_in.size(0), seqs = starts.size(0);
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t i = 0; i < seqs; ++i) {
    TORCH_CHECK(st[i] == next && len[i] >= 0, "varlen_attention: sequence ", i, " starts at ", st[i], " with length ",
                len[i], "; sequences must lie one after another from row 0 (expected a start of ", next, ")");
    next += len[i];
  }
  TORCH_CHECK(next == n, "varlen_attention: the sequences cover ", next, " rows of qkv's ", n);
  const int64_t hidden = qkv_in.size(1) / 3;
  const at::Tensor qkv = n > 0 && qkv_in.stride(1) != 1 ? qkv_in.contiguous() : qkv_in;
  at::Tensor out = at::empty({n, hidden}, qkv.options());
  if (n == 0) return out;
  AttentionProblem p{};
  p.qkv = qkv.data_ptr<float>();
  p.qkv_stride = qkv.stride(0);
  p.heads = num_heads;
  p.head_dim = hidden / num_heads;
  p.starts = st;
  p.lengths = len;
  p.out = out.data_ptr<float>();
  p.scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  int64_t work = 0;
  for (int64_t i = 0; i < seqs; ++i) work += 2 * len[i] * len[i] * hidden;
  if (release_gil && work >= 2 * kMinThreadWork) {
    pybind11::gil_scoped_release no_gil;
    run(p, seqs);
  } else {
    run(p, seqs);
  }
  return out;
}

bool varlen_attention_applies(const at::Tensor& qkv) {
  if (!is_float_cpu(qkv)) return false;
  if (at::GradMode::is_enabled() && qkv.requires_grad()) return false;
  return !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace ufb

TORCH_LIBRARY_IMPL(ufb, CPU, m) { m.impl("varlen_attention", &ufb::varlen_attention_cpu); }
