"""The adder kernels side by side with cuDNN on a model's adder layers, on one CUDA GPU.

    python benchmarks/kernel_vs_cudnn.py [--model resnet50] [--batch 64] [--kernel-size 3] [--quick]
                                         [--out runs/benchmarks] [--max-layers N] [--grad-mode paper]
                                         [--variants adder_fp32,conv_fp32,...] [--check-images 2]

The layers are the model's unique adder layers with a kh x kw = kernel-size^2 kernel, as
`triton_adder.models.census` finds them (default: ResNet-50's seven 3x3 layers at batch 64, input
224 x 224); `layer_count` says how often the model calls each. Per layer, timed in one run:

- forward: adder kernel (`kernels.forward`) in float32, float16, bfloat16 against `F.conv2d` in
  float32 with TF32 off, TF32 on, float16 and bfloat16;
- input gradient: adder `grad_input` (paper eq. 6 unless --grad-mode exact) against cuDNN's
  float32 data gradient (TF32 off);
- weight gradient: adder `grad_weight` with method "triton" and "conv_identity" (paper mode only)
  against cuDNN's float32 weight gradient (TF32 off).

Launch configs: what the layer itself would use, i.e. `triton_adder.autotune.lookup.lookup` (the user's
tuning cache, then the configs shipped in tuning/configs/), else the launcher's heuristic default;
the `config` column says which. cuDNN runs with `torch.backends.cudnn.benchmark = True` (its
fastest algorithm per shape, a strict baseline) unless --no-cudnn-benchmark.

Timing: `tuning.benchmark.CudaEventBenchmarker` (warm-up, L2 flushed before each repeat, median of
the repeats; p20/p80 kept). Correctness first: before timing, every adder output is compared with
the float64 reference (`triton_adder.reference`) under the library's tolerance table
(`triton_adder.tolerance`) on a slice of --check-images images: the timed call's own output for
forward and input gradient (image n depends only on image n), a call on the sliced batch with the
same config for the weight gradient (a sum over the batch). The cuDNN outputs get their relative
error against float64 cuDNN on the same slice (informational: TF32/bfloat16 are expected ~1e-3).

Goals (printed with verdicts, and stored in the JSON metadata), per layer and for the model total
(times weighted by layer_count):
- issue 3: float32 adder forward <= 2.5x conv2d float32 (TF32 off); float16 adder forward >= 1.5x
  faster than float32 adder forward;
- issue 4: adder grad_input <= 3x cuDNN float32 data gradient; adder grad_weight <= 1.5x cuDNN
  float32 weight gradient (each method listed; the library default is marked).

Writes <out>/<stem>.csv and <stem>.json (`reports.write_raw`: rows plus metadata with device,
torch/Triton/cuDNN/CUDA versions, driver, clocks, git revision, date and command line); stem
defaults to kernel_vs_cudnn_<device>. Exit status: 0, or 1 when a correctness check failed or an
adder variant could not run. Without a CUDA device it prints that it needs one and exits 0,
writing nothing, unless --cpu-rehearsal: then every step (implementations, float64 slice checks,
timing, tables, files) runs on the CPU with the kernels through the Triton interpreter, for
benchmarks/gpu_run.sh's rehearsal; use it at tiny shapes, its times are interpreter wall clock.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

NEEDS_GPU_MESSAGE = "kernel_vs_cudnn.py needs a CUDA GPU (it times Triton kernels against cuDNN): none found, not run"


@dataclass(frozen=True)
class Variant:
    """One implementation timed on every layer. role: "adder" (ours) or "baseline" (cuDNN/torch)."""

    key: str
    op: str  # "forward" | "grad_input" | "grad_weight"
    role: str
    dtype: str
    label: str


VARIANTS = [
    Variant("adder_fp32", "forward", "adder", "float32", "adder float32"),
    Variant("adder_fp16", "forward", "adder", "float16", "adder float16"),
    Variant("adder_bf16", "forward", "adder", "bfloat16", "adder bfloat16"),
    Variant("conv_fp32", "forward", "baseline", "float32", "conv2d float32 (TF32 off)"),
    Variant("conv_tf32", "forward", "baseline", "float32", "conv2d float32 (TF32 on)"),
    Variant("conv_fp16", "forward", "baseline", "float16", "conv2d float16"),
    Variant("conv_bf16", "forward", "baseline", "bfloat16", "conv2d bfloat16"),
    Variant("adder_grad_input", "grad_input", "adder", "float32", "adder grad_input float32"),
    Variant("cudnn_grad_input", "grad_input", "baseline", "float32", "cuDNN data grad float32 (TF32 off)"),
    Variant("adder_grad_weight_triton", "grad_weight", "adder", "float32", "adder grad_weight triton float32"),
    Variant(
        "adder_grad_weight_conv_identity", "grad_weight", "adder", "float32", "adder grad_weight conv_identity float32"
    ),
    Variant("cudnn_grad_weight", "grad_weight", "baseline", "float32", "cuDNN weight grad float32 (TF32 off)"),
]
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}


@dataclass(frozen=True)
class Implementation:
    """A timed callable; config: the KernelConfig it launches (None for cuDNN and conv_identity)."""

    fn: Callable[[], object]
    config_text: str = ""
    config: object = None


@dataclass(frozen=True)
class Goal:
    """ratio = time(numerator) / time(denominator); met when ratio <= limit ("<=") or >= limit (">=").

    issue: the project issue that set the target ("issue 3": forward, "issue 4": gradients).
    """

    issue: str
    text: str
    numerator: str
    denominator: str
    comparison: str
    limit: float

    def met(self, ratio: float) -> bool | None:
        if not math.isfinite(ratio):
            return None
        return ratio <= self.limit if self.comparison == "<=" else ratio >= self.limit


# fmt: off
GOALS = [
    Goal("issue 3", "adder fp32 fwd / conv fp32 (TF32 off)", "adder_fp32", "conv_fp32", "<=", 2.5),
    Goal("issue 3", "adder fp16 fwd speedup: adder fp32 / adder fp16", "adder_fp32", "adder_fp16", ">=", 1.5),
    Goal("issue 4", "adder grad_input / cuDNN fp32 dgrad", "adder_grad_input", "cudnn_grad_input", "<=", 3.0),
    Goal("issue 4", "adder grad_weight triton / cuDNN fp32 wgrad", "adder_grad_weight_triton", "cudnn_grad_weight",
         "<=", 1.5),
    Goal("issue 4", "adder grad_weight conv_identity / cuDNN fp32 wgrad", "adder_grad_weight_conv_identity",
         "cudnn_grad_weight", "<=", 1.5),
]
# fmt: on
# Context ratios printed beside the goals (no target).
CONTEXT_RATIOS = [
    ("adder fp32 fwd / conv TF32", "adder_fp32", "conv_tf32"),
    ("adder fp32 fwd / conv bf16", "adder_fp32", "conv_bf16"),
    ("adder bf16 speedup over adder fp32", "adder_fp32", "adder_bf16"),
    ("adder fp16 fwd / conv fp16", "adder_fp16", "conv_fp16"),
]
TOTAL = "model total (x layer_count)"


# ---------------------------------------------------------------------------------------------
# Ratios and goals (pure pandas: testable without a GPU)


def layer_times(frame):
    """Median ms per (layer, variant key) of the rows with status "ok", plus the TOTAL row.

    TOTAL is sum over layers of median * layer_count, only where every layer has the variant.
    Returns a DataFrame indexed by layer (first-seen order, TOTAL last) with one column per variant.
    """
    import pandas as pd  # noqa: PLC0415

    ok = frame[frame["status"] == "ok"]
    layers = list(dict.fromkeys(frame["layer"]))
    times = ok.pivot_table(index="layer", columns="variant", values="median_ms", aggfunc="first")
    times = times.reindex(index=layers, columns=[v.key for v in VARIANTS if v.key in set(frame["variant"])])
    counts = frame.drop_duplicates("layer").set_index("layer")["layer_count"].reindex(layers).astype(float)
    total = (times.mul(counts, axis=0)).sum(axis=0, min_count=1)
    total[times.isna().any(axis=0)] = math.nan
    return pd.concat([times, total.to_frame(TOTAL).T])


def evaluate_goals(frame) -> list[dict]:
    """Every goal and context ratio for every layer and the model total: dicts with ratio and verdict."""
    times = layer_times(frame)
    results = []
    for layer in times.index:
        for goal in GOALS:
            ratio = _ratio(times, layer, goal.numerator, goal.denominator)
            results.append(dict(layer=layer, issue=goal.issue, ratio_name=goal.text, ratio=ratio,
                                target=f"{goal.comparison} {goal.limit:g}", met=goal.met(ratio)))  # fmt: skip
        for text, numerator, denominator in CONTEXT_RATIOS:
            ratio = _ratio(times, layer, numerator, denominator)
            results.append(dict(layer=layer, issue="context", ratio_name=text, ratio=ratio, target="", met=None))
    return results


def _ratio(times, layer: str, numerator: str, denominator: str) -> float:
    if numerator not in times.columns or denominator not in times.columns:
        return math.nan
    top, bottom = times.loc[layer, numerator], times.loc[layer, denominator]
    if not (math.isfinite(top) and math.isfinite(bottom)) or bottom <= 0:
        return math.nan
    return float(top / bottom)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def format_tables(frame, goals: list[dict], default_grad_weight_method: str | None = None) -> str:
    """Layer legend, times table (ms, one column per variant) and ratio table (goals G*, context C*)."""
    import pandas as pd  # noqa: PLC0415

    times = layer_times(frame)
    layer_ids = {layer: f"L{i + 1}" for i, layer in enumerate(times.index[:-1])}
    layer_ids[TOTAL] = "total"
    counts = frame.drop_duplicates("layer").set_index("layer")["layer_count"]
    lines = ["Layers:"]
    lines += [f"  {layer_ids[layer]:<3} {layer} (x{counts[layer]})" for layer in times.index[:-1]]
    lines.append(f"  total = {TOTAL}, only where every layer ran")
    lines.append("")
    lines.append("Median times (ms):")
    options = ("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.3f}".format)
    shown = times.rename(index=layer_ids)
    shown.index.name = shown.columns.name = None
    with pd.option_context(*options):
        lines.append(shown.to_string())
    lines.append("")
    table = pd.DataFrame(goals)
    if table.empty:
        return "\n".join(lines)
    names = list(dict.fromkeys(table["ratio_name"]))
    ids, goal_number, context_number = {}, 0, 0
    lines.append("Ratios (time / time):")
    for name in names:
        row = table[table["ratio_name"] == name].iloc[0]
        if row["target"]:
            goal_number += 1
            ids[name] = f"G{goal_number}"
            note = f"  [{row['issue']}: {row['target']}]"
            if default_grad_weight_method and f"grad_weight {default_grad_weight_method}" in name:
                note += " (the library's default method)"
        else:
            context_number += 1
            ids[name] = f"C{context_number}"
            note = "  [context]"
        lines.append(f"  {ids[name]:<3} {name}{note}")
    table["value"] = [
        "-" if not math.isfinite(r) else f"{r:.2f}" + (f" {_verdict(m)}" if t else "")
        for r, t, m in zip(table["ratio"], table["target"], table["met"])
    ]
    pivot = table.pivot_table(index="layer", columns="ratio_name", values="value", aggfunc="first")
    pivot = pivot.reindex(index=list(times.index), columns=names).rename(index=layer_ids, columns=ids)
    pivot.index.name = pivot.columns.name = None
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        lines.append(pivot.to_string())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measuring (CUDA only)


def adder_layers(model_name: str, batch: int, kernel_size: int):
    """[(LayerShape, layer_count)] of the model's unique adder layers with a kernel_size^2 kernel."""
    from triton_adder import models  # noqa: PLC0415
    from triton_adder.models.census import MODEL_INPUT_SIZE, census, unique_adder_layers  # noqa: PLC0415

    size = MODEL_INPUT_SIZE[model_name]
    input_shape = (batch, models.MODELS[model_name][2], size, size)
    calls = census(models.build(model_name, adder=True), input_shape)
    return [(s, c) for s, c in unique_adder_layers(calls) if (s.kh, s.kw) == (kernel_size, kernel_size)]


class LayerRun:
    """Operands, implementations and the slice checks of one layer."""

    def __init__(self, shape, count: int, grad_mode: str, check_images: int, seed: int, device):
        import torch  # noqa: PLC0415

        self.shape, self.count, self.grad_mode = shape, count, grad_mode
        self.geom = shape.geom
        self.device = device
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*size):
            return torch.randn(*size, generator=generator, device=self.device)

        self.x32 = randn(shape.batch, shape.cin, shape.h, shape.w)
        self.w32 = randn(shape.cout, shape.cin // self.geom.groups, shape.kh, shape.kw)
        self.gy32 = randn(shape.batch, shape.cout, *self.geom.out_size)
        self.slice = max(0, min(check_images, shape.batch))
        self._reference_backward = None

    # -- operands and conv arguments

    def operands(self, dtype_name: str):
        import torch  # noqa: PLC0415

        dtype = getattr(torch, dtype_name)
        return self.x32.to(dtype), self.w32.to(dtype)

    def conv_arguments(self):
        """(stride, padding, dilation, groups) for torch's convolution, or None if its padding cannot match."""
        (sh, sw), (ph, pw), (dh, dw) = self.geom.stride, self.geom.padding, self.geom.dilation
        s = self.shape
        ho = (s.h + 2 * ph - dh * (s.kh - 1) - 1) // sh + 1
        wo = (s.w + 2 * pw - dw * (s.kw - 1) - 1) // sw + 1
        if (ho, wo) != tuple(self.geom.out_size):
            return None
        return [sh, sw], [ph, pw], [dh, dw], self.geom.groups

    # -- the implementations (raise _Skip where a variant does not apply)

    def implementation(self, variant: Variant) -> Implementation:
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415

        from triton_adder.autotune import lookup as configs  # noqa: PLC0415
        from triton_adder.backends import triton as backend  # noqa: PLC0415
        from triton_adder.kernels import forward as fwd  # noqa: PLC0415
        from triton_adder.kernels import grad_input as gi  # noqa: PLC0415
        from triton_adder.kernels import grad_weight as gw  # noqa: PLC0415

        geom, mode = self.geom, self.grad_mode
        if variant.role == "adder":
            x, w = self.operands(variant.dtype)
            gy = self.gy32.to(x.dtype)
            op = variant.op
            if variant.key == "adder_grad_weight_conv_identity":
                if mode != "paper":
                    raise _Skip("conv_identity computes the paper gradient only")
                return Implementation(lambda: backend.grad_weight(gy, x, w, geom, mode, method="conv_identity"),
                                      "conv_identity")  # fmt: skip
            # The config the layer would launch: the tuning cache (user's, then shipped), else the default.
            config = configs.lookup(op, x, w, geom, mode)
            source = "tuned" if config is not None else "default"
            if op == "forward":
                config = config or fwd.default_config(x, w, geom)
                fn = lambda: fwd.forward(x, w, None, geom, config)  # noqa: E731
            elif op == "grad_input":
                config = config or gi.default_grad_input_config(x.shape, w.shape, geom, x.device.type)
                fn = lambda: gi.grad_input(gy, x, w, geom, mode, config)  # noqa: E731
            else:
                config = config or gw.default_grad_weight_config(x.shape, w.shape, geom, x.device.type)
                choice = configs.grad_weight_choice(x, w, geom, mode)  # the tuned split goes with the tuned config
                split_k = choice.split_k if source == "tuned" and choice is not None else None
                fn = lambda: gw.grad_weight(gy, x, w, geom, mode, config, split_k)  # noqa: E731
            return Implementation(fn, f"{source} {config.as_dict()}", config)
        arguments = self.conv_arguments()
        if arguments is None:
            raise _Skip("asymmetric padding: no convolution twin")
        stride, padding, dilation, groups = arguments
        if variant.op == "forward":
            x, w = self.operands(variant.dtype)
            return Implementation(lambda: F.conv2d(x, w, None, stride, padding, dilation, groups))
        mask = [True, False, False] if variant.op == "grad_input" else [False, True, False]
        index = 0 if variant.op == "grad_input" else 1
        x, w, gy = self.x32, self.w32, self.gy32

        def conv_backward():
            return torch.ops.aten.convolution_backward(
                gy, x, w, None, stride, padding, dilation, False, [0, 0], groups, mask
            )[index]

        return Implementation(conv_backward)

    # -- correctness on a slice

    def check(self, variant: Variant, impl: Implementation) -> dict:
        """{check, rel_err, max_abs_err, atol, rtol}: adder rows pass/FAIL, baselines their error only."""
        import torch  # noqa: PLC0415

        from triton_adder import reference  # noqa: PLC0415
        from triton_adder.backends import triton as backend  # noqa: PLC0415
        from triton_adder.tolerance import tolerances  # noqa: PLC0415

        if self.slice == 0:
            return dict(check="skipped (--check-images 0)")
        s, geom, shape = self.slice, self.geom, self.shape
        ho, wo = geom.out_size
        dtype = getattr(torch, variant.dtype)
        if variant.role == "baseline":
            actual = self._baseline_slice_output(variant, impl.fn)
            expected = self._baseline_float64(variant)
            return dict(check="info", **_errors(actual, expected))
        x, w = self.operands(variant.dtype)
        if variant.op == "forward":
            actual = impl.fn()[:s]
            expected = reference.adder2d_forward(x[:s], w, None, geom)
            reduction = w.shape[1] * shape.kh * shape.kw
        elif variant.op == "grad_input":
            actual = impl.fn()[:s]
            expected = self.reference_backward()[0]
            reduction = (shape.cout // geom.groups) * shape.kh * shape.kw
        else:  # a sum over the batch: the same routine and config on the sliced batch
            method = variant.key.removeprefix("adder_grad_weight_")
            actual = backend.grad_weight(self.gy32[:s], x[:s], w, geom, self.grad_mode, method=method,
                                         config=impl.config)
            expected = self.reference_backward()[1]
            reduction = s * ho * wo
        tol = tolerances(dtype, reduction)
        errors = _errors(actual, expected)
        passed = bool(torch.isfinite(actual).all()) and bool(torch.allclose(actual.double(), expected, **tol))
        return dict(check="pass" if passed else "FAIL", atol=tol["atol"], rtol=tol["rtol"], **errors)

    def reference_backward(self):
        from triton_adder import reference  # noqa: PLC0415

        if self._reference_backward is None:
            s = self.slice
            self._reference_backward = reference.adder2d_backward(
                self.gy32[:s], self.x32[:s], self.w32, self.geom, self.grad_mode
            )
        return self._reference_backward

    def _baseline_slice_output(self, variant: Variant, fn):
        out = fn()
        if variant.op == "grad_weight":  # a batch sum: recompute on the slice with the same routine
            import torch  # noqa: PLC0415

            stride, padding, dilation, groups = self.conv_arguments()
            s = self.slice
            return torch.ops.aten.convolution_backward(
                self.gy32[:s], self.x32[:s], self.w32, None, stride, padding, dilation, False, [0, 0], groups,
                [False, True, False],
            )[1]  # fmt: skip
        return out[: self.slice]

    def _baseline_float64(self, variant: Variant):
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415

        stride, padding, dilation, groups = self.conv_arguments()
        s = self.slice
        x, w = self.operands(variant.dtype)
        x64, w64, gy64 = x[:s].double(), w.double(), self.gy32[:s].double()
        if variant.op == "forward":
            return F.conv2d(x64, w64, None, stride, padding, dilation, groups)
        mask = [True, False, False] if variant.op == "grad_input" else [False, True, False]
        index = 0 if variant.op == "grad_input" else 1
        return torch.ops.aten.convolution_backward(
            gy64, x64, w64, None, stride, padding, dilation, False, [0, 0], groups, mask
        )[index]


class _Skip(Exception):
    """A variant that does not apply to this layer or mode (a "skipped" row, not an error)."""


def _errors(actual, expected) -> dict:
    """Relative error ||a - e|| / ||e|| and max |a - e| (float64)."""
    import torch  # noqa: PLC0415

    difference = actual.double() - expected.double()
    norm = float(torch.linalg.vector_norm(expected.double()))
    return dict(
        rel_err=float(torch.linalg.vector_norm(difference)) / norm if norm > 0 else math.nan,
        max_abs_err=float(difference.abs().max()) if difference.numel() else 0.0,
    )


def measure(args, device, timer, layers, after_layer: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run the selected variants on `layers` [(LayerShape, count)] on `device` with `timer`; return the rows.

    device is CUDA in `main`; tests run the same code on the CPU under the Triton interpreter.
    after_layer(rows so far) runs after each layer (`run` saves there, so a killed run keeps its layers).
    """
    import torch  # noqa: PLC0415

    from triton_adder.measure.precision import tf32_mode  # noqa: PLC0415

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    variants = [VARIANT_BY_KEY[key] for key in args.variants]
    rows = []
    for index, (shape, count) in enumerate(layers):
        run = LayerRun(shape, count, args.grad_mode, args.check_images, seed=index, device=device)
        (sh, _), (ph, _) = shape.geom.stride, shape.geom.padding
        common = dict(
            model=args.model, layer=shape.name, layer_count=count, batch=shape.batch, cin=shape.cin, h=shape.h,
            w=shape.w, cout=shape.cout, kh=shape.kh, kw=shape.kw, stride=sh, padding=ph,
            ho=shape.geom.out_size[0], wo=shape.geom.out_size[1], groups=shape.geom.groups, elements=shape.elements,
        )  # fmt: skip
        print(f"[{index + 1}/{len(layers)}] {shape.name} (x{count})", file=sys.stderr, flush=True)
        for variant in variants:
            row = dict(common, op=variant.op, variant=variant.key, label=variant.label, role=variant.role,
                       dtype=variant.dtype, grad_mode=args.grad_mode if variant.op != "forward" else "",
                       config="", status="ok", reason="")  # fmt: skip
            try:
                with tf32_mode(variant.key == "conv_tf32"):
                    impl = run.implementation(variant)
                    row["config"] = impl.config_text
                    row.update(run.check(variant, impl))
                    measurement = timer.measure(impl.fn)
                samples_ms = sorted(t * 1e3 for t in measurement.samples)
                row.update(median_ms=measurement.time_s * 1e3, p20_ms=_percentile(samples_ms, 20),
                           p80_ms=_percentile(samples_ms, 80), repeats=len(samples_ms),
                           g_elements_per_s=shape.elements / measurement.time_s / 1e9)  # fmt: skip
            except _Skip as why:
                row.update(status="skipped", reason=str(why))
            except torch.OutOfMemoryError as error:
                row.update(status="skipped", reason=f"out of memory: {str(error).splitlines()[0][:200]}")
            except Exception as error:  # noqa: BLE001  (one failing variant must not end the run)
                row.update(status="error", reason=f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
            rows.append(row)
            _progress(row)
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if after_layer is not None:
            after_layer(rows)
    return rows


def run_description(args, timer_name: str, timer_settings: str, layers: int) -> dict:
    """The run's own metadata (beside `measure.machine.machine_metadata`'s device, versions, date and command)."""
    return {
        "benchmark": "kernel_vs_cudnn",
        "model": args.model,
        "batch": args.batch,
        "kernel size": args.kernel_size,
        "layers": layers,
        "grad mode": args.grad_mode,
        "cudnn.benchmark": args.cudnn_benchmark,
        "variants": ",".join(args.variants),
        "timing method": f"tuning.benchmark.{timer_name} {timer_settings}; median, p20, p80",
        "check": (
            f"float64 reference on the first {args.check_images} image(s), triton_adder.tolerance table; "
            "cuDNN rows: relative error against float64 cuDNN (no pass/fail)"
        ),
    }


def _settings(timer) -> str:
    names = ("warmup", "min_repeats", "max_repeats", "target_s", "repeats")
    text = ", ".join(f"{name} {getattr(timer, name)}" for name in names if hasattr(timer, name))
    if getattr(timer, "_flush_buffer", None) is not None:
        text += ", L2 flushed before each repeat"
    return f"({text})"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100
    low = int(math.floor(position))
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _progress(row: dict) -> None:
    if row["status"] != "ok":
        text = f"{row['status']}: {row['reason']}"
    else:
        text = f"{row['median_ms']:.3f} ms"
        if "rel_err" in row:
            text += f", check {row.get('check')} (rel err {row['rel_err']:.1e})"
    print(f"    {row['label']:<45} {text}", file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/kernel_vs_cudnn.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", default="resnet50", help="a model of triton_adder.models (default resnet50)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--kernel-size", type=int, default=3, help="only layers with this square kernel (default 3)")
    parser.add_argument("--max-layers", type=int, default=None, help="only the first N such layers")
    parser.add_argument("--grad-mode", choices=("paper", "exact"), default="paper")
    parser.add_argument("--check-images", type=int, default=2,
                        help="images of the float64 correctness check (0: no check; default 2)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer timed repeats (smoke run)")
    parser.add_argument(
        "--no-cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_false",
        help="leave torch.backends.cudnn.benchmark off (cuDNN's heuristic algorithm choice)",
    )
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="without a GPU: run every step on the CPU through the Triton interpreter "
                             "(needs TRITON_INTERPRET=1; functional, NOT GPU timings)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs") / "benchmarks", help="output folder")
    parser.add_argument("--stem", default=None, help="output file stem (default kernel_vs_cudnn_<device>)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANT_BY_KEY),
        help=f"comma list of the variants to run (default all: {','.join(VARIANT_BY_KEY)})",
    )
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANT_BY_KEY]
    if unknown or not args.variants:
        parser.error(f"--variants must be a comma list of {list(VARIANT_BY_KEY)}, got {unknown or 'none'}")
    if args.batch < 1 or args.kernel_size < 1 or args.check_images < 0:
        parser.error("--batch and --kernel-size must be >= 1 and --check-images >= 0")
    if args.max_layers is not None and args.max_layers < 1:
        parser.error(f"--max-layers must be >= 1, got {args.max_layers}")
    return args


def run(args, device, command_line: str):
    """Measure on `device`, writing the CSV/JSON after every layer; return (frame, metadata, goals, paths)."""
    import pandas as pd  # noqa: PLC0415

    import reports  # noqa: PLC0415
    from triton_adder.backends import triton as backend  # noqa: PLC0415
    from triton_adder.measure.machine import machine_metadata  # noqa: PLC0415
    from tuning.benchmark import benchmarker_for  # noqa: PLC0415

    layers = adder_layers(args.model, args.batch, args.kernel_size)[: args.max_layers]
    if not layers:
        raise SystemExit(f"--model {args.model} has no adder layer with a {args.kernel_size}x{args.kernel_size} kernel")
    layer_count = len(layers)
    timer = benchmarker_for(device, quick=args.quick)
    metadata = machine_metadata(device, command_line)
    metadata.update(run_description(args, type(timer).__name__, _settings(timer), layer_count))
    metadata["library default grad_weight method"] = backend.default_grad_weight_method(device, args.grad_mode)
    stem = args.stem or f"kernel_vs_cudnn_{_slug(metadata['device'])}"
    state = {}

    def save(rows: list[dict]) -> None:
        frame = pd.DataFrame(rows)
        goals = evaluate_goals(frame)
        metadata["goals"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                              for k, v in g.items()} for g in goals if g["issue"] != "context"]  # fmt: skip
        metadata["complete"] = len(set(frame["layer"])) == layer_count
        state.update(frame=frame, goals=goals, written=reports.write_raw(frame, metadata, args.out, stem=stem))

    measure(args, device, timer, layers, after_layer=save)
    return state["frame"], metadata, state["goals"], state["written"]


def failures(frame):
    """Adder rows that errored or failed their correctness check."""
    if frame.empty:
        return frame
    errored = frame["status"] == "error"
    if "check" in frame.columns:
        errored |= frame["check"] == "FAIL"
    return frame[(frame["role"] == "adder") & errored]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # noqa: PLC0415

    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.cpu_rehearsal:
        if torch.cuda.is_available() or not interpreter:
            print("kernel_vs_cudnn.py: --cpu-rehearsal needs TRITON_INTERPRET=1 on a machine without a GPU",
                  file=sys.stderr)  # fmt: skip
            return 2
    elif not torch.cuda.is_available():
        print(NEEDS_GPU_MESSAGE, file=sys.stderr)
        return 0
    elif interpreter:
        print("kernel_vs_cudnn.py: unset TRITON_INTERPRET (the interpreter would run the kernels on the CPU)",
              file=sys.stderr)  # fmt: skip
        return 2
    from triton_adder import models  # noqa: PLC0415

    if args.model not in models.MODELS:
        print(f"--model must be one of {sorted(models.MODELS)}, got {args.model!r}", file=sys.stderr)
        return 2
    command_line = shlex.join([sys.executable, *sys.argv] if argv is None else ["kernel_vs_cudnn.py", *argv])
    device = torch.device("cpu") if args.cpu_rehearsal else torch.device("cuda", torch.cuda.current_device())
    frame, metadata, goals, (csv_path, json_path) = run(args, device, command_line)
    print(f"{metadata['device']}, torch {metadata['torch']}, Triton {metadata['triton']}, cuDNN {metadata['cudnn']}, "
          f"CUDA {metadata['cuda']}, driver {metadata['driver']}, {metadata['date']}")  # fmt: skip
    print(format_tables(frame, goals, metadata["library default grad_weight method"]))
    failed = failures(frame)
    for _, row in failed.iterrows():
        print(f"FAILED: {row['layer']} {row['label']}: status {row['status']} {row['reason']} "
              f"check {row.get('check', '')}")  # fmt: skip
    print(f"wrote {csv_path} and {json_path}")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    from triton_adder.child_process import exit_on_sigterm

    exit_on_sigterm()  # a `timeout` (benchmarks/gpu_run.sh) must not leave compiles running
    sys.exit(main())
