"""Features, labels and groups for the probes, and the difference-of-means directions."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...capture import Residuals
from ...core.errors import InputError
from ...core.validation import check_finite


def _features(residuals: Residuals) -> np.ndarray:
    """[n, n_layers+1, d_model] float32. For ``positions=k`` residuals, the last of the k positions."""
    if not isinstance(residuals, Residuals):
        raise InputError(f"Expected a Residuals (from collect_residuals), got {type(residuals).__name__}.")
    v = residuals.values
    if v.ndim == 4:
        v = v[:, :, -1]
    return v.detach().float().cpu().numpy()


def _feature_position(positions: str | int) -> str:
    """The position the probe features come from: ``"mean"``, or ``"last"`` (``positions="last"``
    and ``positions=k``, whose last entry is the same token)."""
    return "mean" if positions == "mean" else "last"


def _check_finite(X: np.ndarray, layers: Sequence[int]) -> None:
    check_finite({layer: X[:, layer] for layer in layers}, "The activations",
                 where=lambda bad: f"at layer(s) {[b[0] for b in bad]} (0 = embedding output)",
                 hint="Recapture them (e.g. in float32) or drop those layers with layers=[...].")


def _resolve_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers + 1))
    out = []
    for layer in layers:
        if not -(n_layers + 1) <= int(layer) <= n_layers:
            raise InputError(f"layer must be in 0..{n_layers} (0 = embedding output), got {layer}.")
        out.append(int(layer) % (n_layers + 1))
    return out


def _check_labels(labels: Sequence[Any], n: int, cv: int | None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(list(labels))
    if y.shape[0] != n:
        raise InputError(f"Got {y.shape[0]} labels for {n} activation rows; pass one label per prompt.")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"Need at least two classes to probe, got only {classes.tolist()}; "
                         "concatenate residuals of both sets (e.g. harmful + harmless).")
    if cv is not None and counts.min() < cv:
        small = {str(c): int(k) for c, k in zip(classes, counts) if k < cv}
        raise InputError(f"cv={cv} folds need at least {cv} samples per class; too few in {small}. "
                         "Add prompts or lower cv.")
    return y, classes


def _request_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def request_groups(residuals: Residuals) -> np.ndarray:
    """One group id per row: the plain request it asks (``Prompt.plain_request``).

    A jailbreak prompt and the plain request it wraps share a group, so do two wrappers of one
    request: CV that keeps groups apart never trains on a request it then tests.

    >>> from lens_safety.inputs.prompts import PromptSet
    >>> import lens_safety as ls, torch
    >>> ps = PromptSet.from_texts(["Do X", "Do Y"], label="harmful")
    >>> jb = ls.jailbreak(ps, "prefix_injection")
    >>> r = ls.Residuals(torch.zeros(4, 2, 3), ps + jb, torch.ones(4, dtype=torch.long), "m", "h", "last")
    >>> g = request_groups(r); bool(g[0] == g[2]), bool(g[0] == g[1])
    (True, False)
    """
    if not isinstance(residuals, Residuals):
        raise InputError(f"Expected a Residuals (from collect_residuals), got {type(residuals).__name__}.")
    return np.asarray([_request_key(p.plain_request) for p in residuals.prompts])


def _resolve_groups(groups: Any, residuals: Residuals, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    if isinstance(groups, str):
        if groups != "request":
            raise InputError(f"groups must be 'request' (group by Prompt.plain_request), None (no grouping) or "
                             f"one group id per prompt; got {groups!r}.")
        return request_groups(residuals)
    g = np.asarray(list(groups))
    if g.shape[0] != n:
        raise InputError(f"Got {g.shape[0]} group ids for {n} activation rows; pass one group per prompt.")
    return g


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def _diff_means(X: np.ndarray, y: np.ndarray, positive: Any, negative: Any) -> np.ndarray:
    """[layers, d] unit vectors mean(positive) - mean(negative), in float64."""
    pos, neg = X[y == positive].astype(np.float64), X[y == negative].astype(np.float64)
    return _unit(pos.mean(0) - neg.mean(0))


def refusal_directions(residuals: Residuals, positive: str = "harmful", negative: str = "harmless",
                       labels: Sequence[str] | None = None) -> Float[Tensor, "layer d_model"]:
    """Per-layer unit difference-of-means direction ``mean(positive) - mean(negative)``.

    Row ``l`` is residual layer ``l`` (0 = embedding output, l = raw output of block l-1).
    A layer whose class means coincide (e.g. the embedding at the chat template's last token)
    gets a zero vector.

    >>> import lens_safety as ls, torch
    >>> from lens_safety.inputs.prompts import PromptSet
    >>> ps = PromptSet.from_texts(["a", "b"], label="harmful") + PromptSet.from_texts(["c", "d"], label="harmless")
    >>> v = torch.zeros(4, 2, 3); v[:2, 1, 0] = 1.0
    >>> r = ls.Residuals(v, ps, torch.ones(4, dtype=torch.long), "m", "h", "last")
    >>> refusal_directions(r)[1].tolist()
    [1.0, 0.0, 0.0]
    """
    X = _features(residuals)
    y = np.asarray(list(labels) if labels is not None else residuals.labels)
    if y.shape[0] != X.shape[0]:
        raise InputError(f"Got {y.shape[0]} labels for {X.shape[0]} activation rows.")
    for lab in (positive, negative):
        if not (y == lab).any():
            raise InputError(f"No prompt has label {lab!r}; labels present: {sorted(set(y.tolist()))}.")
    _check_finite(X, range(X.shape[1]))
    return torch.from_numpy(_diff_means(X, y, positive, negative).astype(np.float32))
