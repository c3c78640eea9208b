"""Columns of a benchmark row and the columns derived from them (`derive`), with their constants.

Raw rows carry `COLUMNS` (what ran, on which shape, how long, how much memory); `derive` adds the
element rate, the percent of the device ceiling, speedups against every baseline, operation counts
and the paper's 45 nm energy estimate.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from triton_adder.measure.sass import FP32_FLOOR_PER_ELEMENT

# Energy per float32 operation at 45 nm (Horowitz, ISSCC 2014), the figures AdderNet's paper uses
# for its energy argument. Compute only: memory traffic, which dominates real chips, is left out.
ENERGY_PJ_ADD = 0.9
ENERGY_PJ_MULTIPLY = 3.7

# FP32-pipe instructions per reduced element, the ceiling the report divides by: the floors of the
# compiled loops (`measure.sass.FP32_FLOOR_PER_ELEMENT`, which the SASS screen checks each kernel
# against), the same for every dtype because the kernels widen 16-bit operands to float32 at load.
ADDER_INSTRUCTIONS_PER_ELEMENT = {
    (family, dtype): floor
    for family, floor in FP32_FLOOR_PER_ELEMENT.items()
    for dtype in ("float32", "float16", "bfloat16")
}

# The notice every CPU or Triton-interpreter run carries (metadata "note", the report banner).
CPU_NOTE = "CPU/interpreter run: not GPU timings"

# The int8 comparison (`measure.int8`): rows of this family form one interleaved group per layer
# (and for the whole model); int8_over_<key> = int8 adder median / the <key> baseline's median of
# the same group (< 1: int8 faster; the issue-27 goal for the whole model is int8_over_conv2d_fp32
# <= 0.5), and int8_tuned_over_default = tuned median / default-blocking median.
INT8_FAMILY = "int8"
INT8_BASELINES = {"conv2d_fp32": "conv2d float32", "qconv_int8": "PyTorch int8 conv2d (x86)",
                  "adder_fp32": "float32 adder"}
INT8_RATIOS = [f"int8_over_{key}" for key in INT8_BASELINES] + ["int8_tuned_over_default"]

# The raw columns of a row, in this order first; derived columns follow.
COLUMNS = [
    "scope", "model", "layer", "layer_count", "batch", "cin", "h", "w", "cout", "kh", "kw", "stride", "padding",
    "dilation", "groups", "ho", "wo", "family", "op", "variant", "label", "role", "baseline_key", "backend",
    "dtype", "config", "status", "reason", "median_ms", "p20_ms", "p80_ms", "repeats", "peak_memory_bytes",
    "required_memory_bytes", "elements", "additions", "multiplications",
]  # fmt: skip


def ceiling_rate(row, ceiling: dict) -> tuple[float, str]:
    """(peak elements/s for this row's op on this device, basis text); NaN when unknown."""
    fp32 = ceiling.get("fp32_instructions_per_s", math.nan)
    if row["scope"] != "layer":
        return math.nan, ""
    if row["op"].startswith("adder_") or row["op"] in ("unfold_broadcast", "cdist_l1"):
        per_element = ADDER_INSTRUCTIONS_PER_ELEMENT.get((row["family"], row["dtype"]))
        if per_element is None:
            return math.nan, ""
        return fp32 / per_element, f"{per_element:g} FP32-pipe instructions per adder element"
    if row["op"].startswith("conv2d"):
        if row["variant"] == "fp32":
            return fp32, "1 FFMA per multiply-accumulate"
        rate = ceiling.get("tensor_macs_per_s", {}).get(row["variant"], math.nan)
        return rate, "dense tensor-core MACs" if math.isfinite(rate) else ""
    return math.nan, ""


def derive(frame: pd.DataFrame, metadata: dict, ceiling: dict | None = None) -> pd.DataFrame:
    """Add derived columns to raw rows (idempotent: existing derived columns are recomputed).

    element_rate: elements (adder |x-w| terms, or MACs) per second at the median time.
    ceiling_rate / percent_of_ceiling: the device's peak for that op (see `device_ceiling`).
    additions / multiplications: operation counts of one measured call (adder element = 2 adds).
    energy_per_image_uj: additions * 0.9 pJ + multiplications * 3.7 pJ, per image (45 nm model).
    speedup_vs_<baseline_key>: baseline median / adder median for the same layer (or model) and
    family (>1: the adder is faster). gain_vs_default: default-config median / tuned median.
    int8_over_<key>, int8_tuned_over_default: time ratios of the int8 rows (`INT8_RATIOS`).
    """
    frame = frame.copy()
    frame.attrs["metadata"] = dict(metadata)
    frame["label"] = frame["op"].astype(str) + " " + frame["variant"].astype(str)
    median_s = pd.to_numeric(frame["median_ms"], errors="coerce") / 1e3
    elements = pd.to_numeric(frame["elements"], errors="coerce")
    frame["element_rate"] = elements / median_s
    is_layer_adder = (frame["scope"] == "layer") & frame["op"].isin(
        ["adder_forward", "adder_grad_input", "adder_grad_weight", "unfold_broadcast", "cdist_l1",
         "int8_adder"])
    is_layer = frame["scope"] == "layer"
    frame.loc[is_layer, "additions"] = np.where(is_layer_adder[is_layer], 2 * elements[is_layer], elements[is_layer])
    frame.loc[is_layer, "multiplications"] = np.where(is_layer_adder[is_layer], 0, elements[is_layer])
    batch = pd.to_numeric(frame["batch"], errors="coerce")
    frame["energy_per_image_uj"] = (pd.to_numeric(frame["additions"], errors="coerce") * ENERGY_PJ_ADD
                                    + pd.to_numeric(frame["multiplications"], errors="coerce") * ENERGY_PJ_MULTIPLY
                                    ) / batch / 1e6
    frame.loc[frame["dtype"] == "int8", "energy_per_image_uj"] = math.nan  # the 45 nm figures are float32 ops
    if ceiling is not None or "ceiling_rate" not in frame.columns:
        # Without a ceiling (re-rendering saved rows elsewhere) keep the one measured with the rows.
        pairs = [ceiling_rate(row, ceiling or {}) for _, row in frame.iterrows()]
        frame["ceiling_rate"] = np.asarray([p[0] for p in pairs], dtype=float)
        frame["ceiling_basis"] = [p[1] for p in pairs]
    frame["ceiling_rate"] = pd.to_numeric(frame["ceiling_rate"], errors="coerce")
    frame["percent_of_ceiling"] = 100 * frame["element_rate"] / frame["ceiling_rate"]
    # Speedups: every adder row against every baseline row of the same layer/model and family.
    ok = frame["status"] == "ok"
    baseline_rows = frame[ok & (frame["role"] == "baseline")]
    for column in [c for c in frame.columns if c.startswith("speedup_vs_")]:
        frame[column] = math.nan
    for key in dict.fromkeys(baseline_rows["baseline_key"]):
        times = baseline_rows[baseline_rows["baseline_key"] == key].groupby(["scope", "layer", "family"])["median_ms"]
        lookup = times.median()
        column = f"speedup_vs_{key}"
        frame[column] = math.nan
        for index, row in frame[ok & (frame["role"] == "adder")].iterrows():
            base = lookup.get((row["scope"], row["layer"], row["family"]))
            if base is not None:
                frame.loc[index, column] = base / row["median_ms"]
    frame["gain_vs_default"] = math.nan
    defaults = frame[ok & (frame["variant"] == "default")].groupby(["layer", "family", "dtype"])["median_ms"].median()
    for index, row in frame[ok & (frame["variant"] == "tuned")].iterrows():
        base = defaults.get((row["layer"], row["family"], row["dtype"]))
        if base is not None:
            frame.loc[index, "gain_vs_default"] = base / row["median_ms"]
    _int8_ratios(frame, ok)
    return frame


def _int8_ratios(frame: pd.DataFrame, ok: pd.Series) -> None:
    """INT8_RATIOS in place, on the int8 adder rows, from the medians of their own interleaved group."""
    for column in INT8_RATIOS:
        frame[column] = math.nan
    group_rows = frame[ok & (frame["family"] == INT8_FAMILY)]
    for _, group in group_rows.groupby(["scope", "layer"], sort=False):
        baselines = group[group["role"] == "baseline"].set_index("baseline_key")["median_ms"]
        adders = group[group["role"] == "adder"]
        for index, row in adders.iterrows():
            for key in INT8_BASELINES:
                if key in baselines.index:
                    frame.loc[index, f"int8_over_{key}"] = row["median_ms"] / baselines[key]
        default = adders.loc[adders["variant"] == "default", "median_ms"]
        for index, row in adders[adders["variant"] == "tuned"].iterrows():
            if len(default):
                frame.loc[index, "int8_tuned_over_default"] = row["median_ms"] / default.iloc[0]
