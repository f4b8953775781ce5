"""Inference-time copies derived from parameters: the FFF's packed kernel weights, BERT's fused Q/K/V projection.

Each is rebuilt only when a source parameter changed, in place (its version counter moved: ``copy_``,
``load_state_dict``, an optimizer step) or replaced (its storage moved: ``param.data = ...``). The check runs on
every inference call, where a one-token FFF call takes a few microseconds, so it is one compiled call. Code traced
by ``torch.compile`` cannot read version counters: it takes the copy as last built (``UltraFastBert.
pack_inference_weights`` builds them all at load time; any eager call rebuilds a stale one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from engine import cmm as cmm_ops

T = TypeVar("T")


def python_stamp(*sources: torch.Tensor) -> tuple:
    """What :data:`stamp` computes, in Python: the fallback where the extension is not built (and the tests'
    reference for it)."""
    parts = []
    for p in sources:
        try:
            version = p._version
        except RuntimeError:  # an inference tensor (made under inference_mode) carries no version counter
            version = -1
        parts.append((id(p), p.data_ptr(), version, p.numel()))
    return tuple(parts)


# The compiled stamp (csrc/python/fast_path.cpp ``tensor_stamp``: the same four facts per tensor, its TensorImpl's
# address standing for the Python object's id, as one bytes object) is one call instead of several reads per tensor,
# which matters on one-token calls; python_stamp is the fallback where the extension is not built.
stamp: Callable[..., object] = getattr(cmm_ops.extension(), "tensor_stamp", None) or python_stamp


class Derived(Generic[T]):
    """One cached value built from some tensors; ``extra`` is anything else it depends on (e.g. a dtype).

    The cache is one tuple, ``_entry = (stamp, extra, value)``, replaced whole, so that a reader on another
    thread sees an old or a new entry, never half of each; the extension's ``fff_forward`` reads it too.
    Not locked: two threads may both rebuild after a change, which wastes work but is harmless (same result).
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry: tuple[object, object, T] | None = None

    def get(self, sources: Sequence[torch.Tensor], build: Callable[[], T], extra: object = None) -> T:
        entry = self._entry
        if cmm_ops.is_compiling():
            # Traced code cannot read version counters; it takes the copy as last built (dynamo reads it afresh on
            # every call, so an eager call that rebuilds it is seen) or, with none yet, builds it inside the graph.
            return entry[2] if entry is not None and entry[1] == extra else build()
        now = stamp(*sources)
        if entry is None or entry[0] != now or entry[1] != extra:
            entry = self._entry = (now, extra, build())
        return entry[2]

    def clear(self) -> None:
        self._entry = None
