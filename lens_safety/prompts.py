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

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

from .errors import InputError

__all__ = ["Prompt", "PromptSet"]


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
        """sha256 over texts and labels, in order: the key of every downstream cache."""
        h = hashlib.sha256()
        for p in self._items:
            h.update(json.dumps([p.text, p.label], ensure_ascii=False).encode("utf-8"))
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
