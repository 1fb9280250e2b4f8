"""The stages of ``lens-safety run``, in the order they run: one registration line each.

Adding a stage: write ``pipeline/stages/<name>.py`` with a :class:`~lens_safety.pipeline.stage.Stage`
subclass (name, needs, reads, run, and what it reports) and its
:class:`~lens_safety.pipeline.stage.StageResult`, then add its ``STAGE`` below (after the stages it needs).
"""

from __future__ import annotations

from ..stage import check_registry
from . import capture, directions, graft, harm, lens, pairs, patching, probes, prompts, refusal, reply

STAGES = (
    prompts.STAGE,
    refusal.STAGE,
    pairs.STAGE,
    capture.STAGE,
    probes.STAGE,
    lens.STAGE,
    graft.STAGE,
    patching.STAGE,
    directions.STAGE,
    harm.STAGE,
    reply.STAGE,
)
check_registry(STAGES)
