"""Stage ``directions`` (opt-in, ``--directions``): the refusal direction selected on validation prompts,
ablated and added on held-out prompts, baked into the weights, and placed against the patching break band."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...analyses.directions import (
    RATE_NAMES,
    ablate,
    band_ablation,
    coefficient_sweep,
    direction_effects,
    direction_geometry,
    direction_logit_lens,
    orthogonalize,
    select_refusal_direction,
    split_prompts,
)
from ...analyses.probes import probe_layers
from ...behaviour.judges import as_judge
from ...behaviour.refusal import evaluate_refusal, first_token_scores
from ...capture import Residuals
from ...core import store
from ...core.errors import InputError
from ...inputs.prompts import PromptSet, as_prompt_set, load_prompts
from ..readme import fmt
from ..stage import Stage, StageResult, figure_png
from ..verdicts import verdict_direction, verdict_text


@dataclass(frozen=True)
class DirectionStudy:
    """How the direction is selected and measured: ``n_train`` / ``n_val`` prompts per class select it (seeded
    split), ``n_eval`` held-out prompts per class measure it with greedy replies of ``max_new_tokens``;
    ``layers``, ``screen``, ``top_k`` and ``select`` (more keyword arguments) go to
    :func:`~lens_safety.select_refusal_direction` (default ``on_empty="best"``: metric ``filters_passed``
    says whether it was needed); ``check_orthogonalized`` bakes the direction into the weights and compares."""

    n_train: int = 128
    n_val: int = 32
    n_eval: int = 32
    max_new_tokens: int = 32
    layers: Sequence[int] | None = None
    screen: int | None = 8
    top_k: int = 8
    batch_size: int = 32
    check_orthogonalized: bool = True
    seed: int = 0
    select: dict[str, Any] = field(default_factory=dict)


@dataclass
class DirectionsStageResult(StageResult):
    selection: Any = None  # DirectionSelection (its .direction is the chosen RefusalDirection)
    effects: Any = None  # DirectionEffects on held-out prompts
    sweep: Any = None  # CoefficientSweep
    logit_lens: Any = None  # DataFrame: tokens the direction promotes / suppresses
    orthogonalized: Any = None  # RefusalResult of the orthogonalised weights on the harmful held-out prompts
    geometry: Any = None  # DirectionGeometry (with probes or jailbroken prompts)
    band: Any = None  # DataFrame: ablation inside / outside the break band
    metrics: dict[str, Any] = field(default_factory=dict)


def _held_out(harmful: PromptSet, harmless: PromptSet, study: DirectionStudy) -> tuple[PromptSet, PromptSet]:
    h_eval = split_prompts(harmful, study.n_train, study.n_val, study.seed, "harmful")[2][: study.n_eval]
    b_eval = split_prompts(harmless, study.n_train, study.n_val, study.seed, "harmless")[2][: study.n_eval]
    if len(h_eval) == 0 or len(b_eval) == 0:
        raise InputError(f"No held-out prompts left for evaluation ({len(harmful)} harmful, {len(harmless)} "
                         f"harmless; n_train={study.n_train}, n_val={study.n_val}); pass more prompts or smaller "
                         "splits.")
    return h_eval, b_eval


def _orthogonalized(model, d, h_eval, study: DirectionStudy, judge, progress: bool) -> tuple[Any, dict[str, Any]]:
    orth = orthogonalize(model, d)
    hooked = first_token_scores(model, h_eval, batch_size=16, fwd_hooks=ablate(d))
    baked = first_token_scores(orth, h_eval, batch_size=16)
    r_orth = evaluate_refusal(orth, h_eval, max_new_tokens=study.max_new_tokens, batch_size=16, progress=progress,
                              judge=judge)
    metrics: dict[str, Any] = {"orthogonalized_max_score_diff": float((hooked - baked).abs().max())}
    for row in r_orth.rates().itertuples():
        metrics[f"harmful_{RATE_NAMES[row.outcome]}_orthogonalized"] = float(row.rate)
        metrics[f"harmful_{RATE_NAMES[row.outcome]}_orthogonalized_ci"] = [float(row.ci_low), float(row.ci_high)]
    return r_orth, metrics


def direction_study(model, harmful, harmless, borderline=None, study: DirectionStudy = DirectionStudy(), *,
                    probes=None, break_band: tuple[int, int] | None = None, jailbroken=None, judge=None,
                    progress: bool = False) -> DirectionsStageResult:
    """Select, intervene, measure, tie to the paper: the directions stage on given prompts.

    ``probes`` (a ProbeResult) and ``jailbroken`` prompts add the geometry, ``break_band`` (first, last block
    of the patching break band) the band ablation. ``judge`` judges every reply (metric ``judge`` is its
    identity). The metrics hold the three rates of each set and condition with Wilson 95% CIs
    (``harmful_refusal_ablated``, ``harmful_refusal_ablated_ci``, ``harmful_compliance_ablated`` ...).
    """
    harmful, harmless = as_prompt_set(harmful, "harmful"), as_prompt_set(harmless, "harmless")
    judge = as_judge(judge, model)
    t0 = time.perf_counter()
    sel = select_refusal_direction(model, harmful, harmless, n_train=study.n_train, n_val=study.n_val,
                                   layers=study.layers, screen=study.screen, top_k=study.top_k,
                                   batch_size=study.batch_size, seed=study.seed, progress=progress,
                                   **{"on_empty": "best", **study.select})
    d = sel.direction
    h_eval, b_eval = _held_out(harmful, harmless, study)
    bl = None if borderline is None else as_prompt_set(borderline, "borderline")[: study.n_eval]
    eff = direction_effects(model, d, h_eval, b_eval, bl, coeff=sel.addition_coeff,
                            max_new_tokens=study.max_new_tokens, batch_size=min(study.batch_size, 16),
                            progress=progress, judge=judge)
    sweep = coefficient_sweep(model, d, PromptSet(list(h_eval[:32]) + list(b_eval[:32])),
                              batch_size=study.batch_size)
    metrics: dict[str, Any] = {
        "layer": d.layer, "position": d.position, "relative_depth": d.layer / model.n_layers,
        "addition_coeff": sel.addition_coeff, "n_candidates": int(sel.reason.size),
        "filters_passed": bool(d.meta.get("filters_passed", True)), "filters": sel.filter_counts(),
        **{f"val_{k}": v for k, v in d.meta["scores"].items()}, "judge": judge.identity,
        **eff.metrics(), "n_eval_harmful": len(h_eval), "n_eval_harmless": len(b_eval),
        "selection_s": sel.timings.get("total_s"), "s_per_candidate": sel.timings.get("s_per_candidate")}
    result = DirectionsStageResult(selection=sel, effects=eff, sweep=sweep, logit_lens=direction_logit_lens(model, d))
    if study.check_orthogonalized:
        result.orthogonalized, orth_metrics = _orthogonalized(model, d, h_eval, study, judge, progress)
        metrics.update(orth_metrics)
    if jailbroken is not None or probes is not None:
        groups = {"harmless": b_eval, "harmful": h_eval}
        if jailbroken is not None:
            groups["jailbroken"] = as_prompt_set(jailbroken, "jailbreak")
        result.geometry = direction_geometry(model, d, groups, probes=probes)
    if break_band is not None:
        result.band = band_ablation(model, d, h_eval, break_band)
        metrics["band_refusal_fraction"] = dict(zip(result.band["condition"], result.band["refusal_fraction"]))
    metrics["stage_s"] = time.perf_counter() - t0
    result.metrics = store.jsonable(metrics)
    result.figures = {name: figure_png(obj.plot()) for name, obj in (
        ("direction_selection", sel), ("direction_effects", eff), ("direction_sweep", sweep),
        ("direction_geometry", result.geometry)) if obj is not None}
    return result


def break_band(results: dict[str, StageResult]) -> tuple[int, int] | None:
    """(first, last) break layer of the residual-stream patching sweeps, if the patching stage found any."""
    patching = results.get("patching")
    if patching is None or patching.skipped:
        return None
    ends = [int(v) for r in (patching.denoise, patching.noise) for v, c in
            zip(r.break_layers()["break_layer"], r.break_layers()["component"]) if c == "resid_pre" and v == v]
    return (min(ends), max(ends)) if ends else None


def direction_probes(ctx):
    """Linear (SVM) probes harmbench vs harmless, refit on all prompts: their normals are compared with the
    refusal direction layer by layer (the geometry figure)."""
    two = Residuals.concat([ctx.residuals("harmless"), ctx.residuals("harmbench")])
    return probe_layers(two, classifier="svm", cv=3, seed=ctx.config.seed, controls=False, progress=False,
                        positive="harmful", task="2-way", n_permutations=0)


class DirectionsStage(Stage):
    name = "directions"
    needs = ("capture", "patching")
    reads = ("directions", "quick", "max_new_tokens", "batch_size", "seed", "judge", "n_eval", "jailbreaks")
    judged = True
    result = DirectionsStageResult

    def run(self, ctx) -> DirectionsStageResult:
        if not ctx.config.directions:
            return DirectionsStageResult.skip("The refusal-direction stage was not run (it adds several minutes on "
                                              "a CPU); run with --directions to add it.")
        if not ctx.aligned:
            return DirectionsStageResult.skip("The refusal direction is selected from refusal behaviour, which a "
                                              "base model lacks.")
        quick, cfg = ctx.config.quick, ctx.config
        sets = {k: load_prompts(k) for k in ("harmbench", "harmless", "borderline")}  # splits need the full sets
        study = DirectionStudy(n_train=32 if quick else 128, n_val=8 if quick else 32, n_eval=8 if quick else 32,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                               layers=range(0, ctx.model.n_layers, 4) if quick else None,
                               screen=4 if quick else 8, top_k=4 if quick else 8, check_orthogonalized=not quick)
        try:
            result = direction_study(ctx.model, sets["harmbench"], sets["harmless"], sets["borderline"], study,
                                     probes=direction_probes(ctx), break_band=break_band(ctx.results),
                                     jailbroken=ctx.jailbroken(), judge=ctx.judge(), progress=ctx.progress)
        except InputError as e:  # e.g. too few prompts refused / answered to select a direction
            return DirectionsStageResult.skip(f"The refusal direction could not be selected on this model: {e}")
        # the direction itself, for ls.RefusalDirection.load / lens-safety orthogonalize --direction
        result.selection.direction.save(ctx.out / "refusal_direction")
        return result

    def metrics(self, result: DirectionsStageResult) -> dict[str, Any]:
        return {} if result.skipped else result.metrics

    def headline_keys(self) -> tuple[str, ...]:
        return ("direction_layer", "direction_harmful_refusal", "direction")

    def headline(self, result: DirectionsStageResult) -> dict[str, Any]:
        m = result.metrics
        if result.skipped or not m:
            return {}
        return {"direction_layer": m.get("layer"),
                "direction_harmful_refusal": {k: m.get(f"harmful_refusal_{k}") for k in ("plain", "ablated")},
                "direction": {k: m.get(k) for k in HEADLINE_KEYS}}

    def verdicts(self, result: DirectionsStageResult, run) -> dict[str, Any]:
        return {"direction": verdict_direction(result.metrics)}

    def tables(self, result: DirectionsStageResult) -> dict[str, Any]:
        if result.skipped:
            return {}
        t = {"direction_candidates": result.selection.to_frame(), "direction_effects": result.effects.to_frame(),
             "direction_sweep": result.sweep.to_frame(), "direction_logit_lens": result.logit_lens}
        if result.geometry is not None:
            t["direction_geometry"] = result.geometry.to_frame()
        if result.band is not None:
            t["direction_band"] = result.band
        return t

    def section(self, result: DirectionsStageResult, doc, run) -> None:
        doc.heading("The refusal direction", anchor="directions")
        doc.claim("Arditi et al. (2024): refusal is mediated by one direction in the residual stream; ablating it "
                  "removes refusal, adding it makes harmless requests refused. Where does it sit relative to the "
                  "break band of claim 3?")
        if result.skipped:
            doc.paragraph(result.skipped, css="note")
            return
        dm = result.metrics
        doc.paragraph(f"Direction at layer {fmt(dm.get('layer'))}, template position {fmt(dm.get('position'))}; "
                      f"harmful refusal {fmt(dm.get('harmful_refusal_plain'))} plain vs "
                      f"{fmt(dm.get('harmful_refusal_ablated'))} ablated; harmless refusal "
                      f"{fmt(dm.get('harmless_refusal_plain'))} plain vs {fmt(dm.get('harmless_refusal_added'))} "
                      f"with the direction added (x{fmt(dm.get('addition_coeff'))}); harmless next-token KL under "
                      f"ablation {fmt(dm.get('harmless_kl_ablated'))}; orthogonalised weights: harmful refusal "
                      f"{fmt(dm.get('harmful_refusal_orthogonalized'))}, first-token scores within "
                      f"{fmt(dm.get('orthogonalized_max_score_diff'))} of the hooks. Candidates: "
                      f"{fmt(dm.get('n_candidates'))}, {fmt(dm.get('s_per_candidate'))} s each. Refusal rate = "
                      f"replies judged refused by the judge {dm.get('judge', run.cfg.judge)!r} (unengaged replies "
                      f"are not refusals); with the direction ablated, harmful compliance "
                      f"{fmt(dm.get('harmful_compliance_ablated'))} and unengaged "
                      f"{fmt(dm.get('harmful_unengaged_ablated'))}. Wilson 95% CIs and n in the table below.")
        if "direction" in run.verdicts:
            doc.verdict(run.verdicts["direction"]["status"], verdict_text(run.verdicts["direction"]))
        band = dm.get("band_refusal_fraction")
        if band:
            doc.paragraph("Ablating the direction only inside vs outside the patching break band (fraction of "
                          "harmful prompts still refused at the first token): "
                          + "; ".join(f"{k} {fmt(v)}" for k, v in band.items()) + ".")
        for name, png in result.figures.items():
            doc.image(png, name.replace("_", " ") + ".")
        doc.table(result.effects.to_frame(), "Refusal (ci_low-ci_high), compliance and unengaged rates with Wilson "
                  "95% CIs, the direction ablated or added (held-out prompts).")


HEADLINE_KEYS = (
    "layer", "position", "addition_coeff", "filters_passed", "n_candidates", "harmful_refusal_plain",
    "harmful_refusal_ablated", "harmful_refusal_orthogonalized", "orthogonalized_max_score_diff",
    "harmless_refusal_plain", "harmless_refusal_added", "harmless_refusal_ablated", "harmless_kl_ablated",
    "borderline_refusal_plain", "borderline_refusal_added", "n_eval_harmful", "n_eval_harmless",
    "s_per_candidate", "selection_s", "judge", "harmful_refusal_plain_ci", "harmful_refusal_ablated_ci",
    "harmful_compliance_ablated", "harmful_compliance_ablated_ci", "harmful_unengaged_ablated",
    "harmful_unengaged_ablated_ci", "harmless_refusal_plain_ci", "harmless_refusal_added_ci",
    "harmless_kl_ablated_ci", "borderline_refusal_plain_ci", "borderline_refusal_added_ci")

STAGE = DirectionsStage()
