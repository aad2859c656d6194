"""HTML pieces of the static reports (`refrl.eval.report`, `refrl.eval.overlay`): the page, its
CSS, escaped cells, tables and embedded PNG images. No JavaScript."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence
from typing import Any

FLOAT_DIGITS = 4

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1d232a;background:#fff;line-height:1.45;padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;border-bottom:2px solid #e3e7eb;padding-bottom:4px;
margin-top:34px}h3{font-size:16px;margin-bottom:6px}.lead{font-size:16px;color:#37414b}
.muted{color:#6b7782;font-size:13px}table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d5dbe0;padding:4px 9px;text-align:right}th{background:#f2f5f7}
td.l,th.l{text-align:left}.up{color:#137a2e;font-weight:600}.down{color:#b3261e;font-weight:600}
img.plot{max-width:100%;border:1px solid #e3e7eb;margin:6px 0}img.grid{image-rendering:pixelated;
max-width:100%;border:1px solid #e3e7eb;margin:6px 0}pre{background:#f6f8fa;padding:10px;overflow-x:auto;
font-size:12px}.card{display:inline-block;vertical-align:top;margin:0 18px 8px 0}nav a{margin-right:14px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{FLOAT_DIGITS}g}"
    return _e(v)


def _img(data: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Cells are HTML already (escape before); the first ``left`` columns align left."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def html_page(title: str, lead_html: str, where: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The static page: title, lead, a navigation bar and one ``<h2>`` per (anchor, title, body HTML)."""
    nav = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t, _ in sections)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class='lead'>{lead_html}</p>"
        f"<p class='muted'>{_e(where)} · written {stamp}</p><nav>{nav}</nav>"
        + "".join(f"<h2 id='{_e(a)}'>{_e(t)}</h2>{b}" for a, t, b in sections)
        + "</body></html>\n"
    )
