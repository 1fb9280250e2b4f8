"""Greedy generation: run a :class:`~lens_safety.model.loading.SafetyModel` and produce tokens.

Prompts are formatted with ``model.format`` (chat template by default), sorted by length
(:func:`length_order`) and run in left-padded batches with the attention mask and position ids
always passed (:func:`~lens_safety.model.loading.forward_logits`). Decoding is greedy, uses the
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.validation import check_int
from ..inputs.prompts import Prompt, PromptSet, as_prompt_set
from .loading import SafetyModel, forward_logits

__all__ = ["GenerationStep", "CURRENT_STEP", "generation_step", "kv_cache_shim", "stop_ids", "length_order",
           "run_generation", "generate", "to_prompt_set", "check_decoding"]


@dataclass(frozen=True)
class GenerationStep:
    """Where :func:`generate` is, for hooks that must act on one pass only.

    ``step`` is 0 for the prompt pass and ``k`` for the pass that computes generated token
    ``k + 1``; ``prompt_len`` is the padded prompt width of the batch (so the last prompt
    position is ``prompt_len - 1``); ``kv_cache`` says whether later passes see only the
    newest position (True) or recompute the whole sequence (False); ``rows`` are the input
    indices (into the prompts passed to :func:`generate`) of the batch's rows, in row order
    (batches are sorted by length, so a hook that edits rows differently must use them).
    """

    step: int
    prompt_len: int
    kv_cache: bool
    rows: tuple[int, ...] = ()


#: The pass :func:`generate` is running (``None`` outside it); read it with :func:`generation_step`.
#: The decoding loop sets it; a test may set it to imitate a pass.
CURRENT_STEP: contextvars.ContextVar[GenerationStep | None] = contextvars.ContextVar("lens_safety_gen_step",
                                                                                     default=None)


def generation_step() -> GenerationStep | None:
    """The current :class:`GenerationStep` inside :func:`generate` (``None`` outside)."""
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


def length_order(model: SafetyModel, formatted: Sequence[str], chat: bool | None) -> list[int]:
    """Indices of the formatted prompts, longest (in tokens) first, ties in input order.

    Batches taken in this order hold similar lengths (less padding) and memory peaks early.
    Tokenizing checks the lengths against the model's context.
    """
    lengths = model.tokenize(formatted, chat=chat)["attention_mask"].sum(1).cpu()
    return torch.argsort(lengths, descending=True, stable=True).tolist()


@torch.no_grad()
def _greedy_batch(model: SafetyModel, ids: Tensor, mask: Tensor, max_new_tokens: int,
                  stop: Tensor, pad_id: int, rows: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """Greedy tokens [batch, <= max_new_tokens] and the prompt pass's last logits [batch, d_vocab]."""
    bridge = model.bridge
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
        nxt = logits.argmax(-1)
        for step in range(max_new_tokens):
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            finished |= torch.isin(nxt, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            CURRENT_STEP.set(GenerationStep(step + 1, width, kv, rows))
            if kv:
                logits, cache = forward_logits(bridge, nxt[:, None], mask, cache, want_cache=True)
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                logits, _ = forward_logits(bridge, seq, mask)
            nxt = logits.argmax(-1)
        return torch.stack(out, dim=1), first_logits
    finally:
        CURRENT_STEP.reset(token)


def run_generation(model: SafetyModel, ps: PromptSet, *, max_new_tokens: int, batch_size: int,
                   system: str | None, chat: bool | None, fwd_hooks: Sequence = (), progress: bool = True,
                   desc: str = "generate", score_first: Callable[[Tensor], Tensor] | None = None,
                   ) -> tuple[list[str], Tensor | None, list[list[int]]]:
    """Completions, first-pass scores and generated token ids (stop token excluded), in input order.

    ``score_first`` maps the prompt pass's last-position logits ``[batch, d_vocab]`` (float32) to one
    number per row; the scores come back as a float32 CPU tensor (``None`` without ``score_first``).
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
    hooks = list(fwd_hooks)
    ctx = model.bridge.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
    with ctx, kv_cache_shim(model.bridge):
        for start in range(0, len(ps), batch_size):
            rows = order[start:start + batch_size]
            enc = model.tokenize([formatted[i] for i in rows], chat=chat)
            toks, first = _greedy_batch(model, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                                        stop, pad_id, rows)
            if scores is not None:
                scores[rows] = score_first(first).cpu()
            for r, row in zip(rows, toks.tolist()):
                cut = next((j for j, t in enumerate(row) if t in stop_set), len(row))
                tokens[r] = row[:cut]
                texts[r] = model.tokenizer.decode(row[:cut], skip_special_tokens=True)
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return texts, scores, tokens


def generate(model: SafetyModel, prompts: PromptSet | Sequence[str], *, max_new_tokens: int = 48,
             batch_size: int = 16, system: str | None = None, chat: bool | None = None,
             fwd_hooks: Sequence = (), progress: bool = True) -> list[str]:
    """Greedy completions (special tokens stripped), in input order.

    Prompts are formatted with ``model.format`` (chat template by default), sorted by length
    and run in left-padded batches with the ``attention_mask`` always passed; a batch stops
    when every row has emitted an end-of-turn token. Decoding uses a KV cache (only the
    newest position is run after the prompt pass) where the bridge supports one, else it
    recomputes the whole sequence each step.

    ``fwd_hooks``: ``[(hook_name, fn)]`` TransformerLens hooks active for every forward
    pass of the generation -- the prompt pass *and* each decoding step. With the KV cache,
    the prompt pass is the only one whose tensors have ``shape[1] > 1``; in general call
    :func:`generation_step` inside the hook: ``s.step == 0`` is the prompt pass and the last
    prompt position is ``s.prompt_len - 1`` (left padding puts it last in that pass). A
    hook that edits the last prompt position on the prompt pass only::

        def graft(t, hook):
            if ls.refusal.generation_step().step == 0:
                t[:, -1] = new_state
            return t

    (Without a KV cache later passes recompute the prompt, so such a hook should edit
    ``t[:, s.prompt_len - 1]`` on every pass.) Batches are sorted by length: row ``j`` of
    a batch is prompt ``s.rows[j]``, for hooks that edit each prompt differently.

    >>> from lens_safety.model.testing import tiny_model
    >>> out = generate(tiny_model(), ["Hi"], max_new_tokens=3, progress=False)
    >>> len(out), isinstance(out[0], str)
    (1, True)
    """
    max_new_tokens, batch_size = check_decoding(max_new_tokens, batch_size)
    ps = to_prompt_set(prompts)
    texts, _, _ = run_generation(model, ps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 system=system, chat=chat, fwd_hooks=fwd_hooks, progress=progress)
    return texts
