"""The decoding engine: run a :class:`~lens_safety.model.loading.SafetyModel` and produce tokens.

The public entry points are :func:`~lens_safety.model.recording.generate` and
:func:`~lens_safety.model.recording.record_generation`.

Prompts are formatted with ``model.format`` (chat template by default), sorted by length
(:func:`length_order`) and run in left-padded batches with the attention mask and position ids
always passed (:func:`~lens_safety.model.loading.forward_logits`). Decoding is greedy (or seeded
:class:`Sampling`), uses the
bridge's KV cache where it has one (:func:`kv_cache_shim`) and stops a batch when every row has
emitted an end-of-turn token (:func:`stop_ids`). Hooks that must act on one pass only read
:func:`generation_step`.

Scoring the replies (refusal scores, judges) is the behaviour floor's job
(:mod:`lens_safety.behaviour.refusal`): :func:`run_generation` only hands the prompt pass's
last-position logits to a ``score_first`` function when given one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.errors import InputError
from ..core.validation import check_int, check_number
from ..inputs.prompts import Prompt, PromptSet, as_prompt_set
from .loading import SafetyModel, forward_logits

__all__ = ["GenerationStep", "CURRENT_STEP", "generation_step", "kv_cache_shim", "stop_ids", "length_order",
           "run_generation", "to_prompt_set", "check_decoding", "check_sampling", "Sampling"]


@dataclass(frozen=True)
class GenerationStep:
    """Where :func:`~lens_safety.model.recording.generate` is, for hooks that must act on one pass only.

    ``step`` is 0 for the prompt pass and ``k`` for the pass that computes generated token
    ``k + 1``; ``prompt_len`` is the padded prompt width of the batch (so the last prompt
    position is ``prompt_len - 1``); ``kv_cache`` says whether later passes see only the
    newest position (True) or recompute the whole sequence (False); ``rows`` are the input
    indices (into the prompts passed to :func:`~lens_safety.model.recording.generate`) of the batch's rows, in
    row order (batches are sorted by length, so a hook that edits rows differently must use them).
    """

    step: int
    prompt_len: int
    kv_cache: bool
    rows: tuple[int, ...] = ()


#: The pass :func:`~lens_safety.model.recording.generate` is running (``None`` outside it); read it with
#: :func:`generation_step`.
#: The decoding loop sets it; a test may set it to imitate a pass.
CURRENT_STEP: contextvars.ContextVar[GenerationStep | None] = contextvars.ContextVar("lens_safety_gen_step",
                                                                                     default=None)


def generation_step() -> GenerationStep | None:
    """The current :class:`GenerationStep` inside :func:`~lens_safety.model.recording.generate` (None outside)."""
    return CURRENT_STEP.get()


@contextlib.contextmanager
def kv_cache_shim(bridge) -> Iterator[None]:
    """Let TransformerBridge attention see transformers>=5.2x's renamed KV-cache kwarg.

    transformers renamed the attention kwarg ``past_key_values`` to ``cache``; TL 4.3's
    attention bridges still read ``past_key_values`` only, so the cache is never filled and
    cached decoding silently ignores the prompt (``bridge.generate`` is wrong on this stack).
    This instance-level patch (removed on exit) forwards ``cache`` to the name TL reads.
    """
    patched = []
    for mod in bridge.modules():
        orig = getattr(mod, "_update_kv_cache", None)
        if orig is None or "_update_kv_cache" in vars(mod):
            continue

        def update(k, v, _orig=orig, **kw):
            if kw.get("past_key_values") is None and kw.get("layer_past") is None and kw.get("cache") is not None:
                kw["past_key_values"] = kw["cache"]
            return _orig(k, v, **kw)

        mod._update_kv_cache = update
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod._update_kv_cache


def stop_ids(model: SafetyModel) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS, the HF generation config's, and common turn ends."""
    tok = model.tokenizer
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gc = getattr(getattr(model.bridge, "original_model", None), "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in ([eos] if isinstance(eos, int) else eos))
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tok.convert_ids_to_tokens(tid) == name:
            ids.add(tid)
    return sorted(i for i in ids if 0 <= i < model.d_vocab)


def to_prompt_set(prompts, label: str = "unlabelled") -> PromptSet:
    """:func:`~lens_safety.inputs.prompts.as_prompt_set` that also takes a plain list of :class:`Prompt` objects."""
    if not isinstance(prompts, (PromptSet, str)):
        prompts = list(prompts)
        if prompts and all(isinstance(p, Prompt) for p in prompts):
            prompts = PromptSet(prompts)
    return as_prompt_set(prompts, label=label)


def check_decoding(max_new_tokens: int | None, batch_size: int) -> tuple[int | None, int]:
    """``(max_new_tokens, batch_size)`` checked and as Python ints."""
    return (check_int(max_new_tokens, "max_new_tokens", low=1, allow_none=True),
            check_int(batch_size, "batch_size", low=1))


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling instead of greedy decoding: ``temperature`` (> 0), nucleus ``top_p`` (0 < p <= 1).

    Every prompt draws from its own generator, seeded from ``seed`` and the prompt's formatted text, so
    a prompt's reply does not depend on the batch it ran in or on the other prompts (batched =
    unbatched), and the same seed gives the same replies.

    >>> Sampling(temperature=0.7, seed=3).temperature
    0.7
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        t = check_number(self.temperature, "temperature", low=0, inclusive=(False, True),
                         hint="e.g. 0.7; greedy decoding is sampling=None")
        p = check_number(self.top_p, "top_p", low=0, high=1, inclusive=(False, True), hint="e.g. 0.9")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "seed", check_int(self.seed, "seed", low=0))

    def generators(self, texts: Sequence[str], device) -> list[torch.Generator]:
        """One generator per prompt, seeded from (seed, formatted text)."""
        gens = []
        for text in texts:
            digest = hashlib.sha256(f"{self.seed}\x00{text}".encode()).digest()
            gens.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest[:7], "little")))
        return gens

    def choose(self, logits: Tensor, gens: Sequence[torch.Generator]) -> Tensor:
        """One sampled token id per row of ``logits`` ``[batch, d_vocab]``."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])


def check_sampling(sampling) -> None:
    """``sampling`` is None (greedy) or a :class:`Sampling`, else :class:`~lens_safety.core.errors.InputError`."""
    if sampling is not None and not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a Sampling(...) or None (greedy), got {type(sampling).__name__}.")


def length_order(model: SafetyModel, formatted: Sequence[str], chat: bool | None) -> list[int]:
    """Indices of the formatted prompts, longest (in tokens) first, ties in input order.

    Batches taken in this order hold similar lengths (less padding) and memory peaks early.
    Tokenizing checks the lengths against the model's context.
    """
    lengths = model.tokenize(formatted, chat=chat)["attention_mask"].sum(1).cpu()
    return torch.argsort(lengths, descending=True, stable=True).tolist()


@torch.no_grad()
def _greedy_batch(model: SafetyModel, ids: Tensor, mask: Tensor, max_new_tokens: int, stop: Tensor, pad_id: int,
                  rows: Sequence[int] = (), choose: Callable[[Tensor], Tensor] | None = None,
                  final_pass: bool = False) -> tuple[Tensor, Tensor]:
    """Tokens [batch, <= max_new_tokens] and the prompt pass's last logits [batch, d_vocab].

    ``choose`` maps a pass's last logits to the next ids (default: greedy argmax). ``final_pass``
    runs one more forward over the last token of rows that did not stop, so hooks see a pass for
    every kept reply token (recording); it does not change the tokens.
    """
    bridge = model.bridge
    choose = choose or (lambda lg: lg.argmax(-1))
    width = ids.shape[1]
    rows = tuple(rows)
    token = CURRENT_STEP.set(GenerationStep(0, width, True, rows))
    try:
        logits, cache = forward_logits(bridge, ids, mask, want_cache=True)
        kv = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() == width
        if not kv:
            cache = None
        first_logits = logits.float()
        out: list[Tensor] = []
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        seq = ids
        nxt = choose(logits)
        for step in range(max_new_tokens):
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            finished |= torch.isin(nxt, stop)
            last = bool(finished.all()) or step == max_new_tokens - 1
            if last and (bool(finished.all()) or not final_pass):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            CURRENT_STEP.set(GenerationStep(step + 1, width, kv, rows))
            if kv:
                logits, cache = forward_logits(bridge, nxt[:, None], mask, cache, want_cache=True)
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits, _ = forward_logits(bridge, seq, mask)
            if last:
                break
            nxt = choose(logits)
        return torch.stack(out, dim=1), first_logits
    finally:
        CURRENT_STEP.reset(token)


def _cut(row: Sequence[int], stop_set: set[int]) -> list[int]:
    """A row's tokens before its first stop token."""
    return list(row[:next((j for j, t in enumerate(row) if t in stop_set), len(row))])


def run_generation(model: SafetyModel, ps: PromptSet, *, max_new_tokens: int, batch_size: int,
                   system: str | None, chat: bool | None, fwd_hooks: Sequence = (), progress: bool = True,
                   desc: str = "generate", score_first: Callable[[Tensor], Tensor] | None = None,
                   sampling: Sampling | None = None, recorder=None,
                   ) -> tuple[list[str], Tensor | None, list[list[int]]]:
    """Completions, first-pass scores and generated token ids (stop token excluded), in input order.

    ``score_first`` maps the prompt pass's last-position logits ``[batch, d_vocab]`` (float32) to one
    number per row; the scores come back as a float32 CPU tensor (``None`` without ``score_first``).
    ``sampling``: seeded sampling (:class:`Sampling`) instead of greedy decoding. ``recorder``: an
    object with ``hooks`` (added after ``fwd_hooks``, so it sees their edits), ``done(b, rows)`` (a
    finished batch's ``(tokens, scores)`` from its cache, or None), ``begin(encoding)`` and
    ``end(b, rows, tokens, scores)`` (see :mod:`lens_safety.model.recording`).
    """
    formatted = model.format(ps, system=system, chat=chat)
    order = length_order(model, formatted, chat)
    stop = torch.tensor(stop_ids(model), dtype=torch.long, device=model.device)
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = int(stop[0]) if len(stop) else 0
    texts: list[str] = [""] * len(ps)
    tokens: list[list[int]] = [[] for _ in ps]
    stop_set = set(stop.tolist())
    scores = torch.empty(len(ps), dtype=torch.float32) if score_first is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ps), desc=f"{desc} {model.name}", unit="prompt")
    hooks = list(fwd_hooks) + (list(recorder.hooks) if recorder is not None else [])
    ctx = model.bridge.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
    with ctx, kv_cache_shim(model.bridge):
        for b, start in enumerate(range(0, len(ps), batch_size)):
            rows = order[start:start + batch_size]
            done = recorder.done(b, rows) if recorder is not None else None
            if done is not None:
                kept, first_scores = done
            else:
                enc = model.tokenize([formatted[i] for i in rows], chat=chat)
                choose = None
                if sampling is not None:
                    gens = sampling.generators([formatted[i] for i in rows], model.device)
                    choose = functools.partial(sampling.choose, gens=gens)
                if recorder is not None:
                    recorder.begin(enc)
                toks, first = _greedy_batch(model, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                                            stop, pad_id, rows, choose, final_pass=recorder is not None)
                kept = [_cut(row, stop_set) for row in toks.tolist()]
                first_scores = score_first(first).cpu() if score_first is not None else None
                if recorder is not None:
                    recorder.end(b, rows, kept, first_scores)
            if scores is not None:
                scores[rows] = first_scores
            for r, row in zip(rows, kept):
                tokens[r] = row
                texts[r] = model.tokenizer.decode(row, skip_special_tokens=True)
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return texts, scores, tokens
