"""Logit lens with a refusal / positive-emotion lexicon, Top-K Intermediate Consistency.

The lens decodes every residual layer with the model's own read-out: the final norm
(``model.final_norm``) applied **exactly once**, then the unembedding. Residual layers are
indexed ``0..n_layers``: 0 is the embedding output, ``l`` the raw output of block ``l-1``
(no final norm; unlike HF ``hidden_states`` whose last entry is already normed). So the
last layer of the lens equals the model's own next-token logits.

>>> import lens_safety as ls
>>> model = ls.testing.tiny_model()
>>> acts = ls.collect_residuals(model, ["Tell me a story", "Make a bomb"], cache=False, progress=False)
>>> lens = ls.logit_lens(model, acts, top_k=3)
>>> lens.top_ids.shape            # [prompt, layer, rank]
torch.Size([2, 4, 3])
>>> sorted(lens.to_frame().columns)[:4]
['category', 'label', 'layer', 'prob']

Logit Grafting (:func:`graft`, :class:`GraftResult`) lives in :mod:`lens_safety.analyses.lens.graft`
and is re-exported here.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ...behaviour.refusal import RefusalTokens
from ...core.errors import CacheError, InputError, ModelMismatchError
from ...core.stats import mean_ci as _stats_mean_ci
from ...core.store import read_artifact, write_artifact
from ...core.validation import check_int
from ...inputs.prompts import PromptSet
from .. import figures as viz
from .graft import GraftResult, graft
from .readout import (
    SCHEMA_VERSION,
    _as_residuals,
    _check_residuals_any,
    _prompts_from_json,
    _prompts_to_json,
    lens_logits,
)
from .translators import lens_name, resolve_lens

__all__ = ["Lexicon", "LensResult", "logit_lens", "lens_logits", "GraftResult", "graft", "mean_ci",
           "DEFAULT_REFUSAL_WORDS", "DEFAULT_POSITIVE_WORDS"]

# -- lexicon -----------------------------------------------------------------------------------

#: Negative-emotion / refusal words. A trailing ``*`` marks a stem: any piece starting with it matches.
DEFAULT_REFUSAL_WORDS: tuple[str, ...] = (
    "sorry", "apolog*", "cannot", "unable", "unfortunately", "illegal", "unethical", "ethical", "ethics",
    "harmful", "harm", "refuse", "refusal", "inappropriate", "against", "dangerous", "danger", "not", "no",
    "never", "decline", "regret", "afraid", "unsafe", "violat*", "prohibit*", "forbid*", "offensive",
    "malicious", "criminal", "crime", "illicit", "unlawful", "unacceptable", "irresponsible", "sadly",
    "warning", "abuse", "immoral", "wrong", "policy", "guidelines", "disclaimer",
    # Qwen-family models often surface Chinese pieces in the middle layers.
    "抱歉", "对不起", "无法", "不能", "违法", "不", "拒绝",
)
#: Positive-emotion / affirmation words.
DEFAULT_POSITIVE_WORDS: tuple[str, ...] = (
    "sure", "certainly", "glad", "happy", "here", "step", "welcome", "absolutely", "course", "great",
    "pleasure", "hello", "yes", "okay", "ok", "delighted", "love", "enjoy", "fantastic", "wonderful",
    "excellent", "thank*", "awesome", "gladly", "definitely", "perfect", "nice", "good", "exciting",
    "当然", "好的", "很高兴", "可以",
)
#: Common words that are heads of a lexicon word but mean something else ("again" / "against").
#: Rule 3 of :class:`Lexicon` would otherwise match them as truncated stems, although the piece is a
#: word (or name, or the head of another common word) of its own: "certain" is not "certainly",
#: "Fanta"/"fantas" not "fantastic" (fantasy), "absolute" not "absolutely", "offen"/"offens" not
#: "offensive" (offend, offense, German "offen"), "irres" not "irresponsible" (irresistible).
#: The list comes from scanning every rule-3 match in the Qwen2.5 vocabulary.
DEFAULT_EXCLUDE: tuple[str, ...] = ("again", "wonder", "wonde", "excel", "defin", "definit", "definite",
                                    "pleas", "polic", "guide", "harmon", "certain", "fanta", "fantas",
                                    "absolute", "offen", "offens", "irres")
_MARKERS = "Ġ▁Ċ"  # leading-space / newline markers of byte-level BPE and sentencepiece


def normalize_piece(piece: str) -> str:
    """The form a decoded token piece is matched in: markers and whitespace stripped, case-folded.

    >>> normalize_piece(" Sorry"), normalize_piece("▁apolog"), normalize_piece("Ġsure\\n")
    ('sorry', 'apolog', 'sure')
    """
    return piece.strip().lstrip(_MARKERS).strip().casefold()


def _token_key(piece: str, token_id: int, key: str) -> str | tuple[str, int]:
    """What identifies a token for counting: its normalised piece (``key="text"``), or its id where
    the piece carries no text of its own ("" after normalising, or U+FFFD); ``("id", id)``."""
    if key == "text":
        norm = normalize_piece(piece)
        if norm and "\ufffd" not in norm:
            return norm
    return ("id", token_id)


@dataclass(frozen=True)
class Lexicon:
    """Token categories for colouring the lens: ``refusal``, ``positive``, then ``neutral`` (the rest).

    ``categories`` maps a name to its words (a trailing ``*`` marks a stem). Pieces are
    matched tokenizer-aware: each token id is decoded *on its own*, leading-space markers
    (``Ġ``, ``▁``, spaces, newlines) are stripped and the rest is case-folded. A piece then
    belongs to a category if

    1. it equals one of the category's words (any length: ``"no"`` matches " No"), or
    2. it starts with one of the category's stems (``"apolog*"`` matches " apologize", " apolog"), or
    3. it is the head of a word or stem of at least ``min_word`` characters, and has at least
       ``min_head`` characters (" unfortun" matches "unfortunately"), and is not in ``exclude``
       (common words such as "again" that happen to be heads of "against").

    So short pieces (``"un"``, ``"sor"``, ``"can"``, ``"ill"``) never match by rule 3 and
    word-internal continuations (``"ologize"``) are neutral. Rule 3 is what catches the
    truncated stems a BPE vocabulary holds. A piece matching several categories goes to
    the first one in ``categories`` order. ``neutral`` is every other token id.

    >>> lex = Lexicon.default().extend(refusal=["nope"], positive=["yay"])
    >>> lex.category_of(" Sorry"), lex.category_of("ologize"), lex.category_of(" Unfortun"), lex.category_of("Yay")
    ('refusal', 'neutral', 'refusal', 'positive')
    """

    categories: Mapping[str, tuple[str, ...]]
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    min_head: int = 5
    min_word: int = 6
    neutral: str = "neutral"

    def __post_init__(self) -> None:
        cats = {str(k): tuple(str(w) for w in v) for k, v in dict(self.categories).items()}
        if not cats:
            raise InputError("A Lexicon needs at least one category, e.g. {'refusal': ['sorry']}.")
        if self.neutral in cats:
            raise InputError(f"{self.neutral!r} is the catch-all category; do not list words for it.")
        for name, words in cats.items():
            for w in words:
                if not normalize_piece(w.rstrip("*")):
                    raise InputError(f"Category {name!r} has an empty word {w!r}.")
        object.__setattr__(self, "categories", cats)
        object.__setattr__(self, "exclude", tuple(normalize_piece(w) for w in self.exclude))
        object.__setattr__(self, "_matchers", {name: _matcher(words, self) for name, words in cats.items()})

    @classmethod
    def default(cls) -> Lexicon:
        """The paper's categories: refusal/negative emotion and affirmation/positive emotion."""
        return cls({"refusal": DEFAULT_REFUSAL_WORDS, "positive": DEFAULT_POSITIVE_WORDS})

    def extend(self, **words: Iterable[str]) -> Lexicon:
        """A new lexicon with more words per category (new names add categories, before neutral)."""
        cats = {k: tuple(v) for k, v in self.categories.items()}
        for name, extra in words.items():
            if isinstance(extra, str):
                raise InputError(f"extend({name}=...) takes a list of words, got the string {extra!r}.")
            cats[name] = cats.get(name, ()) + tuple(extra)
        return Lexicon(cats, self.exclude, self.min_head, self.min_word, self.neutral)

    @property
    def names(self) -> tuple[str, ...]:
        """Category names in order, ending with the neutral catch-all."""
        return tuple(self.categories) + (self.neutral,)

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple:
        """A hashable summary of everything that decides the matching (cache key)."""
        return (tuple((k, v) for k, v in self.categories.items()), self.exclude, self.min_head,
                self.min_word, self.neutral)

    def category_of(self, piece: str) -> str:
        """The category of one decoded token piece."""
        norm = normalize_piece(piece)
        for name, match in self._matchers.items():  # type: ignore[attr-defined]
            if match(norm):
                return name
        return self.neutral

    def token_categories(self, tokenizer) -> np.ndarray:
        """Category index (into :attr:`names`) of every token id of the tokenizer; cached per tokenizer."""
        store = _tokenizer_store(tokenizer)
        key = ("categories", self.key())
        if key not in store:
            pieces = decoded_pieces(tokenizer)
            cat = np.full(len(pieces), len(self.categories), dtype=np.int64)
            for i, piece in enumerate(pieces):
                c = self.category_of(piece)
                if c != self.neutral:
                    cat[i] = self.names.index(c)
            store[key] = cat
        return store[key]

    def token_ids(self, tokenizer) -> dict[str, Tensor]:
        """``{category: LongTensor of token ids}`` for every category, neutral included."""
        cat = torch.from_numpy(self.token_categories(tokenizer))
        return {name: (cat == i).nonzero().flatten() for i, name in enumerate(self.names)}


def _matcher(words: Sequence[str], lex: Lexicon):
    exact = {normalize_piece(w) for w in words if not w.endswith("*")}
    stems = tuple(normalize_piece(w[:-1]) for w in words if w.endswith("*"))
    heads = set()
    for w in {normalize_piece(w.rstrip("*")) for w in words}:
        if len(w) >= lex.min_word:
            heads.update(w[:k] for k in range(lex.min_head, len(w)))
    heads -= set(lex.exclude)

    def match(norm: str) -> bool:
        return bool(norm) and (norm in exact or (bool(stems) and norm.startswith(stems)) or norm in heads)

    return match


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_store(tokenizer) -> dict:
    try:
        return _STORES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def decoded_pieces(tokenizer, vocab_size: int | None = None) -> list[str]:
    """Every token id decoded on its own (cached per tokenizer). Ids past the tokenizer are ``""``."""
    store = _tokenizer_store(tokenizer)
    n = len(tokenizer)
    if "pieces" not in store:
        store["pieces"] = tokenizer.batch_decode([[i] for i in range(n)])
    pieces = store["pieces"]
    if vocab_size is not None and vocab_size > len(pieces):
        pieces = pieces + [""] * (vocab_size - len(pieces))
    return pieces


# -- statistics -----------------------------------------------------------------------------------

#: Re-exported from :mod:`lens_safety.core.stats` (the one place for statistics).
mean_ci = _stats_mean_ci


# -- logit lens -----------------------------------------------------------------------------------

@dataclass
class LensResult:
    """Logit-lens read-out of every residual layer at the last position, per prompt.

    ``top_ids`` / ``top_probs`` / ``tokens`` / ``top_categories`` are ``[prompt, layer, rank]``;
    ``mass`` is ``[prompt, layer, category]``: the softmax probability summed over each
    lexicon category's token ids (categories in ``categories`` order, neutral last, so a
    row sums to 1). Layer 0 is the embedding output, ``l`` the raw output of block ``l-1``.
    ``lens`` is ``"logit"`` or ``"tuned"`` (read through a :class:`~lens_safety.analyses.lens.tuned.TunedLens`);
    everything below works the same with either. ``refusal_score`` (``[prompt, layer]``) is the
    first-token refusal score (:meth:`lens_safety.behaviour.refusal.RefusalTokens.score`, ``> 0``: a
    refusal start such as "I'm sorry" leads) of each layer's read-out: unlike the lexicon mass it
    reads the *first* token of a refusal ("I"), which is what the model outputs at this position.
    """

    top_ids: Int[Tensor, "batch layer k"]
    top_probs: Float[Tensor, "batch layer k"]
    tokens: np.ndarray
    top_categories: np.ndarray
    mass: Float[Tensor, "batch layer category"]
    categories: tuple[str, ...]
    prompts: PromptSet
    model_name: str
    weights_hash: str
    lexicon: Lexicon = field(default_factory=Lexicon.default)
    lens: str = "logit"
    refusal_score: Float[Tensor, "batch layer"] | None = None

    @property
    def labels(self) -> list[str]:
        return self.prompts.labels

    @property
    def n_layers(self) -> int:
        return int(self.top_ids.shape[1]) - 1

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[2])

    def __len__(self) -> int:
        return int(self.top_ids.shape[0])

    def __repr__(self) -> str:
        return (f"LensResult(n={len(self)}, layers=0..{self.n_layers}, top_k={self.top_k}, lens={self.lens!r}, "
                f"categories={self.categories}, model={self.model_name!r})")

    def _groups(self, by: str | None) -> list[tuple[str, np.ndarray]]:
        if by is None:
            return [("all", np.arange(len(self)))]
        if by != "label":
            raise InputError(f"by must be 'label' or None, got {by!r}.")
        labels = np.asarray(self.labels, dtype=object)
        return [(lab, np.flatnonzero(labels == lab)) for lab in dict.fromkeys(self.labels)]

    def _label_rows(self, label: str | None) -> np.ndarray:
        if label is None:
            return np.arange(len(self))
        rows = np.flatnonzero(np.asarray(self.labels, dtype=object) == label)
        if rows.size == 0:
            raise InputError(f"No prompts with label {label!r}; labels here: {sorted(set(self.labels))}.")
        return rows

    def to_frame(self):
        """Long form: one row per prompt x layer x rank (``prompt`` is the prompt's index)."""
        import pandas as pd

        n, L, k = self.top_ids.shape
        idx = np.indices((n, L, k)).reshape(3, -1)
        labels = np.asarray(self.labels, dtype=object)
        return pd.DataFrame({
            "prompt": idx[0], "label": labels[idx[0]], "layer": idx[1], "rank": idx[2],
            "token": self.tokens.reshape(-1), "token_id": self.top_ids.reshape(-1).numpy(),
            "prob": self.top_probs.reshape(-1).numpy(), "category": self.top_categories.reshape(-1),
        })

    def category_mass(self, by: str | None = "label", level: float = 0.95):
        """One row per set x layer x category: mean probability mass with a t confidence interval."""
        import pandas as pd

        rows = []
        m = self.mass.double().numpy()
        for lab, r in self._groups(by):
            for layer in range(self.n_layers + 1):
                for c, name in enumerate(self.categories):
                    mean, lo, hi = mean_ci(m[r, layer, c], level)
                    rows.append({"label": lab, "layer": layer, "category": name, "mean": mean,
                                 "ci_low": lo, "ci_high": hi, "n": int(r.size)})
        return pd.DataFrame(rows)

    def refusal_score_frame(self, by: str | None = "label", level: float = 0.95):
        """One row per set x layer: mean first-token refusal score of the read-out with a t CI."""
        import pandas as pd

        if self.refusal_score is None:
            raise InputError("This LensResult has no refusal scores; compute it with logit_lens().")
        sc = self.refusal_score.double().numpy()
        rows = []
        for lab, r in self._groups(by):
            for layer in range(self.n_layers + 1):
                mean, lo, hi = mean_ci(sc[r, layer], level)
                rows.append({"label": lab, "layer": layer, "score": mean, "ci_low": lo, "ci_high": hi,
                             "n": int(r.size)})
        return pd.DataFrame(rows)

    def score_separation_layer(self, label: str = "harmful", other: str = "harmless",
                               level: float = 0.95) -> int | None:
        """First layer where ``label``'s mean refusal score is above ``other``'s with non-overlapping
        ``level`` t intervals (a conservative "refusal is readable here"); ``None``: never."""
        f = self.refusal_score_frame(by="label", level=level)
        for lab in (label, other):
            if lab not in set(f["label"]):
                raise InputError(f"No prompts with label {lab!r}; labels here: {sorted(set(self.labels))}.")
        a = f[f.label == label].set_index("layer")
        b = f[f.label == other].set_index("layer")
        for layer in range(self.n_layers + 1):
            if a.loc[layer, "ci_low"] > b.loc[layer, "ci_high"]:
                return layer
        return None

    def top1_category(self, by: str | None = "label"):
        """Per set x layer: the fraction of prompts whose top-1 lens token is in each category,
        and the most common one (``top1_category``)."""
        import pandas as pd

        rows = []
        for lab, r in self._groups(by):
            for layer in range(self.n_layers + 1):
                cats = self.top_categories[r, layer, 0]
                row: dict[str, Any] = {"label": lab, "layer": layer, "n": int(r.size)}
                for name in self.categories:
                    row[f"frac_{name}"] = float(np.mean(cats == name))
                row["top1_category"] = max(self.categories, key=lambda c: row[f"frac_{c}"])
                rows.append(row)
        return pd.DataFrame(rows)

    def consistency(self, by: str | None = "label", n_top: int = 3, key: str = "text"):
        """Top-K Intermediate Consistency per set and layer.

        For layer ``l`` and a set of ``N`` prompts: each prompt contributes its top-k lens
        tokens at ``l``, a token counted at most once per prompt (``key="text"`` identifies
        tokens by their normalised piece, so " Sorry" and "sorry" are one token, except pieces
        that normalise to "" (whitespace, newlines) or hold U+FFFD (an incomplete UTF-8 byte
        sequence), which are identified by their id: distinct byte tokens all decode to "\ufffd";
        ``key="id"`` by token id). ``count(t)`` is the number of prompts whose top-k list
        holds ``t``, and::

            consistency(l) = max_t count(t) / N      (in [1/N... , 1]; 1 = one token in every list)

        Columns: ``label, layer, n, consistency, token`` (the most frequent token, its
        normalised piece for ``key="text"``), ``count``, ``category`` (its lexicon
        category), and ``top_tokens`` (the ``n_top`` most frequent, as ``[(token, count)]``).
        Ties are broken by the lower mean rank, then alphabetically.
        """
        import pandas as pd

        if key not in ("text", "id"):
            raise InputError(f"key must be 'text' or 'id', got {key!r}.")
        rows = []
        for lab, r in self._groups(by):
            for layer in range(self.n_layers + 1):
                counts: Counter = Counter()
                ranks: dict[Any, list[int]] = {}
                shown: dict[Any, str] = {}
                for i in r:
                    seen = set()
                    for rank in range(self.top_k):
                        piece = str(self.tokens[i, layer, rank])
                        t = _token_key(piece, int(self.top_ids[i, layer, rank]), key)
                        shown.setdefault(t, t if isinstance(t, str) else piece)
                        ranks.setdefault(t, []).append(rank)
                        if t not in seen:
                            seen.add(t)
                            counts[t] += 1
                order = sorted(counts, key=lambda t: (-counts[t], float(np.mean(ranks[t])), str(t)))
                best = order[0]
                piece = shown[best]
                rows.append({"label": lab, "layer": layer, "n": int(r.size),
                             "consistency": counts[best] / r.size, "token": piece, "count": counts[best],
                             "category": self.lexicon.category_of(str(piece)),
                             "top_tokens": [(shown[t], counts[t]) for t in order[:n_top]]})
        return pd.DataFrame(rows)

    def emergence_layer(self, label: str | None = None, *, refusal: str = "refusal", over: str = "positive",
                        min_mass: float = 0.01) -> int | None | dict[str, int | None]:
        """First layer where the set's mean ``refusal`` mass exceeds its mean ``over`` mass.

        The refusal mass must also exceed ``min_mass`` (default 0.01): in early layers both
        masses are ~1e-4 and their order is noise (on the default model the bare comparison
        fires at layer 1 for every set). ``min_mass=0`` gives the bare comparison.
        ``label=None`` with several labels returns ``{label: layer}``; ``None`` means never.
        """
        for c in (refusal, over):
            if c not in self.categories:
                raise InputError(f"Unknown category {c!r}; this lens has {self.categories}.")
        if label is None and len(set(self.labels)) > 1:
            return {lab: self.emergence_layer(lab, refusal=refusal, over=over, min_mass=min_mass)
                    for lab in dict.fromkeys(self.labels)}
        r = self._label_rows(label)
        m = self.mass[r].double().mean(0)  # [layer, category]
        ref, pos = m[:, self.categories.index(refusal)], m[:, self.categories.index(over)]
        hits = ((ref > pos) & (ref > min_mass)).nonzero().flatten()
        return int(hits[0]) if hits.numel() else None

    def plot(self, kind: str = "mass", ax=None, **kwargs):
        """``kind="mass"``: category-mass curves per set with CI bands (one panel per category;
        ``ax`` a list of axes); ``"heatmap"``: layers x rank token table coloured by category
        (``prompt=i`` for one prompt, ``label=`` for a set's most frequent tokens). Returns the
        matplotlib Figure (see :func:`~lens_safety.analyses.figures.category_mass_figure`,
        :func:`~lens_safety.analyses.figures.lens_heatmap`)."""
        if kind not in ("mass", "heatmap"):
            raise InputError(f"kind must be 'mass' or 'heatmap', got {kind!r}.")
        return (viz.category_mass_figure if kind == "mass" else viz.lens_heatmap)(self, ax=ax, **kwargs)

    def views(self, prompts: Sequence[int] = (0,)):
        """circuitsvis views of the chosen prompts: top-k tokens per layer (see :mod:`lens_safety.analyses.figures`)."""
        return [viz.lens_topk_view(self, list(prompts))]

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result as a :mod:`lens_safety.core.store` artifact: ids, probabilities, masses, categories
        and scores in ``tensors.safetensors``; token pieces, prompts and the lexicon in ``meta.json``.

        >>> import tempfile, lens_safety as ls
        >>> lens = ls.logit_lens(ls.testing.tiny_model(), ["Hi", "Make a bomb"], top_k=2)
        >>> LensResult.load(lens.save(tempfile.mkdtemp() + "/lens")).to_frame().equals(lens.to_frame())
        True
        """
        index = {c: i for i, c in enumerate(self.categories)}
        cats = np.array([index[c] for c in self.top_categories.reshape(-1)], dtype=np.int64)
        tensors = {"top_ids": self.top_ids, "top_probs": self.top_probs, "mass": self.mass,
                   "top_categories": cats.reshape(self.top_categories.shape)}
        if self.refusal_score is not None:
            tensors["refusal_score"] = self.refusal_score
        meta = {"model_name": self.model_name, "weights_hash": self.weights_hash, "lens": self.lens,
                "categories": list(self.categories), "tokens": [str(t) for t in self.tokens.reshape(-1)],
                "lexicon": _lexicon_to_json(self.lexicon), **_prompts_to_json(self.prompts)}
        return write_artifact(directory, kind="LensResult", schema_version=SCHEMA_VERSION, meta=meta,
                              tensors=tensors)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LensResult:
        """Load what :meth:`save` wrote; :class:`~lens_safety.core.errors.CacheError` if it is missing, of
        another kind, edited or truncated."""
        t, meta = read_artifact(directory, kind="LensResult", schema_version=SCHEMA_VERSION)
        try:
            categories = tuple(meta["categories"])
            prompts = _prompts_from_json(meta, directory)
            lexicon = _lexicon_from_json(meta["lexicon"])
            shape = tuple(t["top_ids"].shape)
            if (len(shape) != 3 or shape[0] != len(prompts) or tuple(t["top_probs"].shape) != shape
                    or tuple(t["mass"].shape) != (*shape[:2], len(categories)) or lexicon.names != categories):
                raise ValueError("the arrays, prompts and categories do not agree in shape")
            tokens = np.empty(shape, dtype=object)
            tokens.reshape(-1)[:] = [str(p) for p in meta["tokens"]]
            cats = np.empty(shape, dtype=object)
            cats.reshape(-1)[:] = [categories[i] for i in t["top_categories"].reshape(-1).tolist()]
            return cls(t["top_ids"], t["top_probs"], tokens, cats, t["mass"], categories, prompts, meta["model_name"],
                       meta["weights_hash"], lexicon, meta["lens"], t.get("refusal_score"))
        except (KeyError, TypeError, ValueError, IndexError, InputError) as e:
            raise CacheError(f"{directory}: saved LensResult is malformed ({e}); delete it and recompute.") from e


# -- persistence helpers ------------------------------------------------------------------------------

def _lexicon_to_json(lex: Lexicon) -> dict[str, Any]:
    return {"categories": {k: list(v) for k, v in lex.categories.items()}, "exclude": list(lex.exclude),
            "min_head": lex.min_head, "min_word": lex.min_word, "neutral": lex.neutral}


def _lexicon_from_json(doc: Mapping[str, Any]) -> Lexicon:
    return Lexicon(dict(doc["categories"]), tuple(doc["exclude"]), int(doc["min_head"]), int(doc["min_word"]),
                   str(doc["neutral"]))


def _check_residuals(model, res) -> None:
    _check_residuals_any(model, res)
    if res.values.dim() != 3:
        raise InputError(f"The lens needs one vector per prompt and layer ([n, n_layers+1, d_model]); got "
                         f"shape {tuple(res.values.shape)} (positions={res.positions!r}). Collect with "
                         "positions='last' (or 'mean').")
    if res.n_layers != model.n_layers:
        raise ModelMismatchError(f"The residuals have {res.n_layers} layers, {model.name} has {model.n_layers}.")


def logit_lens(model, residuals, top_k: int = 5, lexicon: Lexicon | None = None, *,
               batch_size: int | None = None, max_memory_mb: int = 512, system: str | None = None,
               chat: bool | None = None, lens=None) -> LensResult:
    """Decode every residual layer with the model's final norm (once) and unembedding.

    ``residuals``: a :class:`~lens_safety.capture.Residuals` (``positions="last"``) from
    this model, or prompts (then captured without cache). Keeps the ``top_k`` tokens per
    prompt and layer and the probability mass of each ``lexicon`` category (default
    :meth:`Lexicon.default`). Work is done in chunks of ``batch_size`` prompts (default:
    as many as fit ``max_memory_mb`` of float32 logits), so memory stays bounded.

    ``lens``: ``None`` (the logit lens), ``"tuned"`` (the cached tuned lens of this model,
    trained once with the default budget if missing) or a
    :class:`~lens_safety.analyses.lens.tuned.TunedLens`: each layer is first mapped by its trained
    translator (the last layer is left as it is, so both lenses agree there). NaN/inf
    residuals raise :class:`~lens_safety.core.errors.InputError`.
    """
    tuned = resolve_lens(model, lens)
    lexicon = lexicon or Lexicon.default()
    res = _as_residuals(model, residuals, system, chat, batch_size or 16)
    _check_residuals(model, res)
    vocab = model.d_vocab
    top_k = check_int(top_k, "top_k", low=1, high=vocab, hint=f"{vocab} = the vocabulary size of {model.name}")
    n, L = res.values.shape[:2]
    if batch_size is None:
        per_prompt = L * vocab * 4 * 3  # logits, probabilities, a temporary
        batch_size = max(1, int(max_memory_mb * 2**20 // per_prompt))
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")

    cat_np = lexicon.token_categories(model.tokenizer)
    names = lexicon.names
    cat = torch.full((vocab,), len(names) - 1, dtype=torch.long)
    m = min(vocab, cat_np.size)
    cat[:m] = torch.from_numpy(cat_np[:m])
    onehot = torch.nn.functional.one_hot(cat, len(names)).to(device=model.output_device, dtype=torch.float32)

    rt = RefusalTokens.from_tokenizer(model.tokenizer)
    score = torch.empty((n, L), dtype=torch.float32)
    top_ids = torch.empty((n, L, top_k), dtype=torch.long)
    top_probs = torch.empty((n, L, top_k), dtype=torch.float32)
    mass = torch.empty((n, L, len(names)), dtype=torch.float32)
    for s in range(0, n, batch_size):
        x = res.values[s:s + batch_size]
        if tuned is not None:
            x = tuned.translate(x.to(model.device, torch.float32))
        logits = lens_logits(model, x).float()
        score[s:s + batch_size] = rt.score(logits).cpu()
        probs = torch.softmax(logits, dim=-1)
        del logits
        p, i = probs.topk(top_k, dim=-1)
        top_ids[s:s + batch_size], top_probs[s:s + batch_size] = i.cpu(), p.cpu()
        mass[s:s + batch_size] = (probs @ onehot).cpu()
        del probs
    pieces = decoded_pieces(model.tokenizer, vocab)
    tokens = np.empty(top_ids.shape, dtype=object)
    cats = np.empty(top_ids.shape, dtype=object)
    flat_ids = top_ids.reshape(-1).tolist()
    tokens.reshape(-1)[:] = [pieces[i] for i in flat_ids]
    cats.reshape(-1)[:] = [names[int(cat[i])] for i in flat_ids]
    return LensResult(top_ids, top_probs, tokens, cats, mass, names, res.prompts, res.model_name,
                      res.weights_hash, lexicon, lens_name(tuned), score)
