"""Model configuration: one dataclass describes every encoder this engine can run.

``layout`` names one of engine/layouts/ (``"bert"``: Hugging Face BERT, post-LN; ``"crammed"``: the published
crammedBERT-FFF, pre-LN); each layout module says what it is and checks the fields only it needs.

Our own checkpoint folder stores this config as ``ufb_config.json`` beside ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.layouts import LAYOUTS

CONFIG_FILE = "ufb_config.json"

FFN_KINDS = ("fff", "dense", "none")
POOLINGS = ("mean", "cls")
ACTIVATIONS = ("gelu",)
CLASSIFIER_ACTIVATIONS = ("tanh",)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class ModelConfig:
    """Architecture and serving defaults of one model.

    ``intermediate_size`` is the dense FFN width. For FFF models it is kept as the *dense equivalent* (the
    teacher's width, or 4 * hidden for crammedBERT) so neuron-usage metrics can say "12 of 3072".

    The classification head exists iff ``labels`` is set. It reads the mean-pooled (un-normalised) final hidden
    states, then applies ``dense`` (hidden -> ``classifier_dim``) + ``classifier_activation`` when
    ``classifier_dim`` is set, then ``classifier`` (-> len(labels)). That is the crammedBERT pooler + head when
    ``classifier_dim`` is 1024 and a plain linear probe when it is None.

    ``dense_ffn_layers`` makes an FFF model a hybrid: those layers keep a dense FFN of ``intermediate_size``
    (spending compute where a tree fits its FFN worst); every other layer is an FFF. ``fff_layer_trees`` gives
    some FFF layers another tree count than ``fff_trees`` (``{layer: K}``; JSON keys are strings): a per-layer
    neuron budget. Every FFF layer has the same depth.
    """

    layout: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    ffn: str = "fff"
    fff_trees: int = 1
    fff_depth: int = 7
    dense_ffn_layers: list[int] = field(default_factory=list)  # FFF models only: layers with a dense FFN
    fff_layer_trees: dict[int, int] = field(default_factory=dict)  # FFF layers with K other than fff_trees
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    pooling: str = "mean"
    normalize: bool = True
    labels: list[str] | None = None
    classifier_dim: int | None = None
    classifier_activation: str = "tanh"
    name: str = "ultrafastbert"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (teacher, conversion options)

    def __post_init__(self) -> None:
        if self.labels is not None:
            self.labels = list(self.labels)
        if isinstance(self.dense_ffn_layers, (list, tuple)):
            self.dense_ffn_layers = list(self.dense_ffn_layers)
        if isinstance(self.fff_layer_trees, dict):  # JSON object keys are strings
            self.fff_layer_trees = {
                int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in self.fff_layer_trees.items()
            }
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Fail early with a message that names the field, rather than with a shape error deep in a forward."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        need(self.layout in LAYOUTS, f"layout must be one of {tuple(LAYOUTS)}, got {self.layout!r}")
        need(self.ffn in FFN_KINDS, f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        need(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name} must be a positive integer, got {value!r}",
            )
        need(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}",
        )
        if self.ffn == "fff":
            need(
                isinstance(self.fff_trees, int) and self.fff_trees >= 1,
                f"fff_trees must be >= 1, got {self.fff_trees!r}",
            )
            need(
                isinstance(self.fff_depth, int) and 0 <= self.fff_depth <= 20,
                f"fff_depth must be in 0..20, got {self.fff_depth!r}",
            )
        layers = self.dense_ffn_layers
        need(
            isinstance(layers, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in layers)
            and len(set(layers)) == len(layers),
            f"dense_ffn_layers must be distinct layer indices in 0..{self.num_layers - 1}, got {layers!r}",
        )
        need(
            not layers or self.ffn == "fff",
            f"dense_ffn_layers is for FFF models (a hybrid); ffn={self.ffn!r} has no FFF layers to replace",
        )
        need(
            len(layers) < self.num_layers,
            "dense_ffn_layers names every layer: that is ffn='dense', not a hybrid",
        )
        per_layer = self.fff_layer_trees
        need(
            isinstance(per_layer, dict)
            and all(
                isinstance(i, int) and 0 <= i < self.num_layers and i not in layers and _positive_int(k)
                for i, k in per_layer.items()
            ),
            f"fff_layer_trees maps FFF layers (0..{self.num_layers - 1}, not dense_ffn_layers) to tree counts >= 1,"
            f" got {per_layer!r}",
        )
        need(not per_layer or self.ffn == "fff", f"fff_layer_trees is for FFF models; ffn={self.ffn!r}")
        for problem in LAYOUTS[self.layout].problems(self):
            need(False, problem)
        need(self.layer_norm_eps > 0, f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        need(
            0 <= self.pad_token_id < self.vocab_size,
            f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})",
        )
        if self.labels is not None:
            need(
                len(self.labels) >= 1 and all(isinstance(x, str) and x for x in self.labels),
                "labels must be a non-empty list of non-empty strings",
            )
            need(len(set(self.labels)) == len(self.labels), f"labels must be unique, got {self.labels}")
        need(
            self.classifier_dim is None or (isinstance(self.classifier_dim, int) and self.classifier_dim > 0),
            f"classifier_dim must be None or a positive integer, got {self.classifier_dim!r}",
        )
        need(
            self.classifier_activation in CLASSIFIER_ACTIVATIONS,
            f"classifier_activation must be one of {CLASSIFIER_ACTIVATIONS}, got {self.classifier_activation!r}",
        )

    # ------------------------------------------------------------------ derived values

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def ffn_kind(self, layer: int) -> str:
        """What layer ``layer``'s feedforward is: ``config.ffn``, or ``"dense"`` in a hybrid's dense layers."""
        return "dense" if layer in self.dense_ffn_layers else self.ffn

    def trees_in(self, layer: int) -> int:
        """K of layer ``layer``'s FFF (meaningful where :meth:`ffn_kind` is ``"fff"``)."""
        return self.fff_layer_trees.get(layer, self.fff_trees)

    @property
    def num_labels(self) -> int:
        return 0 if self.labels is None else len(self.labels)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Strict: an unknown key is more likely a typo or a newer format than something safe to drop."""
        if not isinstance(data, dict):
            raise ValueError(f"invalid model config: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"invalid model config: unknown field(s) {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid model config: {path} is not valid JSON ({exc})") from None
        return cls.from_dict(data)
