"""Shared fixtures. Tests never reach the Hugging Face hub (HF_HUB_OFFLINE=1).

Browser tests (marker ``browser``) render pages in headless Chromium through :func:`render_page`;
the ``chromium`` fixture finds the browser the same way for every test and skips when there is
none, except in CI (``CI`` set, as ``.ci/run`` does): there a missing browser is a failure, so a
check that did not run cannot pass unnoticed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import html.parser  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    """A tiny random HF Qwen2 model behind a TransformerBridge, with the offline tokenizer."""
    from lens_safety.testing import tiny_model

    return tiny_model("hf", seed=0)


@pytest.fixture(scope="session")
def tiny_native():
    """A tiny random TransformerBridge.boot_native model."""
    from lens_safety.testing import tiny_model

    return tiny_model("native", seed=0)


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model (Qwen2.5-Coder-0.5B-Instruct), fetched from pinned wheels."""
    import lens_safety as ls

    return ls.load_model()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty LENS_SAFETY_HOME for tests that write caches."""
    monkeypatch.setenv("LENS_SAFETY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- headless Chromium, shared by every browser test ----------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM`` if set, else the first of :data:`CHROMIUM_NAMES` on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


_SKIP_REASON = "chromium is not installed (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip(_SKIP_REASON)
    return exe


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skipped browser test is a failure: the check must run there."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and item.get_closest_marker("browser") is not None:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: browser test skipped in CI ({report.longrepr}); "
                           "CI must install chromium (see .ci/run).")


# Records console errors and uncaught exceptions into an attribute of <html>, which --dump-dom shows.
_RECORDER = """<script>(function(){var errs=[];function rec(m){errs.push(String(m));
document.documentElement.setAttribute("data-console-errors", JSON.stringify(errs));}
var orig=console.error;console.error=function(){rec(Array.prototype.join.call(arguments," "));
return orig.apply(console,arguments);};window.addEventListener("error",function(e){rec(e.message);});
window.addEventListener("unhandledrejection",function(e){rec(e.reason);});})();</script>"""


@dataclasses.dataclass
class RenderedPage:
    dom: str  # the DOM after scripts ran
    console_errors: list[str]  # console.error calls, uncaught exceptions and rejections
    views: dict[str, int]  # circuitsvis placeholder id -> number of elements rendered inside it


class _ViewCounter(html.parser.HTMLParser):
    """For each element with class ``cv-view``: how many elements were rendered inside it."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.views: dict[str, int] = {}
        self.stack: list[str | None] = []
        self.errors_attr: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html" and "data-console-errors" in a:
            self.errors_attr = a["data-console-errors"]
        for owner in self.stack:
            if owner is not None:
                self.views[owner] += 1
        if tag in self.VOID:
            return
        owner = a.get("id") if "cv-view" in (a.get("class") or "").split() else None
        if owner is not None:
            self.views[owner] = 0
        self.stack.append(owner)

    def handle_endtag(self, tag):
        if tag not in self.VOID and self.stack:
            self.stack.pop()


def render_page(chromium: str, path: Path, budget_ms: int = 8000) -> RenderedPage:
    """Open ``path`` in headless Chromium (network unused) and return the DOM after its scripts ran,
    the console errors, and how much each circuitsvis view rendered."""
    import json

    text = Path(path).read_text(encoding="utf-8")
    head = text.index("<head>") + len("<head>") if "<head>" in text else 0
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text[:head] + _RECORDER + text[head:], encoding="utf-8")
        profile = Path(tmp) / "profile"
        out = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
             "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom",
             page.as_uri()],
            capture_output=True, text=True, timeout=180)
    if not out.stdout.strip():
        raise RuntimeError(f"chromium produced no DOM (exit {out.returncode}): {out.stderr[-2000:]}")
    parser = _ViewCounter()
    parser.feed(out.stdout)
    errors = json.loads(parser.errors_attr) if parser.errors_attr else []
    errors += [line for line in out.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    return RenderedPage(out.stdout, errors, parser.views)
