"""lens_safety: where a chat model recognises harm, turns it into refusal, and where jailbreaks break it.

>>> import lens_safety as ls
>>> {"load_model", "probe_layers", "logit_lens", "patch_layers", "run_pipeline"} <= set(ls.__all__)
True
>>> ls.__version__
'0.1.0'

Imports are lazy: ``import lens_safety`` loads no torch or transformers until a name is used.
The command line is ``lens-safety`` (or ``python -m lens_safety``); see :mod:`lens_safety.cli`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, tuple[str, ...]] = {  # module -> the public names it holds
    "model.loading": ("load_model", "SafetyModel", "list_models", "DEFAULT_MODEL", "EMBEDDED_MODELS",),
    "inputs.prompts": ("Prompt", "PromptSet", "load_prompts", "prompt_sets", "length_report", "PromptSetInfo",),
    "inputs.jailbreaks": ("jailbreak", "jailbreak_methods", "jailbreak_templates", "JailbreakMethod",),
    "model.recording": ("generate", "record_generation", "ReplyRecording", "RecordSpec", "Sampling",),
    "capture": ("collect_residuals", "Residuals",),
    "behaviour.refusal": ("evaluate_refusal", "RefusalResult",),
    "behaviour.pairs": ("jailbreak_pairs", "JailbreakPair", "PairSet",),
    "behaviour.judges": ("default_judge", "Judge", "RuleJudge", "SubstringJudge", "ModelJudge", "CalibratedJudge",
                        "load_xstest",),
    "analyses.probes": ("ProbeConfig", "probe_layers", "ProbeResult", "probe_transfer", "transfer_to",
                       "refusal_directions", "relative_depth_frame", "TransferResult", "claim1_verdict",
                       "Claim1Verdict", "request_groups",),
    "analyses.lens.logit": ("logit_lens", "LensResult", "Lexicon",),
    "analyses.lens.graft": ("graft", "GraftResult",),
    "analyses.lens.tuned": ("train_tuned_lens", "TunedLens", "TunedLensConfig", "lens_kl", "compare_lenses",
                           "LensComparison",),
    "analyses.patching": ("PatchConfig", "patch_layers", "PatchResult", "attribution_patch",),
    "analyses.directions": ("select_refusal_direction", "DirectionSelection", "RefusalDirection", "ablate", "add",
                           "orthogonalize", "SelectionFilters",),
    "analyses.harm": ("harm_refusal_analysis", "HarmRefusalResult", "HarmConfig", "harm_positions", "steering_tests",
                      "SteeringResult", "harm_judgement",),
    "analyses.reply": ("ReadoutBasis", "ReplyReadouts", "reply_readouts", "reply_turns", "TurnResult",
                       "early_detection", "DetectionResult",),
    "pipeline": ("run_pipeline", "render_report", "Verdict",),
}
_EXPORTS: dict[str, str] = {name: module for module, names in _PUBLIC.items() for name in names}

#: Where each module of the first, flat layout lives now. ``ls.probes``, ``import lens_safety.probes`` and
#: ``from lens_safety.probes import ProbeResult`` keep working: the old name is the same module object.
MOVED: dict[str, str] = {
    "errors": "core.errors",
    "store": "core.store",
    "stats": "core.stats",
    "validation": "core.validation",
    "assets": "core.assets",
    "parallel": "core.parallel",
    "htmlreport": "core.htmlreport",
    "prompts": "inputs.prompts",
    "jailbreaks": "inputs.jailbreaks",
    "models": "model.loading",
    "testing": "model.testing",
    "activations": "capture",
    "judges": "behaviour.judges",
    "refusal": "behaviour.refusal",
    "probes": "analyses.probes",
    "lens": "analyses.lens.logit",
    "readout": "analyses.lens.readout",
    "translators": "analyses.lens.translators",
    "tuned_lens": "analyses.lens.tuned",
    "patching": "analyses.patching",
    "directions": "analyses.directions",
    "report": "pipeline",
    "viz": "analyses.figures",
}
_SUBPACKAGES = {"core", "inputs", "model", "capture", "behaviour", "analyses", "pipeline", "cli"}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import ``lens_safety.<old flat name>`` as the module that now holds it (no copy, no warning)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix == __name__ and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")
        self._specs[module.__name__] = module.__spec__  # importlib overwrites it with the alias' spec
        return module

    def exec_module(self, module) -> None:  # already executed under its new name: keep its own spec
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)


if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
    sys.meta_path.append(_OldPaths())

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in MOVED:
        return importlib.import_module(f".{MOVED[name]}", __name__)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lens_safety' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(MOVED) | _SUBPACKAGES)
