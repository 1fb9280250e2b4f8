"""The one-command pipeline and its self-contained HTML report."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import lens_safety as ls
from lens_safety.errors import InputError
from lens_safety.htmlreport import HtmlDocument, circuitsvis_bundle, safe_json
from lens_safety.report import run_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render_dom(path: Path) -> str:
    """The DOM after scripts ran, from headless Chromium with the network unused."""
    profile = tempfile.mkdtemp()
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=8000", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return out.stdout


def test_safe_json_cannot_close_a_script():
    s = safe_json({"t": "</script><script>alert(1)</script> & <b>"})
    assert "<" not in s and ">" not in s and "&" not in s
    assert json.loads(s) == {"t": "</script><script>alert(1)</script> & <b>"}


def test_document_escapes_text_and_tables():
    import pandas as pd

    doc = HtmlDocument("t <i>x</i>")
    doc.paragraph("<script>alert(1)</script>")
    doc.table(pd.DataFrame({"text": ["<img src=x onerror=alert(1)>"]}))
    page = doc.render()
    assert "<script>alert(1)</script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing loads from a URL


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LENS_SAFETY_HOME", str(home))
    model = ls.testing.tiny_model(seed=3)
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_pipeline(model, out=out, quick=True, n=8, jailbreaks=["prefix_injection", "few_shot"],
                          progress=False)
    yield model, out, result
    mp.undo()


def test_pipeline_writes_every_output(tiny_run):
    model, out, result = tiny_run
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["weights_hash"] == model.weights_hash
    assert metrics["headline"]["model"] == model.name
    tables = {p.stem for p in (out / "tables").glob("*.csv")}
    assert {"prompt_sets", "probes_2way", "probes_transfer", "lens_category_mass"} <= tables
    assert {p.stem for p in (out / "figures").glob("*.png")} >= {"probes_2way", "lens_category_mass"}
    probes = json.loads((out / "stages" / "probes" / "stage.json").read_text())["metrics"]
    assert 0.0 <= probes["layer0_accuracy"] <= 1.0
    # random tiny model: nothing is refused, so patching is skipped with a reason
    assert metrics["skipped"].get("patching")


def test_rerun_uses_stage_cache(tiny_run, monkeypatch):
    model, out, first = tiny_run
    import lens_safety.report as rep

    monkeypatch.setattr(rep._Context, "stage_probes", lambda self: (_ for _ in ()).throw(AssertionError("ran")))
    again = run_pipeline(model, out=out, quick=True, n=8, jailbreaks=["prefix_injection", "few_shot"],
                         progress=False)
    assert again.metrics["stages"]["probes"] == first.metrics["stages"]["probes"]


def test_report_html_is_self_contained_and_escaped(tiny_run):
    _, out, _ = tiny_run
    page = (out / "report.html").read_text()
    bundle = circuitsvis_bundle()
    assert page.count(bundle) == 1  # the circuitsvis bundle is inlined once
    ours = page.replace(bundle, "")
    assert "http://" not in ours and "https://" not in ours  # (the bundle's own strings are not loads)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page  # nothing may load anyway
    assert page.count("CircuitsVis.render(") >= 1
    assert "Provenance" in page and "Limits of this run" in page
    # every prompt that appears is escaped: no raw tag from prompt text survives
    assert "<|im_start|>" not in page


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_run):
    _, out, _ = tiny_run
    dom = render_dom(out / "report.html")
    assert "Claim 1" in dom and "Limits of this run" in dom
    # circuitsvis views rendered: the React components replaced the empty placeholder divs
    assert 'id="cv-view-1" class="cv-view" style="margin:10px 0"></div>' not in dom
    assert dom.count("<img") >= 3


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="larger than"):
        run_pipeline(ls.testing.tiny_model(), out=tmp_path / "o", n=10_000, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="output folder"):
        run_pipeline(ls.testing.tiny_model(), out=blocker / "sub", progress=False)
    with pytest.raises(InputError, match="Unknown jailbreak"):
        run_pipeline(ls.testing.tiny_model(), out=tmp_path / "o", jailbreaks=["nope"], progress=False)
    with pytest.raises(KeyError, match="Unknown model"):
        run_pipeline("no-such-model", out=tmp_path / "o", progress=False)


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    from lens_safety.cli import main

    assert main(["run", "--model", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    assert "Unknown model" in capsys.readouterr().err
    assert main(["models"]) == 0
    assert "qwen2.5-coder-0.5b-instruct (default)" in capsys.readouterr().out


def test_base_model_runs_raw_and_skips_refusal_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_SAFETY_HOME", str(tmp_path / "home"))
    base = ls.testing.tiny_model(seed=4)
    base.aligned, base.chat_default = False, False  # a pre-trained base model: raw prompts
    result = run_pipeline(base, out=tmp_path / "out", quick=True, n=8, jailbreaks=["prefix_injection"],
                          progress=False)
    skipped = result.metrics["skipped"]
    assert set(skipped) == {"refusal", "pairs", "graft", "patching"}
    assert result.metrics["stages"]["probes"]["layer0_accuracy"] is not None
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["headline"]["attack_success_rate"] is None
    page = (tmp_path / "out" / "report.html").read_text()
    assert "not a chat-aligned model" in page
    # raw prompts: the captured residuals were keyed without the chat template
    entry = next((tmp_path / "home" / "activations").iterdir())
    assert json.loads((entry / "meta.json").read_text())["formatting"]["chat"] is False
