"""The measurement layer (triton_adder.measure) behind `python -m triton_adder.bench`: rows for every
measurement, skips with reasons instead of crashes, derived columns exact, and the baselines it
times compute the adder layer (checked against the float64 reference).

Timings themselves are never asserted (no timed tests); tiny shapes keep the CPU path and the
Triton interpreter fast.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from tests.tolerance import assert_matches_reference
from triton_adder import Adder2d, bench, models, reference
from triton_adder.functional import resolve_geometry
from triton_adder.geometry import LayerShape
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.measure import baselines, loops, timing
from triton_adder.measure.derived import COLUMNS, CPU_NOTE, derive
from triton_adder.models.census import DEFAULT_GPU_BATCH, census, unique_adder_layers

METADATA_KEYS = {"device", "device_kind", "torch", "triton", "cudnn", "driver", "git revision", "date",
                 "command line", "note", "ceiling method", "timing method", "energy model"}


def tiny_pair():
    """AdderNet + CNN twin with a repeated layer (5->5 3x3 twice) and a strided one; logits (N, 5)."""
    def net(layer):
        return nn.Sequential(layer(3, 5, 3, padding=1), nn.ReLU(), layer(5, 5, 3, padding=1), layer(5, 5, 3, padding=1),
                             layer(5, 5, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    torch.manual_seed(0)
    return net(Adder2d), net(nn.Conv2d)


@pytest.fixture(scope="module")
def cpu_frame():
    adder, cnn = tiny_pair()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_ADDER_CPU_COMPILE", "0")  # eager CPU path: no compile time in tests
        return bench.measure(("tiny <net>", adder, cnn, (2, 3, 7, 7)), device="cpu", backend="cpu", quick=True,
                             repeats=2, command_line="pytest tests/test_bench.py")


def test_cpu_run_has_every_measurement(cpu_frame):
    frame = cpu_frame[cpu_frame["family"] != "int8"]  # the int8 rows: tests/test_int8_report.py
    assert (cpu_frame["family"] == "int8").sum() == 5 * 4  # on by default on the CPU: 3 layers + the model
    layers = frame[frame["scope"] == "layer"]
    assert list(dict.fromkeys(layers["layer"])) == ["3x7x7->5 3x3 s1 p1", "5x7x7->5 3x3 s1 p1", "5x7x7->5 3x3 s2 p0"]
    assert layers.groupby("layer")["layer_count"].first().to_dict() == {
        "3x7x7->5 3x3 s1 p1": 1, "5x7x7->5 3x3 s1 p1": 2, "5x7x7->5 3x3 s2 p0": 1}
    expected = {"adder_forward cpu_path", "adder_grad_input cpu_path", "adder_grad_weight cpu_path", "conv2d fp32",
                "conv2d tf32", "conv2d float16", "conv2d bfloat16", "conv2d_grad_input fp32",
                "conv2d_grad_weight fp32", "unfold_broadcast fp32", "cdist_l1 fp32"}
    for layer, rows in layers.groupby("layer"):
        assert set(rows["label"]) == expected, layer
    model_rows = frame[frame["scope"] == "model"]
    assert set(model_rows["label"]) == {"model_forward adder", "model_forward cnn", "model_train_step adder",
                                        "model_train_step cnn"}
    not_ok = frame[frame["status"] != "ok"]
    assert set(not_ok["label"]) <= {"conv2d tf32", "conv2d float16", "conv2d bfloat16"}, not_ok[["label", "reason"]]
    assert (not_ok["reason"].str.len() > 0).all()
    assert (frame.loc[frame["label"] == "conv2d tf32", "reason"] == "TF32 is a CUDA tensor-core mode").all()
    ok = frame[frame["status"] == "ok"]
    assert ((ok["p20_ms"] <= ok["median_ms"]) & (ok["median_ms"] <= ok["p80_ms"]) & (ok["median_ms"] > 0)).all()
    assert ok["peak_memory_bytes"].isna().all()  # CUDA allocator only
    assert ok["percent_of_ceiling"].isna().all()  # unknown ceiling on the CPU


def test_metadata_says_cpu(cpu_frame):
    metadata = cpu_frame.attrs["metadata"]
    assert METADATA_KEYS <= set(metadata)
    assert metadata["device_kind"] == "cpu" and metadata["note"] == CPU_NOTE
    assert metadata["command line"] == "pytest tests/test_bench.py"
    assert metadata["model"] == "tiny <net>"
    assert metadata["date"].endswith("+00:00")


def test_derived_columns_follow_their_definitions(cpu_frame):
    frame = cpu_frame[cpu_frame["family"] != "int8"]  # the int8 group repeats conv2d and adder_forward
    layers = frame[frame["scope"] == "layer"]
    first = layers[layers["layer"] == "3x7x7->5 3x3 s1 p1"]
    elements = 2 * 5 * 7 * 7 * 3 * 3 * 3  # N * Cout * Ho * Wo * Cin * kh * kw
    assert (first["elements"] == elements).all()
    adder = first[first["op"] == "adder_forward"].iloc[0]
    conv = first[(first["op"] == "conv2d") & (first["variant"] == "fp32")].iloc[0]
    assert (adder["additions"], adder["multiplications"]) == (2 * elements, 0)
    assert (conv["additions"], conv["multiplications"]) == (elements, elements)
    assert adder["energy_per_image_uj"] == pytest.approx(2 * elements * 0.9 / 2 / 1e6, rel=1e-12)
    assert conv["energy_per_image_uj"] == pytest.approx(elements * (0.9 + 3.7) / 2 / 1e6, rel=1e-12)
    assert adder["element_rate"] == pytest.approx(elements / (adder["median_ms"] / 1e3), rel=1e-12)
    assert adder["speedup_vs_conv2d_fp32"] == pytest.approx(conv["median_ms"] / adder["median_ms"], rel=1e-12)
    unfold = first[first["op"] == "unfold_broadcast"].iloc[0]
    assert adder["speedup_vs_unfold_broadcast"] == pytest.approx(unfold["median_ms"] / adder["median_ms"], rel=1e-12)
    grad = first[first["op"] == "adder_grad_input"].iloc[0]
    conv_grad = first[first["op"] == "conv2d_grad_input"].iloc[0]
    assert grad["speedup_vs_conv2d_fp32"] == pytest.approx(conv_grad["median_ms"] / grad["median_ms"], rel=1e-12)
    assert math.isnan(grad["speedup_vs_unfold_broadcast"])  # no unfold baseline for gradients
    models_ = frame[(frame["scope"] == "model") & (frame["family"] == "model_forward")].set_index("variant")
    assert models_.loc["adder", "speedup_vs_cnn"] == pytest.approx(
        models_.loc["cnn", "median_ms"] / models_.loc["adder", "median_ms"], rel=1e-12)
    # Whole model: every layer of the tiny AdderNet is an adder layer; the CNN twin multiplies instead.
    total = layers.groupby("layer").first().eval("elements * layer_count").sum()
    assert total == elements + 2 * (2 * 5 * 7 * 7 * 5 * 9) + 2 * 5 * 3 * 3 * 5 * 9
    assert (models_.loc["adder", "additions"], models_.loc["adder", "multiplications"]) == (2 * total, 0)
    assert (models_.loc["cnn", "additions"], models_.loc["cnn", "multiplications"]) == (total, total)


def test_ceiling_percent_and_tuned_gain_on_synthetic_rows():
    geom = resolve_geometry((8, 8), (3, 3), 1, 1)
    shape = LayerShape(1, 4, 8, 8, 4, 3, 3, geom)
    base = dict(scope="layer", model="m", status="ok", elements=shape.elements, batch=1, dtype="float32",
                **{k: v for k, v in shape.columns().items() if k != "batch"})
    rows = [dict(base, family="forward", op="adder_forward", variant="default", role="adder", baseline_key="",
                 median_ms=2.0),
            dict(base, family="forward", op="adder_forward", variant="tuned", role="adder", baseline_key="",
                 median_ms=1.0),
            dict(base, family="forward", op="conv2d", variant="fp32", role="baseline", baseline_key="conv2d_fp32",
                 median_ms=0.5),
            dict(base, family="forward", op="conv2d", variant="float16", role="baseline",
                 baseline_key="conv2d_float16", dtype="float16", median_ms=0.25)]
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    ceiling = {"fp32_instructions_per_s": 1e12, "tensor_macs_per_s": {"float16": 8e12}}
    derived = derive(frame, {"device_kind": "cuda"}, ceiling).set_index("label")
    rate = shape.elements / 1e-3
    assert derived.loc["adder_forward tuned", "percent_of_ceiling"] == pytest.approx(100 * rate / (1e12 / 2))
    assert derived.loc["conv2d fp32", "percent_of_ceiling"] == pytest.approx(100 * 2 * rate / 1e12)
    assert derived.loc["conv2d float16", "percent_of_ceiling"] == pytest.approx(100 * 4 * rate / 8e12)
    assert derived.loc["adder_forward tuned", "gain_vs_default"] == 2.0
    assert derived.loc["adder_forward tuned", "speedup_vs_conv2d_fp32"] == 0.5
    assert derived.loc["adder_forward default", "speedup_vs_conv2d_float16"] == 0.125
    # Re-deriving saved rows without a ceiling keeps the measured one.
    again = derive(derived.reset_index(), {"device_kind": "cuda"})
    assert list(again["percent_of_ceiling"]) == list(derived["percent_of_ceiling"])


def test_interpreter_runs_tuned_and_default_kernels(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    tuned = KernelConfig(block_m=16, block_n=8, block_k=2, num_warps=1, num_stages=1)
    calls = []

    def fake_lookup(op, x, weight, geom):
        calls.append(op)
        return (tuned, "") if op == "forward" else (None, "no tuned config cached (test)")

    monkeypatch.setattr(loops, "tuned_config", fake_lookup)
    adder, cnn = nn.Sequential(Adder2d(3, 4, 3, padding=1)), nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    frame = bench.measure(("tiny", adder, cnn, (1, 3, 5, 5)), backend="triton", quick=True, repeats=1,
                          baselines=False, whole_model=False)
    rows = frame.set_index("label")
    assert rows.loc["adder_forward default", "status"] == "ok"
    assert rows.loc["adder_forward tuned", "status"] == "ok"
    assert rows.loc["adder_forward tuned", "config"] == str(tuned.as_dict())
    assert rows.loc["adder_forward tuned", "gain_vs_default"] > 0
    for family in ("grad_input", "grad_weight"):
        assert rows.loc[f"adder_{family} default", "status"] == "ok"
        assert rows.loc[f"adder_{family} tuned", "status"] == "skipped"
        assert "no tuned config" in rows.loc[f"adder_{family} tuned", "reason"]
    assert calls == ["forward", "grad_input", "grad_weight"]


def test_baselines_over_the_memory_budget_are_skipped_with_their_size(monkeypatch):
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    adder, cnn = nn.Sequential(Adder2d(3, 4, 3, padding=1)), nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    frame = bench.measure(("tiny", adder, cnn, (2, 3, 6, 6)), device="cpu", backend="cpu", quick=True, repeats=1,
                          whole_model=False, memory_budget_bytes=1000)
    shape = LayerShape(2, 3, 6, 6, 4, 3, 3, resolve_geometry((6, 6), (3, 3), 1, 1))
    rows = frame.set_index("op")
    for op, size in (("unfold_broadcast", baselines.unfold_broadcast_bytes(shape, 4)),
                     ("cdist_l1", baselines.cdist_bytes(shape, 4))):
        assert rows.loc[op, "status"] == "skipped"
        assert rows.loc[op, "required_memory_bytes"] == size > 1000
        assert "memory budget" in rows.loc[op, "reason"]


def test_a_failing_measurement_becomes_a_row():
    recorder = timing.Recorder(torch.device("cpu"), quick=True, repeats=1)

    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    row = recorder.time(broken, op="x")
    assert row["status"] == "error" and row["reason"] == "RuntimeError: kernel exploded"
    assert recorder.rows == [row]


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride", "padding", "dilation"),
                         [(3, 5, (7, 9), (3, 2), (2, 1), (1, 0), (1, 2)), (4, 3, (5, 6), (1, 1), 1, 0, 1)])
def test_timed_baselines_compute_the_adder_layer(cin, cout, size, kernel, stride, padding, dilation):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, cin, *size, generator=generator)
    weight = torch.randn(cout, cin, *kernel, generator=generator)
    geom = resolve_geometry(size, kernel, stride, padding, dilation)
    expected = reference.adder2d_forward(x.double(), weight.double(), None, geom)
    for implementation in (baselines.unfold_broadcast_adder, baselines.cdist_adder):
        assert_matches_reference(implementation(x, weight, geom), expected, torch.float32, cin * kernel[0] * kernel[1])


def test_census_of_resnet50_finds_its_adder_layers():
    calls = census(models.build("resnet50", adder=True), (1, 3, 224, 224))
    kinds = [call.kind for call in calls]
    assert kinds.count("adder") == 52 and kinds.count("multiply") == 2  # stem conv and classifier stay
    unique = unique_adder_layers(calls)
    assert sum(count for _, count in unique) == 52 and len(unique) == 22
    assert unique[0][0].name == "64x56x56->256 1x1 s1 p0"


def test_named_models_default_to_the_tuners_gpu_batch():
    for name in models.MODELS:
        assert loops.default_batch_size(name, torch.device("cuda", 0)) == DEFAULT_GPU_BATCH[name]
        assert loops.default_batch_size(name, torch.device("cpu")) == 2  # training-mode BatchNorm needs > 1
    frame = bench.measure("lenet5bn", device="cpu", backend="cpu", layers=False, whole_model=False)
    assert frame.attrs["metadata"]["input shape"] == "(2, 1, 28, 28)"


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        bench.measure("resnet51")
    with pytest.raises(ValueError, match="backend must be"):
        bench.measure("lenet5bn", backend="cuda")
    with pytest.raises(ValueError, match="adder_dtypes"):
        bench.measure("lenet5bn", adder_dtypes=("int8",))
    with pytest.raises(ValueError, match="int8=True needs backend='cpu'"):
        bench.measure("lenet5bn", device="cpu", backend="triton", int8=True)


def test_cli_measures_writes_the_report_and_shows_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    out = tmp_path / "report"
    assert bench.main(["--model", "lenet5bn", "--backend", "cpu", "--quick", "--max-layers", "1",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert {"html", "csv", "json"} <= {line.split(":")[0] for line in printed.out.splitlines()}
    assert "benchmark lenet5bn" in printed.err and "2/2" in printed.err  # one layer + the whole model
    frame = pd.read_csv(out / "results.csv")
    assert set(frame["scope"]) == {"layer", "model"} and frame["layer"].nunique() == 2
    assert "lenet5bn" in (out / "report.html").read_text()
