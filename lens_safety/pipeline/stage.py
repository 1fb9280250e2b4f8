"""What a stage is: one object with a name, the stages it needs, the settings it reads, ``run(ctx)`` returning
a typed :class:`StageResult`, and what it contributes to ``metrics.json``, the verdicts and the report.

A stage's result is cached through :mod:`lens_safety.core.store` (verified on load) and handed, as the typed
object, to later stages (``ctx.results["patching"]``) and to the verdicts. Adding a stage: a module in
``pipeline/stages/`` defining a :class:`Stage` subclass and its :class:`StageResult`, and one line in
``pipeline/stages/__init__.py`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
import io
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..behaviour.judges import as_judge
from ..core import parallel, store
from ..core.errors import CacheError, InputError
from ..inputs.jailbreaks import jailbreak
from ..inputs.prompts import PromptSet
from .config import RunConfig

__all__ = ["Stage", "StageResult", "Context", "ConfigView", "StaleStageError", "STAGE_KIND", "STAGE_SCHEMA",
           "figure_png", "GENERATION_READS"]

STAGE_KIND = "lens_safety.stage"
STAGE_SCHEMA = 4  # bump when the stored stage format changes, so every old stage cache is rebuilt


class StaleStageError(CacheError):
    """A stage folder from a run with other settings, model or prompts (recomputed, not an error)."""


def figure_png(fig) -> bytes:
    """A matplotlib figure (or an Axes' figure) as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig = fig if hasattr(fig, "savefig") else fig.figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _is_result(value: Any) -> bool:
    return hasattr(value, "save") and hasattr(type(value), "load") and not hasattr(value, "to_csv")


def _class_path(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str):
    module, _, name = path.partition(":")
    if not module.startswith("lens_safety."):  # only our own result classes are ever imported from a cache
        raise CacheError(f"A stage cache names the class {path!r}, which is not a lens_safety result.")
    return getattr(importlib.import_module(module), name)


@dataclass
class StageResult:
    """Base of every stage's typed result: dataclass fields holding library results (anything with
    ``save``/``load``, alone or in a ``dict``), pandas frames, or JSON values; ``figures`` (PNG bytes drawn
    when the stage ran) and ``skipped`` (why the stage did not run) are common to all.

    :meth:`save` / :meth:`load` go through :func:`~lens_safety.core.store.write_artifact`: nested results
    are children (their sha256 checked), frames and values are in the checksummed ``meta.json``, figures
    are files whose sha256 is recorded.
    """

    skipped: str | None = None
    figures: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def skip(cls, reason: str):
        return cls(skipped=reason)

    def save(self, directory: str | os.PathLike, *, key: str = "") -> Path:
        meta: dict[str, Any] = {"class": f"{type(self).__module__}:{type(self).__qualname__}", "key": key,
                                "skipped": self.skipped, "values": {}, "frames": {}, "results": {}}
        children: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("skipped", "figures") or value is None:
                continue
            if hasattr(value, "to_csv"):
                meta["frames"][f.name] = store.frame_to_json(value)
            elif _is_result(value):
                children[f.name] = value
                meta["results"][f.name] = _class_path(value)
            elif isinstance(value, dict) and value and all(_is_result(v) for v in value.values()):
                meta["results"][f.name] = {k: _class_path(v) for k, v in value.items()}
                children.update({f"{f.name}__{k}": v for k, v in value.items()})
            else:
                meta["values"][f.name] = store.jsonable(value)
        children.update({f"figure__{k}": _Png(v) for k, v in self.figures.items()})
        meta["figures"] = list(self.figures)
        return store.write_artifact(directory, kind=STAGE_KIND, schema_version=STAGE_SCHEMA, meta=meta,
                                    children=children)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, key: str | None = None):
        """Read and verify a stage folder; :class:`~lens_safety.core.errors.CacheError` when it is missing,
        of another schema, class or key (``key=None`` accepts any), edited or incomplete."""
        directory = Path(directory)
        _, meta = store.read_artifact(directory, kind=STAGE_KIND, schema_version=STAGE_SCHEMA)
        if key is not None and meta.get("key") != key:
            raise StaleStageError(f"{directory} was written by a run with other settings (stage key differs).")
        if meta.get("class") != f"{cls.__module__}:{cls.__qualname__}":
            raise StaleStageError(f"{directory} holds a {meta.get('class')}, not a {cls.__qualname__}.")
        try:
            values: dict[str, Any] = dict(meta["values"])
            values.update({k: store.frame_from_json(v) for k, v in meta["frames"].items()})
            for name, path in meta["results"].items():
                if isinstance(path, dict):
                    values[name] = {k: _load_class(p).load(directory / f"{name}__{k}") for k, p in path.items()}
                else:
                    values[name] = _load_class(path).load(directory / name)
            figures = {k: _Png.load(directory / f"figure__{k}") for k in meta["figures"]}
            return cls(skipped=meta["skipped"], figures=figures, **values)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheError(f"{directory}: the stage cache is malformed ({e}); it is rebuilt.") from e


class _Png:
    """A figure's PNG bytes as a child artifact (its sha256 recorded by the parent)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def save(self, directory: Path) -> Path:
        with store.atomic_dir(directory) as tmp:
            (tmp / "figure.png").write_bytes(self.data)
            store.write_json_atomic(tmp / store.META, {"kind": "png", "sha256": store.sha256_file(tmp / "figure.png")},
                                    checksum=True)
        return directory

    @staticmethod
    def load(directory: Path) -> bytes:
        meta = store.read_json(directory / store.META, what="figure meta", checksum=True)
        if store.sha256_file(directory / "figure.png") != meta["sha256"]:
            raise CacheError(f"{directory / 'figure.png'} does not match its recorded sha256; the stage is rebuilt.")
        return (directory / "figure.png").read_bytes()


#: The settings a stage reads when it generates and judges replies through :meth:`Context.refusal` or
#: :meth:`Context.pairs` (the eval sets, the jailbreaks, the judge and the generation budget).
GENERATION_READS = ("n_eval", "seed", "judge", "max_new_tokens", "batch_size", "jailbreaks")


class ConfigView:
    """The run's settings as one stage sees them: reading a field the stage did not declare in
    :attr:`Stage.reads` is an error (it would be missing from the stage's cache key)."""

    def __init__(self, cfg: RunConfig, allowed: tuple[str, ...], stage: str) -> None:
        self._cfg, self._allowed, self._stage = cfg, frozenset(allowed), stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._allowed:
            raise RuntimeError(f"Stage {self._stage!r} reads config.{name} but does not declare it in its "
                               f"`reads` ({sorted(self._allowed)}); add it there so it is part of the cache key.")
        return getattr(self._cfg, name)


class Stage:
    """One step of ``lens-safety run``. Subclasses set the class attributes and implement :meth:`run`;
    the other methods have empty defaults.

    * ``name``: the stage's name (its folder under ``OUT/stages``); ``needs``: stages whose results or cached
      data it reads (their keys are part of its key, and they run before it); ``reads``: the
      :class:`~lens_safety.pipeline.config.RunConfig` fields it reads; ``judged``: its numbers pass through
      the refusal judge (the judges' identities enter its key); ``version``: bump when its code changes
      what it computes; ``result``: its :class:`StageResult` subclass; ``claims``: the verdicts it decides.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    judged: ClassVar[bool] = False
    version: ClassVar[int] = 1
    #: the verdicts this stage decides, ``{name: claim}``: "not measured" (with the reason) when it is skipped
    claims: ClassVar[dict[str, str]] = {}
    result: ClassVar[type[StageResult]] = StageResult

    def key(self, ctx: Context) -> dict[str, Any]:
        """Extra material for the cache key (beyond name, version, settings read, inputs, judges)."""
        return {}

    def run(self, ctx: Context) -> StageResult:
        raise NotImplementedError

    def metrics(self, result: StageResult) -> dict[str, Any]:
        """This stage's entry in ``metrics.json["stages"]`` (JSON values)."""
        return {}

    def headline(self, result: StageResult) -> dict[str, Any]:
        """Entries of ``metrics.json["headline"]`` (absent stage: the runner fills ``None``)."""
        return {}

    def headline_keys(self) -> tuple[str, ...]:
        """The headline entries this stage owns (``None`` when it is skipped or not run)."""
        return ()

    def verdicts(self, result: StageResult, run: RunInfo) -> dict[str, Any]:
        """``{name: Verdict}``: the claims this stage's result decides, each computed once, here."""
        return {}

    def tables(self, result: StageResult) -> dict[str, Any]:
        """Frames written to ``OUT/tables/<name>.csv``."""
        return {}

    def section(self, result: StageResult, doc, run: RunInfo) -> None:
        """Append this stage's part of the HTML report to ``doc``."""


@dataclass(frozen=True)
class RunInfo:
    """What the report sections and verdicts know about the run besides a stage's own result."""

    model: str
    n_layers: int | None
    cfg: RunConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    version: str = "?"
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)


class Context:
    """What a running stage gets: the model, its settings (only those it declared), the prompt sets, the
    typed results of the stages before it, and shared inputs that their own modules cache (generations,
    residuals), so asking twice is cheap."""

    def __init__(self, model, cfg: RunConfig, sets: dict[str, PromptSet], *, out: Path, progress: bool,
                 results: dict[str, StageResult], stage: Stage) -> None:
        self.model, self.sets, self.out, self.progress, self.results = model, sets, out, progress, results
        self.config = ConfigView(cfg, stage.reads, stage.name)
        self.aligned = bool(model.chat_default and model.aligned is not False)
        # With --reply every generation pass also records the residual stream along the replies (the same
        # tokens, so no stage's numbers change: not part of any stage's key); the reply stage reads them.
        self._record_replies = bool(cfg.reply and self.aligned)

    @property
    def record(self):
        """The :class:`~lens_safety.model.recording.RecordSpec` of ``--reply`` runs, else None."""
        if not self._record_replies:
            return None
        from ..analyses.reply import reply_record_spec

        return None if parallel.num_processes() > 1 else reply_record_spec(self.model)

    def eval_sets(self) -> dict[str, PromptSet]:
        """The sets whose replies are generated (the generic harmless set only feeds the probes)."""
        n, seed = self.config.n_eval, self.config.seed
        return {k: v.sample(min(n, len(v)), seed=seed) for k, v in self.sets.items()
                if k in ("harmbench", "harmless", "borderline")}

    def judge(self):
        return as_judge(self.config.judge, self.model)

    def jailbroken(self) -> PromptSet:
        harmful = self.eval_sets()["harmbench"]
        parts = [jailbreak(harmful, m, seed=self.config.seed) for m in self.config.jailbreaks]
        return PromptSet([p for part in parts for p in part], name="jailbreak")

    def refusal(self, prompts):
        from ..behaviour.refusal import evaluate_refusal

        return evaluate_refusal(self.model, prompts, max_new_tokens=self.config.max_new_tokens,
                                batch_size=self.config.batch_size, progress=self.progress, judge=self.judge(),
                                record=self.record)

    def residuals(self, name: str):
        from ..capture import collect_residuals

        prompts = self.jailbroken() if name == "jailbreak" else self.sets[name]
        bs = max(1, self.config.batch_size // 2) if name == "jailbreak" else self.config.batch_size
        return collect_residuals(self.model, prompts, batch_size=bs, progress=self.progress)

    def pairs(self):
        from ..behaviour.pairs import jailbreak_pairs

        return jailbreak_pairs(self.model, self.eval_sets()["harmbench"], methods=self.config.jailbreaks,
                               max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                               seed=self.config.seed, progress=self.progress, judge=self.judge(),
                               record=self.record)


def check_registry(stages) -> None:
    """Names unique, every need registered before the stage that needs it."""
    seen: set[str] = set()
    for s in stages:
        if s.name in seen:
            raise InputError(f"Two stages are named {s.name!r}.")
        missing = [n for n in s.needs if n not in seen]
        if missing:
            raise InputError(f"Stage {s.name!r} needs {missing}, which are not registered before it.")
        seen.add(s.name)
