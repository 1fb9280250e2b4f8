"""Stage ``lens`` (claim 2): the logit lens over harmless, harmful and jailbreak prompts, refusal emergence,
and how meaningful each layer's readout is (KL on held-out prompts; the tuned lens beside it with
``--tuned-lens``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...analyses.figures import (
    category_mass_figure,
    lens_heatmap,
    lens_kl_figure,
    lens_topk_view,
    lens_trajectory_view,
)
from ...analyses.lens.logit import logit_lens
from ...analyses.lens.tuned import (
    check_held_out,
    default_training_prompts,
    held_out_prompts,
    lens_kl,
    train_tuned_lens,
)
from ...capture import Residuals, collect_residuals
from ..readme import fmt
from ..stage import Stage, StageResult, figure_png
from ..verdicts import verdict_claim2, verdict_text

LABELS = ("harmless", "harmful", "jailbreak")


@dataclass
class LensStageResult(StageResult):
    lens: Any = None  # LensResult over harmless + harmful + jailbreak prompts
    kl: Any = None  # DataFrame: KL(final || readout) per lens and layer, held-out prompts
    tuned: Any = None  # LensResult with the tuned lens (--tuned-lens), else None
    emergence: dict[str, Any] = field(default_factory=dict)
    emergence_tuned: dict[str, Any] | None = None


def _labels(result) -> list[str]:
    labels = result.labels
    return labels() if callable(labels) else list(labels)


def readout_quality(ctx, acts):
    """KL(final || layer readout) per layer on held-out prompts (from splits the tuned lens never trains on,
    whatever the seed), for the logit lens and, with ``tuned_lens``, the tuned lens. Returns (KL frame, the
    tuned lens's LensResult on ``acts`` or None)."""
    import pandas as pd

    n = 8 if ctx.config.quick else 16  # per class (harmful, harmless): 2n held-out prompts
    train, held_ps = default_training_prompts(), held_out_prompts(n, seed=ctx.config.seed)
    check_held_out(train, held_ps)
    held = collect_residuals(ctx.model, held_ps, batch_size=ctx.config.batch_size, progress=ctx.progress)
    frames, tuned = [lens_kl(ctx.model, held)], None
    if ctx.config.tuned_lens:
        tuned_lens = train_tuned_lens(ctx.model, train, progress=ctx.progress)
        frames.append(lens_kl(ctx.model, held, lens=tuned_lens))
        tuned = logit_lens(ctx.model, acts, top_k=5, lens=tuned_lens)
    return pd.concat(frames, ignore_index=True), tuned


class LensStage(Stage):
    name = "lens"
    needs = ("capture",)
    reads = ("batch_size", "n_eval", "seed", "jailbreaks", "quick", "tuned_lens")
    result = LensStageResult
    claims = {"claim2": "claim 2"}

    def run(self, ctx) -> LensStageResult:
        from tqdm.auto import tqdm

        acts = Residuals.concat([ctx.residuals(k) for k in ("harmless", "harmbench", "jailbreak")])
        bar = tqdm(total=3, desc="logit lens", unit="step", disable=not ctx.progress)
        lens = logit_lens(ctx.model, acts, top_k=5)
        bar.update()
        first_harmful = _labels(lens).index("harmful")
        figures = {"lens_category_mass": figure_png(category_mass_figure(lens)),
                   "lens_heatmap_harmful": figure_png(lens_heatmap(lens, prompt=first_harmful)),
                   "lens_heatmap_harmless": figure_png(lens_heatmap(lens, prompt=0))}
        bar.update()
        kl, tuned = readout_quality(ctx, acts)
        figures["lens_kl"] = figure_png(lens_kl_figure(kl))
        bar.update()
        bar.close()
        return LensStageResult(lens=lens, kl=kl, tuned=tuned, figures=figures,
                               emergence={lab: lens.emergence_layer(lab) for lab in LABELS},
                               emergence_tuned=None if tuned is None else
                               {lab: tuned.emergence_layer(lab) for lab in LABELS})

    def metrics(self, result: LensStageResult) -> dict[str, Any]:
        m: dict[str, Any] = {"emergence_layer": result.emergence}
        if result.emergence_tuned is not None:
            m["emergence_layer_tuned"] = result.emergence_tuned
        m["lens_kl"] = {str(name): {int(r["layer"]): float(r["kl"]) for _, r in g.iterrows()}
                        for name, g in result.kl.groupby("lens", sort=False)}
        return m

    def headline_keys(self) -> tuple[str, ...]:
        return ("emergence_layer", "emergence_layer_tuned")

    def headline(self, result: LensStageResult) -> dict[str, Any]:
        return {"emergence_layer": result.emergence, "emergence_layer_tuned": result.emergence_tuned}

    def verdicts(self, result: LensStageResult, run) -> dict[str, Any]:
        mass = result.lens.category_mass(by="label")
        return {"claim2": verdict_claim2(mass, result.emergence, n_layers=run.n_layers)}

    def tables(self, result: LensStageResult) -> dict[str, Any]:
        lens = result.lens
        t = {"lens_category_mass": lens.category_mass(by="label"), "lens_consistency": lens.consistency(by="label"),
             "lens_top1_category": lens.top1_category(by="label"), "lens_kl": result.kl}
        if result.tuned is not None:
            t["lens_category_mass_tuned"] = result.tuned.category_mass(by="label")
        return t

    def views(self, result: LensStageResult) -> list[tuple[Any, str]]:
        labels = _labels(result.lens)
        shown = [0, labels.index("harmful"), labels.index("jailbreak")]
        views = [(lens_topk_view(result.lens, shown), "Top-5 lens tokens per layer for a harmless, a harmful and a "
                  "jailbreak prompt (interactive; choose 'topk' in the view's filter).")]
        views += [(lens_trajectory_view(result.lens, i), "Top-1 lens token per layer, coloured by refusal minus "
                   f"affirmation mass (red = refusal): {labels[i]} prompt.") for i in shown[1:]]
        return views

    def section(self, result: LensStageResult, doc, run) -> None:
        vd, fig, h = run.verdicts, result.figures, run.headline
        doc.heading("Claim 2: alignment ties recognition to refusal 'emotion' in the middle layers", anchor="lens")
        doc.claim("Paper: decoding each layer with the logit lens shows refusal/negative tokens emerging in the "
                  "middle layers for harmful prompts, and positive tokens for harmless ones.",
                  "emergence layer (refusal mass > affirmation mass): "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in (h["emergence_layer"] or {}).items()))
        doc.verdict(vd["claim2"]["status"], verdict_text(vd["claim2"]))
        doc.image(fig["lens_kl"], "How meaningful each layer's readout is: KL(final distribution || layer "
                  "readout) on held-out prompts, per lens (95% CI). Where the KL is large, lens tokens say little "
                  "about what the model will output.")
        doc.table(result.kl, "KL per layer and lens (nats; tables/lens_kl.csv).", collapsed=True)
        if result.emergence_tuned:
            doc.paragraph("With the tuned lens, refusal emerges at: " + ", ".join(
                f"{k} {fmt(v)}" for k, v in result.emergence_tuned.items()) + ".")
        doc.image(fig["lens_category_mass"], "Lexicon category mass per layer and set (95% CI).")
        doc.image(fig["lens_heatmap_harmful"], "Logit lens top-5 tokens per layer: a harmful prompt.")
        doc.image(fig["lens_heatmap_harmless"], "Logit lens top-5 tokens per layer: a harmless prompt.")
        cons = result.lens.consistency(by="label")
        doc.table(cons, "Top-K Intermediate Consistency per set and layer.",
                  columns=[c for c in ("label", "layer", "consistency", "token", "category") if c in cons.columns],
                  max_rows=30)
        for view, caption in self.views(result):
            doc.view(view, caption)


STAGE = LensStage()
