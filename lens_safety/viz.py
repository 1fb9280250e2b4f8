"""Figures and offline circuitsvis views.

Matplotlib helpers return a ``Figure`` (never ``plt.show()``); other modules may reuse
:func:`line_with_band`, :func:`new_figure` and :data:`CATEGORY_COLORS`.

circuitsvis views are saved as **self-contained offline HTML**: each view's ``local_src``
inlines the ~1.3 MB JavaScript bundle (``str(view)`` would load it from a CDN and stay blank
offline), and a ``</div>`` is appended after each view because ``local_src`` starts with a
self-closing ``<div .../>`` that HTML does not close. Text added around views is escaped.

>>> import lens_safety as ls
>>> view = token_scores_view(["I", "'m", " sorry"], [0.1, 0.2, 0.9])
>>> "sorry" in views_html([view])
True
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .htmlreport import HtmlDocument, OfflineView, circuitsvis_bundle

__all__ = ["CATEGORY_COLORS", "new_figure", "figure_axes", "line_with_band", "lens_heatmap", "category_mass_figure",
           "graft_figure", "label_colors", "lens_topk_view", "lens_trajectory_view", "token_scores_view", "views_html",
           "save_views"]

#: Colours of lexicon categories (unknown categories cycle through the tab10 palette).
CATEGORY_COLORS: dict[str, str] = {"refusal": "#d62728", "positive": "#2ca02c", "neutral": "#d9d9d9"}
_LIGHT = {"refusal": "#f4a6a6", "positive": "#a8dba8", "neutral": "#f2f2f2"}
_LABEL_COLORS = {"harmless": "#2ca02c", "harmful": "#d62728", "jailbreak": "#9467bd"}


def _color(category: str, light: bool = False) -> str:
    table = _LIGHT if light else CATEGORY_COLORS
    if category in table:
        return table[category]
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    return matplotlib.colors.to_hex(palette[sum(map(ord, category)) % len(palette)])


_OTHER_COLORS = ("#9467bd", "#1f77b4", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """A distinct colour per label: harmless green, harmful red, others (jailbreaks...) from a palette."""
    out = {lab: _LABEL_COLORS[lab] for lab in labels if lab in _LABEL_COLORS}
    free = [c for c in _OTHER_COLORS if c not in out.values()]
    for lab in labels:
        if lab not in out:
            out[lab] = free.pop(0) if free else _OTHER_COLORS[len(out) % len(_OTHER_COLORS)]
    return out


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0), **kwargs):
    """A new figure and its 2-D array of axes, made through pyplot so that Jupyter shows it (even
    after a trailing ``;``). Code that saves figures in a loop closes them (``plt.close(fig)``)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False,
                             layout="constrained", **kwargs)
    return fig, axes


def figure_axes(ax=None, size: tuple[float, float] = (6.0, 4.0)):
    """The convention of every ``plot``/figure function: draw on ``ax`` when given (return its
    figure), else on a new figure (:func:`new_figure`). Returns ``(fig, ax)``.

    >>> fig, ax = figure_axes()
    >>> fig is ax.figure
    True
    """
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(size=size)
    return fig, axes[0, 0]


def line_with_band(ax, x, mean, low, high, *, label: str | None = None, color: str | None = None) -> None:
    """A mean curve with a shaded confidence band."""
    line, = ax.plot(x, mean, label=label, color=color, marker="o", markersize=3)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


# -- lens figures ---------------------------------------------------------------------------------

_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Micro Hei",
              "WenQuanYi Zen Hei", "Droid Sans Fallback", "AR PL UMing CN", "SimHei", "Microsoft YaHei")


@functools.cache
def _fonts() -> tuple[tuple[str, ...], frozenset[int]]:
    """Font families for token text (DejaVu Sans plus any installed CJK font) and the code points
    they cover; characters outside it are shown as escapes instead of empty boxes."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    families, covered = [], set()
    installed = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    for name in ("DejaVu Sans",) + _CJK_FONTS:
        if name in installed:
            try:
                covered.update(FT2Font(installed[name]).get_charmap())
                families.append(name)
            except Exception:  # an unreadable font file: skip it
                continue
    return tuple(families) or ("sans-serif",), frozenset(covered)


def _script(c: str) -> str:
    o = ord(c)
    if 0x3400 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF:
        return "zh"
    if 0x3040 <= o <= 0x30FF:
        return "ja"
    if 0xAC00 <= o <= 0xD7AF:
        return "ko"
    return f"U+{o:04X}"


def _display(piece: str) -> str:
    """A token piece as cell text. Characters no available font renders become a short tag
    (``[zh×4]`` for four CJK characters, ``[U+XXXX]`` otherwise) instead of empty boxes;
    control characters are escaped."""
    covered = _fonts()[1]
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            tag = run[0]
            out.append(f"[{tag}×{len(run)}]" if tag in ("zh", "ja", "ko") and len(run) > 1 else f"[{tag}]")
            run.clear()

    for c in piece:
        if not c.isprintable():
            flush()
            out.append(c.encode("unicode_escape").decode())
        elif covered and ord(c) >= 128 and ord(c) not in covered:
            tag = _script(c)
            if run and run[0] != tag:
                flush()
            run.append(tag)
        else:
            flush()
            out.append(c)
    flush()
    s = "".join(out)
    return s if s.strip() else repr(piece)


def lens_heatmap(result, prompt: int | None = None, label: str | None = None, layers: Sequence[int] | None = None,
                 max_chars: int = 10):
    """Layers x rank table of lens tokens, cells coloured by lexicon category (the paper's figure).

    ``prompt=i``: that prompt's top-k tokens, cell text = token and probability. Otherwise
    the set (``label``, or all prompts) is summarised by its most frequent tokens per layer
    (as counted by :meth:`LensResult.consistency`), cell text = token and count/N.
    """
    from matplotlib.colors import to_rgb

    if prompt is not None and not -len(result) <= prompt < len(result):
        raise InputError(f"prompt must index one of the {len(result)} prompts, got {prompt}.")
    layers = list(range(result.n_layers + 1)) if layers is None else list(layers)
    k = result.top_k
    cells: list[list[tuple[str, str]]] = []
    if prompt is not None:
        for layer in layers:
            cells.append([(f"{_display(result.tokens[prompt, layer, r])[:max_chars]}\n"
                           f"{float(result.top_probs[prompt, layer, r]):.2f}",
                           str(result.top_categories[prompt, layer, r])) for r in range(k)])
        title = f"Logit lens, prompt {prompt} ({result.labels[prompt]})"
    else:
        sub = result
        if label is not None:
            rows = result._label_rows(label)
            sub = _subset(result, rows)
        cons = sub.consistency(by=None, n_top=k)
        n = len(sub)
        for layer in layers:
            top = cons.loc[cons["layer"] == layer, "top_tokens"].iloc[0]
            row = [(f"{_display(t)[:max_chars]}\n{c}/{n}", result.lexicon.category_of(t)) for t, c in top]
            row += [("", result.lexicon.neutral)] * (k - len(row))
            cells.append(row)
        title = f"Logit lens, most frequent tokens ({label or 'all'}, N={n})"
    rgb = np.array([[to_rgb(_color(c, light=True)) for _, c in row] for row in cells])
    fig, axes = new_figure(size=(1.3 * k + 1.5, 0.32 * len(layers) + 1.2))
    ax = axes[0, 0]
    ax.imshow(rgb, aspect="auto", origin="lower")
    for i, row in enumerate(cells):
        for j, (text, _) in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=6, fontfamily=list(_fonts()[0]))
    ax.set_xticks(range(k), [f"top {r + 1}" for r in range(k)])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("residual layer (0 = embedding)")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=_color(c, light=True), label=c) for c in result.categories],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    return fig


def _subset(result, rows):
    from dataclasses import replace

    from .prompts import PromptSet

    rows = np.asarray(rows)
    return replace(result, top_ids=result.top_ids[rows], top_probs=result.top_probs[rows],
                   tokens=result.tokens[rows], top_categories=result.top_categories[rows],
                   mass=result.mass[rows], prompts=PromptSet([result.prompts[int(i)] for i in rows],
                                                             result.prompts.name))


def category_mass_figure(result, categories: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                         level: float = 0.95):
    """Per category, the mean lens probability mass per layer for each set, with CI bands."""
    cats = [c for c in result.categories if c != result.lexicon.neutral] if categories is None else list(categories)
    for c in cats:
        if c not in result.categories:
            raise InputError(f"Unknown category {c!r}; this lens has {result.categories}.")
    frame = result.category_mass(by="label", level=level)
    labels = list(dict.fromkeys(result.labels)) if labels is None else list(labels)
    colors = label_colors(labels)
    fig, axes = new_figure(1, len(cats), sharex=True)
    for ax, cat in zip(axes[0], cats):
        for lab in labels:
            f = frame[(frame["label"] == lab) & (frame["category"] == cat)]
            if f.empty:
                raise InputError(f"No prompts with label {lab!r}.")
            line_with_band(ax, f["layer"], f["mean"], f["ci_low"].clip(lower=0), f["ci_high"].clip(upper=1),
                           label=f"{lab} (n={int(f['n'].iloc[0])})", color=colors[lab])
        ax.set_title(f"{cat} token mass", fontsize=10)
        ax.set_xlabel("residual layer (0 = embedding)")
        ax.set_ylabel("mean probability")
        ax.legend(fontsize=7)
    return fig


def graft_figure(result, level: float = 0.95):
    """Left: mean refusal score after grafting at each layer (CI band) and the ungrafted mean.
    Right: the mean paired change (grafted - ungrafted) with its CI; below 0 = less refusal."""
    frame = result.to_frame(level=level)
    fig, axes = new_figure(1, 2, sharex=True)
    ax, ax2 = axes[0]
    line_with_band(ax, frame["layer"], frame["score"], frame["score_ci_low"], frame["score_ci_high"],
                   label=f"grafted ({result.donor})", color="#1f77b4")
    ax.axhline(float(frame["score_before"].iloc[0]), color="#d62728", linestyle="--", label="no graft")
    ax.set_ylabel("refusal log-odds (last position)")
    ax.set_title(f"Logit grafting, {result.model_name} (n={len(result.prompts)})", fontsize=10)
    ax.legend(fontsize=7)
    line_with_band(ax2, frame["layer"], frame["delta"], frame["delta_ci_low"], frame["delta_ci_high"],
                   color="#1f77b4")
    ax2.axhline(0.0, color="grey", linewidth=0.8)
    ax2.set_ylabel("change in refusal log-odds")
    ax2.set_title(f"best layer {result.best_layer()} (largest drop)", fontsize=10)
    for a in (ax, ax2):
        a.set_xlabel("grafted residual layer (0 = embedding)")
    return fig


# -- circuitsvis views --------------------------------------------------------------------------

def _visible(piece: str) -> str:
    """Control characters escaped (a newline token would otherwise break the view's layout)."""
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(piece))
    return s if s.strip() else repr(str(piece))


def _short(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def lens_topk_view(result, prompts: Sequence[int] = (0,)):
    """circuitsvis ``topk_tokens`` view: for each chosen prompt, the top-k lens tokens per layer.

    Each sample's "tokens" are the distinct tokens that reach a prompt's top-k at some layer;
    the activation of a token at a layer is its lens probability there (0 where it is not in
    that layer's top-k), so the view's top-k column is exactly the lens top-k.
    """
    from circuitsvis.topk_tokens import topk_tokens

    prompts = [int(p) for p in prompts]
    if not prompts:
        raise InputError("Choose at least one prompt index.")
    tokens, acts, names = [], [], []
    for p in prompts:
        if not -len(result) <= p < len(result):
            raise InputError(f"prompt index {p} is out of range for {len(result)} prompts.")
        ids = result.top_ids[p]  # [layer, k]
        uniq = list(dict.fromkeys(ids.reshape(-1).tolist()))
        pos = {t: i for i, t in enumerate(uniq)}
        a = np.zeros((result.n_layers + 1, len(uniq), 1), dtype=np.float32)  # [layer, token, column]
        for layer in range(result.n_layers + 1):
            for r in range(result.top_k):
                a[layer, pos[int(ids[layer, r])], 0] = float(result.top_probs[p, layer, r])
        pieces = {int(i): _visible(t) for i, t in zip(ids.reshape(-1).tolist(), result.tokens[p].reshape(-1))}
        tokens.append([pieces[t] for t in uniq])
        acts.append(a)
        names.append(f"{p}: [{result.labels[p]}] {_short(result.prompts[p].text, 60)}")
    return OfflineView.from_function(
        topk_tokens, tokens, acts, max_k=result.top_k, first_dimension_name="Layer",
        third_dimension_name="Lens probability", sample_labels=names,
        first_dimension_labels=[f"layer {i}" for i in range(result.n_layers + 1)])


def lens_trajectory_view(result, prompt: int = 0, refusal: str = "refusal", over: str = "positive"):
    """circuitsvis ``colored_tokens``: the top-1 lens token of each layer, coloured by the layer's
    refusal mass minus positive mass (red = refusal, green = positive)."""
    if not -len(result) <= prompt < len(result):
        raise InputError(f"prompt index {prompt} is out of range for {len(result)} prompts.")
    for c in (refusal, over):
        if c not in result.categories:
            raise InputError(f"Unknown category {c!r}; this lens has {result.categories}.")
    m = result.mass[prompt]
    values = (m[:, result.categories.index(refusal)] - m[:, result.categories.index(over)]).tolist()
    tokens = [f"[{layer}]{_visible(result.tokens[prompt, layer, 0])} " for layer in range(result.n_layers + 1)]
    return token_scores_view(tokens, values, min_value=-1.0, max_value=1.0,
                             negative_color="#2ca02c", positive_color="#d62728")


def token_scores_view(tokens: Sequence[str], values: Sequence[float] | np.ndarray, *,
                      min_value: float | None = None, max_value: float | None = None,
                      negative_color: str | None = None, positive_color: str | None = None):
    """circuitsvis ``colored_tokens`` for per-token scores (probe scores, lens scores...)."""
    from circuitsvis.tokens import colored_tokens

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(tokens) != values.size:
        raise InputError(f"{len(tokens)} tokens but {values.size} values: give one value per token.")
    kwargs: dict[str, Any] = {}
    for name, v in (("min_value", min_value), ("max_value", max_value), ("negative_color", negative_color),
                    ("positive_color", positive_color)):
        if v is not None:
            kwargs[name] = v
    return OfflineView.from_function(colored_tokens, [str(t) for t in tokens], values.tolist(), **kwargs)


def views_html(views: Sequence[OfflineView], captions: Sequence[str] | None = None, title: str | None = None) -> str:
    """An HTML fragment holding the views offline: the circuitsvis bundle inlined once, props
    embedded as script-safe JSON, captions and title escaped."""
    views = _check_views(views, captions)
    parts = [f"<h2>{html.escape(title)}</h2>"] if title else []
    parts.append(f"<script>{circuitsvis_bundle()}</script>")
    for i, v in enumerate(views):
        cap = captions[i] if captions is not None else v.caption
        parts.append(OfflineView(v.element, v.props, cap).html(include_bundle=False))
    return "\n".join(parts)


def _check_views(views: Sequence[Any], captions: Sequence[str] | None) -> list[OfflineView]:
    views = list(views)
    if captions is not None and len(captions) != len(views):
        raise InputError(f"{len(captions)} captions for {len(views)} views.")
    for i, v in enumerate(views):
        if not isinstance(v, OfflineView):
            raise InputError(f"View {i} is a {type(v).__name__}, not a view from lens_safety.viz "
                             "(wrap circuitsvis functions with OfflineView.from_function).")
    return views


def save_views(views: Sequence[OfflineView], path: str | os.PathLike, title: str = "lens_safety views",
               captions: Sequence[str] | None = None) -> Path:
    """Write one self-contained HTML page (works offline) atomically; returns its path."""
    doc = HtmlDocument(title)
    for i, v in enumerate(_check_views(views, captions)):
        doc.view(v, captions[i] if captions is not None else None)
    return doc.save(path)
