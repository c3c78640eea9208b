"""The int8 rows of `measure` (issue 27) and their place in the report: the int8 adder (tuned and default
blocking) against float32 conv2d, PyTorch's int8 quantized conv2d and the float32 adder, timed interleaved
per layer and for the whole model; skipped rows with reasons, never an exception, without a C compiler or
the quantized engine.

Timings themselves are never asserted, only that they exist, are finite and that the ratios follow from
the rows of the same interleaved group.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests import browser
from tests.test_reports import parse
from triton_adder import bench, report
from triton_adder.measure import int8 as int8_rows
from triton_adder.measure import timing
from triton_adder.measure.derived import INT8_BASELINES, INT8_FAMILY
from triton_adder.measure.machine import cpu_name
from triton_adder.nn import Adder2d
from triton_adder.quant import native

LABELS = {"int8_adder tuned", "int8_adder default", "conv2d fp32", "quantized_conv2d x86", "adder_forward cpu_path"}
LAYERS = ["3x9x9->8 3x3 s1 p1", "8x9x9->8 3x3 s2 p0"]


def tiny_model() -> tuple:
    """measure's (name, AdderNet, CNN twin, input shape) form: two adder layers with BatchNorm."""

    def net(layer):
        torch.manual_seed(0)
        return nn.Sequential(
            layer(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            layer(8, 8, 3, stride=2),
            nn.BatchNorm2d(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    return "tiny int8", net(Adder2d), net(nn.Conv2d), (2, 3, 9, 9)


def measure_tiny(**kwargs):
    return bench.measure(
        tiny_model(),
        device="cpu",
        backend="cpu",
        quick=True,
        repeats=3,
        baselines=False,
        train=False,
        command_line="pytest tests/test_int8_report.py",
        **kwargs,
    )


@pytest.fixture(scope="module")
def frame():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_ADDER_CPU_COMPILE", "0")  # eager float adder: no compile time in tests
        return measure_tiny()


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """CC names no compiler, in an empty cache (a cached library would load without compiling)."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TRITON_ADDER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    native.clear()
    yield tmp_path / "no-such-cc"
    native.clear()


def int8_group(frame, scope: str, layer: str):
    rows = frame[(frame["family"] == INT8_FAMILY) & (frame["scope"] == scope) & (frame["layer"] == layer)]
    return rows.set_index("label")


def test_int8_rows_per_layer_and_whole_model_with_finite_times_and_ratios(frame):
    int8 = frame[frame["family"] == INT8_FAMILY]
    groups = [("layer", layer) for layer in LAYERS] + [("model", "whole model")]
    assert list(dict.fromkeys(zip(int8["scope"], int8["layer"]))) == groups
    for scope, layer in groups:
        rows = int8_group(frame, scope, layer)
        assert set(rows.index) == LABELS, (scope, layer)
        assert (rows["status"] == "ok").all(), rows[["status", "reason"]]
        assert (rows["repeats"] == 3).all()  # one interleaved run: every contender timed in each repetition
        assert ((rows["p20_ms"] <= rows["median_ms"]) & (rows["median_ms"] <= rows["p80_ms"])).all()
        assert (rows["median_ms"] > 0).all() and rows["median_ms"].map(math.isfinite).all()
        baseline = rows["median_ms"]
        for variant in ("tuned", "default"):
            adder = rows.loc[f"int8_adder {variant}"]
            for key, label in (
                ("conv2d_fp32", "conv2d fp32"),
                ("qconv_int8", "quantized_conv2d x86"),
                ("adder_fp32", "adder_forward cpu_path"),
            ):
                ratio = adder[f"int8_over_{key}"]
                assert math.isfinite(ratio) and ratio == pytest.approx(adder["median_ms"] / baseline[label], rel=1e-12)
        tuned, default = rows.loc["int8_adder tuned"], rows.loc["int8_adder default"]
        assert tuned["int8_tuned_over_default"] == pytest.approx(tuned["median_ms"] / default["median_ms"], rel=1e-12)
        assert math.isnan(default["int8_tuned_over_default"])
        assert "default" in default["config"]
        if tuned["layer"] == "whole model":
            assert "per layer" in tuned["config"]
        else:  # nothing tuned in this test's cache: the layer's tuned row runs the default and says so
            assert tuned["config"].startswith("Blocking(") and "none tuned" in tuned["config"]
    assert (
        set(int8["dtype"]) == {"int8", "float32"}
        and int8.loc[int8["dtype"] == "int8", "energy_per_image_uj"].isna().all()
    )  # the 45 nm figures are float32 operations


def test_metadata_names_the_cpu_kernel_and_timing(frame):
    metadata = frame.attrs["metadata"]
    assert cpu_name() in metadata["device"]
    assert metadata["int8 kernel"].startswith(native.load().isa)
    assert metadata["int8 quantized engine"].startswith("x86")
    assert metadata["int8 threads"] == torch.get_num_threads()
    assert "interleaved" in metadata["int8 timing"]


def test_interleaved_rows_alternate_the_calls_and_record_failures():
    recorder = timing.Recorder(torch.device("cpu"), quick=True, repeats=3)
    calls = []

    def broken():
        calls.append("broken")
        raise RuntimeError("no kernel\nsecond line")

    rows = recorder.time_interleaved(
        [
            (lambda: calls.append("a"), {"op": "a"}),
            (None, {"op": "s", "reason": "why"}),
            (broken, {"op": "x"}),
            (lambda: calls.append("b"), {"op": "b"}),
        ]
    )
    # one untimed call each (the broken one fails there and is dropped), then a and b once per repetition
    assert calls[:3] == ["a", "broken", "b"]
    assert [sorted(calls[i : i + 2]) for i in range(3, 9, 2)] == [["a", "b"]] * 3
    assert recorder.rows == rows and [row["op"] for row in rows] == ["a", "s", "x", "b"]
    assert [row["status"] for row in rows] == ["ok", "skipped", "error", "ok"]
    assert rows[1]["reason"] == "why" and rows[2]["reason"] == "RuntimeError: no kernel"
    assert rows[0]["repeats"] == rows[3]["repeats"] == 3 and rows[0]["median_ms"] >= 0
    with pytest.raises(ValueError, match="CPU calls"):
        timing.Recorder(torch.device("meta"), quick=True, repeats=1).time_interleaved([])


def test_report_shows_the_int8_table_chart_and_summary(frame):
    page = report.build_report(frame).to_html()
    parsed = parse(page)
    table = parsed.tables["int8"]
    header = [text for _, text in table[0]]
    body = [dict(zip(header, cells)) for cells in table[1:]]
    assert [cells["layer"][1] for cells in body] == [*LAYERS, "whole model"]
    for cells in body:
        scope = cells["scope"][1]
        rows = int8_group(frame, scope, cells["layer"][1])
        tuned = rows.loc["int8_adder tuned"]
        for column in [f"int8_over_{key}" for key in INT8_BASELINES] + ["int8_tuned_over_default"]:
            assert float(cells[column][0]["data-value"]) == tuned[column], column
        assert float(cells["int8 default ms"][0]["data-value"]) == rows.loc["int8_adder default", "median_ms"]
        assert float(cells["qconv_int8 ms"][0]["data-value"]) == rows.loc["quantized_conv2d x86", "median_ms"]
        assert float(cells["adder_fp32 ms"][0]["data-value"]) == rows.loc["adder_forward cpu_path", "median_ms"]
    chart = parsed.charts["int8-ratios"]
    assert "missing" not in chart["class"] and chart["tags"].count("svg") == 1
    assert "whole model, int8 / conv2d float32 time" in page
    assert "int8 inference (CPU)" in page and cpu_name() in page


def test_saved_rows_rerender_the_int8_section(frame, tmp_path):
    """results.json keeps the int8 rows; re-rendering derives the same ratios and draws the same table."""
    written = report.write_report(frame, out_dir=tmp_path)
    again = parse(report.rerender(written["json"], tmp_path / "again.html").read_text())
    first = parse(written["html"].read_text())
    assert again.tables["int8"] == first.tables["int8"] and len(first.tables["int8"]) == 4
    assert "missing" not in again.charts["int8-ratios"]["class"]
    if browser.find_chromium() is not None:
        visit = browser.visit(written["html"])
        assert visit.errors == [] and visit.requests == [written["html"].resolve().as_uri()]


def test_without_a_c_compiler_the_int8_rows_are_skipped_with_the_reason(no_compiler):
    frame = measure_tiny()
    int8 = frame[frame["family"] == INT8_FAMILY]
    assert len(int8) == 3 * len(LABELS)
    assert (int8["status"] == "skipped").all()
    assert int8["reason"].str.contains("not built").all() and int8["reason"].str.contains(str(no_compiler)).all()
    assert int8["int8_over_conv2d_fp32"].isna().all()
    assert (frame.loc[frame["family"] != INT8_FAMILY, "status"] == "ok").all()  # the float rows still ran
    assert "not built" in frame.attrs["metadata"]["int8 kernel"]
    page = report.build_report(frame).to_html()
    parsed = parse(page)
    reasons = [
        dict(zip([t for _, t in parsed.tables["int8"][0]], cells))["not measured"][1]
        for cells in parsed.tables["int8"][1:]
    ]
    assert len(reasons) == 3 and all(str(no_compiler) in reason for reason in reasons)
    assert "missing" in parsed.charts["int8-ratios"]["class"] and "no int8 ratio measured" in page


def test_without_the_quantized_engine_only_qconv_is_skipped(monkeypatch):
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    monkeypatch.setattr(int8_rows, "engine_missing", lambda: "no x86 quantized engine (test)")
    frame = measure_tiny(max_layers=1)
    rows = int8_group(frame, "layer", LAYERS[0])
    assert rows.loc["quantized_conv2d x86", "status"] == "skipped"
    assert rows.loc["quantized_conv2d x86", "reason"] == "no x86 quantized engine (test)"
    assert (rows.drop(index="quantized_conv2d x86")["status"] == "ok").all()
    tuned = rows.loc["int8_adder tuned"]
    assert math.isnan(tuned["int8_over_qconv_int8"]) and math.isfinite(tuned["int8_over_conv2d_fp32"])
    model = int8_group(frame, "model", "whole model")
    assert model.loc["quantized_conv2d x86", "status"] == "skipped"


def test_int8_is_a_cpu_option(capsys):
    frame = bench.measure(
        tiny_model(),
        device="cpu",
        backend="cpu",
        int8=False,
        quick=True,
        repeats=1,
        baselines=False,
        train=False,
        max_layers=1,
    )
    assert not (frame["family"] == INT8_FAMILY).any() and "int8 kernel" not in frame.attrs["metadata"]
    with pytest.raises(SystemExit):
        bench.main(["--model", "lenet5bn", "--backend", "triton", "--int8"])
    assert "--int8 needs the CPU backend" in capsys.readouterr().err
