"""Timing one measurement per row: the benchmarker per device and the `Recorder` of rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from triton_adder.tuning.benchmark import CudaEventBenchmarker, WallClockBenchmarker


def benchmarker(device: torch.device, quick: bool, repeats: int | None):
    """CUDA events on a GPU (warm-up, L2 flushed before each repeat), else the wall clock.

    quick: few repeats (smoke runs, tests). repeats: timed repeats (the minimum on CUDA).
    """
    if device.type == "cuda":
        if quick:
            return CudaEventBenchmarker(device, warmup=1, min_repeats=3, max_repeats=20, target_s=0.02)
        return CudaEventBenchmarker(device, warmup=3, min_repeats=repeats or 10, max_repeats=100, target_s=0.1)
    return WallClockBenchmarker(warmup=1, repeats=repeats or (3 if quick else 7))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_budget(device: torch.device, budget: int | None) -> int:
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


class Recorder:
    """Runs measurements and accumulates rows; failures become rows, never exceptions."""

    def __init__(self, device: torch.device, quick: bool, repeats: int | None):
        self.device = device
        self.benchmarker = benchmarker(device, quick, repeats)
        self.rows: list[dict] = []

    def time(self, fn: Callable[[], object], **row) -> dict:
        """Time fn (median/p20/p80) and its peak memory; add and return the row (status ok/error)."""
        row = {"status": "ok", "reason": "", **row}
        try:
            measurement = self.benchmarker.measure(fn)
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
        """Add and return a row that did not run (status skipped) with the reason."""
        row = {"status": "skipped", "reason": reason, **row}
        self.rows.append(row)
        return row

    def _peak_memory(self, fn) -> float:
        """Allocator high-water mark above the live memory before one call (CUDA only; NaN on CPU)."""
        if self.device.type != "cuda":
            return math.nan
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device) - before)
