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
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "load_model": "models", "SafetyModel": "models", "list_models": "models",
    "DEFAULT_MODEL": "models", "EMBEDDED_MODELS": "models",
    # prompts and jailbreaks
    "Prompt": "prompts", "PromptSet": "prompts", "load_prompts": "prompts", "prompt_sets": "prompts",
    "length_report": "prompts", "PromptSetInfo": "prompts",
    "jailbreak": "jailbreaks", "jailbreak_methods": "jailbreaks", "jailbreak_templates": "jailbreaks",
    "JailbreakMethod": "jailbreaks",
    # activations
    "collect_residuals": "activations", "Residuals": "activations",
    # refusal
    "evaluate_refusal": "refusal", "RefusalResult": "refusal", "jailbreak_pairs": "refusal",
    "JailbreakPair": "refusal", "PairSet": "refusal",
    "default_judge": "judges", "Judge": "judges", "RuleJudge": "judges", "SubstringJudge": "judges",
    "ModelJudge": "judges", "CalibratedJudge": "judges", "load_xstest": "judges",
    # probes
    "probe_layers": "probes", "ProbeResult": "probes", "probe_transfer": "probes", "transfer_to": "probes",
    "refusal_directions": "probes", "relative_depth_frame": "probes", "TransferResult": "probes",
    "claim1_verdict": "probes", "Claim1Verdict": "probes", "request_groups": "probes",
    # lens and grafting
    "logit_lens": "lens", "LensResult": "lens", "Lexicon": "lens", "graft": "lens", "GraftResult": "lens",
    "train_tuned_lens": "tuned_lens", "TunedLens": "tuned_lens", "TunedLensConfig": "tuned_lens",
    "lens_kl": "tuned_lens", "compare_lenses": "tuned_lens", "LensComparison": "tuned_lens",
    # patching
    "patch_layers": "patching", "PatchResult": "patching", "attribution_patch": "patching",
    # refusal direction
    "select_refusal_direction": "directions", "DirectionSelection": "directions", "RefusalDirection": "directions",
    "ablate": "directions", "add": "directions", "orthogonalize": "directions", "SelectionFilters": "directions",
    # report
    "run_pipeline": "report", "render_report": "report", "Verdict": "report",
}
_SUBMODULES = {"assets", "models", "prompts", "jailbreaks", "activations", "refusal", "judges", "probes", "lens",
               "tuned_lens", "patching", "viz", "report", "errors", "testing",
               "directions", "parallel", "store", "stats", "htmlreport", "cli", "readout", "translators"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lens_safety' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
