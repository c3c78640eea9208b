"""int8 AdderNet layers (`triton_adder.quantize`'s kernel) against float32 conv2d, PyTorch's int8
quantized conv2d (x86 engine) and the float32 adder CPU path, per ResNet-50 adder layer shape.

    python benchmarks/int8_layers.py [--batches 1,8] [--repeats 11] [--threads N] [--float-adder compiled|eager|skip]

Shapes: ResNet-50's unique adder-layer calls at 224x224 (`models.census`, as the tuner and
`kernel_vs_cudnn.py` enumerate them), each with the number of layers that make it. Every
contestant takes a float32 NCHW input and returns float32:

- int8 adder:  QuantizedAdder2d (quantize the input, lay it out, SAD kernel, bias - s * sum);
- conv2d fp32: torch.nn.functional.conv2d;
- qconv int8:  quantize_per_tensor (quint8) -> torch.ao.nn.quantized.Conv2d (qint8 weight, x86
               engine) -> dequantize; "qconv kernel" times the quantized conv alone on a quantized input;
- adder fp32:  triton_adder.adder2d on the CPU path (compiled by default; the first call per shape,
               which compiles, is not timed).

Contestants run interleaved: each repetition times one call of each, in an order rotated per
repetition, so load from other processes hits them alike; the table shows medians. Ratios are
int8 adder time / other time; "geomean" is over the unique shapes, "model" is the sum over the
model's layers (each shape's median x its layer count).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton_adder  # noqa: E402
from triton_adder import models  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.machine import cpu_name  # noqa: E402
from triton_adder.models.census import MODEL_INPUT_SIZE, census, unique_adder_layers  # noqa: E402
from triton_adder.nn import Adder2d  # noqa: E402
from triton_adder.quant import QuantizedAdder2d, native  # noqa: E402

CONTESTANTS = ("int8 adder", "conv2d fp32", "qconv int8", "qconv kernel", "adder fp32")


def resnet50_shapes(batch: int):
    """[(LayerShape, layer count)] of ResNet-50's adder layers at batch `batch`."""
    size = MODEL_INPUT_SIZE["resnet50"]
    return unique_adder_layers(census(models.build("resnet50", adder=True), (batch, 3, size, size)))


def contestants(shape, float_adder: str):
    """name -> zero-argument callable, all on the same float32 input and weight."""
    torch.manual_seed(0)
    geom = shape.geom
    x = torch.randn(shape.x_shape)
    weight = torch.randn(shape.weight_shape) * 0.5
    layer = Adder2d(
        shape.cin,
        shape.cout,
        (shape.kh, shape.kw),
        stride=geom.stride,
        padding=geom.padding,
        dilation=geom.dilation,
        groups=geom.groups,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantized = QuantizedAdder2d.from_float(layer, float(x.abs().max()))
    # PyTorch's int8 convolution: per-tensor scales from the same data, x86 engine (oneDNN/FBGEMM).
    torch.backends.quantized.engine = "x86"
    x_scale = float(x.abs().max()) / 127
    qconv = torch.ao.nn.quantized.Conv2d(
        shape.cin,
        shape.cout,
        (shape.kh, shape.kw),
        stride=geom.stride,
        padding=geom.padding,
        dilation=geom.dilation,
        groups=geom.groups,
        bias=False,
    )
    w_scale = float(weight.abs().max()) / 127
    qconv.set_weight_bias(torch.quantize_per_tensor(weight, w_scale, 0, torch.qint8), None)
    qconv.scale, qconv.zero_point = float(x_scale * 64), 128  # output range of the same order as the products
    qx = torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)

    def run_qconv():
        return qconv(torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)).dequantize()

    calls = {
        "int8 adder": lambda: quantized(x),
        "conv2d fp32": lambda: F.conv2d(x, weight, None, geom.stride, geom.padding, geom.dilation, geom.groups),
        "qconv int8": run_qconv,
        "qconv kernel": lambda: qconv(qx),
    }
    if float_adder != "skip":
        calls["adder fp32"] = lambda: triton_adder.adder2d(
            x, weight, None, geom.stride, geom.padding, geom.dilation, geom.groups
        )
    return calls


def interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """ms per call for each contestant, one call of each per repetition, order rotated per repetition."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for rep in range(repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                start = time.perf_counter()
                calls[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def measure(shape, repeats: int, float_adder: str) -> dict[str, float]:
    """Median ms per contestant, interleaved, after one untimed call each (compiles, first-touch)."""
    calls = contestants(shape, float_adder)
    with torch.no_grad():
        for fn in calls.values():
            fn()
    samples = interleaved(calls, repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=positive_int, default=11)
    parser.add_argument(
        "--float-adder",
        choices=("compiled", "eager", "skip"),
        default="compiled",
        help="our float32 adder: the compiled CPU path (default), the eager one, or not at all",
    )
    parser.add_argument("--max-layers", type=positive_int, default=None, help="only the first N unique shapes")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch (and the int8 kernel's OpenMP) threads; default torch's",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if any(b < 1 for b in batches):
            raise ValueError
    except ValueError:
        parser.error(f"--batches must be comma-separated positive ints, got {args.batches!r}")
    # quantize_per_tensor warns that quantized tensors are deprecated (torch 2.13): once is enough
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    if args.float_adder == "eager":
        os.environ["TRITON_ADDER_CPU_COMPILE"] = "0"
    library = native.load()
    variant = library.isa if library is not None else "none (float fallback)"
    print(
        f"CPU: {cpu_name()}; {os.cpu_count()} logical cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; quantized engine x86; int8 kernel variant {variant}; "
        f"python {platform.python_version()}"
    )
    print(f"float32 adder: {args.float_adder}; {args.repeats} interleaved repetitions, medians in ms")
    for batch in batches:
        shapes = resnet50_shapes(batch)[: args.max_layers]
        print(f"\nResNet-50 adder layers, batch {batch} ({len(shapes)} unique shapes)")
        header = f"{'layer':<28} {'n':>2} " + " ".join(f"{name:>12}" for name in CONTESTANTS)
        header += f" {'/conv':>6} {'/qconv':>6} {'/fadder':>7}"
        print(header)
        rows = []
        for shape, count in shapes:
            times = measure(shape, args.repeats, args.float_adder)
            rows.append((shape, count, times))
            cells = " ".join(f"{times[name]:>12.3f}" if name in times else f"{'-':>12}" for name in CONTESTANTS)
            int8 = times["int8 adder"]
            fadder = f"{int8 / times['adder fp32']:>7.2f}" if "adder fp32" in times else f"{'-':>7}"
            print(
                f"{shape.name:<28} {count:>2} {cells} {int8 / times['conv2d fp32']:>6.2f} "
                f"{int8 / times['qconv int8']:>6.2f} {fadder}",
                flush=True,
            )
        for other in CONTESTANTS[1:]:
            if other not in rows[0][2]:
                continue
            ratio = geomean(t["int8 adder"] / t[other] for _, _, t in rows)
            model = sum(t["int8 adder"] * c for _, c, t in rows) / sum(t[other] * c for _, c, t in rows)
            print(f"int8 adder / {other:<13} geomean {ratio:.3f}   model (sum over layers) {model:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
