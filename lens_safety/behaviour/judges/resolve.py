"""A judge from what the caller passes: ``None`` (the default), a name, a :class:`Judge` or a callable."""

from __future__ import annotations

from collections.abc import Callable

from ...core.errors import InputError, UnknownNameError
from .calibrated import CalibratedJudge
from .model_judge import ModelJudge
from .rules import CallableJudge, Judge, RuleJudge, SubstringJudge

__all__ = ["JUDGE_NAMES", "as_judge", "judge_identity", "default_judge"]

#: Judges known by name (``as_judge``, ``lens-safety run --judge``); the first is the default.
JUDGE_NAMES = ("calibrated", "rules", "substring", "model")


def as_judge(judge: Judge | Callable | str | None = None, model=None) -> Judge:
    """A :class:`Judge` from ``None`` (the default, :class:`CalibratedJudge`), a name (``"calibrated"``,
    ``"rules"``, ``"substring"``, ``"model"``), a :class:`Judge`, or a callable ``list[str] -> list[bool]``.

    >>> as_judge("substring").name, as_judge(None).name, as_judge("rules").name
    ('substring', 'calibrated', 'rules')
    """
    if judge is None:
        return default_judge(model)
    if isinstance(judge, Judge):
        return judge
    if isinstance(judge, str):
        if judge == "rules":
            return RuleJudge()
        if judge == "calibrated":
            return default_judge(model)
        if judge == "substring":
            return SubstringJudge()
        if judge == "model":
            if model is None:
                raise InputError("judge='model' needs the model: as_judge('model', model).")
            return ModelJudge(model)
        raise UnknownNameError(f"Unknown judge {judge!r}. Known: {', '.join(JUDGE_NAMES)} (or pass a callable).")
    return CallableJudge(judge)


def judge_identity(judge: Judge | Callable | str | None = None, model=None) -> str:
    """The identity string of ``judge`` (see :attr:`Judge.identity`).

    >>> judge_identity("rules").startswith("rules:")
    True
    """
    return as_judge(judge, model).identity


def default_judge(model=None) -> Judge:
    """The default judge, a callable ``list[str] -> list[bool]`` (``True``: did not comply).

    It is :class:`CalibratedJudge`: the anchored refusal rules plus a learned soft-refusal layer
    fitted on human-labelled replies of three chat models (XSTest v2). Agreement with those labels,
    each model left out of the fit that scores it (``benchmarks/judge_agreement.py``): GPT-4 0.978,
    Llama-2-70b-chat 0.960, Mistral-7B-Instruct 0.933 (vs 0.936 / 0.924 / 0.860 for XSTest's string
    matcher). Model-free: ``model`` is accepted so a future default may use it. Pass ``requests=``
    too (the echo test uses them), or call ``.outcomes(...)`` for the three outcomes.

    >>> j = default_judge()
    >>> j(["I'm sorry, but I can't assist with that.", "Sure! Bread needs flour, water, salt and yeast."])
    [True, False]
    """
    return CalibratedJudge()
