"""When a reply turns: the judge on growing prefixes of each reply.

Each reply's first ``m`` tokens (``m`` in ``prefixes``, and the whole reply) are decoded and judged with
the run's judge. A reply *turns* when its first decided prefix (not ``"unengaged"``) and its full reply are
decided differently: it starts complying and then refuses (``"complied->refused"``), or the reverse. The
turn position is the shortest prefix from which the judged outcome equals the final one and stays so.
``early`` compares the judge on the first ``early`` tokens with the judge on the full reply.

>>> import numpy as np
>>> from lens_safety.behaviour.refusal import RefusalResult
>>> from lens_safety.inputs.prompts import PromptSet
>>> class Tok:
...     def decode(self, ids, skip_special_tokens=True): return " ".join(WORDS[i] for i in ids)
>>> WORDS = ["Sure,", "here", "is", "how.", "Actually,", "I'm", "sorry,", "I", "can't", "help."]
>>> r = RefusalResult(PromptSet.from_texts(["How to x?"], label="harmful"), [""], [True], [0.0], "m", "h",
...                   outcomes=["refused"])
>>> t = reply_turns({"plain": r}, lambda texts, reqs: ["refused" if "sorry" in x else "complied" for x in texts],
...                 reply_ids={"plain": [list(range(10))]}, tokenizer=Tok(), prefixes=(2, 4, 6, 8), early=4)
>>> t.frame[["first", "final", "turned", "direction", "turn_at"]].values.tolist()
[['complied', 'refused', True, 'complied->refused', 8]]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...behaviour.judges import OUTCOMES, as_judge
from ...core import store
from ...core.errors import CacheError, InputError
from ...core.stats import wilson_interval
from .figures import turns_figure

__all__ = ["TurnResult", "reply_turns", "PREFIXES"]

PREFIXES = (4, 8, 16, 24, 32, 40)
KIND = "lens_safety.reply_turns"
DECIDED = ("refused", "complied")


@dataclass
class TurnResult:
    """One row per reply (``frame``): group, method, request, outcome at each prefix (``at_<m>``), ``early``
    (the outcome on the first ``early`` tokens), ``final`` (full reply), ``first`` (first decided prefix),
    ``turned``, ``direction``, ``turn_at`` (tokens). :meth:`summary` aggregates per group."""

    frame: Any  # DataFrame
    prefixes: tuple[int, ...]
    early: int

    def __len__(self) -> int:
        return len(self.frame)

    def to_frame(self):
        return self.frame.copy()

    def summary(self):
        """Per group: n, replies that turn (each direction), the median turn position, and the agreement of
        the judge on the first ``early`` tokens with the judge on the full reply (Wilson 95% CI)."""
        import pandas as pd

        rows = []
        for group, df in [("all", self.frame), *self.frame.groupby("group", sort=False)]:
            n = len(df)
            agree = int((df["early"] == df["final"]).sum())
            lo, hi = wilson_interval(agree, n) if n else (np.nan, np.nan)
            turned = df[df["turned"]]
            rows.append({"group": group, "n": n, "n_turned": len(turned),
                         "turned_rate": len(turned) / n if n else np.nan,
                         "complied_then_refused": int((turned["direction"] == "complied->refused").sum()),
                         "refused_then_complied": int((turned["direction"] == "refused->complied").sum()),
                         "median_turn_at": float(turned["turn_at"].median()) if len(turned) else np.nan,
                         f"early{self.early}_agreement": agree / n if n else np.nan,
                         "agreement_ci_low": float(lo), "agreement_ci_high": float(hi),
                         f"early{self.early}_complied": int((df["early"] == "complied").sum()),
                         "final_complied": int((df["final"] == "complied").sum())})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        return turns_figure(self, ax=ax)

    def save(self, directory: str | os.PathLike) -> Path:
        return store.write_artifact(directory, kind=KIND, schema_version=1,
                                    meta={"frame": store.frame_to_json(self.frame), "prefixes": list(self.prefixes),
                                          "early": self.early})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TurnResult:
        _, meta = store.read_artifact(directory, kind=KIND, schema_version=1)
        try:
            return cls(store.frame_from_json(meta["frame"]), tuple(meta["prefixes"]), int(meta["early"]))
        except KeyError as e:
            raise CacheError(f"{directory}: saved turns are malformed ({e}); recompute them.") from e


def _trajectory(outcomes: Sequence[str], lengths: Sequence[int]) -> dict[str, Any]:
    """first decided outcome, turned, direction and turn position from the outcomes at growing prefixes."""
    final = outcomes[-1]
    decided = [o for o in outcomes if o in DECIDED]
    first = decided[0] if decided else "unengaged"
    turned = first in DECIDED and final in DECIDED and first != final
    turn_at = None
    if turned:
        turn_at = lengths[-1]
        for j in range(len(outcomes) - 1, -1, -1):  # the shortest prefix from which the outcome stays final
            if outcomes[j] != final:
                break
            turn_at = lengths[j]
    return {"first": first, "final": final, "turned": bool(turned),
            "direction": f"{first}->{final}" if turned else "", "turn_at": turn_at}


def reply_turns(replies: Mapping[str, Any], judge: Any = None, *, reply_ids: Mapping[str, Sequence] | None = None,
                tokenizer=None, prefixes: Sequence[int] = PREFIXES, early: int = 24,
                model=None) -> TurnResult:
    """Judge every reply's prefixes: ``replies`` is ``{group: RefusalResult}`` (recorded, or with ``reply_ids``
    ``{group: [token ids per reply]}`` and a ``tokenizer``); ``judge``: a name or
    :class:`~lens_safety.behaviour.judges.Judge` (see :func:`~lens_safety.behaviour.judges.as_judge`), or a
    callable ``(texts, requests) -> outcomes`` (``"refused" | "complied" | "unengaged"`` per text)."""
    import pandas as pd

    prefixes = tuple(sorted({int(m) for m in prefixes} | {int(early)}))
    if not prefixes or prefixes[0] < 1:
        raise InputError(f"prefixes must be positive token counts, got {prefixes}.")
    outcomes_of = _outcome_function(judge, model)
    rows = []
    for group, r in replies.items():
        ids = reply_ids[group] if reply_ids is not None else getattr(r.recording, "reply_ids", None)
        tok = tokenizer or getattr(r.recording, "tokenizer", None)
        if ids is None or tok is None:
            raise InputError(f"Group {group!r}: pass recorded replies (evaluate_refusal(..., record=...)) or "
                             "reply_ids and a tokenizer.")
        texts, requests, where = [], [], []
        for i, reply in enumerate(ids):
            lengths = [m for m in prefixes if m < len(reply)] + [len(reply)]
            for m in lengths:
                texts.append(tok.decode(list(reply[:m]), skip_special_tokens=True))
                requests.append(r.prompts[i].plain_request)
                where.append((i, m))
        judged = list(outcomes_of(texts, requests)) if texts else []
        per_reply: dict[int, list[tuple[int, str]]] = {}
        for (i, m), o in zip(where, judged):
            per_reply.setdefault(i, []).append((m, str(o)))
        for i, traj in sorted(per_reply.items()):
            lengths, outs = [m for m, _ in traj], [o for _, o in traj]
            early_out = next(o for m, o in traj if m >= min(early, lengths[-1]))
            p = r.prompts[i]
            rows.append({"group": group, "reply": i, "method": p.method or "plain", "request": p.plain_request,
                         "n_reply": lengths[-1], "early": early_out, **_trajectory(outs, lengths),
                         **{f"at_{m}": dict(traj).get(m, outs[-1]) for m in prefixes}})
    return TurnResult(pd.DataFrame(rows), prefixes, int(early))


def _outcome_function(judge: Any, model) -> Callable[[list[str], list[str]], Sequence[str]]:
    """``(texts, requests) -> outcomes``, checked: one of ``refused | complied | unengaged`` per text."""
    raw = judge if callable(judge) and not hasattr(judge, "outcomes") else as_judge(judge, model).outcomes

    def outcomes(texts: list[str], requests: list[str]) -> list[str]:
        out = [str(o) for o in raw(texts, requests)]
        bad = sorted(set(out) - set(OUTCOMES))
        if len(out) != len(texts) or bad:
            raise InputError(f"The judge returned {len(out)} outcomes for {len(texts)} replies"
                             + (f", with values {bad[:3]}" if bad else "") + f"; a judge here maps (texts, requests) "
                             f"to one of {OUTCOMES} per text (wrap a boolean function in judges.CallableJudge).")
        return out
    return outcomes
