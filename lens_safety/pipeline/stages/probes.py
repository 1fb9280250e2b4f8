"""Stage ``probes`` (claim 1): per-layer SVM probes harmful vs harmless (both harmless sets), 3-way with
jailbreaks, and the 2-way probe applied to jailbreak prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...analyses.probes import claim1_verdict, probe_layers, probe_transfer
from ...capture import Residuals
from ..config import HARMLESS_SETS
from ..stage import Stage, StageResult, figure_png
from ..verdicts import verdict_claim1, verdict_text


@dataclass
class ProbesStageResult(StageResult):
    two_way: Any = None  # ProbeResult, harmful vs topic-matched harmless
    generic: Any = None  # ProbeResult, harmful vs paper-style generic harmless
    three_way: Any = None  # ProbeResult, harmless vs harmful vs jailbreak
    transfer: Any = None  # TransferResult of the 2-way probe on jailbreak prompts


def _asdict(row) -> dict[str, Any] | None:
    return None if row is None else row._asdict()


class ProbesStage(Stage):
    name = "probes"
    needs = ("capture",)
    reads = ("seed", "batch_size", "n_eval", "jailbreaks")
    result = ProbesStageResult
    claims = {"claim1": "claim 1"}

    def run(self, ctx) -> ProbesStageResult:
        import matplotlib.pyplot as plt

        seed, progress = ctx.config.seed, ctx.progress
        harmless, harmful, jb = (ctx.residuals(k) for k in ("harmless", "harmbench", "jailbreak"))
        two = Residuals.concat([harmless, harmful])
        p2 = probe_layers(two, classifier="svm", cv=5, seed=seed, progress=progress, task="2-way")
        p3 = probe_layers(Residuals.concat([harmless, harmful, jb]), classifier="svm", cv=5, seed=seed,
                          progress=progress, controls=False, task="3-way")
        transfer = probe_transfer(two, jb, positive="harmful", negative="harmless")
        # claim 1 on the paper-style harmless set as well: generic instructions, unmatched in topic and form
        pg = probe_layers(Residuals.concat([ctx.residuals("generic"), harmful]), classifier="svm", cv=5, seed=seed,
                          progress=progress, task="2-way (generic harmless)")
        v1, v2 = (claim1_verdict(p, name=HARMLESS_SETS[k]) for p, k in ((p2, "harmless"), (pg, "generic")))
        figures = {"probes_claim1": figure_png(v1.plot(others=[v2])), "probes_2way": figure_png(p2.plot()),
                   "probes_3way": figure_png(p3.plot()), "probes_transfer": figure_png(transfer.plot())}
        plt.close("all")
        return ProbesStageResult(two_way=p2, generic=pg, three_way=p3, transfer=transfer, figures=figures)

    def metrics(self, result: ProbesStageResult) -> dict[str, Any]:
        p2, p3, pg = result.two_way, result.three_way, result.generic
        rates = result.transfer.to_frame()
        return {"first_layer_095": _asdict(p2.first_layer_above(0.95)),
                "first_layer_095_3way": _asdict(p3.first_layer_above(0.95)),
                "layer0_accuracy": float(p2.to_frame()["accuracy"].iloc[0]),
                "best": p2.best_layer()._asdict(), "best_generic": pg.best_layer()._asdict(),
                "first_layer_095_generic": _asdict(pg.first_layer_above(0.95)),
                "transfer_harmful_rate": {int(r["layer"]): float(r["positive_rate"]) for _, r in rates.iterrows()}}

    def headline_keys(self) -> tuple[str, ...]:
        return ("probe_first_layer_095", "probe_first_layer_095_ci", "probe_best", "probe_best_generic",
                "probe_first_layer_095_generic", "probe_layer0_accuracy")

    def headline(self, result: ProbesStageResult) -> dict[str, Any]:
        m = self.metrics(result)
        first = m["first_layer_095"]
        return {"probe_first_layer_095": first["layer"] if first else None,
                "probe_first_layer_095_ci": [first["ci_low"], first["ci_high"]] if first else None,
                "probe_best": m["best"], "probe_best_generic": m["best_generic"],
                "probe_first_layer_095_generic": (m["first_layer_095_generic"] or {}).get("layer"),
                "probe_layer0_accuracy": m["layer0_accuracy"]}

    def verdicts(self, result: ProbesStageResult, run) -> dict[str, Any]:
        return {"claim1": verdict_claim1(result.two_way.to_frame(), harmless=HARMLESS_SETS["harmless"]),
                "claim1_generic": verdict_claim1(result.generic.to_frame(), harmless=HARMLESS_SETS["generic"])}

    def tables(self, result: ProbesStageResult) -> dict[str, Any]:
        return {"probes_2way": result.two_way.to_frame(), "probes_2way_generic": result.generic.to_frame(),
                "probes_3way": result.three_way.to_frame(), "probes_transfer": result.transfer.to_frame()}

    def section(self, result: ProbesStageResult, doc, run) -> None:
        vd, fig = run.verdicts, result.figures
        doc.heading("Claim 1: ethics is recognised in the early layers", anchor="probes")
        doc.claim("Paper: weak classifiers on each layer's last-position state separate harmful from harmless "
                  "prompts (accuracy >= 0.95) within the first few layers; the embedding layer sits at chance "
                  "(every prompt ends with the same template token).")
        for key in [k for k in vd if k.startswith("claim1")]:
            doc.verdict(vd[key]["status"], verdict_text(vd[key]))
        doc.image(fig["probes_claim1"], "Claim 1 on both harmless sets: topic-matched (ours, matched to "
                  "HarmBench in form and topic) and paper-style generic instructions; early layers shaded.")
        two = result.two_way.to_frame()
        cols = [c for c in ("layer", "accuracy", "ci_low", "ci_high", "auroc", "shuffled_accuracy", "length_accuracy")
                if c in two.columns]
        doc.image(fig["probes_2way"], "2-way probe accuracy per layer (5-fold CV, 95% CI) with shuffled-label "
                  "and length-only controls.")
        doc.table(two, "2-way probes per layer (the columns that carry the claim; the full table "
                  "below and in tables/probes_2way.csv).", columns=cols)
        doc.table(result.generic.to_frame(), "2-way probes per layer, harmful vs the paper-style generic "
                  "harmless set (every column; tables/probes_2way_generic.csv).", collapsed=True)
        doc.image(fig["probes_3way"], "3-way probes: harmless vs harmful vs jailbreak.")
        doc.claim("Paper (claim 3, early part): jailbreaks do not fool the early layers.",
                  "fraction of jailbreak prompts the harmful-vs-harmless probe calls harmful, per layer (figure).")
        doc.image(fig["probes_transfer"], "Probes trained on harmless vs harmful, applied to jailbreak prompts.")


STAGE = ProbesStage()
