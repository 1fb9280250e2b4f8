"""Artifacts on disk: one folder each, ``tensors.safetensors`` + ``meta.json``, written atomically.

The one place for lens_safety's storage. Every artifact folder holds

- ``meta.json``: ``kind``, ``schema_version``, the caller's metadata, the sha256 of the tensors
  file, and ``content_sha256`` over the rest of the JSON (so an edited or truncated file is caught);
- ``tensors.safetensors`` (optional): named arrays. Never pickle;
- sub-folders (optional): nested results, each an artifact itself, the sha256 of its ``meta.json``
  recorded in ``children_sha256`` (``write_artifact(children=...)``).

Folders are built under a unique temporary name beside the target and renamed into place, so a
crash never leaves a half artifact under the real name, concurrent writers never share a temporary
folder, and a folder lens_safety did not write is never replaced (:func:`atomic_dir`). Reads verify
everything and raise :class:`~lens_safety.core.errors.CacheError` (an ``OSError``) that says what is wrong
and how to fix it.

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
import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import CacheError, InputError

__all__ = ["TENSORS", "META", "sha256_file", "sha256_json", "jsonable", "atomic_dir", "write_json_atomic",
           "write_text_atomic", "MARKERS", "is_ours", "check_replaceable", "read_json", "write_artifact",
           "read_artifact", "is_artifact", "Result", "frame_to_json", "frame_from_json", "json_float"]

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


def json_float(x: Any) -> float:
    """A float read back from :func:`jsonable` JSON: ``None`` (how NaN/inf are written) -> NaN.

    >>> json_float(None), json_float(2)
    (nan, 2.0)
    """
    return float("nan") if x is None else float(x)


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys): a content hash for metadata and keys."""
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


#: Files that mark a folder as written by lens_safety (``meta.json`` of artifacts and caches,
#: ``lens_safety.json`` of :meth:`~lens_safety.model.loading.SafetyModel.save_pretrained` exports): a JSON
#: object with a ``kind``. Only such folders (or empty ones) are ever replaced by :func:`atomic_dir`.
MARKERS = (META, "lens_safety.json")


def _temp_name(path: Path) -> Path:
    """A name beside ``path`` that no other writer (process or thread) uses: ``.<name>.<pid>-<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def is_ours(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a lens_safety marker (:data:`MARKERS`) naming a ``kind``; a
    damaged marker still counts while its ``"kind":`` survives (so a corrupted cache entry is rebuilt).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> is_ours(d), is_ours(write_artifact(d + "/a", kind="demo", schema_version=1, meta={}))
    (False, True)
    """
    for name in MARKERS:
        try:
            text = (Path(directory) / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        try:
            doc = json.loads(text)
        except ValueError:  # truncated or corrupted: ours if it still reads like our JSON (kind comes first)
            if '"kind":' in text:
                return True
            continue
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
            return True
    return False


def check_replaceable(directory: str | os.PathLike) -> None:
    """Raise :class:`~lens_safety.core.errors.InputError` unless ``directory`` is absent, an empty folder
    or a folder lens_safety wrote (:func:`is_ours`): a user's own folder is never deleted."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir() or directory.is_symlink():
        raise InputError(f"{directory} exists and is a file or a symbolic link, not a folder; lens_safety will not "
                         "replace it. Choose another path or remove it yourself.")
    if any(directory.iterdir()) and not is_ours(directory):
        raise InputError(f"{directory} is a non-empty folder that lens_safety did not write (no "
                         f"{' or '.join(MARKERS)} with a 'kind'); writing there would delete its contents. "
                         "Choose a new or empty folder, or remove it yourself.")


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``directory``; on success it replaces ``directory`` in one rename.

    ``directory`` must be absent, empty or written by lens_safety (:func:`check_replaceable`, checked
    before and after the work); anything else raises :class:`~lens_safety.core.errors.InputError` and is
    left untouched. Each call builds in its own uniquely named temporary folder, so concurrent writers
    (several processes under ``accelerate``) never share one; the last to finish wins. On an exception
    the temporary folder is removed and ``directory`` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(directory)
    tmp = _temp_name(directory)
    tmp.mkdir()
    try:
        yield tmp
        for _ in range(16):
            check_replaceable(directory)
            old = _temp_name(directory)
            with contextlib.suppress(FileNotFoundError):  # nothing there, or another writer moved it first
                os.replace(directory, old)
            try:
                os.replace(tmp, directory)
                break
            except OSError as e:  # another writer put its folder there between our two renames: again
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            raise OSError(f"Could not move {tmp} to {directory}: other writers keep replacing it.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, checksum: bool = False) -> Path:
    """Write JSON to ``path`` through a uniquely named temporary file and a rename; with ``checksum`` add
    ``content_sha256`` (checked by :func:`read_json`)."""
    path = Path(path)
    doc = jsonable(obj)
    if checksum:
        doc = dict(doc, content_sha256=sha256_json(doc))
    return write_text_atomic(path, json.dumps(doc, ensure_ascii=False, indent=1))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) through a uniquely named temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
                   tensors: Mapping[str, Any] | None = None, children: Mapping[str, Any] | None = None) -> Path:
    """Atomically write ``meta`` (JSON) and ``tensors`` (torch tensors or numpy arrays) into ``directory``.

    ``children``: nested results (anything with ``save(path)``, itself an artifact) saved into
    sub-folders of that name inside the same atomic write; the sha256 of each one's ``meta.json`` is
    recorded (``children_sha256``) and checked by :func:`read_artifact`. Load them with their own ``load``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> class Child:
    ...     def save(self, path): return write_artifact(path, kind="child", schema_version=1, meta={"x": 1})
    >>> _ = write_artifact(d + "/p", kind="parent", schema_version=1, meta={}, children={"c": Child()})
    >>> read_artifact(d + "/p/c", kind="child", schema_version=1)[1]["x"]
    1
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        doc: dict[str, Any] = {"kind": kind, "schema_version": schema_version, **jsonable(dict(meta))}
        if tensors:
            _save_tensors(dict(tensors), tmp / TENSORS)
            doc["tensors_sha256"] = sha256_file(tmp / TENSORS)
        if children:
            doc["children_sha256"] = {}
            for name, child in children.items():
                if not isinstance(name, str) or not name.isidentifier():
                    raise ValueError(f"child name {name!r} is not a plain identifier (a sub-folder name).")
                child.save(tmp / name)
                doc["children_sha256"][name] = sha256_file(tmp / name / META)
        write_json_atomic(tmp / META, doc, checksum=True)
    return directory


def frame_to_json(frame: Any) -> dict[str, Any]:
    """A pandas DataFrame as JSON-safe ``{"columns", "dtypes", "data"}`` (NaN -> None); see :func:`frame_from_json`.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"set": ["a", "b"], "n": [1, 2], "rate": [0.5, float("nan")]})
    >>> frame_from_json(json.loads(json.dumps(frame_to_json(f)))).equals(f)
    True
    """
    return {"columns": [str(c) for c in frame.columns], "dtypes": [str(t) for t in frame.dtypes],
            "data": jsonable(frame.to_numpy(dtype=object).tolist())}


def frame_from_json(doc: Mapping[str, Any]) -> Any:
    """The DataFrame back from :func:`frame_to_json` (column order and dtypes restored)."""
    import pandas as pd

    frame = pd.DataFrame(doc["data"], columns=doc["columns"], dtype=object)
    return frame.astype(dict(zip(doc["columns"], doc["dtypes"])))


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
    for name, sha in (meta.get("children_sha256") or {}).items():
        child = directory / str(name) / META
        if not child.is_file():
            raise CacheError(f"{child} is missing: the {what} is incomplete; delete it and recompute.")
        if sha256_file(child) != sha:
            raise CacheError(f"{child} does not match its recorded sha256 (edited or replaced); "
                             "delete it and recompute.")
    return tensors, meta


@runtime_checkable
class Result(Protocol):
    """What every public result object of lens_safety offers (a ``runtime_checkable`` protocol).

    - ``to_frame()``: a pandas DataFrame of the numbers;
    - ``plot(ax=None)``: a matplotlib ``Figure`` (drawn on ``ax``'s figure when given; never an Axes);
    - ``save(path)``: an artifact folder written by :func:`write_artifact` (safetensors + JSON, no pickle);
    - ``load(path)`` (a classmethod): the object back; :class:`~lens_safety.core.errors.CacheError` when the
      folder is missing, of another kind, edited or truncated (:func:`read_artifact`).

    ``isinstance(obj, Result)`` checks that the four methods exist (not their signatures).

    >>> import tempfile
    >>> from lens_safety.inputs.prompts import PromptSet
    >>> from lens_safety.behaviour.refusal import RefusalResult
    >>> r = RefusalResult(PromptSet.from_texts(["a"], label="x"), ["No."], [True], [1.0], "m", "h")
    >>> isinstance(r, Result), type(r.plot()).__name__
    (True, 'Figure')
    >>> RefusalResult.load(r.save(tempfile.mkdtemp() + "/r")).to_frame().equals(r.to_frame())
    True
    """

    def to_frame(self) -> Any: ...

    def plot(self, ax: Any = None) -> Any: ...

    def save(self, directory: str | os.PathLike) -> Path: ...

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Result: ...
