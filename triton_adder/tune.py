"""`python -m triton_adder.tune --model resnet50`: tune every adder layer of a model, then report.

Collects the model's unique adder-layer problems (a forward on the meta device with hooks on the
`Adder2d` modules: no memory, no compute), tunes the launch config of each op (forward, input
gradient, weight-gradient kernel) that the cache does not hold yet -- so an interrupted run
resumes where it stopped -- stores each winner as soon as it is found, and prints a table
(layer, shape, best config, time, speedup over the launcher's default config).

On a machine without a GPU, kernel tuning needs the Triton interpreter, which only the user turns
on (`TRITON_INTERPRET=1`; it is read when the kernels are defined, and this module never sets it:
on a GPU it would run the kernels on the CPU, so tune refuses it there). Without it, tune skips
kernel tuning and only benchmarks the CPU path for the report. With it, tune runs end to end as a
*functional* run: every layer problem is shrunk (`interpreter_problem`: batch 1, spatial size
capped, channels divided by one power of two for the whole model) but keeps its kernel, stride,
padding, dilation and groups, so every layer type still goes through the real kernels, the search
and the winner-vs-default output check; the space is the reduced one (the default and one other
BLOCK_M). Those timings are interpreter wall clock of the reduced problem, NOT GPU timings: the
cache entries are keyed by the reduced problem plus a "reduced_from" field (so they never match a
real problem), are marked functional, and are never used on a GPU. The report's benchmark then
times the CPU path at the model's real shapes (`write_report`).

Afterwards it benchmarks the model (`triton_adder.bench.measure`) and writes the HTML report
(default results/reports/<model>-<device>/; `--report PATH` elsewhere, `--no-report` skips it).

The search itself is the generic `tuning` package; this module only describes the adder kernels
to it (search spaces, constraints, runners, output check).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from triton_adder.models.census import DEFAULT_GPU_BATCH, MODEL_INPUT_SIZE
from triton_adder.ops import triton_interpreter_enabled
from triton_adder.tolerance import tolerances
from triton_adder.tuning import (
    Constraint,
    SearchSpace,
    Tunable,
    TuningCache,
    TuningResult,
    benchmarker_for,
    estimate_at_most,
    search,
    tile_within,
)

# Without a GPU: the batch of the report's CPU-path benchmark at the real shapes (2: training-mode
# BatchNorm needs more than one value per channel), and of --full-size interpreter tuning.
CPU_BATCH = 2
# The interpreter runs one Triton program after another in Python at ~0.5-2.5 ms per rank-1 tile
# update, so a launch costs about (programs x reduction steps); measured on a 2-core machine at the
# real channel counts and 8x8 inputs, ResNet-50's forward launches alone took 92 s (one each) and a
# 64-channel 3x3 weight gradient at 8x8 took 23 s. Functional runs therefore shrink each problem;
# with these caps ResNet-50's 22 problems x 3 ops tune in about a minute on that machine (and the
# whole command, with the report's CPU benchmark, takes about 3.5 minutes).
INTERPRETER_SPATIAL_CAP = 8  # input height/width at most this (larger only where the kernel needs it)
INTERPRETER_CHANNEL_CAP = 64  # widest per-group channel count after dividing all layers by one power of two
CPU_REPORT_REPEATS = 2  # timed repeats (after one warm-up) of the report's CPU benchmark
OP_GROUPS = {"fwd": ("forward",), "bwd": ("grad_input", "grad_weight")}
ALL_OPS = ("forward", "grad_input", "grad_weight")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Hopper: 227 KiB of shared memory per block, 255 registers per thread (DESIGN.md section 2).
SHARED_MEMORY_BYTES = 227 * 1024
# Per-thread float32 accumulator budget of the rank-1 loops (forward.MAX_ACCUMULATORS_PER_THREAD
# is the forward launcher's own limit; the backward loops hold the same kind of tile).
MAX_ACCUMULATORS_PER_THREAD = 128

# Miscompile check of a winner against the default config's output (not a precision test: two
# Triton configs differ only in summation order, a miscompile is off by O(1)), so the library's
# error table is widened 10x.
MISCOMPILE_TOLERANCE_WIDENING = 10.0

# forward: BLOCK_M output positions x BLOCK_N output channels, BLOCK_K input channels per step;
# grad_input: BLOCK_M input positions x BLOCK_N input channels, BLOCK_K output channels per step.
# Both are the same rank-1 implicit GEMM loop, so they search the same space.
_IMPLICIT_GEMM_SPACE = {
    "block_m": (32, 64, 128, 256),
    "block_n": (16, 32, 64, 128),
    "block_k": (4, 8, 16, 32),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3),
}
FULL_SPACES = {
    "forward": _IMPLICIT_GEMM_SPACE,
    "grad_input": _IMPLICIT_GEMM_SPACE,
    # grad_weight kernel: BLOCK_M output x BLOCK_N input channels, BLOCK_K reduction steps unrolled.
    "grad_weight": {
        "block_m": (16, 32, 64, 128),
        "block_n": (16, 32, 64, 128),
        "block_k": (4, 8, 16, 32),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
}


@dataclass
class LayerProblem:
    """One unique adder-layer call of a model: x (N, Cin, H, W), weight (Cout, Cin/groups, kh, kw).

    Tuned without a bias: the zoo's adder layers have none, and a bias is one epilogue add.
    """

    layers: list[str]
    x_shape: tuple[int, int, int, int]
    weight_shape: tuple[int, int, int, int]
    geom: object  # triton_adder.geometry.Conv2dGeometry
    has_bias: bool = False
    reduced_from: LayerProblem | None = None  # the model's real problem, for a functional (shrunk) run

    @property
    def shape_text(self) -> str:
        n, cin, h, w = self.x_shape
        cout, _, kh, kw = self.weight_shape
        (sh, _), (ph, _) = self.geom.stride, self.geom.padding
        text = f"{n}x{cin}x{h}x{w}->{cout} {kh}x{kw} s{sh} p{ph}"
        if self.geom.dilation != (1, 1):
            text += f" d{self.geom.dilation[0]}"
        return text + (f" g{self.geom.groups}" if self.geom.groups != 1 else "")

    @property
    def model_shape_text(self) -> str:
        """The shape of the model's own layer (differs from shape_text for a reduced problem)."""
        return (self.reduced_from or self).shape_text

    def cache_problem(self) -> dict:
        """The cache's problem key: the problem run, plus "reduced_from" (the real problem) when shrunk."""
        from triton_adder.autotune import lookup as configs

        key = configs.problem_key(self.x_shape, self.weight_shape, self.geom)
        if self.reduced_from is not None:
            real = self.reduced_from
            # Without its batch: the shrunk problem (batch 1) is the same for any model batch size.
            key["reduced_from"] = {k: v for k, v in configs.problem_key(real.x_shape, real.weight_shape,
                                                                          real.geom).items() if k != "batch"}
        return key


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

    @property
    def speedup(self) -> float | None:
        if not self.time_s or self.default_time_s is None:
            return None
        return self.default_time_s / self.time_s


def parse_ops(text: str) -> tuple[str, ...]:
    """ "fwd,bwd" -> ("forward", "grad_input", "grad_weight"); op names are accepted too."""
    ops: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        names = OP_GROUPS.get(part, (part,) if part in ALL_OPS else None)
        if names is None:
            raise ValueError(f"--ops entries must be among {sorted(OP_GROUPS) + list(ALL_OPS)}, got {part!r}")
        ops.extend(n for n in names if n not in ops)
    if not ops:
        raise ValueError("--ops must name at least one op (fwd, bwd, forward, grad_input, grad_weight)")
    return tuple(ops)


def collect_problems(model: torch.nn.Module, input_shape: Sequence[int]) -> list[LayerProblem]:
    """Unique adder-layer problems of `model` for input `input_shape` (N, C, H, W), in first-use order.

    Uses `triton_adder.bench.census` (one forward on the meta device: shapes only, no memory);
    layers with the same input shape, weight shape and geometry share one problem.
    """
    from triton_adder.models.census import census

    found: dict[tuple, LayerProblem] = {}
    for call in census(model, tuple(input_shape)):
        if call.kind != "adder":
            continue
        shape = call.shape
        x_shape = (shape.batch, shape.cin, shape.h, shape.w)
        weight_shape = (shape.cout, shape.cin // shape.geom.groups, shape.kh, shape.kw)
        key = (x_shape, weight_shape, shape.geom)
        if key not in found:
            found[key] = LayerProblem([], x_shape, weight_shape, shape.geom)
        found[key].layers.append(call.module)
    return list(found.values())


def channel_divisor(problems: Sequence[LayerProblem], channel_cap: int | None = None) -> int:
    """The smallest power of two that brings every per-group channel count of `problems` to <= channel_cap.

    One divisor for the whole model keeps the layers' relative widths (and so their distinct
    problems) after shrinking.
    """
    channel_cap = INTERPRETER_CHANNEL_CAP if channel_cap is None else channel_cap
    if channel_cap < 1:
        raise ValueError(f"channel_cap must be >= 1, got {channel_cap}")
    widest = max((max(p.x_shape[1], p.weight_shape[0]) // p.geom.groups for p in problems), default=1)
    divisor = 1
    while math.ceil(widest / divisor) > channel_cap:
        divisor *= 2
    return divisor


def _reduced_axis(size: int, kernel: int, stride: int, before: int, dilation: int, out: int,
                  cap: int) -> tuple[int, int]:
    """(input size, output size) of one axis shrunk to about `cap`, with the same padding rule.

    The bottom/right padding is implied by `out` (Conv2dGeometry): keep it when it is the
    symmetric padding conv2d would use, else keep the implied amount (e.g. padding="same").
    """
    span = dilation * (kernel - 1) + 1
    if (size + 2 * before - span) // stride + 1 == out:
        after = before
    else:
        after = max(0, (out - 1) * stride + span - size - before)
    reduced = min(size, max(cap, span - before - after))  # at least one output position
    return reduced, (reduced + before + after - span) // stride + 1


def interpreter_problem(problem: LayerProblem, divisor: int, spatial_cap: int | None = None) -> LayerProblem:
    """The functional-run version of `problem`: batch 1, H and W capped, channels per group / divisor (ceil).

    Kernel size, stride, padding, dilation and groups are kept, so the same kernel code paths
    (taps, stride phases, padding masks, channel tails) run; `reduced_from` records the real problem.
    """
    from triton_adder.geometry import Conv2dGeometry

    spatial_cap = INTERPRETER_SPATIAL_CAP if spatial_cap is None else spatial_cap
    _, cin, h, w = problem.x_shape
    cout, _, kh, kw = problem.weight_shape
    geom = problem.geom
    groups = geom.groups
    axes = [
        _reduced_axis(size, k, s, p, d, o, spatial_cap)
        for size, k, s, p, d, o in zip((h, w), (kh, kw), geom.stride, geom.padding, geom.dilation, geom.out_size)
    ]
    cg = math.ceil(cin // groups / divisor)
    tg = math.ceil(cout // groups / divisor)
    reduced_geom = Conv2dGeometry(geom.stride, geom.padding, geom.dilation, groups, (axes[0][1], axes[1][1]))
    return LayerProblem(list(problem.layers), (1, groups * cg, axes[0][0], axes[1][0]), (groups * tg, cg, kh, kw),
                        reduced_geom, problem.has_bias, reduced_from=problem)


def reduced_space(default: dict, halve_from: int = 32) -> dict:
    """The quick/interpreter space: the default config plus one other BLOCK_M (1-2 runs per op).

    The other BLOCK_M is half the default's when the default is >= halve_from, else twice it.
    Functional runs pass 16: their shrunk problems are often a single 16-row tile, where twice
    the tile would be pruned (larger than the problem) and the winner-vs-default check not run.
    """
    block_m = default["block_m"]
    other = block_m // 2 if block_m >= halve_from else block_m * 2
    return {**{k: (v,) for k, v in default.items()}, "block_m": (block_m, other)}


def _accumulators_fit(config: dict) -> bool:
    return config["block_m"] * config["block_n"] / (32 * config["num_warps"]) <= MAX_ACCUMULATORS_PER_THREAD


def _tile(knob: str, extent: int, values: Sequence[int]) -> Constraint:
    # Never prune below the smallest candidate: a 2-row problem still needs some tile.
    return tile_within(knob, max(int(extent), min(values)))


def outputs_match(dtype: torch.dtype, reduction_length: int) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """The winner-vs-default output check for one op (see MISCOMPILE_TOLERANCE_WIDENING)."""
    tol = tolerances(dtype, reduction_length, widen=MISCOMPILE_TOLERANCE_WIDENING)

    def match(candidate: torch.Tensor, reference: torch.Tensor) -> bool:
        if candidate.shape != reference.shape:
            return False
        return bool(torch.allclose(candidate.double(), reference.double(), **tol))

    return match


def make_tunable(
    op: str,
    problem: LayerProblem,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool,
    quick: bool,
    grad_mode: str = "paper",
) -> Tunable:
    """Describe one (op, layer problem) to the tuner: operands, runner, default, space, constraints."""
    from triton_adder.kernels import backward, forward
    from triton_adder.kernels.launch_config import KernelConfig

    geom = problem.geom
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    x = randn(problem.x_shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = randn(problem.weight_shape)
    bias = randn(problem.weight_shape[:1]) if problem.has_bias else None
    n, cin, h, w = problem.x_shape
    cout, cg, kh, kw = problem.weight_shape
    tg = cout // geom.groups
    ho, wo = geom.out_size
    grad_out = randn((n, cout, ho, wo))
    element_bytes = torch.empty((), dtype=dtype).element_size()

    if op == "forward":
        default = forward.default_config(x, weight, geom)
        extents = {"block_m": n * ho * wo, "block_n": tg, "block_k": cg}
        reduction = cg * kh * kw

        def run(config):
            return forward.forward(x, weight, bias, geom, KernelConfig(**config))

        def launcher_accepts(config):
            try:
                forward.validate_config(KernelConfig(**config))
                return True
            except ValueError:
                return False

        extra = [Constraint("forward.validate_config", launcher_accepts)]
    elif op == "grad_input":
        default = backward.default_grad_input_config(x.shape, weight.shape, geom, device.type)
        positions = n * math.ceil(h / geom.stride[0]) * math.ceil(w / geom.stride[1])
        extents = {"block_m": positions, "block_n": cg, "block_k": tg}
        reduction = tg * kh * kw

        def run(config):
            return backward.grad_input(grad_out, x, weight, geom, grad_mode, KernelConfig(**config))

        extra = [Constraint(f"block_m*block_n/(32*num_warps) <= {MAX_ACCUMULATORS_PER_THREAD}", _accumulators_fit)]
    elif op == "grad_weight":
        default = backward.default_grad_weight_config(x.shape, weight.shape, geom, device.type)
        extents = {"block_m": tg, "block_n": cg, "block_k": n * ho * wo}
        reduction = n * ho * wo

        def run(config):
            return backward.grad_weight(grad_out, x, weight, geom, grad_mode, KernelConfig(**config), method="triton")

        extra = [Constraint(f"block_m*block_n/(32*num_warps) <= {MAX_ACCUMULATORS_PER_THREAD}", _accumulators_fit)]
    else:
        raise ValueError(f"op must be one of {ALL_OPS}, got {op!r}")

    default = default.as_dict()
    values = reduced_space(default, 16 if problem.reduced_from is not None else 32) if quick else FULL_SPACES[op]
    constraints = [_tile(knob, extents[knob], values[knob]) for knob in ("block_m", "block_n", "block_k")]
    # Upper bound of what software pipelining may stage in shared memory: num_stages copies of the
    # BLOCK_K slices of both operands.
    constraints.append(
        estimate_at_most(
            "shared memory bytes",
            lambda c: c["num_stages"] * (c["block_m"] + c["block_n"]) * c["block_k"] * max(4, element_bytes),
            SHARED_MEMORY_BYTES,
        )
    )
    constraints.extend(extra)
    constraints.append(Constraint("KernelConfig.validate", lambda c: _valid_kernel_config(KernelConfig, c)))
    return Tunable(
        name=op,
        space=SearchSpace.from_dict(values),
        problem=problem.cache_problem(),
        run=run,
        default=default,
        constraints=constraints,
        outputs_match=outputs_match(dtype, reduction),
    )


def _valid_kernel_config(kernel_config_class, config: dict) -> bool:
    try:
        kernel_config_class(**config).validate()
        return True
    except ValueError:
        return False


def format_config(config: dict | None) -> str:
    if not config:
        return "-"
    return f"{config['block_m']}x{config['block_n']}x{config['block_k']} w{config['num_warps']} s{config['num_stages']}"


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def functional_note(rows: Sequence[Row]) -> str:
    """What the times of a no-GPU run are (printed under the table and shown in the report)."""
    note = "times are Triton-interpreter wall clock on the CPU: functional runs, NOT GPU timings"
    if any(row.model_shape for row in rows):
        note += (f"; each problem ran shrunk (batch 1, height/width capped at about {INTERPRETER_SPATIAL_CAP}, "
                 "channels divided by one power of two for the whole model, same kernel/stride/padding/dilation/"
                 "groups), so they rank configs of the reduced problem only and are never used on a GPU")
    return note


def print_table(rows: list[Row], functional: bool, out=None) -> None:
    out = sys.stdout if out is None else out
    reduced = any(row.model_shape for row in rows)
    headers = ["layer", "op", "shape run" if reduced else "shape"] + (["model shape"] if reduced else []) + [
        "best config (MxNxK warps stages)", "time", "default", "speedup", "status"]
    lines = [
        [
            row.layer,
            row.op,
            row.shape,
            *([row.model_shape] if reduced else []),
            format_config(row.config),
            format_time(row.time_s),
            format_time(row.default_time_s),
            "-" if row.speedup is None else f"{row.speedup:.2f}x",
            row.status + (f" ({'; '.join(row.notes)})" if row.notes else ""),
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)), file=out)
    if functional:
        print(f"NOTE: {functional_note(rows)}.", file=out)


class Progress:
    """A one-line progress bar on stderr (no dependency): [####....] 3/12 conv2 forward."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.stream, self.width = max(1, total), sys.stderr if stream is None else stream, width
        self.started = time.perf_counter()

    def update(self, done: int, label: str) -> None:
        filled = self.width * done // self.total
        elapsed = time.perf_counter() - self.started
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {done}/{self.total} {elapsed:6.1f}s {label[:60]}"
        # Redraw in place on a terminal; one line per step in a log file.
        self.stream.write(f"\r{line:<100}" if self.interactive else line + "\n")
        self.stream.flush()

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


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
) -> list[Row]:
    """Tune every (unique layer problem, op) of `model_name` not yet in `cache`; return the table rows.

    shrink: tune `interpreter_problem`s (batch 1, small spatial size, fewer channels) instead of
    the real problems at `batch_size`: the functional run of a machine without a GPU.
    """
    from triton_adder import models
    from triton_adder.autotune import lookup as configs

    size = MODEL_INPUT_SIZE[model_name]
    input_shape = (batch_size, models.MODELS[model_name][2], size, size)
    problems = collect_problems(models.build(model_name, adder=True), input_shape)
    if shrink:
        divisor = channel_divisor(problems)
        problems = [interpreter_problem(problem, divisor) for problem in problems]
    jobs = [(problem, op) for problem in problems for op in ops]
    progress = progress or Progress(len(jobs))
    benchmarker = benchmarker_for(device, quick=quick)
    dtype_name = str(dtype).removeprefix("torch.")
    layout = "channels_last" if channels_last else "contiguous"
    rows = []
    for done, (problem, op) in enumerate(jobs):
        layer = problem.layers[0] + (f" (+{len(problem.layers) - 1})" if len(problem.layers) > 1 else "")
        progress.update(done, f"{layer} {op}")
        key = problem.cache_problem()
        row = Row(layer, op, problem.shape_text, "tuned",
                  model_shape=problem.model_shape_text if problem.reduced_from is not None else "")
        hit = cache.lookup(
            op, configs.kernel_hash(op), dtype_name, layout, key,
            allow_functional=device.type != "cuda", allow_nearest=False,
        )  # fmt: skip
        if hit is not None and not force:
            row.status = "cached" + (" (shipped)" if hit.source == "shipped" else "")
            row.config, row.time_s, row.default_time_s = hit.config, hit.entry["time_s"], hit.entry["default_time_s"]
            rows.append(row)
            continue
        tunable = make_tunable(op, problem, dtype, device, channels_last, quick, grad_mode)
        result: TuningResult = search(tunable, benchmarker, budget_s=budget_s)
        row.runs, row.failures = result.runs, len(result.failures)
        if result.best is None:
            row.status = "failed"
            row.notes.append(result.evaluations[0].error or "default config failed")
        else:
            row.config, row.time_s, row.default_time_s = result.best, result.best_time_s, result.default_time_s
            cache.store([
                cache.make_entry(
                    op, configs.kernel_hash(op), dtype_name, layout, key, result.best,
                    result.best_time_s, result.default_time_s, result.functional,
                )
            ])  # fmt: skip
            if result.budget_exhausted:
                row.notes.append("budget reached")
            if any(e.status == "mismatch" for e in result.evaluations):
                row.notes.append("a faster config was rejected: output differs from the default's")
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.update(len(jobs), "done")
    progress.close()
    configs.clear()
    return rows


def rows_frame(rows: list[Row]):
    """The table as a pandas DataFrame (one row per layer problem and op)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "layer": r.layer,
                "op": r.op,
                "shape": r.shape,
                "model_shape": r.model_shape or r.shape,
                "config": format_config(r.config),
                "time_ms": None if r.time_s is None else r.time_s * 1e3,
                "default_ms": None if r.default_time_s is None else r.default_time_s * 1e3,
                "speedup": r.speedup,
                "status": r.status,
                "runs": r.runs,
                "failed_configs": r.failures,
            }
            for r in rows
        ]
    )


def write_report(target: Path | None, rows: list[Row], model_name: str, batch_size: int, dtype_name: str,
                 device: torch.device, quick: bool, command_line: str) -> dict[str, Path]:
    """Benchmark the model (`triton_adder.bench.measure`) and write the report with the tuning table.

    On a GPU: the Triton kernels (tuned and default configs) and every baseline at `batch_size`.
    Without one: the CPU path (what a CPU user runs; the interpreter would take hours at these
    shapes) at the model's real shapes and `batch_size`, few repeats (`CPU_REPORT_REPEATS`).
    target: an .html file, a directory (report.html inside), or None for `report.default_output_dir`.
    The tuning table goes into the page and beside it as tuning.csv / tuning.json. Returns the written paths.
    """
    from triton_adder import reports
    from triton_adder import bench, report

    if device.type == "cuda":
        frame = bench.measure(model_name, batch_size, device=device, quick=quick, adder_dtypes=(dtype_name,),
                              command_line=command_line)
    else:
        frame = bench.measure(model_name, batch_size, device=device, backend="cpu", quick=True,
                              repeats=CPU_REPORT_REPEATS, adder_dtypes=(dtype_name,), command_line=command_line)
    metadata = dict(frame.attrs.get("metadata", {}))
    tuning = rows_frame(rows) if rows else None  # no rows: no kernel tuning ran (CPU, no interpreter)
    if device.type != "cuda" and rows:
        metadata["tuning note"] = functional_note(rows)
    if target is None:
        out_dir, html_name = report.default_output_dir(metadata), "report.html"
    elif target.suffix.lower() in (".html", ".htm"):
        out_dir, html_name = target.parent, target.name
    else:
        out_dir, html_name = target, "report.html"
    written = report.write_report(frame, metadata, out_dir=out_dir, html_name=html_name, tuning=tuning)
    if tuning is None:
        return written
    csv_path, json_path = reports.write_raw(tuning, metadata, out_dir, stem="tuning")
    return {**written, "tuning_csv": csv_path, "tuning_json": json_path}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triton_adder.tune",
        description="Tune the adder kernels' launch configs for every adder layer of a model, then benchmark the "
                    "model and write the HTML report. Without a GPU: a CPU-path benchmark only, plus (with "
                    "TRITON_INTERPRET=1) a functional tuning run through the Triton interpreter on shrunk "
                    "problems (not GPU timings).",
    )
    parser.add_argument("--model", required=True, choices=sorted(DEFAULT_GPU_BATCH))
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"GPU: tuning and benchmark batch (default per model {DEFAULT_GPU_BATCH}). Without a "
                             f"GPU: the report's CPU benchmark batch and the --full-size tuning batch (default "
                             f"{CPU_BATCH}); the functional tuning run always uses batch 1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ops", default="fwd,bwd", help="comma list of fwd, bwd, forward, grad_input, grad_weight")
    parser.add_argument("--budget-s", type=float, default=60.0, help="search time per layer problem and op (s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tuning cache directory (default $TRITON_ADDER_CACHE_DIR or ~/.cache/triton-adder)")
    parser.add_argument("--report", type=Path, nargs="?", const=None, default=None, metavar="PATH",
                        help="where to write the HTML report: an .html file or a directory (default: "
                             "results/reports/<model>-<GPU name or cpu>/ under the current directory)")
    parser.add_argument("--no-report", action="store_true", help="tune only: no benchmark, no report")
    parser.add_argument("--quick", action="store_true", help="reduced space (1-2 configs per op), fewer repeats")
    parser.add_argument("--full-size", action="store_true",
                        help="without a GPU, tune the model's real problems at --batch-size through the interpreter "
                             "instead of shrunk ones (hours for resnet50)")
    parser.add_argument("--channels-last", action="store_true", help="tune for channels_last activations")
    parser.add_argument("--grad-mode", choices=("paper", "exact"), default="paper")
    parser.add_argument("--force", action="store_true", help="re-tune problems that are already cached")
    args = parser.parse_args(argv)
    try:
        ops = parse_ops(args.ops)
    except ValueError as error:
        parser.error(str(error))
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.no_report and args.report is not None:
        parser.error("--report PATH and --no-report exclude each other")

    on_gpu = torch.cuda.is_available()
    # The interpreter is the user's (or the tests') choice, never set here: it is read when the
    # kernels are defined, and on a GPU machine it would silently run them on the CPU.
    interpreter = triton_interpreter_enabled()
    if on_gpu and interpreter:
        parser.error("TRITON_INTERPRET is set on a machine with a GPU: unset it (the interpreter would run "
                     "the kernels on the CPU)")
    tune_kernels = on_gpu or interpreter
    shrink = not on_gpu and not args.full_size
    if not tune_kernels:
        print("No CUDA device and TRITON_INTERPRET unset: no kernel tuning (the Triton kernels need a GPU; "
              "TRITON_INTERPRET=1 gives a functional tuning run through the interpreter). The report benchmarks "
              "the CPU path.", file=sys.stderr)
    elif not on_gpu:
        print(
            "No CUDA device: functional tuning run through the Triton interpreter on the CPU ("
            + ("each layer problem shrunk to batch 1, a small spatial size and fewer channels" if shrink
               else "real problems") + ", reduced space). Its timings are NOT GPU timings.",
            file=sys.stderr,
        )
    from triton_adder.autotune import lookup as configs

    if args.cache_dir is not None:
        # The layer's run-time lookup (and the report's tuned rows) must read the cache tuned here.
        os.environ[configs.CACHE_DIR_ENV] = str(args.cache_dir)
        configs.clear()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    batch = args.batch_size or (DEFAULT_GPU_BATCH[args.model] if on_gpu else CPU_BATCH)
    quick = args.quick or not on_gpu
    dtype = DTYPES[args.dtype]
    rows = []
    if tune_kernels:
        identity = configs.identity(device)
        cache = configs.cache_for(device)
        print(f"model {args.model}, {'batch 1 (shrunk problems)' if shrink else f'batch {batch}'}, {args.dtype}, "
              f"ops {','.join(ops)}, device {identity.name} ({identity.capability}, Triton {identity.triton_version}), "
              f"cache {cache.path}", file=sys.stderr)
        started = time.perf_counter()
        rows = tune_model(args.model, batch, dtype, ops, args.budget_s, cache, device, quick,
                          channels_last=args.channels_last, force=args.force, grad_mode=args.grad_mode,
                          shrink=shrink)
        print_table(rows, functional=not on_gpu)
        print(f"tuning took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not args.no_report:
        print(f"benchmarking the model for the report ({'GPU' if on_gpu else 'CPU path, real shapes'}, "
              f"batch {batch}) ...", file=sys.stderr)
        started = time.perf_counter()
        command_line = "python -m triton_adder.tune " + " ".join(argv if argv is not None else sys.argv[1:])
        written = write_report(args.report, rows, args.model, batch, args.dtype, device, quick, command_line)
        print(f"benchmark and report took {time.perf_counter() - started:.0f} s", file=sys.stderr)
        print(f"report: {written['html']}", file=sys.stderr)
    return 1 if any(row.status == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
