"""Stage ``patching`` (claim 3): activation patching between the plain and jailbroken runs of effective pairs,
both ways, and the break layer with its bootstrap CI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...analyses.patching import patch_layers
from ..stage import GENERATION_READS, Stage, StageResult, figure_png
from ..verdicts import is_missing, verdict_claim3, verdict_text

DIRECTIONS = ("denoise", "noise")


@dataclass
class PatchingStageResult(StageResult):
    denoise: Any = None  # PatchResult: plain activations patched into the jailbroken run
    noise: Any = None  # PatchResult: jailbroken activations patched into the plain run
    patched_pairs: Any = None  # DataFrame: method, request


def round_robin(pairs, n: int) -> list:
    """Up to ``n`` pairs taken in turn from each jailbreak method, so every method is represented."""
    by_method: dict[str, list] = {}
    for p in pairs:
        by_method.setdefault(p.method, []).append(p)
    chosen: list = []
    while len(chosen) < n and any(by_method.values()):
        for queue in by_method.values():
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


class PatchingStage(Stage):
    name = "patching"
    needs = ("pairs",)
    reads = GENERATION_READS + ("n_pairs",)
    result = PatchingStageResult
    claims = {"claim3": "claim 3"}

    def run(self, ctx) -> PatchingStageResult:
        import pandas as pd

        if not ctx.aligned:
            return PatchingStageResult.skip("Patching needs effective jailbreak pairs, which a base model cannot "
                                            "give.")
        pairs = ctx.pairs()
        if len(pairs) == 0:
            return PatchingStageResult.skip("No effective pairs: the model refused none of the sampled requests, "
                                            "or no jailbreak worked on them. Use more prompts (--n) or other "
                                            "--jailbreaks.")
        chosen = round_robin(pairs, ctx.config.n_pairs)
        res = {d: patch_layers(ctx.model, chosen, direction=d, batch_size=ctx.config.batch_size * 2,
                               progress=ctx.progress) for d in DIRECTIONS}
        return PatchingStageResult(**res, figures={f"patching_{d}": figure_png(r.plot()) for d, r in res.items()},
                                   patched_pairs=pd.DataFrame([{"method": p.method, "request": p.request}
                                                               for p in chosen]))

    def break_layers(self, result: PatchingStageResult):
        import pandas as pd

        return pd.concat([result.denoise.break_layers(), result.noise.break_layers()], ignore_index=True)

    def metrics(self, result: PatchingStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        return {"n_pairs": len(result.patched_pairs), "break_layers": {
            f"{r['component']}/{r['direction']}": (None if is_missing(r["break_layer"]) else int(r["break_layer"]))
            for _, r in self.break_layers(result).iterrows()}}

    def headline_keys(self) -> tuple[str, ...]:
        return ("n_patched_pairs", "break_layers", "break_layers_ci")

    def headline(self, result: PatchingStageResult) -> dict[str, Any]:
        m = self.metrics(result)
        breaks = {f"{r['component']}/{r['direction']}": None if is_missing(r["break_layer"]) else
                  {"layer": int(r["break_layer"]), "ci_low": int(r["ci_low"]), "ci_high": int(r["ci_high"])}
                  for _, r in self.break_layers(result).iterrows()}
        return {"n_patched_pairs": m["n_pairs"], "break_layers": m["break_layers"], "break_layers_ci": breaks or None}

    def verdicts(self, result: PatchingStageResult, run) -> dict[str, Any]:
        return {"claim3": verdict_claim3(self.break_layers(result), run.n_layers)}

    def tables(self, result: PatchingStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        return {"patching_denoise": result.denoise.to_frame(), "patching_noise": result.noise.to_frame(),
                "break_layers": self.break_layers(result), "patched_pairs": result.patched_pairs}

    def section(self, result: PatchingStageResult, doc, run) -> None:
        vd = run.verdicts
        doc.heading("Claim 3: where the jailbreak breaks the chain (activation patching)", anchor="patching")
        doc.claim("Paper: jailbreaks disrupt the link between early ethical recognition and middle-layer refusal. "
                  "Here: patching the plain run's activations into the jailbroken run (denoise) restores refusal "
                  "from a break layer on; patching the jailbroken run's into the plain run (noise) removes it.")
        doc.verdict(vd["claim3"]["status"], verdict_text(vd["claim3"]))
        if result.skipped:
            doc.paragraph(result.skipped, css="note")
            return
        for name, png in result.figures.items():
            doc.image(png, f"Mean normalised recovery per layer and component ({name.split('_')[-1]}).")
        doc.table(self.break_layers(result), "Break layer (mean recovery first >= 0.5) with bootstrap CIs over pairs.")


STAGE = PatchingStage()
