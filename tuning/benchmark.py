"""Timing one callable: CUDA events on a GPU, wall clock elsewhere.

A benchmarker has ``measure(fn) -> Measurement`` and a ``functional`` flag. Wall-clock results
(CPU, Triton interpreter) are *functional runs*: they prove the config runs, and rank configs
only for that machine. They are marked ``functional=True`` everywhere they go (search result,
cache entry) and are never used to pick a GPU config.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """time_s: median seconds per call; samples: every timed repeat (seconds); functional: not a GPU timing."""

    time_s: float
    samples: tuple[float, ...]
    functional: bool


class WallClockBenchmarker:
    """perf_counter around each call; for CPU and the Triton interpreter. Every result is functional."""

    functional = True

    def __init__(self, warmup: int = 1, repeats: int = 3):
        if warmup < 0 or repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
        self.warmup = warmup
        self.repeats = repeats

    def measure(self, fn: Callable[[], Any]) -> Measurement:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return Measurement(statistics.median(samples), tuple(samples), functional=True)


def interleaved(
    calls: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, seed: int = 0
) -> dict[str, Measurement]:
    """Wall-clock time of several callables measured side by side: each repetition calls every one once,
    so a load change on a shared machine hits them all alike (two medians taken one after the other can
    differ 2x on a noisy box). The order is shuffled per repetition (from `seed`): a call leaves the caches
    warm for the one after it, and in a fixed or rotated order each callable would always follow the same
    other one, and two identical calls would time differently. warmup untimed rounds first."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            calls[name]()
    order = random.Random(seed)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Measurement(statistics.median(values), tuple(values), functional=True)
            for name, values in samples.items()}


class CudaEventBenchmarker:
    """CUDA-event timing: warm-up, L2 flush before every repeat, median of the repeats.

    The L2 is flushed by zeroing a buffer twice its size outside the timed region, so each repeat
    reads its inputs from HBM, as a layer inside a network does. The number of repeats adapts to
    the kernel's time (`target_s` of timed work, clamped to [min_repeats, max_repeats]), the way
    triton.testing.do_bench does.
    """

    functional = False

    def __init__(
        self,
        device=None,
        warmup: int = 3,
        min_repeats: int = 5,
        max_repeats: int = 100,
        target_s: float = 0.1,
        flush_l2: bool = True,
    ):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CudaEventBenchmarker needs a CUDA device; use WallClockBenchmarker on CPU")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.warmup = warmup
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.target_s = target_s
        self._flush_buffer = None
        if flush_l2:
            props = torch.cuda.get_device_properties(self.device)
            l2_bytes = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
            self._flush_buffer = torch.empty(2 * l2_bytes // 4, dtype=torch.int32, device=self.device)

    def measure(self, fn: Callable[[], Any]) -> Measurement:
        import torch

        with torch.cuda.device(self.device):
            for _ in range(self.warmup):
                fn()
            torch.cuda.synchronize()
            # Estimate one call to size the repeat count.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            estimate_s = max(start.elapsed_time(end) / 1e3, 1e-7)
            repeats = int(min(self.max_repeats, max(self.min_repeats, self.target_s / estimate_s)))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for i in range(repeats):
                if self._flush_buffer is not None:
                    self._flush_buffer.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize()
            samples = tuple(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
        return Measurement(statistics.median(samples), samples, functional=False)


def benchmarker_for(device, quick: bool = False):
    """The right benchmarker for a torch device: CUDA events on "cuda", wall clock otherwise.

    quick: fewer repeats (a smoke run, or the interpreter where one launch takes seconds).
    """
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        if quick:
            return CudaEventBenchmarker(device, warmup=1, min_repeats=3, max_repeats=20, target_s=0.02)
        return CudaEventBenchmarker(device)
    if quick:
        return WallClockBenchmarker(warmup=0, repeats=1)
    return WallClockBenchmarker()
