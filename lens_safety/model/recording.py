"""Generation that records: the residual stream at every prompt and reply position, for chosen layers.

:func:`record_generation` runs the same batched, KV-cached decoding as
:func:`generate` (greedy, or seeded :class:`~lens_safety.model.generation.Sampling`)
with read-only hooks on the residual stream, and returns a :class:`ReplyRecording`: the texts, the
prompt and reply token ids and, per prompt, a ragged ``[positions, layers, d_model]`` tensor holding the
recorded prompt positions followed by one position per kept reply token (the stop token excluded).
Padding never enters a recorded tensor: the prompt pass is cut to each row's real tokens and each
decoding pass contributes only the rows still running.

The residual at reply position ``k`` is the hidden state after reading reply token ``k`` (the one that
predicts token ``k + 1``); "step" 0 is the last prompt position (it predicts the first reply token).
So step ``k`` sees exactly the first ``k`` reply tokens, and one extra forward pass per batch covers the
last kept token of rows that ran to ``max_new_tokens``. Recording hooks run after any intervention
hooks (``fwd_hooks``) on the same hook point, so they see the edited stream.

Long runs stay within memory: each batch is written to the cache as one safetensors shard (sha256
recorded) as soon as it finishes, an interrupted recording resumes from its finished batches, and a
loaded recording keeps one shard in memory at a time.

>>> from lens_safety.model.testing import tiny_model
>>> rec = record_generation(tiny_model(), ["Hi", "Bake bread"], record=[0, 3], max_new_tokens=3,
...                         cache=False, progress=False)
>>> rec.resid(0).shape[1:], len(rec.reply_ids[0]) == rec.reply_resid(0, layer=3).shape[0]
(torch.Size([2, 64]), True)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..core import assets, parallel, store
from ..core.errors import CacheError, InputError
from ..core.figures import figure_axes, line_with_band
from ..core.stats import mean_ci
from ..core.validation import check_int
from ..inputs.prompts import Prompt, PromptSet, prompt_to_json
from .generation import CURRENT_STEP, Sampling, check_decoding, check_sampling, run_generation, to_prompt_set
from .loading import SafetyModel, software_key

__all__ = ["RecordSpec", "ReplyRecording", "record_generation", "generate", "Sampling", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
KIND = "lens_safety.reply_recording"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INTS = ("rows", "n_prompt_tokens", "n_recorded_prompt", "n_reply", "prompt_ids", "reply_ids")


@dataclass(frozen=True)
class RecordSpec:
    """What :func:`record_generation` keeps: residual ``layers`` (0 = embedding output, ``l`` = output
    of block ``l - 1``, as :func:`~lens_safety.capture.collect_residuals`), the prompt positions
    (``"all"`` or the last ``k``) and the storage ``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"``).

    >>> RecordSpec(layers=(2, 1)).layers
    (1, 2)
    """

    layers: tuple[int, ...]
    prompt_positions: str | int = "all"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.layers is None or isinstance(self.layers, (str, bytes)):
            raise InputError(f"record takes a layer, a list of layers or 'all', got {self.layers!r}.")
        layers = (self.layers,) if np.ndim(self.layers) == 0 else tuple(self.layers)
        if not layers:
            raise InputError("record needs at least one layer, e.g. record=[12, 24] or record='all'.")
        object.__setattr__(self, "layers", tuple(sorted({check_int(x, "record layer", low=0) for x in layers})))
        if self.prompt_positions != "all":
            object.__setattr__(self, "prompt_positions", check_int(self.prompt_positions, "prompt_positions", low=1,
                                                                   hint="'all' or the last k prompt positions"))
        if self.dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")

    @classmethod
    def resolve(cls, model: SafetyModel, record: Any) -> RecordSpec:
        """A spec from ``record`` (a layer, a list of layers, ``"all"`` or a spec), checked against ``model``."""
        spec = record if isinstance(record, RecordSpec) else cls(
            tuple(range(model.n_layers + 1)) if isinstance(record, str) and record == "all" else record)
        bad = [x for x in spec.layers if x > model.n_layers]
        if bad:
            raise InputError(f"record layer(s) {bad} are outside {model.name}'s residual layers 0..{model.n_layers} "
                             f"(0 = embedding output, {model.n_layers} = last block's output).")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


class _Recorder:
    """The hooks and per-batch bookkeeping :func:`~lens_safety.model.generation.run_generation` drives.

    Each batch gets two preallocated buffers, the prompt pass ``[batch, kept positions, layers, d]`` and the
    decoding passes ``[max_new_tokens + 1, batch, layers, d]``, that the hooks copy into: no activation is
    kept alive and no small tensor per pass and layer fragments the heap (measured: that grew the resident
    memory by gigabytes over a 48-token batch).
    """

    def __init__(self, model: SafetyModel, spec: RecordSpec, partial: Path | None, max_new_tokens: int) -> None:
        self.spec, self.partial, self.dtype = spec, partial, _DTYPES[spec.dtype]
        self.d_model, self.max_new_tokens = model.d_model, max_new_tokens
        self.hooks = [(model.resid_hook_name(layer), self._hook(j)) for j, layer in enumerate(spec.layers)]
        self.shards: dict[int, dict[str, Tensor] | None] = {}  # batch -> tensors (None: written to disk)
        self._first = self._steps = self._seen = None
        self._enc: dict[str, Tensor] = {}

    def _hook(self, j: int):
        def record(t: Tensor, hook) -> None:
            s = CURRENT_STEP.get()
            if s is None or self._first is None:
                return
            if s.step == 0:
                self._first[:, :, j] = t[:, t.shape[1] - self._first.shape[1]:].detach()
            else:  # the newest position (the whole sequence is recomputed without a KV cache)
                self._steps[s.step, :, j] = t[:, -1].detach()
            self._seen[s.step, j] = True
        return record

    def done(self, b: int, rows: list[int]):
        """A finished batch's ``(tokens, scores)`` from the partial folder (resume), else None."""
        if self.partial is None:
            return None
        try:
            shard = _read_shard(self.partial, b)
        except CacheError:
            return None
        if shard["rows"].tolist() != list(rows):
            return None
        self.shards[b] = None  # on disk; read back when the recording is loaded
        kept = _split(shard["reply_ids"], shard["n_reply"])
        return kept, (shard["scores"] if "scores" in shard else None)

    def begin(self, enc: dict[str, Tensor]) -> None:
        self._enc = {k: v.cpu() for k, v in enc.items()}
        batch, width = self._enc["input_ids"].shape
        keep = width if self.spec.prompt_positions == "all" else min(self.spec.prompt_positions, width)
        n_layers = len(self.hooks)
        self._first = torch.empty(batch, keep, n_layers, self.d_model, dtype=self.dtype)
        self._steps = torch.empty(self.max_new_tokens + 1, batch, n_layers, self.d_model, dtype=self.dtype)
        self._seen = torch.zeros(self.max_new_tokens + 1, n_layers, dtype=torch.bool)

    def end(self, b: int, rows: list[int], kept: list[list[int]], scores: Tensor | None) -> None:
        ids, mask = self._enc["input_ids"], self._enc["attention_mask"]
        width = ids.shape[1]
        n_prompt = mask.sum(1)
        steps = max((len(k) for k in kept), default=0)
        missing = [s for s in range(steps + 1) if not bool(self._seen[s].all())]
        if missing:
            raise RuntimeError(f"Recording saw no pass for step(s) {missing[:5]}: a recording hook did not fire.")
        first, passes = self._first, self._steps
        keep = first.shape[1]
        n_rec = [min(keep, int(n)) for n in n_prompt]
        n_reply = [len(k) for k in kept]
        starts = np.cumsum([0] + [p + r for p, r in zip(n_rec, n_reply)]).tolist()
        resid = torch.empty(starts[-1], len(self.hooks), self.d_model, dtype=self.dtype)
        for j, (k, n) in enumerate(zip(n_rec, n_reply)):  # drop the left padding, keep the rows' own steps
            resid[starts[j]:starts[j] + k] = first[j, keep - k:]
            resid[starts[j] + k:starts[j + 1]] = passes[1:n + 1, j]
        self._first = self._steps = self._seen = None
        prompt_ids = [ids[j, width - int(n_prompt[j]):] for j in range(len(rows))]
        shard = {"resid": resid, "rows": torch.tensor(rows, dtype=torch.int64),
                 "n_prompt_tokens": n_prompt.to(torch.int64), "n_recorded_prompt": torch.tensor(n_rec),
                 "n_reply": torch.tensor(n_reply, dtype=torch.int64),
                 "prompt_ids": torch.cat(prompt_ids).to(torch.int64),
                 "reply_ids": torch.tensor([t for k in kept for t in k], dtype=torch.int64)}
        if scores is not None:
            shard["scores"] = scores.float().contiguous()
        if self.partial is not None:  # on disk now: memory holds one batch at a time
            _write_shard(self.partial, b, shard)
            shard = None
        self.shards[b] = shard


def _split(flat: Tensor, lengths: Tensor) -> list[list[int]]:
    out, start = [], 0
    for n in lengths.tolist():
        out.append(flat[start:start + n].tolist())
        start += n
    return out


def _shard_name(b: int) -> str:
    return f"batch_{b:05d}.safetensors"


def _write_shard(folder: Path, b: int, shard: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    path = folder / _shard_name(b)
    tmp = path.with_name(path.name + ".tmp")
    save_file(shard, str(tmp))
    os.replace(tmp, path)
    store.write_json_atomic(path.with_suffix(".json"), {"sha256": store.sha256_file(path)}, checksum=True)


def _read_shard(folder: Path, b: int, sha256: str | None = None) -> dict[str, Tensor]:
    """A shard, its sha256 checked against ``sha256`` (else against its own record)."""
    from safetensors.torch import load_file

    path = folder / _shard_name(b)
    if sha256 is None:
        sha256 = store.read_json(path.with_suffix(".json"), what="recording shard record", checksum=True)["sha256"]
    if not path.is_file() or store.sha256_file(path) != sha256:
        raise CacheError(f"{path} is missing or does not match its recorded sha256; the recording is rebuilt.")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt cache
        raise CacheError(f"{path} is unreadable ({e}); the recording is rebuilt.") from e


class ReplyRecording:
    """Texts, token ids and the recorded residual stream of one :func:`record_generation` call.

    Per prompt ``i`` (input order): ``resid(i)`` is ``[positions, layers, d_model]``: the recorded prompt
    positions (all, or the spec's last ``k``), then one position per kept reply token; ``steps(i)``
    numbers them ``..., -1, 0`` (prompt; 0 = last prompt position) and ``1..n`` (reply token ``k`` read).
    ``scores``: the prompt pass's first-token scores when a ``score_first`` was given.

    >>> from lens_safety.model.testing import tiny_model
    >>> rec = record_generation(tiny_model(), ["Hi"], record=1, max_new_tokens=2, cache=False, progress=False)
    >>> rec.to_frame()[["n_prompt_tokens", "n_reply_tokens"]].shape
    (1, 2)
    """

    def __init__(self, prompts: PromptSet, spec: RecordSpec, texts: Sequence[str], shards: dict[int, Any],
                 *, info: dict[str, Any], folder: Path | None = None, tokenizer=None) -> None:
        self.prompts, self.spec, self.texts, self.info = prompts, spec, list(texts), dict(info)
        self.folder, self.tokenizer = folder, tokenizer
        self._shards = shards  # batch -> tensors, or (with a folder) batch -> sha256
        self._loaded: tuple[int, dict[str, Tensor]] | None = None
        n = len(prompts)
        self._where: list[tuple[int, int, int]] = [(-1, 0, 0)] * n  # (batch, row in batch, first position)
        self.prompt_ids: list[list[int]] = [[] for _ in range(n)]
        self.reply_ids: list[list[int]] = [[] for _ in range(n)]
        self.n_recorded_prompt = np.zeros(n, dtype=np.int64)
        self.scores: np.ndarray | None = None
        for b in sorted(shards):
            self._index(b, self._shard(b))
        if any(w[0] < 0 for w in self._where):
            raise CacheError("The recording does not cover every prompt; it is rebuilt.")

    def _index(self, b: int, shard: dict[str, Tensor]) -> None:
        offset = 0
        prompts = _split(shard["prompt_ids"], shard["n_prompt_tokens"])
        replies = _split(shard["reply_ids"], shard["n_reply"])
        for j, r in enumerate(shard["rows"].tolist()):
            self._where[r] = (b, j, offset)
            self.prompt_ids[r], self.reply_ids[r] = prompts[j], replies[j]
            self.n_recorded_prompt[r] = int(shard["n_recorded_prompt"][j])
            offset += int(shard["n_recorded_prompt"][j]) + len(replies[j])
            if "scores" in shard:
                if self.scores is None:
                    self.scores = np.full(len(self.prompts), np.nan)
                self.scores[r] = float(shard["scores"][j])

    def _shard(self, b: int) -> dict[str, Tensor]:
        source = self._shards[b]
        if isinstance(source, dict):
            return source
        if self._loaded is None or self._loaded[0] != b:  # one shard in memory at a time
            self._loaded = (b, _read_shard(self.folder, b, source))
        return self._loaded[1]

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return (f"ReplyRecording(n={len(self)}, layers={list(self.layers)}, "
                f"reply_tokens={int(self.n_reply_tokens.sum())}, model={self.info.get('model_name')!r})")

    @property
    def layers(self) -> tuple[int, ...]:
        return self.spec.layers

    @property
    def n_reply_tokens(self) -> np.ndarray:
        return np.array([len(r) for r in self.reply_ids], dtype=np.int64)

    @property
    def n_prompt_tokens(self) -> np.ndarray:
        return np.array([len(p) for p in self.prompt_ids], dtype=np.int64)

    def _layer_index(self, layer: int) -> int:
        if layer not in self.spec.layers:
            raise InputError(f"Layer {layer} was not recorded; this recording holds layers {list(self.spec.layers)}.")
        return self.spec.layers.index(layer)

    def resid(self, i: int, layer: int | None = None) -> Float[Tensor, "pos *layer d_model"]:
        """Prompt ``i``'s recorded residuals: ``[positions, layers, d]``, or ``[positions, d]`` for one layer."""
        if not -len(self) <= i < len(self):
            raise InputError(f"prompt index {i} is out of range for {len(self)} prompts.")
        b, _, start = self._where[i]
        n = int(self.n_recorded_prompt[i]) + len(self.reply_ids[i])
        out = self._shard(b)["resid"][start:start + n]
        return out if layer is None else out[:, self._layer_index(layer)]

    def reply_resid(self, i: int, layer: int | None = None) -> Float[Tensor, "reply *layer d_model"]:
        """The reply positions only (one per kept reply token)."""
        return self.resid(i, layer)[int(self.n_recorded_prompt[i]):]

    def steps(self, i: int) -> np.ndarray:
        """The recorded positions of prompt ``i`` counted from the reply: ``<= 0`` prompt (0 = its last
        token), ``k >= 1`` the position of reply token ``k``."""
        return np.arange(1 - int(self.n_recorded_prompt[i]), len(self.reply_ids[i]) + 1)

    def tokens(self, i: int) -> list[str]:
        """The decoded token at each recorded position of prompt ``i``."""
        ids = self.prompt_ids[i][len(self.prompt_ids[i]) - int(self.n_recorded_prompt[i]):] + self.reply_ids[i]
        if self.tokenizer is None:
            return [str(t) for t in ids]
        return [self.tokenizer.decode([t]) for t in ids]

    def to_frame(self):
        """One row per prompt: index, label, method, request, the reply text and token counts."""
        import pandas as pd

        return pd.DataFrame({"prompt": range(len(self)), "label": self.prompts.labels,
                             "method": [p.method for p in self.prompts], "request": self.prompts.requests,
                             "completion": self.texts, "n_prompt_tokens": self.n_prompt_tokens,
                             "n_recorded_prompt": self.n_recorded_prompt, "n_reply_tokens": self.n_reply_tokens})

    def token_frame(self, prompts: Sequence[int] | None = None):
        """One row per recorded position: prompt, step (see :meth:`steps`), token id and text."""
        import pandas as pd

        rows = []
        for i in (range(len(self)) if prompts is None else prompts):
            ids = self.prompt_ids[i][len(self.prompt_ids[i]) - int(self.n_recorded_prompt[i]):] + self.reply_ids[i]
            rows += [{"prompt": i, "step": int(s), "token_id": t, "token": tok}
                     for s, t, tok in zip(self.steps(i), ids, self.tokens(i))]
        return pd.DataFrame(rows, columns=["prompt", "step", "token_id", "token"])

    def plot(self, ax=None):
        """Mean residual-stream norm (95% CI) by step, one line per recorded layer: step 0 is the last prompt
        token, the reply from step 1."""
        fig, ax = figure_axes(ax, size=(7.0, 4.0))
        norms = [self.resid(i).float().norm(dim=-1).numpy() for i in range(len(self))]  # [positions, layers]
        starts = [int(self.n_recorded_prompt[i]) - 1 for i in range(len(self))]
        last = max((n.shape[0] - s for n, s in zip(norms, starts)), default=0)
        for j, layer in enumerate(self.layers):
            steps, stats = [], []
            for k in range(last):
                v = [n[s + k, j] for n, s in zip(norms, starts) if s + k < n.shape[0]]
                if v:
                    steps.append(k)
                    stats.append(mean_ci(v))
            line_with_band(ax, steps, [m for m, _, _ in stats], [lo for _, lo, _ in stats],
                           [hi for _, _, hi in stats], label=f"layer {layer}")
        ax.set_xlabel("step (0 = last prompt token, k = after reply token k)")
        ax.set_ylabel("residual norm")
        ax.set_title(f"Residual stream along {len(self)} replies")
        ax.legend(fontsize=7)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the recording as a verified folder (shards + checksummed ``meta.json``)."""
        with store.atomic_dir(directory) as tmp:
            shas = {}
            for b in sorted(self._shards):
                _write_shard(tmp, b, self._shard(b))
                shas[str(b)] = store.sha256_file(tmp / _shard_name(b))
            _write_meta(tmp, _meta(self.prompts, self.spec, self.texts, self.info), shas)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, tokenizer=None) -> ReplyRecording:
        """Read a saved recording; :class:`~lens_safety.core.errors.CacheError` if missing, edited or incomplete."""
        directory = Path(directory)
        meta = store.read_json(directory / store.META, what="reply recording", checksum=True)
        if (meta.get("kind"), meta.get("schema_version")) != (KIND, SCHEMA_VERSION):
            raise CacheError(f"{directory} holds a {meta.get('kind')!r} (schema {meta.get('schema_version')}), not a "
                             f"reply recording of schema {SCHEMA_VERSION}; recompute it.")
        try:
            spec = RecordSpec(**meta["spec"])
            prompts = PromptSet([Prompt(**d) for d in meta["prompts"]], meta.get("prompts_name", ""))
            shards = {int(b): sha for b, sha in meta["shards"].items()}
            return cls(prompts, spec, meta["texts"], shards, info=meta["info"], folder=directory, tokenizer=tokenizer)
        except (KeyError, TypeError, ValueError, InputError) as e:
            raise CacheError(f"{directory}: the saved recording is malformed ({e}); recompute it.") from e


def _meta(ps: PromptSet, spec: RecordSpec, texts: Sequence[str], info: dict[str, Any]) -> dict[str, Any]:
    return {"spec": spec.to_dict(), "prompts": [prompt_to_json(p) for p in ps], "prompts_name": ps.name,
            "texts": list(texts), "info": info}


def _write_meta(folder: Path, meta: dict[str, Any], shas: dict[str, str]) -> None:
    store.write_json_atomic(folder / store.META, {"kind": KIND, "schema_version": SCHEMA_VERSION, **meta,
                                                  "shards": shas}, checksum=True)


def _function_key(fn: Callable | None) -> str | None:
    """A callable's identity for a cache key: its qualified name, and for a bound method the repr of its
    object (a frozen dataclass such as :class:`~lens_safety.behaviour.refusal.RefusalTokens` shows its ids)."""
    if fn is None:
        return None
    owner = getattr(fn, "__self__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return name if owner is None else f"{name}:{store.sha256_json(repr(owner))[:16]}"


def recording_key(model: SafetyModel, ps: PromptSet, spec: RecordSpec, *, formatting: dict, max_new_tokens: int,
                  batch_size: int, sampling: Sampling | None, hooks: list[str],
                  score_first: Callable | None = None) -> dict[str, Any]:
    """What decides a recording: model, software, prompts, formatting, decoding, batching, spec, hook names and
    the first-pass score function."""
    return {"scores": _function_key(score_first), "schema_version": SCHEMA_VERSION,
            "weights_hash": model.weights_hash, "model_dtype": str(model.dtype),
            **software_key(model), "prompts_hash": ps.hash(), "formatting": formatting,
            "max_new_tokens": max_new_tokens, "batch_size": batch_size, "spec": spec.to_dict(), "hooks": hooks,
            "decoding": "greedy" if sampling is None else {"sampling": asdict(sampling)}}


def _cache_entry(cache, key: dict[str, Any]) -> Path | None:
    if cache is False:
        return None
    root = assets.cache_dir() / "replies" if cache is True else Path(cache)
    return root / store.sha256_json(key)[:32]


def _try_load(entry: Path, key: dict[str, Any], ps: PromptSet, tokenizer) -> ReplyRecording | None:
    if not entry.exists():
        return None
    try:
        rec = ReplyRecording.load(entry, tokenizer=tokenizer)
        if rec.info.get("key") == store.jsonable(key) and rec.prompts.texts == ps.texts:
            rec.prompts = ps  # the caller's prompts (labels, methods)
            return rec
    except CacheError:
        pass
    shutil.rmtree(entry, ignore_errors=True)
    return None


def record_generation(model: SafetyModel, prompts: PromptSet | Sequence[str], *, record: Any,
                      max_new_tokens: int = 48, batch_size: int = 16, system: str | None = None,
                      chat: bool | None = None, fwd_hooks: Sequence = (), sampling: Sampling | None = None,
                      cache: bool | str | os.PathLike = True, progress: bool = True,
                      score_first: Callable[[Tensor], Tensor] | None = None) -> ReplyRecording:
    """Generate (greedy, or seeded ``sampling``) and record the residual stream at ``record`` layers.

    ``record``: a layer, a list of layers, ``"all"`` or a :class:`RecordSpec` (prompt positions, dtype).
    The tokens are those of :func:`generate` with the same arguments. ``score_first`` (the prompt pass's
    last logits -> one score per row) fills ``scores``; its identity is part of the cache key.
    ``cache``: ``True`` (``$LENS_SAFETY_HOME/replies/<key>``), a folder, or ``False`` (in memory). Each
    batch is written as it finishes; an interrupted call resumes from its finished batches. With
    ``fwd_hooks`` (interventions: ``ablate``, ``add``) the hooks' code cannot be hashed, so the shared
    cache is refused: pass a folder of your own for that intervention, or ``cache=False``.

    >>> from lens_safety.model.testing import tiny_model
    >>> record_generation(tiny_model(), ["Hi"], record=[9], cache=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lens_safety.core.errors.InputError: record layer(s) [9] are outside ...'s residual layers 0..3 ...
    """
    max_new_tokens, batch_size = check_decoding(check_int(max_new_tokens, "max_new_tokens", low=1), batch_size)
    spec = RecordSpec.resolve(model, record)
    ps = to_prompt_set(prompts)
    if not len(ps):
        raise InputError("No prompts to generate from: pass at least one prompt.")
    check_sampling(sampling)
    if fwd_hooks and cache is True:
        raise InputError("Recording with fwd_hooks cannot use the shared cache (the hooks' code is not part of its "
                         "key): pass cache='my_runs/ablate_L12' (a folder for this intervention) or cache=False.")
    if parallel.num_processes() > 1:
        raise InputError("record_generation runs in one process; launch it without accelerate/torchrun.")
    formatting = model.formatting_key(system=system, chat=chat)
    key = recording_key(model, ps, spec, formatting=formatting, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, sampling=sampling, hooks=[name for name, _ in fwd_hooks],
                        score_first=score_first)
    entry = _cache_entry(cache, key)
    if entry is not None:
        hit = _try_load(entry, key, ps, model.tokenizer)
        if hit is not None:
            return hit
    partial = None
    if entry is not None:
        partial = entry.with_name(entry.name + ".partial")
        stored = None
        try:
            stored = store.read_json(partial / "key.json", what="recording key", checksum=True)
        except CacheError:
            pass
        if stored != store.jsonable(key):  # another key or no key: start afresh
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            store.write_json_atomic(partial / "key.json", key, checksum=True)
    recorder = _Recorder(model, spec, partial, max_new_tokens)
    texts, _, _ = run_generation(model, ps, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                                 chat=chat, fwd_hooks=fwd_hooks, progress=progress, desc="record",
                                 score_first=score_first, sampling=sampling, recorder=recorder)
    info = {"key": store.jsonable(key), "model_name": model.name, "weights_hash": model.weights_hash,
            "n_layers": model.n_layers, "d_model": model.d_model, "max_new_tokens": max_new_tokens,
            "formatting": formatting, "decoding": key["decoding"]}
    if partial is None:
        return ReplyRecording(ps, spec, texts, recorder.shards, info=info, tokenizer=model.tokenizer)
    shas = {str(b): store.sha256_file(partial / _shard_name(b)) for b in sorted(recorder.shards)}
    _write_meta(partial, _meta(ps, spec, texts, info), shas)
    for f in partial.glob("batch_*.json"):
        f.unlink()
    (partial / "key.json").unlink()
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(partial, entry)
    rec = ReplyRecording.load(entry, tokenizer=model.tokenizer)
    rec.prompts = ps
    return rec


def generate(model: SafetyModel, prompts: PromptSet | Sequence[str], *, max_new_tokens: int = 48,
             batch_size: int = 16, system: str | None = None, chat: bool | None = None,
             fwd_hooks: Sequence = (), progress: bool = True, record: Any = None,
             sampling: Sampling | None = None):
    """Completions (special tokens stripped) in input order; with ``record``, a :class:`ReplyRecording`.

    Prompts are formatted with ``model.format`` (chat template by default), sorted by length
    and run in left-padded batches with the ``attention_mask`` always passed; a batch stops
    when every row has emitted an end-of-turn token. Decoding is greedy (or seeded ``sampling``,
    :class:`~lens_safety.model.generation.Sampling`) and uses a KV cache (only the newest position is
    run after the prompt pass) where the bridge supports one, else it recomputes the whole sequence.

    ``record``: layers whose residual stream is recorded at every prompt and reply position (see
    :func:`record_generation`, which also caches; here the recording is kept in memory).

    ``fwd_hooks``: ``[(hook_name, fn)]`` TransformerLens hooks active for every forward
    pass of the generation -- the prompt pass *and* each decoding step. With the KV cache,
    the prompt pass is the only one whose tensors have ``shape[1] > 1``; in general call
    :func:`~lens_safety.model.generation.generation_step` inside the hook: ``s.step == 0`` is the
    prompt pass and the last prompt position is ``s.prompt_len - 1`` (left padding puts it last in
    that pass). A hook that edits the last prompt position on the prompt pass only::

        def graft(t, hook):
            if ls.refusal.generation_step().step == 0:
                t[:, -1] = new_state
            return t

    (Without a KV cache later passes recompute the prompt, so such a hook should edit
    ``t[:, s.prompt_len - 1]`` on every pass.) Batches are sorted by length: row ``j`` of
    a batch is prompt ``s.rows[j]``, for hooks that edit each prompt differently.

    >>> from lens_safety.model.testing import tiny_model
    >>> out = generate(tiny_model(), ["Hi"], max_new_tokens=3, progress=False)
    >>> len(out), isinstance(out[0], str)
    (1, True)
    """
    if record is not None:
        return record_generation(model, prompts, record=record, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, system=system, chat=chat, fwd_hooks=fwd_hooks,
                                 sampling=sampling, cache=False, progress=progress)
    max_new_tokens, batch_size = check_decoding(check_int(max_new_tokens, "max_new_tokens", low=1), batch_size)
    ps = to_prompt_set(prompts)
    check_sampling(sampling)
    texts, _, _ = run_generation(model, ps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 system=system, chat=chat, fwd_hooks=fwd_hooks, progress=progress,
                                 sampling=sampling)
    return texts
