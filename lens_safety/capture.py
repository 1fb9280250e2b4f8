"""Capture the residual stream at chosen positions, batched, padding-correct and cached.

:func:`collect_residuals` runs the model over a prompt set in left-padded batches (the
``attention_mask`` is always passed), keeps only the selected positions in the hooks
(never an all-layer, all-position cache), and stops the forward after the last block, so
the 151k-vocabulary unembedding is never computed.

Layers are indexed ``0..n_layers``: 0 is the embedding output and ``l`` the output of
block ``l-1`` (resid_post). This matches HF ``hidden_states`` except that HF's last entry
already has the final norm applied, while ours is the raw residual stream (the logit lens
applies the final norm exactly once).

The disk cache is one folder per key (weights hash, model dtype and revision, formatting,
tokenizer, prompts hash, positions, ``truncate``, conversion and transformers versions, schema
version): ``values.safetensors`` plus ``meta.json``. A rerun with the same key loads without
touching the model; a mismatched, truncated or corrupted entry is detected (sha256) and
rebuilt; an interrupted capture resumes from its last finished batch. Batches stream to disk
and are assembled row by row, so memory stays flat in the number of prompts; with
``mmap=True`` the result itself is memory-mapped from the cache instead of read into RAM.

Whatever the model's dtype or devices, values are stored as float32 on the CPU. Under
``accelerate launch`` the batches are split over the processes (:mod:`lens_safety.core.parallel`)
and the result (and cache entry) is identical to a single-process run.

>>> import lens_safety as ls
>>> acts = ls.collect_residuals(ls.testing.tiny_model(), ["Hi there", "Bake bread"], cache=False,
...                             progress=False)
>>> tuple(acts.values.shape)
(2, 4, 64)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .core import assets, parallel
from .core.errors import CacheError, InputError, ModelMismatchError, NonFiniteActivationError
from .core.store import atomic_dir, jsonable, read_json, sha256_file, sha256_json, write_json_atomic
from .core.validation import check_finite, check_int, check_same_model, config_from_options
from .inputs.prompts import Prompt, PromptSet, as_prompt_set, load_prompts, prompt_to_json
from .model.loading import SafetyModel, load_model, resolve_dtype, software_key

__all__ = ["Residuals", "collect_residuals", "capture_command", "CaptureConfig", "SCHEMA_VERSION",
           "NonFiniteActivationError", "prompt_to_json"]

SCHEMA_VERSION = 2
KIND = "residuals"
VALUES = "values.safetensors"


@dataclass
class Residuals:
    """Residual-stream vectors at selected positions, one row per prompt.

    ``values`` is float32 on the CPU, ``[n_prompts, n_layers + 1, d_model]``
    (``positions="last"`` or ``"mean"``) or ``[n_prompts, n_layers + 1, k, d_model]``
    (``positions=k``). Layer 0 is the embedding output, layer ``l`` the raw output of block
    ``l-1`` (no final norm). ``formatting`` records chat/raw, the system prompt and the chat
    template's hash; ``model_dtype`` and ``revision`` the weights they came from.
    """

    values: Float[Tensor, "batch layer *pos d_model"]
    prompts: PromptSet
    n_tokens: Tensor
    model_name: str
    weights_hash: str
    positions: str | int
    formatting: dict[str, Any] = field(default_factory=dict)
    model_dtype: str = "torch.float32"
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.values.shape[0] != len(self.prompts):
            raise InputError(f"values has {self.values.shape[0]} rows but there are {len(self.prompts)} prompts.")

    @property
    def n_layers(self) -> int:
        """Number of blocks (the layer axis has ``n_layers + 1`` entries)."""
        return int(self.values.shape[1]) - 1

    @property
    def d_model(self) -> int:
        return int(self.values.shape[-1])

    @property
    def labels(self) -> list[str]:
        labels = self.prompts.labels
        return labels() if callable(labels) else labels

    @property
    def layer_names(self) -> list[str]:
        return ["embed"] + [f"blocks.{i}" for i in range(self.n_layers)]

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return (f"Residuals(n={len(self)}, layers=0..{self.n_layers}, d_model={self.d_model}, "
                f"positions={self.positions!r}, model={self.model_name!r})")

    def layer(self, layer: int) -> Float[Tensor, "batch *pos d_model"]:
        """Vectors of residual layer ``layer`` (0 = embedding output, l = after block l-1)."""
        if not -self.values.shape[1] <= layer <= self.n_layers:
            raise InputError(f"layer must be in 0..{self.n_layers}, got {layer}.")
        return self.values[:, layer]

    def to_numpy(self) -> np.ndarray:
        return self.values.detach().cpu().numpy()

    def _with(self, values: Tensor, prompts: PromptSet, n_tokens: Tensor) -> Residuals:
        return Residuals(values, prompts, n_tokens, self.model_name, self.weights_hash, self.positions,
                         dict(self.formatting), self.model_dtype, self.revision)

    def subset(self, index: Sequence[int] | Tensor | np.ndarray) -> Residuals:
        """Rows picked by integer indices or a boolean mask."""
        idx = torch.as_tensor(np.asarray(index))
        if idx.dtype == torch.bool:
            if idx.numel() != len(self):
                raise InputError(f"Boolean mask has {idx.numel()} entries for {len(self)} prompts.")
            idx = idx.nonzero().flatten()
        rows = idx.tolist()
        items = [self.prompts[i] for i in rows]
        return self._with(self.values[idx], PromptSet(items, self.prompts.name), self.n_tokens[idx])

    def check_joinable(self, other: Residuals, what: str = "concat") -> None:
        """Raise unless ``other`` was captured like ``self``: same model weights, dtype and revision,
        same formatting (chat/raw, system prompt, chat template) and positions, same shape."""
        a, b = self, other
        check_same_model(a, b, f"Cannot {what} these residuals", fix="Capture them all with one model.")
        if b.model_dtype != a.model_dtype:
            raise ModelMismatchError(f"Cannot {what} residuals captured in {a.model_dtype} with residuals captured "
                                     f"in {b.model_dtype}: recapture one set with the other's dtype.")
        if b.revision != a.revision:
            raise ModelMismatchError(f"Cannot {what} residuals from model revision {a.revision!r} with revision "
                                     f"{b.revision!r}: recapture with one revision.")
        if b.positions != a.positions:
            raise InputError(f"Cannot {what} positions={a.positions!r} with positions={b.positions!r}.")
        fa, fb = a.formatting or {}, b.formatting or {}
        for k in sorted(set(fa) | set(fb)):
            if fa.get(k) != fb.get(k):
                names = {"chat": "chat formatting", "system": "system prompt", "template_sha256": "chat template"}
                raise InputError(
                    f"Cannot {what} residuals formatted differently: {names.get(k, k)} {fa.get(k)!r} vs "
                    f"{fb.get(k)!r} ({a.prompts.name or 'first'} vs {b.prompts.name or 'second'}). A probe "
                    "could then separate the sets by their template alone; capture both with the same "
                    "chat= and system=.")
        if b.values.shape[1:] != a.values.shape[1:]:
            raise InputError(f"Cannot {what} residuals of shapes {tuple(a.values.shape[1:])} and "
                             f"{tuple(b.values.shape[1:])} (per prompt).")

    @staticmethod
    def concat(parts: Sequence[Residuals]) -> Residuals:
        """Stack residuals of several prompt sets captured with the same model, dtype, revision,
        formatting and positions (:meth:`check_joinable` says which differs otherwise)."""
        if not parts:
            raise InputError("concat needs at least one Residuals.")
        first = parts[0]
        for p in parts[1:]:
            first.check_joinable(p)
        prompts = PromptSet([q for p in parts for q in p.prompts], "+".join(p.prompts.name for p in parts))
        return first._with(torch.cat([p.values for p in parts]), prompts, torch.cat([p.n_tokens for p in parts]))

    def __add__(self, other: Residuals) -> Residuals:
        return Residuals.concat([self, other])

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``values.safetensors`` + ``meta.json`` into ``directory`` atomically."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            w = _EntryWriter(tmp / VALUES, {"values": (tuple(self.values.shape), torch.float32),
                                             "n_tokens": (tuple(self.n_tokens.shape), torch.int64)})
            w.write("values", slice(None), self.values.detach().float().cpu().numpy())
            w.write("n_tokens", slice(None), self.n_tokens.cpu().numpy())
            w.close()
            _write_meta(tmp, self._meta())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = False) -> Residuals:
        """Load what :meth:`save` (or the capture cache) wrote; :class:`CacheError` if it fails
        verification. With ``mmap`` the values are memory-mapped (copy-on-write) rather than
        read into RAM: for sets larger than memory."""
        values, n_tokens, meta = _read_entry(Path(directory), mmap=mmap)
        return cls._from_meta(values, n_tokens, meta)

    def _meta(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "weights_hash": self.weights_hash,
            "model_dtype": self.model_dtype,
            "revision": self.revision,
            "positions": self.positions,
            "formatting": self.formatting,
            "prompts_hash": self.prompts.hash(),
            "prompts_name": self.prompts.name,
            "prompts": [prompt_to_json(p) for p in self.prompts],
        }

    @classmethod
    def _from_meta(cls, values: Tensor, n_tokens: Tensor, meta: dict[str, Any]) -> Residuals:
        prompts = PromptSet([Prompt(**d) for d in meta["prompts"]], meta.get("prompts_name", ""))
        if prompts.hash() != meta["prompts_hash"]:
            raise CacheError("Stored prompts do not match their hash.")
        return cls(values, prompts, n_tokens, meta["model_name"], meta["weights_hash"], meta["positions"],
                   meta.get("formatting", {}), meta.get("model_dtype", "torch.float32"), meta.get("revision"))


# -- safetensors written row by row (so huge sets never sit in RAM) ------------------------

_DTYPES = {torch.float32: ("F32", np.float32), torch.int64: ("I64", np.int64)}
_NP = {"F32": np.float32, "I64": np.int64}


class _EntryWriter:
    """A safetensors file whose tensors are filled in place, rows in any order, with ``pwrite``.

    Nothing is memory-mapped while writing, so the written rows live in the page cache,
    not in this process's resident memory: peak RSS stays flat however large the file.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header: dict[str, Any] = {}
        offset = 0
        self._layout: dict[str, tuple[int, tuple[int, ...], Any]] = {}
        for name, (shape, dtype) in shapes.items():
            code, npdt = _DTYPES[dtype]
            nbytes = int(np.prod(shape)) * np.dtype(npdt).itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, tuple(shape), npdt)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, len(raw).to_bytes(8, "little") + raw)
        os.ftruncate(self._fd, self._data_start + offset)

    def write(self, name: str, rows: slice | Sequence[int], array: np.ndarray) -> None:
        """Write ``array`` into rows ``rows`` (a slice of all rows, or row indices) of tensor ``name``."""
        off, shape, npdt = self._layout[name]
        array = np.ascontiguousarray(array, dtype=npdt)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(npdt).itemsize
        if isinstance(rows, slice):
            os.pwrite(self._fd, array.tobytes(), self._data_start + off)
            return
        for i, r in enumerate(rows):
            os.pwrite(self._fd, array[i].tobytes(), self._data_start + off + int(r) * row_bytes)

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    doc = {"kind": KIND, "schema_version": SCHEMA_VERSION, **meta, "values_sha256": sha256_file(folder / VALUES)}
    write_json_atomic(folder / "meta.json", doc, checksum=True)


def _read_tensors(path: Path, mmap: bool) -> dict[str, Tensor]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        start = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            npdt = _NP[info["dtype"]]
            a, b = info["data_offsets"]
            shape = tuple(info["shape"])
            count = (b - a) // np.dtype(npdt).itemsize
            if mmap and count:
                arr = np.memmap(path, dtype=npdt, mode="c", offset=start + a, shape=shape)
            else:
                arr = np.fromfile(path, dtype=npdt, count=count, offset=start + a).reshape(shape)
            out[name] = torch.from_numpy(arr)
        return out
    except (ValueError, KeyError, OSError) as e:
        raise CacheError(f"{path} is unreadable ({e}); delete it and recompute.") from e


def _read_entry(directory: Path, mmap: bool = False) -> tuple[Tensor, Tensor, dict[str, Any]]:
    values_path = directory / VALUES
    if not (directory / "meta.json").is_file() or not values_path.is_file():
        raise CacheError(f"{directory} is not a complete residuals folder (meta.json, {VALUES}).")
    meta = read_json(directory / "meta.json", what="residuals folder", checksum=True)
    if meta.get("kind") != KIND or meta.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{directory} holds {meta.get('kind')!r} schema {meta.get('schema_version')}, expected "
                         f"{KIND!r} schema {SCHEMA_VERSION}: recompute it.")
    if sha256_file(values_path) != meta.get("values_sha256"):
        raise CacheError(f"{values_path} does not match its recorded sha256 (truncated or corrupted).")
    tensors = _read_tensors(values_path, mmap)
    if "values" not in tensors or "n_tokens" not in tensors:
        raise CacheError(f"{values_path} lacks the 'values' or 'n_tokens' tensor.")
    return tensors["values"], tensors["n_tokens"], meta


# -- capture ------------------------------------------------------------------------------

def _cache_key(model: SafetyModel, ps: PromptSet, positions: str | int, formatting: dict,
               truncate: bool) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "weights_hash": model.weights_hash,
            "model_dtype": str(model.dtype), "revision": model.revision,
            "conversion_version": model.provenance.get("conversion_version"), **software_key(model),
            "formatting": formatting, "prompts_hash": ps.hash(), "positions": positions,
            "truncate": bool(truncate), "dtype": "float32"}


def _check_positions(positions: str | int) -> None:
    if positions in ("last", "mean"):
        return
    check_int(positions, "positions", low=1, hint="k = the last k positions; or 'last' or 'mean'")


def _try_hit(entry: Path, key: dict[str, Any], mmap: bool) -> tuple[Tensor, Tensor] | None:
    if not entry.exists():
        return None
    try:
        values, n_tokens, stored = _read_entry(entry, mmap=mmap)
    except CacheError:
        return None
    if any(stored.get(k) != v for k, v in jsonable(key).items()):
        return None
    return values, n_tokens


def collect_residuals(model: SafetyModel, prompts: PromptSet | Sequence[str], *,
                      positions: str | int = "last", batch_size: int = 16, cache: bool | str | os.PathLike = True,
                      system: str | None = None, chat: bool | None = None, truncate: bool = False,
                      progress: bool = True, mmap: bool = False) -> Residuals:
    """Residual stream of every layer at the chosen positions, for every prompt.

    ``positions``: ``"last"`` (the generation-prompt token; the default), an int ``k``
    (the last ``k`` positions, an extra axis), or ``"mean"`` (mean over the tokens of the
    user's prompt text; with ``truncate`` over what is left of it). ``cache``: ``True`` uses
    ``$LENS_SAFETY_HOME/activations``, a path uses that folder, ``False`` disables caching.
    ``mmap=True`` (needs a cache) returns values memory-mapped from the cache entry instead
    of read into RAM. Returns :class:`Residuals` (float32, CPU, whatever the model's dtype)
    with layers ``0..n_layers`` (0 = embedding output, l = raw output of block l-1); a cache
    hit returns the caller's prompts (labels, sources, metadata), not the stored ones.

    Under ``accelerate launch`` the batches are split over the processes and every process
    returns the full result; the cache folder must be on a file system all processes see
    (as on one machine).

    Raises :class:`NonFiniteActivationError` if an activation is NaN or infinite.

    >>> import lens_safety as ls
    >>> acts = ls.collect_residuals(ls.testing.tiny_model(), ["Hi"], positions=2, cache=False,
    ...                             progress=False)
    >>> tuple(acts.values.shape), acts.values.dtype
    ((1, 4, 2, 64), torch.float32)
    """
    _check_positions(positions)
    batch_size = check_int(batch_size, "batch_size", low=1)
    if mmap and cache is False:
        raise InputError("mmap=True maps the values from the cache entry: pass cache=True or a folder.")
    ps = as_prompt_set(prompts)
    formatting = model.formatting_key(system=system, chat=chat)
    key = _cache_key(model, ps, positions, formatting, truncate)
    key_hash = sha256_json(key)[:32]

    def result(values: Tensor, n_tokens: Tensor) -> Residuals:
        return Residuals(values, ps, n_tokens, model.name, model.weights_hash, positions, formatting,
                         str(model.dtype), model.revision)

    entry = None
    if cache is not False:
        root = assets.cache_dir() / "activations" if cache is True else Path(cache)
        entry = root / key_hash
        found = _try_hit(entry, key, mmap) if parallel.is_main() else None
        if parallel.num_processes() == 1:
            if found is not None:
                return result(*found)
        elif parallel.broadcast(found is not None):  # the main process decides, so all take one path
            found = found or _try_hit(entry, key, mmap)
            if found is not None:
                return result(*found)
        parallel.barrier()
        if parallel.is_main():
            shutil.rmtree(entry, ignore_errors=True)

    meta = {**jsonable(key), "model_name": model.name, "prompts_name": ps.name,
            "prompts": [prompt_to_json(p) for p in ps]}
    formatted = model.format(ps, system=system, chat=chat)
    values, n_tokens = _capture(model, ps, formatted, positions, batch_size, chat, truncate, progress, entry,
                                meta, mmap)
    return result(values, n_tokens)


def _capture(model: SafetyModel, ps: PromptSet, formatted: list[str], positions: str | int, batch_size: int,
             chat: bool | None, truncate: bool, progress: bool, entry: Path | None,
             meta: dict[str, Any], mmap: bool) -> tuple[Tensor, Tensor]:
    n, n_layers, d = len(ps), model.n_layers, model.d_model
    full = model.tokenize(formatted, chat=chat, truncate=truncate)  # validates lengths once
    n_tokens = full["attention_mask"].sum(1).cpu()
    del full
    if isinstance(positions, int) and int(n_tokens.min()) < positions:
        i = int(n_tokens.argmin())
        raise InputError(f"positions={positions} but prompt {i} has only {int(n_tokens[i])} tokens; "
                         "use a smaller k.")
    spans = _mean_spans(model, ps, formatted, chat, n_tokens) if positions == "mean" else None
    # Batches of similar length waste less compute on padding; results go back in input order.
    # The batches do not depend on the number of processes, so a data-parallel run computes
    # exactly the same batches as a single process.
    order = torch.argsort(n_tokens, stable=True).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    start, stop = parallel.shard_bounds(len(batches))
    mine = list(range(start, stop))
    shape = (n, n_layers + 1) + ((positions,) if isinstance(positions, int) else ()) + (d,)

    partial = None
    if entry is not None:
        partial = entry.with_name(entry.name + ".partial")
        if parallel.is_main():
            partial.mkdir(parents=True, exist_ok=True)
            key_file = partial / "key.json"
            key_text = json.dumps({k: meta[k] for k in meta if k != "prompts"}, sort_keys=True)
            if not key_file.is_file() or key_file.read_text() != key_text:
                shutil.rmtree(partial)
                partial.mkdir(parents=True)
                key_file.write_text(key_text)
        parallel.barrier()
        values = None  # written part by part; assembled at the end
        local: list[tuple[list[int], Tensor]] = []
    else:
        values = torch.empty(shape, dtype=torch.float32) if parallel.num_processes() == 1 else None
        local = []

    names = [model.resid_hook_name(layer) for layer in range(n_layers + 1)]
    bar = None
    if progress and parallel.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=f"capture {model.name}", unit="prompt")
    for b in mine:
        rows = batches[b]
        part_file = partial / f"batch-{b:05d}.safetensors" if partial is not None else None
        if part_file is not None and _part_ok(part_file, rows, shape):
            if bar is not None:
                bar.update(len(rows))
            continue
        out = _capture_batch(model, [formatted[i] for i in rows], names, positions,
                             [spans[i] for i in rows] if spans is not None else None, chat, truncate)
        _check_finite(out, rows, ps, names, model)
        if part_file is not None:
            _write_part(part_file, rows, out)
        elif values is not None:
            values[rows] = out
        else:
            local.append((rows, out))
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()

    if partial is None:
        if values is None:  # several processes, no cache: gather the batches in memory
            values = torch.empty(shape, dtype=torch.float32)
            for rows, out in parallel.gather(local):
                values[rows] = out
        return values, n_tokens
    parallel.barrier()  # every part is on disk
    if parallel.is_main():
        # Assemble the parts row by row into the final file, then swap it in atomically.
        from safetensors.torch import load_file

        with atomic_dir(entry) as tmp:
            w = _EntryWriter(tmp / VALUES, {"values": (shape, torch.float32), "n_tokens": ((n,), torch.int64)})
            for b, rows in enumerate(batches):
                part = load_file(str(partial / f"batch-{b:05d}.safetensors"))
                if part["rows"].tolist() != rows:
                    raise CacheError(f"Part {b} of {partial} holds other rows; delete the folder and rerun.")
                w.write("values", rows, part["values"].numpy())
                del part
            w.write("n_tokens", slice(None), n_tokens.numpy())
            w.close()
            _write_meta(tmp, meta)
        shutil.rmtree(partial, ignore_errors=True)
    parallel.barrier()
    values, stored_n_tokens, _ = _read_entry(entry, mmap=mmap)
    return values, stored_n_tokens


def _mean_spans(model: SafetyModel, ps: PromptSet, formatted: list[str], chat: bool | None,
                n_tokens: Tensor) -> list[tuple[int, int]]:
    """User-text spans in the (possibly truncated) ids: truncation drops the start of a prompt,
    so each span shifts left by the number of dropped tokens (and is clipped to what is left)."""
    spans = model.user_token_spans(ps, formatted, chat=chat)
    full_len = [len(r) for r in model.tokenizer(list(formatted), add_special_tokens=not model._resolve_chat(chat),
                                                padding=False)["input_ids"]]
    out = []
    for i, ((s, e), length, kept) in enumerate(zip(spans, full_len, n_tokens.tolist())):
        drop = length - kept
        s2, e2 = max(s - drop, 0), e - drop
        if e2 <= s2:
            raise InputError(f"Prompt {i}: truncating to {kept} tokens removed all of its text, so "
                             "positions='mean' has nothing to average; shorten the prompt or use positions='last'.")
        out.append((s2, e2))
    return out


def _check_finite(out: Tensor, rows: list[int], ps: PromptSet, names: list[str], model: SafetyModel) -> None:
    def where(bad: list[tuple]) -> str:
        i, layer = bad[0][:2]
        return (f"the first at residual layer {layer} ({names[layer]}) for prompt {rows[i]} "
                f"({ps[rows[i]].text[:60]!r})")

    check_finite(out, f"The activations captured with {model.name} in {model.dtype}", where=where,
                 hint="float16 often overflows: load the model with dtype='bfloat16' or 'float32'; otherwise "
                      "check the weights.")


def _part_ok(path: Path, rows: list[int], shape: tuple[int, ...]) -> bool:
    from safetensors.torch import load_file

    if not path.is_file():
        return False
    try:
        part = load_file(str(path))
    except Exception:
        return False
    return (part.get("rows") is not None and part["rows"].tolist() == rows
            and tuple(part["values"].shape) == (len(rows),) + shape[1:])


def _write_part(path: Path, rows: list[int], values: Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({"rows": torch.tensor(rows, dtype=torch.int64), "values": values.contiguous()}, str(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def _capture_batch(model: SafetyModel, texts: list[str], names: list[str], positions: str | int,
                   spans: list[tuple[int, int]] | None, chat: bool | None, truncate: bool) -> Tensor:
    enc = model.tokenize(texts, chat=chat, truncate=truncate)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = ids.shape[1]
    weights = None
    if positions == "mean":
        lengths = mask.sum(1).tolist()
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        for i, ((s, e), length) in enumerate(zip(spans, lengths)):
            off = width - length
            weights[i, off + s: off + e] = 1.0 / (e - s)
    store: dict[int, Tensor] = {}

    def keep(t: Tensor) -> Tensor:
        # Always float32 on the CPU, whatever the dtype and device of this layer.
        if positions == "last":
            return t[:, -1].float().cpu()
        if positions == "mean":
            return torch.einsum("bpd,bp->bd", t.float(), weights.to(t.device)).cpu()
        return t[:, -positions:].float().cpu()

    def make_hook(layer: int):
        def hook_fn(t: Tensor, hook) -> None:
            store[layer] = keep(t)
        return hook_fn

    last = len(names) - 1
    hooks = [(name, make_hook(i)) for i, name in enumerate(names[:-1])]
    store[last] = keep(model.run_until(ids, mask, names[-1], hooks))
    if len(store) != len(names):
        raise RuntimeError(f"Captured {len(store)} of {len(names)} layers: a hook did not fire.")
    return torch.stack([store[i] for i in range(len(names))], dim=1)


# -- the `lens-safety capture` command --------------------------------------------------------

def _load_prompt_source(spec: str, label: str | None) -> PromptSet:
    """A built-in set name, or a .txt (one prompt a line), .jsonl or .csv file (column ``text``
    or ``prompt``; a ``label`` column when present, else ``label`` or the file's stem)."""
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        if path.suffix in (".txt", ".jsonl", ".csv") or os.sep in spec:
            raise InputError(f"Prompt file {spec!r} does not exist.")
        return load_prompts(spec)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return PromptSet.from_txt(path, label=label or path.stem)
    if suffix in (".jsonl", ".csv"):
        first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
        if suffix == ".csv":
            columns = [c.strip() for c in first.split(",")]
        else:
            try:
                columns = list(json.loads(first))
            except (json.JSONDecodeError, TypeError):
                columns = []
        column = "text" if "text" in columns else "prompt"
        kwargs: dict[str, Any] = ({"label_column": "label"} if "label" in columns and label is None
                                  else {"label": label or path.stem})
        loader = PromptSet.from_jsonl if suffix == ".jsonl" else PromptSet.from_csv
        return loader(path, column, **kwargs)
    raise InputError(f"Prompt file {spec!r}: use .txt (one prompt a line), .jsonl or .csv "
                     "(a 'text' or 'prompt' column), or a built-in set name.")


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """``--device-map`` as given on a command line: ``auto``/``balanced``/... or a JSON object
    (``'{"model.embed_tokens": 0, "model.layers.0": 1}'``).

    >>> parse_device_map('{"lm_head": "cpu"}'), parse_device_map("auto")
    ({'lm_head': 'cpu'}, 'auto')
    """
    if value is None or isinstance(value, dict):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--device-map {value!r} is not valid JSON ({e.msg}).") from None
        if not isinstance(obj, dict):
            raise InputError("--device-map must be a JSON object mapping module names to devices.")
        return obj
    if text in ("auto", "balanced", "balanced_low_0", "sequential", "cpu") or text.startswith("cuda"):
        return text
    raise InputError(f"--device-map {value!r}: use auto, balanced, balanced_low_0, sequential, cpu, cuda[:N] "
                     "or a JSON object.")


@dataclass(frozen=True)
class CaptureConfig:
    """The options of :func:`capture_command` (the flags of ``lens-safety capture``); each can also be passed
    to it as a keyword. Checked by :func:`capture_command` before the model loads.

    * ``model``: a model name as for :func:`~lens_safety.model.loading.load_model` (``None``: the default
      model) or a loaded :class:`~lens_safety.model.loading.SafetyModel`; ``dtype``, ``device``,
      ``device_map`` (a name or a JSON object, as ``--device-map``), ``max_memory``, ``revision``: how a
      named model is loaded.
    * ``positions``, ``batch_size``, ``system``, ``chat``, ``truncate``, ``cache``, ``progress``: passed to
      :func:`collect_residuals` (``positions`` may be a string of digits, as on a command line).
    * ``n``: keep the first ``n`` prompts of each set (``None``: all); ``label``: the label of prompts read
      from files without a label column (default: the file name).

    >>> CaptureConfig.from_options(positions="mean").positions
    'mean'
    >>> CaptureConfig.from_options(batch=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: capture_command() got unknown argument(s) 'batch'; valid options: model, dtype, device, ...
    """

    model: str | SafetyModel | None = None
    dtype: str = "float32"
    device: str | None = None
    device_map: str | dict | None = None
    max_memory: dict | None = None
    revision: str | None = None
    positions: str | int = "last"
    batch_size: int = 16
    system: str | None = None
    chat: bool | None = None
    truncate: bool = False
    n: int | None = None
    label: str | None = None
    cache: bool | str | os.PathLike = True
    progress: bool = True

    @classmethod
    def from_options(cls, config: CaptureConfig | None = None, **options: Any) -> CaptureConfig:
        """``config`` (default: the defaults) with ``options`` replacing its fields; TypeError on an unknown option."""
        return config_from_options(cls, config, options, function="capture_command")


def capture_command(prompts: str | Sequence[str], out: str | os.PathLike, *, config: CaptureConfig | None = None,
                    **options: Any) -> Residuals:
    """What ``lens-safety capture`` does: capture the residuals of one or more prompt sets and
    write them to ``out`` (a folder that ``ls.Residuals.load(out)`` reads).

    ``prompts``: built-in set names (``harmbench``, ``harmless``...) or files (.txt one prompt a
    line, .jsonl / .csv with a ``text`` or ``prompt`` column); several are captured together.
    The options (:class:`CaptureConfig`: ``model``, ``positions``, ``n``...) come as ``config=`` or as
    keywords (keywords replace the config's fields). ``n`` keeps the first ``n`` of each. Runs alone or
    under ``accelerate launch`` (each process captures its share of the batches; the main process writes
    ``out``). Every argument is checked before the model loads.

    >>> import tempfile, lens_safety as ls
    >>> out = tempfile.mkdtemp() + "/acts"
    >>> acts = capture_command(["Hi there"], out, model=ls.testing.tiny_model(), cache=False,
    ...                        progress=False)   # doctest: +SKIP
    """
    cfg = CaptureConfig.from_options(config, **options)
    positions = cfg.positions
    specs = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(positions, str) and positions.strip().isdigit():  # "--positions 3" from a command line
        positions = int(positions)
    if not specs:
        raise InputError("capture needs at least one prompt set or file (--prompts).")
    _check_positions(positions)
    batch_size = check_int(cfg.batch_size, "batch size", low=1)
    n = check_int(cfg.n, "n", low=1, allow_none=True, kind="a positive integer", hint="prompts per set")
    resolve_dtype(cfg.dtype)
    device_map = parse_device_map(cfg.device_map)
    out = Path(out)
    if out.exists() and not (out / "meta.json").is_file():
        if out.is_file() or any(out.iterdir()):
            raise InputError(f"--out {out} exists and is not a residuals folder; choose a new or empty folder.")
    sets = []
    for spec in specs:
        ps = _load_prompt_source(spec, cfg.label)
        sets.append(PromptSet(list(ps)[:n] if n else list(ps), ps.name))
    ps = PromptSet([p for s in sets for p in s], "+".join(s.name for s in sets))
    if isinstance(cfg.model, SafetyModel):
        m = cfg.model
    else:
        m = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=device_map,
                       max_memory=cfg.max_memory, revision=cfg.revision)
    acts = collect_residuals(m, ps, positions=positions, batch_size=batch_size, cache=cfg.cache, system=cfg.system,
                             chat=cfg.chat, truncate=cfg.truncate, progress=cfg.progress)
    if parallel.is_main():
        acts.save(out)
    parallel.barrier()
    return acts
