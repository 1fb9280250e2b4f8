"""The refusal direction: selection, ablation, addition and weight orthogonalisation.

Arditi et al. (2024), "Refusal in language models is mediated by a single direction": the
difference of means between harmful and harmless prompts at one (post-instruction position,
layer) is a direction that, **ablated** (projected out of the residual stream everywhere), makes
an aligned model comply, and **added** makes it refuse harmless requests.

* :func:`select_refusal_direction` builds one candidate per (template position x layer) on a
  train split and picks one on a validation split (ablation refusal score, harmless KL under
  ablation, addition score, depth and norm filters), batched: many candidates per forward.
* :func:`ablate` / :func:`add` are TransformerLens hook lists *and* context managers that hold
  the hooks on the model, so they compose with generation, :func:`~lens_safety.evaluate_refusal`,
  :func:`~lens_safety.collect_residuals`, :func:`~lens_safety.logit_lens` and patching.
* :func:`orthogonalize` bakes the ablation into the weights (a new :class:`SafetyModel`), and
  :meth:`SafetyModel.save_pretrained` exports it as a Hugging Face folder.
* :func:`direction_effects`, :func:`coefficient_sweep`, :func:`direction_geometry`,
  :func:`band_ablation` and :func:`direction_logit_lens` measure side effects and tie the
  direction to the paper's claims.

The modules: :mod:`.direction` (:class:`RefusalDirection`), :mod:`.interventions` (:func:`ablate`,
:func:`add`, the batched per-candidate hooks), :mod:`.selection` (:func:`select_refusal_direction`,
:class:`SelectionConfig`, :class:`SelectionFilters`, :class:`DirectionSelection`), :mod:`.weights`
(:func:`orthogonalize`, the Hugging Face export), :mod:`.effects` (side effects and the paper tie-in)
Every name is re-exported here. (The ``lens-safety run --directions`` stage is
:mod:`lens_safety.pipeline.stages.directions`.)

Layers are residual-stream layers ``0..n_layers`` (0 = embedding output, ``l`` = input of block
``l`` = raw output of block ``l-1``, no final norm). Positions are negative: ``-1`` is the last
template token (the generation prompt), ``-k`` the first token after the user's text.

>>> import torch, lens_safety as ls
>>> model = ls.testing.tiny_model()
>>> d = RefusalDirection(torch.ones(model.d_model), layer=1, position=-1, model_name=model.name,
...                      weights_hash=model.weights_hash, n_layers=model.n_layers)
>>> with ls.ablate(d, model=model):
...     acts = ls.collect_residuals(model, ["Hi"], cache=False, progress=False)
>>> float((acts.values[0] @ d.unit).abs().max()) < 1e-4
True
"""

from __future__ import annotations

from ...model.loading import hf_model_copy
from .direction import SCHEMA_VERSION, RefusalDirection
from .effects import (
    CAUTIOUS_SYSTEM_PROMPT,
    CONDITION_NAMES,
    RATE_NAMES,
    CoefficientSweep,
    DirectionEffects,
    DirectionGeometry,
    band_ablation,
    coefficient_sweep,
    direction_effects,
    direction_geometry,
    direction_logit_lens,
)
from .effects import _completion_ce as _completion_ce  # internals the tests reach through this package
from .interventions import COMPONENTS, Intervention, ablate, add
from .interventions import _batched_logits as _batched_logits
from .interventions import _kl as _kl
from .selection import (
    DirectionSelection,
    SelectionConfig,
    SelectionFilters,
    UnknownOptionError,
    candidate_directions,
    select_refusal_direction,
    split_prompts,
    template_positions,
)
from .weights import orthogonalize, orthogonalize_to_folder

__all__ = [
    "RefusalDirection", "DirectionSelection", "SelectionFilters", "SelectionConfig", "UnknownOptionError",
    "Intervention", "select_refusal_direction", "ablate", "add",
    "orthogonalize", "hf_model_copy", "template_positions", "split_prompts", "candidate_directions",
    "direction_effects",
    "DirectionEffects", "coefficient_sweep", "CoefficientSweep", "direction_geometry", "DirectionGeometry",
    "band_ablation", "direction_logit_lens", "orthogonalize_to_folder",
    "CAUTIOUS_SYSTEM_PROMPT", "SCHEMA_VERSION", "COMPONENTS", "RATE_NAMES", "CONDITION_NAMES",
]
