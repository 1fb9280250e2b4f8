"""Early detection: flag, from the first ``k`` reply tokens, replies that will comply with a harmful request.

Positives are replies to harmful requests (plain or jailbroken) whose *full* reply is judged
``"complied"``; negatives are replies to harmless requests (``negative_groups``). Other replies (harmful
requests refused or unengaged) are neither. For each ``k`` the detector (standardise + logistic regression)
sees, for every readout column, its value at step ``min(k, n_reply)`` and its mean over steps ``0..k``
(step 0 is the last prompt position, so ``k = 0`` is the prompt-only baseline). It is fitted and scored
out of fold (scikit-learn ``StratifiedGroupKFold`` grouped by request, so a request's plain and jailbroken
replies are never split between fitting and scoring), and the threshold lets through at most ``fpr`` of
the negatives' out-of-fold scores. TPR is reported overall and per jailbreak method, with 95% intervals
from a bootstrap over requests (threshold re-derived in every resample), beside the out-of-fold AUROC.

>>> import numpy as np, pandas as pd
>>> from lens_safety.analyses.reply.readouts import ReplyReadouts
>>> rng = np.random.default_rng(0)
>>> n, steps = 60, 4
>>> pos = np.arange(n) < 30
>>> vals = rng.normal(size=(n * steps, 1)) + np.repeat(pos, steps)[:, None] * np.tile(np.arange(steps), n)[:, None]
>>> replies = pd.DataFrame({"group": np.where(pos, "jb", "harmless"), "method": np.where(pos, "m", "plain"),
...                         "request": [f"r{i}" for i in range(n)], "outcome": "complied", "n_reply": steps - 1})
>>> ro = ReplyReadouts(vals.astype(np.float32), ["refusal@1"], np.repeat(np.arange(n), steps),
...                    np.tile(np.arange(steps), n), [""] * (n * steps), replies)
>>> d = early_detection(ro, ks=(0, 3), n_boot=50)
>>> d.tpr(0) < d.tpr(3)
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core import store
from ...core.errors import CacheError, InputError
from ...core.stats import bootstrap_rows
from ..harm.geometry import tpr_at_fpr
from .figures import detection_figure
from .readouts import ReplyReadouts

__all__ = ["DetectionResult", "early_detection", "detection_features", "KS"]

KS = (0, 1, 3, 8)
KIND = "lens_safety.early_detection"
NEGATIVE_GROUPS = ("harmless", "borderline")


@dataclass
class DetectionResult:
    """``frame``: one row per (k, group) -- group ``"all"`` or a jailbreak method (``"plain"``: unwrapped
    requests): ``n_pos``, ``n_neg``, ``tpr`` with ``ci_low``/``ci_high`` at the ``fpr`` threshold, ``auroc``
    (overall rows), ``threshold``. ``scores``: the out-of-fold scores (reply, k, score, positive, method)."""

    frame: Any
    scores: Any
    ks: tuple[int, ...]
    fpr: float
    note: str = ""
    against: str = "harmless"

    def to_frame(self):
        return self.frame.copy()

    def tpr(self, k: int, group: str = "all") -> float:
        row = self.frame[(self.frame["k"] == k) & (self.frame["group"] == group)]
        return float(row["tpr"].iloc[0]) if len(row) else float("nan")

    def plot(self, ax=None):
        return detection_figure(self, ax=ax)

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"frame": store.frame_to_json(self.frame), "scores": store.frame_to_json(self.scores),
                "ks": list(self.ks), "fpr": self.fpr, "note": self.note, "against": self.against}
        return store.write_artifact(directory, kind=KIND, schema_version=1, meta=meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DetectionResult:
        _, meta = store.read_artifact(directory, kind=KIND, schema_version=1)
        try:
            return cls(store.frame_from_json(meta["frame"]), store.frame_from_json(meta["scores"]),
                       tuple(meta["ks"]), float(meta["fpr"]), meta.get("note", ""), meta.get("against", "harmless"))
        except KeyError as e:
            raise CacheError(f"{directory}: saved detection result is malformed ({e}); recompute it.") from e


def detection_features(readouts: ReplyReadouts, k: int, columns: Sequence[str] | None = None) -> np.ndarray:
    """``[replies, 2 * columns]``: each column's value at step ``min(k, n_reply)`` and its mean over steps
    ``0..min(k, n_reply)``. Lens masses (probabilities) enter as ``log10(max(mass, 1e-6))``: on a linear scale
    their spread is tiny in most replies and a standardised outlier dominates the detector."""
    names = list(columns or readouts.columns)
    cols = [readouts.columns.index(c) for c in names]
    n = len(readouts.replies)
    last = np.zeros((n, len(cols)))
    total = np.zeros((n, len(cols)))
    count = np.zeros(n)
    keep = readouts.step <= k
    v = readouts.values[keep][:, cols].astype(np.float64)
    lens = [j for j, c in enumerate(names) if c.startswith("lens_")]
    v[:, lens] = np.log10(np.maximum(v[:, lens], 1e-6))
    r, s = readouts.reply[keep], readouts.step[keep]
    np.add.at(total, r, v)
    np.add.at(count, r, 1)
    order = np.lexsort((s, r))  # the last kept step of each reply wins
    last[r[order]] = v[order]
    return np.concatenate([last, total / np.maximum(count, 1)[:, None]], axis=1)


def _labels(readouts: ReplyReadouts, negative_groups: Sequence[str], against: str) -> tuple[np.ndarray, np.ndarray]:
    rep = readouts.replies
    harmless = rep["group"].isin(list(negative_groups)).to_numpy()
    pos = ~harmless & (rep["outcome"] == "complied").to_numpy()
    neg = harmless if against == "harmless" else ~harmless & (rep["outcome"] == "refused").to_numpy()
    return pos, neg


def _oof_scores(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    est = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return cross_val_predict(est, x, y, groups=groups, cv=cv, method="decision_function")


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def _rows_for_k(k: int, s: np.ndarray, y: np.ndarray, methods: np.ndarray, gid: np.ndarray, fpr: float,
                n_boot: int, seed: int) -> list[dict[str, Any]]:
    _, thr = tpr_at_fpr(s[y == 1], s[y == 0], fpr)
    names = ["all"] + sorted(set(methods[y == 1]))
    boots: dict[str, list[float]] = {g: [] for g in names}
    n_groups = int(gid.max()) + 1
    members = [np.flatnonzero(gid == g) for g in range(n_groups)]
    for draw in bootstrap_rows(np.arange(n_groups), n_boot, seed=seed):  # resample requests
        idx = np.concatenate([members[g] for g in draw])
        sy, ss, sm = y[idx], s[idx], methods[idx]
        if not (sy == 0).any() or not (sy == 1).any():
            continue
        _, t = tpr_at_fpr(ss[sy == 1], ss[sy == 0], fpr)
        for g in names:
            sel = (sy == 1) & ((sm == g) if g != "all" else True)
            if sel.any():
                boots[g].append(float(np.mean(ss[sel] > t)))
    rows = []
    for g in names:
        sel = (y == 1) & ((methods == g) if g != "all" else True)
        lo, hi = (np.percentile(boots[g], [2.5, 97.5]) if len(boots[g]) >= 10 else (np.nan, np.nan))
        rows.append({"k": k, "group": g, "n_pos": int(sel.sum()), "n_neg": int((y == 0).sum()),
                     "tpr": float(np.mean(s[sel] > thr)) if sel.any() else np.nan, "ci_low": float(lo),
                     "ci_high": float(hi), "auroc": _auroc(y, s) if g == "all" else np.nan, "threshold": thr})
    return rows


def early_detection(readouts: ReplyReadouts, *, ks: Sequence[int] = KS, fpr: float = 0.05,
                    negative_groups: Sequence[str] = NEGATIVE_GROUPS, columns: Sequence[str] | None = None,
                    n_splits: int = 5, n_boot: int = 1000, seed: int = 0, against: str = "harmless") -> DetectionResult:
    """TPR at ``fpr`` false positives of a detector on the first ``k`` reply tokens' readouts, per ``k``
    (see the module docstring); ``columns`` picks readout columns (default: all). ``against="refused"``
    takes the negatives from replies to harmful requests judged refused instead of harmless replies: whether
    a harmful request will be complied with, not whether it is harmful."""
    import pandas as pd

    if not 0 < fpr < 1:
        raise InputError(f"fpr must be in (0, 1), got {fpr}.")
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 0:
        raise InputError(f"ks must be reply-token counts >= 0, got {ks}.")
    if against not in ("harmless", "refused"):
        raise InputError(f"against must be 'harmless' or 'refused', got {against!r}.")
    pos, neg = _labels(readouts, negative_groups, against)
    keep = pos | neg
    rep = readouts.replies[keep].reset_index(drop=True)
    y = pos[keep].astype(int)
    methods = rep["method"].astype(str).to_numpy()
    _, gid = np.unique(rep["request"].astype(str).to_numpy(), return_inverse=True)
    empty = pd.DataFrame(columns=["k", "group", "n_pos", "n_neg", "tpr", "ci_low", "ci_high", "auroc", "threshold"])
    n_splits = min(n_splits, len(np.unique(gid[y == 1])), len(np.unique(gid[y == 0])))
    if n_splits < 2:
        note = (f"not measured: {int(y.sum())} complied harmful replies and {int((y == 0).sum())} {against} "
                "replies; the grouped CV needs at least 2 requests of each.")
        return DetectionResult(empty, pd.DataFrame(columns=["reply", "k", "score", "positive", "method"]), ks,
                               fpr, note, against=against)
    rows, scores = [], []
    for k in ks:
        x = detection_features(readouts, k, columns)[keep]
        s = _oof_scores(x, y, gid, n_splits, seed)
        rows += _rows_for_k(k, s, y, methods, gid, fpr, n_boot, seed)
        scores.append(pd.DataFrame({"reply": np.flatnonzero(keep), "k": k, "score": s, "positive": y.astype(bool),
                                    "method": methods}))
    return DetectionResult(pd.DataFrame(rows), pd.concat(scores, ignore_index=True), ks, fpr, against=against)
