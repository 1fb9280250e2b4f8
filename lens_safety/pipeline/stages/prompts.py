"""Stage ``prompts``: the prompt sets of the run, their sources and licences, lengths, jailbreak methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...inputs.jailbreaks import jailbreak_methods
from ...inputs.prompts import length_report
from ..config import DEFAULT_N
from ..stage import Stage, StageResult


@dataclass
class PromptsResult(StageResult):
    prompt_sets: Any = None  # DataFrame: set, n, label, source, licence
    lengths: Any = None
    jailbreak_methods: Any = None


class PromptsStage(Stage):
    name = "prompts"
    reads = ("n_eval", "seed", "jailbreaks")
    result = PromptsResult

    def key(self, ctx) -> dict[str, Any]:
        return {"jailbreak_prompts": ctx.jailbroken().hash()}

    def run(self, ctx) -> PromptsResult:
        import pandas as pd

        rows = [{"set": name, "n": len(ps), "label": ps[0].label, "source": ps[0].source, "licence": ps[0].licence}
                for name, ps in ctx.sets.items()]
        jb = ctx.jailbroken()
        rows.append({"set": "jailbreak", "n": len(jb), "label": "jailbreak",
                     "source": "lens_safety jailbreak catalogue (see methods)", "licence": "see methods"})
        methods = jailbreak_methods().to_frame()
        return PromptsResult(prompt_sets=pd.DataFrame(rows),
                             lengths=length_report(*ctx.sets.values(), jb).rename_axis("set").reset_index(),
                             jailbreak_methods=methods[methods["name"].isin(ctx.config.jailbreaks)])

    def metrics(self, result: PromptsResult) -> dict[str, Any]:
        return {"n": {r["set"]: r["n"] for r in result.prompt_sets.to_dict("records")}}

    def tables(self, result: PromptsResult) -> dict[str, Any]:
        return {"prompt_sets": result.prompt_sets, "lengths": result.lengths,
                "jailbreak_methods": result.jailbreak_methods}

    def section(self, result: PromptsResult, doc, run) -> None:
        cfg = run.cfg
        doc.heading("Provenance", anchor="provenance")
        doc.bullets([f"{k}: {v}" for k, v in run.provenance.items()] + [
            f"run: {'quick' if cfg.quick else 'full'}; prompts per set: {cfg.n or DEFAULT_N}; refusal/jailbreak "
            f"evaluation per set: {cfg.n_eval}; jailbreaks: {', '.join(cfg.jailbreaks)}; seed {cfg.seed}",
            f"lens_safety {run.version}",
            "Layer convention: 0 = embedding output, l = raw residual stream after block l-1 (no final norm)."])
        doc.table(result.prompt_sets, "Prompt sets, sources and licences.")
        doc.table(result.jailbreak_methods, "Jailbreak methods used, with their sources.",
                  columns=["name", "family", "source", "licence"])
        doc.table(result.lengths, "Prompt length (words) per set: harmless is matched to harmful in form.")


STAGE = PromptsStage()
