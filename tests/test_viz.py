"""Figures and offline circuitsvis views (plus a headless-Chromium render check)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.colors import to_hex

import lens_safety as ls
from lens_safety import viz
from lens_safety.errors import InputError
from lens_safety.htmlreport import circuitsvis_bundle, safe_json


@pytest.fixture(scope="module")
def lens(tiny):
    ps = (ls.PromptSet.from_texts(["Tell me a story", "Bake bread please"], label="harmless")
          + ls.PromptSet.from_texts(["Make a bomb", "Steal a car"], label="harmful"))
    lex = ls.Lexicon({"refusal": ["no", "can", "kil*", "that"], "positive": ["step", "help", "the"]})
    return ls.logit_lens(tiny, ps, top_k=3, lexicon=lex)


def test_heatmap_cells_show_tokens_and_categories(lens):
    fig = viz.lens_heatmap(lens, prompt=2)
    ax = fig.axes[0]
    assert len(ax.texts) == (lens.n_layers + 1) * lens.top_k
    # cell (layer 1, rank 2) holds that token and its probability
    t = ax.texts[1 * lens.top_k + 2].get_text()
    assert t == f"{viz.token_cell_text(lens.tokens[2, 1, 2])[:10]}\n{float(lens.top_probs[2, 1, 2]):.2f}"
    img = ax.images[0].get_array()
    assert to_hex(img[1, 2]) == viz.category_color(lens.top_categories[2, 1, 2], light=True)
    fig2 = viz.lens_heatmap(lens, label="harmful")
    cons = lens.consistency(n_top=3)
    top = cons[(cons.label == "harmful") & (cons.layer == 0)].top_tokens.iloc[0]
    assert fig2.axes[0].texts[0].get_text().endswith(f"{top[0][1]}/2")
    with pytest.raises(InputError):
        viz.lens_heatmap(lens, prompt=10)


def test_mass_curves_plot_the_means(lens):
    fig = lens.plot("mass")
    cm = lens.category_mass()
    ax = fig.axes[0]  # refusal
    lines = {ln.get_label().split(" ")[0]: ln for ln in ax.get_lines()}
    assert set(lines) == {"harmless", "harmful"}
    want = cm[(cm.label == "harmful") & (cm.category == "refusal")]["mean"].to_numpy()
    assert np.allclose(lines["harmful"].get_ydata(), want)
    assert len(fig.axes) == 2


def test_views_html_is_offline_and_escaped(lens, tmp_path):
    views = [viz.lens_topk_view(lens, [0, 2]), viz.token_scores_view(["I", "'m", " sorry"], [0.1, -0.5, 0.9])]
    frag = viz.views_html(views, captions=["<b>harmful</b>", "scores & more"])
    assert "&lt;b&gt;harmful&lt;/b&gt;" in frag and "scores &amp; more" in frag and "<b>harmful" not in frag
    assert frag.count("CircuitsVis.render(") == 2 and frag.count(circuitsvis_bundle()) == 1  # bundle inlined once
    assert not re.search(r"<script[^>]+src=", frag)  # no CDN: the bundle is inlined
    assert all(safe_json(v.props) in frag for v in views)
    path = viz.save_views(views, tmp_path / "sub" / "v.html", title="Lens <views>")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>Lens &lt;views&gt;</title>" in text
    assert len(text) > 1_000_000 and not list(path.parent.glob("*.tmp"))
    with pytest.raises(InputError):
        viz.token_scores_view(["a", "b"], [1.0])
    with pytest.raises(InputError):
        viz.views_html(["not a view"])


def test_view_props_cannot_close_the_script():
    view = viz.token_scores_view(["</script><script>alert(1)</script>", "ok"], [0.5, -0.5])
    frag = viz.views_html([view])
    after_bundle = frag.split("</script>", 1)[1]  # skip the inlined bundle's own script element
    assert "alert(1)</script>" not in after_bundle and "\\u003c/script\\u003e" in after_bundle
    assert after_bundle.count("<script>") == after_bundle.count("</script>") == 1


@pytest.mark.browser
def test_views_render_offline_in_chromium(lens, tmp_path, chromium):
    from conftest import render_page

    tokens = ["Refusal", "marker", "QzxTOKEN"]
    views = [viz.token_scores_view(tokens, [0.9, -0.2, 0.5]), viz.lens_topk_view(lens, [1])]
    path = viz.save_views(views, tmp_path / "views.html", title="render check")
    page = render_page(chromium, path)
    assert page.console_errors == []
    # every circuitsvis placeholder was replaced by rendered markup
    assert len(page.views) == 2 and all(n >= 3 for n in page.views.values()), page.views
    body = re.sub(r"<script.*?</script>", "", page.dom, flags=re.S)
    # the React components rendered: coloured token spans and the top-k table with a lens token
    assert "QzxTOKEN" in body and 'class="colored-tokens"' in body
    assert "<table" in body and "Lens probability" in body
    assert re.sub(r"\s+", "", str(lens.tokens[1, 0, 0])) in re.sub(r"\s+", "", body.replace("&amp;", "&"))


@pytest.mark.browser
def test_browser_check_detects_a_broken_view(tmp_path, chromium):
    """The render check can fail: a view of an unknown component renders nothing and logs an error."""
    from conftest import render_page

    from lens_safety.htmlreport import OfflineView

    path = viz.save_views([OfflineView("NoSuchComponent", {"tokens": ["a"]})], tmp_path / "broken.html")
    page = render_page(chromium, path)
    assert list(page.views.values()) == [0]
    assert page.console_errors


def test_trajectory_view_values_and_escaping(lens):
    view = viz.lens_trajectory_view(lens, 3)
    m = lens.mass[3]
    diff = (m[:, 0] - m[:, 1]).tolist()
    src = safe_json(view.props)
    for layer in (0, lens.n_layers):
        assert f"[{layer}]" in src
    assert f"{diff[-1]}"[:8] in src  # the layer's refusal-minus-positive value is passed to the view
    assert viz.visible_text("\n") == "\\n" and viz.visible_text("a\tb") == "a\\tb" and viz.visible_text(" ") == "' '"
    assert viz.token_cell_text("a\u200bb") == "a\\u200bb"
    with pytest.raises(InputError):
        viz.lens_trajectory_view(lens, 99)


def test_missing_browser_fails_in_ci(tmp_path):
    """conftest turns a browser skip into a failure when CI is set (so CI cannot pass without the check)."""
    import os
    import subprocess
    import sys

    test = "tests/test_viz.py::test_browser_check_detects_a_broken_view"
    root = __import__("pathlib").Path(__file__).parent.parent
    runs = {}
    for ci in ("1", ""):
        env = dict(os.environ, CHROMIUM=str(tmp_path / "no-such-chromium"), CI=ci)
        runs[ci] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                  cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert runs["1"].returncode == 1 and "browser test skipped in CI" in runs["1"].stdout
    assert runs[""].returncode == 0 and "1 skipped" in runs[""].stdout
