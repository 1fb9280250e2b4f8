"""Stage ``graft``: Logit Grafting -- the harmless mean state grafted into refused harmful requests, per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...analyses.lens.logit import graft
from ..readme import fmt, graft_earliest_text
from ..stage import Stage, StageResult, figure_png


@dataclass
class GraftStageResult(StageResult):
    graft: Any = None  # GraftResult
    n_prompts: int | None = None


class GraftStage(Stage):
    name = "graft"
    needs = ("refusal", "capture")
    reads = ("n_eval", "seed", "judge", "max_new_tokens", "batch_size", "n_graft", "graft_layers")
    judged = True
    result = GraftStageResult

    def run(self, ctx) -> GraftStageResult:
        import numpy as np

        if not ctx.aligned:
            return GraftStageResult.skip("Grafting measures the loss of refusal; a base model does not refuse.")
        # Graft where there is a refusal to remove: harmful requests the model refuses when plain (outcome
        # "refused"; an unengaged reply is no refusal to remove).
        plain = ctx.refusal(ctx.eval_sets()["harmbench"])
        refused = plain.subset(np.asarray(plain.outcomes) == "refused").prompts
        if len(refused) == 0:
            return GraftStageResult.skip("The model refused none of the sampled harmful requests, so there is "
                                         "nothing to graft.")
        refused = refused[: ctx.config.n_graft]
        n_layers = ctx.model.n_layers
        step = max(1, n_layers // ctx.config.graft_layers)
        layers = list(range(step, n_layers + 1, step))  # the final layer, if hit, is a flagged reference row
        result = graft(ctx.model, refused, ctx.residuals("harmless"), layers=layers, max_new_tokens=16,
                       batch_size=ctx.config.batch_size, donor_label="harmless", progress=ctx.progress,
                       judge=ctx.judge())
        return GraftStageResult(graft=result, n_prompts=len(refused), figures={"graft": figure_png(result.plot())})

    def metrics(self, result: GraftStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        frame = result.graft.to_frame()
        # "complied" = the judge's outcome "complied"; the final residual layer (the donor's own read-out)
        # never counts for the headline numbers
        candidates = frame[~frame["final"].astype(bool)]
        summary = result.graft.summary()
        return {"best_layer": summary["best_layer"], "n_prompts": result.n_prompts, "judge": summary["judge"],
                "max_complied": int(candidates["n_complied"].max()) if len(candidates) else None,
                "earliest_compliance": summary.get("earliest_compliance")}

    def headline_keys(self) -> tuple[str, ...]:
        return ("graft_best_layer", "graft_max_complied", "graft_n_prompts", "graft_earliest_compliance_layer",
                "graft_earliest_compliance", "graft_judge")

    def headline(self, result: GraftStageResult) -> dict[str, Any]:
        m = self.metrics(result)
        return {"graft_best_layer": m.get("best_layer"), "graft_max_complied": m.get("max_complied"),
                "graft_n_prompts": m.get("n_prompts"),
                "graft_earliest_compliance_layer": (m.get("earliest_compliance") or {}).get("layer"),
                "graft_earliest_compliance": m.get("earliest_compliance"), "graft_judge": m.get("judge")}

    def tables(self, result: GraftStageResult) -> dict[str, Any]:
        return {} if result.skipped else {"graft": result.graft.to_frame()}

    def section(self, result: GraftStageResult, doc, run) -> None:
        h = run.headline
        doc.heading("Logit Grafting", anchor="graft")
        if result.skipped:
            doc.paragraph(result.skipped, css="note")
            return
        doc.claim("Paper: replacing a harmful prompt's last-position state by the harmless mean at a middle layer "
                  "approximates a jailbreak.",
                  f"layer with the largest refusal drop: {fmt(h['graft_best_layer'])}; at most "
                  f"{fmt(h.get('graft_max_complied'))} of {fmt(h.get('graft_n_prompts'))} refused requests "
                  "complied after grafting at a layer before the final one; earliest layer where most comply: "
                  + graft_earliest_text(h.get("graft_earliest_compliance") or {}))
        for png in result.figures.values():
            doc.image(png, "Refusal score after grafting the harmless-mean state, per layer.")
        doc.table(result.graft.to_frame(), f"Grafting per layer (replies judged by {fmt(h.get('graft_judge'))}; "
                  "complied = the judge's outcome 'complied'). The row flagged final grafts the final residual "
                  "itself, so the reply is the donor's own read-out: it is shown for reference and never counts "
                  "as the best or earliest layer.")


STAGE = GraftStage()
