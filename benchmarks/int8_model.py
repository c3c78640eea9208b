"""Whole-model ResNet-50 inference: the int8 AdderNet (`triton_adder.quantize`) against the float32
CNN, PyTorch's int8 quantized CNN (x86 engine) and our float32 AdderNet, at 224x224, eval mode, CPU.

    python benchmarks/int8_model.py [--batches 1,8] [--repeats 11] [--threads 1]
        [--float-adder compiled|eager|skip] [--float-adder-batches 1,8]

Issue 27's whole-model goal: the int8 AdderNet at most 0.5x the float32 CNN's time (the layers
outside the adders, the 7x7 stem, BatchNorm, ReLU, pooling, the classifier, stay float).

Contestants, each a whole `models.build("resnet50", ...)` network, float32 NCHW images in, logits out:

- int8 adder:  the AdderNet (random init), BatchNorm running statistics set by forward passes in
               train mode on random images (cumulative average), then `triton_adder.quantize`
               calibrated on 2 random batches (blocking None: the tuned blocking where one is cached;
               the BatchNorm after each adder layer folded into its rescale, the default);
- int8 default: the same with every layer on the kernel variant's default blocking;
- int8 unfolded: `quantize(..., fold_batchnorm=False)`, tuned blocking: every BatchNorm runs as its own pass;
- cnn fp32:    the same architecture with adder=False (BatchNorm set the same way), torch.no_grad();
- qcnn int8:   that CNN through FX graph mode post-training static quantization
               (`prepare_fx` / `convert_fx`, `get_default_qconfig_mapping("x86")`, x86 engine),
               calibrated on the same 2 batches (`triton_adder.measure.int8.quantized_cnn`);
- adder fp32:  the AdderNet before quantization, on the float32 CPU path (compiled by default).

Contestants run interleaved (`tuning.interleaved`): each repetition times one
forward of each, in an order shuffled per repetition, so load from other processes hits them alike;
tables show medians and ratios of medians from the same run. The thread count applies to torch
(`torch.set_num_threads`), to the int8 kernel (which passes `torch.get_num_threads()` to OpenMP per
call) and to the quantized engine.

Also printed: per adder layer of the int8 model, the relative output error
||y_int8 - y_float|| / ||y_float - mean_per_channel(y_float)|| on one held-out random batch, both
accumulated (the int8 model's layer output against the float model's, each model fed the same
images) and local (the quantized layer on the float model's own layer input). Activations come from
random images through a randomly initialised network, not from trained ImageNet weights.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from int8_layers import geomean, resnet50_shapes  # noqa: E402

import triton_adder  # noqa: E402
from triton_adder import models  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.int8 import ENGINE, quantized_cnn, with_default_blocking  # noqa: E402
from triton_adder.measure.machine import cpu_name  # noqa: E402
from triton_adder.models.census import MODEL_INPUT_SIZE  # noqa: E402
from triton_adder.nn import Adder2d  # noqa: E402
from triton_adder.quant import QuantizedAdder2d, native  # noqa: E402
from tuning import interleaved  # noqa: E402

CONTESTANTS = ("int8 adder", "int8 default", "int8 unfolded", "cnn fp32", "qcnn int8", "adder fp32")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def set_batchnorm_statistics(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Running statistics = the cumulative average over `batches`, passed in train mode (no_grad)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: after the passes, the plain mean over them
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def breakdown(model: nn.Module, names: set[str], x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median ms of a forward, median ms inside the modules named `names`), timed by hooks; a separate,
    non-interleaved pass after the timed runs (the hooks add a little time of their own)."""
    layers = [m for n, m in model.named_modules() if n in names]
    inside: list[float] = []
    starts: list[float] = []

    def pre(_module, _args):
        starts.append(time.perf_counter())

    def post(_module, _args, _output):
        inside.append(time.perf_counter() - starts.pop())

    handles = [m.register_forward_pre_hook(pre) for m in layers] + [m.register_forward_hook(post) for m in layers]
    totals, parts = [], []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                inside.clear()
                start = time.perf_counter()
                model(x)
                totals.append((time.perf_counter() - start) * 1e3)
                parts.append(sum(inside) * 1e3)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(totals), statistics.median(parts)


def relative_errors(float_model: nn.Module, int8_model: nn.Module, x: torch.Tensor):
    """[(name, layer, accumulated error, local error, clipped input fraction)] per adder layer.

    accumulated: each model fed x, the int8 layer's output against the float layer's;
    local: the quantized layer run on the float model's input to that layer. Both relative to
    ||y_float - mean over (N, H, W) per channel of y_float||.
    """
    float_layers = {n: m for n, m in float_model.named_modules() if isinstance(m, Adder2d)}
    int8_layers = {n: m for n, m in int8_model.named_modules() if isinstance(m, QuantizedAdder2d)}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    local: dict[str, tuple[float, float]] = {}

    def spread(y: torch.Tensor) -> float:
        y = y.double()
        return float((y - y.mean(dim=(0, 2, 3), keepdim=True)).norm())

    def float_hook(name):
        def hook(_module, args, output):
            outputs[("float", name)] = output.detach()
            with torch.no_grad():
                quantized = int8_layers[name](args[0])
            err = float((quantized.double() - output.double()).norm()) / spread(output)
            clipped = float((args[0].abs() > 127.5 * int8_layers[name].scale_value).double().mean())
            local[name] = (err, clipped)

        return hook

    def int8_hook(name):
        def hook(_module, _args, output):
            outputs[("int8", name)] = output.detach()

        return hook

    handles = [m.register_forward_hook(float_hook(n)) for n, m in float_layers.items()]
    handles += [m.register_forward_hook(int8_hook(n)) for n, m in int8_layers.items()]
    try:
        with torch.no_grad():
            logits_float = float_model(x)
            logits_int8 = int8_model(x)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, layer in float_layers.items():
        y_float, y_int8 = outputs[("float", name)], outputs[("int8", name)]
        accumulated = float((y_int8.double() - y_float.double()).norm()) / spread(y_float)
        (kh, kw), stride = layer.kernel_size, layer.stride[0]
        shape = f"{layer.in_channels}->{layer.out_channels} {kh}x{kw} s{stride}"
        rows.append((name, shape, accumulated, *local[name]))
    agree = float((logits_float.argmax(1) == logits_int8.argmax(1)).double().mean())
    logits_err = float((logits_int8.double() - logits_float.double()).norm()) / spread(
        logits_float.double()[:, :, None, None]
    )
    return rows, agree, logits_err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=positive_int, default=11)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch and int8-kernel threads (default 1)")
    parser.add_argument(
        "--float-adder",
        choices=("compiled", "eager", "skip"),
        default="compiled",
        help="our float32 AdderNet: the compiled CPU path (default), the eager one, or not at all",
    )
    parser.add_argument(
        "--float-adder-batches", default=None, help="batch sizes at which the float32 AdderNet runs (default: all)"
    )
    parser.add_argument("--size", type=positive_int, default=MODEL_INPUT_SIZE["resnet50"], help="image side")
    parser.add_argument("--bn-batches", type=positive_int, default=4, help="train-mode passes setting BatchNorm")
    parser.add_argument("--calib-batch", type=positive_int, default=8, help="images per batch (BN, calibration)")
    parser.add_argument("--breakdown-repeats", type=positive_int, default=5, help="forwards per model, time split")
    parser.add_argument("--skip-errors", action="store_true", help="do not print the per-layer errors")
    args = parser.parse_args(argv)

    def batch_list(text, flag):
        try:
            values = [int(b) for b in text.split(",")]
            if any(b < 1 for b in values):
                raise ValueError
        except ValueError:
            parser.error(f"{flag} must be comma-separated positive ints, got {text!r}")
        return values

    batches = batch_list(args.batches, "--batches")
    fadder_batches = (
        batches if args.float_adder_batches is None else batch_list(args.float_adder_batches, "--float-adder-batches")
    )
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = ENGINE
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao")
    if args.float_adder == "eager":
        os.environ["TRITON_ADDER_CPU_COMPILE"] = "0"
    library = native.load()
    variant = library.isa if library is not None else "none (float fallback)"
    print(f"$ python benchmarks/int8_model.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"CPU: {cpu_name()}; {os.cpu_count()} logical cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}); "
        f"quantized engine x86; int8 kernel variant {variant} "
        f"(TRITON_ADDER_INT8_IFMA={os.environ.get('TRITON_ADDER_INT8_IFMA', '(unset)')}); "
        f"python {platform.python_version()}"
    )
    print(
        f"float32 AdderNet: {args.float_adder} (TRITON_ADDER_CPU_COMPILE="
        f"{os.environ.get('TRITON_ADDER_CPU_COMPILE', '(unset)')}); "
        f"{args.repeats} interleaved repetitions, medians in ms"
    )
    print(f"load average at start: {load()}", flush=True)

    torch.manual_seed(0)
    size = args.size
    images = [torch.randn(args.calib_batch, 3, size, size) for _ in range(args.bn_batches)]
    calibration = [torch.randn(args.calib_batch, 3, size, size) for _ in range(2)]
    held_out = torch.randn(args.calib_batch, 3, size, size)

    started = time.perf_counter()
    adder = models.build("resnet50", adder=True)
    cnn = models.build("resnet50", adder=False)
    set_batchnorm_statistics(cnn, images)
    set_batchnorm_statistics(adder, images)
    print(
        f"BatchNorm statistics: {args.bn_batches} train-mode passes of {args.calib_batch} random images "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    started = time.perf_counter()
    int8 = triton_adder.quantize(adder, calibration)
    int8_default = with_default_blocking(int8, library) if library is not None else None
    int8_unfolded = triton_adder.quantize(adder, calibration, fold_batchnorm=False)
    print(f"triton_adder.quantize: 2 calibration batches of {args.calib_batch} ({time.perf_counter() - started:.1f} s)")
    started = time.perf_counter()
    qcnn, qcnn_error = quantized_cnn(cnn, calibration)
    if qcnn is None:
        print(f"qcnn int8 DROPPED: {qcnn_error}")
    else:
        print(
            "FX prepare_fx/convert_fx (x86 qconfig mapping): 2 calibration batches "
            f"({time.perf_counter() - started:.1f} s)"
        )
    n_adders = sum(isinstance(m, QuantizedAdder2d) for m in int8.modules())
    print(
        f"int8 model: {n_adders} QuantizedAdder2d layers ({len(resnet50_shapes(1))} unique shapes); "
        "stem conv, BatchNorm, ReLU, pooling, classifier float32",
        flush=True,
    )

    summary = {}
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        calls = {
            "int8 adder": lambda x=x: int8(x),
            "int8 unfolded": lambda x=x: int8_unfolded(x),
            "cnn fp32": lambda x=x: cnn(x),
        }
        if int8_default is not None:
            calls["int8 default"] = lambda x=x: int8_default(x)
        if qcnn is not None:
            calls["qcnn int8"] = lambda x=x: qcnn(x)
        if args.float_adder != "skip" and batch in fadder_batches:
            calls["adder fp32"] = lambda x=x: adder(x)
        started = time.perf_counter()
        with torch.no_grad():
            for fn in calls.values():  # untimed: compiles (float adder), first-touch, scratch buffers
                fn()
                fn()
        print(f"\nbatch {batch}: warm-up {time.perf_counter() - started:.1f} s; load average {load()}", flush=True)
        with torch.no_grad():
            samples = {name: [t * 1e3 for t in m.samples] for name, m in interleaved(calls, args.repeats, 0).items()}
        medians = {name: statistics.median(v) for name, v in samples.items()}
        summary[batch] = medians
        print(f"{'contestant':<13} {'median ms':>10} {'min':>9} {'max':>9} {'int8 adder / it':>16}")
        for name in CONTESTANTS:
            if name not in medians:
                print(f"{name:<13} {'-':>10}")
                continue
            v = samples[name]
            print(
                f"{name:<13} {medians[name]:>10.1f} {min(v):>9.1f} {max(v):>9.1f} "
                f"{medians['int8 adder'] / medians[name]:>16.3f}"
            )
        print(f"load average after batch {batch}: {load()}", flush=True)

    print(f"\nSummary, {args.threads} thread(s): int8 AdderNet time / other model's time (ratios of medians, same run)")
    print(f"{'batch':>5} " + " ".join(f"{'/ ' + name:>14}" for name in CONTESTANTS[1:]))
    for batch, medians in summary.items():
        cells = " ".join(
            f"{medians['int8 adder'] / medians[name]:>14.3f}" if name in medians else f"{'-':>14}"
            for name in CONTESTANTS[1:]
        )
        print(f"{batch:>5} {cells}")
    if len(summary) > 1:
        print(
            "geomean over batches, / cnn fp32: "
            f"{geomean(m['int8 adder'] / m['cnn fp32'] for m in summary.values()):.3f}"
        )
    print(f"load average after the timed runs: {load()}", flush=True)

    # Where the time goes (the unfolded int8 model, whose adder layers do what the CNN's convolutions do): the 52
    # hidden layers (adder layers; the same positions' convolutions in the CNN)
    # against everything else (stem conv, BatchNorm, ReLU, residual adds, pooling, classifier: float32 in
    # the CNN and in the int8 AdderNet alike).
    hidden = {n for n, m in adder.named_modules() if isinstance(m, Adder2d)}
    print(
        f"\nTime inside the {len(hidden)} hidden layers (adder layers / the CNN's convolutions at the same places) "
        f"vs the rest, timed by forward hooks, {args.breakdown_repeats} separate non-interleaved forwards "
        "per model, medians in ms"
    )
    print(f"{'batch':>5} {'model':<13} {'forward':>9} {'hidden':>9} {'rest':>9}")
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        parts = {"int8 unfolded": int8_unfolded, "cnn fp32": cnn}
        if args.float_adder != "skip" and batch in fadder_batches:
            parts["adder fp32"] = adder
        for name, model in parts.items():
            total, inside = breakdown(model, hidden, x, args.breakdown_repeats)
            print(f"{batch:>5} {name:<13} {total:>9.1f} {inside:>9.1f} {total - inside:>9.1f}", flush=True)

    if not args.skip_errors:
        rows, agree, logits_err = relative_errors(adder, int8_unfolded, held_out)  # layer outputs before BatchNorm
        print(
            f"\nPer adder layer relative output error ||y_int8 - y_float|| / ||y_float - mean_per_channel(y_float)||, "
            f"one held-out batch of {held_out.shape[0]} random images."
        )
        print(
            "NOT realistic activations: random N(0,1) images through a randomly initialised ResNet-50 AdderNet "
            "whose BatchNorm statistics were set on random images (no trained ImageNet weights)."
        )
        print(
            "accumulated: int8 model vs float model, each fed the images (errors of earlier layers included); "
            "local: the int8 layer on the float model's input to it; clipped: fraction of that input beyond 127.5 s"
        )
        print(f"{'layer':<24} {'shape':<18} {'accumulated':>11} {'local':>9} {'clipped':>9}")
        for name, shape, accumulated, err, clipped in rows:
            print(f"{name:<24} {shape:<18} {accumulated:>11.4f} {err:>9.4f} {clipped:>9.2e}")
        acc = [r[2] for r in rows]
        loc = [r[3] for r in rows]
        print(
            f"accumulated: median {statistics.median(acc):.4f}, max {max(acc):.4f}; "
            f"local: median {statistics.median(loc):.4f}, max {max(loc):.4f}"
        )
        print(
            f"logits: relative error {logits_err:.4f} (same normalisation over the batch); "
            f"argmax agreement {agree * 100:.0f}% of {held_out.shape[0]}"
        )
        if qcnn is not None:
            with torch.no_grad():
                y_cnn, y_qcnn = cnn(held_out), qcnn(held_out)
            err = float((y_qcnn.double() - y_cnn.double()).norm()) / float(
                (y_cnn.double() - y_cnn.double().mean(0, keepdim=True)).norm()
            )
            print(
                f"for comparison, qcnn int8 vs cnn fp32 logits: relative error {err:.4f}; argmax agreement "
                f"{float((y_cnn.argmax(1) == y_qcnn.argmax(1)).double().mean()) * 100:.0f}% of {held_out.shape[0]}"
            )
        if not all(math.isfinite(v) for v in acc + loc):
            print("warning: non-finite errors")
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
