"""The block-replay engine: source runs, patch hooks, and patched forwards that start at the patched block.

The target run is made once and the input of every block is recorded (the residual, all positions, and the
arguments the model hands the block: attention mask, rotary position embeddings...). A patch at block ``l``
leaves blocks ``< l`` exactly as in the target run, so each patched copy starts at block ``l`` from the
recorded residual and runs only blocks ``l..end``; the blocks are called directly, so every hook in them
fires. Copies are stacked per forward; target tokens before the first patched position come from a KV cache.
The score is computed from the last position only (final norm, then unembedding).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...behaviour.refusal import RefusalTokens
from ...core.validation import check_finite
from ...model.loading import SafetyModel
from .config import COMPONENTS

#: Raise a clear error when an activation, score or gradient is NaN or infinite.
_check_finite = functools.partial(
    check_finite, hint="Patching needs finite activations and scores: the model overflowed (half precision? "
    "load it with dtype=torch.float32) or a hook wrote non-finite values.")



class _StopForward(Exception):
    """Raised after the last block to skip the full-sequence unembedding."""



@dataclass(frozen=True)
class _Spec:
    """One patch: component at a block, optionally one head, one group of aligned positions."""

    component: str
    layer: int
    head: int  # -1 = all heads / not a head component
    group: int  # index into the groups of aligned positions


def _specs(comps: tuple[str, ...], layers: list[int], n_heads: int, n_groups: int) -> list[_Spec]:
    out = []
    for layer in layers:
        for c in comps:
            for h in range(n_heads) if c == "z" else [-1]:
                for g in range(n_groups):
                    out.append(_Spec(c, layer, h, g))
    return out


def _hook(comp: str, layer: int) -> str:
    return COMPONENTS[comp].format(l=layer)


def _final_hook(model: SafetyModel) -> str:
    return f"blocks.{model.n_layers - 1}.hook_resid_post"


def _score_from_resid(model: SafetyModel, rt: RefusalTokens, last: Tensor) -> Tensor:
    """Refusal score from the raw last-block residual at the last position ([batch, d_model])."""
    return rt.score(model.unembed(model.final_norm(last.unsqueeze(1)))[:, 0])


def _margin(rt: RefusalTokens) -> RefusalTokens:
    """The same refusal tokens scored with the max-logit margin (what pair filtering uses)."""
    return rt if rt.mode == "margin" else RefusalTokens(rt.refusal_ids, rt.compliance_ids, "margin")


def _run_source(model: SafetyModel, ids: Tensor, names: list[str], pos: list[int]) -> tuple[dict[str, Tensor], Tensor]:
    """One unpadded forward: activations at ``names`` and positions ``pos``, and the final residual
    at the last position (``[1, d_model]``)."""
    store_: dict[str, Tensor] = {}
    final = _final_hook(model)

    def keep(name: str):
        def fn(t: Tensor, hook) -> None:
            store_[name] = t[0, torch.tensor(pos, dtype=torch.long, device=t.device)].detach().clone()

        return fn

    def stop(t: Tensor, hook) -> None:
        store_["__final__"] = t[:, -1].detach().clone()
        raise _StopForward

    hooks = [(n, keep(n)) for n in names] + [(final, stop)]
    ids = ids.to(model.device)[None]
    with torch.no_grad():
        try:
            with model.bridge.hooks(fwd_hooks=hooks):
                model.bridge(ids, attention_mask=torch.ones_like(ids))
        except _StopForward:
            pass
    last = store_.pop("__final__")
    for n, t in store_.items():
        _check_finite(t, f"The source run's activation {n}")
    _check_finite(last, "The source run's final residual")
    return store_, last


def _prefix_cache(model: SafetyModel, ids: Tensor, p0: int):
    """KV cache of the first ``p0`` target tokens (run once; every patched copy shares them)."""
    ids = ids[:p0].to(model.device)[None]
    with torch.no_grad():
        _, cache = model.bridge(
            ids,
            attention_mask=torch.ones_like(ids),
            return_type="logits_and_cache",
            use_cache=True,
            logits_to_keep=1,
        )
    if cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() != p0:
        return None  # this architecture / stack does not fill the cache: fall back to full forwards
    return cache


def _patch_hooks(rows: list, groups: list[tuple[list[int], list[int]]], src: dict[str, Tensor], p0: int):
    """Forward hooks that write each row's source activations into its own batch row.

    Source activations and indices are moved to the device (and dtype) of the tensor the hook
    sees, so a model split over devices gets them where the layer runs.
    """
    by_hook: dict[str, list[tuple[int, _Spec]]] = {}
    for r, s in enumerate(rows):
        if s is not None:
            by_hook.setdefault(_hook(s.component, s.layer), []).append((r, s))

    def make(name: str, edits: list[tuple[int, _Spec]]):
        source = src[name]

        def fn(t: Tensor, hook) -> Tensor:
            t = t.clone()
            dev = t.device
            for r, s in edits:
                si, tp = groups[s.group]
                si_t = torch.tensor(si, device=source.device)
                tp_t = torch.tensor(tp, device=dev) - p0
                vals = source[si_t].to(device=dev, dtype=t.dtype)
                if s.head >= 0:
                    t[r, tp_t, s.head] = vals[:, s.head]
                else:
                    t[r, tp_t] = vals
            return t

        return fn

    return [(n, make(n, e)) for n, e in by_hook.items()]


def _run_patched(
    model: SafetyModel,
    rt: RefusalTokens,
    ids: Tensor,
    rows: list[_Spec | None],
    groups: list[tuple[list[int], list[int]]],
    src: dict[str, Tensor],
    prefix: tuple[Any, int] | None = None,
) -> Tensor:
    """Full forwards (every block) of ``len(rows)`` copies of ``ids``; row r carries patch ``rows[r]``.

    The ``start_at_patch=False`` path. ``prefix = (kv_cache, p0)``: the first ``p0`` tokens come
    from the cache and only positions ``p0..`` are computed. Returns the refusal score of every row.
    """
    p0 = 0 if prefix is None else prefix[1]
    dev = model.device
    out: dict[str, Tensor] = {}

    def stop(t: Tensor, hook) -> None:
        out["final"] = t[:, -1]
        raise _StopForward

    batch = ids.to(dev)[None, p0:].expand(len(rows), -1).contiguous()
    mask = torch.ones((len(rows), len(ids)), dtype=torch.long, device=dev)
    kw: dict[str, Any] = {}
    if prefix is not None:
        cache = copy.deepcopy(prefix[0])
        cache.batch_repeat_interleave(len(rows))
        kw["past_key_values"] = cache
    hooks = _patch_hooks(rows, groups, src, p0) + [(_final_hook(model), stop)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        try:
            with model.bridge.hooks(fwd_hooks=hooks):
                model.bridge(batch, attention_mask=mask, **kw)
        except _StopForward:
            pass
        return _score_from_resid(model, rt, out["final"]).float().cpu()


# -- starting the patched forward at the patched block ----------------------------------------------


def _is_cache(v: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, Cache)


def _expand(v: Any, n: int) -> Any:
    """Broadcast a recorded batch-1 block argument to ``n`` rows (tensors with a leading 1; tuples)."""
    if isinstance(v, Tensor):
        return v.expand(n, *v.shape[1:]) if n > 1 and v.ndim >= 2 and v.shape[0] == 1 else v
    if isinstance(v, tuple):
        return tuple(_expand(x, n) for x in v)
    if isinstance(v, list):
        return [_expand(x, n) for x in v]
    return v


@dataclass
class _Trace:
    """The target run from token ``p0`` on: every block's input (residual and arguments)."""

    p0: int
    hidden: list[Tensor]  # block -> [1, n - p0, d_model], the raw input (before hook_resid_pre)
    inputs: list[tuple[tuple, dict, bool]]  # block -> (other args, kwargs, hidden passed positionally)
    prefix: Any  # KV cache of tokens < p0 (None when p0 == 0)
    final: Tensor  # [1, d_model] raw residual after the last block, last position


def _trace_target(model: SafetyModel, ids: Tensor, p0: int, prefix: Any) -> _Trace | None:
    """Run the target once (tokens ``p0..`` on top of the ``prefix`` KV cache) recording block inputs.

    Returns None when the model's blocks cannot be called on their own (then full forwards are used).
    """
    blocks = list(getattr(model.bridge, "blocks", []) or [])
    if len(blocks) != model.n_layers:
        return None
    rec: dict[int, tuple] = {}

    def pre(i: int):
        def fn(mod, args, kwargs):
            if args and isinstance(args[0], Tensor):
                rec[i] = (args[0].detach().clone(), tuple(args[1:]), dict(kwargs), True)
            elif isinstance(kwargs.get("hidden_states"), Tensor):
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                rec[i] = (kwargs["hidden_states"].detach().clone(), tuple(args), kw, False)

        return fn

    out: dict[str, Tensor] = {}

    def stop(t: Tensor, hook) -> None:
        out["final"] = t[:, -1].detach().clone()
        raise _StopForward

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    x = ids[p0:].to(model.device)[None]
    mask = torch.ones((1, len(ids)), dtype=torch.long, device=model.device)
    kw: dict[str, Any] = {}
    if prefix is not None:
        kw["past_key_values"] = copy.deepcopy(prefix)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            try:
                with model.bridge.hooks(fwd_hooks=[(_final_hook(model), stop)]):
                    model.bridge(x, attention_mask=mask, **kw)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(rec) != len(blocks) or "final" not in out:
        return None
    hidden = [rec[i][0] for i in range(len(blocks))]
    for i, h in enumerate(hidden):
        _check_finite(h, f"The target run's residual at block {i}")
    _check_finite(out["final"], "The target run's final residual")
    return _Trace(p0, hidden, [rec[i][1:] for i in range(len(blocks))], prefix, out["final"])


def _run_from_block(
    model: SafetyModel,
    rt: RefusalTokens,
    trace: _Trace,
    start: int,
    rows: list[_Spec],
    groups: list[tuple[list[int], list[int]]],
    src: dict[str, Tensor],
) -> Tensor:
    """Run ``len(rows)`` patched copies of the traced target through blocks ``start..end`` only."""
    n = len(rows)
    blocks = list(model.bridge.blocks)
    cache = None
    if trace.prefix is not None:
        cache = copy.deepcopy(trace.prefix)
        cache.batch_repeat_interleave(n)

    def arg(v: Any) -> Any:
        return cache if _is_cache(v) else _expand(v, n)

    h = trace.hidden[start].expand(n, -1, -1).clone()
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=_patch_hooks(rows, groups, src, trace.p0)):
        for j in range(start, len(blocks)):
            rest, kw, positional = trace.inputs[j]
            rest, kw = tuple(arg(v) for v in rest), {k: arg(v) for k, v in kw.items()}
            o = blocks[j](h, *rest, **kw) if positional else blocks[j](*rest, hidden_states=h, **kw)
            h = o[0] if isinstance(o, (tuple, list)) else o
        return _score_from_resid(model, rt, h[:, -1]).float().cpu()


def _plan(specs: list[_Spec], groups, batch_size: int, per_position: bool, p0_min: int, reuse: bool):
    """Batches of patches: ``[(start_block, p0, specs)]``.

    Patches are sorted by block; a batch starts at its first patch's block (rows patched at a
    later block pass through the blocks before it unpatched, which is exactly the target run).
    Per-position sweeps keep one block per batch, and positions sorted, so that each batch only
    computes the positions from its first patched one (``p0``) on.
    """
    def p0_of(s: _Spec) -> int:
        return min(groups[s.group][1]) if reuse else 0

    order = sorted(specs, key=lambda s: (s.layer, p0_of(s)) if per_position else (s.layer,))
    plan: list[tuple[int, int, list[_Spec]]] = []
    cur: list[_Spec] = []
    for s in order:
        if cur and (len(cur) >= batch_size or (per_position and s.layer != cur[0].layer)):
            plan.append((cur[0].layer, min(p0_of(c) for c in cur) if per_position else p0_min, cur))
            cur = []
        cur.append(s)
    if cur:
        plan.append((cur[0].layer, min(p0_of(c) for c in cur) if per_position else p0_min, cur))
    return plan



def _run_with_grad(
    model: SafetyModel, rt: RefusalTokens, ids: Tensor, names: list[str], pos: list[int]
) -> tuple[dict[str, Tensor], dict[str, Tensor], float, Tensor]:
    """Target run: activations and d score / d activation at ``names`` x ``pos`` (1 fwd, 1 bwd),
    on CPU in float32; the score; the final residual at the last position."""
    deltas: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}

    def add(name: str):
        def fn(t: Tensor, hook) -> Tensor:
            idx = torch.tensor(pos, dtype=torch.long, device=t.device)
            acts[name] = t[0, idx].detach().float().cpu().clone()
            delta = torch.zeros_like(t, requires_grad=True)
            deltas[name] = delta
            return t + delta

        return fn

    def stop(t: Tensor, hook) -> None:
        out["final"] = t[:, -1]
        raise _StopForward

    ids = ids.to(model.device)[None]
    with torch.enable_grad():
        try:
            with model.bridge.hooks(fwd_hooks=[(n, add(n)) for n in names] + [(_final_hook(model), stop)]):
                model.bridge(ids, attention_mask=torch.ones_like(ids))
        except _StopForward:
            pass
        missing = [n for n in names if n not in deltas]
        if missing:
            raise RuntimeError(f"Hooks did not fire: {missing[:3]}...")
        for n, a in acts.items():
            _check_finite(a, f"The target run's activation {n}")
        score = _score_from_resid(model, rt, out["final"])[0]
        _check_finite(score.detach(), "The target run's score")
        grads = torch.autograd.grad(score, [deltas[n] for n in names], allow_unused=True)
    g = {}
    for n, gr in zip(names, grads):
        if gr is None:
            g[n] = torch.zeros_like(acts[n])
        else:
            g[n] = gr[0, torch.tensor(pos, dtype=torch.long, device=gr.device)].detach().float().cpu()
            _check_finite(g[n], f"The gradient at {n}")
    return acts, g, float(score.detach()), out["final"].detach()
