"""Fitting an FFF to a dense feedforward's inputs and outputs in closed form, around the gradient steps of
distillation's layer-wise phase.

Why: the layer-wise phase trains each FFF by its masked implementation, whose hard routing has no gradient, so
the splits stay roughly where initialisation put them; the teacher-neuron initialisation puts them on the
teacher's strongest neurons, chosen for their output, not for how they divide the tokens. Two closed-form steps
address each half (measured in MODEL_CARD.md, "Layer-wise fitting"):

* :func:`split_routing` sets every node, top down, from the cached tokens that reach it: its input row is the
  direction along which the FFN's output varies most with the input (the top left singular vector of the
  inputs' and outputs' cross-covariance), its bias puts the split at the median, and its scale gives the
  pre-activations a unit spread, so the node is both a balanced split and a useful neuron;
* :func:`fit_output_rows` solves for the output rows: with the routing fixed, the layer's output is linear in
  them (``path_activations(x) @ W.T + b``), so the best rows are a ridge least-squares solution over all cached
  tokens, pulled towards the current rows (nodes no cached token reaches keep theirs).
"""

from __future__ import annotations

import torch

from engine.fff import FFF


@torch.no_grad()
def fit_output_rows(fff: FFF, x: torch.Tensor, y: torch.Tensor, *, ridge: float = 1e-3, chunk: int = 16384) -> None:
    """``linear_out`` (weight, and bias if it has one) := argmin ||fff(x) - y||^2 + ridge' ||W - W_now||^2.

    ``ridge`` is relative to the mean diagonal of the Gram matrix; accumulation is in float64 over token chunks, so
    memory stays at one chunk of activations whatever the number of tokens."""
    out = fff.linear_out
    has_bias = out.bias is not None
    cols = fff.trees * fff.n_nodes + int(has_bias)
    gram = torch.zeros(cols, cols, dtype=torch.float64)
    rhs = torch.zeros(cols, fff.d_out, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        h, _ = fff.path_activations(x[start : start + chunk].float())
        if has_bias:
            h = torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)
        h = h.double()
        gram += h.T @ h
        rhs += h.T @ y[start : start + chunk].double()
    current = out.weight.T.double()
    if has_bias:
        current = torch.cat([current, out.bias.double()[None, :]])
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    solution = torch.linalg.solve(gram + lam * torch.eye(cols, dtype=torch.float64), rhs + lam * current)
    out.weight.copy_(solution[: fff.trees * fff.n_nodes].T.float())
    if has_bias:
        out.bias.copy_(solution[-1].float())
    fff.invalidate()


@torch.no_grad()
def split_routing(fff: FFF, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0, min_tokens: int = 8) -> None:
    """Every node's ``linear_in`` row and bias from the tokens that reach it (see the module docstring).

    Tree ``k``'s root takes the ``k``-th singular direction, so the trees split differently; nodes reached by fewer
    than ``min_tokens`` cached tokens keep their rows. The output rows are left alone: call
    :func:`fit_output_rows` next."""
    x, y = x.float(), y.float()
    weight, bias = fff.linear_in.weight, fff.linear_in.bias
    for k in range(fff.trees):
        node = torch.zeros(x.shape[0], dtype=torch.long)
        for level in range(fff.depth + 1):
            first = 2**level - 1
            nxt = node.clone()
            for v in range(first, 2 * first + 1):
                sel = (node == v).nonzero().squeeze(1)
                row = k * fff.n_nodes + v
                xs = x[sel]
                if sel.numel() >= min_tokens:
                    cross = (xs - xs.mean(0)).T @ (y[sel] - y[sel].mean(0))
                    directions = torch.linalg.svd(cross, full_matrices=False)[0]
                    u = directions[:, k % directions.shape[1] if level == 0 else 0]
                    proj = xs @ u
                    s = scale / float(proj.std().clamp_min(1e-6))
                    weight[row] = u * s
                    bias[row] = -float(proj.median()) * s
                if sel.numel():
                    pre = xs @ weight[row] + bias[row]
                    nxt[sel] = 2 * v + 1 + (pre > 0).long()  # ties go left, as in every implementation
            node = nxt
    fff.invalidate()
