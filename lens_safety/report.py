"""The paper end to end: :func:`run_pipeline` and the self-contained HTML report.

Stages: prompts → refusal + attack success → effective pairs → capture → probes → logit
lens → grafting → patching → report. Each stage persists its tables (CSV), figures (PNG),
views and metrics under ``OUT/stages/<stage>/`` with a key; a rerun with the same key
reuses them, and the heavy inputs (residuals, generations) are cached by their own
modules, so an interrupted run resumes where it stopped.

>>> result = run_pipeline(quick=True)   # doctest: +SKIP
>>> result.metrics["probes"]["first_layer_095"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["RunResult", "run_pipeline", "DEFAULT_JAILBREAKS"]

STAGE_SCHEMA = 2  # bump when a stage's outputs change, so old stage caches are rebuilt
DEFAULT_JAILBREAKS = ("prefix_injection", "refusal_suppression", "few_shot", "nested_fiction", "past_tense")


@dataclass
class StageOutput:
    """What a stage leaves for the report: metrics, tables, figures, views, notes."""

    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)  # name -> pandas.DataFrame
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes
    views: list[dict[str, Any]] = field(default_factory=list)  # {"element", "props", "caption"}
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def add_figure(self, name: str, fig) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.figures[name] = buf.getvalue()

    def add_view(self, view, caption: str = "") -> None:
        """Keep a :class:`~lens_safety.htmlreport.OfflineView` (as element + props) for the report."""
        self.views.append({"element": view.element, "props": _jsonable(view.props), "caption": caption})

    # persistence: one folder per stage
    def save(self, folder: Path, key: str) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "tables").mkdir(parents=True)
        (tmp / "figures").mkdir()
        for name, frame in self.tables.items():
            frame.to_csv(tmp / "tables" / f"{name}.csv", index=False)
        for name, png in self.figures.items():
            (tmp / "figures" / f"{name}.png").write_bytes(png)
        (tmp / "stage.json").write_text(json.dumps({
            "schema": STAGE_SCHEMA, "key": key, "metrics": _jsonable(self.metrics), "views": self.views,
            "notes": self.notes, "skipped": self.skipped, "tables": list(self.tables),
            "figures": list(self.figures)}, indent=1, ensure_ascii=False))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path, key: str) -> StageOutput | None:
        import pandas as pd

        try:
            meta = json.loads((folder / "stage.json").read_text())
            if meta.get("schema") != STAGE_SCHEMA or meta.get("key") != key:
                return None
            tables = {n: pd.read_csv(folder / "tables" / f"{n}.csv") for n in meta["tables"]}
            figures = {n: (folder / "figures" / f"{n}.png").read_bytes() for n in meta["figures"]}
        except (OSError, ValueError, KeyError):
            return None
        return cls(meta["metrics"], tables, figures, meta["views"], meta["notes"], meta["skipped"])


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and v != v:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


@dataclass
class RunResult:
    """Where a run wrote its outputs, and its headline numbers."""

    out: Path
    metrics: dict[str, Any]
    stages: dict[str, StageOutput]
    seconds: float

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"

    def summary(self) -> str:
        lines = [f"lens-safety run finished in {self.seconds:.0f} s", f"report:  {self.report_path}",
                 f"metrics: {self.out / 'metrics.json'}"]
        for k, v in _flatten(self.metrics.get("headline", {})).items():
            lines.append(f"  {k}: {v}")
        return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Runner:
    """Runs stages with per-stage caching and a progress line per stage."""

    def __init__(self, out: Path, base_key: dict[str, Any], progress: bool) -> None:
        self.out = out
        self.base_key = base_key
        self.progress = progress
        self.outputs: dict[str, StageOutput] = {}

    def stage(self, name: str, fn: Callable[[], StageOutput], **key: Any) -> StageOutput:
        full_key = hashlib.sha256(json.dumps({"stage": name, **self.base_key, **_jsonable(key)},
                                             sort_keys=True).encode()).hexdigest()
        folder = self.out / "stages" / name
        cached = StageOutput.load(folder, full_key)
        t0 = time.perf_counter()
        if cached is not None:
            result = cached
            status = "cached"
        else:
            if self.progress:
                print(f"[lens-safety] {name} ...", flush=True)
            result = fn()
            # metrics as JSON will give them back (string keys...), so fresh and cached runs agree
            result.metrics = json.loads(json.dumps(_jsonable(result.metrics)))
            result.save(folder, full_key)
            status = "done"
        if self.progress:
            print(f"[lens-safety] {name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
        self.outputs[name] = result
        return result


def _check_out(out: str | os.PathLike) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"Cannot write to the output folder {str(path)!r} ({e.strerror}); "
                         "pass --out with a writable folder.") from e
    return path


# -- the pipeline -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config:
    n: int | None
    n_eval: int
    jailbreaks: tuple[str, ...]
    max_new_tokens: int
    batch_size: int
    seed: int
    n_pairs: int
    graft_layers: int
    n_graft: int
    quick: bool


def _config(quick: bool, n: int | None, jailbreaks, batch_size: int, seed: int) -> _Config:
    from .jailbreaks import jailbreak_methods

    known = [m.name for m in jailbreak_methods()]
    chosen = tuple(jailbreaks) if jailbreaks else DEFAULT_JAILBREAKS
    if len(chosen) == 1 and chosen[0] == "all":
        chosen = tuple(known)
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise InputError(f"Unknown jailbreak method(s) {unknown}; known: {', '.join(known)}.")
    if n is not None and n < 4:
        raise InputError(f"--n must be at least 4 (two CV folds need two prompts per class), got {n}.")
    if quick:
        n = 24 if n is None else n
        return _Config(n, min(n, 16), chosen, 24, batch_size, seed, n_pairs=4, graft_layers=4, n_graft=6,
                       quick=True)
    # Full run: balanced classes of up to 200 prompts for capture and probes (HarmBench has 200);
    # 24 prompts per set for generation, the costly part on a CPU (refusal, ASR, pairs, grafting).
    return _Config(n, 24 if n is None else min(n, 24), chosen, 24, batch_size, seed, n_pairs=8,
                   graft_layers=6, n_graft=12, quick=False)


DEFAULT_N = 200  # per set, when --n is not given: balanced harmful / harmless classes


def _sets(cfg: _Config):
    from .prompts import load_prompts

    sets = {name: load_prompts(name) for name in ("harmbench", "harmless", "borderline")}
    if cfg.n is not None:
        for name, ps in sets.items():
            if cfg.n > len(ps):
                raise InputError(f"--n {cfg.n} is larger than the {name!r} set ({len(ps)} prompts); "
                                 f"use --n {min(len(p) for p in sets.values())} or less.")
    n = cfg.n or DEFAULT_N
    return {name: ps.sample(min(n, len(ps)), seed=cfg.seed) for name, ps in sets.items()}


def run_pipeline(model: Any = None, out: str | os.PathLike = "lens_safety_out", *, quick: bool = False,
                 jailbreaks: Any = None, n: int | None = None, batch_size: int = 16, seed: int = 0,
                 progress: bool = True) -> RunResult:
    """Run the whole study on one model and write ``report.html``, ``metrics.json``, CSVs and PNGs.

    ``model`` is a :class:`~lens_safety.models.SafetyModel` or a name for
    :func:`~lens_safety.models.load_model` (default: the embedded Qwen2.5-Coder-0.5B-Instruct).
    ``quick`` uses small subsets (a few minutes on 2 cores); ``n`` caps every prompt set.
    Base models (no chat alignment) run the probe and lens stages on raw prompts and skip
    the stages that need refusal behaviour, with a note.
    """
    from .models import SafetyModel, load_model

    t0 = time.perf_counter()
    out_dir = _check_out(out)
    cfg = _config(quick, n, jailbreaks, batch_size, seed)
    sets = _sets(cfg)  # validates --n before the model loads
    if not isinstance(model, SafetyModel):
        if progress:
            print(f"[lens-safety] loading {model or 'the default model'} ...", flush=True)
        model = load_model(model)
    runner = _Runner(out_dir, {"weights": model.weights_hash, "config": cfg.__dict__,
                               "prompts": {k: v.hash() for k, v in sets.items()}}, progress)
    ctx = _Context(model, cfg, sets, runner)
    runner.stage("prompts", ctx.stage_prompts)
    runner.stage("refusal", ctx.stage_refusal)
    runner.stage("pairs", ctx.stage_pairs)
    runner.stage("capture", ctx.stage_capture)
    runner.stage("probes", ctx.stage_probes)
    runner.stage("lens", ctx.stage_lens)
    runner.stage("graft", ctx.stage_graft)
    runner.stage("patching", ctx.stage_patching)
    metrics = _headline(model, cfg, runner.outputs)
    _write_outputs(out_dir, model, cfg, runner.outputs, metrics)
    return RunResult(out_dir, metrics, runner.outputs, time.perf_counter() - t0)


class _Context:
    """The stages of one run; each returns a :class:`StageOutput`."""

    def __init__(self, model, cfg: _Config, sets, runner: _Runner) -> None:
        self.model, self.cfg, self.sets, self.runner = model, cfg, sets, runner
        self.aligned = bool(model.chat_default and model.aligned is not False)
        self.progress = runner.progress

    # shared inputs (cached by their own modules, so calling twice is cheap)
    def eval_sets(self):
        n = self.cfg.n_eval
        return {k: v.sample(min(n, len(v)), seed=self.cfg.seed) for k, v in self.sets.items()}

    def jailbroken(self):
        from .jailbreaks import jailbreak
        from .prompts import PromptSet

        harmful = self.eval_sets()["harmbench"]
        parts = [jailbreak(harmful, m, seed=self.cfg.seed) for m in self.cfg.jailbreaks]
        return PromptSet([p for part in parts for p in part], name="jailbreak")

    def refusal(self, prompts):
        from .refusal import evaluate_refusal

        return evaluate_refusal(self.model, prompts, max_new_tokens=self.cfg.max_new_tokens,
                                batch_size=self.cfg.batch_size, progress=self.progress)

    def residuals(self, name: str):
        from .activations import collect_residuals

        prompts = self.jailbroken() if name == "jailbreak" else self.sets[name]
        bs = max(1, self.cfg.batch_size // 2) if name == "jailbreak" else self.cfg.batch_size
        return collect_residuals(self.model, prompts, batch_size=bs, progress=self.progress)

    def pairs(self):
        from .refusal import jailbreak_pairs

        return jailbreak_pairs(self.model, self.eval_sets()["harmbench"], methods=self.cfg.jailbreaks,
                               max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.batch_size,
                               seed=self.cfg.seed, progress=self.progress)

    # stages
    def stage_prompts(self) -> StageOutput:
        import pandas as pd

        from .jailbreaks import jailbreak_methods
        from .prompts import length_report

        o = StageOutput()
        rows = []
        for name, ps in self.sets.items():
            first = ps[0]
            rows.append({"set": name, "n": len(ps), "label": first.label, "source": first.source,
                         "licence": first.licence})
        jb = self.jailbroken()
        rows.append({"set": "jailbreak", "n": len(jb), "label": "jailbreak",
                     "source": "lens_safety jailbreak catalogue (see methods)", "licence": "see methods"})
        o.tables["prompt_sets"] = pd.DataFrame(rows)
        o.tables["lengths"] = length_report(*self.sets.values(), jb).rename_axis("set").reset_index()
        methods = jailbreak_methods().to_frame()
        o.tables["jailbreak_methods"] = methods[methods["name"].isin(self.cfg.jailbreaks)]
        o.metrics = {"n": {r["set"]: r["n"] for r in rows}}
        return o

    def stage_refusal(self) -> StageOutput:
        import pandas as pd

        o = StageOutput()
        if not self.aligned:
            o.skipped = (f"{self.model.name} is not a chat-aligned model: refusal rates and attack success "
                         "are not meaningful, so this stage was skipped.")
            return o
        ev = self.eval_sets()
        results = {name: self.refusal(ps) for name, ps in ev.items()}
        # Jailbreaks wrap only the requests refused when plain (what ASR is measured on); the
        # same call gives the effective pairs, so the pairs stage reuses its cached generations.
        pairs = self.pairs()
        asr = pairs.asr
        rates = pd.DataFrame([{"set": k, "n": len(r.refused), "refusal_rate": r.refusal_rate,
                               "score_judge_agreement": r.agreement} for k, r in results.items()])
        o.tables["refusal_rates"] = rates
        o.tables["attack_success"] = asr
        o.tables["refusal_examples"] = results["harmbench"].to_frame().head(8)
        o.metrics = {"refusal_rate": {k: r.refusal_rate for k, r in results.items()},
                     "agreement": {k: r.agreement for k, r in results.items()},
                     "asr": {str(r["method"]): r["asr"] for _, r in asr.iterrows()}}
        o.add_figure("refusal_scores", results["harmbench"].plot())
        return o

    def stage_pairs(self) -> StageOutput:
        o = StageOutput()
        if not self.aligned:
            o.skipped = "No refusal behaviour on a base model, so no effective jailbreak pairs."
            return o
        pairs = self.pairs()
        frame = pairs.to_frame()
        o.tables["pairs"] = frame
        o.metrics = {"n_pairs": len(pairs),
                     "by_method": frame["method"].value_counts().to_dict() if len(pairs) else {}}
        return o

    def stage_capture(self) -> StageOutput:
        import pandas as pd

        o = StageOutput()
        rows = []
        for name in ("harmless", "harmbench", "jailbreak"):
            acts = self.residuals(name)
            rows.append({"set": name, "n": len(acts), "layers": acts.n_layers + 1, "d_model": acts.d_model,
                         "mean_tokens": float(acts.n_tokens.float().mean())})
        o.tables["capture"] = pd.DataFrame(rows)
        o.metrics = {"sets": {r["set"]: r["n"] for r in rows}}
        return o

    def stage_probes(self) -> StageOutput:
        import matplotlib.pyplot as plt

        from .activations import Residuals
        from .probes import probe_layers, probe_transfer

        o = StageOutput()
        harmless, harmful, jb = (self.residuals(k) for k in ("harmless", "harmbench", "jailbreak"))
        two = Residuals.concat([harmless, harmful])
        p2 = probe_layers(two, classifier="svm", cv=5, seed=self.cfg.seed, progress=False, task="2-way")
        three = Residuals.concat([harmless, harmful, jb])
        p3 = probe_layers(three, classifier="svm", cv=5, seed=self.cfg.seed, progress=False, controls=False,
                          task="3-way")
        transfer = probe_transfer(two, jb, positive="harmful", negative="harmless")
        o.tables["probes_2way"] = p2.to_frame()
        o.tables["probes_3way"] = p3.to_frame()
        o.tables["probes_transfer"] = transfer.to_frame()
        fig = p2.plot()
        o.add_figure("probes_2way", fig if hasattr(fig, "savefig") else fig.figure)
        fig3 = p3.plot()
        o.add_figure("probes_3way", fig3 if hasattr(fig3, "savefig") else fig3.figure)
        tf = transfer.plot()
        o.add_figure("probes_transfer", tf if hasattr(tf, "savefig") else tf.figure)
        plt.close("all")
        first = p2.first_layer_above(0.95)
        first3 = p3.first_layer_above(0.95)
        rates = transfer.to_frame()
        o.metrics = {
            "first_layer_095": None if first is None else first._asdict(),
            "first_layer_095_3way": None if first3 is None else first3._asdict(),
            "layer0_accuracy": float(p2.to_frame()["accuracy"].iloc[0]),
            "best": p2.best_layer()._asdict(),
            "transfer_harmful_rate": {int(r["layer"]): float(r["positive_rate"]) for _, r in rates.iterrows()},
        }
        return o

    def stage_lens(self) -> StageOutput:
        from .activations import Residuals
        from .lens import logit_lens
        from .viz import category_mass_figure, lens_heatmap, lens_topk_view, lens_trajectory_view

        o = StageOutput()
        acts = Residuals.concat([self.residuals(k) for k in ("harmless", "harmbench", "jailbreak")])
        lens = logit_lens(self.model, acts, top_k=5)
        o.tables["lens_category_mass"] = lens.category_mass(by="label")
        o.tables["lens_consistency"] = lens.consistency(by="label")
        o.tables["lens_top1_category"] = lens.top1_category(by="label")
        emergence = {label: lens.emergence_layer(label) for label in ("harmless", "harmful", "jailbreak")}
        o.metrics = {"emergence_layer": emergence}
        o.add_figure("lens_category_mass", category_mass_figure(lens))
        first_harmful = acts.labels.index("harmful")
        o.add_figure("lens_heatmap_harmful", lens_heatmap(lens, prompt=first_harmful))
        o.add_figure("lens_heatmap_harmless", lens_heatmap(lens, prompt=0))
        shown = [0, first_harmful, acts.labels.index("jailbreak")]
        o.add_view(lens_topk_view(lens, shown), "Top-5 lens tokens per layer for a harmless, a harmful and a "
                   "jailbreak prompt (interactive; choose 'topk' in the view's filter).")
        for i in shown[1:]:
            o.add_view(lens_trajectory_view(lens, i), f"Top-1 lens token per layer, coloured by refusal minus "
                       f"affirmation mass (red = refusal): {acts.labels[i]} prompt.")
        return o

    def stage_graft(self) -> StageOutput:
        from .lens import graft

        o = StageOutput()
        if not self.aligned:
            o.skipped = "Grafting measures the loss of refusal; a base model does not refuse."
            return o
        # Graft where there is a refusal to remove: harmful requests the model refuses when plain.
        plain = self.refusal(self.eval_sets()["harmbench"])
        refused = plain.subset(plain.refused).prompts
        if len(refused) == 0:
            o.skipped = "The model refused none of the sampled harmful requests, so there is nothing to graft."
            return o
        refused = refused[: self.cfg.n_graft]
        n_layers = self.model.n_layers
        step = max(1, n_layers // self.cfg.graft_layers)
        layers = list(range(step, n_layers + 1, step))
        result = graft(self.model, refused, self.residuals("harmless"), layers=layers, max_new_tokens=16,
                       batch_size=self.cfg.batch_size, donor_label="harmless")
        o.tables["graft"] = result.to_frame()
        o.metrics = {"best_layer": result.best_layer(), "n_prompts": len(refused),
                     "max_complied": int(result.to_frame()["n_complied"].max())}
        fig = result.plot()
        o.add_figure("graft", fig if hasattr(fig, "savefig") else fig.figure)
        return o

    def stage_patching(self) -> StageOutput:
        import pandas as pd

        from .patching import patch_layers

        o = StageOutput()
        if not self.aligned:
            o.skipped = "Patching needs effective jailbreak pairs, which a base model cannot give."
            return o
        pairs = self.pairs()
        if len(pairs) == 0:
            o.skipped = ("No effective pairs: the model refused none of the sampled requests, or no jailbreak "
                         "worked on them. Use more prompts (--n) or other --jailbreaks.")
            return o
        chosen = _round_robin(pairs, self.cfg.n_pairs)
        frames = []
        for direction in ("denoise", "noise"):
            res = patch_layers(self.model, chosen, direction=direction, batch_size=self.cfg.batch_size * 2,
                               progress=self.progress)
            frames.append(res.break_layers())
            fig = res.plot()
            o.add_figure(f"patching_{direction}", fig if hasattr(fig, "savefig") else fig.figure)
            o.tables[f"patching_{direction}"] = res.to_frame()
        breaks = pd.concat(frames, ignore_index=True)
        o.tables["break_layers"] = breaks
        o.tables["patched_pairs"] = pd.DataFrame([{"method": p.method, "request": p.request} for p in chosen])
        o.metrics = {"n_pairs": len(chosen), "break_layers": {
            f"{r['component']}/{r['direction']}": (None if pd.isna(r["break_layer"]) else int(r["break_layer"]))
            for _, r in breaks.iterrows()}}
        return o


def _round_robin(pairs, n: int) -> list:
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


# -- outputs ------------------------------------------------------------------------------

def _headline(model, cfg: _Config, outputs: dict[str, StageOutput]) -> dict[str, Any]:
    m = {name: o.metrics for name, o in outputs.items()}
    probes, lens = m.get("probes", {}), m.get("lens", {})
    first = probes.get("first_layer_095")
    headline = {
        "model": model.name,
        "probe_first_layer_095": first["layer"] if first else None,
        "probe_first_layer_095_ci": [first["ci_low"], first["ci_high"]] if first else None,
        "probe_layer0_accuracy": probes.get("layer0_accuracy"),
        "emergence_layer": lens.get("emergence_layer"),
        "attack_success_rate": m.get("refusal", {}).get("asr"),
        "refusal_rate": m.get("refusal", {}).get("refusal_rate"),
        "n_effective_pairs": m.get("pairs", {}).get("n_pairs"),
        "break_layers": m.get("patching", {}).get("break_layers"),
        "graft_best_layer": m.get("graft", {}).get("best_layer"),
    }
    return {"headline": headline, "stages": m, "skipped": {k: o.skipped for k, o in outputs.items() if o.skipped},
            "config": cfg.__dict__, "provenance": dict(model.provenance, weights_hash=model.weights_hash)}


def _write_outputs(out: Path, model, cfg: _Config, outputs: dict[str, StageOutput], metrics: dict) -> None:
    (out / "tables").mkdir(exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    for stage in outputs.values():
        for name, frame in stage.tables.items():
            frame.to_csv(out / "tables" / f"{name}.csv", index=False)
        for name, png in stage.figures.items():
            (out / "figures" / f"{name}.png").write_bytes(png)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(_jsonable(metrics), indent=1, ensure_ascii=False))
    os.replace(tmp, out / "metrics.json")
    _build_html(model, cfg, outputs, metrics).save(out / "report.html")


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _build_html(model, cfg: _Config, outputs: dict[str, StageOutput], metrics: dict):
    from .htmlreport import HtmlDocument, OfflineView

    h = metrics["headline"]
    doc = HtmlDocument(f"lens_safety report: {model.name}")
    doc.paragraph("How a chat model recognises a harmful request, turns that recognition into a refusal, and "
                  "where a jailbreak breaks the chain: a reproduction and extension of Zhou et al., 'How "
                  "Alignment and Jailbreak Work: Explain LLM Safety through Intermediate Hidden States' "
                  "(EMNLP 2024 Findings).")

    doc.heading("Provenance", anchor="provenance")
    prov = metrics["provenance"]
    doc.bullets([f"{k}: {v}" for k, v in prov.items()] + [
        f"run: {'quick' if cfg.quick else 'full'}; prompts per set: {cfg.n or DEFAULT_N}; refusal/jailbreak "
        f"evaluation per set: {cfg.n_eval}; jailbreaks: {', '.join(cfg.jailbreaks)}; seed {cfg.seed}",
        "Layer convention: 0 = embedding output, l = raw residual stream after block l-1 (no final norm)."])
    prompts = outputs["prompts"]
    doc.table(prompts.tables["prompt_sets"], "Prompt sets, sources and licences.")
    doc.table(prompts.tables["jailbreak_methods"], "Jailbreak methods used, with their sources.")
    doc.table(prompts.tables["lengths"], "Prompt length (words) per set: harmless is matched to harmful in form.")

    doc.heading("Refusal and attack success", anchor="refusal")
    ref = outputs["refusal"]
    if ref.skipped:
        doc.paragraph(ref.skipped, css="note")
    else:
        doc.claim("An aligned model refuses clearly harmful requests; jailbreak wrappers make it comply.",
                  "refusal rate: " + ", ".join(f"{k} {_fmt(v)}" for k, v in h["refusal_rate"].items()))
        doc.table(ref.tables["refusal_rates"], "Refusal rate per set (substring judge on greedy replies) and "
                  "agreement of the first-token refusal score (score > 0) with the judge.")
        doc.table(ref.tables["attack_success"], "Attack success rate per jailbreak family: of the requests "
                  "refused when plain, the fraction the model complies with when wrapped.")
        for png in ref.figures.values():
            doc.image(png, "First-token refusal score: the largest refusal-start logit minus the largest other "
                      "logit at the last position (> 0 exactly when the greedy reply starts a refusal).")
        ex = ref.tables["refusal_examples"]
        cols = [c for c in ("text", "completion", "refused", "score") if c in ex.columns]
        doc.table(ex[cols], "Examples (prompt text escaped, completions truncated to the generation budget).")
    pairs = outputs["pairs"]
    if not pairs.skipped:
        doc.paragraph(f"Effective jailbreak pairs (plain refused, wrapped complied): {h['n_effective_pairs']}.")

    doc.heading("Claim 1: ethics is recognised in the early layers", anchor="probes")
    pr = outputs["probes"]
    first = pr.metrics.get("first_layer_095")
    doc.claim("Weak classifiers on each layer's last-position state separate harmful from harmless prompts "
              "within the first few layers; the embedding layer sits at chance (every prompt ends with the "
              "same template token).",
              f"first layer with 2-way SVM accuracy >= 0.95: {_fmt(first and first['layer'])} "
              f"(accuracy {_fmt(first and first['accuracy'], 3)}, 95% CI {_fmt(first and first['ci_low'], 3)}-"
              f"{_fmt(first and first['ci_high'], 3)}); layer 0 accuracy {_fmt(pr.metrics.get('layer0_accuracy'), 3)}")
    doc.image(pr.figures["probes_2way"], "2-way probe accuracy per layer (5-fold CV, 95% CI) with shuffled-label "
              "and length-only controls.")
    doc.table(pr.tables["probes_2way"], "2-way probes per layer.")
    doc.image(pr.figures["probes_3way"], "3-way probes: harmless vs harmful vs jailbreak.")
    doc.claim("Claim 3, early part: jailbreaks do not fool the early layers.",
              "fraction of jailbreak prompts the harmful-vs-harmless probe calls harmful, per layer (figure).")
    doc.image(pr.figures["probes_transfer"], "Probes trained on harmless vs harmful, applied to jailbreak prompts.")

    doc.heading("Claim 2: alignment ties recognition to refusal 'emotion' in the middle layers", anchor="lens")
    ln = outputs["lens"]
    doc.claim("Decoding each layer with the logit lens shows refusal/negative tokens emerging in the middle "
              "layers for harmful prompts, and positive tokens for harmless ones.",
              "emergence layer (refusal mass > affirmation mass): "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in (h["emergence_layer"] or {}).items()))
    doc.image(ln.figures["lens_category_mass"], "Lexicon category mass per layer and set (95% CI).")
    doc.image(ln.figures["lens_heatmap_harmful"], "Logit lens top-5 tokens per layer: a harmful prompt.")
    doc.image(ln.figures["lens_heatmap_harmless"], "Logit lens top-5 tokens per layer: a harmless prompt.")
    doc.table(ln.tables["lens_consistency"], "Top-K Intermediate Consistency per set and layer.", max_rows=30)
    for v in ln.views:
        doc.view(OfflineView(v["element"], v["props"]), v["caption"])

    doc.heading("Logit Grafting", anchor="graft")
    gr = outputs["graft"]
    if gr.skipped:
        doc.paragraph(gr.skipped, css="note")
    else:
        doc.claim("Replacing a harmful prompt's last-position state by the harmless mean at a middle layer "
                  "approximates a jailbreak.", f"layer with the largest refusal drop: {_fmt(h['graft_best_layer'])}")
        for png in gr.figures.values():
            doc.image(png, "Refusal score after grafting the harmless-mean state, per layer.")
        doc.table(gr.tables["graft"], "Grafting per layer.")

    doc.heading("Claim 3: where the jailbreak breaks the chain (activation patching)", anchor="patching")
    pa = outputs["patching"]
    if pa.skipped:
        doc.paragraph(pa.skipped, css="note")
    else:
        doc.claim("Patching the plain run's activations into the jailbroken run (denoise) restores refusal from "
                  "the break layer on; patching the jailbroken run's into the plain run (noise) removes it.",
                  "break layers: " + ", ".join(f"{k} {_fmt(v)}" for k, v in (h["break_layers"] or {}).items()))
        for name, png in pa.figures.items():
            doc.image(png, f"Mean normalised recovery per layer and component ({name.split('_')[-1]}).")
        doc.table(pa.tables["break_layers"], "Break layer (mean recovery first >= 0.5) with bootstrap CIs over pairs.")

    doc.heading("Limits of this run", anchor="limits")
    limits = [
        f"Small model ({model.name}) and modest sample sizes (evaluation n={cfg.n_eval} per set); CIs are wide.",
        "The refusal judge is a substring match; the first-token score is a proxy for the whole reply.",
        "Logit-lens readings of early layers are unreliable (the lens is trained for the last layer).",
        "Jailbreak templates are fixed; adaptive attacks (GCG optimisation, PAIR) are out of scope.",
    ] + [f"{k}: {v}" for k, v in metrics["skipped"].items()]
    doc.bullets(limits)
    return doc
