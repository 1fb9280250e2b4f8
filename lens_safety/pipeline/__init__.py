"""The one-command run (``lens-safety run``): a runner over registered stages, each returning a typed result
that is cached through the store and handed to later stages, to its verdicts and to its report section.

* :mod:`.config` -- the run's settings (:class:`RunConfig`) and prompt sets;
* :mod:`.stage` -- what a stage and a stage result are, and what a running stage gets (:class:`Context`);
* :mod:`.stages` -- the stages, one module each, and their registry (``STAGES``);
* :mod:`.runner` -- :func:`run_pipeline`, :func:`render_report`;
* :mod:`.verdicts` -- one pure function per paper claim; :mod:`.html` -- the report; :mod:`.readme` -- the
  README's measured block.

This package's names load lazily (the runner imports every analysis, hence torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "run_pipeline": "runner", "render_report": "runner", "RunResult": "runner", "Runner": "runner",
    "collect_metrics": "runner",
    "Verdict": "verdicts", "verdict_claim1": "verdicts", "verdict_claim2": "verdicts", "verdict_claim3": "verdicts",
    "verdict_direction": "verdicts", "REPRODUCED": "verdicts", "PARTLY": "verdicts", "NOT_REPRODUCED": "verdicts",
    "NOT_MEASURED": "verdicts",
    "RunConfig": "config", "make_config": "config", "DEFAULT_JAILBREAKS": "config", "DEFAULT_N": "config",
    "FULL_RUN_MAX_NEW_TOKENS": "config", "HARMLESS_SETS": "config", "JUDGES": "config",
    "Stage": "stage", "StageResult": "stage", "Context": "stage", "STAGE_KIND": "stage", "STAGE_SCHEMA": "stage",
    "StaleStageError": "stage",
    "STAGES": "stages",
    "readme_table": "readme", "update_readme": "readme", "README_BEGIN": "readme", "README_END": "readme",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
