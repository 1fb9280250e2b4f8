"""A self-contained HTML document: escaped text, embedded figures, tables, offline circuitsvis views.

Everything that comes from data (prompt text, token strings, table cells) is HTML-escaped;
circuitsvis props are JSON with ``<``, ``>`` and ``&`` escaped, so a prompt containing
``</script>`` cannot leave its script. The circuitsvis bundle is inlined once per page, so
the file opens offline and loads nothing from a URL.

>>> doc = HtmlDocument("t")
>>> doc.paragraph("<b>not bold</b>")
>>> "&lt;b&gt;not bold&lt;/b&gt;" in doc.render()
True
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from .errors import UnknownNameError
from .store import write_text_atomic

__all__ = ["HtmlDocument", "OfflineView", "safe_json", "circuitsvis_bundle", "circuitsvis_props"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:0.85em;margin:0.8em 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2}figure{margin:1em 0}figcaption{font-size:0.9em;color:#555}
.claim{background:#f6f8fa;border-left:4px solid #3a6ea5;padding:0.6em 1em;margin:1em 0}
.number{font-weight:bold;color:#3a6ea5}figure{overflow-x:auto}td{vertical-align:top;max-width:40em}
.verdict{padding:0.5em 1em;margin:0.6em 0;border-left:4px solid #888;background:#f7f7f7}
.verdict.reproduced{border-color:#2ca02c;background:#eef8ee}.verdict.partly{border-color:#e69f00;background:#fdf6e8}
.verdict.not-reproduced{border-color:#d62728;background:#fbeeee}details{margin:0.4em 0 1em 0}summary{cursor:pointer}
.note{color:#8a5a00}.prompt{font-family:monospace;font-size:0.85em;
white-space:pre-wrap;background:#fafafa;border:1px solid #eee;padding:0.4em}
"""


def safe_json(obj: Any) -> str:
    """JSON that is safe inside ``<script>``: no ``<``, ``>`` or ``&`` characters survive."""
    return (json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def circuitsvis_bundle() -> str:
    """The circuitsvis JavaScript bundle shipped in the package (no CDN)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


def _to_jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_jsonable(x) for k, x in v.items()}
    return v


def circuitsvis_props(view_fn, *args, **kwargs) -> tuple[str, dict[str, Any]]:
    """(React element name, props) that a circuitsvis view function would render."""
    import sys

    module = sys.modules[view_fn.__module__]
    captured: dict[str, Any] = {}
    original = module.render
    module.render = lambda name, **props: captured.update(name=name, props=props)
    try:
        view_fn(*args, **kwargs)
    finally:
        module.render = original
    if "name" not in captured:
        raise TypeError(f"{view_fn.__name__} is not a circuitsvis view function.")
    return captured["name"], captured["props"]


class OfflineView:
    """A circuitsvis view held as (React element, props), rendered safely and offline.

    ``_repr_html_`` (Jupyter) and :meth:`html` inline the circuitsvis bundle, so nothing is
    loaded from a CDN; props are embedded with :func:`safe_json`. Pages with several views
    should use :class:`HtmlDocument`, which inlines the bundle once.
    """

    def __init__(self, element: str, props: dict[str, Any], caption: str | None = None) -> None:
        self.element = element
        self.props = {k: _to_jsonable(v) for k, v in props.items() if v is not None}
        self.caption = caption

    @classmethod
    def from_function(cls, view_fn, *args, caption: str | None = None, **kwargs) -> OfflineView:
        element, props = circuitsvis_props(view_fn, *args, **kwargs)
        return cls(element, props, caption)

    def html(self, include_bundle: bool = True) -> str:
        import uuid

        vid = f"cv-{uuid.uuid4().hex[:12]}"
        bundle = f"<script>{circuitsvis_bundle()}</script>" if include_bundle else ""
        cap = f"<figcaption>{html.escape(self.caption)}</figcaption>" if self.caption else ""
        return (f'{bundle}<figure><div id="{vid}" class="cv-view" style="margin:10px 0"></div>{cap}</figure>'
                f"<script>CircuitsVis.render({safe_json(vid)}, CircuitsVis[{safe_json(self.element)}], "
                f"{safe_json(self.props)});</script>")

    def _repr_html_(self) -> str:
        return self.html()

    def __repr__(self) -> str:
        return f"OfflineView({self.element!r}, props={sorted(self.props)})"


class HtmlDocument:
    """Build a single offline HTML page section by section."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []
        self._views = 0

    # text
    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> None:
        aid = f' id="{html.escape(anchor, quote=True)}"' if anchor else ""
        self._parts.append(f"<h{level}{aid}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css: str | None = None) -> None:
        cls = f' class="{html.escape(css, quote=True)}"' if css else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def claim(self, claim: str, number: str | None = None) -> None:
        num = f'<br><span class="number">{html.escape(number)}</span>' if number else ""
        self._parts.append(f'<div class="claim">{html.escape(claim)}{num}</div>')

    def verdict(self, status: str, text: str) -> None:
        """A verdict box, coloured by ``status`` ("reproduced", "partly", "not reproduced", ...)."""
        css = html.escape(status.replace(" ", "-"), quote=True)
        self._parts.append(f'<div class="verdict {css}">{html.escape(text)}</div>')

    def bullets(self, items: list[str]) -> None:
        self._parts.append("<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in items) + "</ul>")

    def prompt_text(self, text: str) -> None:
        self._parts.append(f'<div class="prompt">{html.escape(text)}</div>')

    # data
    def table(self, frame, caption: str | None = None, max_rows: int = 60, float_format: str = "{:.3f}",
              columns: list[str] | None = None, collapsed: bool = False) -> None:
        """An escaped table. With ``columns``, only those are shown and the full table (every
        column) follows collapsed in a ``<details>`` element; ``collapsed`` folds the whole table
        under its caption."""
        if collapsed:
            summary = html.escape(caption or f"Table ({len(frame)} rows)")
            self._parts.append(f"<details><summary>{summary}</summary>"
                               f"<figure>{self._html_table(frame, max_rows, float_format)}</figure></details>")
            return
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        more = (f"<p class='note'>{len(frame) - max_rows} more rows in the CSV.</p>"
                if len(frame) > max_rows else "")
        if columns is not None:
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise UnknownNameError(f"columns {missing} are not in the table; it has {list(frame.columns)}.")
            full = self._html_table(frame, max_rows, float_format)
            shown = self._html_table(frame[columns], max_rows, float_format)
            extra = (f"<details><summary>Full table ({len(frame.columns)} columns)</summary>{full}</details>"
                     if len(columns) < len(frame.columns) else "")
            self._parts.append(f"<figure>{shown}{cap}</figure>{more}{extra}")
            return
        self._parts.append(f"<figure>{self._html_table(frame, max_rows, float_format)}{cap}</figure>{more}")

    @staticmethod
    def _html_table(frame, max_rows: int, float_format: str) -> str:
        return frame.head(max_rows).to_html(index=False, escape=True, border=0,
                                            float_format=lambda x: float_format.format(x), na_rep="")

    def figure(self, fig, caption: str | None = None, dpi: int = 110) -> bytes:
        """Embed a matplotlib figure as a base64 PNG; returns the PNG bytes."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        png = buf.getvalue()
        self.image(png, caption)
        return png

    def image(self, png: bytes, caption: str | None = None) -> None:
        data = base64.b64encode(png).decode()
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        alt = html.escape(caption or "figure", quote=True)
        self._parts.append(f'<figure><img alt="{alt}" style="max-width:100%" '
                           f'src="data:image/png;base64,{data}">{cap}</figure>')

    def view(self, view: OfflineView, caption: str | None = None) -> None:
        """Add a circuitsvis view; the page inlines the bundle once, in its head."""
        self._views += 1
        if caption is not None:
            view = OfflineView(view.element, view.props, caption)
        self._parts.append(view.html(include_bundle=False))

    def raw(self, trusted_html: str) -> None:
        """Append HTML built by this package (never pass user or prompt text here)."""
        self._parts.append(trusted_html)

    def render(self) -> str:
        bundle = f"<script>{circuitsvis_bundle()}</script>" if self._views else ""
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                f"img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style>{bundle}</head><body>"
                f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self._parts) + "</body></html>")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page atomically."""
        return write_text_atomic(path, self.render())
