"""Starting a student from an earlier one: the same shape (more end-to-end training, ``--init-student``) or fewer
trees of the same depth (``--grow-from``, the added trees fitted to what the earlier ones miss)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import LoadedModel, load_model
from engine.config import ModelConfig
from engine.fff import FFF
from engine.training.fff_fit import fit_output_rows

log = logging.getLogger("engine.training.distill")


def fff_trees(config: ModelConfig) -> dict[int, int]:
    """K of every FFF layer: ``{layer: trees}`` (dense and removed layers absent)."""
    return {i: config.trees_in(i) for i in range(config.num_layers) if config.ffn_kind(i) == "fff"}


def init_from_student(student: LoadedModel, folder: Path, state: dict[str, Any]) -> None:
    """Copy an earlier student's weights into ``student`` and jump to the end-to-end phase.

    The earlier student must have the same shapes (teacher, K per layer, D); its classifier head is dropped, as the head
    is refitted on the new encoder at the end. It may have fewer dense layers than ``student`` (a hybrid): those
    layers then start from the teacher's FFN, every other weight from the earlier student."""
    earlier = load_model(folder)
    want, found = student.config, earlier.config
    want_trees, found_trees = fff_trees(want), fff_trees(found)
    if (
        found.ffn != want.ffn
        or (want.ffn == "fff" and found.fff_depth != want.fff_depth)
        or not set(found.dense_ffn_layers) <= set(want.dense_ffn_layers)
        or any(found_trees.get(i) != k for i, k in want_trees.items())
    ):
        expected = (
            f"an FFF student with K={_ks(want_trees)}, D={want.fff_depth}"
            if want.ffn == "fff"
            else f"a student with ffn={want.ffn}"
        )
        raise ValueError(
            f"--init-student {folder}: expected {expected}"
            + (f" with dense layers among {want.dense_ffn_layers}" if want.dense_ffn_layers else "")
            + f"; found ffn={found.ffn}, K={_ks(found_trees)}, D={found.fff_depth}"
            + (f", dense layers {found.dense_ffn_layers}" if found.dense_ffn_layers else "")
        )
    # the head is refitted; layers dense here but FFF there keep the teacher's FFN from the conversion
    skip = ("head.", *(f"layers.{i}.ffn." for i in set(want.dense_ffn_layers) - set(found.dense_ffn_layers)))
    weights = {k: v for k, v in earlier.model.state_dict().items() if not k.startswith(skip)}
    missing, unexpected = student.model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ValueError(
            f"--init-student {folder}: weights do not match the student "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for f in student.model.fffs():
        f.invalidate()
    state["phase"], state["layer"], state["step"] = "e2e", 0, 0
    for key in ("layer_errors_init", "layer_errors_final"):
        state[key] = earlier.config.extra.get(key, state[key])
    state["init_student"] = str(folder)
    log.info("continuing from the student in %s: end-to-end phase only", folder)


def grow_from_student(student: LoadedModel, folder: Path, state: dict[str, Any]) -> dict[int, int]:
    """Copy an earlier student with fewer trees of the same depth into ``student``; returns its tree count per FFF
    layer (no more than ``student``'s in any layer, fewer in at least one).

    Its trees become the first trees of each layer and every other weight is copied, so with the added trees'
    output rows at zero the grown student computes exactly what the earlier one did; the ``grow`` phase then fits
    the added trees' output rows to what the earlier ones miss (:func:`fit_added_trees`)."""
    earlier = load_model(folder)
    want, found = student.config, earlier.config
    want_trees, old = fff_trees(want), fff_trees(found)
    if (
        found.ffn != "fff"
        or want.ffn != "fff"
        or found.fff_depth != want.fff_depth
        or old.keys() != want_trees.keys()
        or any(old[i] > k for i, k in want_trees.items())
        or old == want_trees
    ):
        raise ValueError(
            f"--grow-from {folder}: expected an FFF student of depth {want.fff_depth} in the same layers with fewer "
            f"trees than K={_ks(want_trees)}; found ffn={found.ffn}, K={_ks(old)}, D={found.fff_depth}"
        )
    own = student.model.state_dict()
    with torch.no_grad():
        for key, value in earlier.model.state_dict().items():
            if key.startswith("head."):
                continue
            if key not in own:
                raise ValueError(f"--grow-from {folder}: unexpected weight {key}")
            target = own[key]
            if key.endswith(("ffn.linear_in.weight", "ffn.linear_in.bias")):
                target[: value.shape[0]].copy_(value)
            elif key.endswith("ffn.linear_out.weight"):
                target[:, : value.shape[1]].copy_(value)
                target[:, value.shape[1] :].zero_()
            else:
                target.copy_(value)
    for f in student.model.fffs():
        f.invalidate()
    state["phase"], state["layer"], state["step"] = "grow", 0, 0
    state["grown_from"] = {"folder": str(folder), "trees": old}
    log.info("growing the student in %s from K=%s to K=%s", folder, _ks(old), _ks(want_trees))
    return old


def _ks(trees: dict[int, int]) -> str:
    """``6`` when every FFF layer has 6 trees, else ``{0: 6, 3: 12, ...}``."""
    return str(next(iter(trees.values()))) if len(set(trees.values())) == 1 else str(trees)


@torch.no_grad()
def fit_added_trees(fff: FFF, old_trees: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """Fit the output rows of the trees after the first ``old_trees`` to the residual ``y - fff(x)`` by least
    squares (:func:`engine.training.fff_fit.fit_output_rows`); their splits stay as initialised (the teacher's
    neurons). Splits fitted node by node (``split_routing``) cost a cross-covariance over the tokens at every node:
    hours for several trees of depth 7 on 2 cores, so they are left to end-to-end training."""
    rows = old_trees * fff.n_nodes
    added = FFF(fff.d_in, fff.d_out, fff.depth, fff.trees - old_trees, bias_out=False)
    added.linear_in.weight.copy_(fff.linear_in.weight[rows:])
    added.linear_in.bias.copy_(fff.linear_in.bias[rows:])
    added.linear_out.weight.zero_()
    fit_output_rows(added, x, y - fff._forward_masked(x)[0])
    fff.linear_out.weight[:, rows:] = added.linear_out.weight
    fff.invalidate()
