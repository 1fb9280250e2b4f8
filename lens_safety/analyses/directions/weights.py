"""Weight editing: :func:`orthogonalize` bakes the ablation into a new model's weights, and
:func:`orthogonalize_to_folder` (``lens-safety orthogonalize``) exports it as a Hugging Face folder."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ...core import store
from ...core.errors import InputError
from ...inputs.prompts import load_prompts
from ...model.loading import SafetyModel, check_model, guard_logits, hf_model_copy, load_model, weights_fingerprint
from .direction import RefusalDirection, _as_direction
from .selection import select_refusal_direction

__all__ = ["orthogonalize", "orthogonalize_to_folder", "hf_model_copy"]


def _edit_sites(hf) -> tuple[torch.nn.Module, list[torch.nn.Linear]]:
    base = getattr(hf, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise InputError(f"orthogonalize supports decoder models with model.layers (Qwen2, Llama, Mistral ...); "
                         f"{type(hf).__name__} is not one. Use the ablate() hooks instead.")
    outs = []
    for i, layer in enumerate(layers):
        if hasattr(layer, "post_feedforward_layernorm") or hasattr(layer, "pre_feedforward_layernorm"):
            raise InputError(f"{type(hf).__name__} normalises the attention/MLP outputs before adding them to the "
                             "residual stream (Gemma-style sandwich norms), so editing o_proj/down_proj does not "
                             "remove the direction. Use the ablate() hooks instead.")
        o, dn = getattr(getattr(layer, "self_attn", None), "o_proj", None), getattr(getattr(layer, "mlp", None),
                                                                                     "down_proj", None)
        if not isinstance(o, torch.nn.Linear) or not isinstance(dn, torch.nn.Linear):
            raise InputError(f"Layer {i} of {type(hf).__name__} has no self_attn.o_proj / mlp.down_proj Linear; "
                             "orthogonalize does not support this architecture. Use the ablate() hooks.")
        outs += [o, dn]
    return hf.get_input_embeddings(), outs


def orthogonalize(model: SafetyModel, direction: RefusalDirection, *, check: bool = True) -> SafetyModel:
    """A NEW model whose weights cannot write ``direction``: ablation made permanent.

    The token embedding (rows), every attention output projection (``o_proj``) and MLP output
    projection (``down_proj``, weights and any bias) get ``W <- W - d d^T W`` on their output
    side, so nothing ever adds a component along ``d`` to the residual stream: the same
    computation as :func:`ablate` at every block (float32 differences ~1e-5). A tied unembedding is
    untied first (ablation does not touch it). ``model`` is left unchanged. Save it with
    :meth:`SafetyModel.save_pretrained`; ``ls.load_model(folder)`` loads it back.

    >>> import torch, lens_safety as ls
    >>> model = ls.testing.tiny_model()
    >>> d = RefusalDirection(torch.randn(model.d_model), 1, -1, model.name, model.weights_hash, model.n_layers)
    >>> edited = orthogonalize(model, d)
    >>> ids = model.tokenize(model.format(["Hi"]))
    >>> with torch.no_grad(), ls.ablate(d, model=model):
    ...     hooked = model.last_position_logits(ids["input_ids"], ids["attention_mask"])
    >>> with torch.no_grad():
    ...     baked = edited.last_position_logits(ids["input_ids"], ids["attention_mask"])
    >>> float((hooked - baked).abs().max()) < 1e-4
    True
    """
    from transformer_lens import TransformerBridge

    d = _as_direction(direction)
    d.check_model(model)
    hf = hf_model_copy(model, untie=True)
    embed, outs = _edit_sites(hf)
    with torch.no_grad():
        u = d.unit.to(device=embed.weight.device, dtype=torch.float64)
        W = embed.weight.double()
        embed.weight.copy_((W - (W @ u)[:, None] * u[None, :]).to(embed.weight.dtype))
        for lin in outs:
            W = lin.weight.double()
            lin.weight.copy_((W - u[:, None] * (u @ W)[None, :]).to(lin.weight.dtype))
            if lin.bias is not None:
                b = lin.bias.double()
                lin.bias.copy_((b - (b @ u) * u).to(lin.bias.dtype))
    tok = copy.deepcopy(model.tokenizer)
    reference = guard_logits(hf, tok) if check else None
    bridge = TransformerBridge.boot_transformers(f"{model.name}-orthogonalized", hf_model=hf, tokenizer=tok,
                                                 device=model.device, dtype=model.dtype)
    bridge.eval()
    provenance = dict(model.provenance, orthogonalized_from=model.weights_hash, direction=d.hash,
                      direction_layer=d.layer, direction_position=d.position)
    new = SafetyModel(bridge, tok, name=f"{model.name}-orthogonalized", weights_hash=weights_fingerprint(bridge),
                      chat_default=model.chat_default, aligned=None, provenance=provenance, hf_source=None)
    if check:
        check_model(new, reference)
    return new


# -- measured side effects --------------------------------------------------------------------


def orthogonalize_to_folder(out: str | os.PathLike, model_name: str | None = None, *,
                            direction: str | os.PathLike | RefusalDirection | None = None,
                            harmful: str = "harmbench", harmless: str = "harmless", n_train: int = 128,
                            n_val: int = 32, layers: Sequence[int] | None = None, screen: int | None = 8,
                            top_k: int = 8, model: SafetyModel | None = None) -> Path:
    """``lens-safety orthogonalize --out DIR``: load, select (or load) the direction, bake it in, save.

    Writes a Hugging Face folder (safetensors + tokenizer; ``ls.load_model(out)`` loads it) with
    the direction saved beside the weights in ``out/refusal_direction``. ``direction``: a saved
    direction folder or object (skips selection). Returns ``out``.
    """
    model = model if model is not None else load_model(model_name)
    if direction is None:
        sel = select_refusal_direction(model, load_prompts(harmful), load_prompts(harmless), n_train=n_train,
                                       n_val=n_val, layers=layers, screen=screen, top_k=top_k)
        d = sel.direction
    else:
        d = direction if isinstance(direction, RefusalDirection) else RefusalDirection.load(direction)
    orth = orthogonalize(model, d)
    out = Path(out)
    orth.save_pretrained(out)
    d.save(out / "refusal_direction")
    (out / "README.lens_safety.json").write_text(json.dumps(store.jsonable(
        {"base_model": model.name, "base_weights_hash": model.weights_hash, "direction": d.hash,
         "layer": d.layer, "position": d.position, "meta": d.meta}), indent=1))
    return out
