"""Tune every (unique layer problem, op) of a model that the cache does not hold yet.

Problems go in order of their share of the model's work (`problems.by_work`: reduced elements of one
call x the layers that share it, largest first; ties in first-use order), each problem's ops together,
and each winner is stored as soon as it is found, so an interrupted run (a GPU lease cut short)
has tuned what matters most and resumes where it stopped.
A problem whose compile-time screen raises for every config it screens (`tuning.ScreenFailed`) is a
failed row with the first error, printed to stderr as it happens; the other problems still run.
Several processes (torchrun ranks) can share the work: `shard=(rank, world_size)` takes every
world_size-th job, and the cache's file lock merges what each stores (`tuning.cache.TuningCache.store`).
The search itself is the generic `tuning`; `tunables.make_tunable` describes each
problem to it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from triton_adder import models
from triton_adder.autotune import lookup
from triton_adder.autotune.problems import by_work, channel_divisor, collect_problems, interpreter_problem
from triton_adder.autotune.tunables import SCREEN_TOP_N, make_tunable
from triton_adder.models.census import MODEL_INPUT_SIZE
from tuning import ScreenFailed, TuningCache, TuningResult, benchmarker_for, search

SCREEN_FAILED_NOTE = "screen failed: "
"""How a row's note starts when the problem's screen raised for every config (`tuning.ScreenFailed`)."""

Progress = Callable[[int, int, str], None]
"""A progress callback: (steps done, total steps, label of the step starting now)."""


@dataclass
class Row:
    """One line of the result table."""

    layer: str
    op: str
    shape: str  # the problem that ran (N x Cin x H x W -> Cout kernel stride padding)
    status: str  # "tuned", "cached", "failed"
    model_shape: str = ""  # the model's own layer, where the run was shrunk (functional run)
    config: dict | None = None
    time_s: float | None = None
    default_time_s: float | None = None
    runs: int = 0
    failures: int = 0
    notes: list[str] = field(default_factory=list)
    rank: int = 0  # the process that tuned (or looked up) this row, under torchrun

    @property
    def speedup(self) -> float | None:
        if not self.time_s or self.default_time_s is None:
            return None
        return self.default_time_s / self.time_s


def tune_model(
    model_name: str,
    batch_size: int,
    dtype: torch.dtype,
    ops: Sequence[str],
    budget_s: float,
    cache: TuningCache,
    device: torch.device,
    quick: bool,
    channels_last: bool = False,
    force: bool = False,
    grad_mode: str = "paper",
    progress: Progress | None = None,
    shrink: bool = False,
    shard: tuple[int, int] = (0, 1),
    screen_arch: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Tune every (unique layer problem, op) of `model_name` not yet in `cache`; return the table rows.

    shrink: tune `interpreter_problem`s (batch 1, small spatial size, fewer channels) instead of
    the real problems at `batch_size`: the functional run of a machine without a GPU.
    shard: (rank, world_size); this process takes jobs rank, rank + world_size, ... of the model's
    job list (the same list in every process: problems by work, largest first, `problems.by_work`)
    and returns only their rows (`merge_shards` rejoins them).
    screen_arch: the compile-time screen's target off a GPU (`tunables.screen_arch_for`).
    log: where an error line goes as it happens (default: stderr; the CLI passes one that keeps its
    progress bar intact).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    size = MODEL_INPUT_SIZE[model_name]
    input_shape = (batch_size, models.MODELS[model_name][2], size, size)
    problems = by_work(collect_problems(models.build(model_name, adder=True), input_shape))
    if shrink:
        divisor = channel_divisor(problems)
        problems = [interpreter_problem(problem, divisor) for problem in problems]
    jobs = [(problem, op) for problem in problems for op in ops][rank::world_size]
    benchmarker = benchmarker_for(device, quick=quick)
    dtype_name = str(dtype).removeprefix("torch.")
    layout = "channels_last" if channels_last else "contiguous"  # contract.layout_name of the tunable's x
    rows = []
    for done, (problem, op) in enumerate(jobs):
        layer = problem.layers[0] + (f" (+{len(problem.layers) - 1})" if len(problem.layers) > 1 else "")
        if progress is not None:
            progress(done, len(jobs), f"{layer} {op}")
        key = lookup.op_problem(op, problem.cache_problem(), grad_mode)
        row = Row(layer, op, problem.shape_text, "tuned",
                  model_shape=problem.model_shape_text if problem.reduced_from is not None else "", rank=rank)
        hit = cache.lookup(
            op, lookup.kernel_hash(op), dtype_name, layout, key,
            allow_functional=device.type != "cuda", allow_nearest=False,
        )  # fmt: skip
        if hit is not None and not force:
            row.status = "cached" + (" (shipped)" if hit.source == "shipped" else "")
            row.config, row.time_s = hit.config, hit.entry.get("time_s")  # optional fields of an entry
            row.default_time_s = hit.entry.get("default_time_s")
            rows.append(row)
            continue
        tunable = make_tunable(op, problem, dtype, device, channels_last, quick, grad_mode, screen_arch)
        try:
            result: TuningResult = search(tunable, benchmarker, budget_s=budget_s, screen_top_n=SCREEN_TOP_N)
        except ScreenFailed as error:  # a broken screen, not a verdict: say so now, loudly, and go on
            result = error.result
            row.status = "failed"
            row.notes.append(SCREEN_FAILED_NOTE + error.first_error)
            log(f"ERROR: tuning {op} of {layer} ({problem.shape_text}): {error}")
        row.runs, row.failures = result.runs, len(result.failures)
        if row.status == "failed":
            pass
        elif result.best is None:
            row.status = "failed"
            row.notes.append(result.evaluations[0].error or "default config failed")
        else:
            row.config, row.time_s, row.default_time_s = result.best, result.best_time_s, result.default_time_s
            cache.store([
                cache.make_entry(
                    op, lookup.kernel_hash(op), dtype_name, layout, key, result.best,
                    result.best_time_s, result.default_time_s, result.functional,
                )
            ])  # fmt: skip
            # A line per stored winner as it happens: a run killed before its table (a GPU lease's cap)
            # still shows what it tuned and how it compares with the default.
            speedup = result.default_time_s / result.best_time_s if result.best_time_s else float("nan")
            log(f"stored {op} of {layer} ({problem.shape_text}): {result.best_time_s * 1e3:.4g} ms, default "
                f"{result.default_time_s * 1e3:.4g} ms, {speedup:.2f}x, {result.runs} runs, "
                f"{result.screened} screened, {result.shipped_verdicts} shipped verdicts")  # fmt: skip
            if result.screen_dropped:
                row.notes.append(f"screen dropped {len(result.screen_dropped)} of {result.screened}")
            if result.shipped_verdicts:
                row.notes.append(f"{result.shipped_verdicts} shipped screen verdicts")
            if result.budget_exhausted:
                row.notes.append("budget reached")
            if any(e.status == "mismatch" for e in result.evaluations):
                row.notes.append("a faster config was rejected: output differs from the default's")
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    lookup.clear()
    return rows


def merge_shards(shards: Sequence[Sequence[Row]]) -> list[Row]:
    """The rows of every rank (`shards[rank]`, from `tune_model(..., shard=(rank, len(shards)))`) in job order."""
    merged = []
    for index in range(sum(len(rows) for rows in shards)):
        merged.append(shards[index % len(shards)][index // len(shards)])
    return merged
