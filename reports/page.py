"""The page: an ordered list of escaped HTML blocks wrapped in one self-contained document.

No script, no external stylesheet, font, image or link: the page renders offline from a single
file. Every string that comes from outside (titles, captions, metadata, table cells) goes
through `escape`; only SVG produced by `reports.charts` and HTML produced by
`reports.tables` is inserted as markup.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from .tables import escape, html_table

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1em 2em 4em; color: #1a1a1a; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.notice { background: #fff3cd; border: 1px solid #e0b100; padding: 0.7em 1em; margin: 1em 0;
          font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 0.9em; min-width: 12em; flex: 1; }
.card .label { font-size: 0.85em; color: #555; } .card .value { font-size: 1.5em; font-weight: 700; }
.card .detail { font-size: 0.8em; color: #666; }
figure.chart { margin: 1.2em 0; } figure.chart svg { max-width: 100%; height: auto; }
figure.chart figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
p.missing, figure.missing { color: #8a4b00; font-style: italic; }
table.data { border-collapse: collapse; font-size: 12px; margin: 0.8em 0; }
table.data caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
table.data th, table.data td { border: 1px solid #ddd; padding: 2px 6px; white-space: nowrap; }
table.data th { background: #f3f3f3; position: sticky; top: 0; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-height: 40em; overflow-y: auto; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: ui-monospace, monospace;
            white-space: pre-wrap; word-break: break-all; }
"""


def slug(text: str) -> str:
    """A lowercase id made of [a-z0-9-] from any text (for anchors and data-chart names)."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "section"


class Report:
    """An HTML report under construction: add blocks in reading order, then `to_html()`/`write()`.

    title: page title; metadata: flat mapping shown in the method/machine block (values are
    str()-ed and escaped); notice: an optional warning shown at the very top (e.g. "not GPU
    timings").
    """

    def __init__(self, title: str, metadata: Mapping[str, object] | None = None, notice: str | None = None):
        self.title = title
        self.metadata = dict(metadata or {})
        self.notice = notice
        self.blocks: list[str] = []
        self.sections: list[tuple[str, str]] = []  # (anchor, heading) for the table of contents

    def add_section(self, heading: str, intro: str | None = None) -> None:
        """Start a new <h2> section (listed in the contents), with an optional intro paragraph."""
        anchor = slug(heading)
        while any(anchor == a for a, _ in self.sections):
            anchor += "-x"
        self.sections.append((anchor, heading))
        self.blocks.append(f'<h2 id="{anchor}">{escape(heading)}</h2>')
        if intro:
            self.add_text(intro)

    def add_text(self, text: str) -> None:
        """A paragraph of plain (escaped) text."""
        self.blocks.append(f"<p>{escape(text)}</p>")

    def add_list(self, items: Iterable[str]) -> None:
        """A bullet list of plain (escaped) text items."""
        self.blocks.append("<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>")

    def add_summary(self, cards: Iterable[tuple[str, str, str]]) -> None:
        """Headline numbers as cards: (label, value, detail) each, all plain text."""
        html = "".join(
            f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{escape(value)}</div>'
            f'<div class="detail">{escape(detail)}</div></div>'
            for label, value, detail in cards
        )
        self.blocks.append(f'<div class="cards">{html}</div>')

    def add_chart(self, name: str, svg: str | None, caption: str = "", missing: str | None = None) -> None:
        """Inline a chart SVG from `reports.charts`; with svg=None show `missing` (why there is no chart)."""
        if svg is None:
            reason = missing or "no data"
            self.blocks.append(f'<figure class="chart missing" data-chart="{escape(slug(name))}">'
                               f'<p class="missing">{escape(name)}: not shown ({escape(reason)})</p></figure>')
            return
        if not svg.lstrip().startswith("<svg"):
            raise ValueError("add_chart: svg must be an <svg> element from reports.charts, got other markup")
        self.blocks.append(f'<figure class="chart" data-chart="{escape(slug(name))}">{svg}'
                           f"<figcaption>{escape(caption)}</figcaption></figure>")

    def add_table(self, frame: pd.DataFrame, columns: list[str] | None = None, caption: str | None = None,
                  table_id: str | None = None) -> None:
        """A scrollable, escaped data table (see `reports.tables.html_table`)."""
        self.blocks.append(f'<div class="scroll">{html_table(frame, columns, caption, table_id)}</div>')

    def add_metadata(self, heading: str = "Method and machine", extra: Mapping[str, object] | None = None) -> None:
        """The metadata mapping (plus `extra`) as a definition list under its own section."""
        self.add_section(heading)
        items = {**self.metadata, **(extra or {})}
        rows = "".join(f"<dt>{escape(key)}</dt><dd>{escape(value)}</dd>" for key, value in items.items())
        self.blocks.append(f'<dl class="meta">{rows}</dl>')

    def add_downloads(self, files: Mapping[str, tuple[str, bytes]]) -> None:
        """Embedded download links: {file name: (MIME type, content)} as data: URIs (no external file)."""
        links = []
        for name, (mime, content) in files.items():
            data = base64.b64encode(content).decode("ascii")
            links.append(f'<a download="{escape(name)}" href="data:{escape(mime)};base64,{data}">{escape(name)}</a>')
        self.blocks.append("<p>Raw rows: " + " \u00b7 ".join(links) + "</p>")

    def to_html(self) -> str:
        """The complete document as one string."""
        contents = "".join(f'<li><a href="#{a}">{escape(h)}</a></li>' for a, h in self.sections)
        notice = f'<div class="notice" role="alert">{escape(self.notice)}</div>' if self.notice else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"{notice}<h1>{escape(self.title)}</h1>"
            f'<nav><ul class="contents">{contents}</ul></nav>\n' + "\n".join(self.blocks) + "\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the page (UTF-8) to `path`, creating parent folders; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path
