"""The runner of ``lens-safety run``: every registered stage in order, each cached by its key, its typed
result handed to later stages and to its verdicts; then ``metrics.json``, tables, figures and the report.

>>> result = run_pipeline(quick=True)   # doctest: +SKIP
>>> result.metrics["verdicts"]["claim1"]["status"]  # doctest: +SKIP
'not reproduced'

``render_report(OUT)`` re-renders the HTML from the cached stages without the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..behaviour.judges import judge_identity
from ..core.errors import CacheError, InputError
from ..core.store import jsonable, read_json, sha256_json, write_json_atomic
from ..model.loading import SafetyModel, load_model
from .config import JUDGES, RunConfig, make_config, sample_sets
from .html import build_html
from .stage import Context, RunInfo, Stage, StageResult, StaleStageError
from .stages import STAGES
from .verdicts import Verdict

__all__ = ["RunResult", "run_pipeline", "render_report", "Runner"]


@dataclass
class RunResult:
    """Where a run wrote its outputs, its headline numbers, and every stage's typed result."""

    out: Path
    metrics: dict[str, Any]
    stages: dict[str, StageResult]
    seconds: float

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"

    def summary(self) -> str:
        lines = [f"lens-safety run finished in {self.seconds:.0f} s", f"report:  {self.report_path}",
                 f"metrics: {self.out / 'metrics.json'}"]
        verdicts = self.metrics.get("verdicts", {})
        if verdicts:
            lines.append("verdicts:")
            lines += [f"  {k}: {v['status']} ({v['evidence']})" for k, v in verdicts.items()]
        lines.append("headline:")
        for k, v in _flatten(self.metrics.get("headline", {})).items():
            if v is not None and not k.startswith("break_layers."):  # break_layers_ci has them with CIs
                lines.append(f"  {k}: {round(v, 3) if isinstance(v, float) else v}")
        return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Runner:
    """Runs the registered stages with per-stage caching (``OUT/stages/<name>``) and a progress line each.

    A stage's key holds its name and version, the package version, the run's base key (model weights,
    prompt sets), the settings it reads, its extra key, the judges' identities when it judges, and the keys
    of the stages it needs: a change anywhere upstream recomputes it."""

    def __init__(self, model, cfg: RunConfig, sets, out: Path, *, progress: bool, stages=STAGES) -> None:
        self.model, self.cfg, self.sets, self.out, self.progress, self.stages = model, cfg, sets, out, progress, stages
        self.base_key = {"weights": model.weights_hash, "prompts": {k: v.hash() for k, v in sets.items()}}
        self.results: dict[str, StageResult] = {}
        self.keys: dict[str, str] = {}
        self._judges: dict[str, str | None] | None = None

    def context(self, stage: Stage) -> Context:
        return Context(self.model, self.cfg, self.sets, out=self.out, progress=self.progress, results=self.results,
                       stage=stage)

    def judge_identities(self) -> dict[str, str | None]:
        if self._judges is None:
            self._judges = judge_identities(self.model)
        return self._judges

    def stage_key(self, stage: Stage, ctx: Context) -> str:
        missing = [u for u in stage.needs if u not in self.keys]
        if missing:
            raise RuntimeError(f"Stage {stage.name!r} needs {missing}, which have not run yet.")
        return sha256_json({"stage": stage.name, "stage_version": stage.version, "lens_safety_version": __version__,
                            **self.base_key, "config": {k: getattr(self.cfg, k) for k in sorted(stage.reads)},
                            **jsonable(stage.key(ctx)), "judges": self.judge_identities() if stage.judged else None,
                            "inputs": {u: self.keys[u] for u in stage.needs}})

    def run_stage(self, stage: Stage) -> StageResult:
        ctx = self.context(stage)
        key = self.keys[stage.name] = self.stage_key(stage, ctx)
        folder = self.out / "stages" / stage.name
        result, status, t0 = None, "cached", time.perf_counter()
        if folder.exists():
            try:
                result = stage.result.load(folder, key=key)
            except StaleStageError:
                pass  # other settings: recomputed below
            except CacheError as e:
                self._say(f"{stage.name}: cache not used ({e}); recomputing")
        if result is None:
            self._say(f"{stage.name} ...")
            result, status = stage.run(ctx), "done"
            result.save(folder, key=key)
        self._say(f"{stage.name}: {status} ({time.perf_counter() - t0:.1f} s)")
        self.results[stage.name] = result
        return result

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"[lens-safety] {text}", flush=True)


def judge_identities(model) -> dict[str, str | None]:
    """The identity of every judge a run can use or compare (it hashes the judge's rules and parameters), for
    the keys of the stages that judge; ``None`` for one that cannot be built here."""
    import warnings

    out: dict[str, str | None] = {}
    for name in JUDGES:
        try:
            with warnings.catch_warnings():  # e.g. an uncalibrated model judge: the stage that uses it warns
                warnings.simplefilter("ignore")
                out[name] = judge_identity(name, model)
        except Exception:  # noqa: BLE001 - as in the judge comparison: a judge that cannot run is reported there
            out[name] = None
    return out


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


def collect_metrics(info: RunInfo, results: dict[str, StageResult], keys: dict[str, str], stages=STAGES):
    """``metrics.json``: the headline (each stage's entries, ``None`` where a stage was skipped), every claim's
    verdict (computed once, by the stage that measures it, from its typed result), each stage's metrics."""
    headline: dict[str, Any] = {"model": info.model, "n_layers": info.n_layers}
    verdicts: dict[str, Verdict] = {}
    for stage in stages:
        result = results.get(stage.name)
        ran = result is not None and not result.skipped
        headline.update(dict.fromkeys(stage.headline_keys()))
        if ran:
            headline.update(stage.headline(result))
        claims = stage.verdicts(result, info) if ran else {
            name: Verdict.not_measured(label, result.skipped if result is not None else None)
            for name, label in getattr(stage, "claims", {}).items()}
        verdicts.update(claims)
    return jsonable({
        "headline": headline, "verdicts": {k: v.to_dict() for k, v in verdicts.items()},
        "stages": {name: _stage_metrics(s, results[name]) for s in stages if (name := s.name) in results},
        "skipped": {k: r.skipped for k, r in results.items() if r.skipped},
        "config": info.cfg.to_dict(), "provenance": info.provenance, "stage_keys": keys,
        "lens_safety_version": info.version})


def _stage_metrics(stage: Stage, result: StageResult) -> dict[str, Any]:
    return {} if result.skipped else stage.metrics(result)


def write_outputs(out: Path, info: RunInfo, results: dict[str, StageResult], metrics: dict, stages=STAGES) -> None:
    """``OUT/tables/*.csv``, ``OUT/figures/*.png``, ``OUT/metrics.json`` and ``OUT/report.html``."""
    (out / "tables").mkdir(exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    for stage in stages:
        result = results.get(stage.name)
        if result is None:
            continue
        for name, frame in ({} if result.skipped else stage.tables(result)).items():
            frame.to_csv(out / "tables" / f"{name}.csv", index=False)
        for name, png in result.figures.items():
            (out / "figures" / f"{name}.png").write_bytes(png)
    write_json_atomic(out / "metrics.json", metrics)
    full = RunInfo(info.model, info.n_layers, info.cfg, info.provenance, info.version, metrics["verdicts"],
                   metrics["headline"])
    build_html(full, results, metrics["skipped"], stages).save(out / "report.html")


def _finish(out: Path, info: RunInfo, results: dict[str, StageResult], keys: dict[str, str]) -> dict[str, Any]:
    metrics = collect_metrics(info, results, keys)
    write_outputs(out, info, results, metrics)
    return metrics


def run_pipeline(model: Any = None, out: str | os.PathLike = "lens_safety_out", *, quick: bool = False,
                 jailbreaks: Any = None, n: int | None = None, batch_size: int = 16, seed: int = 0,
                 progress: bool = True, load_kwargs: dict[str, Any] | None = None, judge: str = "calibrated",
                 **opt_in: bool) -> RunResult:
    """Run the whole study on one model and write ``report.html``, ``metrics.json``, CSVs and PNGs.

    ``model`` is a :class:`~lens_safety.SafetyModel` or a name for :func:`~lens_safety.load_model` (default:
    the embedded Qwen2.5-Coder-0.5B-Instruct). ``quick`` uses small subsets (a few minutes on 2 cores); ``n``
    caps every prompt set. Base models (no chat alignment) run the probe and lens stages on raw prompts and
    skip the stages that need refusal behaviour, with a note. ``load_kwargs`` go to ``load_model`` when
    ``model`` is a name (``dtype``, ``device_map``...). ``judge`` decides refusal (``"calibrated"``,
    ``"rules"``, ``"substring"`` or ``"model"``); the report compares the judges on the same replies.
    The opt-in stages (off by default: each adds minutes on a CPU): ``tuned_lens=True`` trains (or loads a
    cached) tuned lens and shows it next to the logit lens; ``directions=True`` adds the refusal-direction
    stage; ``harm=True`` the harm-vs-refusal stage.

    ``metrics.json`` holds the headline numbers, every stage's metrics, and ``verdicts``: each paper claim
    checked against the run (:mod:`lens_safety.pipeline.verdicts`).
    """
    t0 = time.perf_counter()
    out_dir = _check_out(out)
    cfg = make_config(quick, n, jailbreaks, batch_size, seed, judge, **opt_in)
    sets = sample_sets(cfg)  # validates --n before the model loads
    if not isinstance(model, SafetyModel):
        if progress:
            print(f"[lens-safety] loading {model or 'the default model'} ...", flush=True)
        model = load_model(model, **(load_kwargs or {}))
    runner = Runner(model, cfg, sets, out_dir, progress=progress)
    for stage in STAGES:
        runner.run_stage(stage)
    info = RunInfo(model.name, model.n_layers, cfg, dict(model.provenance, weights_hash=model.weights_hash),
                   __version__)
    metrics = _finish(out_dir, info, runner.results, runner.keys)
    return RunResult(out_dir, metrics, runner.results, time.perf_counter() - t0)


def render_report(out: str | os.PathLike = "lens_safety_out") -> Path:
    """Re-render ``OUT/report.html`` (and ``metrics.json``'s verdicts) from a finished run's cached stages,
    without loading the model. Raises :class:`~lens_safety.core.errors.CacheError` when the folder holds no
    finished run or a stage was changed since.

    >>> render_report("lens_safety_out")  # doctest: +SKIP
    PosixPath('lens_safety_out/report.html')
    """
    out = Path(out)
    metrics = read_json(out / "metrics.json", what="lens-safety run's metrics.json")
    keys = metrics.get("stage_keys")
    if not isinstance(keys, dict) or "config" not in metrics:
        raise CacheError(f"{out / 'metrics.json'} was written by an older lens_safety (no stage keys); "
                         "run `lens-safety run` again with the same options.")
    by_name = {s.name: s for s in STAGES}
    results = {}
    for name, key in keys.items():
        try:
            results[name] = by_name[name].result.load(out / "stages" / name, key=key)
        except (CacheError, KeyError) as e:
            raise CacheError(f"Cannot re-render the report: stage {name!r} is not the one metrics.json was made "
                             f"from ({e}). Run `lens-safety run` again with the same options (cached stages "
                             "are reused).") from e
    h = metrics["headline"]
    info = RunInfo(h["model"], h.get("n_layers"), RunConfig.from_dict(metrics["config"]), metrics["provenance"],
                   metrics.get("lens_safety_version", __version__))
    _finish(out, info, results, keys)
    return out / "report.html"
