"""Drawing primitives (colours, figures, bands) and offline circuitsvis views.

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

__all__ = ["CATEGORY_COLORS", "new_figure", "figure_axes", "line_with_band", "label_colors", "category_color",
           "panel_axes", "token_fonts", "token_cell_text", "visible_text", "shorten", "token_scores_view",
           "views_html", "save_views"]

#: Colours of lexicon categories (unknown categories cycle through the tab10 palette).
CATEGORY_COLORS: dict[str, str] = {"refusal": "#d62728", "positive": "#2ca02c", "neutral": "#d9d9d9"}
_LIGHT = {"refusal": "#f4a6a6", "positive": "#a8dba8", "neutral": "#f2f2f2"}
_LABEL_COLORS = {"harmless": "#2ca02c", "harmful": "#d62728", "jailbreak": "#9467bd"}


def category_color(category: str, light: bool = False) -> str:
    """The colour of a lexicon category (``light``: the pale one, for heatmap cells)."""
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
def token_fonts() -> tuple[tuple[str, ...], frozenset[int]]:
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


def token_cell_text(piece: str) -> str:
    """A token piece as cell text. Characters no available font renders become a short tag
    (``[zh×4]`` for four CJK characters, ``[U+XXXX]`` otherwise) instead of empty boxes;
    control characters are escaped."""
    covered = token_fonts()[1]
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



def panel_axes(ax, n: int, size: tuple[float, float] = (6.0, 4.0), **kwargs):
    """``(fig, [ax...])`` for an ``n``-panel figure: new axes, or the caller's ``ax`` (one Axes when
    ``n == 1``, else a sequence of ``n`` axes)."""
    if ax is None:
        fig, axes = new_figure(1, n, size=size, **kwargs)
        return fig, list(axes[0])
    axs = [ax] if hasattr(ax, "plot") else list(np.ravel(ax))
    if len(axs) != n:
        raise InputError(f"This figure has {n} panels; pass ax= as a sequence of {n} axes (got {len(axs)}), "
                         "or leave ax=None for a new figure.")
    return axs[0].figure, axs



# -- circuitsvis views --------------------------------------------------------------------------

def visible_text(piece: str) -> str:
    """Control characters escaped (a newline token would otherwise break the view's layout)."""
    s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(piece))
    return s if s.strip() else repr(str(piece))


def shorten(text: str, n: int = 80) -> str:
    """``text`` on one line, cut to at most ``n`` characters (an ellipsis marks the cut)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"




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
            raise InputError(f"View {i} is a {type(v).__name__}, not a view from lens_safety.analyses.figures "
                             "(wrap circuitsvis functions with OfflineView.from_function).")
    return views


def save_views(views: Sequence[OfflineView], path: str | os.PathLike, title: str = "lens_safety views",
               captions: Sequence[str] | None = None) -> Path:
    """Write one self-contained HTML page (works offline) atomically; returns its path."""
    doc = HtmlDocument(title)
    for i, v in enumerate(_check_views(views, captions)):
        doc.view(v, captions[i] if captions is not None else None)
    return doc.save(path)


# -- directions figures ---------------------------------------------------------------------------

