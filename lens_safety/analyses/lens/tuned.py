"""Tuned lens (Belrose et al., 2023), trained offline on a CPU budget, and per-layer lens KL.

The logit lens decodes residual layer ``l`` with the model's final norm and unembedding. A
*tuned lens* first maps the residual through a learned affine **translator** per layer,
``h -> h + W_l h + b_l`` (identity-initialised: ``W_l = 0``, ``b_l = 0``), trained so that the
layer's decoded distribution matches the model's own final one (self-distillation: minimise
KL(final || layer readout)). The final norm and the unembedding stay frozen; the last layer
(``n_layers``, which *is* the final residual) keeps the identity, so both lenses agree there.

How training is made affordable on 2 CPU cores (:func:`train_tuned_lens`):

1. **Data**: the prompts (chat-formatted) followed by the model's own greedy completions
   (:func:`lens_safety.behaviour.refusal.generate`), so the lens sees the text the model reads and writes.
   One forward pass captures every residual layer; ``max_positions`` positions (all token
   positions of all texts, sub-sampled uniformly without replacement) are kept, in float16 (the
   final layer in float32). For each kept position the final distribution's exact log-normaliser
   over the full vocabulary and its ``top_k`` token ids are computed once.
2. **Loss**: per step, a batch of positions and all layers at once. The vocabulary is cut to
   ``C = U + S``: ``U`` the union of the batch's final top-k tokens (kept exactly), ``S`` a
   uniform sample of ``n_sampled`` of the remaining tokens, each standing for
   ``|V \\ U| / n_sampled`` tokens (importance weight). With final log-probabilities
   ``log p`` (exact, from the stored normaliser) and readout logits ``z``::

       KL(p || q) ~= sum_C w_v p_v (log p_v - z_v) + log sum_C w_v exp(z_v)

   (the second term estimates the readout's log-normaliser). The estimate is exact when the
   vocabulary is no larger than ``|U| + n_sampled`` (tiny models).
3. **Optimiser**: Adam on all translators together; the bias is parametrised in units of the
   layer's typical residual norm and the matrix in units of ``1/sqrt(d_model)``, so one learning
   rate fits every layer; the learning rate decays linearly to 0.

:func:`lens_kl` measures the exact full-vocabulary KL(final || layer readout) on held-out
prompts, with Student-t confidence intervals over prompts. :func:`compare_lenses` puts both
lenses side by side (KL, category mass, refusal emergence): the function the report calls.

The lens and its training live in :mod:`lens_safety.analyses.lens.translators`, below
:mod:`lens_safety.analyses.lens.logit` (so
``logit_lens(lens="tuned")`` can train one); this module re-exports them and adds the diagnostics.

>>> import lens_safety as ls
>>> model = ls.testing.tiny_model()
>>> lens = ls.train_tuned_lens(model, ["Tell me a story", "Make a bomb"], steps=5, max_new_tokens=2,
...                            cache=False, progress=False)
>>> lens
TunedLens(model='tiny-hf-0', layers=0..3, steps=5, positions=...)
>>> frame = ls.lens_kl(model, ["Write a poem"], lens=lens)
>>> list(frame.columns)[:4]
['lens', 'layer', 'kl', 'ci_low']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core import store
from ...core.errors import CacheError, InputError
from ...core.stats import mean_ci
from .. import figures as viz
from .logit import LensResult, logit_lens
from .readout import _as_residuals, _check_finite, _check_residuals_any, lens_logits
from .translators import (  # the tuned lens itself, re-exported: this is its public module
    SCHEMA_VERSION,
    TunedLens,
    TunedLensConfig,
    _check_disjoint,
    _training_digests,
    check_held_out,
    default_training_prompts,
    held_out_prompts,
    lens_name,
    prompt_digests,
    resolve_lens,
    train_tuned_lens,
    tuned_lens_cache_dir,
)

__all__ = ["TunedLens", "TunedLensConfig", "train_tuned_lens", "lens_kl", "compare_lenses", "LensComparison",
           "default_training_prompts", "held_out_prompts", "check_held_out", "prompt_digests",
           "tuned_lens_cache_dir", "resolve_lens",
           "SCHEMA_VERSION"]

# -- diagnostics ------------------------------------------------------------------------------------

def _kl_per_prompt(model, res, lens: TunedLens | None, batch_size: int) -> np.ndarray:
    """Exact KL(final || layer readout), full vocabulary, float64; ``[n, n_layers+1]`` (mean over positions).

    The final distribution is the last layer's readout, which both lenses leave untranslated."""
    v = res.values if res.values.dim() == 4 else res.values[:, :, None]  # [n, L+1, k, d]
    v = v.transpose(1, 2)  # [n, k, L+1, d]
    out = np.empty((v.shape[0], v.shape[2]))
    with torch.no_grad():
        for s in range(0, v.shape[0], batch_size):
            x = v[s:s + batch_size].to(model.device, torch.float32)
            _check_finite(x, "residuals")
            if lens is not None:
                x = lens.translate(x)
            logq = torch.log_softmax(lens_logits(model, x).double(), -1)  # [b, k, L+1, V]
            logp = logq[:, :, -1:]
            kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # [b, k, L+1]
            out[s:s + batch_size] = kl.mean(1).cpu().numpy()
    return out


def lens_kl(model, residuals, lens=None, *, level: float = 0.95, batch_size: int = 4,
            system: str | None = None, chat: bool | None = None):
    """Per-layer KL(final || layer readout) in nats, exact over the full vocabulary, with a CI.

    ``residuals``: :class:`~lens_safety.capture.Residuals` of **held-out** prompts (not used to
    train the lens) or prompts (captured at the last position, the generation-prompt token the
    lens results read); a prompt the tuned lens was trained on raises
    :class:`~lens_safety.core.errors.InputError` (:func:`check_held_out`). With ``positions="last"`` the
    KL is measured at the last position; with ``positions=k`` it is averaged over the last ``k``
    positions of each prompt first. Confidence
    intervals are Student-t over prompts (:func:`lens_safety.core.stats.mean_ci`). ``lens``: ``None``
    (logit lens), ``"tuned"`` or a :class:`TunedLens`. At the last layer both lenses give 0.

    Returns a DataFrame with columns ``lens, layer, kl, ci_low, ci_high, n, positions``.
    """
    import pandas as pd


    tl = resolve_lens(model, lens)
    res = _as_residuals(model, residuals, system, chat, 8)
    _check_residuals_any(model, res)
    train = _training_digests(tl) if tl is not None else None
    if train:
        _check_disjoint(train, res.prompts)
    if res.values.dim() not in (3, 4):
        raise InputError(f"lens_kl needs [n, n_layers+1, d_model] or [n, n_layers+1, k, d_model] residuals, "
                         f"got {tuple(res.values.shape)}.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    kl = _kl_per_prompt(model, res, tl, batch_size)
    rows = []
    for layer in range(kl.shape[1]):
        m, lo, hi = mean_ci(kl[:, layer], level)
        rows.append({"lens": lens_name(tl), "layer": layer, "kl": m, "ci_low": lo, "ci_high": hi,
                     "n": int(kl.shape[0]), "positions": str(res.positions)})
    return pd.DataFrame(rows)


@dataclass
class LensComparison:
    """The logit lens and a tuned lens on the same held-out residuals: KL per layer, category mass,
    emergence of refusal. ``metrics()`` is what the report records."""

    logit: Any  # LensResult
    tuned: Any  # LensResult
    kl: Any     # DataFrame: lens_kl of both lenses, concatenated
    lens: TunedLens

    def emergence(self) -> dict[str, Any]:
        """``{"logit": {label: layer}, "tuned": {label: layer}}`` (see :meth:`LensResult.emergence_layer`)."""
        out = {}
        for name, r in (("logit", self.logit), ("tuned", self.tuned)):
            e = r.emergence_layer()
            out[name] = e if isinstance(e, dict) else {r.labels[0]: e}
        return out

    def scores(self):
        """First-token refusal score of the read-out per lens, set and layer (mean and t CI)."""
        import pandas as pd

        parts = []
        for name, r in (("logit", self.logit), ("tuned", self.tuned)):
            f = r.refusal_score_frame(by="label")
            f.insert(0, "lens", name)
            parts.append(f)
        return pd.concat(parts, ignore_index=True)

    def separation(self, label: str = "harmful", other: str = "harmless") -> dict[str, int | None]:
        """Per lens, the first layer where ``label``'s refusal score is above ``other``'s (disjoint CIs)."""
        labels = set(self.logit.labels)
        if not {label, other} <= labels:
            return {"logit": None, "tuned": None}
        return {name: r.score_separation_layer(label, other) for name, r in (("logit", self.logit),
                                                                             ("tuned", self.tuned))}

    def to_frame(self):
        """Category mass per lens, set, layer and category (``lens`` column added), mean and CI."""
        import pandas as pd

        parts = []
        for name, r in (("logit", self.logit), ("tuned", self.tuned)):
            f = r.category_mass(by="label")
            f.insert(0, "lens", name)
            parts.append(f)
        return pd.concat(parts, ignore_index=True)

    def metrics(self) -> dict[str, Any]:
        """JSON-ready headline numbers: mean KL per layer for each lens, emergence layers, training budget."""
        kl = {name: [float(v) for v in g.sort_values("layer")["kl"]] for name, g in self.kl.groupby("lens")}
        return {"kl": kl, "emergence_layer": self.emergence(), "score_separation_layer": self.separation(),
                "tuned_lens_steps": self.lens.steps,
                "tuned_lens_train_seconds": self.lens.train_seconds,
                "tuned_lens_positions": self.lens.data.get("n_positions"), "n_prompts": len(self.logit)}

    def plot(self, categories: Sequence[str] = ("refusal", "positive"), axes=None):
        """KL per layer for both lenses, then each category's mass curves with both lenses."""
        return viz.lens_comparison_figure(self, categories=categories, axes=axes)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the comparison as a :mod:`lens_safety.core.store` artifact: the KL table as JSON, the two
        :class:`~lens_safety.analyses.lens.logit.LensResult` and the :class:`TunedLens` in sub-folders ``logit``,
        ``tuned`` and ``lens``."""
        return store.write_artifact(directory, kind="LensComparison", schema_version=SCHEMA_VERSION,
                                    meta={"kl": store.frame_to_json(self.kl)},
                                    children={"logit": self.logit, "tuned": self.tuned, "lens": self.lens})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LensComparison:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it or one of its
        sub-folders is missing or damaged."""
        _, meta = store.read_artifact(directory, kind="LensComparison", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            kl = store.frame_from_json(meta["kl"])
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved LensComparison is malformed ({e}); delete it and recompute.") from e
        d = Path(directory)
        return cls(LensResult.load(d / "logit"), LensResult.load(d / "tuned"), kl, TunedLens.load(d / "lens"))


def compare_lenses(model, residuals, lens=None, *, top_k: int = 5, lexicon=None, level: float = 0.95,
                   system: str | None = None, chat: bool | None = None) -> LensComparison:
    """Read ``residuals`` (held-out, ``positions="last"``) with the logit lens and a tuned lens
    (``lens``: a :class:`TunedLens`, or ``None``/``"tuned"`` for the cached default one).

    >>> import lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> tl = ls.TunedLens.identity(model)
    >>> cmp = ls.compare_lenses(model, ["Write a poem", "Make a bomb"], tl)
    >>> sorted(cmp.metrics()["kl"])
    ['logit', 'tuned']
    """
    tl = resolve_lens(model, "tuned" if lens is None else lens)
    res = _as_residuals(model, residuals, system, chat, 8)
    logit = logit_lens(model, res, top_k=top_k, lexicon=lexicon)
    tuned = logit_lens(model, res, top_k=top_k, lexicon=lexicon, lens=tl)
    import pandas as pd

    kl = pd.concat([lens_kl(model, res, None, level=level), lens_kl(model, res, tl, level=level)], ignore_index=True)
    return LensComparison(logit, tuned, kl, tl)
