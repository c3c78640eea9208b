"""Steady-state cost of the CPU path's symbolic compilations against exact-shape ones, interleaved.

    python benchmarks/cpu_symbolic_ab.py [--model resnet50] [--batch 2] [--size 224] [--pairs 7]

One process, one model, two sets of compiled callables (`backends.cpu.common`): "exact", the
default (one compilation per exact operand sizes and strides), and "symbolic"
(TRITON_ADDER_CPU_COMPILE=symbolic: symbolic sizes and strides, canonical operand views).
After one warm-up step of each, forward+backward steps alternate exact, symbolic, exact, ...; the
ratio is the median of the per-pair ratios, so drift of the machine's speed cancels.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import triton_adder  # noqa: E402
from triton_adder.backends.cpu import common  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.machine import cpu_name, git_revision  # noqa: E402

MODES = {"exact": "1", "symbolic": common.SYMBOLIC}  # $TRITON_ADDER_CPU_COMPILE per mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--size", type=positive_int, default=224)
    parser.add_argument("--pairs", type=positive_int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = triton_adder.models.build(args.model, adder=True)
    x = torch.randn(args.batch, 3, args.size, args.size)
    state = {mode: (collections.OrderedDict(), {}) for mode in MODES}

    def step(mode: str) -> float:
        os.environ[common.COMPILE_ENV] = MODES[mode]
        common._compiled, common._families = state[mode]
        start = time.perf_counter()
        model(x).sum().backward()
        return time.perf_counter() - start

    for mode in MODES:
        step(mode)  # compiles
    times = {mode: [] for mode in MODES}
    for _ in range(args.pairs):
        for mode in ("exact", "symbolic"):
            times[mode].append(step(mode))
    ratios = [s / e for s, e in zip(times["symbolic"], times["exact"])]
    print(f"command: python benchmarks/cpu_symbolic_ab.py --model {args.model} --batch {args.batch} "
          f"--size {args.size} --pairs {args.pairs}")
    print(f"machine: {cpu_name()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; at {git_revision()}")
    for mode in ("exact", "symbolic"):
        print(f"{mode:>8}: median step {statistics.median(times[mode]):.3f} s over {args.pairs} "
              f"({len(state[mode][0])} signatures)")
    print(f"symbolic / exact, median of per-pair ratios: {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
