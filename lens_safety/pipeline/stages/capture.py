"""Stage ``capture``: the residual stream of every set at the last prompt position (cached by
:func:`~lens_safety.capture.collect_residuals`; later stages read the same cache)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..stage import Stage, StageResult

CAPTURED = ("harmless", "harmbench", "jailbreak", "generic")


@dataclass
class CaptureStageResult(StageResult):
    capture: Any = None  # DataFrame: set, n, layers, d_model, mean_tokens


class CaptureStage(Stage):
    name = "capture"
    needs = ("prompts",)
    reads = ("batch_size", "n_eval", "seed", "jailbreaks")
    result = CaptureStageResult

    def run(self, ctx) -> CaptureStageResult:
        import pandas as pd

        rows = []
        for name in CAPTURED:
            acts = ctx.residuals(name)
            rows.append({"set": name, "n": len(acts), "layers": acts.n_layers + 1, "d_model": acts.d_model,
                         "mean_tokens": float(acts.n_tokens.float().mean())})
        return CaptureStageResult(capture=pd.DataFrame(rows))

    def metrics(self, result: CaptureStageResult) -> dict[str, Any]:
        return {"sets": {r["set"]: r["n"] for r in result.capture.to_dict("records")}}

    def tables(self, result: CaptureStageResult) -> dict[str, Any]:
        return {"capture": result.capture}


STAGE = CaptureStage()
