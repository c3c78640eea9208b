"""Where and how the numbers were taken: device, clocks, versions, git revision, and the device's peak rates."""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from .derived import CPU_NOTE, ENERGY_PJ_ADD, ENERGY_PJ_MULTIPLY

# FP32 lanes per SM by compute capability major.minor (CUDA programming guide, arithmetic
# instruction throughput table): 64 on GV100/GA100, 128 on GA10x, AD10x, GH100.
FP32_LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128}
# Dense tensor-core multiply-accumulates per SM per clock on Hopper (sm_90), from NVIDIA's H100
# whitepaper (989 dense fp16 TFLOPS = 132 SMs x 2048 MAC x 2 x 1.83 GHz); TF32 is half of that.
TENSOR_MACS_PER_SM_CLOCK = {(9, 0): {"tf32": 1024, "float16": 2048, "bfloat16": 2048}}
# Nominal maximum SM clocks (MHz) used only when NVML and nvidia-smi cannot tell (spec sheets).
NOMINAL_MAX_SM_CLOCK_MHZ = {"H200": 1980, "H100 NVL": 1785, "H100 PCIe": 1755, "H100": 1980, "A100": 1410}


def _run_text(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def nvml_clocks(index: int) -> dict:
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
    clocks = nvml_clocks(device.index or 0)
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


def git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    revision = _run_text(["git", "-C", str(root), "rev-parse", "HEAD"])
    if not revision:
        return "unknown (not a git checkout)"
    dirty = _run_text(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return revision + (" (with uncommitted changes)" if dirty else "")


def cpu_name() -> str:
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
        "device": torch.cuda.get_device_name(device) if on_gpu else f"{cpu_name()} ({os.cpu_count()} logical CPUs)",
        "device_kind": "cuda" if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": str(torch.backends.cudnn.version()) if on_gpu else "n/a (CPU)",
        "cuda": torch.version.cuda or "n/a",
        "driver": ceiling.get("driver", "unknown") if on_gpu else "n/a (CPU)",
        "git revision": git_revision(),
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
