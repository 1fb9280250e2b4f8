"""Harm recognised vs refusal triggered: the harm direction (read at the instruction's last token) and the
refusal direction (read at a post-instruction template token), their geometry, what jailbreaks do to each,
causal steering tests, a targeted false-refusal fix, and the harm direction as a latent guard.

* :mod:`.geometry` -- :func:`harm_refusal_analysis` -> :class:`HarmRefusalResult`;
* :mod:`.steering` -- :func:`steering_tests` -> :class:`SteeringResult`, :func:`harm_judgement`;
* :mod:`.figures` -- their figures.
"""

from __future__ import annotations

from .geometry import HarmConfig, HarmRefusalResult, gap_fraction, harm_positions, harm_refusal_analysis, tpr_at_fpr
from .steering import JUDGEMENT_TEMPLATE, SteeringResult, harm_judgement, judgement_tokens, steering_tests

__all__ = ["HarmConfig", "HarmRefusalResult", "harm_refusal_analysis", "harm_positions", "gap_fraction",
           "tpr_at_fpr", "SteeringResult", "steering_tests", "harm_judgement", "judgement_tokens",
           "JUDGEMENT_TEMPLATE"]
