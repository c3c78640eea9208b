"""`convert` on real timm architectures: every converted layer keeps its convolution's output shape.

Runs only where timm imports. timm imports torchvision (timm/layers/create_norm.py uses
torchvision.ops.misc), and PyPI's torchvision does not import beside the CPU torch wheel this
project's venv uses, so there the test is skipped with the import error as its reason; it is
run in a venv with matching torch and torchvision wheels.
"""

import re
import warnings

import pytest
import torch
from torch import nn

from triton_adder import Adder2d, convert
from triton_adder.backends import use_backend
from triton_adder.backends.cpu import common

pytest.importorskip("timm")
try:
    import timm
except (ImportError, RuntimeError) as error:  # torchvision built for another torch fails here
    pytest.skip(f"timm is installed but does not import (torchvision mismatch?): {error}", allow_module_level=True)

# (architecture, convolution class convert must keep with a warning, or None)
MODELS = [
    ("resnet18", None),
    ("tf_efficientnet_b0", None),  # timm Conv2dSame -> Adder2dSame
    ("resnetv2_50x1_bit", "StdConv2d"),  # weight standardisation: kept
    ("mobilenetv3_small_100", None),
]
# Small enough for 2 cores; with TF "same" padding and five stride-2 stages the last maps are 1x1.
INPUT = (2, 3, 32, 32)


def _conv_output_shapes(model: nn.Module, x: torch.Tensor, names) -> dict:
    """Output shape of each named module for input x (forward hooks, no gradients)."""
    shapes = {}

    def record(name):
        def hook(module, args, out):  # returns None: the output is left as it is
            shapes[name] = tuple(out.shape)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _warned_layers(message: str) -> dict:
    """{layer name: class name} listed in convert's warning ("... reproduce (mod.Cls: a, b; ...); ...")."""
    listed = re.search(r"reproduce \((.*)\); pass", message).group(1)
    layers = {}
    for entry in listed.split("; "):
        cls, _, names = entry.partition(": ")
        layers.update(dict.fromkeys(names.split(", "), cls.rpartition(".")[2]))
    return layers


@pytest.mark.parametrize("arch, kept_class", MODELS, ids=[name for name, _ in MODELS])
def test_timm_model_converts_with_every_layer_shape_kept(arch, kept_class, monkeypatch):
    # The eager chunked CPU path: this tests conversion, not compilation (tested elsewhere), and
    # compiling each of a model's layer shapes took over 10 minutes on 2 cores.
    monkeypatch.setenv(common.COMPILE_ENV, "0")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    for module in model.modules():
        # timm zero-initialises the last norm of each residual branch (zero_init_last), which
        # would make every gradient in that branch exactly 0 and hide whether one reaches it.
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # Squeeze-excite gates stay convolutions: an adder's -sum|x - w| output, with no norm after
        # it, drives the sigmoid gate to 0 and with it every gradient of the model.
        gates = [name for name, m in model.named_modules() if ".se." in name and isinstance(m, nn.Conv2d)]
        converted = convert(model, exclude=gates)
    kept_warnings = [str(w.message) for w in record if "own forward" in str(w.message)]
    if kept_class is None:
        assert kept_warnings == []
    else:
        assert len(kept_warnings) == 1 and kept_class in kept_warnings[0]

    original = dict(model.named_modules())
    conv_names = [name for name, m in original.items() if isinstance(m, nn.Conv2d)]
    adders = {name: m for name, m in converted.named_modules() if isinstance(m, Adder2d)}
    kept = {name: m for name, m in converted.named_modules() if isinstance(m, nn.Conv2d)}
    # Every convolution is converted or kept as the very class it was; a kept subclass that is
    # neither the first nor the last convolution (kept by keep_first/keep_last) is in the warning.
    assert set(adders) | set(kept) == set(conv_names)
    warned = _warned_layers(kept_warnings[0]) if kept_warnings else {}
    for name, module in kept.items():
        assert type(module) is type(original[name]), name
        if type(module) is not nn.Conv2d and name not in (conv_names[0], conv_names[-1]):
            assert warned.get(name) == kept_class, name
    # resnetv2_50x1_bit's convolutions are all StdConv2d but its 1x1 head (kept last): nothing to convert.
    assert adders or kept_class is not None, "no convolution was converted"
    x = torch.randn(*INPUT, generator=torch.Generator().manual_seed(1))
    with use_backend("cpu"):
        expected = _conv_output_shapes(model, x, adders)
        got = _conv_output_shapes(converted, x, adders)
        assert got == expected

        converted.train()
        converted(x).sum().backward()
    # Every adder weight gets a finite gradient, and most a nonzero one (a layer whose outputs
    # all land below a ReLU's threshold at initialisation gets zeros, which is not a conversion fault).
    for name, adder in adders.items():
        assert adder.weight.grad is not None and torch.isfinite(adder.weight.grad).all(), name
    reached = [name for name, adder in adders.items() if adder.weight.grad.abs().sum() > 0]
    assert len(reached) >= len(adders) // 2, f"gradients reach only {len(reached)} of {len(adders)} adder layers"
