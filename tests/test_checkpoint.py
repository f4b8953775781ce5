"""Checkpoints: the published crammedBERT format, our round trip, clear errors, and HF BERT conversion."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, LoadedModel, convert_hf_bert, load_model, save_model

torch.set_num_threads(2)

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Fast feedforward networks!", "a b"]


def encode(loaded: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return loaded.tokenizer.pad(loaded.tokenizer.encode(texts, max_length=64, truncate=True))


# ---------------------------------------------------------------------------------------------------- crammedBERT


def write_crammed_checkpoint(
    folder: Path,
    tokenizer_dir: Path,
    *,
    trees: int,
    depth: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    num_labels: int | None = None,
    seed: int = 0,
) -> dict:
    """A random checkpoint with the published names and shapes (REFERENCE.md section 2), small dimensions."""
    gen = torch.Generator().manual_seed(seed)
    vocab, nodes = 30522, trees * (2 ** (depth + 1) - 1)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    sd = {
        "encoder.embedding.word_embedding.weight": rnd(vocab, hidden, std=1.0),
        "encoder.embedding.pos_embedding.scale_factor": torch.tensor([1.0 / math.sqrt(hidden)]),
        "encoder.embedding.norm.weight": 1 + rnd(hidden, std=0.1),
        "encoder.embedding.norm.bias": rnd(hidden, std=0.1),
        "encoder.final_norm.weight": 1 + rnd(hidden, std=0.1),
        "encoder.final_norm.bias": rnd(hidden, std=0.1),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + rnd(hidden, std=0.1),
                p + "norm1.bias": rnd(hidden, std=0.1),
                p + "norm2.weight": 1 + rnd(hidden, std=0.1),
                p + "norm2.bias": rnd(hidden, std=0.1),
                p + "attn.self_attention.query_key_value.weight": rnd(3 * hidden, hidden, std=0.2),
                p + "attn.self_attention.norm_factor": torch.tensor(hidden // heads).rsqrt(),
                p + "attn.dense.weight": rnd(hidden, hidden, std=0.1),
                p + "ffn.linear_in.weight": rnd(nodes, hidden, std=0.15),
                p + "ffn.linear_in.bias": rnd(nodes, std=0.15),
                p + "ffn.linear_out.weight": rnd(hidden, nodes, std=0.2),
            }
        )
    sd["decoder.weight"] = sd["encoder.embedding.word_embedding.weight"].clone()  # tied in the original
    arch = {
        "architectures": ["ScriptableCrammedBERT"],
        "num_transformer_layers": layers,
        "hidden_size": hidden,
        "intermed_type": "fff",
        "intermed_size": trees,
        "intermed_depth": depth,
        "norm": "LayerNorm",
        "norm_eps": 1e-12,
        "nonlin": "GELU",
        "use_bias": False,
        "final_norm": True,
        "decoder_bias": False,
        "embedding": {
            "vocab_size": vocab,
            "pos_embedding": "scaled-sinusoidal",
            "pad_token_id": 0,
            "max_seq_length": 128,
            "embedding_dim": hidden,
            "normalization": True,
        },
        "attention": {
            "type": "self-attention",
            "causal_attention": False,
            "num_attention_heads": heads,
            "skip_output_projection": False,
            "qkv_bias": False,
            "rotary_embedding": False,
            "sequence_op": "torch-softmax",
        },
        "num_labels": num_labels,
        "classification_head": {"pooler": "avg", "include_ff_layer": True, "head_dim": 48, "nonlin": "Tanh"},
    }
    if num_labels:
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = rnd(48, hidden, std=0.2), rnd(48, std=0.1)
        sd["head.weight"], sd["head.bias"] = rnd(num_labels, 48, std=0.2), rnd(num_labels, std=0.1)
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "crammedBERT", "arch": arch}))
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return {"sd": sd, "arch": arch}


def independent_crammed_forward(sd: dict, arch: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Straight from the format description, sharing no engine code: pre-LN layers, per-head fused QKV,
    scaled sinusoids, FFF by explicit per-token tree descent."""
    hidden, heads = arch["hidden_size"], arch["attention"]["num_attention_heads"]
    hd, eps, depth, trees = hidden // heads, arch["norm_eps"], arch["intermed_depth"], arch["intermed_size"]
    n_nodes = 2 ** (depth + 1) - 1
    b, t = ids.shape

    def ln(x: torch.Tensor, prefix: str) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    pe = torch.zeros(t, hidden)
    for pos in range(t):
        for i in range(0, hidden, 2):
            angle = pos / (10000.0 ** (i / hidden))
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    x = sd["encoder.embedding.word_embedding.weight"][ids] + sd["encoder.embedding.pos_embedding.scale_factor"] * pe
    x = ln(x, "encoder.embedding.norm")
    pad_bias = (1.0 - mask.float())[:, None, None, :] * -10000.0  # [b, 1, 1, t]
    for layer in range(arch["num_transformer_layers"]):
        p = f"encoder.layers.{layer}."
        h = ln(x, p + "norm1")
        qkv = (h @ sd[p + "attn.self_attention.query_key_value.weight"].T).view(b, t, heads, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + pad_bias
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, hidden)
        x = x + ctx @ sd[p + "attn.dense.weight"].T
        h = ln(x, p + "norm2")
        w_in, b_in, w_out = (
            sd[p + "ffn.linear_in.weight"],
            sd[p + "ffn.linear_in.bias"],
            sd[p + "ffn.linear_out.weight"],
        )
        y = torch.zeros_like(h)
        for bi in range(b):
            for ti in range(t):
                for tree in range(trees):
                    node = 0
                    for _ in range(depth + 1):
                        row = tree * n_nodes + node
                        a = float(w_in[row] @ h[bi, ti] + b_in[row])
                        y[bi, ti] += 0.5 * a * (1.0 + math.erf(a / math.sqrt(2.0))) * w_out[:, row]
                        node = 2 * node + 1 if a <= 0 else 2 * node + 2
        x = x + y
    return ln(x, "encoder.final_norm")


@pytest.mark.parametrize("trees", [1, 2])
def test_published_crammed_checkpoint_matches_independent_forward(tmp_path: Path, minilm_dir: Path, trees: int) -> None:
    folder = tmp_path / f"crammed-k{trees}"
    written = write_crammed_checkpoint(folder, minilm_dir, trees=trees, depth=3, num_labels=3, seed=trees)
    loaded = load_model(folder)
    assert loaded.source_format == "crammedBERT" and loaded.config.layout == "crammed"
    assert (loaded.config.fff_trees, loaded.model.tree_depth()) == (trees, 3)
    assert loaded.config.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    ids, mask = encode(loaded, ["Hello there, general Kenobi.", "short", "padding does not leak into this one"])
    want = independent_crammed_forward(written["sd"], written["arch"], ids, mask)
    real = mask.bool()
    for impl in ("kernel", "masked"):
        loaded.model.set_ffn_impl(impl)
        with torch.inference_mode():
            got = loaded.model(ids, mask)
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    # Classification without padding, where the original's plain mean equals our masked mean.
    sd, single = written["sd"], ids[:1, : int(mask[0].sum())]
    pooled = torch.tanh(want[:1, : single.shape[1]].mean(1) @ sd["pooler.dense.weight"].T + sd["pooler.dense.bias"])
    with torch.inference_mode():
        logits = loaded.model.classify(single, torch.ones_like(single))
    torch.testing.assert_close(logits, pooled @ sd["head.weight"].T + sd["head.bias"], atol=1e-4, rtol=1e-4)


def test_crammed_unsupported_option_is_refused(tmp_path: Path, minilm_dir: Path) -> None:
    folder = tmp_path / "rotary"
    write_crammed_checkpoint(folder, minilm_dir, trees=1, depth=1, layers=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["arch"]["attention"]["rotary_embedding"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rotary_embedding"):
        load_model(folder)


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("layout", ["bert", "crammed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip_is_exact(
    request: pytest.FixtureRequest, tmp_path: Path, layout: str, dtype: torch.dtype
) -> None:
    source = request.getfixturevalue("tiny_model_dir" if layout == "bert" else "tiny_crammed_dir")
    first = load_model(source, weight_dtype=dtype)
    save_model(first, tmp_path / "copy")
    second = load_model(tmp_path / "copy", weight_dtype=dtype)
    assert second.config == first.config and second.name == first.name
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids_a = first.tokenizer.encode(SENTENCES, max_length=32, truncate=True)
    assert second.tokenizer.encode(SENTENCES, max_length=32, truncate=True) == ids_a
    for name in ("tokenizer.json", "vocab.txt"):
        assert (tmp_path / "copy" / name).read_bytes() == (source / name).read_bytes()
    ids, mask = first.tokenizer.pad(ids_a)
    with torch.inference_mode():
        assert torch.equal(first.model.embed(ids, mask), second.model.embed(ids, mask))
        assert torch.equal(first.model.classify(ids, mask), second.model.classify(ids, mask))
    assert second.model.fffs()[0].packed_weights()[0].dtype == dtype


def test_save_in_float16_keeps_out_of_range_tensors_in_float32(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A float16 save must never turn a large weight into inf (it did once, in a sentiment head): such a tensor
    stays float32, the rest is halved, and the model loads back with the exact value."""
    loaded = load_model(tiny_model_dir)
    head = loaded.model.head.classifier.weight
    with torch.no_grad():
        head[0, 0] = 1.0e5  # beyond float16's 65504
    save_model(loaded, tmp_path / "half", dtype=torch.float16)
    stored = load_file(str(tmp_path / "half" / "model.safetensors"))
    assert stored["head.classifier.weight"].dtype == torch.float32
    assert all(
        v.dtype == torch.float16 for k, v in stored.items() if k != "head.classifier.weight" and v.is_floating_point()
    )
    again = load_model(tmp_path / "half")
    assert again.model.head.classifier.weight[0, 0].item() == 1.0e5
    with torch.no_grad():
        head[0, 1] = float("nan")
    with pytest.raises(CheckpointError, match="head.classifier.weight contains NaN"):
        save_model(loaded, tmp_path / "nan", dtype=torch.float16)
    assert not (tmp_path / "nan").exists()


# ---------------------------------------------------------------------------------------------------- errors


@pytest.fixture()
def broken(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))


def rewrite_weights(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_error_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_error_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither ufb_config.json nor config.json"):
        load_model(tmp_path)


def test_error_missing_weights_file(broken: Path) -> None:
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"weights file .*model\.safetensors is missing"):
        load_model(broken)


def test_error_truncated_weights_file(broken: Path) -> None:
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(broken)
    (broken / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(broken)


def test_error_not_a_safetensors_file(broken: Path) -> None:
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"this is not json" + b"x" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(broken)


def test_error_wrong_shape(broken: Path) -> None:
    rewrite_weights(broken, lambda t: t.update({"layers.1.attn_norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: layers\.1\.attn_norm\.weight: found \(63,\)"):
        load_model(broken)


def test_error_missing_tensor(broken: Path) -> None:
    rewrite_weights(broken, lambda t: t.pop("layers.0.ffn.linear_in.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): layers\.0\.ffn\.linear_in\.bias"):
        load_model(broken)


def test_error_unexpected_tensor(broken: Path) -> None:
    rewrite_weights(broken, lambda t: t.update({"layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): layers\.0\.extra\.weight"):
        load_model(broken)


def test_error_config_does_not_match_weights(broken: Path) -> None:
    cfg = json.loads((broken / "ufb_config.json").read_text())
    cfg["fff_depth"] = 4
    (broken / "ufb_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not match its config.*layers\.0\.ffn\.linear_in\.weight"):
        load_model(broken)
    cfg["fff_depth"], cfg["num_layers"] = 3, 3
    (broken / "ufb_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): layers\.2\."):
        load_model(broken)


def test_error_invalid_config(broken: Path) -> None:
    cfg = json.loads((broken / "ufb_config.json").read_text())
    cfg["layout"] = "gpt2"
    (broken / "ufb_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ufb_config\.json: invalid model config: layout"):
        load_model(broken)
    (broken / "ufb_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(broken)


def test_error_nan_weights(broken: Path) -> None:
    rewrite_weights(broken, lambda t: t["embeddings.norm.bias"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"embeddings\.norm\.bias contains NaN"):
        load_model(broken)


# ---------------------------------------------------------------------------------------------------- HF BERT


def test_convert_hf_bert_dense_matches_transformers(minilm_dir: Path) -> None:
    from transformers import BertModel

    converted = convert_hf_bert(minilm_dir, ffn="dense")
    direct = load_model(minilm_dir)
    assert direct.source_format == "hf-bert" and direct.config.ffn == "dense"
    teacher = BertModel.from_pretrained(str(minilm_dir)).eval()
    ids, mask = encode(converted, SENTENCES)
    with torch.inference_mode():
        want = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
        for loaded in (converted, direct):
            got = loaded.model(ids, mask)
            real = mask.bool()
            torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
        # sentence-transformers semantics: masked mean pooling, then L2 normalisation.
        m = mask.unsqueeze(-1).float()
        st = F.normalize((want * m).sum(1) / m.sum(1), dim=-1)
        torch.testing.assert_close(converted.model.embed(ids, mask), st, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["teacher", "random"])
def test_convert_hf_bert_to_fff(minilm_dir: Path, tmp_path: Path, init: str) -> None:
    loaded = convert_hf_bert(minilm_dir, trees=2, depth=4, init=init)
    assert loaded.model.neurons_per_token() == [(10, 1536)] * 6
    assert loaded.config.intermediate_size == 1536 and loaded.config.layout == "bert"
    ids, mask = encode(loaded, SENTENCES)
    with torch.inference_mode():
        emb = loaded.model.embed(ids, mask)
    assert emb.shape == (3, 384) and bool(torch.isfinite(emb).all())
    teacher = load_file(str(minilm_dir / "model.safetensors"))
    fff = loaded.model.layers[0].ffn
    torch.testing.assert_close(fff.linear_out.bias, teacher["encoder.layer.0.output.dense.bias"])
    if init == "teacher":  # the root of tree 0 holds the teacher's strongest neuron
        w1, w2 = teacher["encoder.layer.0.intermediate.dense.weight"], teacher["encoder.layer.0.output.dense.weight"]
        best = int((w1.norm(dim=1) * w2.norm(dim=0)).argmax())
        torch.testing.assert_close(fff.linear_in.weight[0], w1[best])
        torch.testing.assert_close(fff.linear_out.weight[:, 0], w2[:, best])
        save_model(loaded, tmp_path / "student")
        again = load_model(tmp_path / "student")
        with torch.inference_mode():
            torch.testing.assert_close(again.model.embed(ids, mask), emb, atol=0, rtol=0)


def test_build_tiny_model_uses_a_real_tokenizer(tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir, ffn_impl="reference")
    assert loaded.config.vocab_size == loaded.tokenizer.vocab_size == 30522
    assert loaded.model.layers[0].ffn.impl == "reference" and not loaded.model.training
    assert loaded.tokenizer.encode(["hello"], max_length=8, truncate=False) == [[101, 7592, 102]]
