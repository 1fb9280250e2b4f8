"""Artifacts on disk: one folder each, ``tensors.safetensors`` + ``meta.json``, written atomically.

The one place for lens_safety's storage. Every artifact folder holds

- ``meta.json``: ``kind``, ``schema_version``, the caller's metadata, the sha256 of the tensors
  file, and ``content_sha256`` over the rest of the JSON (so an edited or truncated file is caught);
- ``tensors.safetensors`` (optional): named arrays. Never pickle.

Folders are built under ``<name>.tmp`` and renamed into place, so a crash never leaves a half
artifact under the real name. Reads verify everything and raise :class:`~lens_safety.errors.CacheError`
(an ``OSError``) that says what is wrong and how to fix it.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> _ = write_artifact(d + "/a", kind="demo", schema_version=1, meta={"n": 2},
...                    tensors={"x": np.arange(2.0)})
>>> arrays, meta = read_artifact(d + "/a", kind="demo", schema_version=1, framework="numpy")
>>> arrays["x"].tolist(), meta["n"]
([0.0, 1.0], 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError

__all__ = ["TENSORS", "META", "sha256_file", "sha256_json", "jsonable", "atomic_dir", "write_json_atomic",
           "write_text_atomic", "read_json", "write_artifact", "read_artifact", "is_artifact"]

TENSORS = "tensors.safetensors"
META = "meta.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars/arrays, tuples and non-finite floats made JSON-safe (NaN/inf -> None)."""
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys): a content hash for metadata and keys."""
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh ``<directory>.tmp`` folder; on success it replaces ``directory`` in one rename.

    On an exception the temporary folder is removed and ``directory`` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, checksum: bool = False) -> Path:
    """Write JSON to ``path`` through a temporary file and a rename; with ``checksum`` add
    ``content_sha256`` (checked by :func:`read_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = jsonable(obj)
    if checksum:
        doc = dict(doc, content_sha256=sha256_json(doc))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) through a temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, *, what: str = "file", checksum: bool = False) -> Any:
    """Read JSON written by :func:`write_json_atomic`; :class:`CacheError` if missing, corrupt or edited."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path} does not exist: not a saved {what}.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}): the {what} is truncated or corrupted; "
                         "delete it and recompute.") from e
    if checksum:
        if not isinstance(doc, dict) or "content_sha256" not in doc:
            raise CacheError(f"{path} has no content checksum: not a {what} written by lens_safety.")
        sha = doc.pop("content_sha256")
        if sha != sha256_json(doc):
            raise CacheError(f"{path} does not match its recorded sha256: the {what} was edited or corrupted; "
                             "delete it and recompute.")
    return doc


def write_artifact(directory: str | os.PathLike, *, kind: str, schema_version: int, meta: Mapping[str, Any],
                   tensors: Mapping[str, Any] | None = None) -> Path:
    """Atomically write ``meta`` (JSON) and ``tensors`` (torch tensors or numpy arrays) into ``directory``."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        doc: dict[str, Any] = {"kind": kind, "schema_version": schema_version, **jsonable(dict(meta))}
        if tensors:
            _save_tensors(dict(tensors), tmp / TENSORS)
            doc["tensors_sha256"] = sha256_file(tmp / TENSORS)
        write_json_atomic(tmp / META, doc, checksum=True)
    return directory


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = {}
    for name, t in tensors.items():
        if hasattr(t, "detach"):  # torch.Tensor
            t = t.detach().cpu()
            if str(t.dtype) == "torch.bfloat16":
                t = t.float()
            t = t.numpy()
        arrays[name] = np.ascontiguousarray(t)
    save_file(arrays, str(path))


def is_artifact(directory: str | os.PathLike, kind: str | None = None) -> bool:
    """True when ``directory`` looks like an artifact folder (of ``kind``); nothing is verified."""
    meta = Path(directory) / META
    if not meta.is_file():
        return False
    if kind is None:
        return True
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("kind") == kind
    except (OSError, ValueError):
        return False


def read_artifact(directory: str | os.PathLike, *, kind: str, schema_version: int,
                  framework: str = "pt") -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and read an artifact: ``(tensors, meta)``. ``framework`` is ``"pt"`` or ``"numpy"``.

    Raises :class:`CacheError` naming the folder when it is missing, of another kind or schema,
    edited, truncated or unreadable. Tensors are copied out of the file (no live memory map).
    """
    directory = Path(directory)
    what = f"{kind} folder"
    if not directory.is_dir():
        raise CacheError(f"{directory} does not exist: not a saved {kind}.")
    meta = read_json(directory / META, what=what, checksum=True)
    if meta.get("kind") != kind:
        raise CacheError(f"{directory} holds a {meta.get('kind')!r}, not a {kind!r}.")
    if meta.get("schema_version") != schema_version:
        raise CacheError(f"{directory} is {kind} schema {meta.get('schema_version')}; this version of lens_safety "
                         f"reads schema {schema_version}. Recompute it.")
    tensors: dict[str, Any] = {}
    if "tensors_sha256" in meta:
        path = directory / TENSORS
        if not path.is_file():
            raise CacheError(f"{path} is missing: the {what} is incomplete; delete it and recompute.")
        if sha256_file(path) != meta["tensors_sha256"]:
            raise CacheError(f"{path} does not match its recorded sha256 (truncated or corrupted); "
                             "delete it and recompute.")
        try:
            if framework == "numpy":
                from safetensors.numpy import load_file

                tensors = {k: np.array(v) for k, v in load_file(str(path)).items()}
            else:
                from safetensors.torch import load_file

                tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
        except Exception as e:  # safetensors raises its own error types
            raise CacheError(f"{path} is unreadable ({e}); delete it and recompute.") from e
    return tensors, meta
