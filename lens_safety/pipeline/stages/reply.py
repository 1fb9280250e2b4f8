"""Stage ``reply`` (opt-in, ``--reply``): the residual stream along the generated replies -- per-token readouts,
replies whose judged outcome turns along the reply, and early detection of compliance from the first k reply
tokens. Its recordings are made by the refusal and pairs stages' own generation pass (``Context.record``), so
no reply is generated twice."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...analyses.reply import (
    KS,
    PREFIXES,
    ReadoutBasis,
    early_detection,
    reply_lens_layers,
    reply_readouts,
    reply_turns,
)
from ...behaviour.pairs import wrapped_sets
from ...capture import collect_residuals
from ...core.htmlreport import OfflineView
from ...inputs.prompts import PromptSet, load_prompts
from ..readme import fmt
from ..stage import Stage, StageResult, figure_png
from ..verdicts import verdict_early_detection, verdict_reply_turns, verdict_text

N_BASIS = 64  # harmful and harmless prompts the readout directions and probes are fitted on
FPR = 0.05


@dataclass
class ReplyStageResult(StageResult):
    readouts: Any = None  # ReplyReadouts
    turns: Any = None  # TurnResult
    detection: Any = None  # DetectionResult (negatives: harmless replies)
    compliance: Any = None  # DetectionResult (negatives: harmful requests' replies judged refused)
    views: list[dict[str, Any]] = field(default_factory=list)  # circuitsvis views: element, props, caption
    settings: dict[str, Any] = field(default_factory=dict)


def detection_metrics(d) -> dict[str, Any]:
    """``{"k=<k>/<group>": {tpr, ci, n_pos, n_neg, auroc}}`` of a DetectionResult."""
    return {f"k={int(r.k)}/{r.group}": {"tpr": r.tpr, "ci": [r.ci_low, r.ci_high], "n_pos": int(r.n_pos),
                                         "n_neg": int(r.n_neg), "auroc": r.auroc} for r in d.frame.itertuples()}


def harm_vectors(results) -> np.ndarray | None:
    """The harm stage's harm directions ``[n_layers + 1, d_model]`` when it ran."""
    h = results.get("harm")
    return None if h is None or h.skipped or h.analysis is None else np.asarray(h.analysis.harm)


def basis_sets(recorded: set[str], n: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """Up to ``n`` harmful and harmless prompts whose requests are not among the recorded replies."""
    sets = []
    for name in ("harmbench", "harmless"):
        ps = PromptSet([p for p in load_prompts(name) if p.plain_request not in recorded], name)
        sets.append(ps.sample(min(n, len(ps)), seed=seed))
    return sets[0], sets[1]


def example_replies(readouts, turns) -> list[int]:
    """Replies worth a view: a reply that turns, a complied jailbreak, a refused plain request, a harmless one."""
    rep = readouts.replies
    picks = []
    if turns is not None and len(turns.frame):
        turned = turns.frame[turns.frame["turned"]]
        for row in turned.itertuples():
            hit = rep.index[(rep["group"] == row.group)][row.reply:row.reply + 1]
            picks += list(hit)[:1]
            break
    for cond in ((rep["method"] != "plain") & (rep["outcome"] == "complied"),
                 (rep["group"] == "harmbench") & (rep["outcome"] == "refused"), rep["group"] == "harmless"):
        idx = rep.index[cond]
        if len(idx):
            picks.append(int(idx[0]))
    return list(dict.fromkeys(int(i) for i in picks))


class ReplyStage(Stage):
    name = "reply"
    needs = ("refusal", "pairs", "harm")
    reads = ("reply", "n_eval", "seed", "judge", "max_new_tokens", "batch_size", "jailbreaks")
    judged = True
    version = 2
    result = ReplyStageResult

    def key(self, ctx) -> dict[str, Any]:
        h = harm_vectors(ctx.results)
        return {"harm": None if h is None else hashlib.sha256(np.ascontiguousarray(h).tobytes()).hexdigest()[:16]}

    def run(self, ctx) -> ReplyStageResult:
        cfg = ctx.config
        if not cfg.reply:
            return ReplyStageResult.skip("The along-the-reply stage was not run; run with --reply to add it (the "
                                         "generation pass then records the residual stream along every reply).")
        if not ctx.aligned:
            return ReplyStageResult.skip("Along the reply needs a chat-aligned model (replies that refuse).")
        if ctx.record is None:
            return ReplyStageResult.skip("Along the reply records in one process; this run is data-parallel "
                                         "(accelerate/torchrun): rerun it in one process for --reply.")
        model = ctx.model
        groups = {name: ctx.refusal(ps) for name, ps in ctx.eval_sets().items()}
        for method, ps in wrapped_sets(groups["harmbench"], cfg.jailbreaks).items():
            groups[method] = ctx.refusal(ps)
        recorded = {p.plain_request for r in groups.values() for p in r.prompts}
        harmful, harmless = basis_sets(recorded, N_BASIS, cfg.seed)
        res = [collect_residuals(model, ps, batch_size=cfg.batch_size, progress=ctx.progress)
               for ps in (harmful, harmless)]
        basis = ReadoutBasis.fit(res[0], res[1], ctx.record.layers, harm=harm_vectors(ctx.results), seed=cfg.seed)
        readouts = reply_readouts(model, groups, basis, lens_layers=reply_lens_layers(model))
        early = 24 if cfg.max_new_tokens > 24 else cfg.max_new_tokens // 2
        turns = reply_turns(groups, ctx.judge(), prefixes=PREFIXES, early=early, model=model)
        detection = early_detection(readouts, ks=KS, fpr=FPR, seed=cfg.seed)
        compliance = early_detection(readouts, ks=KS, fpr=FPR, seed=cfg.seed, against="refused")
        layer = max(x for x in basis.layers if x < model.n_layers) if len(basis.layers) > 1 else basis.layers[0]
        figures = {"reply_refusal": figure_png(readouts.plot("refusal", layer=layer, by="group")),
                   "reply_lens": figure_png(readouts.plot("lens_refusal", layer=model.n_layers, by="group")),
                   "reply_turns": figure_png(turns.plot()), "reply_detection": figure_png(detection.plot()),
                   "reply_compliance": figure_png(compliance.plot())}
        views = []
        for i in example_replies(readouts, turns):
            v = readouts.view(i, "refusal", layer=layer)
            views.append({"element": v.element, "props": v.props, "caption": v.caption})
        return ReplyStageResult(readouts=readouts, turns=turns, detection=detection, compliance=compliance,
                                views=views, figures=figures,
                                settings={"layers": list(basis.layers), "lens_layers": list(reply_lens_layers(model)),
                                          "view_layer": layer, "early": early, "fpr": FPR, "ks": list(KS),
                                          "n_basis": list(basis.n_fit), "harm_direction": "harm" in basis.directions})

    def metrics(self, result: ReplyStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        s = result.turns.summary()
        early = result.settings["early"]
        return {"n_replies": len(result.readouts), "layers": result.settings["layers"],
                "turns": {r["group"]: {"n": int(r["n"]), "turned": int(r["n_turned"]),
                                       "complied_then_refused": int(r["complied_then_refused"]),
                                       "refused_then_complied": int(r["refused_then_complied"]),
                                       "median_turn_at": r["median_turn_at"],
                                       f"early{early}_agreement": r[f"early{early}_agreement"],
                                       "agreement_ci": [r["agreement_ci_low"], r["agreement_ci_high"]]}
                          for r in s.to_dict("records")},
                "early_tokens": early,
                "readout_layer": result.settings["view_layer"],
                "refusal_readout": {r.pop("group"): r for r in result.readouts.summary(
                    "refusal", result.settings["view_layer"]).to_dict("records")},
                "detection": detection_metrics(result.detection), "detection_note": result.detection.note,
                "compliance": detection_metrics(result.compliance), "compliance_note": result.compliance.note,
                "fpr": result.settings["fpr"]}

    def headline_keys(self) -> tuple[str, ...]:
        return ("reply",)

    def headline(self, result: ReplyStageResult) -> dict[str, Any]:
        return {"reply": self.metrics(result)}

    def verdicts(self, result: ReplyStageResult, run) -> dict[str, Any]:
        return {"reply_turns": verdict_reply_turns(result.turns.summary()),
                "early_detection": verdict_early_detection(result.detection.frame, note=result.detection.note)}

    def tables(self, result: ReplyStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        return {"reply_turns": result.turns.summary(), "reply_turns_per_reply": result.turns.frame,
                "reply_detection": result.detection.frame, "reply_compliance": result.compliance.frame,
                "reply_readouts": result.readouts.to_frame()}

    def section(self, result: ReplyStageResult, doc, run) -> None:
        doc.heading("Along the reply", anchor="reply")
        doc.claim("Refusal and compliance unfold in the reply: a jailbroken reply can start complying and refuse "
                  "later, or the reverse; reading the hidden states while the model writes (SafeSwitch: a probe "
                  "after 3 decoded tokens; TrajGuard: 95% of attacks at < 1.5% false positives) flags compliance "
                  "early.")
        if result.skipped:
            doc.paragraph(result.skipped, css="note")
            return
        st = result.settings
        doc.paragraph(f"{len(result.readouts)} replies recorded in the refusal stage's own generation pass, at "
                      f"layers {st['layers']} (step 0 = last prompt token, step k = after reply token k). Readout "
                      f"directions and probes fitted on {st['n_basis'][0]} harmful and {st['n_basis'][1]} harmless "
                      "prompts whose requests are not among the replies.")
        for key in ("reply_turns", "early_detection"):
            if key in run.verdicts:
                doc.verdict(run.verdicts[key]["status"], verdict_text(run.verdicts[key]))
        captions = {"reply_refusal": "Refusal-direction readout along the reply (mean, 95% CI), per set.",
                    "reply_lens": "Lens probability of a refusal start at the last layer (the model's own next-token "
                                  "distribution) along the reply.",
                    "reply_turns": "The judge on growing prefixes: share judged complied.",
                    "reply_detection": f"Early detection: TPR at {st['fpr']:.0%} FPR on harmless replies vs reply "
                                       "tokens read (out of fold, grouped by request; 95% bootstrap CI).",
                    "reply_compliance": "The same detector against replies to harmful requests judged refused: "
                                        "will this harmful request be complied with?"}
        for name, png in result.figures.items():
            doc.image(png, captions.get(name, name))
        t = self.tables(result)
        doc.table(t["reply_turns"], f"Replies whose judged outcome changes along the reply (first decided prefix vs "
                  f"full reply), and the judge on the first {st['early']} tokens vs the full reply (agreement, "
                  "Wilson 95% CI).")
        doc.table(t["reply_detection"], "Early detection per k and jailbreak method ('plain': unwrapped requests), "
                  "negatives: harmless replies.")
        doc.table(t["reply_compliance"], "The same, negatives: replies to harmful requests judged refused.")
        turned = result.turns.frame[result.turns.frame["turned"]]
        if len(turned):
            doc.table(turned[["group", "request", "direction", "turn_at", "first", "final"]].head(12),
                      "Replies that turn (first 12).")
        for v in result.views:
            doc.view(OfflineView(v["element"], v["props"]), v.get("caption"))
        if result.detection.note:
            doc.paragraph(result.detection.note, css="note")
        doc.paragraph("Overall TPR by k: " + ", ".join(
            f"k={int(r.k)} {fmt(r.tpr)}" for r in result.detection.frame.itertuples() if r.group == "all") + ".")


STAGE = ReplyStage()
