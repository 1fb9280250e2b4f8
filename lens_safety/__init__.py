"""lens_safety: where a chat model recognises harm, turns it into refusal, and where jailbreaks break it.

>>> import lens_safety as ls
>>> sorted(ls.__all__)[:3]
['GraftResult', 'LensResult', 'PatchResult']

Imports are lazy: ``import lens_safety`` loads no torch or transformers until a name is used.
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
    # probes
    "probe_layers": "probes", "ProbeResult": "probes", "probe_transfer": "probes", "transfer_to": "probes",
    "refusal_directions": "probes", "relative_depth_frame": "probes", "TransferResult": "probes",
    # lens and grafting
    "logit_lens": "lens", "LensResult": "lens", "Lexicon": "lens", "graft": "lens", "GraftResult": "lens",
    # patching
    "patch_layers": "patching", "PatchResult": "patching", "attribution_patch": "patching",
    # report
    "run_pipeline": "report",
}
_SUBMODULES = {"assets", "models", "prompts", "jailbreaks", "activations", "refusal", "probes", "lens",
               "patching", "viz", "report", "errors", "testing"}

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
