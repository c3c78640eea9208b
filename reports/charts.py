"""Matplotlib charts rendered to inline SVG strings.

Figures are built with `matplotlib.figure.Figure` (no pyplot, so no global backend or state is
touched). SVG text stays text (`svg.fonttype = "none"`) to keep pages small; matplotlib escapes
XML itself. Each chart gets its own `svg.hashsalt`, so the ids of clip paths and markers cannot
collide between the several SVGs inlined in one page.
"""

from __future__ import annotations

import io
import itertools
import math
import re

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_chart_ids = itertools.count()

# Colour-blind-safe palette (Okabe-Ito); the first series (usually "ours") gets the strongest colour.
# Extended with darker/lighter tones so up to 12 series stay distinct.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#8C564B", "#7F7F7F", "#17BECF", "#BCBD22"]


def plain_label(text: object) -> str:
    """Make outside text safe for matplotlib: no mathtext ($...$), no legend-hiding leading '_'."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def figure_to_svg(fig: Figure) -> str:
    """Serialize `fig` to a bare <svg> element (no XML prolog, DOCTYPE or RDF metadata)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"chart{next(_chart_ids)}"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)


def bar_chart(frame: pd.DataFrame, category: str, value: str, series: str | None = None, *,
              title: str = "", xlabel: str = "", log: bool = False, low: str | None = None,
              high: str | None = None, reference: tuple[float, str] | None = None,
              value_labels: bool = False) -> str:
    """Grouped horizontal bar chart as an SVG string.

    frame: one row per bar; `category` names the group (y axis, in order of first appearance),
    `series` the bar within a group (legend), `value` its length. `low`/`high` columns, if
    given, draw an error interval (e.g. p20/p80). `reference` = (x, label) draws a vertical
    line (e.g. a ceiling or speedup 1). Rows whose value is not finite are left out.
    Raises ValueError when no finite value is left, so a caller can say why instead of
    inlining an empty chart.
    """
    data = frame[np.isfinite(pd.to_numeric(frame[value], errors="coerce").astype(float))]
    if log:
        data = data[data[value].astype(float) > 0]
    if data.empty:
        raise ValueError(f"bar_chart: no finite values in column {value!r}")
    categories = list(dict.fromkeys(data[category].astype(str)))
    series_names = list(dict.fromkeys(data[series].astype(str))) if series else [value]
    n_cat, n_ser = len(categories), len(series_names)
    bar_height = 0.8 / n_ser
    fig = Figure(figsize=(10.0, max(1.8, 0.3 + n_cat * max(0.32, 0.16 * n_ser))))
    ax = fig.add_subplot()
    for s_index, name in enumerate(series_names):
        rows = data if not series else data[data[series].astype(str) == name]
        positions, lengths, errors = [], [], [[], []]
        for _, row in rows.iterrows():
            c_index = categories.index(str(row[category]))
            positions.append(c_index + (s_index - (n_ser - 1) / 2) * bar_height)
            length = float(row[value])
            lengths.append(length)
            lo = float(row[low]) if low and math.isfinite(float(row[low])) else length
            hi = float(row[high]) if high and math.isfinite(float(row[high])) else length
            errors[0].append(max(0.0, length - lo))
            errors[1].append(max(0.0, hi - length))
        bars = ax.barh(positions, lengths, height=bar_height, color=PALETTE[s_index % len(PALETTE)],
                       label=plain_label(name), xerr=errors if (low or high) else None,
                       error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#333333"})
        if value_labels:
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in lengths], fontsize=7, padding=2)
    ax.set_yticks(range(n_cat), [plain_label(c) for c in categories], fontsize=8)
    ax.invert_yaxis()  # first category on top, like the tables
    if log:
        ax.set_xscale("log")
    if reference is not None:
        ax.axvline(reference[0], color="#444444", linestyle="--", linewidth=1, label=plain_label(reference[1]))
    ax.set_xlabel(plain_label(xlabel), fontsize=9)
    if title:
        ax.set_title(plain_label(title), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if series or reference is not None:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    svg = figure_to_svg(fig)
    return svg
