"""Read-out primitives shared by the logit lens (:mod:`lens_safety.analyses.lens.logit`), logit grafting
(:mod:`lens_safety.analyses.lens.graft`) and the tuned lens (:mod:`lens_safety.analyses.lens.tuned`): decoding
raw residuals into logits, the checks on residuals, and the prompts of a saved lens or graft result.

A low module: it imports none of the lens modules, so they all build on it without an import cycle.

>>> import torch, lens_safety as ls
>>> model = ls.testing.tiny_model()
>>> lens_logits(model, torch.zeros(2, 5, model.d_model)).shape == (2, 5, model.d_vocab)
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ...capture import Residuals, collect_residuals
from ...core.errors import CacheError, InputError, ModelMismatchError
from ...core.validation import check_finite
from ...inputs.prompts import Prompt, PromptSet, prompt_to_json

__all__ = ["lens_logits"]


def _check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`~lens_safety.core.errors.NonFiniteActivationError` (an :class:`InputError`) when ``t``
    holds NaN or inf (they would silently poison every mean)."""
    check_finite(t, f"The {what}")


def lens_logits(model, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
    """Decode raw residual-stream vectors: ``unembed(final_norm(resid))`` (the norm applied once)."""
    shape = resid.shape
    x = resid.reshape(1, -1, shape[-1]).to(device=model.output_device, dtype=model.dtype)
    with torch.no_grad():
        logits = model.unembed(model.final_norm(x))
    return logits.reshape(*shape[:-1], logits.shape[-1])


def _as_residuals(model, residuals, system, chat, batch_size):
    if isinstance(residuals, Residuals):
        return residuals
    if isinstance(residuals, (PromptSet, list, tuple)):
        return collect_residuals(model, residuals, batch_size=batch_size, cache=False, system=system,
                                 chat=chat, progress=False)
    raise InputError(f"Expected Residuals (from collect_residuals) or prompts, got {type(residuals).__name__}.")


def _check_residuals_any(model, res) -> None:
    """Model, layer count and finiteness of residuals (any positions)."""
    model.check_compatible(res.weights_hash, res.d_model, what=f"residuals ({res.model_name})")
    if res.n_layers != model.n_layers:
        raise ModelMismatchError(f"The residuals have {res.n_layers} layers, {model.name} has {model.n_layers}.")
    _check_finite(res.values, f"residuals ({res.model_name}, {len(res)} prompts)")


# -- persistence of the prompts of a saved result ------------------------------------------------------

#: Schema of the :class:`~lens_safety.analyses.lens.logit.LensResult` and
#: :class:`~lens_safety.analyses.lens.graft.GraftResult` artifacts.
SCHEMA_VERSION = 1


def _prompts_to_json(ps: PromptSet) -> dict[str, Any]:
    """A saved result's prompts (JSON), with their set name and hash."""
    return {"prompts_name": ps.name, "prompts_hash": ps.hash(), "prompts": [prompt_to_json(p) for p in ps]}


def _prompts_from_json(meta: Mapping[str, Any], directory) -> PromptSet:
    ps = PromptSet([Prompt(**d) for d in meta["prompts"]], meta.get("prompts_name", ""))
    if ps.hash() != meta["prompts_hash"]:
        raise CacheError(f"{directory}: the stored prompts do not match their hash; delete it and recompute.")
    return ps
