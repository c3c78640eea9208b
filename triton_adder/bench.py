"""Benchmark AdderNet layers and models against the multiplication-based baselines a user would pick.

`measure(...)` returns a pandas DataFrame, one row per measurement, with the machine's metadata
in `frame.attrs["metadata"]`; `triton_adder.report` renders it. What is measured, per unique
adder layer of a model (same input shape and layer arguments = one row set, `layer_count` says
how often the model uses it):

- adder forward with the tuned and the default launch config (Triton kernels), or the CPU path;
  adder input and weight gradients (paper eq. 6 and eq. 5);
- conv2d forward in float32 with TF32 off (the same FP32 units), TF32, float16, bfloat16 (tensor
  cores), and conv2d's input/weight gradients in float32;
- the published unfold-and-broadcast adder (github.com/huawei-noah/AdderNet, adder.py) and
  torch.cdist(p=1) on the unfolded input, when their working set fits the memory budget (else a
  "skipped" row with `required_memory_bytes`);
- peak memory of each (CUDA allocator high-water mark; not measurable on the CPU: NaN there);

and per model: forward and training-step time, AdderNet against its CNN twin.

Timing: CUDA events on a GPU (`tuning.benchmark.CudaEventBenchmarker`: warm-up, L2 flushed
before each repeat), `time.perf_counter` elsewhere (`WallClockBenchmarker`); median, p20, p80 of
the repeats. A measurement that cannot run (missing kernel, out of memory, unsupported dtype) is a
row with status "skipped" or "error" and a reason; `measure` never raises for one.

CLI: `python -m triton_adder.bench --model resnet50 [--quick]` measures and writes the report
(`triton_adder.report.write_report`) under results/reports/<model>-<device>/.

Derived columns (`derive`): element rate, percent of the device ceiling, speedups against every
baseline, operation counts and the paper's 45 nm energy estimate (see the constants below).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
import platform
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.models.census import DEFAULT_GPU_BATCH, MODEL_INPUT_SIZE, LayerCall, census, unique_adder_layers

# Energy per float32 operation at 45 nm (Horowitz, ISSCC 2014), the figures AdderNet's paper uses
# for its energy argument. Compute only: memory traffic, which dominates real chips, is left out.
ENERGY_PJ_ADD = 0.9
ENERGY_PJ_MULTIPLY = 3.7

# Instructions per reduced element on the FP32 pipe (DESIGN.md section 2). Adder forward float32:
# FADD d = x - w, FADD acc += |d| (abs is a free operand modifier). float16/bfloat16: packed
# 2-wide HADD2, about one instruction per element. Weight gradient (eq. 5): FADD x - w, FFMA
# with grad_out. Input gradient (eq. 6): FADD w - x, 2 min/max for the clamp, FFMA.
ADDER_INSTRUCTIONS_PER_ELEMENT = {
    ("forward", "float32"): 2.0,
    ("forward", "float16"): 1.0,
    ("forward", "bfloat16"): 1.0,
    ("grad_weight", "float32"): 2.0,
    ("grad_input", "float32"): 4.0,
}

# FP32 lanes per SM by compute capability major.minor (CUDA programming guide, arithmetic
# instruction throughput table): 64 on GV100/GA100, 128 on GA10x, AD10x, GH100.
FP32_LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128}
# Dense tensor-core multiply-accumulates per SM per clock on Hopper (sm_90), from NVIDIA's H100
# whitepaper (989 dense fp16 TFLOPS = 132 SMs x 2048 MAC x 2 x 1.83 GHz); TF32 is half of that.
TENSOR_MACS_PER_SM_CLOCK = {(9, 0): {"tf32": 1024, "float16": 2048, "bfloat16": 2048}}
# Nominal maximum SM clocks (MHz) used only when NVML and nvidia-smi cannot tell (spec sheets).
NOMINAL_MAX_SM_CLOCK_MHZ = {"H200": 1980, "H100 NVL": 1785, "H100 PCIe": 1755, "H100": 1980, "A100": 1410}


CONV_PRECISIONS = ("fp32", "tf32", "float16", "bfloat16")
CPU_NOTE = "CPU/interpreter run: not GPU timings"

COLUMNS = [
    "scope", "model", "layer", "layer_count", "batch", "cin", "h", "w", "cout", "kh", "kw", "stride", "padding",
    "dilation", "groups", "ho", "wo", "family", "op", "variant", "label", "role", "baseline_key", "backend",
    "dtype", "config", "status", "reason", "median_ms", "p20_ms", "p80_ms", "repeats", "peak_memory_bytes",
    "required_memory_bytes", "elements", "additions", "multiplications",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Layers of a model


# ---------------------------------------------------------------------------------------------
# Machine


def _run_text(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _nvml_clocks(index: int) -> dict:
    """SM/memory clocks (MHz) and driver from NVML, or nvidia-smi, or {} when neither answers."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            driver = pynvml.nvmlSystemGetDriverVersion()
            return dict(
                sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                memory_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                driver=driver.decode() if isinstance(driver, bytes) else driver,
                clock_source="NVML",
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  (pynvml absent or no permission: fall back to nvidia-smi)
        pass
    text = _run_text(["nvidia-smi", f"--id={index}", "--format=csv,noheader,nounits",
                      "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,driver_version"])
    if text:
        parts = [p.strip() for p in text.splitlines()[0].split(",")]
        if len(parts) == 4:
            def number(p):
                return float(p) if p.replace(".", "", 1).isdigit() else None

            return dict(sm_clock_mhz=number(parts[0]), max_sm_clock_mhz=number(parts[1]),
                        memory_clock_mhz=number(parts[2]), driver=parts[3], clock_source="nvidia-smi")
    return {}


def device_ceiling(device: torch.device) -> dict:
    """Peak rates of `device` and how they were obtained.

    Returns {"fp32_instructions_per_s", "tensor_macs_per_s": {precision: rate}, "ceiling_method", ...}.
    On the CPU the ceiling is unknown: rates are NaN and the method says so.
    """
    if device.type != "cuda":
        return {"fp32_instructions_per_s": math.nan, "tensor_macs_per_s": {},
                "ceiling_method": "unknown on the CPU: percent-of-ceiling columns are NaN"}
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    clocks = _nvml_clocks(device.index or 0)
    clock_mhz, clock_source = clocks.get("max_sm_clock_mhz"), clocks.get("clock_source")
    if not clock_mhz:
        for name, mhz in NOMINAL_MAX_SM_CLOCK_MHZ.items():  # longest names first in the table
            if name in props.name:
                clock_mhz, clock_source = mhz, f"nominal spec-sheet max clock for {name}"
                break
    lanes = FP32_LANES_PER_SM.get(capability)
    if not clock_mhz or lanes is None:
        return {"fp32_instructions_per_s": math.nan, "tensor_macs_per_s": {}, **clocks,
                "ceiling_method": f"unknown: no clock or FP32 lane count for {props.name} "
                                  f"(sm_{props.major}{props.minor})"}
    clock_hz = clock_mhz * 1e6
    fp32_rate = props.multi_processor_count * lanes * clock_hz
    tensor = {k: props.multi_processor_count * v * clock_hz for k, v in TENSOR_MACS_PER_SM_CLOCK.get(capability,
                                                                                                   {}).items()}
    method = (f"{props.multi_processor_count} SMs x {lanes} FP32 lanes x {clock_mhz:g} MHz max SM clock "
              f"({clock_source}) = {fp32_rate / 1e12:.2f} T FP32 instructions/s; adder ceiling = that / "
              f"instructions per element (float32 forward: 2); conv2d fp32 ceiling = 1 FFMA per MAC")
    if tensor:
        method += "; tensor-core ceilings: dense MAC/SM/clock from the H100 whitepaper x the same clock"
    return {"fp32_instructions_per_s": fp32_rate, "tensor_macs_per_s": tensor, "ceiling_method": method,
            "sm_count": props.multi_processor_count, "max_sm_clock_mhz_used": clock_mhz, **clocks}


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    revision = _run_text(["git", "-C", str(root), "rev-parse", "HEAD"])
    if not revision:
        return "unknown (not a git checkout)"
    dirty = _run_text(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return revision + (" (with uncommitted changes)" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_metadata(device: torch.device, command_line: str | None = None) -> dict:
    """Where and how the numbers were taken: device, clocks, versions, git revision, date, command."""
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_gpu = device.type == "cuda"
    ceiling = device_ceiling(device)
    metadata = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"{_cpu_name()} ({os.cpu_count()} logical CPUs)",
        "device_kind": "cuda" if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": str(torch.backends.cudnn.version()) if on_gpu else "n/a (CPU)",
        "cuda": torch.version.cuda or "n/a",
        "driver": ceiling.get("driver", "unknown") if on_gpu else "n/a (CPU)",
        "git revision": _git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command line": command_line if command_line is not None else shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "triton interpreter": os.environ.get("TRITON_INTERPRET", "0"),
        "ceiling method": ceiling["ceiling_method"],
        "timing method": ("CUDA events; warm-up, L2 flushed before each repeat; median, p20, p80"
                          if on_gpu else "time.perf_counter wall clock; warm-up; median, p20, p80"),
        "energy model": (f"45 nm float32: add {ENERGY_PJ_ADD} pJ, multiply {ENERGY_PJ_MULTIPLY} pJ (Horowitz 2014, "
                         "as in the AdderNet paper); adder element = 2 additions, MAC = 1 add + 1 multiply; "
                         "compute only, no memory traffic"),
    }
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        metadata.update({"compute capability": f"{props.major}.{props.minor}", "SM count": props.multi_processor_count,
                         "GPU memory (GiB)": round(props.total_memory / 2**30, 1)})
        for key in ("sm_clock_mhz", "max_sm_clock_mhz", "memory_clock_mhz", "clock_source"):
            if key in ceiling:
                metadata[key.replace("_", " ")] = ceiling[key]
    else:
        metadata["note"] = CPU_NOTE
    return metadata


# ---------------------------------------------------------------------------------------------
# Timing


def _benchmarker(device: torch.device, quick: bool, repeats: int | None):
    from triton_adder.tuning.benchmark import CudaEventBenchmarker, WallClockBenchmarker  # noqa: PLC0415

    if device.type == "cuda":
        if quick:
            return CudaEventBenchmarker(device, warmup=1, min_repeats=3, max_repeats=20, target_s=0.02)
        return CudaEventBenchmarker(device, warmup=3, min_repeats=repeats or 10, max_repeats=100, target_s=0.1)
    return WallClockBenchmarker(warmup=1, repeats=repeats or (3 if quick else 7))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_budget(device: torch.device, budget: int | None) -> int:
    """Bytes a baseline may allocate: explicit, else 80% of free GPU memory / 25% of available RAM."""
    if budget is not None:
        return budget
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.8)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2**30


class _Recorder:
    """Runs measurements and accumulates rows; failures become rows, never exceptions."""

    def __init__(self, device: torch.device, quick: bool, repeats: int | None):
        self.device = device
        self.bench = _benchmarker(device, quick, repeats)
        self.rows: list[dict] = []

    def time(self, fn: Callable[[], object], **row) -> dict:
        """Time fn (median/p20/p80) and its peak memory; add and return the row (status ok/error)."""
        row = {"status": "ok", "reason": "", **row}
        try:
            measurement = self.bench.measure(fn)
            samples_ms = np.asarray(measurement.samples, dtype=float) * 1e3
            row.update(median_ms=float(np.median(samples_ms)), p20_ms=float(np.percentile(samples_ms, 20)),
                       p80_ms=float(np.percentile(samples_ms, 80)), repeats=len(samples_ms))
            row["peak_memory_bytes"] = self._peak_memory(fn)
        except torch.OutOfMemoryError as error:
            row.update(status="skipped", reason=f"out of memory: {str(error).splitlines()[0][:200]}")
        except Exception as error:  # noqa: BLE001  (a benchmark row records why, the run goes on)
            row.update(status="error", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                       if str(error) else type(error).__name__)
        finally:
            if self.device.type == "cuda" and row["status"] != "ok":
                torch.cuda.empty_cache()
        self.rows.append(row)
        return row

    def skip(self, reason: str, **row) -> dict:
        row = {"status": "skipped", "reason": reason, **row}
        self.rows.append(row)
        return row

    def _peak_memory(self, fn) -> float:
        """Allocator high-water mark above the live memory before one call (CUDA only; NaN on CPU)."""
        if self.device.type != "cuda":
            return math.nan
        _synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        _synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device) - before)


# ---------------------------------------------------------------------------------------------
# Implementations being compared


@contextlib.contextmanager
def _tf32(enabled: bool):
    """Allow or forbid TF32 in cuDNN convolutions and cuBLAS matmuls inside the block; restore after.

    Uses the per-operator `fp32_precision` flags where this torch has them (reading the legacy
    `allow_tf32` after someone set the new API can raise), else the legacy `allow_tf32` flags.
    Note cuDNN convolutions default to TF32 on: "float32" baselines must turn it off explicitly.
    """
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        saved = (cudnn_conv.fp32_precision, matmul.fp32_precision)
        cudnn_conv.fp32_precision = matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def _conv_padding(shape: LayerShape) -> tuple[int, int] | None:
    """Symmetric conv2d padding equal to the geometry's, or None when the geometry is asymmetric."""
    ho, wo = shape.geom.out_size
    ph, pw = shape.geom.padding
    (sh, sw), (dh, dw) = shape.geom.stride, shape.geom.dilation
    if (shape.h + 2 * ph - dh * (shape.kh - 1) - 1) // sh + 1 != ho:
        return None
    if (shape.w + 2 * pw - dw * (shape.kw - 1) - 1) // sw + 1 != wo:
        return None
    return ph, pw


def unfold_broadcast_adder(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    """The published AdderNet forward (huawei-noah/AdderNet adder.py): unfold, broadcast |W - X|, sum.

    x: (N, Cin, H, W), weight: (Cout, Cin, kh, kw), groups must be 1. Memory: 2 * Cout * K * L
    elements for the broadcast difference and its abs (K = Cin*kh*kw, L = N*Ho*Wo).
    """
    n, cout = x.shape[0], weight.shape[0]
    ho, wo = geom.out_size
    x_col = F.unfold(x, weight.shape[2:], dilation=geom.dilation, padding=geom.padding, stride=geom.stride)
    x_col = x_col.permute(1, 2, 0).contiguous().view(x_col.shape[1], -1)  # (K, Ho*Wo*N), as published
    w_col = weight.view(cout, -1)
    out = -(w_col.unsqueeze(2) - x_col.unsqueeze(0)).abs().sum(1)  # (Cout, Ho*Wo*N)
    return out.view(cout, ho, wo, n).permute(3, 0, 1, 2).contiguous()


def cdist_adder(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    """-torch.cdist(p=1) between unfolded input patches and the flattened filters: (N, Cout, Ho, Wo)."""
    n, cout = x.shape[0], weight.shape[0]
    ho, wo = geom.out_size
    x_col = F.unfold(x, weight.shape[2:], dilation=geom.dilation, padding=geom.padding, stride=geom.stride)
    distance = torch.cdist(x_col.transpose(1, 2), weight.reshape(1, cout, -1), p=1)  # (N, L, Cout)
    return -distance.transpose(1, 2).reshape(n, cout, ho, wo)


def unfold_broadcast_bytes(shape: LayerShape, itemsize: int) -> int:
    """Working set of `unfold_broadcast_adder`: unfold + its contiguous copy, difference + abs, sums."""
    k = shape.cin * shape.kh * shape.kw
    cols = shape.batch * shape.geom.out_size[0] * shape.geom.out_size[1]
    return itemsize * (2 * k * cols + 2 * shape.cout * k * cols + 2 * shape.cout * cols)


def cdist_bytes(shape: LayerShape, itemsize: int) -> int:
    """Working set of `cdist_adder`: unfolded input (and a contiguous copy), distances, output."""
    k = shape.cin * shape.kh * shape.kw
    cols = shape.batch * shape.geom.out_size[0] * shape.geom.out_size[1]
    return itemsize * (2 * k * cols + 2 * shape.cout * cols + shape.cout * k)


def _kernel_launchers():
    """(forward module, backward module or None, reason) for the Triton kernels."""
    try:
        from triton_adder.kernels import forward as forward_kernels  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001
        return None, None, f"Triton forward kernel unavailable ({type(error).__name__}: {error})"
    try:
        from triton_adder.kernels import backward as backward_kernels  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001
        return forward_kernels, None, f"Triton backward kernels unavailable ({type(error).__name__}: {error})"
    return forward_kernels, backward_kernels, ""


def tuned_config(op: str, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry):
    """(KernelConfig or None, reason): the tuner's cached config for `op` on this shape, if any."""
    try:
        from triton_adder.autotune import lookup as configs  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001
        return None, f"tuned-config lookup unavailable ({type(error).__name__}: {error})"
    config = configs.lookup(op, x, weight, geom)
    if config is None:
        return None, "no tuned config cached for this shape on this device (run python -m triton_adder.tune)"
    return config, ""


# ---------------------------------------------------------------------------------------------
# Measurements


def _accepts(launcher, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(launcher).parameters
    except (TypeError, ValueError):
        return False


def _accepts_config(launcher) -> bool:
    return _accepts(launcher, "config")


def _default_config_text(family: str, forward_kernels, backward_kernels, x, w, geom) -> str:
    """What the launcher runs when given no config (recorded in the row's `config` column)."""
    try:
        if family == "forward":
            return str(forward_kernels.default_config(x, w, geom).as_dict())
        if family == "grad_weight" and hasattr(backward_kernels, "default_grad_weight_method"):
            method = backward_kernels.default_grad_weight_method(x.device, "paper")
            if method != "triton":
                return f"method={method}"
        default_of = getattr(backward_kernels, f"default_{family}_config")
        return str(default_of(x.shape, w.shape, geom, x.device.type).as_dict())
    except Exception:  # noqa: BLE001  (only a label; the launcher picks its own default anyway)
        return "launcher default"


def _adder_rows(rec: _Recorder, common: dict, backend: str, dtype_name: str, x: torch.Tensor, w: torch.Tensor,
                g: torch.Tensor, geom: Conv2dGeometry) -> None:
    """Adder forward (tuned and default config) and, in float32, input/weight gradients (eq. 6, eq. 5)."""
    families = ("forward", "grad_input", "grad_weight") if dtype_name == "float32" else ("forward",)

    def add(family, variant, fn=None, reason="", config=""):
        row = dict(common, family=family, op=f"adder_{family}", variant=variant, role="adder", baseline_key="",
                   backend=backend, dtype=dtype_name, config=config)
        return rec.time(fn, **row) if fn is not None else rec.skip(reason, **row)

    if backend == "cpu":
        try:
            from triton_adder.backends import cpu as cpu_path  # noqa: PLC0415
        except Exception as error:  # noqa: BLE001
            for family in families:
                add(family, "cpu_path", reason=f"CPU path unavailable ({type(error).__name__}: {error})")
            return
        add("forward", "cpu_path", lambda: cpu_path.forward(x, w, None, geom))
        for family in families[1:]:
            launcher = getattr(cpu_path, family)
            add(family, "cpu_path", lambda launcher=launcher: launcher(g, x, w, geom, "paper"))
        return

    forward_kernels, backward_kernels, why = _kernel_launchers()
    for family in families:
        if family == "forward":
            launcher = getattr(forward_kernels, "forward", None)
            args = (x, w, None, geom)
        else:
            launcher = getattr(backward_kernels, family, None)
            args = (g, x, w, geom, "paper")
        if launcher is None:
            add(family, "default", reason=why or f"no Triton {family} launcher")
            add(family, "tuned", reason=why or f"no Triton {family} launcher")
            continue
        takes_config = family == "forward" or _accepts_config(launcher)
        add(family, "default", lambda launcher=launcher, args=args: launcher(*args),
            config=_default_config_text(family, forward_kernels, backward_kernels, x, w, geom))
        if not takes_config:
            add(family, "tuned", reason=f"the {family} launcher takes no config")
            continue
        # A tuned weight-gradient config applies to the Triton kernel, not the conv-identity method.
        extra = {"method": "triton"} if family == "grad_weight" and _accepts(launcher, "method") else {}
        try:
            tuned, why_not = tuned_config(family, x, w, geom)
        except Exception as error:  # noqa: BLE001
            tuned, why_not = None, f"tuned-config lookup failed: {type(error).__name__}: {error}"
        if tuned is None:
            add(family, "tuned", reason=why_not)
        else:
            add(family, "tuned", lambda launcher=launcher, args=args, tuned=tuned, extra=extra: launcher(
                *args, config=tuned, **extra), config=str(tuned.as_dict()))


def _layer_rows(rec: _Recorder, shape: LayerShape, count: int, model_name: str, backend: str,
                adder_dtypes: Sequence[str], budget: int, baselines: bool) -> None:
    device = rec.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(shape.batch, shape.cin, shape.h, shape.w, generator=generator).to(device)
    w32 = torch.randn(shape.cout, shape.cin // shape.geom.groups, shape.kh, shape.kw, generator=generator).to(device)
    grad32 = torch.randn(shape.batch, shape.cout, *shape.geom.out_size, generator=generator).to(device)
    common = dict(scope="layer", model=model_name, layer_count=count, elements=shape.elements, **shape.columns())
    geom = shape.geom

    for dtype_name in adder_dtypes:
        dtype = getattr(torch, dtype_name)
        _adder_rows(rec, common, backend, dtype_name, x32.to(dtype), w32.to(dtype), grad32.to(dtype), geom)
    if not baselines:
        return

    def baseline(family, op, variant, key, dtype, fn=None, reason="", required=math.nan):
        row = dict(common, family=family, op=op, variant=variant, role="baseline", baseline_key=key,
                   backend="torch", dtype=dtype, config="", required_memory_bytes=required)
        return rec.time(fn, **row) if fn is not None else rec.skip(reason, **row)

    # conv2d in each precision a user would pick.
    padding = _conv_padding(shape)
    conv_args = dict(stride=geom.stride, padding=padding, dilation=geom.dilation, groups=geom.groups)
    for precision in CONV_PRECISIONS:
        key = f"conv2d_{precision}"
        dtype = torch.float32 if precision in ("fp32", "tf32") else getattr(torch, precision)
        dtype_name = str(dtype).removeprefix("torch.")
        if padding is None:
            baseline("forward", "conv2d", precision, key, dtype_name, reason="asymmetric padding: no conv2d twin")
            continue
        if precision == "tf32" and device.type != "cuda":
            baseline("forward", "conv2d", precision, key, dtype_name, reason="TF32 is a CUDA tensor-core mode")
            continue
        x, w = x32.to(dtype), w32.to(dtype)

        def conv(x=x, w=w, tf32=precision == "tf32"):
            with _tf32(tf32):
                return F.conv2d(x, w, None, **conv_args)

        baseline("forward", "conv2d", precision, key, dtype_name, conv)
    if padding is not None:
        def conv_grad_input():
            with _tf32(False):
                return torch.nn.grad.conv2d_input(x32.shape, w32, grad32, **conv_args)

        def conv_grad_weight():
            with _tf32(False):
                return torch.nn.grad.conv2d_weight(x32, w32.shape, grad32, **conv_args)

        baseline("grad_input", "conv2d_grad_input", "fp32", "conv2d_fp32", "float32", conv_grad_input)
        baseline("grad_weight", "conv2d_grad_weight", "fp32", "conv2d_fp32", "float32", conv_grad_weight)

    # The published unfold-and-broadcast adder and cdist(p=1): only where they fit.
    for op, fn, bytes_needed in (("unfold_broadcast", unfold_broadcast_adder, unfold_broadcast_bytes),
                                 ("cdist_l1", cdist_adder, cdist_bytes)):
        required = bytes_needed(shape, 4)
        if geom.groups != 1:
            baseline("forward", op, "fp32", op, "float32", reason="groups > 1: the published approach has none",
                     required=required)
        elif padding is None:
            baseline("forward", op, "fp32", op, "float32", reason="asymmetric padding: unfold pads symmetrically",
                     required=required)
        elif required > budget:
            baseline("forward", op, "fp32", op, "float32", required=required,
                     reason=f"needs {required / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB memory budget")
        else:
            with _tf32(False):
                baseline("forward", op, "fp32", op, "float32", lambda fn=fn: fn(x32, w32, geom), required=required)


def _model_rows(rec: _Recorder, model_name: str, adder_model: nn.Module, cnn_model: nn.Module,
                input_shape: tuple[int, ...], backend: str, train: bool) -> None:
    from triton_adder.ops import use_backend  # noqa: PLC0415

    device = rec.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(*input_shape, generator=generator).to(device)
    num_classes = None
    for variant, model in (("adder", adder_model), ("cnn", cnn_model)):
        calls = census(model, input_shape)
        adder_elements = sum(c.elements for c in calls if c.kind == "adder")
        macs = sum(c.elements for c in calls if c.kind == "multiply")
        common = dict(scope="model", model=model_name, layer="whole model", layer_count=1, batch=input_shape[0],
                      cin=input_shape[1], h=input_shape[2], w=input_shape[3], variant=variant,
                      role="adder" if variant == "adder" else "baseline", baseline_key="" if variant == "adder" else
                      "cnn", backend=backend if variant == "adder" else "torch", dtype="float32", config="",
                      elements=adder_elements + macs, additions=2 * adder_elements + macs, multiplications=macs)
        model = model.to(device)
        with torch.no_grad(), use_backend(backend):
            model.eval()
            num_classes = num_classes or model(images[:1]).shape[1]
        labels = torch.randint(0, num_classes, (input_shape[0],), generator=generator).to(device)

        def forward(model=model):
            with torch.no_grad(), use_backend(backend), _tf32(False):
                return model(images)

        rec.time(forward, family="model_forward", op="model_forward", **common)
        if not train:
            continue
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step(model=model, optimizer=optimizer, labels=labels):
            with use_backend(backend), _tf32(False):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
            return loss

        model.train()
        rec.time(train_step, family="model_train_step", op="model_train_step", **common)
        model.eval()


def measure(
    model: str | tuple[str, nn.Module, nn.Module, Sequence[int]] = "resnet50",
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    quick: bool = False,
    backend: str | None = None,
    adder_dtypes: Sequence[str] = ("float32",),
    layers: bool = True,
    baselines: bool = True,
    whole_model: bool = True,
    train: bool = True,
    max_layers: int | None = None,
    repeats: int | None = None,
    memory_budget_bytes: int | None = None,
    command_line: str | None = None,
) -> pd.DataFrame:
    """Measure adder layers and the whole model against their baselines; one row per measurement.

    model: a name from `triton_adder.models.MODELS` (built as AdderNet and as CNN twin, input
    (batch, C, S, S) with S from MODEL_INPUT_SIZE), or (name, adder_model, cnn_model, input_shape)
    for any pair of models. batch_size: default 32 on a GPU, 2 on the CPU (the input's N).
    device: default "cuda" when available, else "cpu". quick: fewer repeats (smoke runs, tests).
    backend: "triton" (kernels; default on CUDA or with TRITON_INTERPRET=1) or "cpu" (the CPU path).
    adder_dtypes: dtypes of the adder forward ("float32", "float16", "bfloat16"); gradients float32.
    layers / baselines / whole_model / train: which groups of rows to measure.
    max_layers: only the first N unique adder layers. repeats: timed repeats (minimum on CUDA).
    memory_budget_bytes: the most a baseline may need (default: 80% of free GPU memory, 25% of RAM).

    Returns the DataFrame of `derive`, with `frame.attrs["metadata"]` from `machine_metadata`.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from triton_adder.ops import triton_interpreter_enabled  # noqa: PLC0415

    if backend is None:
        backend = "triton" if device.type == "cuda" or triton_interpreter_enabled() else "cpu"
    if backend not in ("triton", "cpu"):
        raise ValueError(f"backend must be 'triton', 'cpu' or None, got {backend!r}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs device='cpu', got device={str(device)!r}")
    for dtype_name in adder_dtypes:
        if dtype_name not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"adder_dtypes entries must be 'float32', 'float16' or 'bfloat16', got {dtype_name!r}")
    if batch_size is None:
        batch_size = 32 if device.type == "cuda" else 2  # 2: training-mode BatchNorm needs > 1 value
    if isinstance(model, str):
        from triton_adder import models  # noqa: PLC0415

        if model not in models.MODELS:
            raise ValueError(f"model must be one of {sorted(models.MODELS)} or a (name, adder, cnn, shape) tuple, "
                             f"got {model!r}")
        size = MODEL_INPUT_SIZE[model]
        model_name, adder_model, cnn_model = model, models.build(model, adder=True), models.build(model, adder=False)
        input_shape = (batch_size, models.MODELS[model][2], size, size)
    else:
        model_name, adder_model, cnn_model, input_shape = model
        input_shape = tuple(input_shape)
    torch.manual_seed(0)
    rec = _Recorder(device, quick, repeats)
    budget = _memory_budget(device, memory_budget_bytes)
    if layers:
        shapes = unique_adder_layers(census(adder_model, input_shape))
        for shape, count in shapes[:max_layers]:
            _layer_rows(rec, shape, count, model_name, backend, adder_dtypes, budget, baselines)
    if whole_model:
        _model_rows(rec, model_name, adder_model, cnn_model, input_shape, backend, train)
    frame = pd.DataFrame(rec.rows)
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan
    frame = frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]
    metadata = machine_metadata(device, command_line)
    ceiling = device_ceiling(device)
    metadata.update({"model": model_name, "input shape": str(tuple(input_shape)), "adder backend": backend,
                     "quick": quick, "memory budget (GiB)": round(budget / 2**30, 2)})
    return derive(frame, metadata, ceiling)


# ---------------------------------------------------------------------------------------------
# Derived columns


def _ceiling_rate(row, ceiling: dict) -> tuple[float, str]:
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
    """
    frame = frame.copy()
    frame.attrs["metadata"] = dict(metadata)
    frame["label"] = frame["op"].astype(str) + " " + frame["variant"].astype(str)
    median_s = pd.to_numeric(frame["median_ms"], errors="coerce") / 1e3
    elements = pd.to_numeric(frame["elements"], errors="coerce")
    frame["element_rate"] = elements / median_s
    is_layer_adder = (frame["scope"] == "layer") & frame["op"].isin(
        ["adder_forward", "adder_grad_input", "adder_grad_weight", "unfold_broadcast", "cdist_l1"])
    is_layer = frame["scope"] == "layer"
    frame.loc[is_layer, "additions"] = np.where(is_layer_adder[is_layer], 2 * elements[is_layer], elements[is_layer])
    frame.loc[is_layer, "multiplications"] = np.where(is_layer_adder[is_layer], 0, elements[is_layer])
    batch = pd.to_numeric(frame["batch"], errors="coerce")
    frame["energy_per_image_uj"] = (pd.to_numeric(frame["additions"], errors="coerce") * ENERGY_PJ_ADD
                                    + pd.to_numeric(frame["multiplications"], errors="coerce") * ENERGY_PJ_MULTIPLY
                                    ) / batch / 1e6
    if ceiling is not None or "ceiling_rate" not in frame.columns:
        # Without a ceiling (re-rendering saved rows elsewhere) keep the one measured with the rows.
        pairs = [_ceiling_rate(row, ceiling or {}) for _, row in frame.iterrows()]
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
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m triton_adder.bench --model resnet50`: measure, then write report.html, results.csv/json."""
    import argparse  # noqa: PLC0415

    from triton_adder import models, report  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m triton_adder.bench", description=main.__doc__)
    parser.add_argument("--model", default="resnet50", choices=sorted(models.MODELS))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU, 2 on the CPU")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--backend", choices=("triton", "cpu"), default=None)
    parser.add_argument("--adder-dtypes", default="float32", help="comma-separated: float32,float16,bfloat16")
    parser.add_argument("--max-layers", type=int, default=None, help="only the first N unique adder layers")
    parser.add_argument("--out", default=None, help="output folder (default: results/reports/<model>-<device>)")
    args = parser.parse_args(argv)
    frame = measure(args.model, args.batch_size, quick=args.quick, backend=args.backend,
                    adder_dtypes=tuple(args.adder_dtypes.split(",")), max_layers=args.max_layers)
    for name, path in report.write_report(frame, out_dir=args.out).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
