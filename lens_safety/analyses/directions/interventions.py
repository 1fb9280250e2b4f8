"""Interventions on the residual stream along a direction: :func:`ablate` and :func:`add` (hook lists
that are also context managers, :class:`Intervention`), and the batched per-row versions that score many
candidate directions in one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...core import store
from ...core.errors import InputError
from ...core.validation import check_int, check_number
from ...model.loading import SafetyModel
from .direction import RefusalDirection, _as_direction

__all__ = ["Intervention", "ablate", "add", "COMPONENTS"]

COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


def _hook_name(comp: str, block: int) -> str:
    return f"blocks.{block}.hook_{comp}"


def _resid_name(layer: int) -> str:
    """Hook of residual layer ``layer`` (0 = embedding output, l = output of block l-1), as
    :meth:`SafetyModel.resid_hook_name`: an edit there is seen by captures of that layer."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def _project_out(d: Tensor):
    def hook(t: Tensor, hook) -> Tensor:
        u = d.to(device=t.device, dtype=t.dtype)
        return t - (t @ u).unsqueeze(-1) * u
    return hook


def _add_vector(v: Tensor):
    def hook(t: Tensor, hook) -> Tensor:
        return t + v.to(device=t.device, dtype=t.dtype)
    return hook


class Intervention(list):
    """A list of ``(hook_name, fn)`` TransformerLens hooks that is also a context manager.

    Pass it as ``fwd_hooks=`` (e.g. to :func:`lens_safety.behaviour.refusal.generate`), or use
    ``with intervention:`` (made with ``model=``) to hold the hooks on ``model.bridge`` for the
    duration: every forward pass then runs edited -- generation (prompt pass and every cached
    decoding step), refusal scores, capture, the logit lens, patching. While active,
    ``model.weights_hash`` is a derived hash (the model's plus the intervention's), so on-disk
    caches (residuals, refusal results) never mix edited and unedited runs; it is restored on
    exit. Data made outside the context (e.g. a ``PairSet``) is then refused as "another
    model": pass ``list(pairs)`` to patch it on top of the intervention. The unedited hash stays
    readable as ``model.base_weights_hash`` (set only while an intervention is active, the
    outermost one's): a :class:`~lens_safety.behaviour.judges.ModelJudge` judges with the unedited model
    and keeps its calibration.
    """

    def __init__(self, hooks: Sequence[tuple[str, Any]], *, model: SafetyModel | None, description: dict[str, Any]):
        super().__init__(hooks)
        self.model = model
        self.description = description
        self._ctx: list[tuple[Any, str, str | None]] = []

    def __enter__(self) -> Intervention:
        if self.model is None:
            raise InputError("This intervention was made without a model; to use it as a context manager pass "
                             "model=: `with ls.ablate(direction, model=model): ...` (or pass it as fwd_hooks=).")
        ctx = self.model.bridge.hooks(fwd_hooks=list(self))
        ctx.__enter__()
        previous = self.model.weights_hash
        base = vars(self.model).get("base_weights_hash")
        self.model.weights_hash = store.sha256_json({"base": previous, **self.description})
        self.model.base_weights_hash = base or previous
        self._ctx.append((ctx, previous, base))
        return self

    def __exit__(self, *exc) -> None:
        ctx, previous, base = self._ctx.pop()
        self.model.weights_hash = previous
        if base is None:
            vars(self.model).pop("base_weights_hash", None)
        else:
            self.model.base_weights_hash = base
        ctx.__exit__(*exc)


def _blocks(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = sorted({int(b) for b in layers})
    bad = [b for b in out if not 0 <= b < n_layers]
    if bad:
        raise InputError(f"layers are block indices in 0..{n_layers - 1}; got {bad}.")
    return out


def ablate(direction: RefusalDirection, *, model: SafetyModel | None = None, layers: Sequence[int] | None = None,
           components: Sequence[str] = COMPONENTS) -> Intervention:
    """Directional ablation: project the unit direction out of the residual stream.

    At every block in ``layers`` (default all) and every position, ``x <- x - d d^T x`` on each
    of ``components`` (``resid_pre``, ``attn_out``, ``mlp_out``: the stream entering the block and
    what attention and the MLP write to it), as in Arditi et al. With all blocks, no component of
    the stream along ``d`` survives anywhere. Returns an :class:`Intervention`: hooks for
    ``fwd_hooks=`` and, with ``model=``, a context manager.

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> len(ablate(d)), ablate(d)[0][0]
    (9, 'blocks.0.hook_resid_pre')
    """
    d = _as_direction(direction)
    if model is not None:
        d.check_model(model)
    comps = (components,) if isinstance(components, str) else tuple(components)
    bad = [c for c in comps if c not in COMPONENTS]
    if bad or not comps:
        raise InputError(f"components must be a non-empty subset of {COMPONENTS}, got {comps!r}.")
    blocks = _blocks(layers, d.n_layers)
    u = d.unit
    hooks = [(_hook_name(c, b), _project_out(u)) for b in blocks for c in comps]
    return Intervention(hooks, model=model, description={"intervention": "ablate", "direction": d.hash,
                                                         "layers": blocks, "components": list(comps)})


def add(direction: RefusalDirection, layer: int | None = None, coeff: float = 1.0, *,
        model: SafetyModel | None = None) -> Intervention:
    """Activation addition: ``x <- x + coeff * vector`` at residual layer ``layer``, every position.

    ``layer`` defaults to the direction's own layer (0 = embedding output, l = input of block l;
    ``n_layers``, the final stream, is not allowed: nothing reads it but the unembedding).
    ``coeff=1`` adds the raw difference of means; negative ``coeff`` subtracts it. Returns an
    :class:`Intervention` (hooks and, with ``model=``, a context manager).

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> [name for name, _ in add(d, coeff=2.0)]
    ['blocks.0.hook_resid_post']
    """
    d = _as_direction(direction)
    if model is not None:
        d.check_model(model)
    layer = d.layer if layer is None else layer
    layer = check_int(layer, "layer", low=0, high=d.n_layers - 1, kind="a residual layer", hint="the input of a block")
    coeff = check_number(coeff, "coeff")
    v = d.vector * float(coeff)
    return Intervention([(_resid_name(int(layer)), _add_vector(v))], model=model,
                        description={"intervention": "add", "direction": d.hash, "layer": int(layer),
                                     "coeff": float(coeff)})


# -- batched candidate evaluation ------------------------------------------------------------

def _rows_project(D: Tensor):
    """Hook projecting a different unit direction out of each batch row: ``D`` is [rows, d]."""
    def hook(t: Tensor, hook) -> Tensor:
        u = D.to(device=t.device, dtype=t.dtype)
        coef = torch.einsum("bpd,bd->bp", t, u)
        return t - coef.unsqueeze(-1) * u.unsqueeze(1)
    return hook


def _rows_add(V: Tensor):
    def hook(t: Tensor, hook) -> Tensor:
        return t + V.to(device=t.device, dtype=t.dtype).unsqueeze(1)
    return hook


@torch.no_grad()
def _batched_logits(model: SafetyModel, enc: dict[str, Tensor], n_cand: int, kind: str, vectors: Tensor,
                    layers: Sequence[int], batch_size: int, desc: str | None = None) -> Tensor:
    """Last-position logits ``[n_cand, n_prompts, d_vocab]`` with each candidate's intervention.

    Copies of the prompt batch are stacked, one per candidate (as activation patching does): every
    forward runs up to ``batch_size`` rows, each with its own ablated (``kind="ablate"``: ``vectors``
    are unit) or added (``kind="add"``: at residual layer ``layers[c]``) vector. ``desc``: show a
    progress bar (candidate x prompt rows) with this label.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_prompts = ids.shape[0]
    out = torch.empty((n_cand, n_prompts, model.d_vocab), dtype=torch.float32)
    pb = min(n_prompts, batch_size)
    cc = max(1, batch_size // pb)
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cand * n_prompts, desc=desc, unit="row")
    for p0 in range(0, n_prompts, pb):
        sl = slice(p0, min(p0 + pb, n_prompts))
        b = sl.stop - sl.start
        for c0 in range(0, n_cand, cc):
            cands = list(range(c0, min(c0 + cc, n_cand)))
            rows_ids = ids[sl].repeat(len(cands), 1)
            rows_mask = mask[sl].repeat(len(cands), 1)
            V = vectors[cands].repeat_interleave(b, dim=0)
            if kind == "ablate":
                fn = _rows_project(V)
                hooks = [(_hook_name(c, blk), fn) for blk in range(model.n_layers) for c in COMPONENTS]
            else:
                hooks = []
                cl = torch.tensor([layers[c] for c in cands]).repeat_interleave(b)
                for lay in sorted(set(cl.tolist())):
                    hooks.append((_resid_name(lay), _rows_add(V * (cl == lay).unsqueeze(1).float())))
            logits = model.last_position_logits(rows_ids, rows_mask, fwd_hooks=hooks).float().cpu()
            out[c0:c0 + len(cands), sl] = logits.reshape(len(cands), b, -1)
            if bar is not None:
                bar.update(len(cands) * b)
    if bar is not None:
        bar.close()
    return out


def _kl(base_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(P_base || P) over the vocabulary, in float64: ``[..., d_vocab] -> [...]``."""
    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)
