"""Capture the residual stream at chosen positions, batched, padding-correct and cached.

:func:`collect_residuals` runs the model over a prompt set in left-padded batches (the
``attention_mask`` is always passed), keeps only the selected positions in the hooks
(never an all-layer, all-position cache), and stops the forward after the last block, so
the 151k-vocabulary unembedding is never computed.

Layers are indexed ``0..n_layers``: 0 is the embedding output and ``l`` the output of
block ``l-1`` (resid_post). This matches HF ``hidden_states`` except that HF's last entry
already has the final norm applied, while ours is the raw residual stream (the logit lens
applies the final norm exactly once).

The disk cache is one folder per key (weights hash, formatting, prompts hash, positions,
dtype, schema version): ``values.safetensors`` plus ``meta.json``. A rerun with the same
key loads without touching the model; a mismatched, truncated or corrupted entry is
detected (sha256) and rebuilt; an interrupted capture resumes from its last finished batch.

>>> import lens_safety as ls
>>> acts = ls.collect_residuals(ls.testing.tiny_model(), ["Hi there", "Bake bread"], cache=False,
...                             progress=False)
>>> tuple(acts.values.shape)
(2, 4, 64)
"""

from __future__ import annotations

import hashlib
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

from . import assets
from .errors import CacheError, InputError
from .models import SafetyModel
from .prompts import Prompt, PromptSet, as_prompt_set

__all__ = ["Residuals", "collect_residuals", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class Residuals:
    """Residual-stream vectors at selected positions, one row per prompt.

    ``values`` is float32 ``[n_prompts, n_layers + 1, d_model]`` (``positions="last"`` or
    ``"mean"``) or ``[n_prompts, n_layers + 1, k, d_model]`` (``positions=k``). Layer 0 is
    the embedding output, layer ``l`` the raw output of block ``l-1`` (no final norm).
    """

    values: Float[Tensor, "batch layer *pos d_model"]
    prompts: PromptSet
    n_tokens: Tensor
    model_name: str
    weights_hash: str
    positions: str | int
    formatting: dict[str, Any] = field(default_factory=dict)

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
        return self.prompts.labels

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

    def subset(self, index: Sequence[int] | Tensor | np.ndarray) -> Residuals:
        """Rows picked by integer indices or a boolean mask."""
        idx = torch.as_tensor(np.asarray(index))
        if idx.dtype == torch.bool:
            if idx.numel() != len(self):
                raise InputError(f"Boolean mask has {idx.numel()} entries for {len(self)} prompts.")
            idx = idx.nonzero().flatten()
        rows = idx.tolist()
        items = [self.prompts[i] for i in rows]
        return Residuals(self.values[idx], PromptSet(items, self.prompts.name), self.n_tokens[idx],
                         self.model_name, self.weights_hash, self.positions, dict(self.formatting))

    @staticmethod
    def concat(parts: Sequence[Residuals]) -> Residuals:
        """Stack residuals of several prompt sets captured with the same model and positions."""
        if not parts:
            raise InputError("concat needs at least one Residuals.")
        first = parts[0]
        for p in parts[1:]:
            if p.weights_hash != first.weights_hash or p.values.shape[1:] != first.values.shape[1:]:
                raise InputError("Cannot concat residuals from different models or shapes "
                                 f"({first.model_name} {tuple(first.values.shape[1:])} vs "
                                 f"{p.model_name} {tuple(p.values.shape[1:])}).")
            if p.positions != first.positions:
                raise InputError(f"Cannot concat positions={first.positions!r} with {p.positions!r}.")
        prompts = PromptSet([q for p in parts for q in p.prompts], "+".join(p.prompts.name for p in parts))
        return Residuals(torch.cat([p.values for p in parts]), prompts, torch.cat([p.n_tokens for p in parts]),
                         first.model_name, first.weights_hash, first.positions, dict(first.formatting))

    def __add__(self, other: Residuals) -> Residuals:
        return Residuals.concat([self, other])

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``values.safetensors`` + ``meta.json`` into ``directory`` atomically."""
        directory = Path(directory)
        meta = self._meta()
        _write_entry(directory, self.values, self.n_tokens, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Residuals:
        """Load what :meth:`save` wrote; raises :class:`CacheError` if it fails verification."""
        values, n_tokens, meta = _read_entry(Path(directory))
        return cls._from_meta(values, n_tokens, meta)

    def _meta(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model_name": self.model_name,
            "weights_hash": self.weights_hash,
            "positions": self.positions,
            "formatting": self.formatting,
            "prompts_hash": self.prompts.hash(),
            "prompts_name": self.prompts.name,
            "prompts": [_prompt_to_json(p) for p in self.prompts],
        }

    @classmethod
    def _from_meta(cls, values: Tensor, n_tokens: Tensor, meta: dict[str, Any]) -> Residuals:
        prompts = PromptSet([Prompt(**d) for d in meta["prompts"]], meta.get("prompts_name", ""))
        if prompts.hash() != meta["prompts_hash"]:
            raise CacheError("Stored prompts do not match their hash.")
        return cls(values, prompts, n_tokens, meta["model_name"], meta["weights_hash"], meta["positions"],
                   meta.get("formatting", {}))


def _prompt_to_json(p: Prompt) -> dict[str, Any]:
    return {"text": p.text, "label": p.label, "source": p.source, "licence": p.licence,
            "category": p.category, "request": p.request, "method": p.method, "meta": p.meta}


# -- safetensors written through a memory map (so huge sets never sit in RAM) -------------

_DTYPES = {torch.float32: ("F32", np.float32), torch.int64: ("I64", np.int64)}


def _sha256_tensor_file(path: Path) -> str:
    return assets.sha256_file(path)


class _EntryWriter:
    """A safetensors file whose tensors are filled in place (rows in any order) via np.memmap."""

    def __init__(self, path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header: dict[str, Any] = {}
        offset = 0
        self._layout = {}
        for name, (shape, dtype) in shapes.items():
            code, npdt = _DTYPES[dtype]
            nbytes = int(np.prod(shape)) * np.dtype(npdt).itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, shape, npdt)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.truncate(self._data_start + offset)
        self.path = path
        self.arrays = {
            name: np.memmap(path, dtype=npdt, mode="r+", offset=self._data_start + off, shape=shape)
            for name, (off, shape, npdt) in self._layout.items()
        }

    def close(self) -> None:
        for a in self.arrays.values():
            a.flush()
        self.arrays = {}


def _write_entry(directory: Path, values: Tensor, n_tokens: Tensor, meta: dict[str, Any]) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    w = _EntryWriter(tmp / "values.safetensors", {"values": (tuple(values.shape), torch.float32),
                                                 "n_tokens": (tuple(n_tokens.shape), torch.int64)})
    w.arrays["values"][...] = values.detach().float().cpu().numpy()
    w.arrays["n_tokens"][...] = n_tokens.cpu().numpy()
    w.close()
    _finish_entry(tmp, directory, meta)


def _finish_entry(tmp: Path, directory: Path, meta: dict[str, Any]) -> None:
    meta = dict(meta, values_sha256=_sha256_tensor_file(tmp / "values.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def _read_entry(directory: Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    from safetensors import safe_open

    meta_path, values_path = directory / "meta.json", directory / "values.safetensors"
    if not (meta_path.is_file() and values_path.is_file()):
        raise CacheError(f"{directory} is not a complete residuals folder (meta.json, values.safetensors).")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{meta_path} is not valid JSON ({e}).") from e
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{directory} has schema {meta.get('schema_version')}, expected {SCHEMA_VERSION}.")
    if _sha256_tensor_file(values_path) != meta.get("values_sha256"):
        raise CacheError(f"{values_path} does not match its recorded sha256 (truncated or corrupted).")
    try:
        with safe_open(str(values_path), framework="pt") as f:
            # Copy out of the file's memory map: a later change to the file must not alter results.
            values, n_tokens = f.get_tensor("values").clone(), f.get_tensor("n_tokens").clone()
    except Exception as e:  # safetensors raises its own error types
        raise CacheError(f"{values_path} is unreadable ({e}).") from e
    return values, n_tokens, meta


# -- capture ------------------------------------------------------------------------------

def _cache_key(model: SafetyModel, ps: PromptSet, positions: str | int, formatting: dict) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "weights_hash": model.weights_hash,
            "model_dtype": str(model.dtype), "formatting": formatting, "prompts_hash": ps.hash(),
            "positions": positions, "dtype": "float32"}


def _check_positions(positions: str | int) -> None:
    if positions in ("last", "mean"):
        return
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise InputError(f"positions must be 'last', 'mean' or a positive int k (last k positions), "
                         f"got {positions!r}.")


def collect_residuals(model: SafetyModel, prompts: PromptSet | Sequence[str], *,
                      positions: str | int = "last", batch_size: int = 16, cache: bool | str | os.PathLike = True,
                      system: str | None = None, chat: bool | None = None, truncate: bool = False,
                      progress: bool = True) -> Residuals:
    """Residual stream of every layer at the chosen positions, for every prompt.

    ``positions``: ``"last"`` (the generation-prompt token; the default), an int ``k``
    (the last ``k`` positions, an extra axis), or ``"mean"`` (mean over the tokens of the
    user's prompt text). ``cache``: ``True`` uses ``$LENS_SAFETY_HOME/activations``, a path
    uses that folder, ``False`` disables caching. Returns :class:`Residuals` with layers
    ``0..n_layers`` (0 = embedding output, l = raw output of block l-1).

    >>> import lens_safety as ls
    >>> acts = ls.collect_residuals(ls.testing.tiny_model(), ["Hi"], positions=2, cache=False,
    ...                             progress=False)
    >>> tuple(acts.values.shape)
    (1, 4, 2, 64)
    """
    _check_positions(positions)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    ps = as_prompt_set(prompts)
    formatting = model.formatting_key(system=system, chat=chat)
    key = _cache_key(model, ps, positions, formatting)
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    meta = {**key, "model_name": model.name, "prompts_name": ps.name,
            "prompts": [_prompt_to_json(p) for p in ps]}

    entry = None
    if cache is not False:
        root = assets.cache_dir() / "activations" if cache is True else Path(cache)
        entry = root / key_hash
        if entry.exists():
            try:
                values, n_tokens, stored = _read_entry(entry)
                if all(stored.get(k) == v for k, v in key.items()):
                    return Residuals._from_meta(values, n_tokens, stored)
            except CacheError:
                pass  # mismatched / truncated / corrupted: rebuild below
            shutil.rmtree(entry, ignore_errors=True)

    formatted = model.format(ps, system=system, chat=chat)
    return _capture(model, ps, formatted, positions, batch_size, chat, truncate, progress, entry, meta)


def _capture(model: SafetyModel, ps: PromptSet, formatted: list[str], positions: str | int, batch_size: int,
             chat: bool | None, truncate: bool, progress: bool, entry: Path | None,
             meta: dict[str, Any]) -> Residuals:
    n, n_layers, d = len(ps), model.n_layers, model.d_model
    full = model.tokenize(formatted, chat=chat, truncate=truncate)  # validates lengths once
    n_tokens = full["attention_mask"].sum(1).cpu()
    if isinstance(positions, int) and int(n_tokens.min()) < positions:
        i = int(n_tokens.argmin())
        raise InputError(f"positions={positions} but prompt {i} has only {int(n_tokens[i])} tokens; "
                         "use a smaller k.")
    spans = model.user_token_spans(ps, formatted, chat=chat) if positions == "mean" else None
    # Batches of similar length waste less compute on padding; results go back in input order.
    order = torch.argsort(n_tokens, stable=True).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    shape = (n, n_layers + 1) + ((positions,) if isinstance(positions, int) else ()) + (d,)

    partial = None
    if entry is not None:
        partial = entry.with_name(entry.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        key_file = partial / "key.json"
        key_text = json.dumps({k: meta[k] for k in meta if k != "prompts"}, sort_keys=True)
        if not key_file.is_file() or key_file.read_text() != key_text:
            shutil.rmtree(partial)
            partial.mkdir(parents=True)
            key_file.write_text(key_text)
        values = None  # written part by part; assembled at the end
    else:
        values = torch.empty(shape, dtype=torch.float32)

    names = [model.resid_hook_name(layer) for layer in range(n_layers + 1)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"capture {model.name}", unit="prompt")
    for b, rows in enumerate(batches):
        part_file = partial / f"batch-{b:05d}.safetensors" if partial is not None else None
        if part_file is not None and _part_ok(part_file, rows, shape):
            if bar is not None:
                bar.update(len(rows))
            continue
        out = _capture_batch(model, [formatted[i] for i in rows], names, positions,
                             [spans[i] for i in rows] if spans is not None else None, chat, truncate)
        if part_file is not None:
            _write_part(part_file, rows, out)
        else:
            values[rows] = out
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()

    if partial is None:
        return Residuals(values, ps, n_tokens, model.name, model.weights_hash, positions, meta["formatting"])
    # Assemble parts into the final file through a memory map, then swap it in atomically.
    tmp = entry.with_name(entry.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = _EntryWriter(tmp / "values.safetensors", {"values": (shape, torch.float32),
                                                 "n_tokens": ((n,), torch.int64)})
    from safetensors.torch import load_file

    for b, rows in enumerate(batches):
        part = load_file(str(partial / f"batch-{b:05d}.safetensors"))
        w.arrays["values"][rows] = part["values"].numpy()
    w.arrays["n_tokens"][...] = n_tokens.numpy()
    w.close()
    _finish_entry(tmp, entry, meta)
    shutil.rmtree(partial, ignore_errors=True)
    values, n_tokens, stored = _read_entry(entry)
    return Residuals._from_meta(values, n_tokens, stored)


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
    if positions == "mean":
        lengths = mask.sum(1).tolist()
        weights = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        for i, ((s, e), length) in enumerate(zip(spans, lengths)):
            off = width - length
            weights[i, off + s: off + e] = 1.0 / (e - s)
    store: dict[int, Tensor] = {}

    def keep(t: Tensor) -> Tensor:
        if positions == "last":
            return t[:, -1].float()
        if positions == "mean":
            return torch.einsum("bpd,bp->bd", t.float(), weights)
        return t[:, -positions:].float()

    def make_hook(layer: int):
        def hook_fn(t: Tensor, hook) -> None:
            store[layer] = keep(t).cpu()
        return hook_fn

    last = len(names) - 1
    hooks = [(name, make_hook(i)) for i, name in enumerate(names[:-1])]
    store[last] = keep(model.run_until(ids, mask, names[-1], hooks)).cpu()
    if len(store) != len(names):
        raise RuntimeError(f"Captured {len(store)} of {len(names)} layers: a hook did not fire.")
    return torch.stack([store[i] for i in range(len(names))], dim=1)
