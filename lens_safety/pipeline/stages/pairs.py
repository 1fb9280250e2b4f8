"""Stage ``pairs``: effective jailbreak pairs (refused plain, complied wrapped) and the dropped candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..readme import fmt
from ..stage import GENERATION_READS, Stage, StageResult


@dataclass
class PairsStageResult(StageResult):
    pairs: Any = None  # PairSet


class PairsStage(Stage):
    name = "pairs"
    needs = ("refusal",)
    reads = GENERATION_READS
    judged = True
    result = PairsStageResult

    def run(self, ctx) -> PairsStageResult:
        if not ctx.aligned:
            return PairsStageResult.skip("No refusal behaviour on a base model, so no effective jailbreak pairs.")
        return PairsStageResult(pairs=ctx.pairs())

    def dropped(self, result: PairsStageResult):
        dropped = getattr(result.pairs, "dropped", None)
        if dropped is None or not len(dropped):
            return None
        dropped = dropped.copy()
        if "jailbroken_completion" in dropped:
            dropped["jailbroken_completion"] = dropped["jailbroken_completion"].astype(str).str.slice(0, 160)
        return dropped

    def metrics(self, result: PairsStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        pairs, dropped = result.pairs, self.dropped(result)
        by_reason = {} if dropped is None else {str(k): int(v) for k, v in dropped["reason"].value_counts().items()}
        return {"n_pairs": len(pairs), "n_dropped": int(sum(by_reason.values())), "dropped_by_reason": by_reason,
                "by_method": pairs.to_frame()["method"].value_counts().to_dict() if len(pairs) else {}}

    def headline_keys(self) -> tuple[str, ...]:
        return ("n_effective_pairs", "n_dropped_pairs")

    def headline(self, result: PairsStageResult) -> dict[str, Any]:
        m = self.metrics(result)
        return {"n_effective_pairs": m["n_pairs"], "n_dropped_pairs": m["n_dropped"]}

    def tables(self, result: PairsStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        dropped = self.dropped(result)
        return {"pairs": result.pairs.to_frame(), **({} if dropped is None else {"pairs_dropped": dropped})}

    def section(self, result: PairsStageResult, doc, run) -> None:
        if result.skipped:
            return
        h = run.headline
        doc.paragraph(f"Effective jailbreak pairs (plain refused, wrapped complied, refusal-score gap large "
                      f"enough): {h['n_effective_pairs']}; candidates dropped: {fmt(h.get('n_dropped_pairs'))}.")
        d = self.dropped(result)
        if d is not None:
            doc.table(d, "Dropped candidates with the reason (refused when wrapped, unengaged reply, or a "
                      "refusal-score gap below the minimum).",
                      columns=[c for c in ("request", "method", "reason", "gap") if c in d.columns], max_rows=30)


STAGE = PairsStage()
