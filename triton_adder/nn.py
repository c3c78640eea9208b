"""`Adder2d`: a drop-in replacement for `torch.nn.Conv2d` computing a negative L1 distance."""

from __future__ import annotations

import torch
from torch import nn

from triton_adder.contract import GRAD_MODES
from triton_adder.functional import _pair, _positive_int, adder2d


class Adder2d(nn.Module):
    """Adder layer with `nn.Conv2d`'s signature (arXiv 1912.13200).

    ``Y[n,t,p,q] = bias[t] - sum_{k,i,j} |Xpad[n, g*Cg+k, p*s+i*d, q*s+j*d] - W[t,k,i,j]|``

    Shapes: input (N, Cin, H, W) or (Cin, H, W); output (N, Cout, Ho, Wo) or (Cout, Ho, Wo) with
    ``Ho = (H + pad_top + pad_bottom - dilation*(kh-1) - 1) // stride + 1`` (same for Wo).
    `weight` is (Cout, Cin/groups, kh, kw) and `bias` (Cout,) when ``bias=True``.

    Differences from Conv2d: ``bias`` defaults to False (AdderNets put BatchNorm after every
    adder layer, as the paper does); only ``padding_mode="zeros"`` exists (a padded tap
    contributes ``-|w|``); ``grad_mode`` selects the paper's gradients ("paper", default) or the
    true sign derivatives ("exact"); see `triton_adder.adder2d`.

    Initialisation: weights ~ N(0, 1), as in the published code. An adder filter is a template
    compared with its input patch, so it must live on the input's scale (BatchNorm-normalised
    activations, ~N(0, 1)); Conv2d's Kaiming scale (~1/sqrt(fan_in)) would put every filter near
    zero, so every output channel would start as nearly the same ``-sum |x|``. Bias starts at 0.
    """

    # The rest of nn.Conv2d's public attributes, for model code that reads them off a replaced convolution.
    transposed = False
    output_padding = (0, 0)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        grad_mode: str = "paper",
    ):
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups ({groups}) must divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"padding_mode must be 'zeros' (the only padding AdderNet defines), got {padding_mode!r}"
            )
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided adders (stride={self.stride})")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding", 0)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.padding_mode, self.grad_mode = padding_mode, grad_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, 1) (the published initialisation; see the class docstring), bias = 0."""
        nn.init.normal_(self.weight, 0.0, 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return adder2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.grad_mode
        )

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.grad_mode != "paper":
            text += f", grad_mode={self.grad_mode!r}"
        return text


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis, (before, after): the output has ceil(size / stride)
    positions, and the extra padding, when odd, goes after (timm's `Conv2dSame`, TF's conv2d)."""
    pad = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return pad // 2, pad - pad // 2


class Adder2dSame(Adder2d):
    """`Adder2d` with TensorFlow-style dynamic "same" padding (timm's `Conv2dSame`): the zero padding
    is computed from each input's size at run time (`same_padding`), so the output has
    ceil(H / stride) x ceil(W / stride) positions. Its `padding` attribute is (0, 0); the
    other arguments are `Adder2d`'s."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, **kwargs):
        if padding not in (0, (0, 0)):
            raise ValueError(f"padding must be 0 for Adder2dSame (it pads from the input size), got {padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, **kwargs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom = same_padding(input.shape[-2], kh, sh, dh)
        left, right = same_padding(input.shape[-1], kw, sw, dw)
        # One asymmetric zero pad then a padding-0 adder: the padded taps read 0, as Adder2d's do.
        input = nn.functional.pad(input, (left, right, top, bottom))
        return super().forward(input)


class Adder2dWithNorm(nn.Sequential):
    """``Sequential(adder, norm)`` that also answers as its adder layer: what `convert(..., insert_norm=True)` puts
    where a convolution fed an activation without a normalisation.

    Model code that reads the replaced convolution's attributes (``self.proj.weight.dtype``,
    ``self.proj.out_channels``: timm's EdgeNeXt positional encoding does) would find nothing on a plain Sequential;
    here every name the Sequential does not have is looked up on the adder (``self[0]``). It stays a Sequential,
    so checkpoints keep the keys ``<name>.0.weight`` / ``<name>.1.running_mean``, `quantize` folds the norm into
    the adder layer's rescale, and module walks see the adder and the norm as they are.
    """

    def __init__(self, adder: Adder2d, norm: nn.Module):
        super().__init__(adder, norm)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "0" not in modules:
                raise  # half-built (unpickling, deepcopy): nothing to delegate to yet
            return getattr(modules["0"], name)
