"""Choosing the refusal direction: one candidate per (template position x layer) from a train split,
scored and filtered on a validation split (:func:`select_refusal_direction`; its options are a
:class:`SelectionConfig`, its thresholds a :class:`SelectionFilters`), and the record of the choice
(:class:`DirectionSelection`)."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...behaviour.refusal import RefusalTokens, first_token_scores
from ...capture import collect_residuals
from ...core import store
from ...core.errors import CacheError, ChatTemplateError, InputError
from ...core.validation import check_int, config_from_options
from ...inputs.prompts import PromptSet, as_prompt_set
from ...model.generation import to_prompt_set
from ...model.loading import SafetyModel
from .. import figures as viz
from .direction import SCHEMA_VERSION, RefusalDirection
from .interventions import _batched_logits, _kl

__all__ = ["DirectionSelection", "SelectionConfig", "SelectionFilters", "UnknownOptionError", "candidate_directions",
           "select_refusal_direction", "split_prompts", "template_positions"]


def template_positions(model: SafetyModel, prompts: PromptSet | Sequence[str] = ("Hello",)) -> int:
    """Number of post-instruction template tokens (after the user's text) in ``model``'s chat format.

    For Qwen's ChatML it is 5: ``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``.
    Raises :class:`ChatTemplateError` for a model without a chat template (a base model has no
    post-instruction positions).

    >>> import lens_safety as ls
    >>> template_positions(ls.testing.tiny_model())  # the tiny BPE splits the same suffix into 10 tokens
    10
    """
    if not model.has_chat_template or not model.chat_default:
        raise ChatTemplateError(
            f"{model.name} has no chat template (a base model): the refusal direction is read at the "
            "post-instruction template tokens, which only a chat format has. Use an instruct/chat model.")
    ps = as_prompt_set(prompts)
    formatted = model.format(ps)
    spans = model.user_token_spans(ps, formatted)
    lengths = [len(model.tokenizer(f, add_special_tokens=False)["input_ids"]) for f in formatted]
    ks = {n - e for (s, e), n in zip(spans, lengths)}
    k = min(ks)
    if k < 1:
        raise ChatTemplateError(f"{model.name}'s chat template adds no token after the user's text.")
    return k


def candidate_directions(model: SafetyModel, harmful: PromptSet, harmless: PromptSet, n_positions: int, *,
                         batch_size: int = 16, cache: bool | str | os.PathLike = True,
                         progress: bool = False) -> tuple[Tensor, Tensor]:
    """Difference-of-means vectors ``[n_layers+1, n_positions, d_model]`` and their norm relative to
    the mean residual norm there (same shape without ``d_model``), from the last ``n_positions`` tokens.

    Position index ``j`` is template position ``j - n_positions`` (so the last index is -1).
    """
    kw = {"positions": n_positions, "batch_size": batch_size, "cache": cache, "progress": progress}
    a = collect_residuals(model, harmful, **kw).values.double()
    b = collect_residuals(model, harmless, **kw).values.double()
    diff = a.mean(0) - b.mean(0)
    resid_norm = torch.cat([a, b]).norm(dim=-1).mean(0)
    rel = diff.norm(dim=-1) / resid_norm.clamp_min(1e-12)
    return diff.float(), rel.float()


@dataclass
class DirectionSelection:
    """The candidates' scores on the validation split and the chosen :class:`RefusalDirection`.

    Grids are ``[n_positions, n_layer_candidates]`` (NaN where a candidate was not evaluated):
    ``ablation_score`` (mean first-token refusal score of harmful validation prompts with the
    candidate ablated; lower is better), ``kl`` (mean KL of the harmless next-token distribution
    under ablation), ``addition_score`` (mean refusal score of harmless prompts with the candidate
    added), ``rel_norm`` (norm of the difference of means / mean residual norm). ``reason`` says
    why each candidate was filtered (``""`` = passed).
    """

    direction: RefusalDirection | None
    positions: list[int]
    layers: list[int]
    ablation_score: np.ndarray
    kl: np.ndarray
    addition_score: np.ndarray
    rel_norm: np.ndarray
    reason: np.ndarray
    baseline: dict[str, float]
    config: dict[str, Any]
    addition_coeff: float = 1.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_frame(self):
        """One row per candidate: position, layer, the three scores, rel_norm, passed, reason, chosen."""
        import pandas as pd

        rows = []
        for i, p in enumerate(self.positions):
            for j, lay in enumerate(self.layers):
                chosen = (self.direction is not None and p == self.direction.position and lay == self.direction.layer)
                rows.append({"position": p, "layer": lay, "ablation_score": float(self.ablation_score[i, j]),
                             "kl": float(self.kl[i, j]), "addition_score": float(self.addition_score[i, j]),
                             "rel_norm": float(self.rel_norm[i, j]), "passed": self.reason[i, j] == "",
                             "reason": str(self.reason[i, j]), "chosen": bool(chosen)})
        return pd.DataFrame(rows)

    def filter_counts(self) -> dict[str, int]:
        """How many candidates each filter removed (the first failing filter counts)."""
        out: dict[str, int] = {}
        for r in self.reason.ravel():
            out[str(r) or "passed"] = out.get(str(r) or "passed", 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        d = self.direction
        return {"layer": d.layer if d else None, "position": d.position if d else None,
                "n_candidates": int(self.reason.size), "filters": self.filter_counts(),
                "addition_coeff": self.addition_coeff, **{f"baseline_{k}": v for k, v in self.baseline.items()},
                **({k: v for k, v in d.meta.get("scores", {}).items()} if d else {})}

    def __repr__(self) -> str:
        return f"DirectionSelection(chosen={self.direction!r}, filters={self.filter_counts()})"

    def plot(self, ax=None):
        """Heatmaps (position x layer) of the three validation scores, the chosen candidate marked."""
        return viz.direction_selection_figure(self, ax=ax)

    _GRIDS = ("ablation_score", "kl", "addition_score", "rel_norm")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the selection as a :mod:`lens_safety.core.store` artifact: the score grids and the chosen
        vector in ``tensors.safetensors``, the rest in ``meta.json`` (no pickle).

        >>> import tempfile, numpy as np
        >>> g = np.array([[0.5, np.nan]])
        >>> sel = DirectionSelection(None, [-1], [1, 2], g, g, g, g, np.array([["", "norm out of range"]]), {}, {})
        >>> DirectionSelection.load(sel.save(tempfile.mkdtemp() + "/sel")).to_frame().equals(sel.to_frame())
        True
        """
        tensors: dict[str, Any] = {k: np.asarray(getattr(self, k), dtype=np.float64) for k in self._GRIDS}
        d = self.direction
        if d is not None:
            tensors["direction"] = d.vector
        meta = {"positions": [int(p) for p in self.positions], "layers": [int(x) for x in self.layers],
                "reason": [[str(r) for r in row] for row in np.asarray(self.reason)], "baseline": self.baseline,
                "config": self.config, "addition_coeff": self.addition_coeff, "timings": self.timings,
                "direction": None if d is None else d._meta()}
        return store.write_artifact(directory, kind="DirectionSelection", schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors=tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DirectionSelection:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it is missing, of
        another kind, edited or truncated."""
        t, meta = store.read_artifact(directory, kind="DirectionSelection", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            positions, layers = [int(p) for p in meta["positions"]], [int(x) for x in meta["layers"]]
            reason = np.array(meta["reason"], dtype=object).reshape(len(positions), len(layers))
            grids = [t[k] for k in cls._GRIDS]
            if any(g.shape != reason.shape for g in grids):
                raise ValueError(f"score grids of shape {[g.shape for g in grids]}, expected {reason.shape}")
            d = meta["direction"]
            direction = None if d is None else RefusalDirection._from_meta(torch.from_numpy(t["direction"]), d)
            return cls(direction, positions, layers, *grids, reason, dict(meta["baseline"]), dict(meta["config"]),
                       float(meta["addition_coeff"]), dict(meta["timings"]))
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise CacheError(f"{directory}: saved DirectionSelection is malformed ({e}); delete it and "
                             "recompute.") from e


def split_prompts(ps: PromptSet, n_train: int, n_val: int, seed: int = 0,
                  what: str = "prompt") -> tuple[PromptSet, PromptSet, PromptSet]:
    """Seeded (train, validation, rest) split; ``rest`` is held out for evaluation.

    >>> from lens_safety.inputs.prompts import PromptSet
    >>> tr, va, rest = split_prompts(PromptSet.from_texts(list("abcdefgh"), label="x"), 4, 2)
    >>> len(tr), len(va), len(rest), sorted(tr.texts + va.texts + rest.texts) == list("abcdefgh")
    (4, 2, 2, True)
    """
    if len(ps) < 2:
        raise InputError(f"The {what} set has {len(ps)} prompts; selection needs a train and a validation split.")
    idx = np.random.default_rng(seed).permutation(len(ps)).tolist()
    items = [ps[i] for i in idx]
    n_tr = min(n_train, len(ps) // 2) if n_train + n_val > len(ps) else n_train
    n_va = min(n_val, len(ps) - n_tr)
    return (PromptSet(items[:n_tr], ps.name), PromptSet(items[n_tr:n_tr + n_va], ps.name),
            PromptSet(items[n_tr + n_va:], ps.name))


@dataclass(frozen=True)
class SelectionFilters:
    """The thresholds that :func:`select_refusal_direction` filters candidates with (Arditi et al.'s).

    ``max_layer_frac``: candidates at a layer >= this fraction of the depth are dropped (too close
    to the unembedding); ``norm_range``: (low, high) bounds of the difference-of-means norm relative
    to the mean residual norm; ``kl_max``: largest mean harmless KL(base || ablated);
    ``addition_min``: the harmless refusal score with the direction added must exceed it (``None``
    disables this filter). Pass it as ``filters=``, or the same names as keyword arguments.

    >>> SelectionFilters(kl_max=0.2).kl_max, SelectionFilters().norm_range
    (0.2, (0.01, 10.0))
    """

    max_layer_frac: float = 0.8
    kl_max: float = 0.1
    norm_range: tuple[float, float] = (0.01, 10.0)
    addition_min: float | None = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.max_layer_frac <= 1:
            raise InputError(f"max_layer_frac must be in (0, 1], got {self.max_layer_frac!r}.")
        lo, hi = (float(x) for x in self.norm_range)
        if not lo <= hi:
            raise InputError(f"norm_range must be (low, high) with low <= high, got {self.norm_range!r}.")
        object.__setattr__(self, "norm_range", (lo, hi))
        if not float(self.kl_max) >= 0:
            raise InputError(f"kl_max must be a number >= 0, got {self.kl_max!r}.")



class UnknownOptionError(InputError, TypeError):
    """An option :func:`select_refusal_direction` does not know (a TypeError, as any unknown keyword is)."""


@dataclass(frozen=True)
class SelectionConfig:
    """The options of :func:`select_refusal_direction`; each is also accepted there as a keyword argument.

    * ``n_train`` / ``n_val`` (128 / 32): prompts of each set in the seeded (``seed``, 0) train and
      validation splits; each split keeps the prompts whose first-token refusal score has the sign
      of its class and needs at least ``min_per_split`` (4) of them.
    * ``n_positions``: how many post-instruction template tokens (the last ones) are candidate
      positions (default: all); ``layers``: the candidate residual layers (default ``0..n_layers-1``;
      e.g. ``range(0, 24, 2)`` subsamples).
    * ``filters``: the :class:`SelectionFilters` thresholds (its fields are options too:
      ``kl_max=0.2`` replaces that threshold of ``filters``).
    * ``coeff``: the coefficient of the addition filter (default: the largest of ``coeffs``);
      ``coeffs`` / ``coeff_target`` (0.9): the addition coefficient picked after the choice is the
      smallest of ``coeffs`` that makes at least ``coeff_target`` of the harmless validation
      prompts score > 0 (the largest if none does).
    * ``screen`` (8) / ``top_k`` (8): the screened fast path: every candidate scored on ``screen``
      prompts first, only the ``top_k`` best fully (``screen=None``: every candidate fully).
    * ``batch_size`` (32): rows per forward pass; ``on_empty``: ``"raise"`` (default) or ``"best"``
      when every candidate is filtered out.

    >>> cfg = SelectionConfig.from_options(n_train=64, kl_max=0.2)
    >>> cfg.n_train, cfg.filters.kl_max, cfg.filter_coeff
    (64, 0.2, 4.0)
    """

    n_train: int = 128
    n_val: int = 32
    n_positions: int | None = None
    layers: Sequence[int] | None = None
    filters: SelectionFilters = field(default_factory=SelectionFilters)
    coeff: float | None = None
    coeffs: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0)
    coeff_target: float = 0.9
    screen: int | None = 8
    top_k: int = 8
    min_per_split: int = 4
    batch_size: int = 32
    seed: int = 0
    on_empty: str = "raise"

    def __post_init__(self) -> None:
        coeffs = tuple(float(c) for c in self.coeffs)
        if not all(math.isfinite(c) for c in coeffs):
            raise InputError(f"coeffs must be finite numbers, got {self.coeffs!r}.")
        if self.coeff is None and not coeffs:
            raise InputError("Pass coeff= (the addition filter's coefficient) or a non-empty coeffs.")
        filters = SelectionFilters() if self.filters is None else self.filters
        if not isinstance(filters, SelectionFilters):
            raise InputError(f"filters must be a SelectionFilters, got {type(filters).__name__}.")
        if self.on_empty not in ("raise", "best"):
            raise InputError(f"on_empty must be 'raise' or 'best', got {self.on_empty!r}.")
        checked = {name: check_int(getattr(self, name), name, low=1)
                   for name in ("n_train", "n_val", "batch_size", "min_per_split", "top_k")}
        checked |= {name: check_int(getattr(self, name), name, low=1, allow_none=True)
                    for name in ("n_positions", "screen")}
        layers = None if self.layers is None else tuple(self.layers)
        for name, value in {"coeffs": coeffs, "filters": filters, "layers": layers, **checked}.items():
            object.__setattr__(self, name, value)

    @property
    def filter_coeff(self) -> float:
        """The addition filter's coefficient: ``coeff``, else the largest of ``coeffs``."""
        return max(self.coeffs) if self.coeff is None else self.coeff

    @classmethod
    def from_options(cls, config: SelectionConfig | None = None, **options: Any) -> SelectionConfig:
        """``config`` (default: the defaults) with ``options`` replaced: fields of this class, or of
        :class:`SelectionFilters` (those replace the thresholds of ``filters``). An unknown name raises
        :class:`UnknownOptionError` listing the valid ones."""
        thresholds = [f.name for f in fields(SelectionFilters)]
        cfg = config_from_options(cls, config, options, function="select_refusal_direction",
                                  error=UnknownOptionError, names=[f.name for f in fields(cls)] + thresholds)
        limits = {k: v for k, v in options.items() if k in thresholds}
        return replace(cfg, filters=replace(cfg.filters, **limits)) if limits else cfg


@torch.no_grad()
def select_refusal_direction(model: SafetyModel, harmful: PromptSet | Sequence[str],
                             harmless: PromptSet | Sequence[str], config: SelectionConfig | None = None, *,
                             tokens: RefusalTokens | None = None, cache: bool | str | os.PathLike = True,
                             progress: bool = True, **options: Any) -> DirectionSelection:
    """Pick the refusal direction: difference of means per (template position x layer), selected on validation.

    Options are a :class:`SelectionConfig` (``config=``) or its fields as keyword arguments
    (``n_train=64, kl_max=0.2``; these override ``config``). ``harmful`` / ``harmless`` are split
    (seeded) into train and validation prompts; each split keeps only prompts whose first-token
    refusal score has the sign of its class (harmful refused: > 0; harmless answered: < 0), as
    Arditi et al. do. Candidates: the last ``n_positions`` template tokens x residual ``layers``.
    A candidate is filtered before any forward when its layer is >= ``max_layer_frac`` x depth or its
    norm relative to the residual norm is outside ``norm_range`` (a zero or blown-up difference).
    On the validation split each other candidate gets (batched: stacked copies of the prompts)

    * ``ablation_score``: mean refusal score of harmful prompts with it ablated (lower is better);
    * ``kl``: mean KL(base || ablated) of harmless next-token distributions (must be <= ``kl_max``);
    * ``addition_score``: mean refusal score of harmless prompts with ``coeff`` x it added at its
      layer (must be > ``addition_min``; ``None`` disables this filter). ``coeff`` defaults to the
      largest of ``coeffs``: can the direction induce refusal at all within the coefficients on
      offer? On Qwen2.5-Coder-0.5B the raw difference of means (``coeff=1``, Arditi et al.'s
      setting) left the mean harmless score negative for every candidate within the KL bound (9 of
      9, layers 8-19), so that setting filters every candidate out; pass ``coeff=1.0`` to reproduce it.

    With ``screen`` (default 8, as the ``lens-safety run --directions`` stage) a cheap first pass
    scores every candidate's ablation on ``screen`` harmful and its KL on ``screen`` harmless
    validation prompts, then only the ``top_k`` best by screened ablation score among those within
    ``kl_max`` get the three full scores (the others keep their screened scores, reason ``"screened
    out"``). ``screen=None`` is the full search (on the default model's 120 candidates it had not
    finished after 47 CPU-minutes; the screened selection of the committed run took 20 minutes).

    The chosen candidate passes every filter and has the lowest ablation score; each filtered one's
    reason is in ``.reason`` / ``to_frame()["reason"]``. Then the addition coefficient is picked on
    the harmless validation prompts (``.addition_coeff``, see :class:`SelectionConfig`).
    ``tokens``: the :class:`~lens_safety.behaviour.refusal.RefusalTokens` scoring refusal (default:
    from the tokenizer). ``progress`` shows a bar per batched pass (candidate x prompt rows).

    Raises :class:`InputError` when too few prompts survive a split (< ``min_per_split``), when the
    model already refuses most of the harmless set, or when every candidate is filtered out (the
    message counts each filter; the selection is attached as ``err.selection``) -- unless
    ``on_empty="best"``: then, with a warning, the fully evaluated candidate with the lowest ablation
    score is returned (``direction.meta["filters_passed"]`` is False).

    >>> harmful, harmless = ls.load_prompts("harmbench"), ls.load_prompts("harmless")  # doctest: +SKIP
    >>> sel = ls.select_refusal_direction(model, harmful, harmless)  # doctest: +SKIP
    >>> sel.direction, sel.to_frame().query("passed").head()  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    cfg = SelectionConfig.from_options(config, **options)
    harmful, harmless = to_prompt_set(harmful, "harmful"), to_prompt_set(harmless, "harmless")
    n_positions, layers = _candidate_positions_and_layers(model, harmful, cfg)
    rt = tokens or RefusalTokens.from_tokenizer(model.tokenizer)
    splits = {what: _signed_split(model, ps, what, sign, rt, cfg)
              for what, ps, sign in (("harmful", harmful, 1.0), ("harmless", harmless, -1.0))}
    t_split = time.perf_counter()

    diff, rel = candidate_directions(model, splits["harmful"][0], splits["harmless"][0], n_positions,
                                     batch_size=min(cfg.batch_size, 16), cache=cache, progress=progress)
    grid = _CandidateGrid.build(diff, rel, n_positions, layers, model.n_layers, cfg.filters)
    enc_h, enc_b = (model.tokenize(model.format(splits[what][1])) for what in ("harmful", "harmless"))
    n_scored, n_forward_rows = len(grid.cells), 0  # candidates that reach a forward pass (screening included)
    if grid.cells and cfg.screen is not None:
        n_forward_rows += _screen(model, grid, enc_h, enc_b, rt, cfg, progress)
    t_eval = time.perf_counter()
    if grid.cells:
        n_forward_rows += _evaluate(model, grid, enc_h, enc_b, rt, cfg, progress)
    t_done = time.perf_counter()
    baseline = _baseline_scores(model, enc_h, enc_b, rt)
    record = _record(cfg, harmful, harmless, splits, n_positions, layers)
    timings = {"split_s": t_split - t_start, "screen_s": t_eval - t_split, "evaluate_s": t_done - t_eval,
               "total_s": time.perf_counter() - t_start, "n_candidates_evaluated": len(grid.cells),
               "n_forward_rows": n_forward_rows, "n_candidates_scored": n_scored,
               "s_per_candidate": (t_done - t_split) / max(1, n_scored)}
    sel = DirectionSelection(None, grid.positions, grid.layers, grid.ablation, grid.kl, grid.addition,
                             grid.rel_norm, grid.reason, baseline, record, float(cfg.filter_coeff), timings)
    sel.direction = _choose(model, diff, sel, cfg.on_empty)
    _pick_addition_coeff(model, sel, enc_b, rt, cfg)
    sel.timings["total_s"] = time.perf_counter() - t_start
    return sel


# -- the steps of select_refusal_direction ------------------------------------------------------------

def _candidate_positions_and_layers(model: SafetyModel, harmful: PromptSet,
                                    cfg: SelectionConfig) -> tuple[int, list[int]]:
    """How many template positions are candidates, and the sorted candidate layers, checked against ``model``."""
    k = template_positions(model, harmful[:1])
    n_positions = k if cfg.n_positions is None else cfg.n_positions
    if n_positions > k:
        raise InputError(f"n_positions={n_positions}, but {model.name}'s template has {k} post-instruction tokens.")
    layers = list(range(model.n_layers)) if cfg.layers is None else sorted({int(x) for x in cfg.layers})
    bad = [x for x in layers if not 0 <= x < model.n_layers]
    if bad or not layers:
        raise InputError(f"layers must be residual layers in 0..{model.n_layers - 1} (inputs of blocks), "
                         f"got {bad or layers}.")
    return n_positions, layers


def _signed_split(model: SafetyModel, ps: PromptSet, what: str, sign: float, rt: RefusalTokens,
                  cfg: SelectionConfig) -> tuple[PromptSet, PromptSet]:
    """The seeded train and validation splits of one set, each keeping the prompts whose first-token
    refusal score has the ``sign`` of its class (harmful: refused, > 0; harmless: answered, < 0)."""
    tr, va, _ = split_prompts(ps, cfg.n_train, cfg.n_val, cfg.seed, what)
    s_tr = first_token_scores(model, tr, batch_size=cfg.batch_size, tokens=rt).numpy()
    s_va = first_token_scores(model, va, batch_size=cfg.batch_size, tokens=rt).numpy()
    if what == "harmless":
        frac = float(np.mean(np.concatenate([s_tr, s_va]) > 0))
        if frac > 0.5:
            raise InputError(f"{model.name} already refuses {frac:.0%} of the harmless prompts (first-token "
                             "score > 0): there is no compliance to contrast with. Pass a harmless set "
                             "it answers (e.g. ls.load_prompts('harmless')).")
    keep_tr = PromptSet([p for p, s in zip(tr, s_tr) if sign * s > 0], ps.name)
    keep_va = PromptSet([p for p, s in zip(va, s_va) if sign * s > 0], ps.name)
    for name, kept, total in (("train", keep_tr, tr), ("validation", keep_va, va)):
        if len(kept) < cfg.min_per_split:
            raise InputError(
                f"Only {len(kept)} of {len(total)} {what} {name} prompts have a refusal score of the "
                f"expected sign ({'refused' if sign > 0 else 'answered'}); at least {cfg.min_per_split} are "
                f"needed. Pass more {what} prompts (or larger n_train / n_val).")
    return keep_tr, keep_va


@dataclass
class _CandidateGrid:
    """The (position x layer) grid while the selection runs: its scores and filter reasons (``""`` =
    still in), and the candidates still in (``cells``) with their vectors, unit vectors and layers."""

    positions: list[int]
    layers: list[int]
    rel_norm: np.ndarray
    reason: np.ndarray
    ablation: np.ndarray
    kl: np.ndarray
    addition: np.ndarray
    cells: list[tuple[int, int]]
    vec: Tensor
    unit: Tensor
    lay_of: list[int]

    @classmethod
    def build(cls, diff: Tensor, rel: Tensor, n_positions: int, layers: list[int], n_layers: int,
              filters: SelectionFilters) -> _CandidateGrid:
        """Every candidate, the depth and norm filters applied (they need no forward pass)."""
        positions = list(range(-n_positions, 0))
        shape = (len(positions), len(layers))
        reason = np.full(shape, "", dtype=object)
        rel_grid = np.array([[float(rel[lay, i]) for lay in layers] for i in range(shape[0])])
        for i in range(shape[0]):
            for j, lay in enumerate(layers):
                if lay >= filters.max_layer_frac * n_layers:
                    reason[i, j] = f"layer >= {filters.max_layer_frac:g} x depth"
                elif not filters.norm_range[0] <= rel_grid[i, j] <= filters.norm_range[1]:
                    reason[i, j] = "norm out of range"
        cells = [(i, j) for i in range(shape[0]) for j in range(shape[1]) if reason[i, j] == ""]
        vec = torch.stack([diff[layers[j], i] for i, j in cells]) if cells else torch.empty(0, diff.shape[-1])
        unit = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12) if cells else vec
        return cls(positions, layers, rel_grid, reason, np.full(shape, np.nan), np.full(shape, np.nan),
                   np.full(shape, np.nan), cells, vec, unit, [layers[j] for _, j in cells])

    def keep(self, kept: list[int], reason: str) -> None:
        """Keep the candidates at indices ``kept`` of :attr:`cells`; the others get ``reason``."""
        for c in set(range(len(self.cells))) - set(kept):
            self.reason[self.cells[c]] = reason
        self.cells = [self.cells[c] for c in kept]
        self.vec, self.unit, self.lay_of = self.vec[kept], self.unit[kept], [self.lay_of[c] for c in kept]


def _screen(model: SafetyModel, grid: _CandidateGrid, enc_h: dict[str, Tensor], enc_b: dict[str, Tensor],
            rt: RefusalTokens, cfg: SelectionConfig, progress: bool) -> int:
    """The cheap first pass: every candidate's ablation score on ``cfg.screen`` harmful and KL on as many
    harmless validation prompts; the ``top_k`` best by ablation score (those within ``kl_max`` first) stay
    in, the others are "screened out". Returns the forward rows it ran."""
    n = len(grid.cells)
    enc_s = {key: v[:cfg.screen] for key, v in enc_h.items()}
    enc_sb = {key: v[:cfg.screen] for key, v in enc_b.items()}
    s = rt.score(_batched_logits(model, enc_s, n, "ablate", grid.unit, grid.lay_of, cfg.batch_size,
                                 "screen: ablate harmful" if progress else None)).mean(1).numpy()
    base_sb = model.last_position_logits(enc_sb["input_ids"], enc_sb["attention_mask"]).float().cpu()
    ks = _kl(base_sb, _batched_logits(model, enc_sb, n, "ablate", grid.unit, grid.lay_of, cfg.batch_size,
                                      "screen: ablate harmless" if progress else None)).mean(1)
    for c, (i, j) in enumerate(grid.cells):
        grid.ablation[i, j], grid.kl[i, j] = s[c], float(ks[c])
    order = np.lexsort((s, (ks.numpy() > cfg.filters.kl_max)))  # by ablation score, within the KL bound first
    grid.keep(sorted(order[:cfg.top_k].tolist()), "screened out")
    return n * (enc_s["input_ids"].shape[0] + enc_sb["input_ids"].shape[0])


def _evaluate(model: SafetyModel, grid: _CandidateGrid, enc_h: dict[str, Tensor], enc_b: dict[str, Tensor],
              rt: RefusalTokens, cfg: SelectionConfig, progress: bool) -> int:
    """The three full validation scores of the candidates still in, then the KL and addition filters.
    Returns the forward rows it ran."""
    n, f = len(grid.cells), cfg.filters
    base_b = model.last_position_logits(enc_b["input_ids"], enc_b["attention_mask"]).float().cpu()
    bars = ("ablate harmful", "ablate harmless", "add harmless") if progress else (None,) * 3
    la = _batched_logits(model, enc_h, n, "ablate", grid.unit, grid.lay_of, cfg.batch_size, bars[0])
    lk = _batched_logits(model, enc_b, n, "ablate", grid.unit, grid.lay_of, cfg.batch_size, bars[1])
    ld = _batched_logits(model, enc_b, n, "add", grid.vec * float(cfg.filter_coeff), grid.lay_of, cfg.batch_size,
                         bars[2])
    a_s, k_s, d_s = rt.score(la).mean(1).numpy(), _kl(base_b, lk).mean(1).numpy(), rt.score(ld).mean(1).numpy()
    del la, lk, ld
    for c, (i, j) in enumerate(grid.cells):
        grid.ablation[i, j], grid.kl[i, j], grid.addition[i, j] = a_s[c], k_s[c], d_s[c]
        if not k_s[c] <= f.kl_max:
            grid.reason[i, j] = f"kl > {f.kl_max:g}"
        elif f.addition_min is not None and not d_s[c] > f.addition_min:
            grid.reason[i, j] = f"addition not > {f.addition_min:g}"
    return n * (2 * enc_b["input_ids"].shape[0] + enc_h["input_ids"].shape[0])


def _baseline_scores(model: SafetyModel, enc_h: dict[str, Tensor], enc_b: dict[str, Tensor],
                     rt: RefusalTokens) -> dict[str, float]:
    """Mean first-token refusal score of the harmful and harmless validation prompts, unedited."""
    base_h = rt.score(model.last_position_logits(enc_h["input_ids"], enc_h["attention_mask"])).float().cpu()
    base_b = rt.score(model.last_position_logits(enc_b["input_ids"], enc_b["attention_mask"])).float().cpu()
    return {"harmful_val_score": float(base_h.mean()), "harmless_val_score": float(base_b.mean())}


def _record(cfg: SelectionConfig, harmful: PromptSet, harmless: PromptSet,
            splits: dict[str, tuple[PromptSet, PromptSet]], n_positions: int, layers: list[int]) -> dict[str, Any]:
    """What :attr:`DirectionSelection.config` (and the direction's ``meta["selection"]``) records."""
    f = cfg.filters
    return {"n_train": {w: len(splits[w][0]) for w in splits}, "n_val": {w: len(splits[w][1]) for w in splits},
            "requested": {"n_train": cfg.n_train, "n_val": cfg.n_val},
            "n_positions": n_positions, "layers": layers, "max_layer_frac": f.max_layer_frac, "kl_max": f.kl_max,
            "norm_range": list(f.norm_range), "addition_min": f.addition_min, "coeff": cfg.filter_coeff,
            "screen": cfg.screen, "top_k": cfg.top_k, "seed": cfg.seed,
            "harmful_hash": harmful.hash(), "harmless_hash": harmless.hash(),
            "train_hashes": {w: splits[w][0].hash() for w in splits},
            "val_hashes": {w: splits[w][1].hash() for w in splits}}


def _choose(model: SafetyModel, diff: Tensor, sel: DirectionSelection, on_empty: str) -> RefusalDirection:
    """The direction of the candidate that passed every filter with the lowest ablation score. When none
    passed: with ``on_empty="best"`` (and a warning) the fully evaluated one with the lowest ablation
    score, else :class:`InputError` (the selection attached as ``err.selection``)."""
    cells = [(i, j) for i in range(len(sel.positions)) for j in range(len(sel.layers))]
    passed = [ij for ij in cells if sel.reason[ij] == ""]
    fallback = False
    if not passed and on_empty == "best":
        passed = [ij for ij in cells if np.isfinite(sel.addition_score[ij])]
        fallback = bool(passed)
    counts = ", ".join(f"{v} by '{r}'" for r, v in sel.filter_counts().items())
    if fallback:
        warnings.warn(f"Every candidate direction was filtered out ({counts}); on_empty='best' returns the fully "
                      "evaluated candidate with the lowest ablation score anyway (direction.meta['filters_passed'] "
                      "is False).", stacklevel=4)  # the caller of select_refusal_direction, past torch.no_grad
    if not passed:
        err = InputError(f"Every candidate direction was filtered out: {counts}. Loosen the filter that removed "
                         "most (kl_max, norm_range, max_layer_frac, top_k), or pass more/different prompts.")
        err.selection = sel
        raise err
    bi, bj = min(passed, key=lambda ij: sel.ablation_score[ij])
    scores = {"ablation_score": float(sel.ablation_score[bi, bj]), "kl": float(sel.kl[bi, bj]),
              "addition_score": float(sel.addition_score[bi, bj]), "rel_norm": float(sel.rel_norm[bi, bj])}
    return RefusalDirection(diff[sel.layers[bj], bi], sel.layers[bj], sel.positions[bi], model.name,
                            model.weights_hash, model.n_layers,
                            {"scores": scores, "selection": store.jsonable(sel.config), "filters_passed": not fallback})


def _pick_addition_coeff(model: SafetyModel, sel: DirectionSelection, enc_b: dict[str, Tensor], rt: RefusalTokens,
                         cfg: SelectionConfig) -> None:
    """Set ``sel.addition_coeff`` (and the direction's ``meta``): the smallest of ``cfg.coeffs`` that makes
    at least ``cfg.coeff_target`` of the harmless validation prompts score > 0, else the largest."""
    d, cs = sel.direction, list(cfg.coeffs)
    if cs:
        ld = _batched_logits(model, enc_b, len(cs), "add", torch.stack([d.vector * c for c in cs]),
                             [d.layer] * len(cs), cfg.batch_size)
        frac_pos = (rt.score(ld) > 0).float().mean(1).numpy()
        ok = [c for c, f in zip(cs, frac_pos) if f >= cfg.coeff_target]
        sel.addition_coeff = min(ok) if ok else max(cs)
        d.meta["coeff_sweep"] = {str(c): float(f) for c, f in zip(cs, frac_pos)}
    d.meta["addition_coeff"] = sel.addition_coeff
