"""Benchmark AdderNet layers and models against the multiplication-based baselines a user would pick.

    python -m triton_adder.bench --model resnet50 [--quick]

measures (`triton_adder.measure.loops.measure`: per unique adder layer the adder forward and
gradients against conv2d in every precision, the published unfold-and-broadcast adder and
cdist(p=1); per model forward and training step against the CNN twin; on the CPU also the int8
adder against float32 conv2d, PyTorch's int8 quantized conv2d and the float32 adder, interleaved,
per layer and whole model, unless --no-int8) and writes the report
(`triton_adder.report.write_report`) under runs/<model>-<device>/ (or --out).

Timing: CUDA events on a GPU (warm-up, L2 flushed before each repeat), `time.perf_counter`
elsewhere; median, p20, p80 of the repeats.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from triton_adder import models, report
from triton_adder.backends import triton_interpreter_enabled
from triton_adder.cli_args import check_writable, positive_int
from triton_adder.measure.loops import ADDER_DTYPE_NAMES, measure

__all__ = ["main", "measure"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m triton_adder.bench --model resnet50`: measure, then write report.html, results.csv/json."""
    parser = argparse.ArgumentParser(prog="python -m triton_adder.bench", description=main.__doc__)
    parser.add_argument("--model", default="resnet50", choices=sorted(models.MODELS))
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="default: the model's batch in triton_adder.models.census.DEFAULT_GPU_BATCH on a GPU "
                             "(resnet50: 64), 2 on the CPU")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--backend", choices=("triton", "cpu"), default=None)
    parser.add_argument("--adder-dtypes", default="float32", help=f"comma-separated: {','.join(ADDER_DTYPE_NAMES)}")
    parser.add_argument("--max-layers", type=positive_int, default=None, help="only the first N unique adder layers")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                        help="the int8 rows (CPU backend only; default: on with --backend cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<model>-<device>)")
    args = parser.parse_args(argv)
    if args.backend == "triton" and not torch.cuda.is_available() and not triton_interpreter_enabled():
        # Every kernel row would fail and the run would still exit 0 with a report of errors.
        parser.error("--backend triton needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1)")
    if args.int8 and (args.backend or ("triton" if torch.cuda.is_available() or triton_interpreter_enabled()
                                       else "cpu")) != "cpu":
        parser.error("--int8 needs the CPU backend (--backend cpu): the int8 kernel runs on the CPU")
    # The report is written after minutes of measuring: check its folder now (default: under runs/).
    check_writable(parser, "--out", args.out if args.out is not None else Path("runs"))
    frame = measure(args.model, args.batch_size, quick=args.quick, backend=args.backend,
                    adder_dtypes=tuple(args.adder_dtypes.split(",")), max_layers=args.max_layers, int8=args.int8,
                    progress=True)
    for name, path in report.write_report(frame, out_dir=args.out).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    from triton_adder.child_process import exit_on_sigterm

    exit_on_sigterm()  # a `timeout` (benchmarks/gpu_run.sh) must not leave compiles running
    sys.exit(main())
