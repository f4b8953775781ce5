"""The classification head of a distilled student: pooled features through the serving path, a logistic
regression folded into one linear layer, and installing it as the model's head (``/classify``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.checkpoint import LoadedModel
from engine.model import ClassificationHead


@torch.inference_mode()
def pooled_features(
    loaded: LoadedModel,
    texts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "embedding",
) -> torch.Tensor:
    """Un-normalised masked-mean final hidden states ``[N, H]`` (what the classification head reads), computed
    in length-sorted batches through the packed serving path; rows are in input order."""
    from tqdm import tqdm

    tok = loaded.tokenizer
    ids = tok.encode(list(texts), max_length=min(max_length, loaded.config.max_position_embeddings), truncate=True)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), loaded.config.hidden_size)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        out[rows] = loaded.model.pooled_ids([ids[i] for i in rows], cls=False).float()
    return out


def fit_linear_head(
    features: torch.Tensor, labels: list[str], seed: int = 0, c: float = 1.0
) -> tuple[list[str], torch.Tensor, torch.Tensor, Callable[[torch.Tensor], list[str]]]:
    """Logistic regression on standardised features, folded back into one linear layer on raw features:
    ``(classes, weight [C, H], bias [C], predict)``.

    Constant features (spread under 1e-3 of the widest feature's) get weight 0. Why: some hidden dimensions are
    dead (the student's final LayerNorm zeroes them; spread ~1e-6), and standardising one made its folded weight
    102,436, which turned to inf in a float16 save and made the logits hang on rounding noise."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = features.double().numpy()
    mu, spread = x.mean(0), x.std(0)
    live = spread > 1e-3 * max(float(spread.max()), 1e-12)
    sd = np.where(live, spread, 1.0)
    clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    clf.fit(((x - mu) / sd)[:, live], np.array(labels))
    classes = [str(c_) for c_ in clf.classes_]
    fitted = np.zeros((clf.coef_.shape[0], x.shape[1]))
    fitted[:, live] = clf.coef_
    coef = fitted / sd  # fold the standardisation in
    inter = clf.intercept_ - (fitted * mu / sd).sum(1)
    if len(classes) == 2:  # binary: logits (-z/2, z/2) give softmax == sigmoid(z)
        weight = np.stack([-coef[0] / 2, coef[0] / 2])
        bias = np.array([-inter[0] / 2, inter[0] / 2])
    else:
        weight, bias = coef, inter
    w = torch.tensor(weight, dtype=torch.float32)
    b = torch.tensor(bias, dtype=torch.float32)

    def predict(feats: torch.Tensor) -> list[str]:
        return [classes[i] for i in (feats.float() @ w.T + b).argmax(1).tolist()]

    return classes, w, b, predict


def attach_classifier_head(
    loaded: LoadedModel, texts: list[str], labels: list[str], *, seed: int = 0, progress: bool = False
) -> float:
    """Train a linear head (labels from the data) over the frozen model and install it; returns train accuracy."""
    feats = pooled_features(loaded, texts, progress=progress, desc="head features")
    classes, w, b, predict = fit_linear_head(feats, labels, seed)
    loaded.config.labels = classes
    loaded.config.classifier_dim = None
    head = ClassificationHead(loaded.config)
    with torch.no_grad():
        head.classifier.weight.copy_(w)
        head.classifier.bias.copy_(b)
    loaded.model.head = head.eval()
    return sum(p == t for p, t in zip(predict(feats), labels)) / len(labels)
