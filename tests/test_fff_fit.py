"""engine.training.fff_fit: the closed-form output rows are the least-squares optimum for the routing they are
given, and the fitted splits are balanced, scaled, and route better than random ones on a target with a real split."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from engine.fff import FFF
from engine.training.fff_fit import fit_output_rows, split_routing


def _err(fff: FFF, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((fff._forward_masked(x)[0] - y).norm() / (y - y.mean(0)).norm())


def test_output_rows_recover_a_layer_with_the_same_routing() -> None:
    torch.manual_seed(0)
    target = FFF(12, 7, depth=3, trees=2, bias_out=True)
    with torch.no_grad():
        target.linear_out.bias.normal_()
    x = torch.randn(3000, 12)
    with torch.no_grad():
        y = target._forward_masked(x)[0]
    student = copy.deepcopy(target)  # same routing, wrong output rows and bias
    with torch.no_grad():
        student.linear_out.weight.normal_()
        student.linear_out.bias.zero_()
    assert _err(student, x, y) > 0.5
    fit_output_rows(student, x, y, ridge=1e-10, chunk=700)  # chunks that do not divide the tokens
    with torch.no_grad():
        assert torch.allclose(student._forward_masked(x)[0], y, atol=1e-4)
    assert student.packed_weights()[2].shape == (2, 15, 7)  # packed weights were invalidated and rebuilt


def test_output_rows_of_unreached_nodes_are_kept() -> None:
    torch.manual_seed(1)
    fff = FFF(8, 5, depth=2, trees=1)
    x = torch.randn(500, 8)
    with torch.no_grad():
        fff.linear_in.weight[0] = x.mean(0) * 0 + 1.0  # route on the sum of the inputs ...
        fff.linear_in.bias[0] = 100.0  # ... which this bias makes positive for every token: the left subtree is idle
        hidden = fff.path_activations(x)[0]
    idle = (hidden == 0).all(0)
    assert idle[[1, 3, 4]].all() and not idle[[0, 2]].any()
    before = fff.linear_out.weight.clone()
    fit_output_rows(fff, x, torch.randn(500, 5))
    assert torch.equal(fff.linear_out.weight[:, idle], before[:, idle])
    assert not torch.equal(fff.linear_out.weight[:, ~idle], before[:, ~idle])


def test_split_routing_is_balanced_scaled_and_beats_random_splits() -> None:
    torch.manual_seed(2)
    d = 16
    x = torch.randn(6000, d)
    # a target with real structure: outputs switch on the sign of one input direction and then another
    u, v = F.normalize(torch.randn(d), dim=0), F.normalize(torch.randn(d), dim=0)
    out_a, out_b = torch.randn(6), torch.randn(6)
    y = torch.where((x @ u > 0.3)[:, None], (x @ v)[:, None] * out_a, torch.relu(x @ v)[:, None] * out_b)
    fitted = FFF(d, 6, depth=3, trees=1)
    random_routes = copy.deepcopy(fitted)
    split_routing(fitted, x, y, scale=1.5)
    with torch.no_grad():
        root = x @ fitted.linear_in.weight[0] + fitted.linear_in.bias[0]
    assert abs(float((root > 0).float().mean()) - 0.5) < 0.01  # median split
    assert abs(float(root.std()) - 1.5) < 0.01  # unit spread times the scale
    leaves = fitted.path_activations(x)[1][:, 0]
    assert leaves.unique().numel() == 8 and leaves.bincount().min() > 6000 / 8 * 0.5  # every leaf used, roughly evenly
    fit_output_rows(fitted, x, y)
    fit_output_rows(random_routes, x, y)
    assert _err(fitted, x, y) < 0.8 * _err(random_routes, x, y)
