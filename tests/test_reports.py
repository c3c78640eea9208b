"""The HTML report: parses, every chart drawn, table numbers equal the DataFrame's, escaping, and a real
headless browser shows it without console errors or network requests.

The page is rendered from synthetic benchmark rows (fast, every section populated); the measurements
themselves are exercised end to end in tests/test_bench.py.
"""

from __future__ import annotations

import html
import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

import reports
from tests import browser
from triton_adder import report
from triton_adder.functional import resolve_geometry
from triton_adder.geometry import LayerShape
from triton_adder.measure import baselines
from triton_adder.measure.derived import COLUMNS, CPU_NOTE, derive

HOSTILE = "<script>alert('x')</script> & \"q\" $x$"
CEILING = {"fp32_instructions_per_s": 3.3e13,
           "tensor_macs_per_s": {"tf32": 2.6e14, "float16": 5.2e14, "bfloat16": 5.2e14}}
GPU_METADATA = {"device": "Synthetic GPU", "device_kind": "cuda", "model": "toy", "torch": "x", "triton": "y",
                "cudnn": "z", "driver": "d", "git revision": "r", "date": "2025-01-01T00:00:00+00:00",
                "command line": "python -m triton_adder.tune --model toy", "ceiling method": "synthetic"}
CPU_METADATA = {**GPU_METADATA, "device": "Synthetic CPU", "device_kind": "cpu", "note": CPU_NOTE}
# Every chart the page draws (data-chart names); each must be a non-empty SVG for the synthetic rows.
CHARTS = ["latency-forward", "latency-input-gradient", "latency-weight-gradient", "element-rate-forward",
          "percent-of-ceiling-forward", "element-rate-gradients", "percent-of-ceiling-gradients", "tuned-gain",
          "model-time", "peak-memory", "required-memory", "energy"]


def synthetic_frame(model: str = "toy", metadata: dict = GPU_METADATA, layer_names=None) -> pd.DataFrame:
    """Raw rows shaped like measure's (two layers, all ops, one skipped baseline) -> derive()."""
    rng = np.random.default_rng(0)
    shapes = [LayerShape(4, 8, 9, 9, 16, 3, 3, resolve_geometry((9, 9), (3, 3), 1, 1)),
              LayerShape(4, 16, 9, 9, 8, 1, 1, resolve_geometry((9, 9), (1, 1), 2, 0))]
    rows = []

    def row(shape, name, **values):
        t = float(rng.uniform(0.05, 5.0))
        base = dict(scope="layer", model=model, layer_count=2, elements=shape.elements, status="ok", reason="",
                    median_ms=t, p20_ms=t * 0.9, p80_ms=t * 1.2, repeats=10, peak_memory_bytes=float(rng.integers(1e4,
                    1e7)), config="", dtype="float32", **shape.columns())
        base["layer"] = name
        base.update(values)
        rows.append(base)

    for index, shape in enumerate(shapes):
        name = (layer_names or [shape.name for shape in shapes])[index]
        for family in ("forward", "grad_input", "grad_weight"):
            for variant in ("tuned", "default"):
                row(shape, name, family=family, op=f"adder_{family}", variant=variant, role="adder", baseline_key="",
                    backend="triton", config="{'block_m': 64}")
        for precision in baselines.CONV_PRECISIONS:
            dtype = "float32" if precision in ("fp32", "tf32") else precision
            row(shape, name, family="forward", op="conv2d", variant=precision, role="baseline",
                baseline_key=f"conv2d_{precision}", backend="torch", dtype=dtype)
        for family in ("grad_input", "grad_weight"):
            row(shape, name, family=family, op=f"conv2d_{family}", variant="fp32", role="baseline",
                baseline_key="conv2d_fp32", backend="torch")
        for op in ("unfold_broadcast", "cdist_l1"):
            required = float(baselines.unfold_broadcast_bytes(shape, 4) if op == "unfold_broadcast" else
                             baselines.cdist_bytes(shape, 4))
            skipped = op == "unfold_broadcast" and index == 1
            row(shape, name, family="forward", op=op, variant="fp32", role="baseline", baseline_key=op,
                backend="torch", required_memory_bytes=required,
                **(dict(status="skipped", reason="needs 9 GiB, over the 1 GiB memory budget", median_ms=math.nan,
                        p20_ms=math.nan, p80_ms=math.nan, peak_memory_bytes=math.nan) if skipped else {}))
    for variant in ("adder", "cnn"):
        for family in ("model_forward", "model_train_step"):
            t = float(rng.uniform(5, 50))
            rows.append(dict(scope="model", model=model, layer="whole model", layer_count=1, batch=4, cin=3, h=32,
                             w=32, family=family, op=family, variant=variant,
                             role="adder" if variant == "adder" else "baseline",
                             baseline_key="" if variant == "adder" else "cnn", backend="triton", dtype="float32",
                             config="", status="ok", reason="", median_ms=t, p20_ms=t * 0.95, p80_ms=t * 1.1,
                             repeats=5, peak_memory_bytes=1e8, elements=10**8,
                             additions=2 * 10**8 if variant == "adder" else 10**8,
                             multiplications=10**6 if variant == "adder" else 10**8))
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    return derive(frame[COLUMNS], dict(metadata, model=model), CEILING)


class PageParser(HTMLParser):
    """Checks tag nesting (raises on a mismatch) and collects charts and tables."""

    VOID = {"meta", "br", "img", "link", "input", "hr", "wbr", "source", "col", "area", "base", "embed"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.charts: dict[str, dict] = {}
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self.first_tags: list[str] = []
        self._chart = self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if len(self.first_tags) < 40:
            self.first_tags.append(tag + ("." + attrs["class"] if "class" in attrs else ""))
        if tag == "figure":
            self._chart = self.charts.setdefault(attrs["data-chart"], {"class": attrs.get("class", ""), "tags": []})
        elif self._chart is not None:
            self._chart["tags"].append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = [attrs, ""]
        if tag not in self.VOID and not tag.endswith("/"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if self._chart is not None:
            self._chart["tags"].append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "figure":
            self._chart = None
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == ["html"] or parser.stack == [], f"unclosed tags: {parser.stack}"
    return parser


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame()


@pytest.fixture(scope="module")
def written(frame, tmp_path_factory):
    """write_report's files for the synthetic GPU rows (rendered once per module: charts take ~0.3 s each)."""
    return report.write_report(frame, out_dir=tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def page(written):
    return written["html"].read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cpu_page():
    """A CPU run: the ceiling is unknown (NaN), the page must say so and why charts are missing."""
    rows = synthetic_frame(metadata=CPU_METADATA)
    return report.build_report(derive(rows.drop(columns=["ceiling_rate"]), rows.attrs["metadata"])).to_html()


def test_page_parses_and_every_svg_is_well_formed_xml(page):
    parsed = parse(page)
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(svgs) == len(CHARTS)
    for svg in svgs:
        ET.fromstring(svg)  # raises on malformed XML
    assert page.startswith("<!DOCTYPE html>")
    assert "table" in "".join(parsed.first_tags) or parsed.tables


def test_every_chart_is_present_and_non_empty(page, frame):
    parsed = parse(page)
    assert sorted(parsed.charts) == sorted(CHARTS)
    for name, chart in parsed.charts.items():
        assert "missing" not in chart["class"], f"chart {name} not drawn"
        assert chart["tags"].count("svg") == 1, name
        # Matplotlib draws each bar as a <path> inside a patch group; axes and ticks add more paths.
        assert chart["tags"].count("path") >= 6, f"chart {name} has no bars"
    latency = re.search(r'data-chart="latency-forward">(.*?)</figure>', page, flags=re.S).group(1)
    for layer in frame[frame["scope"] == "layer"]["layer"].unique():
        assert html.escape(layer) in latency, layer


def test_missing_chart_says_why(cpu_page):
    parsed = parse(cpu_page)
    assert sorted(parsed.charts) == sorted(CHARTS)
    assert "missing" in parsed.charts["percent-of-ceiling-forward"]["class"]
    assert "the CPU has no known ceiling" in cpu_page


def _number_equal(shown: float, expected: object) -> bool:
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return math.isnan(shown)
    return shown == float(expected)


@pytest.mark.parametrize("table_id", ["all-rows", "measured"])
def test_table_numbers_equal_the_dataframe(page, frame, table_id):
    table = parse(page).tables[table_id]
    header = [text for _, text in table[0]]
    expected = frame if table_id == "all-rows" else frame[frame["status"] == "ok"]
    assert table_id != "all-rows" or header == list(frame.columns)
    body = table[1:]
    assert len(body) == len(expected)
    checked = 0
    for cells, (_, row) in zip(body, expected.iterrows()):
        for (attrs, text), column in zip(cells, header):
            value = row[column]
            if "data-value" in attrs:
                assert _number_equal(float(attrs["data-value"]), value), (column, attrs["data-value"], value)
                assert text == reports.format_number(value), (column, text, value)
                checked += 1
            elif isinstance(value, str):
                assert text == value, (column, text, value)
            else:
                assert value is None or pd.isna(value), (column, value)
                assert text == reports.tables.MISSING
    assert checked > len(body) * 5


def test_number_formatting_is_honest():
    assert reports.format_number(float("nan")) == reports.tables.MISSING
    assert reports.format_number(0.000123456) == "0.0001235"
    assert reports.format_number(12345678.9) == "1.235e+07"
    assert reports.format_number(np.int64(7)) == "7"


def test_outside_text_is_escaped():
    frame = synthetic_frame(model=HOSTILE, layer_names=[HOSTILE, "a<b>&c"])
    metadata = dict(frame.attrs["metadata"], **{"path <i>": HOSTILE})
    page = report.build_report(frame, metadata).to_html()
    parse(page)
    assert "<script" not in page
    assert "<i>" not in page and "<b>" not in page
    assert html.escape(HOSTILE) in page
    for svg in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)
    assert "a&lt;b&gt;&amp;c" in re.search(r'data-chart="latency-forward">(.*?)</figure>', page, re.S).group(1)


def test_page_is_self_contained(page):
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", page)
    assert not re.search(r"\bsrc\s*=", page)
    assert "@import" not in page
    assert not re.search(r"url\((?!#)", page)  # only in-page references such as clip-path="url(#id)"
    for href in re.findall(r'href="([^"]*)"', page):
        assert href.startswith(("#", "data:")), href


def test_cpu_run_says_so_at_the_top(cpu_page, page):
    body = cpu_page[cpu_page.index("<body>"):]
    assert body.index(CPU_NOTE) < body.index("<h1>")
    assert CPU_NOTE not in page and 'class="notice"' not in page


def test_raw_rows_round_trip_and_cli_rerenders(frame, written, tmp_path, capsys):
    paths = written
    assert {p.name for p in paths.values()} == {"report.html", "results.csv", "results.json"}
    saved, metadata = reports.read_raw(paths["json"])
    assert metadata == frame.attrs["metadata"]
    assert list(saved.columns) == list(frame.columns)
    for column in frame.columns:
        left, right = frame[column].tolist(), saved[column].tolist()
        for a, b in zip(left, right):
            assert (pd.isna(a) and pd.isna(b)) or a == b, (column, a, b)
    csv = pd.read_csv(paths["csv"])
    assert np.allclose(csv["median_ms"], frame["median_ms"], equal_nan=True, rtol=0, atol=0)
    json.loads(paths["json"].read_text())  # strict JSON (no NaN literals)
    out = tmp_path / "again.html"
    assert report.main([str(paths["json"]), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    parsed = parse(out.read_text())
    assert sorted(parsed.charts) == sorted(CHARTS)
    assert len(parsed.tables["all-rows"]) == len(frame) + 1


def test_cli_rejects_a_missing_file(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope.json")])


chromium = pytest.mark.skipif(browser.find_chromium() is None,
                              reason="no Chromium installed (Debian: apt-get install -y chromium)")


@chromium
def test_real_browser_shows_the_page_without_errors(written):
    path = written["html"]
    visit = browser.visit(path)
    assert visit.errors == []
    assert visit.requests == [path.resolve().as_uri()]  # no network, no other file
    assert visit.title.startswith("AdderNet benchmark")
    assert browser.non_background_fraction(visit.screenshot_png) > 0.02


@chromium
def test_browser_check_catches_a_broken_page(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><head><title>b</title><link rel="stylesheet" href="missing.css">'
                      '</head><body><script>console.error("boom"); throw new Error("kaput")</script></body></html>')
    visit = browser.visit(broken)
    text = " ".join(visit.errors)
    assert "boom" in text and "kaput" in text and "ERR_FILE_NOT_FOUND" in text
    assert len(visit.requests) == 2
    assert browser.non_background_fraction(visit.screenshot_png) < 0.001  # blank page detected as blank


@pytest.mark.parametrize(
    "content, message",
    [('{"rows": [', "JSONDecodeError"), ('{"rows": [{"foo": 1}], "metadata": {}}', "KeyError"), ("[]", "ValueError")],
)
def test_cli_rejects_unreadable_results_with_a_usage_error(tmp_path, capsys, content, message):
    bad = tmp_path / "results.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a readable results file" in err and message in err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
