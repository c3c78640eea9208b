"""The benchmark report: `triton_adder.measure` rows -> one self-contained HTML page (+ CSV, JSON).

    python -m triton_adder.report results.json              # re-render a saved run next to it
    python -m triton_adder.report results.json -o page.html

`write_report(frame)` is what `python -m triton_adder.tune` calls after benchmarking. The page is
built from `reports` blocks (generic; it knows nothing about adders): summary, per-layer latency,
throughput against the device ceiling, tuned-vs-default gains, whole-model bars, int8 inference
on the CPU (where `measure` ran its int8 rows), memory, estimated energy, full tables, and the
method/machine block.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

import reports
from triton_adder.measure.derived import (
    CPU_NOTE,
    ENERGY_PJ_ADD,
    ENERGY_PJ_MULTIPLY,
    INT8_BASELINES,
    INT8_FAMILY,
    INT8_RATIOS,
    derive,
)

# Baselines in the order a reader compares against them, with their display names.
BASELINES = {
    "conv2d_fp32": "conv2d float32 (TF32 off)",
    "conv2d_tf32": "conv2d TF32",
    "conv2d_float16": "conv2d float16",
    "conv2d_bfloat16": "conv2d bfloat16",
    "unfold_broadcast": "published unfold+broadcast",
    "cdist_l1": "torch.cdist(p=1)",
    "cnn": "CNN twin",
}
ADDER_VARIANT_PREFERENCE = ("tuned", "default", "cpu_path")  # what the public op would run
INT8_RATIO_NAMES = {**{f"int8_over_{key}": f"int8 / {title}" for key, title in INT8_BASELINES.items()},
                    "int8_tuned_over_default": "int8 tuned / default"}


def geomean(values) -> float:
    """Geometric mean of the finite positive values (NaN when there are none)."""
    array = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    array = array[np.isfinite(array) & (array > 0)]
    return float(np.exp(np.log(array).mean())) if array.size else math.nan


def headline_adder_rows(frame: pd.DataFrame, family: str = "forward") -> pd.DataFrame:
    """Per layer, the adder row a user gets: tuned if measured, else default, else the CPU path."""
    rows = frame[(frame["scope"] == "layer") & (frame["role"] == "adder") & (frame["family"] == family)
                 & (frame["status"] == "ok") & (frame["dtype"] == "float32")]
    preference = {v: i for i, v in enumerate(ADDER_VARIANT_PREFERENCE)}
    rank = rows["variant"].map(preference).fillna(len(preference))
    return rows.assign(_rank=rank).sort_values("_rank", kind="stable").drop_duplicates("layer").drop(columns="_rank")


def _ratio_text(value: float) -> str:
    if not math.isfinite(value):
        return "not measured"
    return f"{value:.3g}x" if value >= 1 else f"{value:.3g}x ({1 / value:.3g}x slower)"


def _chart(report: reports.Report, name: str, frame: pd.DataFrame, caption: str, missing: str = "", **kwargs) -> None:
    """Add a bar chart, or an explicit 'not shown (reason)' block when there is nothing to draw."""
    try:
        svg = reports.bar_chart(frame, **kwargs) if not frame.empty else None
    except ValueError as error:
        svg, missing = None, missing or str(error)
    report.add_chart(name, svg, caption, missing=missing or "no rows measured for it")


def _summary(report: reports.Report, frame: pd.DataFrame, metadata: dict) -> None:
    cards = []
    forward = headline_adder_rows(frame, "forward")
    for key, title in BASELINES.items():
        column = f"speedup_vs_{key}"
        if key == "cnn" or column not in frame.columns:
            continue
        value = geomean(forward[column])
        if math.isfinite(value):
            cards.append((f"adder forward vs {title}", _ratio_text(value),
                          f"geomean speedup over {forward[column].notna().sum()} layers (>1: adder faster)"))
    models = frame[(frame["scope"] == "model") & (frame["status"] == "ok")]
    for family, title in (("model_forward", "forward"), ("model_train_step", "training step")):
        adder = models[(models["family"] == family) & (models["variant"] == "adder")]["median_ms"]
        cnn = models[(models["family"] == family) & (models["variant"] == "cnn")]["median_ms"]
        if len(adder) and len(cnn):
            cards.append((f"whole-model {title}: AdderNet / CNN time", f"{adder.iloc[0] / cnn.iloc[0]:.3g}x",
                          f"{adder.iloc[0]:.4g} ms vs {cnn.iloc[0]:.4g} ms per batch"))
    percent = forward["percent_of_ceiling"] if "percent_of_ceiling" in forward else pd.Series(dtype=float)
    if percent.notna().any():
        cards.append(("adder forward, % of FP32 ceiling", f"{percent.median():.3g}%",
                      f"median over layers (best {percent.max():.3g}%)"))
    tuned = frame["gain_vs_default"] if "gain_vs_default" in frame else pd.Series(dtype=float)
    if tuned.notna().any():
        cards.append(("tuned vs default config", _ratio_text(geomean(tuned)),
                      f"geomean over {tuned.notna().sum()} rows"))
    energy = models[models["family"] == "model_forward"].set_index("variant")["energy_per_image_uj"]
    if {"adder", "cnn"} <= set(energy.index):
        cards.append(("estimated compute energy per image", f"{energy['adder']:.3g} vs {energy['cnn']:.3g} \u00b5J",
                      f"AdderNet vs CNN, 45 nm model ({energy['adder'] / energy['cnn']:.2f}x)"))
    int8 = frame[(frame["family"] == INT8_FAMILY) & (frame["variant"] == "tuned") & (frame["scope"] == "model")]
    for column, title in INT8_RATIO_NAMES.items():
        value = float(int8[column].iloc[0]) if len(int8) else math.nan
        if math.isfinite(value):
            cards.append((f"whole model, {title} time", f"{value:.3g}x", "interleaved, same run (<1: int8 faster)"))
    counts = frame["status"].value_counts()
    cards.append(("measurements", str(len(frame)), ", ".join(f"{n} {s}" for s, n in counts.items())))
    report.add_summary(cards)


TUNING_COLUMNS = ["layer", "op", "shape", "model_shape", "config", "time_ms", "default_ms", "speedup", "status",
                  "runs", "failed_configs"]


def _tuning_section(report: reports.Report, tuning: pd.DataFrame, metadata: dict, on_gpu: bool) -> None:
    """The tuner's table (`triton_adder.tune.rows_frame`): best launch config per layer problem and op."""
    if on_gpu:
        intro = ("Best launch config per unique adder-layer problem and op, timed with CUDA events by "
                 "python -m triton_adder.tune (speedup = default-config time / best time).")
    else:
        intro = (f"FUNCTIONAL RUN, NOT GPU TIMINGS: {metadata.get('tuning note', 'Triton-interpreter wall clock')}. "
                 "'shape' is the problem that ran, 'model_shape' the model's own layer. The search, the kernels and "
                 "the winner-vs-default output check ran for every layer type; the times only say the pipeline "
                 "works.")
    report.add_section("Tuning", intro)
    columns = [c for c in TUNING_COLUMNS if c in tuning.columns]
    report.add_table(tuning, columns, caption="tuned launch configs (MxNxK tile, warps, stages)", table_id="tuning")


def build_report(frame: pd.DataFrame, metadata: dict | None = None, title: str | None = None,
                 tuning: pd.DataFrame | None = None) -> reports.Report:
    """The report page for `triton_adder.measure.loops.measure` rows (metadata defaults to frame.attrs["metadata"]).

    tuning: the tuner's table (`triton_adder.tune.rows_frame`), shown in its own section when given.
    """
    metadata = dict(frame.attrs.get("metadata", {}) if metadata is None else metadata)
    on_gpu = metadata.get("device_kind") == "cuda"
    notice = None
    if not on_gpu:
        backend = metadata.get("adder backend")
        source = {"cpu": "the CPU path (compiled with torch inductor)", "triton": "the Triton interpreter"}.get(
            backend, "the CPU path or the Triton interpreter")
        notice = (f"{CPU_NOTE}. The benchmark numbers come from {source} on {metadata.get('device', 'a CPU')}, "
                  f"input {metadata.get('input shape', '?')}; they show the pipeline works and how the CPU path "
                  "compares with CPU convolutions, not GPU speed.")
        if tuning is not None:
            notice += " The tuning table is a functional interpreter run on shrunk problems (see Tuning)."
    model = metadata.get("model") or ", ".join(map(str, dict.fromkeys(frame["model"].dropna())))
    title = title or f"AdderNet benchmark: {model} on {metadata.get('device', 'unknown device')}"
    report = reports.Report(title, metadata, notice=notice)
    ok = frame["status"] == "ok"
    layer_rows = frame[frame["scope"] == "layer"]
    layer_ok = layer_rows["status"] == "ok"

    report.add_section("Summary")
    _summary(report, frame, metadata)
    report.add_text("Speedup = baseline time / adder time for the same layer (>1: the adder is faster); "
                    "the adder row per layer is the tuned config where one is cached, else the default config "
                    "(or the CPU path). Geometric means are unweighted over unique layers.")

    if tuning is not None:
        _tuning_section(report, tuning, metadata, on_gpu)

    report.add_section("Per-layer latency", "Median time per call with p20-p80 whiskers, log scale. One group per "
                       "unique adder layer (input CxHxW -> output channels, kernel, stride, padding).")
    for family, name in (("forward", "forward"), ("grad_input", "input gradient"), ("grad_weight", "weight gradient")):
        rows = layer_rows[layer_ok & (layer_rows["family"] == family)]
        _chart(report, f"latency {name}", rows, f"{name}: adder vs baselines (ms, lower is better)",
               category="layer", value="median_ms", series="label", low="p20_ms", high="p80_ms", log=True,
               xlabel="median ms per call (log)")

    report.add_section("Throughput against the ceiling", metadata.get("ceiling method", ""))
    no_ceiling = "no known ceiling for this device (CPU) or op" if on_gpu else "the CPU has no known ceiling"
    for families, name in ((["forward"], "forward"), (["grad_input", "grad_weight"], "gradients")):
        rows = layer_rows[layer_ok & layer_rows["family"].isin(families)]
        _chart(report, f"element rate {name}", rows, f"{name}: adder elements (|x - w| terms) or multiply-"
               "accumulates per second (higher is better)", category="layer", value="element_rate",
               series="label", log=True, xlabel="elements per second (log)")
        _chart(report, f"percent of ceiling {name}", rows, f"{name}: percent of the device's peak for that op "
               "(see the ceiling method above)", missing=no_ceiling, category="layer", value="percent_of_ceiling",
               series="label", reference=(100.0, "ceiling"), xlabel="% of ceiling")

    report.add_section("Tuned vs default configs", "Default-config time / tuned-config time (>1: tuning helped).")
    rows = frame[ok & (frame["variant"] == "tuned")]
    _chart(report, "tuned gain", rows, "gain of the tuned launch config over the heuristic default",
           missing="no tuned config was measured (none cached for these shapes, or the CPU path ran)",
           category="layer", value="gain_vs_default", series="family", reference=(1.0, "no gain"), xlabel="gain (x)")

    report.add_section("Whole model", "Forward (inference, no_grad) and training step (forward, cross-entropy, "
                       "backward, SGD step), AdderNet against its CNN twin, float32.")
    rows = frame[ok & (frame["scope"] == "model") & (frame["family"] != INT8_FAMILY)]
    _chart(report, "model time", rows, "median ms per batch with p20-p80 whiskers", category="family",
           value="median_ms", series="variant", low="p20_ms", high="p80_ms", xlabel="ms per batch")

    if (frame["family"] == INT8_FAMILY).any():
        _int8_section(report, frame, metadata)

    report.add_section("Memory", "Peak allocator memory above the inputs for one call (CUDA only), and the working "
                       "set the memory-hungry baselines would need.")
    rows = layer_rows[layer_ok].assign(peak_memory_mib=pd.to_numeric(layer_rows["peak_memory_bytes"], errors="coerce")
                                 / 2**20)
    _chart(report, "peak memory", rows, "measured peak memory (MiB, log)", category="layer", value="peak_memory_mib",
           missing="peak memory is measured with the CUDA allocator only" if not on_gpu else "",
           series="label", log=True, xlabel="MiB (log)")
    rows = layer_rows.assign(required_memory_mib=pd.to_numeric(layer_rows["required_memory_bytes"], errors="coerce")
                             / 2**20)
    _chart(report, "required memory", rows, "estimated working set of unfold+broadcast and cdist (MiB, log)",
           category="layer", value="required_memory_mib", series="label", log=True, xlabel="MiB (log)")

    report.add_section("Estimated energy", f"Compute-only energy per image from operation counts: float32 add "
                       f"{ENERGY_PJ_ADD} pJ, multiply {ENERGY_PJ_MULTIPLY} pJ at 45 nm (the AdderNet paper's "
                       "argument). An adder element is 2 additions (subtract, accumulate); a multiply-accumulate is "
                       "1 addition + 1 multiplication. Memory traffic, which dominates on real chips, is not counted.")
    energy = pd.concat([
        headline_adder_rows(frame, "forward").assign(kind="adder layer"),
        layer_rows[(layer_rows["op"] == "conv2d") & (layer_rows["variant"] == "fp32")
                   & (layer_rows["family"] == "forward")].assign(kind="conv2d layer"),
    ])
    models = frame[(frame["scope"] == "model") & (frame["family"] == "model_forward")]
    energy = pd.concat([energy, models.assign(kind=models["variant"].map({"adder": "AdderNet", "cnn": "CNN"}))])
    _chart(report, "energy", energy, "estimated energy per image (\u00b5J), one forward", category="layer",
           value="energy_per_image_uj", series="kind", xlabel="\u00b5J per image")
    counts = energy[["layer", "kind", "additions", "multiplications", "energy_per_image_uj"]]
    report.add_table(counts, caption="operation counts per call (whole batch) and energy per image",
                     table_id="energy")

    report.add_section("Full tables")
    main_columns = ["scope", "layer", "layer_count", "family", "label", "backend", "dtype", "status", "median_ms",
                    "p20_ms", "p80_ms", "element_rate", "percent_of_ceiling"]
    main_columns += [c for c in frame.columns if c.startswith("speedup_vs_")] + ["gain_vs_default"]
    report.add_table(frame[ok], main_columns, caption="measured rows", table_id="measured")
    skipped = frame[~ok]
    if len(skipped):
        report.add_table(skipped, ["scope", "layer", "label", "status", "reason", "required_memory_bytes"],
                         caption="skipped or failed measurements, with the reason", table_id="skipped")
    report.add_table(frame, caption="all rows, all columns (the raw data)", table_id="all-rows")
    report.add_downloads({"results.csv": ("text/csv", frame.to_csv(index=False).encode()),
                          "results.json": ("application/json", reports.raw.rows_json(frame, metadata).encode())})
    report.add_metadata()
    return report


def int8_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per adder layer and one for the whole model: each contender's median of the int8 group
    ("int8 tuned ms", "int8 default ms", "<baseline key> ms"), the tuned row's `INT8_RATIOS`, its
    blocking, and why any contender did not run."""
    table = []
    for (scope, layer), group in frame[frame["family"] == INT8_FAMILY].groupby(["scope", "layer"], sort=False):
        adders = group[group["role"] == "adder"].set_index("variant")
        baselines = group[group["role"] == "baseline"].set_index("baseline_key")["median_ms"]
        tuned = adders.loc["tuned"] if "tuned" in adders.index else pd.Series(dtype=object)
        row = {"scope": scope, "layer": layer, "layer_count": group["layer_count"].iloc[0]}
        row.update({f"int8 {v} ms": adders["median_ms"].get(v, math.nan) for v in ("tuned", "default")})
        row.update({f"{key} ms": baselines.get(key, math.nan) for key in INT8_BASELINES})
        row.update({column: tuned.get(column, math.nan) for column in INT8_RATIOS})
        row["tuned config"] = tuned.get("config", "")
        failed = group[group["status"] != "ok"]
        row["not measured"] = "; ".join(dict.fromkeys(f"{label}: {reason}" for label, reason
                                                      in zip(failed["label"], failed["reason"])))
        table.append(row)
    return pd.DataFrame(table)


def _int8_section(report: reports.Report, frame: pd.DataFrame, metadata: dict) -> None:
    get = metadata.get
    report.add_section("int8 inference (CPU)", (
        "Per adder layer and for the whole model, the int8 adder (triton_adder.quantize's kernel; tuned = blocking "
        "None, the tuned blocking where one is cached for this CPU and shape, else the default; default = the "
        "kernel variant's default blocking) against conv2d float32 (whole model: the CNN twin), PyTorch's int8 "
        "quantized conv2d, x86 engine (whole model: the CNN through FX post-training quantization) and our float32 "
        f"adder, float32 in and out, on {get('device', 'this CPU')}, input {get('input shape', '?')}, "
        f"{get('int8 threads', '?')} threads; int8 kernel {get('int8 kernel', '?')}. Timed interleaved (one call "
        "of each per repetition, order shuffled), so the ratios (int8 time / other time, <1: int8 faster) come "
        "from the same repetitions."))
    table = int8_table(frame)
    report.add_table(table, caption="int8 medians (ms) and time ratios of the tuned int8 adder", table_id="int8")
    ratios = table.melt(id_vars=["layer"], value_vars=INT8_RATIOS, var_name="ratio", value_name="value")
    ratios["ratio"] = ratios["ratio"].map(INT8_RATIO_NAMES)
    _chart(report, "int8 ratios", ratios, "int8 adder time / other time (log; < 1: int8 faster)",
           missing="no int8 ratio measured (the reasons are in the table)", category="layer", value="value",
           series="ratio", log=True, reference=(1.0, "equal time"), xlabel="time ratio (log)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "unknown"


def default_output_dir(metadata: dict) -> Path:
    """runs/<model>-<device>/ under the current directory: never a committed folder (/runs/ is git-ignored).

    <device> is the GPU's name on CUDA and "cpu" otherwise (the CPU model is in the page's metadata).
    """
    device = metadata.get("device", "device") if metadata.get("device_kind", "cuda") == "cuda" else "cpu"
    return Path("runs") / f"{_slug(metadata.get('model', 'model'))}-{_slug(device)}"


def write_report(frame: pd.DataFrame, metadata: dict | None = None, out_dir: str | Path | None = None,
                 html_name: str = "report.html", tuning: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write report.html, results.csv and results.json under out_dir; return {"html", "csv", "json"}.

    tuning: the tuner's table, shown in the page (the caller saves it as tuning.csv/json beside).
    """
    metadata = dict(frame.attrs.get("metadata", {}) if metadata is None else metadata)
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(metadata)
    csv_path, json_path = reports.write_raw(frame, metadata, out_dir)
    html_path = build_report(frame, metadata, tuning=tuning).write(out_dir / html_name)
    return {"html": html_path, "csv": csv_path, "json": json_path}


def rerender(results_json: str | Path, output: str | Path | None = None) -> Path:
    """Render a saved results.json (from `write_report`) to HTML; default: report.html beside it.

    A tuning.json beside it (written by `python -m triton_adder.tune`) becomes the Tuning section.
    """
    frame, metadata = reports.read_raw(results_json)
    frame = derive(frame, metadata)
    tuning_json = Path(results_json).with_name("tuning.json")
    tuning = reports.read_raw(tuning_json)[0] if tuning_json.is_file() else None
    output = Path(output) if output is not None else Path(results_json).with_name("report.html")
    return build_report(frame, metadata, tuning=tuning).write(output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_adder.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json written by the benchmark (python -m triton_adder.tune)")
    parser.add_argument("-o", "--output", help="HTML file to write (default: report.html next to results)")
    args = parser.parse_args(argv)
    if Path(args.results).is_dir():
        parser.error(f"results: {args.results!r} is a directory; give the results.json inside it")
    if not Path(args.results).is_file():
        parser.error(f"results: no such file {args.results!r}")
    try:
        path = rerender(args.results, args.output)
    except (ValueError, KeyError) as error:  # json.JSONDecodeError is a ValueError
        parser.error(f"results: {args.results!r} is not a readable results file ({type(error).__name__}: {error})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
