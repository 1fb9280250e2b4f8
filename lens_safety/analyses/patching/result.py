"""The result of a patching sweep, :class:`PatchResult`: long-form rows, views, and persistence."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ... import __version__
from ...core import store
from ...core.errors import CacheError
from ..figures import patch_figure
from .recovery import RecoveryStats

SCHEMA_VERSION = 2


@dataclass
class PatchResult(RecoveryStats):
    """Per-pair patching results in long form (one row per pair, direction, layer, component, ...).

    ``score`` is the refusal score of the patched run (estimated, for
    ``method="attribution"``; the score's kind is ``score_mode``: ``"margin"`` or
    ``"complement"``); ``recovery`` is ``(score - target) / (source - target)`` with the pair's
    unpatched target and source scores (per-pair normalisation; NaN where the two runs score
    the same). ``baselines[pair, direction] = (target_score, source_score)``, so the other
    normalisation (by the mean gap over pairs) is computed from stored numbers:
    :meth:`recovery_matrix` ``(normalize="mean")``. ``normalize`` is the default of the
    summaries (:meth:`mean_recovery`, :meth:`summary`, :meth:`break_layer`, :meth:`plot`).

    ``pairs`` are the patched pairs (``input_index``: their index in the input); ``dropped``
    lists the pairs left out, with their scores, gap and reason (see ``min_gap`` in
    :func:`patch_layers`). Layers are block indices; ``resid_pre`` at block ``l`` is residual
    layer ``l`` (0 = embedding output, l = raw output of block l-1).
    """

    pair: Int[Tensor, " row"]
    layer: Int[Tensor, " row"]
    component: Int[Tensor, " row"]  # index into components
    head: Int[Tensor, " row"]  # -1 = not a per-head row
    position: Int[Tensor, " row"]  # offset from the end of the target prompt; 0 = all aligned positions
    direction: Int[Tensor, " row"]  # index into directions
    score: Float[Tensor, " row"]
    recovery: Float[Tensor, " row"]
    baselines: Float[Tensor, "pair direction 2"]
    components: tuple[str, ...]
    directions: tuple[str, ...]
    method: str
    model_name: str
    weights_hash: str
    n_layers: int
    positions: str
    per_position: bool = False
    heads: bool = False
    pairs: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    min_gap: float | None = None
    normalize: str = "pair"
    score_mode: str = "margin"

    def __len__(self) -> int:
        return int(self.pair.shape[0])

    @property
    def n_pairs(self) -> int:
        return int(self.baselines.shape[0])

    def __repr__(self) -> str:
        return (
            f"PatchResult(method={self.method!r}, pairs={self.n_pairs}, dropped={len(self.dropped)}, "
            f"components={list(self.components)}, directions={list(self.directions)}, rows={len(self)}, "
            f"model={self.model_name!r})"
        )

    # -- views
    def to_frame(self):
        """Long form: pair, layer, component, direction, recovery (per pair), recovery_mean_gap, score,
        method (+ head, position)."""
        import pandas as pd

        df = pd.DataFrame(
            {
                "pair": self.pair.numpy(),
                "layer": self.layer.numpy(),
                "component": pd.Categorical(
                    [self.components[i] for i in self.component.tolist()], categories=list(self.components)
                ),
                "direction": [self.directions[i] for i in self.direction.tolist()],
                "recovery": self.recovery.numpy(),
                "recovery_mean_gap": self.recovery_for("mean").numpy(),
                "score": self.score.numpy(),
                "method": self.method,
            }
        )
        if self.heads:
            df["head"] = pd.array([h if h >= 0 else None for h in self.head.tolist()], dtype="Int64")
        if self.per_position:
            df["position"] = self.position.numpy()
        return df

    def baselines_frame(self):
        """Per pair and direction: request, jailbreak method, target and source scores, gap (plain − jailbroken)."""
        import pandas as pd

        rows = []
        for i, meta in enumerate(self.pairs):
            for d_i, d in enumerate(self.directions):
                t, s = self.baselines[i, d_i].tolist()
                plain, jb = (s, t) if d == "denoise" else (t, s)
                rows.append(
                    {
                        "pair": i,
                        "request": meta["request"],
                        "jailbreak": meta.get("method"),
                        "direction": d,
                        "target_score": t,
                        "source_score": s,
                        "plain_score": plain,
                        "jailbroken_score": jb,
                        "gap": plain - jb,
                    }
                )
        return pd.DataFrame(rows)

    def dropped_frame(self):
        """The pairs left out of the sweep: input index, request, method, margin scores, gap, reason."""
        import pandas as pd

        cols = ["input_index", "request", "method", "plain_score", "jailbroken_score", "gap", "reason"]
        return pd.DataFrame(self.dropped, columns=cols)

    def plot(self, ax=None, *, n_boot: int = 1000, seed: int = 0, normalize: str | None = None):
        """Heatmap of mean recovery (component x layer, per direction) above mean ± 95% CI curves;
        on ``ax`` (when given) the curves only. See :func:`lens_safety.analyses.figures.patch_figure`."""
        return patch_figure(self, ax=ax, n_boot=n_boot, seed=seed, normalize=normalize)

    # -- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tensors.safetensors`` + ``meta.json`` into ``directory`` atomically
        (:mod:`lens_safety.core.store`)."""
        meta = {
            **{k: getattr(self, k) for k in _META_FIELDS},
            "components": list(self.components),
            "directions": list(self.directions),
            "versions": _versions(),
        }
        return store.write_artifact(directory, kind="PatchResult", schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors={k: getattr(self, k).contiguous() for k in _TENSOR_FIELDS})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PatchResult:
        """Load what :meth:`save` wrote; raises :class:`~lens_safety.core.errors.CacheError` if it fails
        verification."""
        t, meta = store.read_artifact(directory, kind="PatchResult", schema_version=SCHEMA_VERSION)
        missing = [k for k in _TENSOR_FIELDS if k not in t] + [k for k in _META_FIELDS if k not in meta]
        if missing:
            raise CacheError(f"{directory} lacks {missing} : not a complete PatchResult; recompute it.")
        return cls(
            **{k: t[k] for k in _TENSOR_FIELDS},
            components=tuple(meta["components"]),
            directions=tuple(meta["directions"]),
            **{k: meta[k] for k in _META_FIELDS},
        )


_TENSOR_FIELDS = (
    "pair",
    "layer",
    "component",
    "head",
    "position",
    "direction",
    "score",
    "recovery",
    "baselines",
)
_META_FIELDS = (
    "method",
    "model_name",
    "weights_hash",
    "n_layers",
    "positions",
    "per_position",
    "heads",
    "pairs",
    "dropped",
    "min_gap",
    "normalize",
    "score_mode",
)


def _versions() -> dict[str, str]:
    out = {"lens_safety": __version__, "torch": torch.__version__}
    try:
        out["transformer_lens"] = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover
        out["transformer_lens"] = "?"
    return out

