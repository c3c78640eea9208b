"""int8 AdderNet layers (`triton_adder.quantize`'s kernel) against float32 conv2d, PyTorch's int8
quantized conv2d (x86 engine) and the float32 adder CPU path, per ResNet-50 adder layer shape.

    python benchmarks/int8_layers.py [--batches 1,8] [--repeats 11] [--threads N] [--float-adder compiled|eager|skip]

Shapes: ResNet-50's unique adder-layer calls at 224x224 (`models.census`, as the tuner and
`kernel_vs_cudnn.py` enumerate them), each with the number of layers that make it. Every
contestant takes a float32 NCHW input and returns float32:

- int8 adder:  QuantizedAdder2d (quantize the input, lay it out, SAD kernel, bias - s * sum) with
               blocking None (the tuned blocking where `python -m triton_adder.tune` cached one);
- int8 default: the same with the kernel variant's default blocking;
- conv2d fp32: torch.nn.functional.conv2d;
- qconv int8:  quantize_per_tensor (quint8) -> torch.ao.nn.quantized.Conv2d (qint8 weight, x86
               engine) -> dequantize; "qconv kernel" times the quantized conv alone on a quantized input;
- adder fp32:  triton_adder.adder2d on the CPU path (compiled by default; the first call per shape,
               which compiles, is not timed).

Contestants (`triton_adder.measure.int8.layer_contenders`, the same `python -m triton_adder.bench`
times on the CPU) run interleaved (`tuning.interleaved`): each repetition
times one call of each, in an order shuffled per repetition, so load from other processes hits
them alike; the table shows medians. Ratios are int8 adder time / other time; "geomean" is over the
unique shapes, "model" is the sum over the model's layers (each shape's median x its layer count).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from triton_adder import models  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.int8 import layer_contenders, quantized_engine  # noqa: E402
from triton_adder.measure.machine import cpu_name  # noqa: E402
from triton_adder.models.census import MODEL_INPUT_SIZE, census, unique_adder_layers  # noqa: E402
from triton_adder.quant import native  # noqa: E402
from tuning import interleaved  # noqa: E402

CONTESTANTS = ("int8 adder", "int8 default", "conv2d fp32", "qconv int8", "qconv kernel", "adder fp32")
RATIOS = {"int8 default": "default", "conv2d fp32": "conv", "qconv int8": "qconv", "adder fp32": "fadder"}
"""The per-layer columns int8 adder time / this contestant's time (short headers)."""


def resnet50_shapes(batch: int):
    """[(LayerShape, layer count)] of ResNet-50's adder layers at batch `batch`."""
    size = MODEL_INPUT_SIZE["resnet50"]
    return unique_adder_layers(census(models.build("resnet50", adder=True), (batch, 3, size, size)))


def measure(shape, repeats: int, float_adder: str, library) -> dict[str, float]:
    """Median ms per contestant (`measure.int8.layer_contenders`), interleaved, after one untimed call each."""
    with torch.no_grad(), quantized_engine():
        calls, _ = layer_contenders(shape, library, float_adder=float_adder != "skip", qconv_kernel=True)
        for fn in calls.values():  # compiles (float adder), first touch, scratch buffers
            fn()
        times = interleaved(calls, repeats, warmup=0)
    return {name: measurement.time_s * 1e3 for name, measurement in times.items()}


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
        header += " " + " ".join(f"{'/' + short:>8}" for short in RATIOS.values())
        print(header)
        rows = []
        for shape, count in shapes:
            times = measure(shape, args.repeats, args.float_adder, library)
            rows.append((shape, count, times))
            cells = " ".join(f"{times[name]:>12.3f}" if name in times else f"{'-':>12}" for name in CONTESTANTS)
            ratios = " ".join(
                f"{times['int8 adder'] / times[name]:>8.2f}" if name in times else f"{'-':>8}" for name in RATIOS
            )
            print(f"{shape.name:<28} {count:>2} {cells} {ratios}", flush=True)
        for other in CONTESTANTS[1:]:
            if not all(other in t for _, _, t in rows):
                continue
            ratio = geomean(t["int8 adder"] / t[other] for _, _, t in rows)
            model = sum(t["int8 adder"] * c for _, c, t in rows) / sum(t[other] * c for _, c, t in rows)
            print(f"int8 adder / {other:<13} geomean {ratio:.3f}   model (sum over layers) {model:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
