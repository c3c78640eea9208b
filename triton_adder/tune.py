"""`python -m triton_adder.tune --model resnet50`: tune every adder layer of a model, then report.

Collects the model's unique adder-layer problems (`autotune.problems`: a forward on the meta
device, no memory, no compute), tunes the launch config of each op (forward, input gradient,
weight-gradient kernel) that the cache does not hold yet (`autotune.tuner`: an interrupted run
resumes where it stopped), and prints a table (layer, shape, best config, time, speedup over the
launcher's default config). Problems are tuned in order of their share of the model's work
(`problems.by_work`: N*Cout*Ho*Wo*Cin/groups*kh*kw x the layers that share the problem, largest
first, ties in the model's order), so a run cut short (a GPU lease running out) has tuned what costs
the most. Search spaces and constraints: `autotune.spaces`; what each op runs, the compile-time
screen and the winner-vs-default output check: `autotune.tunables`. The budget per problem is wall
clock and includes the screen's compiles; screening verdicts shipped for the Triton version, GPU
target and kernel source (`tuning/screens/`) cost none of it. A screen that raises for every
config of a problem (a broken screen, not a verdict) fails that problem loudly: an ERROR line
when it happens, another after the table, and exit status 1.

On a machine without a GPU, kernel tuning needs the Triton interpreter, which only the user turns
on (`TRITON_INTERPRET=1`; it is read when the kernels are defined, and this module never sets it:
on a GPU it would run the kernels on the CPU, so tune refuses it there). Without it, tune skips
kernel tuning and only benchmarks the CPU path for the report. With it, tune runs end to end as a
*functional* run: every layer problem is shrunk (`autotune.problems.interpreter_problem`: batch 1,
spatial size capped, channels divided by one power of two for the whole model) but keeps its
kernel, stride, padding, dilation and groups, so every layer type still goes through the real
kernels, the search and the winner-vs-default output check; the space is the reduced one (the
default and one other BLOCK_M). Those timings are interpreter wall clock of the reduced problem,
NOT GPU timings: the cache entries are keyed by the reduced problem plus a "reduced_from" field
(so they never match a real problem), are marked functional, and are never used on a GPU. The
report's benchmark then times the CPU path at the model's real shapes (`write_report`).

Under torchrun (`python -m torch.distributed.run --nproc-per-node N -m triton_adder.tune ...`) each
process tunes every N-th layer problem on its own device (GPU LOCAL_RANK; on the CPU, gloo) into the
one shared cache, whose file lock merges what they store; rank 0 prints the joined table (with the
rank that tuned each row) and alone benchmarks and writes the report.

Without a GPU it also tunes what runs fast on the CPU itself: the int8 SAD kernel's blocking
(`--ops int8`, the default there; `autotune.int8`): every unique layer call of the model at the real
shapes and --batch-size, timed for real by the wall clock (the layer's whole int8 forward), each
winner kept only if it beats the default interleaved, and cached per CPU model and kernel variant;
`triton_adder.quantize`d models then run the tuned blocking. It runs on rank 0 only under torchrun
(processes timing the same CPU at once would disturb each other).

Afterwards it benchmarks the model (`triton_adder.bench.measure`) and writes the HTML report
(default runs/<model>-<device>/ under the current directory, never a committed folder;
`--report PATH` elsewhere, `--no-report` skips it). Progress bars (tqdm) go to stderr.

A cache location that cannot be written (a directory where the file goes, a file where the directory
goes, no permission, a read-only file system) ends the run with one error line and exit status 2;
cached entries the layer could not launch are warned about once and tuned again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from triton_adder.autotune import int8
from triton_adder.autotune.problems import INTERPRETER_SPATIAL_CAP
from triton_adder.autotune.spaces import parse_ops
from triton_adder.autotune.tuner import SCREEN_FAILED_NOTE, Row, merge_shards, tune_model
from triton_adder.backends import triton_interpreter_enabled
from triton_adder.cli_args import check_writable, positive_finite_float, positive_int
from triton_adder.contract import DTYPES as ALL_DTYPES
from triton_adder.contract import GRAD_MODES, KERNEL_DTYPES
from triton_adder.models.census import DEFAULT_GPU_BATCH
from triton_adder.quant import tuned
from triton_adder.training import distributed
from tuning import CacheLocationError

__all__ = ["main", "parse_ops", "print_table", "tune_model", "write_report"]

# Without a GPU: the batch of the report's CPU-path benchmark at the real shapes (2: training-mode
# BatchNorm needs more than one value per channel), and of --full-size interpreter tuning.
CPU_BATCH = 2
CPU_REPORT_REPEATS = 2  # timed repeats (after one warm-up) of the report's CPU benchmark
# --dtype: the dtypes the kernels compute.
DTYPES = {name: dtype for name, dtype in ALL_DTYPES.items() if dtype in KERNEL_DTYPES}


def format_config(config: dict | None) -> str:
    """A launch config as "MxNxK wW sS"; a weight-gradient choice also names its method and split
    (the convolution identity takes no kernel config: "conv_identity")."""
    if not config:
        return "-"
    if config.get("method") == "conv_identity":
        return "conv_identity"
    if "mr" in config:  # the int8 CPU kernel's blocking (`autotune.int8`)
        return (f"{config['mr']}x{config['nr']} tile {config['mc']}x{config['nc']} kc {config['kc']} "
                f"t{config['threads']}")
    text = f"{config['block_m']}x{config['block_n']}x{config['block_k']} w{config['num_warps']} s{config['num_stages']}"
    if "method" in config:
        text = f"{config['method']} {text} split {config['split_k']}"
    return text


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def functional_note(rows: Sequence[Row]) -> str:
    """What the times of a no-GPU run are (printed under the table and shown in the report)."""
    note = "kernel times are Triton-interpreter wall clock on the CPU: functional runs, NOT GPU timings"
    if any(row.op == tuned.OP for row in rows):
        note += (f"; {tuned.OP} rows are real CPU timings of the int8 layer, the winner and the default "
                 "timed interleaved")
    if any(row.model_shape for row in rows):
        note += (f"; each problem ran shrunk (batch 1, height/width capped at about {INTERPRETER_SPATIAL_CAP}, "
                 "channels divided by one power of two for the whole model, same kernel/stride/padding/dilation/"
                 "groups), so they rank configs of the reduced problem only and are never used on a GPU")
    return note


def print_table(rows: list[Row], functional: bool, out=None) -> None:
    """The result table on `out` (default stdout); functional: add the not-GPU-timings note."""
    out = sys.stdout if out is None else out
    reduced = any(row.model_shape for row in rows)
    ranks = any(row.rank for row in rows)  # a torchrun run: say which process tuned each row
    headers = ["layer", "op", "shape run" if reduced else "shape"] + (["model shape"] if reduced else []) + [
        "best config (MxNxK warps stages)", "time", "default", "speedup", "status"] + (["rank"] if ranks else [])
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
            *([str(row.rank)] if ranks else []),
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
    elif any(row.op == tuned.OP for row in rows):
        print(f"NOTE: {tuned.OP} rows are CPU wall-clock times of the int8 layer on this machine; the winner and "
              "the default were timed interleaved.", file=out)


class ProgressBar:
    """A tqdm bar on stderr driven by `autotune.tuner.Progress` calls (done, total, label)."""

    def __init__(self, description: str):
        self.description = description
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(label[:60], refresh=False)
        self.bar.update(done - self.bar.n)

    def write(self, message: str) -> None:
        """A line on stderr that leaves the bar intact (on its own line, the bar redrawn below it)."""
        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    target: an .html file, a directory (report.html inside), or None for runs/<model>-<device>/
    (`report.default_output_dir`).
    The tuning table goes into the page and beside it as tuning.csv / tuning.json. Returns the written paths.
    """
    import reports
    from triton_adder import bench, report

    if device.type == "cuda":
        frame = bench.measure(model_name, batch_size, device=device, quick=quick, adder_dtypes=(dtype_name,),
                              command_line=command_line, progress=True)
    else:
        frame = bench.measure(model_name, batch_size, device=device, backend="cpu", quick=True,
                              repeats=CPU_REPORT_REPEATS, adder_dtypes=(dtype_name,), command_line=command_line,
                              progress=True)
    metadata = dict(frame.attrs.get("metadata", {}))
    tuning = rows_frame(rows) if rows else None  # no rows: no kernel tuning ran (CPU, no interpreter)
    if device.type != "cuda" and any(row.op != tuned.OP for row in rows):
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


def report_screen_failures(rows: Sequence[Row], out=None) -> int:
    """An ERROR block on `out` (default stderr) for the problems whose compile-time screen raised for every
    config (`tuning.ScreenFailed`): nothing beyond their default config was tried. Returns how many."""
    out = sys.stderr if out is None else out
    failed = [(row, note) for row in rows for note in row.notes if note.startswith(SCREEN_FAILED_NOTE)]
    if failed:
        print(f"ERROR: the compile-time screen raised for every config of {len(failed)} problem(s); they were not "
              "tuned (a broken screen: check cuobjdump and the compile errors below):", file=out)
        for row, note in failed:
            print(f"ERROR:   {row.op} {row.layer} ({row.shape}): {note.removeprefix(SCREEN_FAILED_NOTE)}", file=out)
    return len(failed)


def tune_int8_blocking(args: argparse.Namespace, batch: int, explicit: bool) -> list[Row] | None:
    """Tune the int8 CPU kernel's blocking for every layer call of args.model at `batch` (`autotune.int8`).

    Returns the rows; [] when the kernel cannot be built here and int8 was only the default (a warning
    said why; the rest of the run goes on); None, after one error line, when it was asked for or the
    cache cannot be written."""
    from triton_adder.quant import native  # noqa: PLC0415

    library = native.load()
    if library is None:
        print(f"{'error' if explicit else 'warning'}: no int8 tuning: the int8 SAD kernel cannot be built on this "
              "machine (see the warning above)", file=sys.stderr)
        return None if explicit else []
    print(f"int8: model {args.model}, batch {batch}, {torch.get_num_threads()} threads, CPU "
          f"{tuned.cpu_name()} ({tuned.identity(library).capability}), cache {tuned.cache_for(library).path}",
          file=sys.stderr)
    bar = ProgressBar(f"tune int8 {args.model}")
    try:
        return int8.tune_model(args.model, batch, args.budget_s or int8.DEFAULT_BUDGET_S, force=args.force,
                               progress=bar, log=bar.write)
    except CacheLocationError as error:
        bar.write(f"error: {error}")
        return None
    finally:
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triton_adder.tune",
        description="Tune the adder kernels' launch configs for every adder layer of a model, then benchmark the "
                    "model and write the HTML report. Problems are tuned in order of their share of the model's "
                    "work (N*Cout*Ho*Wo*Cin/groups*kh*kw x the layers sharing the problem), largest first, so a "
                    "run cut short has tuned what costs the most. Without a GPU: a CPU-path benchmark only, "
                    "plus (with TRITON_INTERPRET=1) a functional tuning run through the Triton interpreter on "
                    "shrunk problems (not GPU timings).",
    )
    parser.add_argument("--model", required=True, choices=sorted(DEFAULT_GPU_BATCH))
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"GPU: tuning and benchmark batch (default per model {DEFAULT_GPU_BATCH}). Without a "
                             f"GPU: the report's CPU benchmark batch and the --full-size tuning batch (default "
                             f"{CPU_BATCH}); the functional tuning run always uses batch 1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--ops", default=None,
                        help="comma list of fwd, bwd, forward, grad_input, grad_weight (the Triton kernels) and "
                             "int8 (the int8 CPU kernel's blocking); default fwd,bwd on a GPU, int8 without one "
                             "(fwd,bwd,int8 with TRITON_INTERPRET=1)")
    parser.add_argument("--budget-s", type=positive_finite_float, default=None,
                        help=f"search wall time per layer problem and op (s), the compile-time screen included "
                             f"(the default config's run and the winner's check always run); default 60 for the "
                             f"kernels, {int8.DEFAULT_BUDGET_S:g} for int8")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tuning cache directory (default $TRITON_ADDER_CACHE_DIR or ~/.cache/triton-adder)")
    parser.add_argument("--report", type=Path, nargs="?", const=None, default=None, metavar="PATH",
                        help="where to write the HTML report: an .html file or a directory (default: "
                             "runs/<model>-<GPU name or cpu>/ under the current directory)")
    parser.add_argument("--no-report", action="store_true", help="tune only: no benchmark, no report")
    parser.add_argument("--quick", action="store_true", help="reduced space (1-2 configs per op), fewer repeats")
    parser.add_argument("--full-size", action="store_true",
                        help="without a GPU, tune the model's real problems at --batch-size through the interpreter "
                             "instead of shrunk ones (hours for resnet50)")
    parser.add_argument("--channels-last", action="store_true", help="tune for channels_last activations")
    parser.add_argument("--grad-mode", choices=GRAD_MODES, default="paper")
    parser.add_argument("--force", action="store_true", help="re-tune problems that are already cached")
    parser.add_argument("--screen-arch", type=int, choices=(80, 90), default=None,
                        help="compile each candidate for sm_<arch> and drop what spills before it is timed "
                             "(on a GPU: always, for its own arch; off a GPU: sm_90 by default, and under "
                             "TRITON_INTERPRET only with this flag, as each compile takes seconds)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    # The interpreter is the user's (or the tests') choice, never set here: it is read when the
    # kernels are defined, and on a GPU machine it would silently run them on the CPU.
    interpreter = triton_interpreter_enabled()
    int8_asked = args.ops is not None and "int8" in args.ops  # asked for, not a default: fail if impossible
    if args.ops is None:
        args.ops = "fwd,bwd" if on_gpu else "fwd,bwd,int8" if interpreter else "int8"
    requested = [part.strip() for part in args.ops.split(",") if part.strip()]
    tune_int8 = "int8" in requested
    kernel_ops = [part for part in requested if part != "int8"]
    try:
        ops = parse_ops(",".join(kernel_ops)) if kernel_ops or not tune_int8 else ()
    except ValueError as error:
        parser.error(f"{error}; or int8 (the int8 CPU kernel's blocking)")
    if args.no_report and args.report is not None:
        parser.error("--report PATH and --no-report exclude each other")
    if not args.no_report:
        # The report is written after the tuning and the benchmark (minutes to hours): check its folder now.
        target = args.report if args.report is not None else Path("runs")
        check_writable(parser, "--report", target.parent if target.suffix.lower() in (".html", ".htm") else target)

    if on_gpu and interpreter:
        parser.error("TRITON_INTERPRET is set on a machine with a GPU: unset it (the interpreter would run "
                     "the kernels on the CPU)")
    tune_kernels = bool(ops) and (on_gpu or interpreter)
    shrink = not on_gpu and not args.full_size
    if not on_gpu and not interpreter:
        print("No CUDA device and TRITON_INTERPRET unset: no kernel tuning (the Triton kernels need a GPU; "
              "TRITON_INTERPRET=1 gives a functional tuning run through the interpreter)"
              + ("; tuning the int8 CPU kernel" if tune_int8 else "") + ". The report benchmarks the CPU path.",
              file=sys.stderr)
    elif tune_kernels and not on_gpu:
        print(
            "No CUDA device: functional tuning run through the Triton interpreter on the CPU ("
            + ("each layer problem shrunk to batch 1, a small spatial size and fewer channels" if shrink
               else "real problems") + ", reduced space). Its timings are NOT GPU timings.",
            file=sys.stderr,
        )
    from triton_adder.autotune import lookup

    if args.cache_dir is not None:
        # The layer's run-time lookup (and the report's tuned rows) must read the cache tuned here.
        os.environ[lookup.CACHE_DIR_ENV] = str(args.cache_dir)
        lookup.clear()
    context = distributed.setup("cuda" if on_gpu else "cpu")  # one process, or one rank of torchrun
    device = context.device
    batch = args.batch_size or (DEFAULT_GPU_BATCH[args.model] if on_gpu else CPU_BATCH)
    quick = args.quick or not on_gpu
    dtype = DTYPES[args.dtype]
    rows = []
    started_all = time.perf_counter()
    if tune_kernels:
        identity = lookup.identity(device)
        cache = lookup.cache_for(device)
        rank = f"rank {context.rank}/{context.world_size}: " if context.distributed else ""
        print(f"{rank}model {args.model}, {'batch 1 (shrunk problems)' if shrink else f'batch {batch}'}, {args.dtype}, "
              f"ops {','.join(ops)}, device {identity.name} ({identity.capability}, Triton {identity.triton_version}), "
              f"cache {cache.path}", file=sys.stderr)
        started = time.perf_counter()
        bar = ProgressBar(f"tune {args.model}" + (f" rank {context.rank}" if context.distributed else ""))
        try:
            cache.check_writable()  # before the run, not after its first hour of tuning
            rows = tune_model(args.model, batch, dtype, ops, args.budget_s or 60.0, cache, device, quick,
                              channels_last=args.channels_last, force=args.force, grad_mode=args.grad_mode,
                              screen_arch=args.screen_arch, progress=bar, log=bar.write, shrink=shrink,
                              shard=(context.rank, context.world_size))
        except CacheLocationError as error:  # the user's setup, not a bug: one line, no traceback
            bar.write(f"error: {error}")
            distributed.teardown(context)
            return 2
        finally:
            bar.close()
        rows = merge_shards(distributed.gather(context, rows))
    if not context.main:  # rank 0 alone prints the table and writes the report
        distributed.teardown(context)
        return 1 if any(row.status == "failed" for row in rows) else 0
    distributed.teardown(context)
    if tune_kernels:
        report_screen_failures(rows)
    if tune_int8:
        int8_rows = tune_int8_blocking(args, batch if not on_gpu else args.batch_size or CPU_BATCH,
                                       explicit=int8_asked)
        if int8_rows is None:
            return 2
        rows += int8_rows
    if rows:
        print_table(rows, functional=tune_kernels and not on_gpu)
        print(f"tuning took {time.perf_counter() - started_all:.0f} s", file=sys.stderr)
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
    from triton_adder.child_process import exit_on_sigterm

    exit_on_sigterm()  # a `timeout` (benchmarks/gpu_run.sh) must not leave compiles running
    sys.exit(main())
