"""The paper's networks, each as a CNN or an AdderNet, plus `convert` and published checkpoints.

``build("resnet20", adder=True)`` is the AdderNet ResNet-20 for CIFAR-10, ``build("resnet20",
adder=False)`` the same network as a CNN.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from triton_adder.models.convert import convert
from triton_adder.models.layers import conv_factory
from triton_adder.models.lenet import LeNet5BN
from triton_adder.models.published import from_published_state_dict, load_published
from triton_adder.models.resnet import BasicBlock, Bottleneck, ResNet

# name -> (constructor taking hidden_conv, num_classes, in_channels; default classes; input channels).
# The ImageNet classifiers carry a bias because the published resnet50.py's does.
MODELS = {
    "lenet5bn": (LeNet5BN, 10, 1),
    "resnet20": (partial(ResNet, block=BasicBlock, layers=[3, 3, 3], stem="cifar"), 10, 3),
    "resnet32": (partial(ResNet, block=BasicBlock, layers=[5, 5, 5], stem="cifar"), 10, 3),
    "resnet18": (
        partial(ResNet, block=BasicBlock, layers=[2, 2, 2, 2], stem="imagenet", classifier_bias=True),
        1000,
        3,
    ),
    "resnet50": (
        partial(ResNet, block=Bottleneck, layers=[3, 4, 6, 3], stem="imagenet", classifier_bias=True),
        1000,
        3,
    ),
}


def build(
    name: str,
    adder: bool = True,
    num_classes: int | None = None,
    in_channels: int | None = None,
    grad_mode: str = "paper",
) -> nn.Module:
    """Build model `name` ("lenet5bn", "resnet20", "resnet32", "resnet18", "resnet50").

    adder=True: the AdderNet (every convolution but the first and the classifier is an
    `Adder2d`, BatchNorm after each); adder=False: the same network as a CNN.
    num_classes: default 10 (LeNet-5-BN for MNIST, ResNet-20/32 for CIFAR-10) or 1000 (ResNet-18/50
    for ImageNet). in_channels: default 1 for LeNet-5-BN, 3 for the ResNets.
    grad_mode: the adder layers' backward ("paper" or "exact", see `triton_adder.adder2d`).
    Input (N, in_channels, H, W) -> logits (N, num_classes); LeNet-5-BN needs H = W = 28.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    if not isinstance(adder, bool):
        raise ValueError(f"adder must be True (AdderNet) or False (CNN), got {adder!r}")
    for argument, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{argument} must be None or a positive int, got {value!r}")
    constructor, default_classes, default_channels = MODELS[name]
    return constructor(
        conv_factory(adder, grad_mode),
        num_classes=default_classes if num_classes is None else num_classes,
        in_channels=default_channels if in_channels is None else in_channels,
    )


__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "LeNet5BN",
    "ResNet",
    "build",
    "convert",
    "from_published_state_dict",
    "load_published",
]
