"""lens_safety.validation: the shared argument checks, and the modules that now use them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from lens_safety.errors import InputError, ModelMismatchError, NonFiniteActivationError
from lens_safety.validation import check_finite, check_int, check_number, check_same_model, config_from_options

# -- check_int -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [True, False, np.bool_(True), 1.0, "3", None, [1]])
def test_check_int_rejects_non_integers_and_bool(bad):
    with pytest.raises(InputError, match=r"n must be an integer, got "):
        check_int(bad, "n")


def test_check_int_returns_python_int_from_numpy():
    out = check_int(np.int64(7), "k", low=0)
    assert out == 7 and type(out) is int


@pytest.mark.parametrize("value, ok", [(0, False), (1, True), (5, True), (6, False), (-3, False)])
def test_check_int_bounds_are_inclusive(value, ok):
    if ok:
        assert check_int(value, "k", low=1, high=5) == value
    else:
        with pytest.raises(InputError, match=rf"k must be an integer in 1\.\.5, got {value}\."):
            check_int(value, "k", low=1, high=5)


def test_check_int_one_sided_bounds_and_messages():
    with pytest.raises(InputError, match=r"batch_size must be an integer >= 1, got 0\."):
        check_int(0, "batch_size", low=1)
    with pytest.raises(InputError, match=r"position must be a negative integer <= -1 \(-1 = last\), got 0\."):
        check_int(0, "position", high=-1, kind="a negative integer", hint="-1 = last")
    assert check_int(-4, "position", high=-1) == -4


def test_check_int_none_only_when_allowed():
    assert check_int(None, "n", low=1, allow_none=True) is None
    with pytest.raises(InputError, match=r"n must be an integer >= 1 or None \(prompts per set\), got 0\."):
        check_int(0, "n", low=1, allow_none=True, hint="prompts per set")
    with pytest.raises(InputError, match="got None"):
        check_int(None, "n", low=1)


# -- check_number ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), True, "0.5", None])
def test_check_number_rejects_non_finite_bool_and_strings(bad):
    with pytest.raises(InputError, match="coeff must be a finite number"):
        check_number(bad, "coeff")


def test_check_number_open_and_closed_bounds():
    assert check_number(np.float32(0.25), "t", low=0, high=1, inclusive=(False, False)) == 0.25
    for edge in (0, 1):
        with pytest.raises(InputError, match=r"t must be a probability in \(0, 1\), got "):
            check_number(edge, "t", low=0, high=1, inclusive=(False, False), kind="a probability")
    assert check_number(0, "gap", low=0) == 0.0
    with pytest.raises(InputError, match=r"lr must be a finite number > 0, got 0"):
        check_number(0, "lr", low=0, inclusive=(False, True))
    assert check_number(None, "gap", low=0, allow_none=True) is None


# -- check_finite ----------------------------------------------------------------------------------

def test_check_finite_names_count_and_first_index_torch():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 0] = float("nan")
    x[1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteActivationError, match=r"^The scores: 2 NaN/inf value\(s\), the first at index "
                                                        r"\(1, 2, 0\)\. Fix it\.$"):
        check_finite(x, "The scores", hint="Fix it.")


def test_check_finite_numpy_and_error_class():
    a = np.ones((3, 2))
    a[2, 1] = -np.inf
    with pytest.raises(InputError, match=r"index \(2, 1\)") as e:
        check_finite(a, "X")
    assert isinstance(e.value, FloatingPointError)  # NonFiniteActivationError is both
    assert "overflowed" in str(e.value)  # the default hint


def test_check_finite_passes_finite_and_integer_values():
    check_finite(torch.ones(3), "x")
    check_finite(torch.arange(3), "x")
    check_finite(np.array([True, False]), "x")
    check_finite(np.array([1.0, 2.0]), "x")


def test_check_finite_mapping_lists_every_bad_label_and_custom_where():
    X = np.zeros((4, 6, 3))
    X[0, 2, 1] = np.nan
    X[3, 4, 0] = np.inf
    X[1, 5, 0] = np.nan  # layer 5 is not checked
    with pytest.raises(NonFiniteActivationError, match=r"2 NaN/inf value\(s\), at layer\(s\) \[2, 4\]"):
        check_finite({layer: X[:, layer] for layer in range(5)}, "Acts",
                     where=lambda bad: f"at layer(s) {[b[0] for b in bad]}")
    seen = []
    with pytest.raises(NonFiniteActivationError):
        check_finite({"a": X[:, 2]}, "Acts", where=lambda bad: seen.append(bad) or "here")
    assert seen == [[("a", 0, 1)]]


# -- check_same_model ------------------------------------------------------------------------------

def test_check_same_model():
    a = NS(weights_hash="a" * 64, model_name="m1")
    check_same_model(a, NS(weights_hash="a" * 64, model_name="renamed"), "x")  # same weights pass
    check_same_model(a, NS(weights_hash="", model_name="?"), "x")  # unknown origin passes
    check_same_model(a, [1, 2], "x")  # no hash at all passes
    with pytest.raises(ModelMismatchError, match=r"^Cannot mix: they come from different models, m1 \(weights "
                                                 r"aaaaaaaaaaaa\) and gpt2 \(weights bbbbbbbbbbbb\)\. Do X\.$"):
        check_same_model(a, NS(weights_hash="b" * 64, name="gpt2"), "Cannot mix", fix="Do X.")


# -- config_from_options ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    n: int = 8
    seed: int = 0


class _UnknownError(InputError, TypeError):
    pass


def test_config_from_options_overrides_the_config_or_the_defaults():
    base = _Options(n=4)
    assert config_from_options(_Options, None, {}, function="run") == _Options()
    assert config_from_options(_Options, None, {"seed": 2}, function="run") == _Options(8, 2)
    assert config_from_options(_Options, base, {"seed": 1}, function="run") == _Options(4, 1)
    assert config_from_options(_Options, base, {}, function="run") is base and base == _Options(n=4)


def test_config_from_options_names_unknown_options_and_the_valid_ones():
    with pytest.raises(TypeError, match=r"^run\(\) got unknown argument\(s\) 'sed', 'x'; valid options: n, seed\.$"):
        config_from_options(_Options, _Options(), {"sed": 1, "x": 0, "n": 2}, function="run")
    with pytest.raises(_UnknownError, match="'sed'"):
        config_from_options(_Options, None, {"sed": 1}, function="run", error=_UnknownError)


def test_config_from_options_rejects_a_config_of_another_type():
    with pytest.raises(TypeError, match=r"run\(\): config must be a _Options, got dict\."):
        config_from_options(_Options, {"n": 4}, {}, function="run")


def test_config_from_options_accepts_extra_names_for_the_caller():
    """``names`` narrows or widens the accepted options; names that are no field are left to the caller."""
    assert config_from_options(_Options, None, {"n": 3, "limit": 0.5}, function="run",
                               names=("n", "limit")) == _Options(n=3)
    with pytest.raises(TypeError, match="'seed'; valid options: n, limit"):
        config_from_options(_Options, None, {"seed": 1}, function="run", names=("n", "limit"))


# -- the modules that use them ---------------------------------------------------------------------

def test_judges_verdict_is_a_deprecated_alias_of_judged_reply():
    from lens_safety import judges

    with pytest.warns(DeprecationWarning, match="JudgedReply"):
        alias = judges.Verdict
    assert alias is judges.JudgedReply
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = judges.RuleJudge().verdicts(["I'm sorry, but I can't help with that."])
    assert type(out[0]) is judges.JudgedReply and out[0].outcome == "refused"
    import lens_safety as ls

    assert ls.Verdict is not judges.JudgedReply  # the report's verdict keeps its name


def test_judge_and_config_checks_use_validation():
    from lens_safety.judges import CalibratedJudge, ModelJudge, RuleJudge
    from lens_safety.tuned_lens import TunedLensConfig

    assert type(RuleJudge(opening_chars=np.int64(50)).opening_chars) is int
    with pytest.raises(InputError, match="threshold must be a probability"):
        CalibratedJudge(threshold="0.5")  # float("0.5") used to pass
    with pytest.raises(InputError, match="lr must be a finite number > 0"):
        TunedLensConfig(lr=True)  # True > 0 used to pass
    assert type(TunedLensConfig(steps=np.int64(3)).steps) is int
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        ModelJudge(None, 0.0, batch_size=0)


def test_attack_success_of_two_models_is_a_model_mismatch():
    from lens_safety import refusal as R
    from lens_safety.prompts import Prompt, PromptSet

    ps = PromptSet([Prompt("How?", "harmful")], "x")
    a = R.RefusalResult(ps, ["No"], np.array([True]), np.array([1.0]), "m1", "a" * 64)
    b = R.RefusalResult(ps, ["Sure"], np.array([False]), np.array([-1.0]), "m2", "b" * 64)
    with pytest.raises(ModelMismatchError, match=r"different models, m1 .* and m2"):
        R.attack_success(a, b)


def test_probe_nonfinite_names_layers():
    from lens_safety.probes import _check_finite

    X = np.zeros((3, 4, 2), dtype=np.float32)
    X[1, 3, 0] = np.nan
    _check_finite(X, [0, 1, 2])  # layer 3 not asked for
    with pytest.raises(NonFiniteActivationError, match=r"at layer\(s\) \[3\] \(0 = embedding output\)"):
        _check_finite(X, [0, 3])


def test_validation_is_a_low_module():
    from test_architecture import PACKAGE, import_graph

    assert import_graph(PACKAGE)["core.validation"] == {"core.errors"}  # any module can use it without a cycle
