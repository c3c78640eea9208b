"""Census of a model's layers: every Adder2d / Conv2d / Linear call of one forward, by shape.

The tuner's problems, the benchmark's layer list and the GPU benchmark scripts all start here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from triton_adder.functional import resolve_geometry
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.nn import Adder2d

# Image size per model (the paper's datasets: MNIST 28, CIFAR-10 32, ImageNet 224).
MODEL_INPUT_SIZE = {"lenet5bn": 28, "resnet20": 32, "resnet32": 32, "resnet18": 224, "resnet50": 224}
# Batch of a GPU tuning or benchmark run per model, unless the user gives --batch-size.
DEFAULT_GPU_BATCH = {"lenet5bn": 256, "resnet20": 128, "resnet32": 128, "resnet18": 64, "resnet50": 64}


@dataclass(frozen=True)
class LayerCall:
    """One call of a Conv2d / Adder2d / Linear inside a model forward: arithmetic kind and elements."""

    kind: str  # "adder" | "multiply"
    module: str
    elements: int
    shape: LayerShape | None  # only for adder layers


def _module_geometry(module: nn.Module, input_size: tuple[int, int]) -> Conv2dGeometry:
    return resolve_geometry(input_size, tuple(module.kernel_size), module.stride, module.padding,
                            module.dilation, module.groups)


def census(model: nn.Module, input_shape: Sequence[int]) -> list[LayerCall]:
    """Every Adder2d / Conv2d / Linear call of one forward of `model` on `input_shape` (N, C, H, W).

    Runs a copy of the model on the meta device (shapes only, no memory, no arithmetic).
    """
    meta_model = copy.deepcopy(model).to("meta").eval()  # eval: BatchNorm accepts any batch size
    calls: list[LayerCall] = []

    def hook(name):
        def record(module, inputs):
            x = inputs[0]
            if isinstance(module, nn.Linear):
                calls.append(LayerCall("multiply", name, x.numel() // x.shape[-1] * module.in_features
                                       * module.out_features, None))
                return
            n, c, h, w = x.shape
            geom = _module_geometry(module, (h, w))
            kh, kw = module.kernel_size
            shape = LayerShape(n, c, h, w, module.out_channels, kh, kw, geom)
            kind = "adder" if isinstance(module, Adder2d) else "multiply"
            calls.append(LayerCall(kind, name, shape.elements, shape if kind == "adder" else None))

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in meta_model.named_modules()
               if isinstance(m, (Adder2d, nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            meta_model(torch.empty(*input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def unique_adder_layers(calls: Iterable[LayerCall]) -> list[tuple[LayerShape, int]]:
    """(shape, how many calls use it) for each distinct adder layer, in first-use order."""
    counts: dict[LayerShape, int] = {}
    for call in calls:
        if call.kind == "adder":
            counts[call.shape] = counts.get(call.shape, 0) + 1
    return list(counts.items())


