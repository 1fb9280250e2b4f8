"""The refusal direction: selection, ablation, addition and weight orthogonalisation.

Arditi et al. (2024), "Refusal in language models is mediated by a single direction": the
difference of means between harmful and harmless prompts at one (post-instruction position,
layer) is a direction that, **ablated** (projected out of the residual stream everywhere), makes
an aligned model comply, and **added** makes it refuse harmless requests.

* :func:`select_refusal_direction` builds one candidate per (template position x layer) on a
  train split and picks one on a validation split (ablation refusal score, harmless KL under
  ablation, addition score, depth and norm filters), batched: many candidates per forward.
* :func:`ablate` / :func:`add` are TransformerLens hook lists *and* context managers that hold
  the hooks on the model, so they compose with generation, :func:`~lens_safety.evaluate_refusal`,
  :func:`~lens_safety.collect_residuals`, :func:`~lens_safety.logit_lens` and patching.
* :func:`orthogonalize` bakes the ablation into the weights (a new :class:`SafetyModel`), and
  :meth:`SafetyModel.save_pretrained` exports it as a Hugging Face folder.
* :func:`direction_effects`, :func:`coefficient_sweep`, :func:`direction_geometry`,
  :func:`band_ablation` and :func:`direction_logit_lens` measure side effects and tie the
  direction to the paper's claims.

Layers are residual-stream layers ``0..n_layers`` (0 = embedding output, ``l`` = input of block
``l`` = raw output of block ``l-1``, no final norm). Positions are negative: ``-1`` is the last
template token (the generation prompt), ``-k`` the first token after the user's text.

>>> import torch, lens_safety as ls
>>> model = ls.testing.tiny_model()
>>> d = RefusalDirection(torch.ones(model.d_model), layer=1, position=-1, model_name=model.name,
...                      weights_hash=model.weights_hash, n_layers=model.n_layers)
>>> with ls.ablate(d, model=model):
...     acts = ls.collect_residuals(model, ["Hi"], cache=False, progress=False)
>>> float((acts.values[0] @ d.unit).abs().max()) < 1e-4
True
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..core import store
from ..core.errors import ChatTemplateError, InputError, ModelMismatchError
from ..core.validation import check_int, check_number
from ..inputs.prompts import PromptSet
from ..model.loading import SafetyModel, hf_model_copy, position_ids_from_mask, weights_fingerprint

__all__ = [
    "RefusalDirection", "DirectionSelection", "SelectionFilters", "Intervention", "select_refusal_direction",
    "ablate", "add",
    "orthogonalize", "hf_model_copy", "template_positions", "split_prompts", "candidate_directions",
    "direction_effects",
    "DirectionEffects", "coefficient_sweep", "CoefficientSweep", "direction_geometry", "DirectionGeometry",
    "band_ablation", "direction_logit_lens", "directions_stage", "orthogonalize_to_folder",
    "CAUTIOUS_SYSTEM_PROMPT", "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1
COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
#: The prompting baseline of :func:`coefficient_sweep`: a system prompt that asks for caution.
CAUTIOUS_SYSTEM_PROMPT = ("You are a careful, safety-conscious assistant. Refuse any request that could "
                          "cause harm, and say so briefly.")


# -- the direction ------------------------------------------------------------------------------

@dataclass
class RefusalDirection:
    """A refusal direction of one model: the raw difference of means at (``layer``, ``position``).

    ``vector`` is float32 ``[d_model]``: ``mean(harmful) - mean(harmless)`` of residual layer
    ``layer`` (0 = embedding output, l = raw output of block l-1) at template position
    ``position`` (negative; -1 = last token). Ablation uses :attr:`unit`; addition adds
    ``coeff * vector`` (so ``coeff=1`` moves the mean harmless activation to the mean harmful one).
    ``meta`` records how it was made (data hashes, selection scores).

    >>> import torch
    >>> d = RefusalDirection(torch.tensor([3.0, 4.0]), layer=1, position=-1, model_name="m",
    ...                      weights_hash="h", n_layers=2)
    >>> d.norm, d.unit.tolist()
    (5.0, [0.6000000238418579, 0.800000011920929])
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    position: int
    model_name: str
    weights_hash: str
    n_layers: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector)
        if v.dim() != 1:
            raise InputError(f"A direction is one vector [d_model]; got shape {tuple(v.shape)}.")
        v = v.detach().float().cpu()
        if not bool(torch.isfinite(v).all()):
            raise InputError("The direction has NaN or infinite entries; recompute it from finite activations.")
        if float(v.norm()) == 0.0:
            raise InputError("The direction is the zero vector: the two prompt sets have the same mean there "
                             "(e.g. the embedding layer at a template token). Pick another layer or position.")
        self.vector = v
        self.n_layers = int(self.n_layers)
        self.layer = check_int(self.layer, "layer", low=0, high=self.n_layers, kind="a residual layer")
        self.position = check_int(self.position, "position", high=-1, kind="a negative integer",
                                  hint="-1 = last template token")

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def unit(self) -> Float[Tensor, " d_model"]:
        """The direction scaled to unit length (what ablation projects out)."""
        return self.vector / self.vector.norm()

    @property
    def hash(self) -> str:
        """A content hash: vector, layer, position and model."""
        h = store.sha256_json({"layer": self.layer, "position": self.position, "weights_hash": self.weights_hash})
        import hashlib

        return hashlib.sha256(h.encode() + self.vector.numpy().tobytes()).hexdigest()

    def __repr__(self) -> str:
        return (f"RefusalDirection(layer={self.layer}, position={self.position}, norm={self.norm:.3g}, "
                f"d_model={self.d_model}, model={self.model_name!r})")

    def check_model(self, model: SafetyModel) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the model this direction came from."""
        if not isinstance(model, SafetyModel):
            raise InputError(f"model must be a SafetyModel (from ls.load_model), got {type(model).__name__}.")
        if self.d_model != model.d_model or self.n_layers != model.n_layers:
            raise ModelMismatchError(
                f"The direction has d_model={self.d_model} and {self.n_layers} layers, but {model.name} has "
                f"d_model={model.d_model} and {model.n_layers} layers: it was made with another model.")
        model.check_compatible(self.weights_hash, self.d_model, what=f"refusal direction ({self.model_name})")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tensors.safetensors`` + ``meta.json`` into ``directory`` atomically."""
        return store.write_artifact(directory, kind="RefusalDirection", schema_version=SCHEMA_VERSION,
                                    meta=self._meta(), tensors={"vector": self.vector})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RefusalDirection:
        """Load what :meth:`save` wrote (verified by sha256; :class:`CacheError` if not)."""
        tensors, meta = store.read_artifact(directory, kind="RefusalDirection", schema_version=SCHEMA_VERSION)
        return cls._from_meta(tensors["vector"], meta)

    def _meta(self) -> dict[str, Any]:
        """Everything but the vector, as saved in ``meta.json``."""
        return {"model_name": self.model_name, "weights_hash": self.weights_hash, "layer": self.layer,
                "position": self.position, "n_layers": self.n_layers, "d_model": self.d_model,
                "hash": self.hash, "meta": self.meta}

    @classmethod
    def _from_meta(cls, vector: Tensor, meta: dict[str, Any]) -> RefusalDirection:
        return cls(vector, meta["layer"], meta["position"], meta["model_name"], meta["weights_hash"],
                   meta["n_layers"], dict(meta.get("meta", {})))


def _as_direction(direction: Any) -> RefusalDirection:
    if isinstance(direction, DirectionSelection):
        return direction.direction
    if not isinstance(direction, RefusalDirection):
        raise InputError(f"Expected a RefusalDirection (or a DirectionSelection), got {type(direction).__name__}.")
    return direction


# -- interventions ------------------------------------------------------------------------------

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


# -- selection ------------------------------------------------------------------------------

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
    from ..inputs.prompts import as_prompt_set

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
    from ..capture import collect_residuals

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
        from . import figures as viz

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
        from ..core.errors import CacheError

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


@torch.no_grad()
def select_refusal_direction(model: SafetyModel, harmful: PromptSet | Sequence[str],
                             harmless: PromptSet | Sequence[str], *, n_train: int = 128, n_val: int = 32,
                             n_positions: int | None = None, layers: Sequence[int] | None = None,
                             filters: SelectionFilters | None = None, coeff: float | None = None,
                             coeffs: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0),
                             coeff_target: float = 0.9, screen: int | None = 8, top_k: int = 8,
                             min_per_split: int = 4, batch_size: int = 32, seed: int = 0,
                             on_empty: str = "raise", tokens=None, cache: bool | str | os.PathLike = True,
                             progress: bool = True, **filter_kwargs: Any) -> DirectionSelection:
    """Pick the refusal direction: difference of means per (template position x layer), selected on validation.

    ``harmful`` / ``harmless`` are split (seeded) into ``n_train`` / ``n_val`` prompts each; each
    split keeps only prompts whose first-token refusal score has the sign of its class (harmful
    refused: > 0; harmless answered: < 0), as Arditi et al. do. Candidates: the last
    ``n_positions`` template tokens (default: every post-instruction token) x residual ``layers``
    (default ``0..n_layers-1``; pass e.g. ``range(0, 24, 2)`` to subsample). On the validation
    split each candidate gets (batched: ``batch_size`` rows per forward, stacked copies)

    * ``ablation_score``: mean refusal score of harmful prompts with it ablated (lower is better);
    * ``kl``: mean KL(base || ablated) of harmless next-token distributions (must be <= ``kl_max``);
    * ``addition_score``: mean refusal score of harmless prompts with ``coeff`` x it added at its
      layer (must be > ``addition_min``, default 0; ``None`` disables this filter). ``coeff``
      defaults to the largest of ``coeffs``: the filter asks whether the direction can induce
      refusal at all within the coefficients on offer. On Qwen2.5-Coder-0.5B the raw difference of
      means (``coeff=1``, Arditi et al.'s setting) left the mean harmless score negative for every
      candidate within the KL bound (9 of 9, layers 8-19), so that setting filters every candidate
      out; pass ``coeff=1.0`` to reproduce it;

    and is filtered before any forward when its layer is >= ``max_layer_frac`` x depth or its
    norm relative to the residual norm is outside ``norm_range`` (a zero or blown-up difference).
    The thresholds (``max_layer_frac`` 0.8, ``kl_max`` 0.1, ``norm_range`` (0.01, 10),
    ``addition_min`` 0) are a :class:`SelectionFilters`: pass ``filters=SelectionFilters(...)``
    or any of them as keyword arguments (``kl_max=0.2``; these override ``filters``). Each
    filtered candidate's reason is in ``.reason`` / ``to_frame()["reason"]``.
    The chosen one passes every filter and has the lowest ablation score. Then the addition
    coefficient is picked on the harmless validation prompts: the smallest of ``coeffs`` that
    makes at least ``coeff_target`` of them score > 0 (``.addition_coeff``; the largest if none does).

    ``tokens``: the :class:`~lens_safety.behaviour.refusal.RefusalTokens` scoring refusal (default: from the
    tokenizer). ``screen`` (default 8, as the ``lens-safety run --directions`` stage): a cheap
    first pass -- the ablation score on ``screen`` harmful and the KL on ``screen`` harmless
    validation prompts for every candidate -- then the full three scores only for the ``top_k``
    (default 8) best by screened ablation score among those within ``kl_max`` (the others keep
    their screened scores, reason ``"screened out"``). ``screen=None`` is the full search: every
    candidate scored on every validation prompt (on the default model's 120 candidates it had not
    finished after 47 CPU-minutes; the screened selection of the committed run took 20 minutes).
    ``progress`` shows a bar per batched pass (candidate x prompt rows).

    Raises :class:`InputError` when too few prompts survive a split (< ``min_per_split``), when
    the model already refuses most of the harmless set, or when every candidate is filtered out
    (the message counts each filter; the selection is attached as ``err.selection``) -- unless
    ``on_empty="best"``: then, with a warning, the fully evaluated candidate with the lowest
    ablation score is returned (``direction.meta["filters_passed"]`` is False, the grid keeps
    every candidate's reason).

    >>> harmful, harmless = ls.load_prompts("harmbench"), ls.load_prompts("harmless")  # doctest: +SKIP
    >>> sel = ls.select_refusal_direction(model, harmful, harmless)  # doctest: +SKIP
    >>> sel.direction, sel.to_frame().query("passed").head()  # doctest: +SKIP
    """
    from ..behaviour.refusal import RefusalTokens, _as_set, first_token_scores

    t_start = time.perf_counter()
    cs = [float(c) for c in coeffs]
    if not all(math.isfinite(c) for c in cs):
        raise InputError(f"coeffs must be finite numbers, got {coeffs!r}.")
    if coeff is None:
        if not cs:
            raise InputError("Pass coeff= (the addition filter's coefficient) or a non-empty coeffs.")
        coeff = max(cs)
    harmful, harmless = _as_set(harmful, "harmful"), _as_set(harmless, "harmless")
    n_train, n_val = check_int(n_train, "n_train", low=1), check_int(n_val, "n_val", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    min_per_split = check_int(min_per_split, "min_per_split", low=1)
    known = {f.name for f in fields(SelectionFilters)}
    if set(filter_kwargs) - known:
        raise InputError(f"select_refusal_direction got unknown argument(s) {sorted(set(filter_kwargs) - known)}; "
                         f"the filter thresholds are {sorted(known)} (or filters=SelectionFilters(...)).")
    filters = replace(filters or SelectionFilters(), **filter_kwargs)
    max_layer_frac, kl_max, norm_range, addition_min = (filters.max_layer_frac, filters.kl_max, filters.norm_range,
                                                        filters.addition_min)
    k = template_positions(model, harmful[:1])
    n_positions = k if n_positions is None else check_int(n_positions, "n_positions", low=1)
    if n_positions > k:
        raise InputError(f"n_positions={n_positions}, but {model.name}'s template has {k} post-instruction tokens.")
    layer_list = list(range(model.n_layers)) if layers is None else sorted({int(x) for x in layers})
    bad = [x for x in layer_list if not 0 <= x < model.n_layers]
    if bad or not layer_list:
        raise InputError(f"layers must be residual layers in 0..{model.n_layers - 1} (inputs of blocks), "
                         f"got {bad or layer_list}.")

    rt = tokens or RefusalTokens.from_tokenizer(model.tokenizer)
    splits = {}
    for what, ps, sign in (("harmful", harmful, 1.0), ("harmless", harmless, -1.0)):
        tr, va, _ = split_prompts(ps, n_train, n_val, seed, what)
        s_tr = first_token_scores(model, tr, batch_size=batch_size, tokens=rt).numpy()
        s_va = first_token_scores(model, va, batch_size=batch_size, tokens=rt).numpy()
        if what == "harmless":
            frac = float(np.mean(np.concatenate([s_tr, s_va]) > 0))
            if frac > 0.5:
                raise InputError(f"{model.name} already refuses {frac:.0%} of the harmless prompts (first-token "
                                 "score > 0): there is no compliance to contrast with. Pass a harmless set "
                                 "it answers (e.g. ls.load_prompts('harmless')).")
        keep_tr = PromptSet([p for p, s in zip(tr, s_tr) if sign * s > 0], ps.name)
        keep_va = PromptSet([p for p, s in zip(va, s_va) if sign * s > 0], ps.name)
        for name, kept, total in (("train", keep_tr, tr), ("validation", keep_va, va)):
            if len(kept) < min_per_split:
                raise InputError(
                    f"Only {len(kept)} of {len(total)} {what} {name} prompts have a refusal score of the "
                    f"expected sign ({'refused' if sign > 0 else 'answered'}); at least {min_per_split} are "
                    f"needed. Pass more {what} prompts (or larger n_train / n_val).")
        splits[what] = (keep_tr, keep_va)
    t_split = time.perf_counter()

    diff, rel = candidate_directions(model, splits["harmful"][0], splits["harmless"][0], n_positions,
                                     batch_size=min(batch_size, 16), cache=cache, progress=progress)
    positions = list(range(-n_positions, 0))
    P, L = len(positions), len(layer_list)
    reason = np.full((P, L), "", dtype=object)
    rel_grid = np.array([[float(rel[lay, i]) for lay in layer_list] for i in range(P)])
    for i in range(P):
        for j, lay in enumerate(layer_list):
            if lay >= max_layer_frac * model.n_layers:
                reason[i, j] = f"layer >= {max_layer_frac:g} x depth"
            elif not norm_range[0] <= rel_grid[i, j] <= norm_range[1]:
                reason[i, j] = "norm out of range"
    cand = [(i, j) for i in range(P) for j in range(L) if reason[i, j] == ""]
    abl = np.full((P, L), np.nan)
    kl = np.full((P, L), np.nan)
    addg = np.full((P, L), np.nan)

    h_val, b_val = splits["harmful"][1], splits["harmless"][1]
    enc_h = model.tokenize(model.format(h_val))
    enc_b = model.tokenize(model.format(b_val))
    vec = torch.stack([diff[layer_list[j], i] for i, j in cand]) if cand else torch.empty(0, model.d_model)
    unit = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12) if cand else vec
    lay_of = [layer_list[j] for _, j in cand]
    n_scored = len(cand)  # candidates that reach a forward pass (screening included)
    n_forward_rows = 0
    if cand and screen is not None:
        ns = check_int(screen, "screen", low=1)
        enc_s = {key: v[:ns] for key, v in enc_h.items()}
        enc_sb = {key: v[:ns] for key, v in enc_b.items()}
        s = rt.score(_batched_logits(model, enc_s, len(cand), "ablate", unit, lay_of, batch_size,
                                     "screen: ablate harmful" if progress else None)).mean(1).numpy()
        base_sb = model.last_position_logits(enc_sb["input_ids"], enc_sb["attention_mask"]).float().cpu()
        ks = _kl(base_sb, _batched_logits(model, enc_sb, len(cand), "ablate", unit, lay_of, batch_size,
                                          "screen: ablate harmless" if progress else None)).mean(1)
        n_forward_rows += len(cand) * (enc_s["input_ids"].shape[0] + enc_sb["input_ids"].shape[0])
        for c, (i, j) in enumerate(cand):
            abl[i, j], kl[i, j] = s[c], float(ks[c])
        # rank by the screened ablation score, candidates within the KL bound first
        order = np.lexsort((s, (ks.numpy() > kl_max)))
        keep = sorted(order[:check_int(top_k, "top_k", low=1)].tolist())
        for c in set(range(len(cand))) - set(keep):
            reason[cand[c]] = "screened out"
        cand = [cand[c] for c in keep]
        vec, unit, lay_of = vec[keep], unit[keep], [lay_of[c] for c in keep]
    t_eval = time.perf_counter()
    if cand:
        base_b = model.last_position_logits(enc_b["input_ids"], enc_b["attention_mask"]).float().cpu()
        bars = ("ablate harmful", "ablate harmless", "add harmless") if progress else (None,) * 3
        la = _batched_logits(model, enc_h, len(cand), "ablate", unit, lay_of, batch_size, bars[0])
        lk = _batched_logits(model, enc_b, len(cand), "ablate", unit, lay_of, batch_size, bars[1])
        ld = _batched_logits(model, enc_b, len(cand), "add", vec * float(coeff), lay_of, batch_size, bars[2])
        n_forward_rows += len(cand) * (2 * enc_b["input_ids"].shape[0] + enc_h["input_ids"].shape[0])
        a_s, k_s, d_s = rt.score(la).mean(1).numpy(), _kl(base_b, lk).mean(1).numpy(), rt.score(ld).mean(1).numpy()
        del la, lk, ld
        for c, (i, j) in enumerate(cand):
            abl[i, j], kl[i, j], addg[i, j] = a_s[c], k_s[c], d_s[c]
            if not k_s[c] <= kl_max:
                reason[i, j] = f"kl > {kl_max:g}"
            elif addition_min is not None and not d_s[c] > addition_min:
                reason[i, j] = f"addition not > {addition_min:g}"
    t_done = time.perf_counter()
    with torch.no_grad():
        base_h = rt.score(model.last_position_logits(enc_h["input_ids"], enc_h["attention_mask"])).float().cpu()
        base_bs = rt.score(model.last_position_logits(enc_b["input_ids"], enc_b["attention_mask"])).float().cpu()
    baseline = {"harmful_val_score": float(base_h.mean()), "harmless_val_score": float(base_bs.mean())}
    n_cand_eval = len(cand)
    config = {"n_train": {w: len(splits[w][0]) for w in splits}, "n_val": {w: len(splits[w][1]) for w in splits},
              "requested": {"n_train": n_train, "n_val": n_val},
              "n_positions": n_positions, "layers": layer_list, "max_layer_frac": max_layer_frac, "kl_max": kl_max,
              "norm_range": list(norm_range), "addition_min": addition_min, "coeff": coeff, "screen": screen,
              "top_k": top_k, "seed": seed,
              "harmful_hash": harmful.hash(), "harmless_hash": harmless.hash(),
              "train_hashes": {w: splits[w][0].hash() for w in splits},
              "val_hashes": {w: splits[w][1].hash() for w in splits}}
    timings = {"split_s": t_split - t_start, "screen_s": t_eval - t_split, "evaluate_s": t_done - t_eval,
               "total_s": time.perf_counter() - t_start, "n_candidates_evaluated": n_cand_eval,
               "n_forward_rows": n_forward_rows,
               "n_candidates_scored": n_scored,
               "s_per_candidate": (t_done - t_split) / max(1, n_scored)}
    passed = [(i, j) for i in range(P) for j in range(L) if reason[i, j] == ""]
    if on_empty not in ("raise", "best"):
        raise InputError(f"on_empty must be 'raise' or 'best', got {on_empty!r}.")
    fallback = False
    if not passed and on_empty == "best":
        passed = [(i, j) for i in range(P) for j in range(L) if np.isfinite(addg[i, j])]
        fallback = bool(passed)
    sel = DirectionSelection(None, positions, layer_list, abl, kl, addg, rel_grid, reason, baseline, config,
                             float(coeff), timings)
    if fallback:
        import warnings

        warnings.warn("Every candidate direction was filtered out (" + ", ".join(
            f"{v} by '{r}'" for r, v in sel.filter_counts().items()) + "); on_empty='best' returns the fully "
            "evaluated candidate with the lowest ablation score anyway (direction.meta['filters_passed'] is False).",
            stacklevel=2)
    if not passed:
        err = InputError("Every candidate direction was filtered out: " + ", ".join(
            f"{v} by '{r}'" for r, v in sel.filter_counts().items()) + ". Loosen the filter that removed "
            "most (kl_max, norm_range, max_layer_frac, top_k), or pass more/different prompts.")
        err.selection = sel
        raise err
    bi, bj = min(passed, key=lambda ij: abl[ij])
    scores = {"ablation_score": float(abl[bi, bj]), "kl": float(kl[bi, bj]), "addition_score": float(addg[bi, bj]),
              "rel_norm": float(rel_grid[bi, bj])}
    direction = RefusalDirection(diff[layer_list[bj], bi], layer_list[bj], positions[bi], model.name,
                                 model.weights_hash, model.n_layers,
                                 {"scores": scores, "selection": store.jsonable(config),
                                  "filters_passed": not fallback})
    # The addition coefficient, picked on the harmless validation prompts.
    if cs:
        ld = _batched_logits(model, enc_b, len(cs), "add", torch.stack([direction.vector * c for c in cs]),
                             [direction.layer] * len(cs), batch_size)
        frac_pos = (rt.score(ld) > 0).float().mean(1).numpy()
        ok = [c for c, f in zip(cs, frac_pos) if f >= coeff_target]
        sel.addition_coeff = min(ok) if ok else max(cs)
        direction.meta["coeff_sweep"] = {str(c): float(f) for c, f in zip(cs, frac_pos)}
    direction.meta["addition_coeff"] = sel.addition_coeff
    sel.direction = direction
    sel.timings["total_s"] = time.perf_counter() - t_start
    return sel


# -- weight orthogonalisation ----------------------------------------------------------------

def _edit_sites(hf) -> tuple[torch.nn.Module, list[torch.nn.Linear]]:
    base = getattr(hf, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise InputError(f"orthogonalize supports decoder models with model.layers (Qwen2, Llama, Mistral ...); "
                         f"{type(hf).__name__} is not one. Use the ablate() hooks instead.")
    outs = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "post_feedforward_layernorm") or hasattr(layer, "pre_feedforward_layernorm"):
            raise InputError(f"{type(hf).__name__} normalises the attention/MLP outputs before adding them to the "
                             "residual stream (Gemma-style sandwich norms), so editing o_proj/down_proj does not "
                             "remove the direction. Use the ablate() hooks instead.")
        o, dn = getattr(getattr(layer, "self_attn", None), "o_proj", None), getattr(getattr(layer, "mlp", None),
                                                                                     "down_proj", None)
        if not isinstance(o, torch.nn.Linear) or not isinstance(dn, torch.nn.Linear):
            raise InputError(f"Layer {i} of {type(hf).__name__} has no self_attn.o_proj / mlp.down_proj Linear; "
                             "orthogonalize does not support this architecture. Use the ablate() hooks.")
        outs += [o, dn]
    return hf.get_input_embeddings(), outs


def orthogonalize(model: SafetyModel, direction: RefusalDirection, *, check: bool = True) -> SafetyModel:
    """A NEW model whose weights cannot write ``direction``: ablation made permanent.

    The token embedding (rows), every attention output projection (``o_proj``) and MLP output
    projection (``down_proj``, weights and any bias) get ``W <- W - d d^T W`` on their output
    side, so nothing ever adds a component along ``d`` to the residual stream: the same
    computation as :func:`ablate` at every block (float32 differences ~1e-5). A tied unembedding is
    untied first (ablation does not touch it). ``model`` is left unchanged. Save it with
    :meth:`SafetyModel.save_pretrained`; ``ls.load_model(folder)`` loads it back.

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> edited = orthogonalize(model, d)
    >>> ids = model.tokenize(model.format(["Hi"]))
    >>> with torch.no_grad(), ls.ablate(d, model=model):
    ...     hooked = model.last_position_logits(ids["input_ids"], ids["attention_mask"])
    >>> with torch.no_grad():
    ...     baked = edited.last_position_logits(ids["input_ids"], ids["attention_mask"])
    >>> float((hooked - baked).abs().max()) < 1e-4
    True
    """
    from transformer_lens import TransformerBridge

    from ..model.loading import _guard_logits, check_model

    d = _as_direction(direction)
    d.check_model(model)
    hf = hf_model_copy(model, untie=True)
    embed, outs = _edit_sites(hf)
    with torch.no_grad():
        u = d.unit.to(device=embed.weight.device, dtype=torch.float64)
        W = embed.weight.double()
        embed.weight.copy_((W - (W @ u)[:, None] * u[None, :]).to(embed.weight.dtype))
        for lin in outs:
            W = lin.weight.double()
            lin.weight.copy_((W - u[:, None] * (u @ W)[None, :]).to(lin.weight.dtype))
            if lin.bias is not None:
                b = lin.bias.double()
                lin.bias.copy_((b - (b @ u) * u).to(lin.bias.dtype))
    tok = copy.deepcopy(model.tokenizer)
    reference = _guard_logits(hf, tok) if check else None
    bridge = TransformerBridge.boot_transformers(f"{model.name}-orthogonalized", hf_model=hf, tokenizer=tok,
                                                 device=model.device, dtype=model.dtype)
    bridge.eval()
    provenance = dict(model.provenance, orthogonalized_from=model.weights_hash, direction=d.hash,
                      direction_layer=d.layer, direction_position=d.position)
    new = SafetyModel(bridge, tok, name=f"{model.name}-orthogonalized", weights_hash=weights_fingerprint(bridge),
                      chat_default=model.chat_default, aligned=None, provenance=provenance, hf_source=None)
    if check:
        check_model(new, reference)
    return new


# -- measured side effects --------------------------------------------------------------------

#: The three rates of a :class:`~lens_safety.behaviour.refusal.RefusalResult` outcome (never folded) and their
#: names in :class:`DirectionEffects` rows and the stage metrics. Refusal = replies judged "refused" only.
RATE_NAMES = {"refused": "refusal", "complied": "compliance", "unengaged": "unengaged"}
#: Condition names in the stage metrics (``harmful_refusal_ablated`` ...).
CONDITION_NAMES = {"plain": "plain", "ablate": "ablated", "add": "added"}


def _rate_columns(result) -> dict[str, float]:
    """``refusal_rate``, ``ci_low``, ``ci_high`` (the refusal rate's Wilson 95% CI) and the same
    for ``compliance_*`` and ``unengaged_*``, from :meth:`RefusalResult.rates`."""
    out: dict[str, float] = {}
    for row in result.rates().itertuples():
        name = RATE_NAMES[row.outcome]
        prefix = "" if name == "refusal" else f"{name}_"
        out[f"{name}_rate"] = float(row.rate)
        # clipped to the rate: the Wilson bounds at 0 and 1 carry float round-off (1e-17 above 0)
        out[f"{prefix}ci_low"] = min(float(row.ci_low), float(row.rate))
        out[f"{prefix}ci_high"] = max(float(row.ci_high), float(row.rate))
    return out


@torch.no_grad()
def _completion_ce(model: SafetyModel, prompts: PromptSet, completions: Sequence[str], batch_size: int) -> float:
    """Mean cross-entropy (nats/token) of ``completions`` after their formatted prompts.

    Rows are left-padded with the mask and position ids passed, so the result does not depend on
    the batch (absolute-position models included)."""
    tok = model.tokenizer
    formatted = model.format(prompts)
    total, count = 0.0, 0
    for s in range(0, len(formatted), batch_size):
        rows = []
        for f, c in zip(formatted[s:s + batch_size], completions[s:s + batch_size]):
            p_ids = tok(f, add_special_tokens=False)["input_ids"]
            c_ids = tok(c, add_special_tokens=False)["input_ids"]
            if c_ids:
                rows.append((p_ids, c_ids))
        if not rows:
            continue
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target_mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            seq = p + c
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
            target_mask[i, width - len(c):] = True
        mask = mask.to(model.device)
        logits = model.bridge(ids.to(model.device), attention_mask=mask,
                              position_ids=position_ids_from_mask(mask)).float().cpu()
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        tm = target_mask[:, 1:]
        total += float(nll[tm].sum())
        count += int(tm.sum())
    return total / count if count else float("nan")


@dataclass
class DirectionEffects:
    """Refusal with and without the direction's interventions, KL and cross-entropy side effects.

    ``table``: one row per (prompt set, condition) with n, the judge's three rates, never folded
    -- ``refusal_rate`` (replies judged "refused") with its Wilson 95% CI ``ci_low`` / ``ci_high``,
    ``compliance_rate`` (judged "complied") with ``compliance_ci_low`` / ``compliance_ci_high``,
    ``unengaged_rate`` (no answer at all) with ``unengaged_ci_low`` / ``unengaged_ci_high`` -- the
    first-token refusal rate (score > 0) and mean score. ``kl_harmless``: mean KL(base || ablated)
    of the harmless next-token distributions (``kl_ci``: its 95% t-interval over prompts). ``ce``:
    cross-entropy (nats/token) of the base model's own greedy harmless completions under each
    condition. ``results``: the :class:`~lens_safety.behaviour.refusal.RefusalResult` of each (set, condition);
    ``config["judge"]``: the identity of the judge.
    """

    table: Any
    kl_harmless: float
    ce: dict[str, float]
    coeff: float
    config: dict[str, Any] = field(default_factory=dict)
    kl_ci: tuple[float, float] = (float("nan"), float("nan"))
    results: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def to_frame(self):
        return self.table.copy()

    def _row(self, prompt_set: str, condition: str):
        t = self.table
        row = t[(t["set"] == prompt_set) & (t["condition"] == condition)]
        if row.empty:
            raise InputError(f"No row for set={prompt_set!r}, condition={condition!r}; have "
                             f"{sorted(set(zip(t['set'], t['condition'])))}.")
        return row.iloc[0]

    def rate(self, prompt_set: str, condition: str, column: str = "refusal_rate") -> float:
        """One number of the table, e.g. ``rate("harmful", "ablate")`` (refusal rate = judged refused)."""
        return float(self._row(prompt_set, condition)[column])

    def rate_ci(self, prompt_set: str, condition: str, rate: str = "refusal") -> tuple[float, float, float]:
        """``(rate, ci_low, ci_high)`` of ``rate`` (``"refusal"``, ``"compliance"`` or ``"unengaged"``)."""
        if rate not in RATE_NAMES.values():
            raise InputError(f"rate must be one of {sorted(RATE_NAMES.values())}, got {rate!r}.")
        r = self._row(prompt_set, condition)
        prefix = "" if rate == "refusal" else f"{rate}_"
        return float(r[f"{rate}_rate"]), float(r[f"{prefix}ci_low"]), float(r[f"{prefix}ci_high"])

    def metrics(self) -> dict[str, Any]:
        """Flat metrics: ``{set}_{rate}_{condition}`` and ``..._ci`` ([low, high]) for the three rates
        (e.g. ``harmful_refusal_ablated``, ``harmless_compliance_added_ci``), ``n_{set}``, the KL and CE.

        >>> import pandas as pd
        >>> row = {"set": "harmful", "condition": "ablate", "n": 4, "refusal_rate": 0.25, "ci_low": 0.05,
        ...        "ci_high": 0.7, "compliance_rate": 0.75, "compliance_ci_low": 0.3, "compliance_ci_high": 0.95,
        ...        "unengaged_rate": 0.0, "unengaged_ci_low": 0.0, "unengaged_ci_high": 0.49}
        >>> m = DirectionEffects(pd.DataFrame([row]), 0.01, {}, 1.0).metrics()
        >>> m["harmful_refusal_ablated"], m["harmful_refusal_ablated_ci"], m["harmful_compliance_ablated"]
        (0.25, [0.05, 0.7], 0.75)

        Conditions are named ``plain``, ``ablated``, ``added``; refusal = replies judged "refused".
        """
        out: dict[str, Any] = {}
        for _, r in self.table.iterrows():
            cond = CONDITION_NAMES[r["condition"]]
            out[f"n_{r['set']}"] = int(r["n"])
            for name in RATE_NAMES.values():
                rate, lo, hi = self.rate_ci(r["set"], r["condition"], name)
                out[f"{r['set']}_{name}_{cond}"] = rate
                out[f"{r['set']}_{name}_{cond}_ci"] = [lo, hi]
        out["harmless_kl_ablated"], out["harmless_kl_ablated_ci"] = self.kl_harmless, list(self.kl_ci)
        out["harmless_ce"] = dict(self.ce)
        return out

    def plot(self, ax=None):
        from . import figures as viz

        return viz.direction_effects_figure(self, ax=ax)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the effects as a :mod:`lens_safety.core.store` artifact: the table, KL, CE and config as JSON,
        each :class:`~lens_safety.behaviour.refusal.RefusalResult` in a sub-folder (``result0``, ``result1`` ...)."""
        keys = list(self.results)
        meta = {"table": store.frame_to_json(self.table), "kl_harmless": self.kl_harmless, "ce": self.ce,
                "coeff": self.coeff, "config": self.config, "kl_ci": list(self.kl_ci),
                "results": [list(k) for k in keys]}
        return store.write_artifact(directory, kind="DirectionEffects", schema_version=SCHEMA_VERSION, meta=meta,
                                    children={f"result{i}": self.results[k] for i, k in enumerate(keys)})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DirectionEffects:
        """Load what :meth:`save` wrote (and its RefusalResults); :class:`~lens_safety.core.errors.CacheError` if
        it or one of its sub-folders is missing or damaged."""
        from ..behaviour.refusal import RefusalResult
        from ..core.errors import CacheError

        _, meta = store.read_artifact(directory, kind="DirectionEffects", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            results = {(str(s), str(c)): RefusalResult.load(Path(directory) / f"result{i}")
                       for i, (s, c) in enumerate(meta["results"])}
            f = store.json_float
            return cls(store.frame_from_json(meta["table"]), f(meta["kl_harmless"]),
                       {str(k): f(v) for k, v in meta["ce"].items()}, float(meta["coeff"]), dict(meta["config"]),
                       (f(meta["kl_ci"][0]), f(meta["kl_ci"][1])), results)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved DirectionEffects is malformed ({e}); delete it and "
                             "recompute.") from e


@torch.no_grad()
def direction_effects(model: SafetyModel, direction: RefusalDirection, harmful: PromptSet | Sequence[str],
                      harmless: PromptSet | Sequence[str], borderline: PromptSet | Sequence[str] | None = None, *,
                      coeff: float | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                      cache: bool | str | os.PathLike = True, progress: bool = False,
                      judge=None) -> DirectionEffects:
    """Refusal, compliance and unengaged rates (``judge`` on greedy completions, Wilson 95% CIs) and
    the first-token score of each set, plain and edited.

    Harmful prompts: plain vs :func:`ablate` (the jailbreak rate is the compliance rate). Harmless and
    borderline prompts: plain vs :func:`add` with ``coeff`` (default: the selection's
    ``addition_coeff`` from ``direction.meta``, else 1) -- over-refusal -- and vs ablation (does
    ablation change answers to harmless requests?). Also the harmless next-token KL under ablation
    and the cross-entropy of the base model's harmless completions before and after each edit.
    Generations are cached (the interventions change ``weights_hash`` while active). ``judge``:
    as for :func:`~lens_safety.evaluate_refusal` (``None``: the default judge).
    """
    import pandas as pd

    from ..behaviour.judges import as_judge
    from ..behaviour.refusal import _as_set, evaluate_refusal
    from ..core.stats import mean_ci

    d = _as_direction(direction)
    d.check_model(model)
    coeff = float(d.meta.get("addition_coeff", 1.0) if coeff is None else coeff)
    sets = {"harmful": _as_set(harmful, "harmful"), "harmless": _as_set(harmless, "harmless")}
    if borderline is not None:
        sets["borderline"] = _as_set(borderline, "borderline")
    judge = as_judge(judge, model)
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "cache": cache, "progress": progress,
          "judge": judge}
    conditions = {"harmful": ("plain", "ablate"), "harmless": ("plain", "add", "ablate"),
                  "borderline": ("plain", "add", "ablate")}
    rows, results = [], {}
    for name, ps in sets.items():
        for cond in conditions[name]:
            ctx = (ablate(d, model=model) if cond == "ablate" else add(d, coeff=coeff, model=model) if cond == "add"
                   else _null())
            with ctx:
                r = evaluate_refusal(model, ps, **kw)
            results[(name, cond)] = r
            rows.append({"set": name, "condition": cond, "n": len(r), **_rate_columns(r),
                         "first_token_rate": float(np.mean(r.score > 0)), "mean_score": float(np.mean(r.score))})
    # KL of harmless next-token distributions under ablation; CE of the plain harmless completions.
    hl = sets["harmless"]
    enc = model.tokenize(model.format(hl))
    with torch.no_grad():
        base = _last_logits_batched(model, enc, batch_size)
        with ablate(d, model=model):
            abl = _last_logits_batched(model, enc, batch_size)
    kl, kl_lo, kl_hi = mean_ci(_kl(base, abl).numpy())
    plain = results[("harmless", "plain")]
    ce = {"plain": _completion_ce(model, hl, plain.completions, batch_size)}
    with ablate(d, model=model):
        ce["ablate"] = _completion_ce(model, hl, plain.completions, batch_size)
    with add(d, coeff=coeff, model=model):
        ce["add"] = _completion_ce(model, hl, plain.completions, batch_size)
    return DirectionEffects(pd.DataFrame(rows), float(kl), ce, coeff,
                            {"max_new_tokens": max_new_tokens, "direction": d.hash, "layer": d.layer,
                             "position": d.position, "judge": judge.identity}, (float(kl_lo), float(kl_hi)),
                            results)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@torch.no_grad()
def _last_logits_batched(model: SafetyModel, enc: dict[str, Tensor], batch_size: int) -> Tensor:
    outs = []
    for s in range(0, enc["input_ids"].shape[0], batch_size):
        outs.append(model.last_position_logits(enc["input_ids"][s:s + batch_size],
                                               enc["attention_mask"][s:s + batch_size]).float().cpu())
    return torch.cat(outs)


@dataclass
class CoefficientSweep:
    """First-token refusal scores ``[n_coeffs, n_prompts]`` for ``coeff x vector`` added, per prompt.

    ``plain`` is the unedited score per prompt, ``system`` the score with a cautious system prompt
    (a prompting baseline). A prompt "moves the wrong way" when a positive coefficient lowers
    its score (or a negative one raises it).
    """

    coeffs: list[float]
    scores: np.ndarray
    plain: np.ndarray
    system: np.ndarray | None
    labels: list[str]
    layer: int

    def to_frame(self):
        """Per coefficient and label: mean score, refusal fraction (score > 0), wrong-way fraction."""
        import pandas as pd

        rows = []
        labels = np.asarray(self.labels)
        for lab in sorted(set(self.labels)):
            m = labels == lab
            for c, s in zip(self.coeffs, self.scores):
                delta = s[m] - self.plain[m]
                wrong = float(np.mean(delta < 0)) if c > 0 else float(np.mean(delta > 0)) if c < 0 else 0.0
                rows.append({"label": lab, "coeff": c, "n": int(m.sum()), "mean_score": float(s[m].mean()),
                             "refusal_fraction": float(np.mean(s[m] > 0)), "wrong_way_fraction": wrong})
            if self.system is not None:
                rows.append({"label": lab, "coeff": float("nan"), "n": int(m.sum()),
                             "mean_score": float(self.system[m].mean()),
                             "refusal_fraction": float(np.mean(self.system[m] > 0)),
                             "wrong_way_fraction": float(np.mean(self.system[m] < self.plain[m])),
                             "baseline": "cautious system prompt"})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        from . import figures as viz

        return viz.coefficient_sweep_figure(self, ax=ax)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the sweep as a :mod:`lens_safety.core.store` artifact (scores in safetensors, the rest JSON)."""
        tensors = {"scores": np.asarray(self.scores, dtype=np.float64), "plain": np.asarray(self.plain, np.float64)}
        if self.system is not None:
            tensors["system"] = np.asarray(self.system, dtype=np.float64)
        meta = {"coeffs": [float(c) for c in self.coeffs], "labels": [str(x) for x in self.labels],
                "layer": int(self.layer)}
        return store.write_artifact(directory, kind="CoefficientSweep", schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors=tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CoefficientSweep:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it is missing or damaged."""
        from ..core.errors import CacheError

        t, meta = store.read_artifact(directory, kind="CoefficientSweep", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            coeffs, labels = [float(c) for c in meta["coeffs"]], [str(x) for x in meta["labels"]]
            if t["scores"].shape != (len(coeffs), len(labels)) or t["plain"].shape != (len(labels),):
                raise ValueError("the scores, coefficients and labels do not agree in shape")
            return cls(coeffs, t["scores"], t["plain"], t.get("system"), labels, int(meta["layer"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved CoefficientSweep is malformed ({e}); delete it and "
                             "recompute.") from e


@torch.no_grad()
def coefficient_sweep(model: SafetyModel, direction: RefusalDirection, prompts: PromptSet | Sequence[str],
                      coeffs: Sequence[float] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0), *,
                      layer: int | None = None, system: str | None = CAUTIOUS_SYSTEM_PROMPT,
                      batch_size: int = 32) -> CoefficientSweep:
    """First-token refusal score of every prompt for each addition coefficient (batched: stacked copies).

    Negative coefficients subtract the direction. ``system``: the prompting baseline (``None``
    skips it). The per-prompt distribution is kept: :meth:`CoefficientSweep.to_frame` reports the
    fraction of prompts that move the wrong way.

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> sw = coefficient_sweep(model, d, ["Hi", "Bake bread"], coeffs=(0.0, 1.0), system=None)
    >>> sw.scores.shape
    (2, 2)
    """
    from ..behaviour.refusal import RefusalTokens, _as_set, first_token_scores

    d = _as_direction(direction)
    d.check_model(model)
    ps = _as_set(prompts)
    cs = [float(c) for c in coeffs]
    if not cs:
        raise InputError("coeffs is empty; pass at least one coefficient.")
    layer = d.layer if layer is None else layer
    add(d, layer=layer)  # validates the layer
    rt = RefusalTokens.from_tokenizer(model.tokenizer)
    enc = model.tokenize(model.format(ps))
    logits = _batched_logits(model, enc, len(cs), "add", torch.stack([d.vector * c for c in cs]),
                             [layer] * len(cs), batch_size)
    scores = rt.score(logits).numpy()
    plain = rt.score(_last_logits_batched(model, enc, batch_size)).numpy()
    sys_scores = None
    if system is not None:
        sys_scores = first_token_scores(model, ps, batch_size=batch_size, system=system, tokens=rt).numpy()
    return CoefficientSweep(cs, scores.astype(np.float64), plain.astype(np.float64),
                            None if sys_scores is None else sys_scores.astype(np.float64), ps.labels, int(layer))


# -- tie it to the paper -----------------------------------------------------------------------

@dataclass
class DirectionGeometry:
    """Per residual layer: mean projection of each prompt group on the unit direction (with a 95%
    CI) and, when probes are given, the cosine between each layer's probe normal and the direction."""

    frame: Any
    cosine: np.ndarray | None
    direction_layer: int

    def to_frame(self):
        return self.frame.copy()

    def plot(self, ax=None):
        from . import figures as viz

        return viz.direction_geometry_figure(self, ax=ax)

    _COLUMNS = {"layer": np.int64, "projection": np.float64, "ci_low": np.float64, "ci_high": np.float64,
                "n": np.int64}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the geometry as a :mod:`lens_safety.core.store` artifact (numbers in safetensors, groups JSON)."""
        tensors = {k: self.frame[k].to_numpy(dtype=v) for k, v in self._COLUMNS.items()}
        if self.cosine is not None:
            tensors["cosine"] = np.asarray(self.cosine, dtype=np.float64)
        meta = {"group": [str(g) for g in self.frame["group"]], "direction_layer": int(self.direction_layer)}
        return store.write_artifact(directory, kind="DirectionGeometry", schema_version=SCHEMA_VERSION, meta=meta,
                                    tensors=tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DirectionGeometry:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it is missing or damaged."""
        import pandas as pd

        from ..core.errors import CacheError

        t, meta = store.read_artifact(directory, kind="DirectionGeometry", schema_version=SCHEMA_VERSION,
                                      framework="numpy")
        try:
            frame = pd.DataFrame({"group": [str(g) for g in meta["group"]], **{k: t[k] for k in cls._COLUMNS}})
            return cls(frame, t.get("cosine"), int(meta["direction_layer"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{directory}: saved DirectionGeometry is malformed ({e}); delete it and "
                             "recompute.") from e


def direction_geometry(model: SafetyModel, direction: RefusalDirection, groups: dict[str, Any], *,
                       probes=None, batch_size: int = 16, cache: bool | str | os.PathLike = True) -> DirectionGeometry:
    """Projection of prompt groups on the direction, layer by layer (last position), and probe cosines.

    ``groups`` maps a name (``"harmless"``, ``"harmful"``, ``"jailbroken"`` ...) to prompts or to
    :class:`~lens_safety.capture.Residuals` with ``positions="last"``. ``probes``: a
    :class:`~lens_safety.analyses.probes.ProbeResult`; its per-layer unit normals are compared with the
    direction (cosine; NaN for probes without a linear normal). Does a jailbreak keep the
    harmful projection early and lose it at the break layer? Compare the curves.
    """
    import pandas as pd

    from ..capture import Residuals, collect_residuals
    from ..core.stats import mean_ci

    d = _as_direction(direction)
    d.check_model(model)
    u = d.unit.double()
    rows = []
    for name, g in groups.items():
        res = g if isinstance(g, Residuals) else collect_residuals(model, g, batch_size=batch_size, cache=cache,
                                                                   progress=False)
        model.check_compatible(res.weights_hash, res.d_model, what=f"residuals of {name!r}")
        if res.values.dim() != 3:
            raise InputError(f"Group {name!r}: geometry needs positions='last' residuals, got {res.positions!r}.")
        proj = (res.values.double() @ u).numpy()  # [n, layers]
        for lay in range(proj.shape[1]):
            m, lo, hi = mean_ci(proj[:, lay])
            rows.append({"group": name, "layer": lay, "projection": m, "ci_low": lo, "ci_high": hi,
                         "n": proj.shape[0]})
    cos = None
    if probes is not None:
        W = np.asarray(probes.weight_directions(), dtype=np.float64)
        if W.shape[-1] != d.d_model:
            raise ModelMismatchError(f"The probes have d_model={W.shape[-1]}, the direction {d.d_model}.")
        cos = W @ u.numpy()
        layers = list(getattr(probes, "layers", range(W.shape[0])))
        for lay, c in zip(layers, cos):
            rows.append({"group": "probe cosine", "layer": int(lay), "projection": float(c), "ci_low": float("nan"),
                         "ci_high": float("nan"), "n": 1})
    return DirectionGeometry(pd.DataFrame(rows), cos, d.layer)


def band_ablation(model: SafetyModel, direction: RefusalDirection, prompts: PromptSet | Sequence[str],
                  band: tuple[int, int], *, batch_size: int = 16):
    """First-token refusal with the direction ablated everywhere, only inside blocks ``band[0]..band[1]``
    (inclusive; e.g. the patching break band), and only outside it. A frame: condition, blocks,
    mean score, refusal fraction (score > 0).

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> band_ablation(model, d, ["Hi"], (1, 1))["condition"].tolist()
    ['plain', 'ablate all', 'ablate inside band', 'ablate outside band']
    """
    import pandas as pd

    from ..behaviour.refusal import _as_set, first_token_scores

    d = _as_direction(direction)
    d.check_model(model)
    lo, hi = int(band[0]), int(band[1])
    if not 0 <= lo <= hi < model.n_layers:
        raise InputError(f"band must be (first, last) blocks with 0 <= first <= last < {model.n_layers}, got {band!r}.")
    ps = _as_set(prompts)
    inside = list(range(lo, hi + 1))
    outside = [b for b in range(model.n_layers) if b not in inside]
    rows = []
    for cond, blocks in (("plain", None), ("ablate all", list(range(model.n_layers))),
                         ("ablate inside band", inside), ("ablate outside band", outside)):
        hooks = ablate(d, layers=blocks) if blocks else []
        s = first_token_scores(model, ps, batch_size=batch_size, fwd_hooks=hooks).numpy()
        rows.append({"condition": cond, "blocks": f"{blocks[0]}..{blocks[-1]}" if blocks else "",
                     "n_blocks": len(blocks or []), "mean_score": float(s.mean()),
                     "refusal_fraction": float(np.mean(s > 0))})
    return pd.DataFrame(rows)


@torch.no_grad()
def direction_logit_lens(model: SafetyModel, direction: RefusalDirection, top_k: int = 10):
    """Tokens the direction promotes and suppresses: ``unembed(final_norm(d))``, top and bottom ``top_k``.

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> len(direction_logit_lens(model, d, top_k=3))
    3
    """
    import pandas as pd

    d = _as_direction(direction)
    if d.d_model != model.d_model:
        raise ModelMismatchError(f"The direction has d_model={d.d_model}, {model.name} has {model.d_model}.")
    top_k = check_int(top_k, "top_k", low=1)
    u = d.unit.to(device=model.device, dtype=model.dtype)
    logits = model.unembed(model.final_norm(u[None, None]))[0, 0].float().cpu()
    logits = logits - logits.mean()
    up, down = logits.topk(top_k), (-logits).topk(top_k)
    dec = model.tokenizer.decode
    return pd.DataFrame({"rank": range(1, top_k + 1), "promoted": [dec([int(i)]) for i in up.indices],
                         "promoted_logit": up.values.tolist(),
                         "suppressed": [dec([int(i)]) for i in down.indices],
                         "suppressed_logit": (-down.values).tolist()})


# -- the pipeline stage and the CLI command ------------------------------------------------------

def directions_stage(model: SafetyModel, harmful: PromptSet | Sequence[str], harmless: PromptSet | Sequence[str],
                     borderline: PromptSet | Sequence[str] | None = None, *, n_train: int = 128, n_val: int = 32,
                     n_eval: int = 32, max_new_tokens: int = 32, layers: Sequence[int] | None = None,
                     screen: int | None = 8, top_k: int = 8, batch_size: int = 32, probes=None,
                     break_band: tuple[int, int] | None = None, jailbroken: PromptSet | None = None,
                     check_orthogonalized: bool = True, seed: int = 0, cache: bool | str | os.PathLike = True,
                     progress: bool = False, select_kwargs: dict[str, Any] | None = None,
                     judge=None) -> dict[str, Any]:
    """The refusal-direction stage of ``lens-safety run``: select, intervene, measure, tie to the paper.

    Harmful and harmless prompts are split (seeded) into train / validation (selection) and a
    held-out rest, of which ``n_eval`` each are evaluated with greedy generation
    (``max_new_tokens``). Returns ``{"metrics": {...}, "frames": {name: DataFrame},
    "figures": {name: Figure}, "selection": DirectionSelection, "direction": RefusalDirection,
    "effects": DirectionEffects, "orthogonalized": RefusalResult | None}``. ``probes`` (a ProbeResult),
    ``break_band`` (first, last block of the patching break band) and ``jailbroken`` prompts add
    the geometry and band rows. ``select_kwargs`` pass through to :func:`select_refusal_direction`
    (e.g. ``kl_max``, ``coeffs``); the stage defaults to ``on_empty="best"`` (metric
    ``filters_passed`` says whether it was needed). ``judge`` judges every reply (as for
    :func:`~lens_safety.evaluate_refusal`; metric ``judge`` is its identity). The metrics hold the
    three rates of each set and condition with Wilson 95% CIs (:meth:`DirectionEffects.metrics`:
    ``harmful_refusal_ablated``, ``harmful_refusal_ablated_ci``, ``harmful_compliance_ablated`` ...;
    refusal rate = replies judged refused).
    """
    from ..behaviour.judges import as_judge
    from ..behaviour.refusal import _as_set, evaluate_refusal, first_token_scores

    harmful, harmless = _as_set(harmful, "harmful"), _as_set(harmless, "harmless")
    judge = as_judge(judge, model)
    t0 = time.perf_counter()
    sel = select_refusal_direction(model, harmful, harmless, n_train=n_train, n_val=n_val, layers=layers,
                                   screen=screen, top_k=top_k, batch_size=batch_size, seed=seed, cache=cache,
                                   progress=progress, **{"on_empty": "best", **(select_kwargs or {})})
    d = sel.direction
    h_eval = split_prompts(harmful, n_train, n_val, seed, "harmful")[2]
    b_eval = split_prompts(harmless, n_train, n_val, seed, "harmless")[2]
    h_eval, b_eval = h_eval[:n_eval], b_eval[:n_eval]
    if len(h_eval) == 0 or len(b_eval) == 0:
        raise InputError(f"No held-out prompts left for evaluation ({len(harmful)} harmful, {len(harmless)} "
                         f"harmless; n_train={n_train}, n_val={n_val}); pass more prompts or smaller splits.")
    bl = None if borderline is None else _as_set(borderline, "borderline")[:n_eval]
    eff = direction_effects(model, d, h_eval, b_eval, bl, coeff=sel.addition_coeff,
                            max_new_tokens=max_new_tokens, batch_size=min(batch_size, 16), cache=cache,
                            progress=progress, judge=judge)
    sweep = coefficient_sweep(model, d, PromptSet(list(h_eval[:32]) + list(b_eval[:32])), batch_size=batch_size)
    lens = direction_logit_lens(model, d)
    metrics: dict[str, Any] = {
        "layer": d.layer, "position": d.position, "relative_depth": d.layer / model.n_layers,
        "addition_coeff": sel.addition_coeff, "n_candidates": int(sel.reason.size),
        "filters_passed": bool(d.meta.get("filters_passed", True)),
        "filters": sel.filter_counts(), **{f"val_{k}": v for k, v in d.meta["scores"].items()},
        "judge": judge.identity,
        **eff.metrics(), "n_eval_harmful": len(h_eval), "n_eval_harmless": len(b_eval),
        "selection_s": sel.timings.get("total_s"), "s_per_candidate": sel.timings.get("s_per_candidate"),
    }
    frames = {"direction_candidates": sel.to_frame(), "direction_effects": eff.to_frame(),
              "direction_sweep": sweep.to_frame(), "direction_logit_lens": lens}
    figures = {"direction_selection": sel.plot(), "direction_effects": eff.plot(),
               "direction_sweep": sweep.plot()}
    if check_orthogonalized:
        orth = orthogonalize(model, d)
        hooked = first_token_scores(model, h_eval, batch_size=16, fwd_hooks=ablate(d))
        baked = first_token_scores(orth, h_eval, batch_size=16)
        r_orth = evaluate_refusal(orth, h_eval, max_new_tokens=max_new_tokens, batch_size=16, cache=cache,
                                  progress=progress, judge=judge)
        metrics["orthogonalized_max_score_diff"] = float((hooked - baked).abs().max())
        for row in r_orth.rates().itertuples():
            metrics[f"harmful_{RATE_NAMES[row.outcome]}_orthogonalized"] = float(row.rate)
            metrics[f"harmful_{RATE_NAMES[row.outcome]}_orthogonalized_ci"] = [float(row.ci_low), float(row.ci_high)]
        del orth
    if jailbroken is not None or probes is not None:
        groups = {"harmless": b_eval, "harmful": h_eval}
        if jailbroken is not None:
            groups["jailbroken"] = _as_set(jailbroken, "jailbreak")
        geo = direction_geometry(model, d, groups, probes=probes, cache=cache)
        frames["direction_geometry"] = geo.to_frame()
        figures["direction_geometry"] = geo.plot()
    if break_band is not None:
        band = band_ablation(model, d, h_eval, break_band)
        frames["direction_band"] = band
        metrics["band_refusal_fraction"] = dict(zip(band["condition"], band["refusal_fraction"]))
    metrics["stage_s"] = time.perf_counter() - t0
    return {"metrics": store.jsonable(metrics), "frames": frames, "figures": figures, "selection": sel,
            "direction": d, "effects": eff, "orthogonalized": r_orth if check_orthogonalized else None}


def orthogonalize_to_folder(out: str | os.PathLike, model_name: str | None = None, *,
                            direction: str | os.PathLike | RefusalDirection | None = None,
                            harmful: str = "harmbench", harmless: str = "harmless", n_train: int = 128,
                            n_val: int = 32, layers: Sequence[int] | None = None, screen: int | None = 8,
                            top_k: int = 8, model: SafetyModel | None = None) -> Path:
    """``lens-safety orthogonalize --out DIR``: load, select (or load) the direction, bake it in, save.

    Writes a Hugging Face folder (safetensors + tokenizer; ``ls.load_model(out)`` loads it) with
    the direction saved beside the weights in ``out/refusal_direction``. ``direction``: a saved
    direction folder or object (skips selection). Returns ``out``.
    """
    from ..inputs.prompts import load_prompts
    from ..model.loading import load_model

    model = model if model is not None else load_model(model_name)
    if direction is None:
        sel = select_refusal_direction(model, load_prompts(harmful), load_prompts(harmless), n_train=n_train,
                                       n_val=n_val, layers=layers, screen=screen, top_k=top_k)
        d = sel.direction
    else:
        d = direction if isinstance(direction, RefusalDirection) else RefusalDirection.load(direction)
    orth = orthogonalize(model, d)
    out = Path(out)
    orth.save_pretrained(out)
    d.save(out / "refusal_direction")
    (out / "README.lens_safety.json").write_text(json.dumps(store.jsonable(
        {"base_model": model.name, "base_weights_hash": model.weights_hash, "direction": d.hash,
         "layer": d.layer, "position": d.position, "meta": d.meta}), indent=1))
    return out
