"""`python -m triton_adder.tune --model resnet50`: tune every adder layer of a model, then report.

Collects the model's unique adder-layer problems (a forward on the meta device with hooks on the
`Adder2d` modules: no memory, no compute), tunes the launch config of each op (forward, input
gradient, weight-gradient kernel) that the cache does not hold yet -- so an interrupted run
resumes where it stopped -- stores each winner as soon as it is found, and prints a table
(layer, shape, best config, time, speedup over the launcher's default config).

On a machine without a GPU it runs end to end through the Triton interpreter on the CPU, with a
small batch and a reduced space; its timings are interpreter wall clock, not GPU timings, are
marked functional in the cache, and are never used on a GPU.

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

from triton_adder.tolerance import tolerances
from tuning import (
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

DEFAULT_GPU_BATCH = {"lenet5bn": 256, "resnet20": 128, "resnet32": 128, "resnet18": 64, "resnet50": 64}
INTERPRETER_BATCH = 2  # one interpreter launch of a tiny layer takes ~0.3-2 s
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

FULL_SPACES = {
    # forward: BLOCK_M output positions x BLOCK_N output channels, BLOCK_K input channels per step.
    "forward": {
        "block_m": (32, 64, 128, 256),
        "block_n": (16, 32, 64, 128),
        "block_k": (4, 8, 16, 32),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
    # grad_input: BLOCK_M input positions x BLOCK_N input channels, BLOCK_K output channels per step.
    "grad_input": {
        "block_m": (32, 64, 128, 256),
        "block_n": (16, 32, 64, 128),
        "block_k": (4, 8, 16, 32),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
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

    @property
    def shape_text(self) -> str:
        n, cin, h, w = self.x_shape
        cout, _, kh, kw = self.weight_shape
        (sh, _), (ph, _) = self.geom.stride, self.geom.padding
        text = f"{n}x{cin}x{h}x{w}->{cout} {kh}x{kw} s{sh} p{ph}"
        return text + (f" g{self.geom.groups}" if self.geom.groups != 1 else "")


@dataclass
class Row:
    """One line of the result table."""

    layer: str
    op: str
    shape: str
    status: str  # "tuned", "cached", "failed"
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
    from triton_adder.bench import census

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


def reduced_space(default: dict) -> dict:
    """The quick/interpreter space: the default config plus one other BLOCK_M (1-2 runs per op)."""
    block_m = default["block_m"]
    other = block_m // 2 if block_m >= 32 else block_m * 2
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
    from triton_adder import configs
    from triton_adder.kernels import backward, forward
    from triton_adder.kernels.config import KernelConfig

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
    values = reduced_space(default) if quick else FULL_SPACES[op]
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
        problem=configs.problem_key(problem.x_shape, problem.weight_shape, geom),
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


def print_table(rows: list[Row], functional: bool, out=None) -> None:
    out = sys.stdout if out is None else out
    headers = ["layer", "op", "shape", "best config (MxNxK warps stages)", "time", "default", "speedup", "status"]
    lines = [
        [
            row.layer,
            row.op,
            row.shape,
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
        print("NOTE: times are Triton-interpreter wall clock on the CPU: functional runs, NOT GPU timings.", file=out)


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


def _ensure_interpreter() -> None:
    """Without CUDA the kernels must run under the Triton interpreter, which is read at kernel definition."""
    value = os.environ.get("TRITON_INTERPRET")
    if value not in (None, "", "0"):
        return
    if value == "0":
        raise SystemExit("no CUDA device and TRITON_INTERPRET=0: unset it (or set it to 1) to tune on the CPU")
    if any(name.startswith("triton_adder.kernels.") for name in sys.modules):
        raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 (the kernels were imported before tune set it)")
    os.environ["TRITON_INTERPRET"] = "1"


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
) -> list[Row]:
    """Tune every (unique layer problem, op) of `model_name` not yet in `cache`; return the table rows."""
    from triton_adder import configs, models
    from triton_adder.bench import MODEL_INPUT_SIZE

    size = MODEL_INPUT_SIZE[model_name]
    input_shape = (batch_size, models.MODELS[model_name][2], size, size)
    problems = collect_problems(models.build(model_name, adder=True), input_shape)
    jobs = [(problem, op) for problem in problems for op in ops]
    progress = progress or Progress(len(jobs))
    benchmarker = benchmarker_for(device, quick=quick)
    dtype_name = str(dtype).removeprefix("torch.")
    layout = "channels_last" if channels_last else "contiguous"
    rows = []
    for done, (problem, op) in enumerate(jobs):
        layer = problem.layers[0] + (f" (+{len(problem.layers) - 1})" if len(problem.layers) > 1 else "")
        progress.update(done, f"{layer} {op}")
        key = configs.problem_key(problem.x_shape, problem.weight_shape, problem.geom)
        row = Row(layer, op, problem.shape_text, "tuned")
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
    """Benchmark the model with the tuned configs (`triton_adder.bench.measure`) and write the report.

    target: an .html file, a directory (report.html inside), or None for `report.default_output_dir`.
    The tuning table goes beside it as tuning.csv / tuning.json. Returns the written paths.
    """
    import reports
    from triton_adder import bench, report

    frame = bench.measure(model_name, batch_size, device=device, quick=quick, adder_dtypes=(dtype_name,),
                          command_line=command_line)
    metadata = dict(frame.attrs.get("metadata", {}))
    if target is None:
        out_dir, html_name = report.default_output_dir(metadata), "report.html"
    elif target.suffix.lower() in (".html", ".htm"):
        out_dir, html_name = target.parent, target.name
    else:
        out_dir, html_name = target, "report.html"
    written = report.write_report(frame, metadata, out_dir=out_dir, html_name=html_name)
    csv_path, json_path = reports.write_raw(rows_frame(rows), metadata, out_dir, stem="tuning")
    return {**written, "tuning_csv": csv_path, "tuning_json": json_path}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triton_adder.tune",
        description="Tune the adder kernels' launch configs for every adder layer of a model, then report.",
    )
    parser.add_argument("--model", required=True, choices=sorted(DEFAULT_GPU_BATCH))
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default: per model on a GPU {DEFAULT_GPU_BATCH}, {INTERPRETER_BATCH} without one")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ops", default="fwd,bwd", help="comma list of fwd, bwd, forward, grad_input, grad_weight")
    parser.add_argument("--budget-s", type=float, default=60.0, help="search time per layer problem and op (s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tuning cache directory (default $TRITON_ADDER_CACHE_DIR or ~/.cache/triton-adder)")
    parser.add_argument("--report", nargs="?", const="", default=None, metavar="PATH",
                        help="after tuning, benchmark the model and write the HTML report to PATH (.html file or "
                             "directory; bare --report: reports/<model>-<device>/)")
    parser.add_argument("--quick", action="store_true", help="reduced space (1-2 configs per op), fewer repeats")
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

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        _ensure_interpreter()
        print(
            "No CUDA device: tuning through the Triton interpreter on the CPU with a small batch and a reduced "
            "space. These are functional runs; their timings are NOT GPU timings.",
            file=sys.stderr,
        )
    from triton_adder import configs

    if args.cache_dir is not None:
        # The layer's run-time lookup (and the report's tuned rows) must read the cache tuned here.
        os.environ[configs.CACHE_DIR_ENV] = str(args.cache_dir)
        configs.clear()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    batch = args.batch_size or (DEFAULT_GPU_BATCH[args.model] if on_gpu else INTERPRETER_BATCH)
    quick = args.quick or not on_gpu
    dtype = DTYPES[args.dtype]
    identity = configs.identity(device)
    cache = configs.cache_for(device)
    print(f"model {args.model}, batch {batch}, {args.dtype}, ops {','.join(ops)}, device {identity.name} "
          f"({identity.capability}, Triton {identity.triton_version}), cache {cache.path}", file=sys.stderr)
    rows = tune_model(args.model, batch, dtype, ops, args.budget_s, cache, device, quick,
                      channels_last=args.channels_last, force=args.force, grad_mode=args.grad_mode)
    print_table(rows, functional=not on_gpu)
    if args.report is not None:
        print("benchmarking the model for the report ...", file=sys.stderr)
        command_line = "python -m triton_adder.tune " + " ".join(argv if argv is not None else sys.argv[1:])
        written = write_report(Path(args.report) if args.report else None, rows, args.model, batch, args.dtype,
                               device, quick, command_line)
        print(f"report: {written['html']}", file=sys.stderr)
    return 1 if any(row.status == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
