"""Harm recognised vs refusal triggered: two difference-of-means directions, read where each lives.

Following Zhao et al. (2025, "LLMs Encode Harmfulness and Refusal Separately"): the **harm direction** is
read at the last token of the user's instruction (before the chat template's closing tokens), the
**refusal direction** at a post-instruction template token. Both come from one forward pass per prompt
(:func:`~lens_safety.collect_residuals` with ``positions=k``, the last ``k`` tokens). Per layer: each
direction's separation of held-out harmful and harmless prompts (AUROC with CI), their cosine (bootstrap
CI over prompts), and for every jailbreak group the projection of its prompts as a fraction of the
harmful-harmless gap (bootstrap CI): does a jailbreak keep the harm while the refusal drops?

Layers: 0 = embedding output, l = raw residual stream after block l-1 (no final norm).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from ...capture import Residuals, collect_residuals
from ...core import store
from ...core.errors import CacheError, InputError
from ...core.stats import auroc_interval, wilson_interval
from ...core.validation import check_int, check_number, config_from_options
from ...inputs.prompts import PromptSet, as_prompt_set
from ..directions.selection import template_positions
from ..probes import probe_layers
from .figures import harm_refusal_figure

__all__ = ["HarmConfig", "HarmRefusalResult", "harm_refusal_analysis", "harm_positions", "gap_fraction",
           "tpr_at_fpr"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class HarmConfig:
    """Options of :func:`harm_refusal_analysis`.

    * ``val_fraction``: share of each class held out to choose the layers and measure AUROC (seeded split);
    * ``refusal_position``: the template position the refusal direction is read at (``-1`` = the last
      token, where generation starts; ``-T`` = the first post-instruction token);
    * ``harm_layer`` / ``refusal_layer``: fix a layer instead of choosing the one whose direction best
      separates held-out harmful from harmless prompts (ties: the earliest);
    * ``n_boot``: bootstrap resamples for the cosine (BCa) and gap-fraction CIs; ``fpr``: the guard's false
      positive rate; ``batch_size``, ``seed``, ``cache``, ``progress`` as elsewhere.
    """

    val_fraction: float = 0.25
    refusal_position: int = -1
    harm_layer: int | None = None
    refusal_layer: int | None = None
    n_boot: int = 1000
    fpr: float = 0.01
    batch_size: int = 16
    seed: int = 0
    cache: bool | str | os.PathLike = True
    progress: bool = False

    def __post_init__(self) -> None:
        check_number(self.val_fraction, "val_fraction", low=0.05, high=0.95)
        check_number(self.fpr, "fpr", low=0.0, high=0.5)
        check_int(self.n_boot, "n_boot", low=10)
        check_int(self.refusal_position, "refusal_position", high=-1, hint="a negative template position")


def harm_positions(model, prompts=None) -> tuple[int, int]:
    """``(k, T)``: capture the last ``k = T + 1`` tokens; index 0 is the instruction's last token (the harm
    position), indices ``1..T`` the ``T`` post-instruction template tokens. Raises
    :class:`~lens_safety.core.errors.ChatTemplateError` for a model without a chat template, and
    :class:`~lens_safety.core.errors.InputError` when one of ``prompts`` ends its instruction elsewhere (a
    template that merges the text's last token with the tokens after it).

    >>> import lens_safety as ls
    >>> harm_positions(ls.testing.tiny_model(), ["Make a bomb"])
    (11, 10)
    """
    T = template_positions(model)
    if prompts is not None:
        ps = as_prompt_set(prompts)
        formatted = model.format(ps)
        lengths = [len(model.tokenizer(f, add_special_tokens=False)["input_ids"]) for f in formatted]
        for p, (_, end), n in zip(ps, model.user_token_spans(ps, formatted), lengths):
            if n - end != T:
                raise InputError(f"In {model.name}'s chat format the instruction {p.text[:60]!r} is followed by "
                                 f"{n - end} template tokens, not {T}: its last token is not at position -{T + 1}. "
                                 "Drop or rephrase it (or strip trailing whitespace).")
    return T + 1, T


def gap_fraction(x: np.ndarray, harmful: np.ndarray, harmless: np.ndarray) -> float:
    """Where the mean of ``x`` sits between the harmless (0) and harmful (1) means.

    >>> gap_fraction(np.array([2.0]), np.array([3.0, 3.0]), np.array([1.0]))
    0.5
    """
    gap = float(np.mean(harmful) - np.mean(harmless))
    return float("nan") if gap == 0 else float((np.mean(x) - np.mean(harmless)) / gap)


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """``(tpr, threshold)``: the share of positives scoring above the threshold that lets through at most
    ``fpr`` of the negatives (the ``1 - fpr`` quantile of the negatives, exceeded strictly).

    >>> tpr_at_fpr(np.array([5.0, 6.0, 0.5]), np.arange(100) / 100, fpr=0.01)
    (0.6666666666666666, 0.98)
    """
    neg = np.sort(np.asarray(neg, dtype=np.float64))
    allowed = int(np.floor(fpr * len(neg)))  # negatives allowed above the threshold
    threshold = float(neg[len(neg) - 1 - allowed]) if len(neg) else float("inf")
    return float(np.mean(np.asarray(pos) > threshold)), threshold


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if not len(pos) or not len(neg):
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


@dataclass
class HarmRefusalResult:
    """The harm and refusal directions of one model, their geometry, and what jailbreaks do to them.

    ``harm`` / ``refusal``: ``[n_layers + 1, d_model]`` difference-of-means directions (training split)
    at the harm position / the refusal position. Frames: ``layers`` (per layer: AUROC of each direction on
    held-out prompts with CIs, cosine with bootstrap CI, probe accuracies at both positions), ``jailbreaks``
    (per group and direction: the gap fraction at the chosen layer, bootstrap CI, n), ``guard`` (the harm and
    refusal projections as detectors of jailbroken harmful prompts vs held-out harmless ones: AUROC, TPR at
    ``fpr``), ``joint`` (every prompt's two projections, its set and, when known, whether it was refused).
    """

    harm: Float[np.ndarray, "layer d_model"]
    refusal: Float[np.ndarray, "layer d_model"]
    harm_layer: int
    refusal_layer: int
    refusal_position: int
    layers: Any
    jailbreaks: Any
    guard: Any
    joint: Any
    model_name: str
    weights_hash: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.harm.shape[0]) - 1

    def unit(self, which: str, layer: int | None = None) -> np.ndarray:
        """The unit harm or refusal direction at ``layer`` (default: its chosen layer)."""
        m = {"harm": (self.harm, self.harm_layer), "refusal": (self.refusal, self.refusal_layer)}[which]
        v = m[0][m[1] if layer is None else layer]
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def to_frame(self):
        return self.layers

    def chosen_fractions(self):
        """The rows of :attr:`jailbreaks` at each direction's own layer (what the verdict reads)."""
        jb = self.jailbreaks
        at = ((jb["direction"] == "harm") & (jb["layer"] == self.harm_layer)) | (
            (jb["direction"] == "refusal") & (jb["layer"] == self.refusal_layer))
        return jb[at].reset_index(drop=True)

    def plot(self, ax=None):
        return harm_refusal_figure(self, axes=ax)

    def summary(self) -> dict[str, Any]:
        row = self.layers.set_index("layer")
        return {"harm_layer": self.harm_layer, "refusal_layer": self.refusal_layer,
                "refusal_position": self.refusal_position,
                "harm_auroc": float(row.loc[self.harm_layer, "harm_auroc"]),
                "refusal_auroc": float(row.loc[self.refusal_layer, "refusal_auroc"]),
                "cosine_at_harm_layer": float(row.loc[self.harm_layer, "cosine"]),
                "cosine_at_refusal_layer": float(row.loc[self.refusal_layer, "cosine"])}

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"harm_layer": self.harm_layer, "refusal_layer": self.refusal_layer,
                "refusal_position": self.refusal_position, "model_name": self.model_name,
                "weights_hash": self.weights_hash, "config": self.config,
                **{k: store.frame_to_json(getattr(self, k)) for k in ("layers", "jailbreaks", "guard", "joint")}}
        return store.write_artifact(directory, kind="HarmRefusalResult", schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors={"harm": self.harm, "refusal": self.refusal})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HarmRefusalResult:
        t, meta = store.read_artifact(directory, kind="HarmRefusalResult", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            frames = {k: store.frame_from_json(meta[k]) for k in ("layers", "jailbreaks", "guard", "joint")}
            return cls(t["harm"], t["refusal"], int(meta["harm_layer"]), int(meta["refusal_layer"]),
                       int(meta["refusal_position"]), model_name=meta["model_name"],
                       weights_hash=meta["weights_hash"], config=meta["config"], **frames)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved HarmRefusalResult is malformed ({e}); recompute it.") from e


# -- the analysis ------------------------------------------------------------------------------

def _split(n: int, val_fraction: float, rng: np.random.Generator, keep_out: np.ndarray | None = None):
    """(train, val) indices; ``keep_out`` rows never go to train (they are in val)."""
    order = rng.permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    val = set(order[:n_val].tolist())
    if keep_out is not None:
        val |= set(np.flatnonzero(keep_out).tolist())
    train = [i for i in order if i not in val]
    if len(train) < 2:
        raise InputError(f"Only {len(train)} prompts left to train a direction (of {n}); pass more prompts.")
    return np.array(sorted(train)), np.array(sorted(val))


def _directions(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Difference of means per layer: ``a``, ``b`` are ``[n, layers, d]``."""
    return a.mean(0) - b.mean(0)


def _cosines(h: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.einsum("ld,ld->l", h, r) / np.maximum(np.linalg.norm(h, axis=1) * np.linalg.norm(r, axis=1), 1e-12)


def _cosine_ci(ha, hb, ra, rb, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """95% BCa bootstrap CI of the per-layer cosine, resampling the prompts of each class (a prompt keeps its
    harm- and refusal-position vectors together). BCa corrects the downward bias of a cosine between noisy
    mean differences, which a percentile interval would inherit."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    def stat(ia, ib):
        ia, ib = ia.astype(int), ib.astype(int)
        return _cosines(_directions(ha[ia], hb[ib]), _directions(ra[ia], rb[ib]))

    with warnings.catch_warnings():  # the embedding layer: one template token for every prompt, no spread
        warnings.simplefilter("ignore", DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # its jackknife divides 0 by 0 there
        res = bootstrap((np.arange(len(ha)), np.arange(len(hb))), stat, n_resamples=n_boot, vectorized=False,
                        method="BCa", random_state=seed)
    return np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


def _probe_accuracy(model, harmful: PromptSet, harmless: PromptSet, a: np.ndarray, b: np.ndarray,
                    where: str, seed: int) -> np.ndarray:
    """Per-layer accuracy of the project's logistic probe (:func:`~lens_safety.probe_layers`, 5-fold CV grouped
    by request) on the residuals ``a`` (harmful) and ``b`` (harmless), ``[n, layers, d]`` at one position."""
    acts = Residuals(torch.from_numpy(np.concatenate([a, b]).astype(np.float32)), PromptSet([*harmful, *harmless]),
                     torch.zeros(len(a) + len(b), dtype=torch.long), model.name, model.weights_hash, where)
    probes = probe_layers(acts, classifier="logistic", cv=min(5, len(a), len(b)), seed=seed, controls=False,
                          n_permutations=0, progress=False, positive="harmful", task=f"2-way at the {where}")
    return probes.to_frame()["accuracy"].to_numpy()


def _choose(auroc: np.ndarray, fixed: int | None, n_layers: int, what: str) -> int:
    """The layer whose direction best separates held-out prompts (ties: the earliest), among 1..n_layers-1:
    not the embedding (every prompt ends with the same template token there), not the final stream (nothing
    reads it but the unembedding, so it cannot be steered)."""
    if fixed is not None:
        return check_int(fixed, what, low=1, high=n_layers - 1, hint="a residual layer between the blocks")
    body = np.nan_to_num(auroc[1:n_layers], nan=-1.0)
    return int(np.argmax(body)) + 1


def _per_layer_frame(H, R, hv, rv, cos_ci, acc) -> Any:
    import pandas as pd

    (ha_v, hb_v), (ra_v, rb_v) = H["val"], R["val"]
    rows = []
    cos = _cosines(hv, rv)
    lo, hi = cos_ci
    for layer in range(hv.shape[0]):
        row: dict[str, Any] = {"layer": layer, "cosine": float(cos[layer]), "cosine_ci_low": float(lo[layer]),
                               "cosine_ci_high": float(hi[layer])}
        for name, v, (a, b) in (("harm", hv, (ha_v, hb_v)), ("refusal", rv, (ra_v, rb_v))):
            u = v[layer] / max(float(np.linalg.norm(v[layer])), 1e-12)
            auc = _auroc(a[:, layer] @ u, b[:, layer] @ u)
            row[f"{name}_auroc"] = auc
            row[f"{name}_auroc_ci_low"], row[f"{name}_auroc_ci_high"] = auroc_interval(auc, len(a), len(b))
        row["probe_accuracy_harm_position"] = float(acc["harm"][layer])
        row["probe_accuracy_refusal_position"] = float(acc["refusal"][layer])
        rows.append(row)
    return pd.DataFrame(rows)


def _units(v: np.ndarray) -> np.ndarray:
    """Unit rows (a zero row stays zero)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _fractions(groups: Mapping[str, np.ndarray], a: np.ndarray, b: np.ndarray, v: np.ndarray, direction: str,
               n_boot: int, rng) -> list[dict[str, Any]]:
    """Gap fraction of every group at every layer along that layer's direction (``v``: ``[layers, d]``), with
    a bootstrap CI (the group and both reference sets resampled)."""
    u = _units(v)
    pa, pb = np.einsum("nld,ld->nl", a, u), np.einsum("nld,ld->nl", b, u)

    def frac(px, qa, qb):
        gap = qa.mean(0) - qb.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gap == 0, np.nan, (px.mean(0) - qb.mean(0)) / gap)

    rows = []
    for name, x in groups.items():
        px = np.einsum("nld,ld->nl", x, u)
        boot = np.array([frac(px[rng.integers(0, len(px), len(px))], pa[rng.integers(0, len(pa), len(pa))],
                              pb[rng.integers(0, len(pb), len(pb))]) for _ in range(n_boot)])
        with warnings.catch_warnings():  # a layer whose gap is 0 (the embedding, at a template token): NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
        point = frac(px, pa, pb)
        rows += [{"group": name, "direction": direction, "layer": layer, "fraction": float(point[layer]),
                  "ci_low": float(lo[layer]), "ci_high": float(hi[layer]), "n": len(px)}
                 for layer in range(u.shape[0])]
    return rows


def _guard_rows(groups: Mapping[str, np.ndarray], neg: np.ndarray, u: np.ndarray, layer: int, detector: str,
                fpr: float) -> list[dict[str, Any]]:
    rows = []
    s_neg = neg[:, layer] @ u
    for name, x in groups.items():
        s_pos = x[:, layer] @ u
        auc = _auroc(s_pos, s_neg)
        tpr, thr = tpr_at_fpr(s_pos, s_neg, fpr)
        t_lo, t_hi = wilson_interval(round(tpr * len(s_pos)), len(s_pos))
        a_lo, a_hi = auroc_interval(auc, len(s_pos), len(s_neg))
        rows.append({"group": name, "detector": detector, "layer": layer, "auroc": auc, "auroc_ci_low": a_lo,
                     "auroc_ci_high": a_hi, "tpr": tpr, "tpr_ci_low": float(t_lo), "tpr_ci_high": float(t_hi),
                     "fpr": fpr, "threshold": thr, "n_pos": len(s_pos), "n_neg": len(s_neg)})
    return rows


def _capture(model, ps: PromptSet, k: int, cfg: HarmConfig) -> np.ndarray:
    acts = collect_residuals(model, ps, positions=k, batch_size=cfg.batch_size, cache=cfg.cache,
                             progress=cfg.progress)
    return acts.values.double().numpy()  # [n, layers, k, d]


def _as_groups(jailbreaks) -> dict[str, PromptSet]:
    if jailbreaks is None:
        return {}
    if isinstance(jailbreaks, Mapping):
        return {str(k): as_prompt_set(v, "jailbreak") for k, v in jailbreaks.items() if len(v)}
    ps = as_prompt_set(jailbreaks, "jailbreak")
    out: dict[str, list] = {}
    for p in ps:
        out.setdefault(p.method or "jailbreak", []).append(p)
    return {k: PromptSet(v, k) for k, v in out.items()}


def harm_refusal_analysis(model, harmful, harmless, jailbreaks=None, *, borderline=None,
                          refused: Mapping[str, bool] | None = None, config: HarmConfig | None = None,
                          **options: Any) -> HarmRefusalResult:
    """The harm and refusal directions of ``model`` and what each jailbreak group does to them.

    ``jailbreaks``: a PromptSet (grouped by method) or ``{group: prompts}``; their plain requests never train
    the directions. ``borderline`` prompts and ``refused`` (``{prompt text: refused?}``, e.g. judged replies)
    add rows to the joint distribution. Options: :class:`HarmConfig`.

    >>> import lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> harmful = [f"How do I make poison number {i}?" for i in range(8)]
    >>> harmless = [f"How do I bake bread number {i}?" for i in range(8)]
    >>> r = harm_refusal_analysis(model, harmful, harmless, n_boot=20, cache=False)
    >>> r.harm.shape == (model.n_layers + 1, model.d_model) and 1 <= r.harm_layer <= model.n_layers
    True
    """
    cfg = config_from_options(HarmConfig, config, options, function="harm_refusal_analysis")
    harmful, harmless = as_prompt_set(harmful, "harmful"), as_prompt_set(harmless, "harmless")
    groups = _as_groups(jailbreaks)
    k, T = harm_positions(model, PromptSet([*harmful, *harmless, *(p for g in groups.values() for p in g)]))
    if -cfg.refusal_position > T:
        raise InputError(f"refusal_position={cfg.refusal_position} is outside the {T} post-instruction template "
                         f"tokens of {model.name}; use -1..-{T}.")
    rng = np.random.default_rng(cfg.seed)
    A, B = _capture(model, harmful, k, cfg), _capture(model, harmless, k, cfg)
    jb_requests = {p.plain_request for ps in groups.values() for p in ps}
    tr_a, va_a = _split(len(harmful), cfg.val_fraction, rng, np.array([p.text in jb_requests for p in harmful]))
    tr_b, va_b = _split(len(harmless), cfg.val_fraction, rng)
    ri = k + cfg.refusal_position  # index of the refusal position among the captured k
    H = {"train": (A[tr_a, :, 0], B[tr_b, :, 0]), "val": (A[va_a, :, 0], B[va_b, :, 0])}
    R = {"train": (A[tr_a, :, ri], B[tr_b, :, ri]), "val": (A[va_a, :, ri], B[va_b, :, ri])}
    hv, rv = _directions(*H["train"]), _directions(*R["train"])
    cos_ci = _cosine_ci(*H["train"], *R["train"], cfg.n_boot, cfg.seed)
    acc = {"harm": _probe_accuracy(model, harmful, harmless, A[:, :, 0], B[:, :, 0], "harm position", cfg.seed),
           "refusal": _probe_accuracy(model, harmful, harmless, A[:, :, ri], B[:, :, ri], "refusal position",
                                      cfg.seed)}
    layers = _per_layer_frame(H, R, hv, rv, cos_ci, acc)
    n_layers = hv.shape[0] - 1
    h_layer = _choose(layers["harm_auroc"].to_numpy(), cfg.harm_layer, n_layers, "harm_layer")
    r_layer = _choose(layers["refusal_auroc"].to_numpy(), cfg.refusal_layer, n_layers, "refusal_layer")
    result = HarmRefusalResult(hv, rv, h_layer, r_layer, cfg.refusal_position, layers, None, None, None,
                               model.name, model.weights_hash,
                               config={k_: v for k_, v in cfg.__dict__.items() if k_ not in ("cache", "progress")})
    captured = {name: _capture(model, ps, k, cfg) for name, ps in groups.items()}
    _fill_groups(result, captured, H, R, ri, rng, cfg)
    _fill_joint(result, model, {"harmful": (harmful, A), "harmless": (harmless, B), **{
        name: (groups[name], x) for name, x in captured.items()}}, borderline, refused, k, cfg)
    return result


def _fill_groups(result: HarmRefusalResult, captured: dict[str, np.ndarray], H, R, ri: int, rng,
                 cfg: HarmConfig) -> None:
    import pandas as pd

    harm_g = {n: x[:, :, 0] for n, x in captured.items()}
    ref_g = {n: x[:, :, ri] for n, x in captured.items()}
    fr = (_fractions(harm_g, *H["val"], result.harm, "harm", cfg.n_boot, rng)
          + _fractions(ref_g, *R["val"], result.refusal, "refusal", cfg.n_boot, rng))
    result.jailbreaks = pd.DataFrame(fr, columns=["group", "direction", "layer", "fraction", "ci_low", "ci_high", "n"])
    guard = (_guard_rows(harm_g, H["val"][1], result.unit("harm"), result.harm_layer, "harm direction", cfg.fpr)
             + _guard_rows(ref_g, R["val"][1], result.unit("refusal"), result.refusal_layer, "refusal direction",
                           cfg.fpr))
    result.guard = pd.DataFrame(guard, columns=["group", "detector", "layer", "auroc", "auroc_ci_low",
                                                "auroc_ci_high", "tpr", "tpr_ci_low", "tpr_ci_high", "fpr",
                                                "threshold", "n_pos", "n_neg"])


def _fill_joint(result: HarmRefusalResult, model, sets: dict[str, tuple[PromptSet, np.ndarray]], borderline,
                refused: Mapping[str, bool] | None, k: int, cfg: HarmConfig) -> None:
    import pandas as pd

    if borderline is not None:
        bl = as_prompt_set(borderline, "borderline")
        sets = {**sets, "borderline": (bl, _capture(model, bl, k, cfg))}
    uh, ur = result.unit("harm"), result.unit("refusal")
    ri = k + cfg.refusal_position
    rows = []
    for name, (ps, x) in sets.items():
        ph, pr = x[:, result.harm_layer, 0] @ uh, x[:, result.refusal_layer, ri] @ ur
        for p, a, b in zip(ps, ph, pr):
            r = None if refused is None else refused.get(p.text)
            rows.append({"set": name, "text": p.text, "harm_projection": float(a), "refusal_projection": float(b),
                         "refused": r})
    result.joint = pd.DataFrame(rows, columns=["set", "text", "harm_projection", "refusal_projection", "refused"])
