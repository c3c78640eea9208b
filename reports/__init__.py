"""Generic report renderer: DataFrames + metadata -> one self-contained HTML page.

Knows nothing about adders (it must not import `triton_adder`): callers build a `Report` from
blocks (summary cards, charts, tables, a metadata block) and write it. Every chart is a
matplotlib figure inlined as SVG, the stylesheet is inline, the page has no script and loads
nothing from the network or the file system. All outside text is HTML-escaped on the way in.
"""

from .charts import bar_chart, figure_to_svg
from .page import Report
from .raw import read_raw, write_raw
from .tables import format_number, html_table

__all__ = ["Report", "bar_chart", "figure_to_svg", "format_number", "html_table", "read_raw", "write_raw"]
