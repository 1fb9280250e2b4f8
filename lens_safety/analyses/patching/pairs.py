"""Pair alignment: tokenise the plain and jailbroken prompt of each pair and align their token positions.

The two prompts differ in length. Both are chat-formatted and tokenised unpadded, then aligned on their
longest common suffix of token ids (with a chat template at least the template tokens after the user
message); by default all of those suffix positions are patched together (``positions="suffix"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ...core.errors import InputError
from ...core.validation import check_int, check_same_model
from ...model.loading import SafetyModel

_NO_PAIRS = (
    "No effective pairs: the model refused nothing, or no jailbreak worked; try more requests "
    "or other methods."
)



def resolve_formatting(model: SafetyModel, pairs: Any, system: str | None, chat: bool | None):
    """Check (and by default adopt) the formatting the pairs were made with (``PairSet.config``)."""
    fmt = (getattr(pairs, "config", None) or {}).get("formatting")
    if not fmt:
        return system, chat
    if system is None and chat is None:
        system, chat = fmt.get("system"), fmt.get("chat")
    mine = model.formatting_key(system=system, chat=chat)
    diff = [k for k in ("chat", "system", "template_sha256") if k in fmt and fmt[k] != mine.get(k)]
    if diff:
        what = ", ".join(f"{k}: pairs {fmt[k]!r} vs now {mine.get(k)!r}" for k in diff)
        raise InputError(
            f"The pairs were made with other prompt formatting than patch_layers would use ({what}). "
            "Their tokens, scores and alignment belong to that formatting: leave system= and chat= unset "
            "to use the pairs' own formatting, or recompute the pairs with jailbreak_pairs(model, ..., "
            "system=..., chat=...) as you want them patched."
        )
    return system, chat



@dataclass(frozen=True)
class PreparedPair:
    """One pair, tokenised and aligned.

    ``alignment`` holds ``(plain_pos, jailbroken_pos)`` non-negative token positions that
    are patched into each other; ``suffix_len`` is the length of the shared token suffix.
    """

    plain_ids: Tensor
    jailbroken_ids: Tensor
    alignment: tuple[tuple[int, int], ...]
    suffix_len: int
    request: str
    method: str | None
    plain_text: str
    jailbroken_text: str


def _pair_texts(p: Any) -> tuple[str, str, str, str | None]:
    """(plain text, jailbroken text, request, method) of a JailbreakPair or a 2-tuple."""
    if hasattr(p, "plain") and hasattr(p, "jailbroken"):
        plain, jb = p.plain, p.jailbroken
        plain_t = getattr(plain, "text", plain)
        jb_t = getattr(jb, "text", jb)
        request = getattr(p, "request", None) or getattr(plain, "plain_request", plain_t)
        return str(plain_t), str(jb_t), str(request), getattr(p, "method", None)
    if isinstance(p, (tuple, list)) and len(p) == 2:
        a, b = (getattr(x, "text", x) for x in p)
        if isinstance(a, str) and isinstance(b, str):
            req = getattr(p[0], "plain_request", a)
            return a, b, req, getattr(p[1], "method", None)
    raise InputError(
        f"Each pair must be a JailbreakPair or a (plain_text, jailbroken_text) tuple; got "
        f"{type(p).__name__}: {str(p)[:80]!r}."
    )


def _common_suffix(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        k += 1
    return k


def prepare_pairs(
    model: SafetyModel,
    pairs: Any,
    *,
    positions: str | Sequence = "suffix",
    n_positions: int | None = None,
    system: str | None = None,
    chat: bool | None = None,
) -> list[PreparedPair]:
    """Format, tokenise (unpadded) and align every pair; validate model and positions.

    ``pairs``: a :class:`~lens_safety.behaviour.pairs.PairSet`, a list of ``JailbreakPair``, or a
    list of ``(plain_text, jailbroken_text)`` tuples. ``positions``: ``"suffix"`` (the
    shared suffix, capped to its last ``n_positions`` tokens), ``"last"`` (last token only)
    or an explicit alignment: one list of ``(plain_pos, jailbroken_pos)`` per pair
    (negative positions count from the end).
    """
    check_same_model(pairs, model, "Cannot patch these pairs with this model",
                     fix="Their tokens and refusal behaviour belong to the other model: recompute them with "
                     "jailbreak_pairs(model, ...) on this model.")
    items = list(pairs) if pairs is not None else []
    if not items:
        raise InputError(_NO_PAIRS)
    texts = [_pair_texts(p) for p in items]
    explicit = not isinstance(positions, str)
    if isinstance(positions, str) and positions not in ("suffix", "last"):
        raise InputError(
            f"positions must be 'suffix', 'last' or a list of (plain_pos, jailbroken_pos) "
            f"lists (one per pair); got {positions!r}."
        )
    if explicit and len(positions) != len(items):
        raise InputError(
            f"An explicit alignment needs one list of (plain_pos, jailbroken_pos) per pair: "
            f"got {len(positions)} lists for {len(items)} pairs."
        )
    n_positions = check_int(n_positions, "n_positions", low=1, allow_none=True)
    plain_f = model.format([t[0] for t in texts], system=system, chat=chat)
    jb_f = model.format([t[1] for t in texts], system=system, chat=chat)
    out = []
    for i, ((pt, jt, req, meth), pf, jf) in enumerate(zip(texts, plain_f, jb_f)):
        p_ids = model.tokenize([pf], chat=chat)["input_ids"][0].cpu()
        j_ids = model.tokenize([jf], chat=chat)["input_ids"][0].cpu()
        k = _common_suffix(p_ids.tolist(), j_ids.tolist())
        np_, nj = len(p_ids), len(j_ids)
        if explicit:
            align = []
            for a, b in positions[i]:
                a2, b2 = (a + np_ if a < 0 else a), (b + nj if b < 0 else b)
                if not (0 <= a2 < np_ and 0 <= b2 < nj):
                    raise InputError(
                        f"Pair {i}: alignment ({a}, {b}) is outside the prompts "
                        f"({np_} plain tokens, {nj} jailbroken tokens)."
                    )
                align.append((a2, b2))
            if not align:
                raise InputError(f"Pair {i}: the explicit alignment is empty.")
        else:
            if k == 0:
                raise InputError(
                    f"Pair {i} ({req[:60]!r}): the plain and jailbroken prompts share no trailing "
                    "tokens, so no position of one run corresponds to a position of the other. "
                    "Patching aligns the runs on their common token suffix — with a chat template "
                    "that is the template after the user message (e.g. '<|im_end|>\\n<|im_start|>"
                    "assistant\\n'). Use chat formatting (chat=True), make both prompts end the "
                    "same way, or pass an explicit alignment as positions=[[(plain_pos, jb_pos), ...]]."
                )
            kk = 1 if positions == "last" else (min(k, n_positions) if n_positions else k)
            align = [(np_ - kk + j, nj - kk + j) for j in range(kk)]
        out.append(PreparedPair(p_ids, j_ids, tuple(align), k, req, meth, pt, jt))
    return out


def groups_for(
    pp: PreparedPair, direction: str, per_position: bool
) -> tuple[Tensor, Tensor, list[int], list[tuple[list[int], list[int]]], list[int]]:
    """Target ids, source ids, source positions to cache, groups, and per-group target offsets."""
    if direction == "denoise":
        tgt, src = pp.jailbroken_ids, pp.plain_ids
        pairs = [(a, b) for a, b in pp.alignment]  # (source_pos, target_pos)
    else:
        tgt, src = pp.plain_ids, pp.jailbroken_ids
        pairs = [(b, a) for a, b in pp.alignment]
    src_pos = [s for s, _ in pairs]
    if per_position:
        groups = [([j], [t]) for j, (_, t) in enumerate(pairs)]
        offsets = [t - len(tgt) for _, t in pairs]
    else:
        groups = [(list(range(len(pairs))), [t for _, t in pairs])]
        offsets = [0]
    return tgt, src, src_pos, groups, offsets
