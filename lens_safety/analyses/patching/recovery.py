"""Recovery statistics of a :class:`~lens_safety.analyses.patching.PatchResult`: the two normalisations,
per-layer means with bootstrap CIs over pairs, break layers, and the correlation of two results.

**Recovery**, two normalisations (both computable from the stored raw scores):

- ``normalize="pair"`` (default): per pair, ``(patched - target) / (source - target)``;
  0 = no effect, 1 = the source run's score. The mean over pairs weighs every pair equally.
- ``normalize="mean"`` (TransformerLens' convention): by the mean gap over pairs,
  ``(patched - target) / mean(source - target)``; its mean over pairs is
  ``(patched_mean - target_mean) / (source_mean - target_mean)``, which weighs pairs by their gap
  and cannot blow up on one small-gap pair.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from ...core import stats
from ...core.errors import InputError, UnknownNameError
from ...core.validation import check_same_model
from .config import check_normalize


class RecoveryStats:
    """The recovery summaries of :class:`~lens_safety.analyses.patching.PatchResult` (mixed into it; they read
    its rows ``pair``, ``layer``, ``component``, ``direction``, ``score``, ``recovery`` and ``baselines``)."""

    def _norm(self, normalize: str | None) -> str:
        return check_normalize(self.normalize if normalize is None else normalize)

    def gaps(self) -> Tensor:
        """``[n_pairs, n_directions]`` source − target score of every pair (the recovery denominators)."""
        return self.baselines[..., 1] - self.baselines[..., 0]

    def recovery_for(self, normalize: str | None = None) -> Tensor:
        """Recovery of every row: ``"pair"`` (the stored ``recovery``) or ``"mean"``:
        ``(score - target) / mean gap`` over the pairs of the row's direction."""
        if self._norm(normalize) == "pair":
            return self.recovery
        mean_gap = self.gaps().mean(0) if self.n_pairs else torch.zeros(len(self.directions), dtype=torch.float64)
        g = mean_gap[self.direction]
        tgt = self.baselines[self.pair, self.direction, 0]
        ok = g.abs() > 1e-12
        return torch.where(ok, (self.score - tgt) / g.where(ok, 1.0), torch.full_like(self.score, math.nan))

    def _resolve_direction(self, direction: str | None) -> str:
        if direction is None:
            return "denoise" if "denoise" in self.directions else self.directions[0]
        if direction not in self.directions:
            raise UnknownNameError(
                f"direction {direction!r} is not in this result ({list(self.directions)})."
            )
        return direction

    def _select(self, component: str, direction: str | None) -> tuple[Tensor, int]:
        direction = self._resolve_direction(direction)
        if component not in self.components:
            raise UnknownNameError(
                f"component {component!r} is not in this result ({list(self.components)})."
            )
        if component == "z":
            raise InputError("component 'z' is per head; use to_frame() for per-head recovery.")
        if self.per_position:
            raise InputError(
                "This result is per position; recovery_matrix needs all positions patched "
                "together (per_position=False)."
            )
        d = self.directions.index(direction)
        return (self.component == self.components.index(component)) & (self.direction == d), d

    def recovery_matrix(self, component: str = "resid_pre", direction: str | None = None,
                        normalize: str | None = None) -> np.ndarray:
        """``[n_pairs, n_layers]`` recovery of one component (all aligned positions, all heads);
        NaN for layers not swept. ``normalize``: ``"pair"`` or ``"mean"`` (default: the result's)."""
        sel, _ = self._select(component, direction)
        rec = self.recovery_for(normalize)
        m = np.full((self.n_pairs, self.n_layers), np.nan)
        m[self.pair[sel].numpy(), self.layer[sel].numpy()] = rec[sel].numpy()
        return m

    def _deltas(self, component: str, direction: str | None) -> tuple[np.ndarray, np.ndarray]:
        """``(score - target)`` as ``[n_pairs, n_layers]`` and the per-pair gaps ``[n_pairs]``."""
        sel, d = self._select(component, direction)
        tgt = self.baselines[self.pair, self.direction, 0]
        m = np.full((self.n_pairs, self.n_layers), np.nan)
        m[self.pair[sel].numpy(), self.layer[sel].numpy()] = (self.score - tgt)[sel].numpy()
        return m, self.gaps()[:, d].numpy()

    def _boot_curves(self, component: str, direction: str | None, normalize: str, n_boot: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The mean recovery curve and ``n_boot`` curves over pairs resampled with replacement."""
        idx = stats.bootstrap_rows(np.empty((self.n_pairs, 0)), n_boot, seed)
        if normalize == "pair":
            m = self.recovery_matrix(component, direction, "pair")
            return stats.nanmean(m, axis=0), stats.nanmean(m[idx], axis=1)
        dm, g = self._deltas(component, direction)
        with np.errstate(invalid="ignore", divide="ignore"):
            point = stats.nanmean(dm, axis=0) / g.mean()
            boot = stats.nanmean(dm[idx], axis=1) / g[idx].mean(axis=1)[:, None]
        return point, boot

    def mean_recovery(
        self,
        component: str = "resid_pre",
        direction: str | None = None,
        *,
        normalize: str | None = None,
        n_boot: int = 2000,
        seed: int = 0,
        ci: float = 0.95,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer: mean recovery over pairs and its BCa bootstrap CI over pairs (``scipy.stats.bootstrap``,
        seeded). With ``normalize="mean"`` the statistic is the ratio of means
        ``mean(patched - target) / mean(gap)``, bootstrapped with pairs kept together."""
        normalize = self._norm(normalize)
        mean, lo, hi = (np.full(self.n_layers, np.nan) for _ in range(3))
        if normalize == "pair":
            m = self.recovery_matrix(component, direction, "pair")
            for j in range(self.n_layers):
                mean[j], lo[j], hi[j] = stats.bootstrap_ci(m[:, j], level=ci, n_resamples=n_boot, seed=seed)
        else:
            dm, g = self._deltas(component, direction)
            for j in range(self.n_layers):
                mean[j], lo[j], hi[j] = stats.bootstrap_ratio_ci(dm[:, j], g, level=ci, n_resamples=n_boot,
                                                                 seed=seed)
        return mean, lo, hi

    def summary(self, normalize: str | None = None, *, n_boot: int = 2000, seed: int = 0, ci: float = 0.95,
                trim: float = 0.2):
        """Per component, direction and layer: n_pairs, mean recovery with its BCa CI, the median and the
        ``trim``-trimmed mean over pairs (robust to one odd pair)."""
        import pandas as pd
        from scipy.stats import trim_mean

        normalize = self._norm(normalize)
        rows = []
        for d in self.directions:
            for c in self.components:
                if c == "z" or self.per_position:
                    continue
                m = self.recovery_matrix(c, d, normalize)
                mean, lo, hi = self.mean_recovery(c, d, normalize=normalize, n_boot=n_boot, seed=seed, ci=ci)
                for j in range(self.n_layers):
                    col = m[:, j][~np.isnan(m[:, j])]
                    if col.size == 0:
                        continue
                    rows.append({"component": c, "direction": d, "layer": j, "normalize": normalize,
                                 "n_pairs": int(col.size), "mean": mean[j], "ci_low": lo[j], "ci_high": hi[j],
                                 "median": float(np.median(col)), "trimmed_mean": float(trim_mean(col, trim))})
        return pd.DataFrame(rows)

    def break_layer(
        self,
        component: str = "resid_pre",
        direction: str | None = None,
        *,
        threshold: float = 0.5,
        n_boot: int = 1000,
        seed: int = 0,
        ci: float = 0.95,
        normalize: str | None = None,
    ) -> tuple[int | None, int | None, int | None]:
        """The earliest block where the mean recovery over pairs reaches ``threshold``.

        Returns the tuple ``(layer, ci_low, ci_high)``: the crossing of the mean curve and a seeded
        percentile bootstrap CI of the crossing over pairs (pairs resampled with replacement;
        resampled sets whose mean never reaches the threshold count as ``n_layers``, i.e. "not
        within the model"). ``layer`` is None if the mean never reaches it.
        ``direction=None`` picks ``"denoise"`` when present. Layer ``l`` is block ``l``
        (for resid_pre: residual layer ``l``, 0 = embedding output). ``normalize``: the
        recovery's normalisation (default: the result's).
        """
        normalize = self._norm(normalize)
        mean, boot = self._boot_curves(component, direction, normalize, n_boot, seed)
        point = _first_cross(mean, threshold)
        crosses = np.array([_first_cross(b, threshold) for b in boot], dtype=float)
        crosses[np.isnan(crosses)] = self.n_layers
        a = (1 - ci) / 2
        lo = int(np.quantile(crosses, a, method="inverted_cdf"))
        hi = int(np.quantile(crosses, 1 - a, method="inverted_cdf"))
        return point, lo, hi

    def break_layers(self, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, normalize: str | None = None):
        """A frame of :meth:`break_layer` for every component and direction, with the largest mean
        and median recovery over layers."""
        import pandas as pd

        normalize = self._norm(normalize)
        rows = []
        for d in self.directions:
            for c in self.components:
                if c == "z":
                    continue
                layer, lo, hi = self.break_layer(c, d, threshold=threshold, n_boot=n_boot, seed=seed,
                                                 normalize=normalize)
                m = self.recovery_matrix(c, d, normalize)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    med = np.nanmedian(m, axis=0)
                rows.append(
                    {
                        "component": c,
                        "direction": d,
                        "break_layer": layer,
                        "ci_low": lo,
                        "ci_high": hi,
                        "max_mean_recovery": float(np.nanmax(stats.nanmean(m, 0))),
                        "max_median_recovery": float(np.nanmax(med)),
                        "normalize": normalize,
                        "n_pairs": self.n_pairs,
                        "n_dropped": len(self.dropped),
                    }
                )
        return pd.DataFrame(rows)

    def compare(self, other: RecoveryStats):
        """Pearson correlation of recovery between two results (e.g. attribution vs activation)."""
        return compare(self, other)


def _first_cross(mean: np.ndarray, threshold: float) -> int | None:
    hit = np.nonzero(np.nan_to_num(mean, nan=-np.inf) >= threshold)[0]
    return int(hit[0]) if hit.size else None


def compare(a: RecoveryStats, b: RecoveryStats):
    """Pearson correlation of ``recovery`` between two results on their matching rows.

    Rows match on (pair, direction, layer, component, head, position). Returns a frame with
    one row per component and direction plus an ``"all"`` row: ``n`` and ``pearson_r``.

    >>> compare(attribution_patch(m, pairs), patch_layers(m, pairs))  # doctest: +SKIP
    """
    check_same_model(a, b, "Cannot compare these results", fix="Compare results of one model.")
    if a.n_pairs != b.n_pairs or [p["request"] for p in a.pairs] != [p["request"] for p in b.pairs]:
        raise InputError("The two results were computed on different pairs.")
    keys = ["pair", "direction", "layer", "component", "head", "position"]
    fa, fb = (_keyed(r) for r in (a, b))
    merged = fa.merge(fb, on=keys, suffixes=("_a", "_b"))
    if merged.empty:
        raise InputError("The two results share no (pair, direction, layer, component, head, position) rows.")
    import pandas as pd

    rows = []
    groups = [("all", "all", merged)] + [
        (c, d, g) for (c, d), g in merged.groupby(["component", "direction"])
    ]
    for c, d, g in groups:
        ok = g[["recovery_a", "recovery_b"]].dropna()
        r = float(np.corrcoef(ok.recovery_a, ok.recovery_b)[0, 1]) if len(ok) > 2 else math.nan
        rows.append({"component": c, "direction": d, "n": len(ok), "pearson_r": r})
    return pd.DataFrame(rows)


def _keyed(r: RecoveryStats):
    import pandas as pd

    return pd.DataFrame(
        {
            "pair": r.pair.numpy(),
            "direction": [r.directions[i] for i in r.direction.tolist()],
            "layer": r.layer.numpy(),
            "component": [r.components[i] for i in r.component.tolist()],
            "head": r.head.numpy(),
            "position": r.position.numpy(),
            "recovery": r.recovery.numpy(),
        }
    )
