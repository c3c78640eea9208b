"""The CPU adder path (`triton_adder.backends.cpu`) side by side with `torch.nn.functional.conv2d` on the same shapes.

    python benchmarks/cpu_vs_conv2d.py [--repeats 7] [--shapes resnet20,resnet50] [--grad-mode paper] [--threads N]

For each shape: forward time of the adder layer and of conv2d, their ratio; backward time
(input + weight gradients) of both and their ratio; the compile time of the adder's first call
(excluded from the timings); and the peak extra memory of the adder's forward + backward (peak
resident memory above the level before the call, see
`triton_adder.backends.cpu.memory.peak_extra_rss_megabytes`). Timings are
medians of `--repeats` runs with adder and conv2d interleaved, so load from other processes hits
both alike; the ratios are what to compare across machines. torch runs with its default threads
unless --threads is given (on a loaded machine --threads 1 gives steadier ratios).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from triton_adder.backends import cpu  # noqa: E402
from triton_adder.backends.cpu.memory import peak_extra_rss_megabytes  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.functional import resolve_geometry  # noqa: E402

# (name, batch, in_channels, out_channels, input size, kernel, stride, padding)
SHAPES = {
    "resnet20": [  # CIFAR-10 ResNet-20 adder layers, batch 32
        ("resnet20 16ch 32x32 3x3", 32, 16, 16, 32, 3, 1, 1),
        ("resnet20 32ch 16x16 3x3", 32, 32, 32, 16, 3, 1, 1),
        ("resnet20 64ch 8x8 3x3", 32, 64, 64, 8, 3, 1, 1),
        ("resnet20 16->32 3x3 s2", 32, 16, 32, 32, 3, 2, 1),
        ("resnet20 32->64 3x3 s2", 32, 32, 64, 16, 3, 2, 1),
        ("resnet20 16->32 1x1 s2", 32, 16, 32, 32, 1, 2, 0),
        ("resnet20 32->64 1x1 s2", 32, 32, 64, 16, 1, 2, 0),
    ],
    "resnet50": [  # ImageNet ResNet-50 bottleneck 3x3 layers (stride 1), batch 4
        ("resnet50 64ch 56x56 3x3", 4, 64, 64, 56, 3, 1, 1),
        ("resnet50 128ch 28x28 3x3", 4, 128, 128, 28, 3, 1, 1),
        ("resnet50 256ch 14x14 3x3", 4, 256, 256, 14, 3, 1, 1),
    ],
}


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"CPU: {model}; {os.cpu_count()} logical cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}); "
        f"python {platform.python_version()}"
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_shape(batch, cin, cout, size, kernel, stride, padding, repeats, grad_mode):
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size)
    weight = torch.randn(cout, cin, kernel, kernel)
    geom = resolve_geometry((size, size), (kernel, kernel), stride, padding)
    out = geom.out_size[0]
    grad_out = torch.randn(batch, cout, out, out)

    def adder_forward():
        return cpu.forward(x, weight, None, geom)

    def adder_backward():
        cpu.grad_input(grad_out, x, weight, geom, grad_mode)
        cpu.grad_weight(grad_out, x, weight, geom, grad_mode)

    def conv_forward():
        return F.conv2d(x, weight, stride=stride, padding=padding)

    def conv_backward():  # input + weight gradients, the same work autograd does for a conv layer
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, True, False]
        )

    compile_ms = timed(adder_forward) + timed(adder_backward)  # first calls compile each kernel
    for fn in (adder_forward, conv_forward, adder_backward, conv_backward):
        fn()
    samples = {name: [] for name in ("adder_fwd", "conv_fwd", "adder_bwd", "conv_bwd")}
    for _ in range(repeats):
        samples["adder_fwd"].append(timed(adder_forward))
        samples["conv_fwd"].append(timed(conv_forward))
        samples["adder_bwd"].append(timed(adder_backward))
        samples["conv_bwd"].append(timed(conv_backward))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    minimums = {name: min(values) for name, values in samples.items()}
    peak_mb = peak_extra_rss_megabytes(lambda: (adder_forward(), adder_backward()))
    activation_mb = (x.numel() + grad_out.numel()) * 4 / 2**20
    unfold_mb = cout * cin * kernel * kernel * batch * out * out * 4 / 2**20
    return medians, minimums, compile_ms, peak_mb, activation_mb, unfold_mb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed repeats per shape (median reported)")
    parser.add_argument("--shapes", default="resnet20,resnet50", help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--grad-mode", default="paper", choices=("paper", "exact"))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(machine_description())
    print(
        f"compiler: {'inductor' if cpu.compiler_enabled() else 'OFF (eager chunked path)'}; "
        f"grad_mode={args.grad_mode}; float32; median of {args.repeats}, adder and conv2d interleaved; "
        "bwd = input + weight gradients"
    )
    header = (
        f"{'shape':<26} {'N':>3} {'adder fwd':>10} {'conv fwd':>9} {'ratio':>6} {'(min)':>6} {'adder bwd':>10} "
        f"{'conv bwd':>9} {'ratio':>6} {'(min)':>6} {'compile':>8} {'peak extra':>11} {'x+gY':>7} {'unfold':>8}"
    )
    print(header)
    units = ["", "", "ms", "ms", "", "", "ms", "ms", "", "", "s", "MB", "MB", "MB"]
    widths = [26, 3, 10, 9, 6, 6, 10, 9, 6, 6, 8, 11, 7, 8]
    print(" ".join(f"{unit:>{width}}" for unit, width in zip(units, widths)))
    for group in args.shapes.split(","):
        if group not in SHAPES:
            parser.error(f"--shapes must name groups from {list(SHAPES)}, got {group!r}")
        for name, *shape in SHAPES[group]:
            medians, minimums, compile_ms, peak_mb, activation_mb, unfold_mb = bench_shape(
                *shape, args.repeats, args.grad_mode
            )
            print(
                f"{name:<26} {shape[0]:>3} {medians['adder_fwd']:>10.2f} {medians['conv_fwd']:>9.2f} "
                f"{medians['adder_fwd'] / medians['conv_fwd']:>6.2f} "
                f"{minimums['adder_fwd'] / minimums['conv_fwd']:>6.2f} {medians['adder_bwd']:>10.2f} "
                f"{medians['conv_bwd']:>9.2f} {medians['adder_bwd'] / medians['conv_bwd']:>6.2f} "
                f"{minimums['adder_bwd'] / minimums['conv_bwd']:>6.2f} "
                f"{compile_ms / 1e3:>8.1f} {peak_mb:>11.1f} {activation_mb:>7.1f} {unfold_mb:>8.0f}",
                flush=True,
            )
    print(
        "ratio = ratio of medians; (min) = ratio of the fastest runs, less sensitive to other load; "
        "peak extra = resident memory during one adder forward+backward above the level before it; "
        "x+gY = size of the input and grad_out; unfold = the [Cout, Cin*k*k, N*Ho*Wo] float32 temporary "
        "the published implementation materialises."
    )


if __name__ == "__main__":
    main()
