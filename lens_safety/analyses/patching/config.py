"""The options of a patching sweep (:class:`PatchConfig`), their names and their checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...behaviour.pairs import MIN_GAP as _PAIRS_MIN_GAP
from ...behaviour.refusal import RefusalTokens
from ...core.errors import InputError, UnknownNameError
from ...core.validation import check_int, check_number, config_from_options
from ...model.loading import SafetyModel

#: Component name -> hook name template (``{l}`` = block index).
COMPONENTS: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
}
DIRECTIONS: tuple[str, ...] = ("denoise", "noise")
NORMALIZATIONS: tuple[str, ...] = ("pair", "mean")
#: Default smallest plain − jailbroken margin gap (logits) of a pair that is patched: the same
#: number as ``jailbreak_pairs``' default (:data:`lens_safety.behaviour.pairs.MIN_GAP`, 1.0).
MIN_GAP: float = float(_PAIRS_MIN_GAP)


@dataclass(frozen=True)
class PatchConfig:
    """The options of :func:`~lens_safety.analyses.patching.patch_layers` and
    :func:`~lens_safety.analyses.patching.attribution_patch` (pass one as ``config=``, or the options as keywords).

    - ``components``: among ``resid_pre``, ``attn_out``, ``mlp_out`` (and ``z``, per head).
    - ``direction``: ``"denoise"`` (run jailbroken, patch in plain: does refusal return?), ``"noise"``
      (run plain, patch in jailbroken: does refusal vanish?) or ``"both"``.
    - ``positions``: ``"suffix"`` (the shared token suffix, capped by ``n_positions``), ``"last"`` or
      explicit ``(plain_pos, jailbroken_pos)`` lists, one per pair (negative positions count from the end).
    - ``layers``: block indices (default all); ``resid_pre`` at block ``l`` is residual layer ``l``
      (0 = embedding output, no final norm).
    - ``heads``: add component ``"z"``, patched head by head.
    - ``batch_size``: patched copies per forward (bounds the memory; :func:`patch_layers` only).
    - ``progress``: show a progress bar.
    - ``n_positions``: patch at most the last ``n_positions`` tokens of the shared suffix.
    - ``per_position``: one patch per aligned position (default: all aligned positions together).
    - ``system`` / ``chat``: the prompt formatting; with a :class:`~lens_safety.behaviour.pairs.PairSet`
      they default to the formatting the pairs were made with (anything else raises ``InputError``).
    - ``refusal_tokens``: the metric (default: the max-logit margin for activation patching, the
      log-odds of a refusal start for attribution patching).
    - ``min_gap``: pairs whose plain − jailbroken margin gap, measured on the unpatched runs, is below it
      (logits, default :data:`MIN_GAP` = 1.0) or negative are dropped and listed in ``PatchResult.dropped``;
      ``None`` keeps every pair.
    - ``normalize``: the default recovery of the result's summaries, ``"pair"`` or ``"mean"``.
    - ``reuse_prefix``: target tokens before the first patched position come from a KV cache
      (``False``: every copy computes them; same numbers, slower; :func:`patch_layers` only).
    - ``start_at_patch``: each patched copy runs from the patched block on, from the recorded target
      residual (``False``: every copy runs all blocks; same numbers, slower; :func:`patch_layers` only).

    >>> PatchConfig(direction="both", layers=(0, 2)).batch_size
    32
    """

    components: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out")
    direction: str = "denoise"
    positions: str | Sequence = "suffix"
    layers: Sequence[int] | None = None
    heads: bool = False
    batch_size: int = 32
    progress: bool = True
    n_positions: int | None = None
    per_position: bool = False
    system: str | None = None
    chat: bool | None = None
    refusal_tokens: RefusalTokens | None = None
    min_gap: float | None = MIN_GAP
    normalize: str = "pair"
    reuse_prefix: bool = True
    start_at_patch: bool = True

    @property
    def positions_label(self) -> str:
        """``positions`` as the result records it: ``"suffix"``, ``"last"`` or ``"explicit"``."""
        return self.positions if isinstance(self.positions, str) else "explicit"


#: The options each sweep accepts, in the order of its positional parameters after ``(model, pairs)``
#: (the first ``n`` of them may be given positionally, as in the old signatures).
ACTIVATION_OPTIONS = tuple(f.name for f in dataclasses.fields(PatchConfig))
ATTRIBUTION_OPTIONS = tuple(n for n in ACTIVATION_OPTIONS if n not in ("batch_size", "reuse_prefix", "start_at_patch"))
ACTIVATION_POSITIONAL = 7  # components .. progress
ATTRIBUTION_POSITIONAL = 6  # components .. heads, progress


def resolve_config(function: str, config: PatchConfig | None, args: tuple, options: dict[str, Any],
                   accepted: tuple[str, ...], n_positional: int) -> PatchConfig:
    """The :class:`PatchConfig` of a call: ``config`` (or the defaults) with the positional ``args`` (in the
    order of ``accepted``) and keyword ``options`` on top. Raises ``TypeError`` like a signature would."""
    if any(isinstance(a, PatchConfig) for a in args):
        raise TypeError(f"{function}(): pass the PatchConfig as config=..., not positionally.")
    if len(args) > n_positional:
        raise TypeError(f"{function}() takes at most {2 + n_positional} positional arguments but "
                        f"{2 + len(args)} were given; pass the options by keyword.")
    given = dict(zip(accepted, args))
    twice = sorted(given.keys() & options.keys())
    if twice:
        raise TypeError(f"{function}() got multiple values for {', '.join(map(repr, twice))}.")
    return config_from_options(PatchConfig, config, given | options, function=function, names=accepted)


# -- checks ----------------------------------------------------------------------------------


def check_components(components: str | Sequence[str], heads: bool) -> tuple[str, ...]:
    """The components to patch (``"z"`` added when ``heads``); raises on unknown or duplicate names."""
    if isinstance(components, str):
        components = (components,)
    comps = tuple(components)
    if not comps and not heads:
        raise InputError("components is empty; pick from " + ", ".join(COMPONENTS) + ".")
    for c in comps:
        if c not in COMPONENTS:
            raise UnknownNameError(
                f"Unknown component {c!r}; expected one of {', '.join(COMPONENTS)} "
                "(resid_pre, attn_out, mlp_out; 'z' = per-head attention output, "
                "also enabled by heads=True)."
            )
    if len(set(comps)) != len(comps):
        raise InputError(f"components has duplicates: {comps}.")
    if heads and "z" not in comps:
        comps = comps + ("z",)
    return comps


def check_directions(direction: str) -> tuple[str, ...]:
    """``"both"`` -> both directions; else the one direction (raises on an unknown one)."""
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise UnknownNameError(
            f"Unknown direction {direction!r}; expected 'denoise' (run the jailbroken "
            "prompt, patch in the plain run), 'noise' (run the plain prompt, patch in "
            "the jailbroken run) or 'both'."
        )
    return (direction,)


def check_layers(model: SafetyModel, layers: Sequence[int] | None) -> list[int]:
    """Sorted unique block indices (default: every block of ``model``)."""
    if layers is None:
        return list(range(model.n_layers))
    return sorted({check_int(layer, "layers", low=0, high=model.n_layers - 1, kind="block indices")
                   for layer in layers})


def check_min_gap(min_gap: float | None) -> float | None:
    return check_number(min_gap, "min_gap", low=0, allow_none=True,
                        hint=f"logits, default {MIN_GAP}; None keeps every pair")


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise UnknownNameError(
            f"Unknown normalize {normalize!r}; expected 'pair' ((patched - target) / (source - target) per "
            "pair) or 'mean' (divided by the mean gap over pairs, TransformerLens' convention)."
        )
    return normalize
