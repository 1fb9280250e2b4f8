"""The sweeps: activation patching (:func:`patch_layers`) and attribution patching (:func:`attribution_patch`).

Both run every pair in every direction the same way (:func:`_run_sweep`): the source run's activations at
the aligned positions, then the patches of the method, one long-form row per patch; pairs whose plain −
jailbroken margin gap is below ``min_gap`` are dropped (:class:`_Dropper`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...behaviour.refusal import RefusalTokens
from ...core.errors import InputError
from ...core.validation import check_int
from ...model.generation import kv_cache_shim
from ...model.loading import SafetyModel
from .config import (
    ACTIVATION_OPTIONS,
    ACTIVATION_POSITIONAL,
    ATTRIBUTION_OPTIONS,
    ATTRIBUTION_POSITIONAL,
    PatchConfig,
    check_components,
    check_directions,
    check_layers,
    check_min_gap,
    check_normalize,
    resolve_config,
)
from .engine import (
    _check_finite,
    _hook,
    _margin,
    _plan,
    _prefix_cache,
    _run_from_block,
    _run_patched,
    _run_source,
    _run_with_grad,
    _score_from_resid,
    _Spec,
    _specs,
    _Trace,
    _trace_target,
)
from .pairs import PreparedPair, groups_for, prepare_pairs, resolve_formatting
from .result import PatchResult

#: What a sweep method gives for one pair in one direction: the patches in the order of their scores, the
#: scores, and the (target, source) baseline scores; None when the pair is dropped.
_Patched = tuple[list[_Spec], list[float], tuple[float, float]] | None


# -- pair filtering ------------------------------------------------------------------------------


def _drop_reason(plain: float, jailbroken: float, min_gap: float | None) -> str | None:
    """Why a pair with these margin scores is not patched (None: keep it)."""
    gap = plain - jailbroken
    if min_gap is None:
        return None
    if gap <= 0:
        return (f"inverted gap: the jailbroken prompt scores as much refusal as the plain one or more "
                f"(plain - jailbroken = {gap:.3f} logits)")
    if gap < min_gap:
        return f"gap below min_gap ({gap:.3f} < {min_gap:g} logits)"
    return None


class _Dropper:
    """Collects kept and dropped pairs of a sweep (the margin gap is the criterion)."""

    def __init__(self, rt: RefusalTokens, model: SafetyModel, min_gap: float | None) -> None:
        self.margin, self.model, self.min_gap = _margin(rt), model, min_gap
        self.kept: list[int] = []
        self.dropped: list[dict[str, Any]] = []

    def check(self, i: int, pp: PreparedPair, direction: str, target_last: Tensor, source_last: Tensor) -> bool:
        """True when pair ``i`` is kept; else records why it is dropped."""
        with torch.no_grad():
            t = float(_score_from_resid(self.model, self.margin, target_last.detach())[0])
            s = float(_score_from_resid(self.model, self.margin, source_last.detach())[0])
        plain, jb = (s, t) if direction == "denoise" else (t, s)
        reason = _drop_reason(plain, jb, self.min_gap)
        if reason is None:
            return True
        self.dropped.append({"input_index": i, "request": pp.request, "method": pp.method,
                             "plain_score": plain, "jailbroken_score": jb, "gap": plain - jb, "reason": reason})
        return False

    def finish(self, n: int) -> None:
        if self.dropped and len(self.dropped) == n:
            gaps = ", ".join(f"{d['gap']:.2f}" for d in self.dropped[:10])
            raise InputError(
                f"All {n} pairs were dropped: their plain - jailbroken margin gaps ({gaps}{', ...' if n > 10 else ''}"
                f" logits) are below min_gap={self.min_gap:g} or inverted, so the refusal score does not see "
                "the jailbreak. Use pairs where it does (jailbreak_pairs(model, ..., min_gap=...)), or pass a "
                "smaller min_gap (min_gap=None keeps every pair)."
            )
        if self.dropped:
            warnings.warn(
                f"Dropped {len(self.dropped)} of {n} pairs whose plain - jailbroken gap is below "
                f"min_gap={self.min_gap:g} logits or inverted; see PatchResult.dropped.",
                stacklevel=4,  # the caller of patch_layers / attribution_patch
            )


# -- the shared loop over pairs and directions ---------------------------------------------------


@dataclass
class _Sweep:
    """One sweep: the model, the checked options, the aligned pairs, the metric, and the rows so far."""

    model: SafetyModel
    cfg: PatchConfig  # min_gap, normalize and batch_size checked
    method: str  # "activation" or "attribution"
    comps: tuple[str, ...]
    dirs: tuple[str, ...]
    layers: list[int]
    prepared: list[PreparedPair]
    rt: RefusalTokens
    names: list[str]  # hook names of every (component, layer) patched
    dropper: _Dropper
    rows: dict[str, list] = field(default_factory=lambda: {
        k: [] for k in ("pair", "layer", "component", "head", "position", "direction", "score")})
    baselines: list[np.ndarray] = field(default_factory=list)

    @property
    def n_heads(self) -> int:
        return int(self.model.bridge.cfg.n_heads)

    def specs(self, n_groups: int) -> list[_Spec]:
        return _specs(self.comps, self.layers, self.n_heads, n_groups)


@dataclass(frozen=True)
class _Job:
    """One pair in one direction: target tokens, aligned position groups, the source run's activations."""

    index: int
    pair: PreparedPair
    direction_index: int
    direction: str
    target: Tensor
    groups: list[tuple[list[int], list[int]]]  # (source rows, target positions) patched together
    offsets: list[int]  # per group: its target position from the end (per-position sweeps)
    source: dict[str, Tensor]  # hook name -> source activations at the aligned positions
    source_last: Tensor  # the source run's final residual at the last position

    def keeps(self, dropper: _Dropper, target_last: Tensor) -> bool:
        """Whether the pair stays (checked on the first direction only)."""
        return self.direction_index != 0 or dropper.check(self.index, self.pair, self.direction, target_last,
                                                          self.source_last)


def _start(model: SafetyModel, pairs: Any, cfg: PatchConfig, method: str) -> _Sweep:
    """Check the options, align the pairs and pick the metric (margin for activation patching, log-odds for
    attribution patching, unless ``cfg.refusal_tokens`` is given)."""
    comps = check_components(cfg.components, cfg.heads)
    dirs = check_directions(cfg.direction)
    layers = check_layers(model, cfg.layers)
    checked: dict[str, Any] = {"min_gap": check_min_gap(cfg.min_gap), "normalize": check_normalize(cfg.normalize)}
    if method == "activation":
        checked["batch_size"] = check_int(cfg.batch_size, "batch_size", low=1)
    system, chat = resolve_formatting(model, pairs, cfg.system, cfg.chat)
    prepared = prepare_pairs(model, pairs, positions=cfg.positions, n_positions=cfg.n_positions, system=system,
                             chat=chat)
    mode = "margin" if method == "activation" else "complement"
    rt = cfg.refusal_tokens or RefusalTokens.from_tokenizer(model.tokenizer, mode=mode)
    names = sorted({_hook(c, layer) for c in comps for layer in layers})
    return _Sweep(model, dataclasses.replace(cfg, **checked), method, comps, dirs, layers, prepared, rt,
                  names, _Dropper(rt, model, checked["min_gap"]))


def _job(sweep: _Sweep, i: int, pp: PreparedPair, d_i: int, d: str) -> _Job:
    """Pair ``i`` in direction ``d``: its position groups and the source run."""
    tgt, src_ids, src_pos, groups, offsets = groups_for(pp, d, sweep.cfg.per_position)
    src_acts, src_last = _run_source(sweep.model, src_ids, sweep.names, src_pos)
    return _Job(i, pp, d_i, d, tgt, groups, offsets, src_acts, src_last)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair")


def _add_row(rows: dict[str, list], pair: int, spec, position: int, direction: str, score: float) -> None:
    """One long-form result row (pair, layer, component, head, position, direction, score)."""
    for key, value in (("pair", pair), ("layer", spec.layer), ("component", spec.component), ("head", spec.head),
                       ("position", position), ("direction", direction), ("score", score)):
        rows[key].append(value)


def _run_sweep(sweep: _Sweep, desc: str, patch: Callable[[_Sweep, _Job], _Patched]) -> PatchResult:
    """Every pair in every direction through ``patch``; the kept pairs' rows make the result."""
    dirs, per_position = sweep.dirs, sweep.cfg.per_position
    bar = _progress(len(sweep.prepared) * len(dirs), f"{desc} {sweep.model.name}", sweep.cfg.progress)
    for i, pp in enumerate(sweep.prepared):
        base = np.full((len(dirs), 2), np.nan)
        rows_i: dict[str, list] = {k: [] for k in sweep.rows}
        kept = True
        for d_i, d in enumerate(dirs):
            job = _job(sweep, i, pp, d_i, d)
            done = patch(sweep, job)
            if done is None:
                kept = False
                break
            order, scores, base[d_i] = done
            for s, v in zip(order, scores):
                _add_row(rows_i, len(sweep.baselines), s, job.offsets[s.group] if per_position else 0, d, v)
            if bar is not None:
                bar.update(1)
        if kept:
            sweep.dropper.kept.append(i)
            sweep.baselines.append(base)
            for k, v in rows_i.items():
                sweep.rows[k].extend(v)
        elif bar is not None:
            bar.update(len(dirs) - d_i)  # the directions the dropped pair skips
    if bar is not None:
        bar.close()
    sweep.dropper.finish(len(sweep.prepared))
    return _result(sweep)


def _result(sweep: _Sweep) -> PatchResult:
    """The :class:`PatchResult` of a finished sweep: rows as tensors, per-pair recovery, pair metadata."""
    rows, dirs, comps, model, cfg = sweep.rows, sweep.dirs, sweep.comps, sweep.model, sweep.cfg
    d_idx = torch.tensor([dirs.index(d) for d in rows["direction"]], dtype=torch.long)
    pair = torch.tensor(rows["pair"], dtype=torch.long)
    score = torch.tensor(rows["score"], dtype=torch.float64)
    base = torch.tensor(np.array(sweep.baselines).reshape(-1, len(dirs), 2), dtype=torch.float64)
    tgt, src = base[pair, d_idx, 0], base[pair, d_idx, 1]
    gap = src - tgt
    small = gap.abs() < 1e-6
    recovery = torch.where(small, torch.full_like(score, math.nan), (score - tgt) / gap.where(~small, 1.0))
    bad = sorted({int(p) for p in pair[small]})
    if bad:
        warnings.warn(
            f"Pairs {bad[:10]} score the same plain and jailbroken (|gap| < 1e-6): their "
            "recovery is undefined (NaN).",
            stacklevel=4,  # the caller of patch_layers / attribution_patch
        )
    meta = []
    for k in sweep.dropper.kept:
        p = sweep.prepared[k]
        meta.append({
            "input_index": k,
            "request": p.request,
            "method": p.method,
            "plain_text": p.plain_text,
            "jailbroken_text": p.jailbroken_text,
            "plain_tokens": len(p.plain_ids),
            "jailbroken_tokens": len(p.jailbroken_ids),
            "suffix_len": p.suffix_len,
            "alignment": [list(a) for a in p.alignment],
        })
    return PatchResult(
        pair, torch.tensor(rows["layer"], dtype=torch.long),
        torch.tensor([comps.index(c) for c in rows["component"]], dtype=torch.long),
        torch.tensor(rows["head"], dtype=torch.long), torch.tensor(rows["position"], dtype=torch.long),
        d_idx, score, recovery, base, comps, dirs, sweep.method, model.name, model.weights_hash, model.n_layers,
        cfg.positions_label, per_position=cfg.per_position, heads=cfg.heads, pairs=meta,
        dropped=list(sweep.dropper.dropped), min_gap=cfg.min_gap, normalize=cfg.normalize, score_mode=sweep.rt.mode,
    )


# -- activation patching -------------------------------------------------------------------------


def patch_layers(model: SafetyModel, pairs: Any, *args: Any, config: PatchConfig | None = None,
                 **options: Any) -> PatchResult:
    """Activation patching of every (layer, component) between the plain and jailbroken runs.

    Options (keywords, or a :class:`PatchConfig` as ``config=`` with keywords overriding it; the first seven,
    ``components, direction, positions, layers, heads, batch_size, progress``, may also come positionally):
    ``direction`` ``"denoise"`` (run jailbroken, patch in plain: does refusal return?), ``"noise"`` (run
    plain, patch in jailbroken: does refusal vanish?) or ``"both"``; ``layers`` (block indices, default all;
    ``resid_pre`` at block ``l`` is residual layer ``l``, 0 = embedding output, no final norm);
    ``heads=True`` adds component ``"z"`` patched head by head; ``positions`` ``"suffix"`` (default; the
    shared token suffix, capped by ``n_positions``), ``"last"`` or explicit ``(plain_pos, jailbroken_pos)``
    lists per pair. All aligned positions are patched together, unless ``per_position=True``.

    The metric is the max-logit margin (see the package docstring) unless ``refusal_tokens`` says otherwise.
    ``min_gap`` (logits, default :data:`MIN_GAP` = 1.0): pairs whose plain − jailbroken margin gap, measured
    on the unpatched runs made here, is below it or negative are dropped and listed in
    ``PatchResult.dropped`` with the reason; ``None`` keeps every pair. ``normalize``: the default recovery
    of the result's summaries, ``"pair"`` or ``"mean"`` (see :meth:`PatchResult.recovery_matrix`).
    ``system`` / ``chat``: the prompt formatting; with a :class:`~lens_safety.behaviour.pairs.PairSet`
    they default to the pairs' own, and anything else raises :class:`~lens_safety.core.errors.InputError`
    (as does a PairSet from other weights).

    Speed: ``start_at_patch`` runs each patched copy from the patched block on, from the recorded target
    residual (``False``: every copy runs all blocks; same numbers, slower). ``reuse_prefix``: target tokens
    before the first patched position come from a KV cache (``False``: every copy computes them; same
    numbers, slower).

    Memory is bounded by ``batch_size`` (patched copies per forward), not by the number of
    patches: one forward holds ``batch_size`` copies of the positions from the batch's first
    patched position to the end — per block about ``batch_size × n_pos × (4·d_model + d_mlp +
    n_heads·n_tokens)`` floats of activations (the last term is the attention pattern) — plus,
    per pair and direction, the recorded target run (``n_layers × n_tokens × d_model`` floats
    and the KV cache of the prefix) and the source activations (``n_hooks × n_aligned ×
    d_model``). Lower ``batch_size`` to lower the peak. Source activations are moved to the
    device of the hook that consumes them (a model split over devices works).

    NaN or infinite activations or scores raise :class:`~lens_safety.core.errors.InputError`; an unknown
    option raises ``TypeError``. Returns a :class:`PatchResult` (``method="activation"``).

    >>> import lens_safety as ls
    >>> m = ls.testing.tiny_model()
    >>> r = ls.patch_layers(m, [("Tell me a story.", "Sure! Tell me a story.")], min_gap=None, progress=False)
    >>> r.to_frame().shape[0]  # 3 components x 3 layers x 1 pair
    9
    >>> cfg = PatchConfig(components=("resid_pre",), min_gap=None, progress=False)
    >>> len(ls.patch_layers(m, [("Tell me a story.", "Sure! Tell me a story.")], config=cfg, direction="both"))
    6
    """
    cfg = resolve_config("patch_layers", config, args, options, ACTIVATION_OPTIONS, ACTIVATION_POSITIONAL)
    return _run_sweep(_start(model, pairs, cfg, "activation"), "patch", _patch_activations)


def _patch_activations(sweep: _Sweep, job: _Job) -> _Patched:
    """Every patch of one pair and direction, run from the patched block on (``start_at_patch``, when the
    model's blocks can be called on their own), else as full forwards."""
    model, rt = sweep.model, sweep.rt
    specs = sweep.specs(len(job.groups))
    p0 = min(p for _, tp in job.groups for p in tp)
    with kv_cache_shim(model.bridge):
        done = _sweep_from_blocks(sweep, job, specs, p0) if sweep.cfg.start_at_patch else None
        if done is None:
            done = _sweep_full(sweep, job, specs, p0)
    if done is False:
        return None
    order, flat, tgt_last = done
    _check_finite(flat, f"Patched scores of pair {job.index} ({job.direction})")
    with torch.no_grad():
        base = (float(_score_from_resid(model, rt, tgt_last)[0]),
                float(_score_from_resid(model, rt, job.source_last)[0]))
    return order, flat.tolist(), base


def _sweep_from_blocks(sweep: _Sweep, job: _Job, specs: list[_Spec], p0: int):
    """The ``start_at_patch`` sweep of one pair and direction.

    Returns ``(specs in run order, scores, target final residual)``, ``False`` when the pair is
    dropped, or None when this model's blocks cannot be run on their own (use full forwards).
    """
    model, cfg, tgt = sweep.model, sweep.cfg, job.target
    plan = _plan(specs, job.groups, cfg.batch_size, cfg.per_position, p0 if cfg.reuse_prefix else 0,
                 cfg.reuse_prefix)
    traces: dict[int, _Trace | None] = {}
    for q in sorted({b[1] for b in plan}):
        prefix = _prefix_cache(model, tgt, q) if q > 0 else None
        traces[q] = _trace_target(model, tgt, q if prefix is not None else 0, prefix)
        if traces[q] is None:
            return None
    first = traces[min(traces)] if traces else _trace_target(model, tgt, 0, None)
    if first is None:
        return None
    if not job.keeps(sweep.dropper, first.final):
        return False
    order: list[_Spec] = []
    scores: list[Tensor] = []
    for start, q, batch in plan:
        scores.append(_run_from_block(model, sweep.rt, traces[q], start, batch, job.groups, job.source))
        order.extend(batch)
    return order, (torch.cat(scores) if scores else torch.zeros(0)), first.final


def _sweep_full(sweep: _Sweep, job: _Job, specs: list[_Spec], p0: int):
    """The ``start_at_patch=False`` sweep (every patched copy runs all blocks): as :func:`_sweep_from_blocks`,
    never None."""
    model, cfg, tgt = sweep.model, sweep.cfg, job.target
    tgt_last = _run_source(model, tgt, [], [])[1]
    if not job.keeps(sweep.dropper, tgt_last):
        return False
    cache = _prefix_cache(model, tgt, p0) if cfg.reuse_prefix and p0 > 0 else None
    prefix = (cache, p0) if cache is not None else None
    scores = [_run_patched(model, sweep.rt, tgt, specs[s: s + cfg.batch_size], job.groups, job.source, prefix)
              for s in range(0, len(specs), cfg.batch_size)]
    return specs, (torch.cat(scores) if scores else torch.zeros(0)), tgt_last


# -- attribution patching ------------------------------------------------------------------------


def attribution_patch(model: SafetyModel, pairs: Any, *args: Any, config: PatchConfig | None = None,
                      **options: Any) -> PatchResult:
    """Attribution patching: the linear estimate ``(act_source - act_target) . d score / d act``.

    The gradient is taken at the target run (the jailbroken run for ``"denoise"``, the
    plain run for ``"noise"``): 2 forwards and 1 backward per pair and direction cover every
    layer, component and position. ``score`` holds the estimated patched score and
    ``recovery`` the estimated recovery, so :func:`compare` can correlate it with
    :func:`patch_layers`.

    The default score is the smooth log-odds of a refusal start (``RefusalTokens`` mode
    ``"complement"``): its gradient flows through every logit, where the max-logit margin's
    flows through two. Pairs are filtered on the margin gap, as in :func:`patch_layers`, so both
    keep the same pairs. Options as in :func:`patch_layers` (a :class:`PatchConfig` or keywords; the first
    six, ``components, direction, positions, layers, heads, progress``, may come positionally), except the
    speed options ``batch_size``, ``reuse_prefix`` and ``start_at_patch``, which do not apply.

    >>> import lens_safety as ls
    >>> m = ls.testing.tiny_model()
    >>> a = ls.attribution_patch(m, [("Tell me a story.", "Sure! Tell me a story.")], min_gap=None,
    ...                          progress=False)
    >>> a.method, a.score_mode
    ('attribution', 'complement')
    """
    cfg = resolve_config("attribution_patch", config, args, options, ATTRIBUTION_OPTIONS, ATTRIBUTION_POSITIONAL)
    return _run_sweep(_start(model, pairs, cfg, "attribution"), "attribution", _patch_attribution)


def _patch_attribution(sweep: _Sweep, job: _Job) -> _Patched:
    """The linear estimate of every patch of one pair and direction (one forward and backward of the target)."""
    model, rt = sweep.model, sweep.rt
    tgt_pos = sorted({p for _, tp in job.groups for p in tp})
    tgt_acts, grads, tgt_score, tgt_last = _run_with_grad(model, rt, job.target, sweep.names, tgt_pos)
    if not job.keeps(sweep.dropper, tgt_last):
        return None
    col = {p: j for j, p in enumerate(tgt_pos)}
    with torch.no_grad():
        base = (tgt_score, float(_score_from_resid(model, rt, job.source_last)[0]))
    specs = sweep.specs(len(job.groups))
    estimates = []
    for s in specs:
        name = _hook(s.component, s.layer)
        si, tp = job.groups[s.group]
        tj = [col[p] for p in tp]
        diff = job.source[name][si].double().cpu() - tgt_acts[name][tj].double()
        g = grads[name][tj].double()
        if s.head >= 0:
            diff, g = diff[:, s.head], g[:, s.head]
        estimates.append(tgt_score + float((diff * g).sum()))
    return specs, estimates, base
