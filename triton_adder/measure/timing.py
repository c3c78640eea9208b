"""Timing measurements into rows: the benchmarker per device and the `Recorder` of rows.

`Recorder.time` times one call alone; `Recorder.time_interleaved` times several side by side
(`interleaved`: one call of each per repetition, order shuffled), for rows whose ratios matter: on
a shared machine two medians taken one after the other can be off by 2x, interleaved ones move
together. `interleaved` itself lives in the generic tuner (`tuning.benchmark`, which imports nothing
of triton_adder and times the int8 tuner's confirm step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tuning.benchmark import CudaEventBenchmarker, WallClockBenchmarker, interleaved

__all__ = ["Recorder", "benchmarker", "memory_budget", "synchronize"]


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
        self.interleaved_repeats = repeats or (3 if quick else 7)  # the wall clock's defaults
        self.rows: list[dict] = []

    def time(self, fn: Callable[[], object], **row) -> dict:
        """Time fn (median/p20/p80) and its peak memory; add and return the row (status ok/error)."""
        row = {"status": "ok", "reason": "", **row}
        try:
            row.update(_statistics(self.benchmarker.measure(fn).samples))
            row["peak_memory_bytes"] = self._peak_memory(fn)
        except torch.OutOfMemoryError as error:
            row.update(status="skipped", reason=f"out of memory: {str(error).splitlines()[0][:200]}")
        except Exception as error:  # noqa: BLE001  (a benchmark row records why, the run goes on)
            row.update(status="error", reason=_reason(error))
        finally:
            if self.device.type == "cuda" and row["status"] != "ok":
                torch.cuda.empty_cache()
        self.rows.append(row)
        return row

    def time_interleaved(self, entries: Sequence[tuple[Callable[[], object] | None, dict]]) -> list[dict]:
        """Time the CPU calls of `entries` ((fn, row) each) interleaved; add and return their rows.

        Each fn first runs once untimed (compiles, first touch, scratch buffers); one that fails there
        becomes an error row and the others go on. fn None is a skipped row (the row carries "reason").
        median/p20/p80 come from the same repetitions for every call, so their ratios compare like with
        like. Peak memory is not measured (NaN): a separate call for it would break the interleaving.
        """
        if self.device.type != "cpu":  # perf_counter around an asynchronous launch would time the launch
            raise ValueError(f"time_interleaved times CPU calls, got a recorder on {self.device}")
        rows = [{"status": "ok", "reason": "", **row, **({} if fn else {"status": "skipped"})} for fn, row in entries]
        calls = {}
        for index, ((fn, _), row) in enumerate(zip(entries, rows)):
            if fn is None:
                continue
            try:
                fn()
                calls[index] = fn
            except Exception as error:  # noqa: BLE001  (a benchmark row records why, the run goes on)
                row.update(status="error", reason=_reason(error))
        try:
            times = interleaved(calls, self.interleaved_repeats, warmup=0) if calls else {}
        except Exception as error:  # noqa: BLE001
            times = {}
            for index in calls:
                rows[index].update(status="error", reason=f"in the interleaved timing: {_reason(error)}")
        for index, measurement in times.items():
            rows[index].update(_statistics(measurement.samples), peak_memory_bytes=math.nan)
        self.rows.extend(rows)
        return rows

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


def _reason(error: Exception) -> str:
    """An error row's reason: the exception's type and the first line of its message (300 characters)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__


def _statistics(samples_s) -> dict:
    """A row's timing columns from the samples in seconds: median, p20, p80 (ms) and the repeat count."""
    samples_ms = np.asarray(samples_s, dtype=float) * 1e3
    return dict(median_ms=float(np.median(samples_ms)), p20_ms=float(np.percentile(samples_ms, 20)),
                p80_ms=float(np.percentile(samples_ms, 80)), repeats=len(samples_ms))
