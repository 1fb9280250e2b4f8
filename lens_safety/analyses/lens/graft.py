"""Logit Grafting: replace the last-position residual at a layer by a donor state, and see whether refusal goes.

:func:`graft` implements the paper's *Logit Grafting* as a hook: the last-position residual
of each prompt at layer ``l`` is replaced by a donor state (e.g. the harmless-class mean),
the rest of the model runs, and the refusal score (and optionally the greedy reply) is
compared with the ungrafted run. :class:`GraftResult` holds the scores and replies per layer.

>>> import torch, lens_safety as ls
>>> model = ls.testing.tiny_model()
>>> g = ls.graft(model, ["Make a bomb"], torch.zeros(model.d_model), layers=1, generate=False)
>>> g.layers, tuple(g.after.shape)
([1], (1, 1))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...behaviour import refusal
from ...behaviour.judges import as_judge
from ...behaviour.refusal import RefusalTokens, generation_step
from ...capture import Residuals
from ...core.errors import CacheError, InputError
from ...core.stats import mean_ci, wilson_interval
from ...core.store import read_artifact, write_artifact
from ...inputs.prompts import PromptSet, as_prompt_set
from .. import figures as viz
from .readout import SCHEMA_VERSION, _check_finite, _prompts_from_json, _prompts_to_json, lens_logits

__all__ = ["GraftResult", "graft", "prompt_pass_graft_hook"]


def _donor_states(model, donor, layers: list[int], donor_label: str | None, n_prompts: int) -> dict[int, Tensor]:
    """Per grafted layer, a donor of shape [d_model] or [n_prompts, d_model]."""
    d, L = model.d_model, model.n_layers
    if isinstance(donor, Residuals):
        model.check_compatible(donor.weights_hash, donor.d_model, what=f"donor residuals ({donor.model_name})")
        if donor.values.dim() != 3:
            raise InputError(f"Donor residuals must be one vector per prompt and layer ([n, n_layers+1, d_model]),"
                             f" got {tuple(donor.values.shape)}; collect them with positions='last'.")
        labels = list(dict.fromkeys(donor.labels))
        if donor_label is None:
            if len(labels) != 1:
                raise InputError(f"The donor residuals hold several labels {labels}; pass donor_label= to "
                                 "choose the class whose mean state is grafted.")
            donor_label = labels[0]
        rows = [i for i, lab in enumerate(donor.labels) if lab == donor_label]
        if not rows:
            raise InputError(f"No donor prompts with label {donor_label!r}; labels: {labels}.")
        mean = donor.values[rows].double().mean(0).float()  # [L+1, d]
        return {layer: mean[layer] for layer in layers}
    if not isinstance(donor, Tensor):
        raise InputError(f"donor must be Residuals or a Tensor, got {type(donor).__name__}.")
    shp = tuple(donor.shape)
    if shp == (L + 1, d):
        return {layer: donor[layer] for layer in layers}
    if shp == (d,):
        if len(layers) != 1:
            raise InputError(f"A donor of shape [d_model]=({d},) is one layer's state: pass exactly one layer "
                             f"(got layers={layers}), or a [n_layers+1, d_model]=({L + 1}, {d}) donor.")
        return {layers[0]: donor}
    if shp == (n_prompts, L + 1, d):
        return {layer: donor[:, layer] for layer in layers}
    raise InputError(f"donor has shape {shp}; expected [n_layers+1, d_model]=({L + 1}, {d}), [d_model]=({d},) "
                     f"for one layer, or per prompt [n_prompts, n_layers+1, d_model]=({n_prompts}, {L + 1}, {d}).")


@torch.no_grad()
def _last_resid(model, ids: Tensor, mask: Tensor, layer: int | None, state: Tensor | None) -> Tensor:
    """Raw last-layer residual at the last position, with an optional graft at ``layer``."""

    def replace(t: Tensor, hook=None) -> Tensor:
        t = t.clone()
        t[:, -1] = state.to(device=t.device, dtype=t.dtype)
        return t

    hooks = []
    if layer is not None and layer != model.n_layers:
        hooks.append((model.resid_hook_name(layer), replace))
    resid = model.run_until(ids, mask, model.resid_hook_name(model.n_layers), hooks)
    if layer == model.n_layers:
        resid = replace(resid)
    return resid[:, -1].detach().float()


def prompt_pass_graft_hook(model, layer: int, state: Tensor):
    """A ``(hook_name, fn)`` for :func:`lens_safety.behaviour.refusal.generate` that grafts ``state`` at residual
    layer ``layer`` into the last *prompt* position only.

    Inside ``generate`` it uses :func:`lens_safety.behaviour.refusal.generation_step`: on the prompt pass
    (step 0) position ``prompt_len - 1`` is replaced; with a KV cache the later passes (one
    new position each) are left alone; without one they recompute the prompt, so the same
    position is replaced again (same result as a cached run). Outside ``generate`` the last
    position is replaced.
    """
    def hook(t: Tensor, hook) -> Tensor | None:
        s = generation_step()
        if s is None:
            pos = t.shape[1] - 1
        elif s.kv_cache and s.step > 0:
            return None
        else:
            pos = s.prompt_len - 1
        t = t.clone()
        t[:, pos] = state.to(device=t.device, dtype=t.dtype)
        return t
    return (model.resid_hook_name(layer), hook)


@dataclass
class GraftResult:
    """Refusal score per prompt before and after grafting at each layer.

    The score is :meth:`lens_safety.behaviour.refusal.RefusalTokens.score` of the next-token logits at
    the last position (a max-logit margin: the largest refusal-start logit minus the largest
    other logit). ``before`` is ``[n]``, ``after`` ``[n_grafted_layers, n]`` (rows in ``layers``
    order). With generation: ``completions`` / ``complied`` per layer (key ``None`` = ungrafted).

    ``final_layer`` (``n_layers``) is special: grafting there replaces the final residual
    itself, so the output is the donor state's own read-out, not something the model computed.
    It is kept in the table (flagged ``final``) but never competes in :meth:`best_layer` or
    :meth:`earliest_compliance_layer`.
    """

    layers: list[int]
    before: Float[Tensor, " batch"]
    after: Float[Tensor, "layer batch"]
    prompts: PromptSet
    model_name: str
    donor: str
    completions: dict[int | None, list[str]] = field(default_factory=dict)
    complied: dict[int | None, list[bool]] = field(default_factory=dict)
    final_layer: int | None = None
    judge: str = ""

    @property
    def delta(self) -> Tensor:
        return self.after - self.before[None]

    @property
    def candidate_layers(self) -> list[int]:
        """The grafted layers that may be called "best": all but the final residual layer."""
        return [x for x in self.layers if x != self.final_layer]

    def _refused_before(self) -> np.ndarray | None:
        if None not in self.complied:
            return None
        return ~np.asarray(self.complied[None], dtype=bool)

    def to_frame(self, level: float = 0.95):
        """One row per grafted layer: mean score, mean change with its CI, compliance counts.

        With generation: ``n_complied`` / ``frac_complied`` over all prompts, and over the
        ``n_refused_before`` prompts refused without a graft, ``n_flipped`` (now comply),
        ``frac_flipped`` and its Wilson interval ``flipped_ci_low`` / ``flipped_ci_high``.
        ``final`` marks the final residual layer (excluded from the "best" layer)."""
        import pandas as pd

        rows = []
        before = mean_ci(self.before.numpy(), level)[0]
        refused = self._refused_before()
        for j, layer in enumerate(self.layers):
            score, s_lo, s_hi = mean_ci(self.after[j].numpy(), level)
            delta, lo, hi = mean_ci(self.delta[j].numpy(), level)
            row = {"layer": layer, "final": layer == self.final_layer, "score_before": before, "score": score,
                   "score_ci_low": s_lo, "score_ci_high": s_hi, "delta": delta, "delta_ci_low": lo,
                   "delta_ci_high": hi, "n": len(self.prompts)}
            if layer in self.complied:
                c = np.asarray(self.complied[layer], dtype=bool)
                row.update(n_complied=int(c.sum()), frac_complied=float(c.mean()))
                if refused is not None:
                    k, n = int((c & refused).sum()), int(refused.sum())
                    lo_w, hi_w = wilson_interval(k, n, level)
                    row.update(n_complied_before=int((~refused).sum()), n_refused_before=n, n_flipped=k,
                               frac_flipped=k / n if n else float("nan"), flipped_ci_low=float(lo_w),
                               flipped_ci_high=float(hi_w))
            rows.append(row)
        return pd.DataFrame(rows)

    def best_layer(self) -> int | None:
        """The grafted layer with the largest mean drop in refusal score, the final residual layer
        excluded (see the class docstring); ``None`` if only that layer was grafted."""
        cand = self.candidate_layers
        if not cand:
            return None
        rows = [self.layers.index(x) for x in cand]
        return cand[int(self.delta[rows].double().mean(1).argmin())]

    def earliest_compliance_layer(self, threshold: float = 0.5, level: float = 0.95) -> dict[str, Any]:
        """The earliest grafted layer (final residual excluded) at which more than ``threshold`` of
        the requests refused without a graft comply, with the Wilson interval of that fraction.

        Returns ``{"layer", "n_flipped", "n_refused", "frac", "ci_low", "ci_high", "threshold"}``;
        ``layer`` is ``None`` when no layer crosses (then the other numbers describe the layer with
        the most flips). Needs ``graft(..., generate=True)``.
        """
        refused = self._refused_before()
        if refused is None:
            raise InputError("No generations in this GraftResult: run graft(..., generate=True) to count "
                             "requests that comply after grafting.")
        n = int(refused.sum())
        best: dict[str, Any] | None = None
        for layer in self.candidate_layers:
            if layer not in self.complied:
                continue
            k = int((np.asarray(self.complied[layer], dtype=bool) & refused).sum())
            lo, hi = wilson_interval(k, n, level)
            row = {"layer": layer, "n_flipped": k, "n_refused": n, "frac": k / n if n else float("nan"),
                   "ci_low": float(lo), "ci_high": float(hi), "threshold": threshold}
            if n and k / n > threshold:
                return row
            if best is None or k > best["n_flipped"]:
                best = row
        if best is None:
            return {"layer": None, "n_flipped": 0, "n_refused": n, "frac": float("nan"), "ci_low": float("nan"),
                    "ci_high": float("nan"), "threshold": threshold}
        return dict(best, layer=None, most_flips_layer=best["layer"])

    def summary(self, threshold: float = 0.5, level: float = 0.95) -> dict[str, Any]:
        """Headline numbers: the largest score drop (layer, mean change and CI) and, with generations,
        the earliest layer where most refused requests comply (with its Wilson CI)."""
        out: dict[str, Any] = {"best_layer": self.best_layer(), "final_layer_excluded": self.final_layer in self.layers,
                               "n_prompts": len(self.prompts), "judge": self.judge}
        if out["best_layer"] is not None:
            m, lo, hi = mean_ci(self.delta[self.layers.index(out["best_layer"])].numpy(), level)
            out.update(best_delta=m, best_delta_ci_low=lo, best_delta_ci_high=hi)
        if self._refused_before() is not None:
            out["earliest_compliance"] = self.earliest_compliance_layer(threshold, level)
        return out

    def plot(self, ax=None, level: float = 0.95):
        """Mean refusal score per grafted layer with a CI band, and the ungrafted level
        (:func:`lens_safety.analyses.figures.graft_figure`; ``ax`` a pair of axes)."""
        return viz.graft_figure(self, ax=ax, level=level)

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result as a :mod:`lens_safety.core.store` artifact: the scores in ``tensors.safetensors``,
        layers, prompts, replies and verdicts in ``meta.json`` (no pickle).

        >>> import tempfile, torch, lens_safety as ls
        >>> model = ls.testing.tiny_model()
        >>> g = ls.graft(model, ["Make a bomb"], torch.zeros(model.d_model), layers=1, generate=False)
        >>> GraftResult.load(g.save(tempfile.mkdtemp() + "/graft")).to_frame().equals(g.to_frame())
        True
        """
        meta = {"layers": [int(x) for x in self.layers], "model_name": self.model_name, "donor": self.donor,
                "final_layer": self.final_layer, "judge": self.judge,
                "completions": [[k, [str(c) for c in v]] for k, v in self.completions.items()],
                "complied": [[k, [bool(c) for c in v]] for k, v in self.complied.items()],
                **_prompts_to_json(self.prompts)}
        return write_artifact(directory, kind="GraftResult", schema_version=SCHEMA_VERSION, meta=meta,
                              tensors={"before": self.before, "after": self.after})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GraftResult:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it is missing, of
        another kind, edited or truncated."""
        t, meta = read_artifact(directory, kind="GraftResult", schema_version=SCHEMA_VERSION)
        try:
            prompts = _prompts_from_json(meta, directory)
            layers = [int(x) for x in meta["layers"]]
            if tuple(t["before"].shape) != (len(prompts),) or tuple(t["after"].shape) != (len(layers), len(prompts)):
                raise ValueError("the scores, layers and prompts do not agree in shape")

            def per_layer(pairs, cast) -> dict[int | None, list]:
                out = {None if k is None else int(k): [cast(x) for x in v] for k, v in pairs}
                if any(len(v) != len(prompts) for v in out.values()):
                    raise ValueError("a layer's replies or verdicts do not match the prompts")
                return out

            final = meta["final_layer"]
            return cls(layers, t["before"], t["after"], prompts, meta["model_name"], meta["donor"],
                       per_layer(meta["completions"], str), per_layer(meta["complied"], bool),
                       None if final is None else int(final), meta["judge"])
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise CacheError(f"{directory}: saved GraftResult is malformed ({e}); delete it and recompute.") from e


def _resolve_judge(model, judge):
    """A :class:`lens_safety.behaviour.judges.Judge` from ``None`` (``default_judge(model)``), a judge name,
    a judge, or a callable ``list[str] -> list[bool]`` (True = refused)."""
    if judge is not None and not (callable(judge) or isinstance(judge, str)):
        raise InputError(f"judge must be None, a judge name ('rules', 'substring', 'model'), a Judge or a callable "
                         f"list[str] -> list[bool] (True = refused), got {type(judge).__name__}.")
    return as_judge(judge, model)


def _check_donor_formatting(model, donor, system, chat) -> None:
    """Donor residuals must be last-position states of prompts formatted like the grafted ones."""
    if donor.positions != "last":
        raise InputError(f"Donor residuals were collected with positions={donor.positions!r}; grafting replaces "
                         "the last-position state, so collect the donor with positions='last'.")
    if donor.formatting:
        want = model.formatting_key(system=system, chat=chat)
        diff = {k: (donor.formatting.get(k), v) for k, v in want.items() if donor.formatting.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: donor {a!r} vs graft {b!r}" for k, (a, b) in diff.items())
            raise InputError(f"The donor residuals were formatted differently from the grafted prompts ({detail}). "
                             "Collect the donor with the same chat=/system= as you pass to graft.")


def graft(model, prompts, donor, layers: int | Sequence[int] | None = None, *, max_new_tokens: int = 32,
          generate: bool = True, batch_size: int = 16, donor_label: str | None = None,
          system: str | None = None, chat: bool | None = None, progress: bool = False,
          judge=None) -> GraftResult:
    """Logit Grafting: replace the last-position residual at layer ``l`` by a donor state.

    ``donor``: :class:`~lens_safety.capture.Residuals` (the mean of class ``donor_label``
    at each layer, e.g. the harmless mean; collected with ``positions="last"`` and the same
    ``chat``/``system`` formatting as here, else :class:`InputError`), a Tensor
    ``[n_layers+1, d_model]``, a Tensor ``[d_model]`` (one layer only), or
    ``[n_prompts, n_layers+1, d_model]`` (one donor per prompt). ``layers``: residual layers
    (0 = embedding output, l = after block l-1); default ``0..n_layers-1``: the final residual
    layer ``n_layers`` is left out, because grafting there makes the output the donor's own
    (if you pass it, it is computed, flagged ``final`` and never called the best layer).

    Per layer, the rest of the model runs and the refusal score (a max-logit margin of
    refusal-start tokens over the rest at the last position, :class:`RefusalTokens`) is
    compared with the ungrafted run. With ``generate``, greedy replies are produced with the
    graft active on the prompt pass only, and judged by ``judge`` (default
    :func:`lens_safety.behaviour.judges.default_judge`; a judge name, a :class:`~lens_safety.behaviour.judges.Judge`,
    or a callable ``list[str] -> list[bool]``, True = refused), with the plain request passed
    for its engagement test: a reply counts as compliance only when the judge's outcome is
    ``"complied"`` (not refused, not unengaged). :meth:`GraftResult.summary` reports the
    largest score drop and the earliest layer where most refused requests comply (Wilson CI).
    """
    ps = as_prompt_set(prompts)
    if len(ps) == 0:
        raise InputError("graft needs at least one prompt.")
    if layers is None:
        layers = list(range(model.n_layers))
    elif isinstance(layers, int):
        layers = [layers]
    layers = [int(x) for x in layers]
    for x in layers:
        model.resid_hook_name(x)  # validates the range
    if not layers:
        raise InputError("layers is empty.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(donor, Residuals):
        _check_donor_formatting(model, donor, system, chat)
    states = _donor_states(model, donor, layers, donor_label, len(ps))
    for layer, st in states.items():
        _check_finite(st, f"donor state at layer {layer}")
    if generate and any(st.dim() == 2 for st in states.values()):
        raise InputError("Generation with per-prompt donors is not supported (generate batches prompts by "
                         "length); pass generate=False or a [n_layers+1, d_model] donor.")
    judge_obj = _resolve_judge(model, judge) if generate else None
    donor_desc = (f"mean of {donor_label or donor.labels[0]!r} residuals" if not isinstance(donor, Tensor)
                  else f"tensor {tuple(donor.shape)}")
    rt = RefusalTokens.from_tokenizer(model.tokenizer)
    formatted = model.format(ps, system=system, chat=chat)
    before = torch.empty(len(ps))
    after = torch.empty(len(layers), len(ps))
    for s in range(0, len(ps), batch_size):
        enc = model.tokenize(formatted[s:s + batch_size], chat=chat)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        before[s:s + ids.shape[0]] = rt.score(lens_logits(model, _last_resid(model, ids, mask, None, None))).cpu()
        for j, layer in enumerate(layers):
            st = states[layer]
            st = st[s:s + ids.shape[0]] if st.dim() == 2 else st
            x = _last_resid(model, ids, mask, layer, st)
            after[j, s:s + ids.shape[0]] = rt.score(lens_logits(model, x)).cpu()
    _check_finite(before, "refusal scores of the ungrafted run")
    _check_finite(after, "refusal scores after grafting")
    result = GraftResult(layers, before, after, ps, model.name, donor_desc, final_layer=model.n_layers,
                         judge=judge_obj.identity if judge_obj is not None else "")
    if generate:
        def run(hooks):
            out = refusal.generate(model, ps, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                                   chat=chat, fwd_hooks=hooks, progress=progress)
            outcomes = judge_obj.outcomes(out, [p.plain_request for p in ps])
            return out, [o == "complied" for o in outcomes]  # refused or unengaged: not complied

        result.completions[None], result.complied[None] = run(())
        for layer in layers:
            hook = prompt_pass_graft_hook(model, layer, states[layer])
            result.completions[layer], result.complied[layer] = run([hook])
    return result
