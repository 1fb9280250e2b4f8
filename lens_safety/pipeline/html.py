"""The self-contained HTML report: an introduction, the verdict table, then each stage's own section (in
registry order), then the limits of the run. Everything shown is escaped (:mod:`lens_safety.core.htmlreport`)."""

from __future__ import annotations

from typing import Any

from ..core.htmlreport import HtmlDocument
from .stage import RunInfo, StageResult

INTRO = ("How a chat model recognises a harmful request, turns that recognition into a refusal, and where a "
         "jailbreak breaks the chain: a reproduction and extension of Zhou et al., 'How Alignment and Jailbreak "
         "Work: Explain LLM Safety through Intermediate Hidden States' (EMNLP 2024 Findings). Each claim section "
         "states the paper's claim, then a verdict computed from this run's data.")


def verdict_frame(verdicts: dict[str, dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame([{"claim": k, "verdict": v["status"], "evidence": v["evidence"]} for k, v in verdicts.items()])


def limits(info: RunInfo, skipped: dict[str, str]) -> list[str]:
    cfg = info.cfg
    return [f"Small model ({info.model}) and modest sample sizes (evaluation n={cfg.n_eval} per set); CIs are wide.",
            f"The refusal judge ('{cfg.judge}') reads replies of {cfg.max_new_tokens} tokens; the first-token score "
            "is a proxy for the whole reply.",
            "Logit-lens readings of early layers are unreliable (the lens is trained for the last layer).",
            "Jailbreak templates are fixed; adaptive attacks (GCG optimisation, PAIR) are out of scope.",
            ] + [f"{k}: {v}" for k, v in skipped.items()]


def build_html(info: RunInfo, results: dict[str, StageResult], skipped: dict[str, str], stages) -> HtmlDocument:
    doc = HtmlDocument(f"lens_safety report: {info.model}")
    doc.paragraph(INTRO)
    doc.table(verdict_frame(info.verdicts), "Verdicts: the paper's claims checked against this run.")
    for stage in stages:
        if stage.name in results:
            stage.section(results[stage.name], doc, info)
    doc.heading("Limits of this run", anchor="limits")
    doc.bullets(limits(info, skipped))
    return doc
