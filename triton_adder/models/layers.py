"""The one place that decides which convolutions of a model become adder layers.

Every model in this package builds its hidden convolutions through `conv_factory`, so the CNN and
the AdderNet variant of a model share one definition and differ only in the factory they receive.
The published AdderNet topology (github.com/huawei-noah/AdderNet, resnet20.py / resnet50.py): the
first convolution and the final classifier stay multiplicative `nn.Conv2d`; every other
convolution, the 1x1 downsample shortcuts included, is an adder layer; BatchNorm follows each.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from triton_adder.contract import GRAD_MODES
from triton_adder.nn import Adder2d

ConvFactory = Callable[..., nn.Module]


def conv_factory(adder: bool, grad_mode: str = "paper") -> ConvFactory:
    """A callable with `nn.Conv2d`'s signature that builds a model's hidden convolutions.

    adder=False: `nn.Conv2d`; adder=True: `triton_adder.Adder2d` with `grad_mode` ("paper": the
    paper's eq. 5-6 gradients, or "exact": the sign derivatives; see `triton_adder.adder2d`).
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if not adder:
        return nn.Conv2d

    def make_adder(*args, **kwargs) -> nn.Module:
        return Adder2d(*args, grad_mode=grad_mode, **kwargs)

    return make_adder


def init_multiplicative_(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) init for every `nn.Conv2d` in `model`, as the published
    resnet50.py and torchvision do. Adder layers keep their own N(0, 1) template initialisation,
    so both variants of a model start with Gaussian weights (compare Figure 4 of the paper)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
