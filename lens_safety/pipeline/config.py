"""The settings of one run (:class:`RunConfig`) and the prompt sets it samples.

>>> cfg = make_config(quick=True, n=8, jailbreaks=["prefix_injection"])
>>> (cfg.n, cfg.n_eval, cfg.max_new_tokens, cfg.jailbreaks)
(8, 8, 24, ('prefix_injection',))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..behaviour.judges import JUDGE_NAMES
from ..core.errors import InputError
from ..core.validation import check_int
from ..inputs.jailbreaks import jailbreak_methods
from ..inputs.prompts import PromptSet, load_prompts

__all__ = ["RunConfig", "make_config", "OPT_IN", "sample_sets", "DEFAULT_JAILBREAKS", "DEFAULT_N",
           "FULL_RUN_MAX_NEW_TOKENS", "HARMLESS_SETS", "JUDGES"]

DEFAULT_JAILBREAKS = ("prefix_injection", "refusal_suppression", "few_shot", "nested_fiction", "past_tense")
DEFAULT_N = 200  # per set, when --n is not given: balanced harmful / harmless classes
FULL_RUN_MAX_NEW_TOKENS = 48  # reply length a full run generates and judges (--quick: 24)
JUDGES = JUDGE_NAMES  # calibrated (the default), rules, substring, model
HARMLESS_SETS = {"harmless": "topic-matched harmless", "generic": "paper-style generic harmless"}
PROMPT_SETS = ("harmbench", "harmless", "borderline", "generic")


@dataclass(frozen=True)
class RunConfig:
    """What a run was asked for (``lens-safety run`` flags, resolved). A stage declares the fields it reads
    (:attr:`~lens_safety.pipeline.stage.Stage.reads`); they, not the others, are part of its cache key."""

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
    judge: str = "calibrated"
    tuned_lens: bool = False
    directions: bool = False
    harm: bool = False
    reply: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        values["jailbreaks"] = tuple(values["jailbreaks"])
        return cls(**values)


def _check_jailbreaks(jailbreaks) -> tuple[str, ...]:
    known = [m.name for m in jailbreak_methods()]
    chosen = tuple(jailbreaks) if jailbreaks else DEFAULT_JAILBREAKS
    if "all" in chosen:
        chosen = tuple(known)
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise InputError(f"Unknown jailbreak method(s) {unknown}; known: {', '.join(known)}.")
    return chosen


#: the opt-in stages' switches (``lens-safety run --tuned-lens --directions --harm --reply``)
OPT_IN = ("tuned_lens", "directions", "harm", "reply")


def make_config(quick: bool = False, n: int | None = None, jailbreaks=None, batch_size: int = 16, seed: int = 0,
                judge: str = "calibrated", **opt_in: bool) -> RunConfig:
    """The run's settings from the command-line options, checked (clear errors before any model loads);
    ``opt_in``: the switches of :data:`OPT_IN`."""
    unknown = sorted(set(opt_in) - set(OPT_IN))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown}; the opt-in stages are {', '.join(OPT_IN)}.")
    if judge not in JUDGES:
        raise InputError(f"Unknown judge {judge!r}; choose one of {', '.join(JUDGES)}.")
    chosen = _check_jailbreaks(jailbreaks)
    batch_size, seed = check_int(batch_size, "batch_size", low=1), check_int(seed, "seed", low=0)
    n = check_int(n, "n", allow_none=True, hint="prompts per set")
    if n is not None and n < 5:
        raise InputError(f"--n must be at least 5 (the probes' 5-fold CV needs 5 prompts per class), got {n}.")
    extra = {"judge": judge, **{k: bool(v) for k, v in opt_in.items()}}
    if quick:
        n = 24 if n is None else n
        return RunConfig(n, min(n, 16), chosen, 24, batch_size, seed, n_pairs=4, graft_layers=4, n_graft=6,
                         quick=True, **extra)
    # Full run: balanced classes of up to 200 prompts for capture and probes (HarmBench has 200);
    # 24 prompts per set for generation, the costly part on a CPU (refusal, ASR, pairs, grafting).
    # Replies of 48 tokens: on human-labelled replies the judge agrees 0.950 at 24 tokens, 0.964 at 48,
    # 0.967 at 96 (benchmarks/judge_agreement.py); --quick keeps 24.
    return RunConfig(n, 24 if n is None else min(n, 24), chosen, FULL_RUN_MAX_NEW_TOKENS, batch_size, seed,
                     n_pairs=8, graft_layers=6, n_graft=12, quick=False, **extra)


def sample_sets(cfg: RunConfig) -> dict[str, PromptSet]:
    """The four prompt sets of a run, each sampled (seeded) to ``cfg.n`` prompts (default :data:`DEFAULT_N`)."""
    sets = {name: load_prompts(name) for name in PROMPT_SETS}
    if cfg.n is not None:
        for name, ps in sets.items():
            if cfg.n > len(ps):
                raise InputError(f"--n {cfg.n} is larger than the {name!r} set ({len(ps)} prompts); "
                                 f"use --n {min(len(p) for p in sets.values())} or less.")
    n = cfg.n or DEFAULT_N
    return {name: ps.sample(min(n, len(ps)), seed=cfg.seed) for name, ps in sets.items()}
