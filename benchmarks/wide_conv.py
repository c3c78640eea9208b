"""VGG's fc-as-conv classifier (512 -> 4096, 7x7 on a 7x7 map) as an adder layer on the CPU path, beside conv2d.

    python benchmarks/wide_conv.py [--repeats 11] [--batch 2] [--threads N] [--output FILE]

Times `Adder2d(512, 4096, 7)` called as a layer (the CPU path, compiled with inductor) and
`torch.nn.functional.conv2d` with the same weight shape and input, forward alone and
forward + backward of sum() (input and weight gradients for both). The first calls, which compile
the adder's callables, are timed on their own, with the number of callables they compiled; then
each repeat runs adder and conv2d one after the other, so load from other processes hits both
alike, and reports the median time of each and the median of the per-repeat ratios. Its 411 MB
weight is split into channel blocks by the CPU path, which is what this layer exercises: one
layer shape should cost one compilation per pass whatever its width. Writes the report to
results/benchmarks/wide_conv.txt (or --output).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cpu_vs_conv2d import machine_description, timed  # noqa: E402  (benchmarks/ is sys.path[0])

from triton_adder import Adder2d  # noqa: E402
from triton_adder.backends import use_backend  # noqa: E402
from triton_adder.backends.cpu import common  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.machine import git_revision  # noqa: E402

IN_CHANNELS, OUT_CHANNELS, KERNEL, SIZE = 512, 4096, 7, 7  # VGG-11/16 classifier fc6 as a convolution
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "benchmarks",
                              "wide_conv.txt")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=11, help="interleaved timed repeats (medians reported)")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report file (overwritten)")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    adder = Adder2d(IN_CHANNELS, OUT_CHANNELS, KERNEL)
    conv_weight = torch.randn(OUT_CHANNELS, IN_CHANNELS, KERNEL, KERNEL, requires_grad=True)
    x = torch.randn(args.batch, IN_CHANNELS, SIZE, SIZE, requires_grad=True)

    def adder_forward():
        with torch.no_grad():
            adder(x)

    def conv_forward():
        with torch.no_grad():
            F.conv2d(x, conv_weight)

    def adder_step():
        adder(x).sum().backward()

    def conv_step():
        F.conv2d(x, conv_weight).sum().backward()

    lines = [
        "command: python benchmarks/wide_conv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine_description(),
        f"triton_adder at {git_revision()}; compiler: "
        f"{'inductor' if common.compiler_enabled() else 'OFF (eager chunked path)'}; "
        f"TRITON_ADDER_CPU_COMPILE={os.environ.get(common.COMPILE_ENV, '(unset)')}",
        f"Adder2d({IN_CHANNELS}, {OUT_CHANNELS}, {KERNEL}) vs F.conv2d, "
        f"input {args.batch}x{IN_CHANNELS}x{SIZE}x{SIZE}, "
        f"output {args.batch}x{OUT_CHANNELS}x1x1, float32; step = forward + backward of sum()",
    ]
    with use_backend("cpu"):
        for label, fn in (("forward", adder_forward), ("forward + backward", adder_step)):
            before = common.compile_count
            first_ms = timed(fn)
            lines.append(f"first adder {label} (compiles): {first_ms / 1e3:.2f} s, "
                         f"{common.compile_count - before} callables compiled")
        for fn in (conv_forward, conv_step, adder_forward, adder_step):  # warm-up
            fn()
        before = common.compile_count
        samples = {name: [] for name in ("adder_fwd", "conv_fwd", "adder_step", "conv_step")}
        for _ in range(args.repeats):
            samples["adder_fwd"].append(timed(adder_forward))
            samples["conv_fwd"].append(timed(conv_forward))
            samples["adder_step"].append(timed(adder_step))
            samples["conv_step"].append(timed(conv_step))
        recompiled = common.compile_count - before
    lines.append(f"compiled callables held by the CPU path: {len(common._compiled)}; "
                 f"compiled during the timed repeats: {recompiled}")
    lines.append(f"median of {args.repeats} interleaved repeats:")
    for label, adder_key, conv_key in (("forward", "adder_fwd", "conv_fwd"),
                                       ("forward + backward", "adder_step", "conv_step")):
        ratios = [a / c for a, c in zip(samples[adder_key], samples[conv_key])]
        lines.append(
            f"  {label:<18}  adder {statistics.median(samples[adder_key]):8.2f} ms  "
            f"conv2d {statistics.median(samples[conv_key]):7.2f} ms  "
            f"ratio {statistics.median(ratios):5.2f} (per-repeat range {min(ratios):.2f}-{max(ratios):.2f})"
        )
    report = "\n".join(lines)
    print(report)
    with open(args.output, "w") as out:
        out.write(report + "\n")


if __name__ == "__main__":
    main()
