"""The tuned lens itself: per-layer affine translators (:class:`TunedLens`), their training by
self-distillation (:func:`train_tuned_lens`; the method is described in :mod:`lens_safety.analyses.lens.tuned`),
the training / held-out prompts and the cache (:func:`resolve_lens`).

A module below :mod:`lens_safety.analyses.lens.logit`, so that ``logit_lens(lens="tuned")`` can resolve and train
a lens; :mod:`lens_safety.analyses.lens.tuned` (the public module, which re-exports these names) adds the
diagnostics that compare both lenses. Imports: :mod:`lens_safety.analyses.lens.readout` (decoding), never the
lens modules.

>>> import torch, lens_safety as ls
>>> from lens_safety.analyses.lens.readout import lens_logits
>>> model = ls.testing.tiny_model()
>>> h = torch.randn(2, model.n_layers + 1, model.d_model)
>>> torch.equal(TunedLens.identity(model).logits(model, h), lens_logits(model, h))  # untrained = logit lens
True
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...behaviour import refusal
from ...core import assets, store
from ...core.errors import CacheError, InputError, ModelMismatchError
from ...core.validation import check_int, check_number
from ...inputs.prompts import PromptSet, as_prompt_set, load_prompts
from .. import figures as viz
from .readout import _check_finite, lens_logits

__all__ = ["TunedLens", "TunedLensConfig", "train_tuned_lens", "default_training_prompts", "held_out_prompts",
           "check_held_out", "prompt_digests", "tuned_lens_cache_dir", "resolve_lens", "lens_name", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
KIND = "tuned_lens"


# -- configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunedLensConfig:
    """Training budget and settings (all recorded in the saved lens and in its cache key).

    The defaults are the budget measured on the default model (README, "tuned lens"): about
    37 minutes of wall time on 2 shared CPU cores (36.6 measured), most of it the one-off generation
    and capture.
    """

    steps: int = 200              #: optimiser steps
    batch_positions: int = 64     #: token positions per step (every layer is trained on each)
    lr: float = 3e-3              #: Adam learning rate (decays linearly to 0)
    top_k: int = 16               #: final-distribution tokens kept exactly per position
    n_sampled: int = 512          #: uniformly sampled remainder tokens per step (shared by the batch)
    max_positions: int = 4096     #: token positions kept for training (sampled from all texts)
    max_new_tokens: int = 24      #: greedy completion appended to each prompt (0 = prompts only)
    batch_size: int = 8           #: texts per forward pass during capture and generation
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "lr":
                v = check_number(v, "lr", low=0, inclusive=(False, True))
            else:
                v = check_int(v, f.name, low=0 if f.name in ("max_new_tokens", "seed") else 1)
            object.__setattr__(self, f.name, v)  # frozen; numpy scalars become Python numbers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the lens --------------------------------------------------------------------------------------

@dataclass
class TunedLens:
    """Affine translators for residual layers ``0..n_layers-1``; layer ``n_layers`` is the identity.

    ``weight[l]`` (``[d_model, d_model]``) and ``bias[l]`` (``[d_model]``) map a raw residual
    ``h`` of layer ``l`` (0 = embedding output, ``l`` = output of block ``l-1``, no final norm) to
    ``h + h @ weight[l].T + bias[l]``, which is then decoded like the logit lens (final norm once,
    unembedding). ``history`` is the estimated training KL (mean over layers) per step.
    """

    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    model_name: str
    weights_hash: str
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    train_seconds: float = math.nan

    def __post_init__(self) -> None:
        if self.weight.dim() != 3 or self.weight.shape[1] != self.weight.shape[2]:
            raise InputError(f"weight must be [n_layers, d_model, d_model], got {tuple(self.weight.shape)}.")
        if tuple(self.bias.shape) != tuple(self.weight.shape[:2]):
            raise InputError(f"bias must be [n_layers, d_model]={tuple(self.weight.shape[:2])}, "
                             f"got {tuple(self.bias.shape)}.")

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def steps(self) -> int:
        return len(self.history)

    def __repr__(self) -> str:
        return (f"TunedLens(model={self.model_name!r}, layers=0..{self.n_layers}, steps={self.steps}, "
                f"positions={self.data.get('n_positions')})")

    @classmethod
    def identity(cls, model) -> TunedLens:
        """The untrained lens (every translator the identity): it reads exactly like the logit lens."""
        L, d = model.n_layers, model.d_model
        return cls(torch.zeros(L, d, d), torch.zeros(L, d), model.name, model.weights_hash)

    def check_model(self, model) -> None:
        """Raise :class:`~lens_safety.core.errors.ModelMismatchError` unless this lens was trained on ``model``."""
        model.check_compatible(self.weights_hash, self.d_model, what=f"tuned lens (trained on {self.model_name})")
        if self.n_layers != model.n_layers:
            raise ModelMismatchError(f"The tuned lens has {self.n_layers} translators; {model.name} has "
                                     f"{model.n_layers} layers. Train a lens for this model.")

    def translate(self, resid: Float[Tensor, "*batch layer d_model"]) -> Float[Tensor, "*batch layer d_model"]:
        """Translate residuals of every layer (axis -2 holds layers ``0..n_layers``; the last is kept)."""
        if resid.shape[-2] != self.n_layers + 1 or resid.shape[-1] != self.d_model:
            raise InputError(f"Expected residuals [..., n_layers+1, d_model]=[..., {self.n_layers + 1}, "
                             f"{self.d_model}], got {tuple(resid.shape)}.")
        x = resid[..., :-1, :]
        w = self.weight.to(device=resid.device, dtype=resid.dtype)
        b = self.bias.to(device=resid.device, dtype=resid.dtype)
        y = x + torch.einsum("...ld,lkd->...lk", x, w) + b
        return torch.cat([y, resid[..., -1:, :]], dim=-2)

    def translate_layer(self, resid: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch d_model"]:
        """Translate residuals of one layer (0..n_layers; ``n_layers`` is returned unchanged)."""
        if not 0 <= layer <= self.n_layers:
            raise InputError(f"layer must be in 0..{self.n_layers}, got {layer}.")
        if layer == self.n_layers:
            return resid
        w = self.weight[layer].to(device=resid.device, dtype=resid.dtype)
        return resid + resid @ w.T + self.bias[layer].to(device=resid.device, dtype=resid.dtype)

    def logits(self, model, resid: Float[Tensor, "*batch layer d_model"]) -> Float[Tensor, "*batch layer d_vocab"]:
        """Full-vocabulary readout of every layer: ``unembed(final_norm(translate(resid)))``."""
        with torch.no_grad():
            return lens_logits(model, self.translate(resid.to(model.device, torch.float32)))

    # -- persistence ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "weights_hash": self.weights_hash, "n_layers": self.n_layers,
                "d_model": self.d_model, "config": self.config, "data": self.data, "steps": self.steps,
                "history": self.history, "train_seconds": self.train_seconds}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the lens (safetensors + JSON with model weights hash, data hash, steps, config)."""
        return store.write_artifact(directory, kind=KIND, schema_version=SCHEMA_VERSION, meta=self._meta(),
                                    tensors={"weight": self.weight.float(), "bias": self.bias.float()})

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None) -> TunedLens:
        """Read a saved lens (verified); with ``model``, refuse a lens trained on another model."""
        tensors, meta = store.read_artifact(directory, kind=KIND, schema_version=SCHEMA_VERSION)
        lens = cls(tensors["weight"], tensors["bias"], meta["model_name"], meta["weights_hash"],
                   meta.get("config", {}), meta.get("data", {}), [float(x) for x in meta.get("history", [])],
                   float(meta["train_seconds"]) if meta.get("train_seconds") is not None else math.nan)
        if model is not None:
            lens.check_model(model)
        return lens

    def to_frame(self):
        """Training history: one row per optimiser step (``step``, estimated mean KL ``kl``)."""
        import pandas as pd

        return pd.DataFrame({"step": np.arange(1, self.steps + 1), "kl": np.asarray(self.history, dtype=float)})

    def plot(self, ax=None):
        """The training curve (estimated KL averaged over layers, per step)."""
        return viz.tuned_lens_training_figure(self, ax=ax)


# -- data --------------------------------------------------------------------------------------------

def tuned_lens_cache_dir() -> Path:
    """Where trained lenses are cached: ``$LENS_SAFETY_HOME/tuned_lens``."""
    return assets.cache_dir() / "tuned_lens"


SPLIT_SEED = 0  #: the train / held-out split of every set is fixed; ``seed`` only draws inside a split


def _split(name: str, part: int) -> PromptSet:
    """The 70% train (``part=0``) or 30% held-out (``part=1``) split of a built-in set, independent of any seed."""
    return load_prompts(name).split(0.3, seed=SPLIT_SEED)[part]


def default_training_prompts(seed: int = 0) -> PromptSet:
    """The default training prompts: 48 each from the 70% train splits of ``harmbench`` and
    ``harmless`` and 32 ``generic`` prompts, drawn with ``seed``. The splits do not depend on the
    seed, so :func:`held_out_prompts` (any seed) never returns a prompt used here (any seed)."""
    parts = [_split(name, 0) for name in ("harmbench", "harmless", "generic")]
    picked = [ps.sample(k, seed=seed) for ps, k in zip(parts, (48, 48, 32))]
    return PromptSet([p for ps in picked for p in ps], name="tuned-lens-train")


def held_out_prompts(n: int = 32, seed: int = 0) -> PromptSet:
    """``n`` harmful and ``n`` harmless prompts drawn with ``seed`` from the 30% held-out splits,
    which are disjoint from the splits :func:`default_training_prompts` draws from, whatever the seeds.

    >>> from lens_safety.analyses.lens.tuned import default_training_prompts, held_out_prompts
    >>> all(not set(held_out_prompts(16, seed=s).texts) & set(default_training_prompts(t).texts)
    ...     for s in range(4) for t in range(2))
    True
    """
    harmful, harmless = _split("harmbench", 1), _split("harmless", 1)
    return PromptSet(list(harmful.sample(min(n, len(harmful)), seed=seed))
                     + list(harmless.sample(min(n, len(harmless)), seed=seed)), name="tuned-lens-held-out")


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def prompt_digests(prompts) -> list[str]:
    """Short sha256 digests of prompt texts, sorted: what a trained lens records of its training prompts."""
    return sorted({_digest(t) for t in as_prompt_set(prompts).texts})


def check_held_out(train, held) -> None:
    """Raise :class:`~lens_safety.core.errors.InputError` if any prompt of ``held`` is in ``train``
    (PromptSets or lists of texts): a KL measured on training prompts flatters the lens.

    >>> check_held_out(["Tell me a story", "Make a bomb"], ["Write a poem"])
    >>> check_held_out(["Tell me a story", "Make a bomb"], ["Write a poem", "Make a bomb"])
    Traceback (most recent call last):
    ...
    lens_safety.core.errors.InputError: 1 of the 2 held-out prompts were used to train the tuned lens (e.g. 'Make a bomb'): a KL measured on them flatters the lens. Use held_out_prompts(), or prompts outside its training set.
    """  # noqa: E501
    _check_disjoint(set(prompt_digests(train)), held)


def _check_disjoint(train_digests: set[str], held) -> None:
    texts = as_prompt_set(held).texts
    seen = [t for t in texts if _digest(t) in train_digests]
    if seen:
        raise InputError(f"{len(seen)} of the {len(texts)} held-out prompts were used to train the tuned lens "
                         f"(e.g. {seen[0][:80]!r}): a KL measured on them flatters the lens. Use held_out_prompts(), "
                         "or prompts outside its training set.")


def _training_digests(lens: TunedLens) -> set[str] | None:
    """The digests of the prompts ``lens`` was trained on; for a lens saved before they were recorded,
    those of :func:`default_training_prompts` when its prompts hash matches; else None (unknown)."""
    if lens.data.get("prompt_digests") is not None:
        return set(lens.data["prompt_digests"])
    default = default_training_prompts()
    if lens.data.get("prompts_hash") == default.hash():
        return set(prompt_digests(default))
    return None


def _data_key(model, ps: PromptSet, cfg: TunedLensConfig, system, chat) -> dict[str, Any]:
    return {"weights_hash": model.weights_hash, "prompts_hash": ps.hash(),
            "formatting": model.formatting_key(system=system, chat=chat), "config": cfg.to_dict(),
            "schema_version": SCHEMA_VERSION}


@dataclass
class _Data:
    x: Tensor          # [P, n_layers, d] float16: layers 0..n_layers-1
    final: Tensor      # [P, d] float32: layer n_layers
    logz: Tensor       # [P] float32: final log-normaliser over the full vocabulary
    top: Tensor        # [P, top_k] long: final top-k ids
    n_texts: int
    n_tokens: int
    texts_sha256: str
    timing: dict[str, float]


def _collect(model, ps: PromptSet, cfg: TunedLensConfig, system, chat, progress: bool) -> _Data:
    t0 = time.perf_counter()
    formatted = model.format(ps, system=system, chat=chat)
    if cfg.max_new_tokens > 0:
        completions = refusal.generate(model, ps, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                       system=system, chat=chat, progress=progress)
        texts = [f + c for f, c in zip(formatted, completions)]
    else:
        texts = formatted
    t_gen = time.perf_counter() - t0
    enc = model.tokenize(texts, chat=chat, truncate=True)
    lengths = enc["attention_mask"].sum(1).cpu()
    n_tokens = int(lengths.sum())
    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(rng.choice(n_tokens, size=min(cfg.max_positions, n_tokens), replace=False))
    # global position index -> (text, offset from the text's end); texts processed sorted by length
    ends = np.cumsum(lengths.numpy())
    text_of = np.searchsorted(ends, keep, side="right")
    from_end = ends[text_of] - keep  # 1 = last token
    L, d = model.n_layers, model.d_model
    P = keep.size
    x = torch.empty(P, L, d, dtype=torch.float16)
    final = torch.empty(P, d, dtype=torch.float32)
    order = np.argsort(lengths.numpy(), kind="stable")
    names = [model.resid_hook_name(layer) for layer in range(L + 1)]
    slot = {}  # text index -> rows of `keep` belonging to it
    for j, t in enumerate(text_of.tolist()):
        slot.setdefault(t, []).append(j)
    with torch.no_grad():
        for s in range(0, len(texts), cfg.batch_size):
            batch = [int(i) for i in order[s:s + cfg.batch_size] if int(i) in slot]
            if not batch:
                continue
            sub = model.tokenize([texts[i] for i in batch], chat=chat, truncate=True)
            seen: dict[int, Tensor] = {}

            hooks = [(names[layer], _grabber(seen, layer)) for layer in range(L)]
            seen[L] = model.run_until(sub["input_ids"], sub["attention_mask"], names[L], hooks).detach()
            width = sub["input_ids"].shape[1]
            rows, b_idx, p_idx = [], [], []
            for bi, t in enumerate(batch):
                for j in slot[t]:
                    rows.append(j)
                    b_idx.append(bi)
                    p_idx.append(width - int(from_end[j]))
            b_t, p_t = torch.tensor(b_idx), torch.tensor(p_idx)
            stack = torch.stack([seen[layer][b_t, p_t].float().cpu() for layer in range(L + 1)], 1)  # [r, L+1, d]
            _check_finite(stack, "captured residuals")
            r = torch.tensor(rows)
            x[r] = stack[:, :L].to(torch.float16)
            final[r] = stack[:, L]
    t_capture = time.perf_counter() - t0 - t_gen
    logz = torch.empty(P)
    top = torch.empty(P, cfg.top_k, dtype=torch.long)
    k = min(cfg.top_k, model.d_vocab)
    with torch.no_grad():
        for s in range(0, P, 256):
            logits = lens_logits(model, final[s:s + 256]).float()
            logz[s:s + 256] = torch.logsumexp(logits, -1).cpu()
            top[s:s + 256, :k] = logits.topk(k, -1).indices.cpu()
            if k < cfg.top_k:
                top[s:s + 256, k:] = top[s:s + 256, :1]
    timing = {"generate_seconds": round(t_gen, 1), "capture_seconds": round(t_capture, 1),
              "targets_seconds": round(time.perf_counter() - t0 - t_gen - t_capture, 1)}
    return _Data(x, final, logz, top, len(texts), n_tokens, store.sha256_json(texts), timing)


def _grabber(seen: dict[int, Tensor], layer: int):
    def hook(act: Tensor, hook) -> None:
        seen[layer] = act.detach()
    return hook


# -- training ----------------------------------------------------------------------------------------

def _unembed_parts(model) -> tuple[Tensor, Tensor]:
    un = model.bridge.unembed
    w = un.W_U.detach()
    b = un.b_U.detach() if getattr(un, "b_U", None) is not None else torch.zeros(w.shape[1], device=w.device)
    return w, b


class _FrozenModel:
    """Context: the model's parameters stop requiring grad (no gradient is computed for them)."""

    def __init__(self, model) -> None:
        self.params = list(model.bridge.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


def _kl_estimate(model, h: Tensor, final: Tensor, logz: Tensor, cand: Tensor, logw: Tensor,
                 w_u: Tensor, b_u: Tensor) -> Tensor:
    """Estimated KL(final || readout) per position and layer over the candidate set ``cand``."""
    wc, bc = w_u[:, cand], b_u[cand]
    with torch.no_grad():
        logp = model.final_norm(final[:, None]) @ wc + bc - logz[:, None, None]  # [B, 1, C]
        wp = torch.exp(logp + logw)  # importance-weighted p
    z = model.final_norm(h) @ wc + bc  # [B, L, C]
    log_zq = torch.logsumexp(z + logw, -1)  # [B, L]
    return (wp * (logp - z)).sum(-1) + log_zq


def train_tuned_lens(model, prompts=None, *, config: TunedLensConfig | None = None, cache: bool = True,
                     system: str | None = None, chat: bool | None = None, progress: bool = True,
                     **overrides) -> TunedLens:
    """Train a tuned lens for ``model`` by self-distillation (see the module docstring for the method).

    ``prompts``: the training prompts (default :func:`default_training_prompts`); each is
    formatted as the model sees it (chat template by default) and followed by the model's own
    greedy completion of ``max_new_tokens`` tokens. Budget and settings come from ``config``
    (:class:`TunedLensConfig`) with keyword ``overrides`` (``steps=100``...). With ``cache``
    a lens trained before with the same model weights, prompts, formatting and config is loaded
    from :func:`tuned_lens_cache_dir` instead of retrained, and a new one is saved there.
    """
    cfg = config or TunedLensConfig()
    if overrides:
        unknown = set(overrides) - {f.name for f in fields(TunedLensConfig)}
        if unknown:
            raise InputError(f"Unknown tuned-lens settings {sorted(unknown)}; known: "
                             f"{[f.name for f in fields(TunedLensConfig)]}.")
        cfg = TunedLensConfig(**{**cfg.to_dict(), **overrides})
    ps = default_training_prompts() if prompts is None else as_prompt_set(prompts)
    if len(ps) == 0:
        raise InputError("train_tuned_lens needs at least one prompt.")
    key = _data_key(model, ps, cfg, system, chat)
    entry = tuned_lens_cache_dir() / store.sha256_json(key)[:32] if cache else None
    if entry is not None and store.is_artifact(entry, KIND):
        try:
            lens = TunedLens.load(entry, model)
            if lens.data.get("key") == key:
                return lens
        except CacheError:
            pass  # unreadable: retrain and overwrite
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = _collect(model, ps, cfg, system, chat, progress)
    t_data = time.perf_counter() - t0
    L, d, V = model.n_layers, model.d_model, model.d_vocab
    P = data.x.shape[0]
    # typical residual norm per layer (per coordinate): the unit of the bias
    rms = data.x[: min(P, 2048)].float().pow(2).mean(-1).sqrt().median(0).values  # [L]
    a = torch.zeros(L, d, d, requires_grad=True)
    b = torch.zeros(L, d, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps))
    w_u, b_u = _unembed_parts(model)
    w_u, b_u = w_u.float(), b_u.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_positions, P)
    history: list[float] = []
    perm = torch.randperm(P, generator=gen)
    cursor = 0
    bar = _progress(cfg.steps, progress)
    with _FrozenModel(model):
        for _ in range(cfg.steps):
            if cursor + bs > P:
                perm, cursor = torch.randperm(P, generator=gen), 0
            idx = perm[cursor:cursor + bs]
            cursor += bs
            union = torch.unique(data.top[idx])
            if V <= union.numel() + cfg.n_sampled:
                cand, logw = torch.arange(V), torch.zeros(V)
            else:
                rest = torch.ones(V, dtype=torch.bool)
                rest[union] = False
                rest_ids = rest.nonzero().flatten()
                pick = rest_ids[torch.randperm(rest_ids.numel(), generator=gen)[: cfg.n_sampled]]
                cand = torch.cat([union, pick])
                logw = torch.cat([torch.zeros(union.numel()),
                                  torch.full((pick.numel(),), math.log(rest_ids.numel() / pick.numel()))])
            h = data.x[idx].float()  # [B, L, d]
            t = h + torch.einsum("bld,lkd->blk", h, a) / math.sqrt(d) + rms[:, None] * b
            kl = _kl_estimate(model, t, data.final[idx], data.logz[idx], cand.to(w_u.device),
                              logw.to(w_u.device), w_u, b_u)
            loss = kl.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            bar(history[-1])
    weight = (a.detach() / math.sqrt(d)).contiguous()
    bias = (rms[:, None] * b.detach()).contiguous()
    _check_finite(weight, "trained translators")
    seconds = time.perf_counter() - t0
    lens = TunedLens(weight, bias, model.name, model.weights_hash, cfg.to_dict(),
                     {"key": key, "prompts_hash": ps.hash(), "n_prompts": len(ps), "prompt_digests": prompt_digests(ps),
                      "texts_sha256": data.texts_sha256,
                      "n_texts": data.n_texts, "n_tokens": data.n_tokens, "n_positions": P,
                      "data_seconds": round(t_data, 1), **data.timing,
                      "train_loop_seconds": round(time.perf_counter() - t0 - t_data, 1),
                      "torch_threads": torch.get_num_threads(), "load_average": _load_average()},
                     history, round(seconds, 1))
    if entry is not None:
        lens.save(entry)
    return lens


def _load_average() -> float | None:
    """The 1-minute load average when training ended (CPU contention), or None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda loss: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="tuned lens", leave=False)

    def update(loss: float) -> None:
        bar.update(1)
        bar.set_postfix(kl=f"{loss:.3f}")
        if bar.n >= total:
            bar.close()
    return update


def resolve_lens(model, lens) -> TunedLens | None:
    """``None``/``"logit"`` -> None (the logit lens); ``"tuned"`` -> the cached default tuned lens of
    this model (trained with the default prompts and budget if there is none, with a warning);
    a :class:`TunedLens` -> itself, checked against ``model``."""
    if lens is None or lens == "logit":
        return None
    if isinstance(lens, TunedLens):
        lens.check_model(model)
        return lens
    if lens == "tuned":
        cfg = TunedLensConfig()
        key = _data_key(model, default_training_prompts(), cfg, None, None)
        entry = tuned_lens_cache_dir() / store.sha256_json(key)[:32]
        if not store.is_artifact(entry, KIND):
            warnings.warn(f"No cached tuned lens for {model.name}: training one with the default prompts and "
                          "budget (about 37 minutes on 2 CPU cores for the default model).", stacklevel=3)
        return train_tuned_lens(model, cache=True, progress=False)
    raise InputError(f"lens must be None or 'logit' (logit lens), 'tuned' (the cached tuned lens) or a TunedLens, "
                     f"got {lens!r}.")


def lens_name(lens: TunedLens | None) -> str:
    return "logit" if lens is None else "tuned"
