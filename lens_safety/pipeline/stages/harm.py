"""Stage ``harm`` (opt-in, ``--harm``): harm recognised vs refusal triggered -- the harm direction (the
instruction's last token) beside the refusal direction (a template token), what each jailbreak does to
them, steering tests, the refusal direction baked out of the weights, a targeted false-refusal fix, and
the harm direction as a latent guard against jailbreaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...analyses.harm import harm_refusal_analysis, steering_tests
from ...core.errors import ChatTemplateError, InputError
from ...inputs.prompts import PromptSet, load_prompts
from ..readme import fmt
from ..stage import Stage, StageResult, figure_png
from ..verdicts import verdict_harm_steering, verdict_harm_vs_refusal, verdict_latent_guard, verdict_text


@dataclass
class HarmStageResult(StageResult):
    analysis: Any = None  # HarmRefusalResult
    steering: Any = None  # SteeringResult
    source: dict[str, Any] = field(default_factory=dict)  # where the refusal position / layer came from
    judge_guard: dict[str, Any] = field(default_factory=dict)  # the judge on the replies, as a detector


def judge_as_guard(results) -> dict[str, Any]:
    """The refusal judge as a detector of jailbroken harmful requests, per method: TPR = replies to wrapped
    requests (refused when plain) judged refused, FPR = harmless replies judged refused (the refusal stage)."""
    refusal = results.get("refusal")
    if refusal is None or refusal.skipped or refusal.asr is None or "harmless" not in refusal.results:
        return {}
    fpr = float(refusal.results["harmless"].refusal_rate)
    return {f"{r.method}/judge (reply refused)": {"auroc": None, "tpr": float(r.jailbroken_refusal_rate), "fpr": fpr}
            for r in refusal.asr.itertuples()}


def jailbreak_groups(ctx) -> dict[str, PromptSet]:
    """Every jailbreak method's prompts, and the jailbroken prompts of the effective pairs (when any)."""
    groups: dict[str, list] = {}
    for p in ctx.jailbroken():
        groups.setdefault(p.method or "jailbreak", []).append(p)
    pairs = ctx.results.get("pairs")
    if pairs is not None and not pairs.skipped and len(pairs.pairs):
        groups["effective pairs"] = [pair.jailbroken for pair in pairs.pairs]
    return {k: PromptSet(v, k) for k, v in groups.items()}


def direction_sets(groups: dict[str, PromptSet], n: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """Up to ``n`` harmful (HarmBench) and harmless prompts to read the directions from, the jailbroken
    requests left out (so the guard and the gap fractions are measured on requests the directions never saw)."""
    wrapped = {p.plain_request for ps in groups.values() for p in ps}
    harmful = PromptSet([p for p in load_prompts("harmbench") if p.text not in wrapped], "harmbench")
    harmless = load_prompts("harmless")
    return harmful.sample(min(n, len(harmful)), seed=seed), harmless.sample(min(n, len(harmless)), seed=seed)


def refusal_source(results) -> dict[str, Any]:
    """The refusal direction's template position and layer: the directions stage's when it ran, else the
    last template token (where generation starts) and the layer that best separates held-out prompts."""
    d = results.get("directions")
    if d is not None and not d.skipped:
        direction = d.selection.direction
        return {"refusal_position": int(direction.position), "refusal_layer": int(direction.layer),
                "from": "the refusal-direction stage"}
    return {"refusal_position": -1, "refusal_layer": None, "from": "last template token; layer by held-out AUROC"}


class HarmStage(Stage):
    name = "harm"
    needs = ("capture", "refusal", "pairs", "directions")
    reads = ("harm", "quick", "seed", "batch_size", "n_eval", "jailbreaks", "judge", "max_new_tokens")
    judged = True
    result = HarmStageResult
    version = 5

    def run(self, ctx) -> HarmStageResult:
        if not ctx.config.harm:
            return HarmStageResult.skip("The harm-vs-refusal stage was not run (it adds minutes on a CPU); run with "
                                        "--harm to add it.")
        if not ctx.aligned:
            return HarmStageResult.skip("Harm vs refusal needs a chat model with a template and refusals.")
        quick, cfg = ctx.config.quick, ctx.config
        refusal = ctx.results.get("refusal")
        refused = {} if refusal is None or refusal.skipped else {
            p.text: o == "refused" for r in refusal.results.values() for p, o in zip(r.prompts, r.outcomes)}
        source = refusal_source(ctx.results)
        ev, groups = ctx.eval_sets(), jailbreak_groups(ctx)
        harmful, harmless = direction_sets(groups, 48 if quick else 200, cfg.seed)
        try:
            analysis = harm_refusal_analysis(
                ctx.model, harmful, harmless, groups,
                borderline=ev["borderline"], refused=refused, refusal_position=source["refusal_position"],
                refusal_layer=source["refusal_layer"], n_boot=200 if quick else 1000, seed=cfg.seed,
                batch_size=cfg.batch_size, progress=ctx.progress)
            steering = steering_tests(ctx.model, analysis, ev["harmbench"], ev["harmless"],
                                      borderline=ev["borderline"], batch_size=cfg.batch_size)
        except (ChatTemplateError, InputError) as e:
            return HarmStageResult.skip(f"Harm vs refusal could not be measured on this model: {e}")
        return HarmStageResult(analysis=analysis, steering=steering, source=source,
                               judge_guard=judge_as_guard(ctx.results),
                               figures={"harm_refusal": figure_png(analysis.plot()),
                                        "harm_steering": figure_png(steering.plot())})

    def metrics(self, result: HarmStageResult) -> dict[str, Any]:
        a, s = result.analysis, result.steering
        jb = a.chosen_fractions()
        return {**a.summary(), "refusal_source": result.source["from"],
                "gap_fraction": {f"{r.group}/{r.direction}": [r.fraction, r.ci_low, r.ci_high]
                                 for r in jb.itertuples()},
                "guard": {**{f"{r.group}/{r.detector}": {"auroc": r.auroc, "tpr": r.tpr, "fpr": r.fpr}
                             for r in a.guard.itertuples()}, **result.judge_guard},
                "steering": {f"{r.steer} on {r.prompts}": {"judgement": [r.judgement_delta, r.judgement_ci_low,
                                                                          r.judgement_ci_high],
                                                            "refusal": [r.refusal_delta, r.refusal_ci_low,
                                                                        r.refusal_ci_high]}
                             for r in s.to_frame().itertuples()},
                "judgement": s.baseline, "orthogonalized": s.orthogonalized, "false_refusal": s.false_refusal}

    def headline_keys(self) -> tuple[str, ...]:
        return ("harm",)

    def headline(self, result: HarmStageResult) -> dict[str, Any]:
        return {"harm": self.metrics(result)}

    def verdicts(self, result: HarmStageResult, run) -> dict[str, Any]:
        return {"harm_vs_refusal": verdict_harm_vs_refusal(result.analysis.chosen_fractions()),
                "harm_steering": verdict_harm_steering(result.steering.to_frame(),
                                                       result.steering.baseline.get("judgement_auroc")),
                "latent_guard": verdict_latent_guard(result.analysis.guard)}

    def tables(self, result: HarmStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        a = result.analysis
        return {"harm_layers": a.layers, "harm_jailbreaks": a.jailbreaks, "harm_guard": a.guard,
                "harm_joint": a.joint, "harm_steering": result.steering.to_frame()}

    def section(self, result: HarmStageResult, doc, run) -> None:
        doc.heading("Harm recognised vs refusal triggered", anchor="harm")
        doc.claim("Zhao et al. (2025): models encode harmfulness (read at the instruction's last token) and refusal "
                  "(read at the template tokens after it) separately; some jailbreaks lower refusal and leave the "
                  "harm representation intact. The paper's story: the jailbreak breaks the link, not the "
                  "recognition.")
        if result.skipped:
            doc.paragraph(result.skipped, css="note")
            return
        m = self.metrics(result)
        doc.paragraph(f"Harm direction at layer {m['harm_layer']} (held-out AUROC {fmt(m['harm_auroc'], 3)}), "
                      f"refusal direction at layer {m['refusal_layer']}, template position {m['refusal_position']} "
                      f"({m['refusal_source']}; AUROC {fmt(m['refusal_auroc'], 3)}); cosine between them "
                      f"{fmt(m['cosine_at_harm_layer'])} at the harm layer, {fmt(m['cosine_at_refusal_layer'])} at the "
                      f"refusal layer. The model's own yes/no judgement of harm separates the sets with AUROC "
                      f"{fmt(m['judgement'].get('judgement_auroc'), 3)}.")
        for key in ("harm_vs_refusal", "harm_steering", "latent_guard"):
            if key in run.verdicts:
                doc.verdict(run.verdicts[key]["status"], verdict_text(run.verdicts[key]))
        for name, png in result.figures.items():
            doc.image(png, name.replace("_", " ") + ".")
        t = self.tables(result)
        doc.table(result.analysis.chosen_fractions(), "Jailbroken prompts on each direction, as a fraction of the "
                  "harmful-harmless gap at the direction's layer (bootstrap 95% CI over prompts; every layer in "
                  "tables/harm_jailbreaks.csv).")
        doc.table(t["harm_guard"], "Latent guard: each direction's projection as a detector of jailbroken harmful "
                  "prompts vs held-out harmless ones (AUROC with CI; TPR at the FPR, Wilson CI).",
                  columns=["group", "detector", "auroc", "auroc_ci_low", "auroc_ci_high", "tpr", "fpr", "n_pos",
                           "n_neg"])
        doc.table(t["harm_steering"], "Steering: mean change of the harm judgement (log P(Yes) - log P(No)) and of "
                  "the first-token refusal score, with 95% CIs.")
        o, f = m["orthogonalized"], m["false_refusal"]
        if o:
            doc.paragraph(f"Refusal direction orthogonalised out of the weights: harm AUROC "
                          f"{fmt(o.get('harm_auroc_plain'), 3)} -> {fmt(o.get('harm_auroc_orthogonalized'), 3)} "
                          f"(change {fmt(o.get('harm_auroc_change'), 3)}); harmful first-token refusal "
                          f"{fmt(o.get('harmful_refusal_plain'))} -> {fmt(o.get('harmful_refusal_orthogonalized'))}.")
        if f:
            doc.paragraph(f"False refusals: ablating only the part of the refusal direction harm does not explain "
                          f"moves borderline first-token refusal {fmt(f.get('borderline_refusal_plain'))} -> "
                          f"{fmt(f.get('borderline_refusal_targeted'))} (full ablation: "
                          f"{fmt(f.get('borderline_refusal_full'))}), harmful {fmt(f.get('harmful_refusal_plain'))} "
                          f"-> {fmt(f.get('harmful_refusal_targeted'))}, harmless next-token KL "
                          f"{fmt(f.get('harmless_kl_targeted'), 3)}.")


STAGE = HarmStage()
