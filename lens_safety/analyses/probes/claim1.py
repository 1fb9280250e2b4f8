"""Claim 1's verdict: is harmful vs harmless linearly separable within the first few layers?"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...core import store
from ...core.errors import CacheError, InputError
from ...core.validation import check_int
from ..figures import claim1_figure
from .results import SCHEMA_VERSION, LayerAccuracy, ProbeResult

CLAIM1_VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass
class Claim1Verdict:
    """Claim 1 ("harmful vs harmless is linearly separable, ≥ ``threshold``, within the first few
    layers") judged on one :class:`ProbeResult`. See :func:`claim1_verdict` for the rules.

    ``first`` is the first layer with accuracy ≥ threshold (None if none), ``early_best`` the most
    accurate of layers ``1..early``, ``best`` the most accurate layer overall (each with its 95%
    Wilson CI). ``length_accuracy`` and ``shuffled_max`` are the result's controls.
    """

    verdict: str
    threshold: float
    early: int
    first: LayerAccuracy | None
    early_best: LayerAccuracy | None
    best: LayerAccuracy
    n: int
    n_layers: int
    name: str
    length_accuracy: float
    shuffled_max: float
    embedding_at_chance: bool | None
    reason: str
    result: ProbeResult | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.name}: {self.verdict} — {self.reason}"

    def to_frame(self):
        """One row: name, verdict, threshold, early, first/early-best/best layer with CIs, controls, reason."""
        import pandas as pd

        row: dict[str, Any] = {"name": self.name, "verdict": self.verdict, "threshold": self.threshold,
                               "early": self.early, "n": self.n, "n_layers": self.n_layers}
        for key, la in (("first", self.first), ("early_best", self.early_best), ("best", self.best)):
            row[f"{key}_layer"] = None if la is None else la.layer
            row[f"{key}_accuracy"] = np.nan if la is None else la.accuracy
            row[f"{key}_ci_low"] = np.nan if la is None else la.ci_low
            row[f"{key}_ci_high"] = np.nan if la is None else la.ci_high
        row.update(length_accuracy=self.length_accuracy, shuffled_max=self.shuffled_max,
                   embedding_at_chance=self.embedding_at_chance, reason=self.reason)
        return pd.DataFrame([row])

    def plot(self, ax=None, others: Sequence[Claim1Verdict] = ()):
        """Accuracy curve(s) with CI bands, the threshold and the early-layer band. Returns the Figure
        (drawn by :func:`lens_safety.analyses.figures.claim1_figure`)."""
        return claim1_figure([self, *others], ax=ax)

    _LAYERS = ("first", "early_best", "best")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the verdict as a :mod:`lens_safety.core.store` artifact (JSON), its :class:`ProbeResult` (when
        it has one) in the sub-folder ``result``."""
        meta = {k: getattr(self, k) for k in ("verdict", "threshold", "early", "n", "n_layers", "name",
                                              "length_accuracy", "shuffled_max", "embedding_at_chance", "reason")}
        meta.update({k: None if getattr(self, k) is None else list(getattr(self, k)) for k in self._LAYERS})
        return store.write_artifact(directory, kind="Claim1Verdict", schema_version=SCHEMA_VERSION, meta=meta,
                                    children=None if self.result is None else {"result": self.result})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Claim1Verdict:
        """Load what :meth:`save` wrote (and its ProbeResult); :class:`~lens_safety.core.errors.CacheError` if it
        or its ``result`` sub-folder is missing or damaged."""
        _, meta = store.read_artifact(directory, kind="Claim1Verdict", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            f = store.json_float
            layers = {k: None if meta[k] is None else LayerAccuracy(int(meta[k][0]), *(f(x) for x in meta[k][1:]))
                      for k in cls._LAYERS}
            chance = meta["embedding_at_chance"]
            result = ProbeResult.load(Path(directory) / "result") if "result" in meta.get("children_sha256", {}) \
                else None
            return cls(str(meta["verdict"]), float(meta["threshold"]), int(meta["early"]), layers["first"],
                       layers["early_best"], layers["best"], int(meta["n"]), int(meta["n_layers"]), str(meta["name"]),
                       f(meta["length_accuracy"]), f(meta["shuffled_max"]), None if chance is None else bool(chance),
                       str(meta["reason"]), result)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved Claim1Verdict is malformed ({e}); delete it and recompute.") from e


def _fmt(la: LayerAccuracy) -> str:
    return f"layer {la.layer} ({la.accuracy:.3f}, 95% CI {la.ci_low:.3f}–{la.ci_high:.3f})"


def claim1_early(n_layers: int, early_fraction: float = 0.25) -> int:
    """The last layer that counts as "the first few": ``max(2, ceil(early_fraction x n_layers))``
    (6 of 24 blocks).

    >>> claim1_early(24), claim1_early(8), claim1_early(4)
    (6, 2, 2)
    """
    return max(2, math.ceil(early_fraction * n_layers))


class Claim1Rule(NamedTuple):
    """What :func:`claim1_rule` finds on a per-layer accuracy curve (layers ≥ 1 only; NaN never counts)."""

    status: str  #: "reproduced", "partly" or "not reproduced"
    first: LayerAccuracy | None  #: the first layer whose accuracy is ≥ threshold
    early_best: LayerAccuracy | None  #: the most accurate of layers 1..early
    body_best: LayerAccuracy | None  #: the most accurate layer
    covering: LayerAccuracy | None  #: the most accurate layer whose CI reaches the threshold


def claim1_rule(layers: Sequence[int], accuracy, ci_low, ci_high, *, early: int,
                threshold: float = 0.95) -> Claim1Rule:
    """The claim-1 rule, on pooled out-of-fold accuracy per layer (layer 0, the embedding, never counts):
    **reproduced** when the first layer with accuracy ≥ ``threshold`` is within ``1..early``;
    **partly** when it comes later, or no layer reaches it but some layer's 95% CI does; else
    **not reproduced**. The one source of the rule for :func:`claim1_verdict` and
    :func:`lens_safety.pipeline.verdicts.verdict_claim1` (ties: the first layer).

    >>> r = claim1_rule([0, 1, 2, 3], [0.5, 0.9, 0.94, 0.96], [0.4, 0.85, 0.9, 0.93], [0.6, 0.95, 0.97, 0.98],
    ...                 early=2)
    >>> r.status, r.first.layer, r.early_best.layer
    ('partly', 3, 2)
    """
    acc, lo, hi = (np.asarray(a, dtype=np.float64) for a in (accuracy, ci_low, ci_high))
    at = [LayerAccuracy(int(layer), float(acc[i]), float(lo[i]), float(hi[i])) for i, layer in enumerate(layers)]
    body = [la for la in at if la.layer >= 1]

    def best(rows: list[LayerAccuracy]) -> LayerAccuracy | None:
        rows = [la for la in rows if la.accuracy == la.accuracy]
        return max(rows, key=lambda la: la.accuracy) if rows else None  # max keeps the first on ties

    first = next((la for la in body if la.accuracy >= threshold), None)
    covering = best([la for la in body if la.ci_high >= threshold])
    if first is not None and first.layer <= early:
        status = "reproduced"
    elif first is not None or covering is not None:
        status = "partly"
    else:
        status = "not reproduced"
    return Claim1Rule(status, first, best([la for la in body if la.layer <= early]), best(body), covering)


def claim1_verdict(result: ProbeResult, threshold: float = 0.95, early: int | None = None,
                   name: str | None = None) -> Claim1Verdict:
    """Judge claim 1 on a 2-way :class:`ProbeResult`: ``"reproduced"``, ``"partly"`` or ``"not reproduced"``.

    ``early`` is the last layer that counts as "the first few layers" (default
    ``max(2, ceil(n_layers / 4))``: 6 of 24 blocks, as the report's verdict; the paper's
    Llama-2-7b-chat reached 0.95 at layer 2 of 32). Layer 0 (the embedding output) never counts.
    The rules, on pooled out-of-fold accuracy:

    - **reproduced**: some layer in ``1..early`` has accuracy ≥ ``threshold``;
    - **partly**: not that, but a later layer reaches ``threshold``, or no layer does but some
      layer's 95% CI includes it;
    - **not reproduced**: no layer reaches ``threshold`` and no layer's CI includes it.

    The reason names the layers with their CIs and adds the length-only and shuffled-label
    controls; a length-only control near the threshold means the sets differ in length.

    >>> import numpy as np
    >>> acc = np.array([0.5, 0.8, 0.96, 0.99, 0.99])
    >>> r = ProbeResult(layers=list(range(5)), metrics={"accuracy": acc, "ci_low": acc - 0.03,
    ...                 "ci_high": np.minimum(acc + 0.02, 1)}, classes=["harmful", "harmless"],
    ...                 classifier="svm", task="2-way", n=400, cv=5, seed=0, n_layers=4, chance=0.5)
    >>> v = claim1_verdict(r, early=2)
    >>> v.verdict, v.first.layer
    ('reproduced', 2)
    >>> claim1_verdict(r, early=1).verdict
    'partly'
    """
    if not isinstance(result, ProbeResult):
        raise InputError(f"claim1_verdict takes a ProbeResult (from probe_layers), got {type(result).__name__}.")
    if not 0 < float(threshold) <= 1:
        raise InputError(f"threshold must be in (0, 1], got {threshold!r}.")
    if early is None:
        early = claim1_early(result.n_layers)
    early = check_int(early, "early", low=1, high=result.n_layers, kind="a layer", hint="the last 'early' layer")
    m = result.metrics
    rule = claim1_rule(result.layers, m["accuracy"], m["ci_low"], m["ci_high"], early=early, threshold=threshold)
    verdict, first, early_best = rule.status, rule.first, rule.early_best
    best = result.best_layer()
    if verdict == "reproduced":
        reason = f"accuracy ≥ {threshold} first at {_fmt(first)}, within layers 1–{early}"
    elif verdict == "partly":
        if first is not None:
            reason = f"accuracy ≥ {threshold} only from {_fmt(first)}, after layer {early}"
        else:
            reason = f"no layer reaches {threshold}, but the CI of {_fmt(rule.covering)} includes it"
        if early_best is not None:
            reason += f"; best early layer: {_fmt(early_best)}"
    else:
        reason = f"no layer reaches {threshold}; best {_fmt(best)}"
        if early_best is not None:
            reason += f"; best early layer: {_fmt(early_best)}"
    length = float(np.nanmax(m["length_accuracy"])) if np.isfinite(m.get("length_accuracy", [np.nan])).any() \
        else float("nan")
    shuffled = float(np.nanmax(m["shuffled_accuracy"])) if np.isfinite(m.get("shuffled_accuracy", [np.nan])).any() \
        else float("nan")
    notes = []
    if math.isfinite(length):
        notes.append(f"length-only control {length:.3f}")
    if math.isfinite(shuffled):
        notes.append(f"shuffled labels ≤ {shuffled:.3f}")
    if notes:
        reason += " (" + ", ".join(notes) + f"; chance {result.chance:.3f})"
    return Claim1Verdict(verdict, float(threshold), early, first, early_best, best, result.n, result.n_layers,
                         name or result.task, length, shuffled, result.embedding_at_chance, reason, result)
