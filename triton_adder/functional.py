"""`adder2d`: the functional adder layer, with `torch.nn.functional.conv2d`'s argument conventions.

All argument checking lives here: backends receive validated tensors and a resolved
`Conv2dGeometry`, and can trust them.
"""

from __future__ import annotations

import operator

import torch

from triton_adder import contract, ops
from triton_adder.geometry import Conv2dGeometry

# Geometry values (stride, padding, dilation) above this are refused by name: torch's own ops take
# them as int64 lists (2**63 raised a schema error), and sizes built from them must not overflow.
MAX_GEOMETRY = 2**31 - 1
# A padded input this many times larger than the input, and past the kernels' int32 range, is refused
# before anything is allocated (see `_check_padded_size`).
PADDING_BLOWUP_LIMIT = 4


def _int(value) -> int | None:
    """value as an int if it is integer-like (int, numpy integer, 0-d integer tensor), not a bool."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """int or pair (or 1-sequence) of ints, each >= minimum -> (a, b); otherwise a ValueError naming `name`.

    Accepts what conv2d accepts: Python and numpy integers, 0-d integer tensors, sequences of
    one or two of them.
    """
    items = list(value) if isinstance(value, (tuple, list, torch.Size)) else [value]
    ints = [_int(v) for v in items]
    if len(ints) == 1:
        ints = ints * 2
    if len(ints) != 2 or any(v is None or not minimum <= v <= MAX_GEOMETRY for v in ints):
        raise ValueError(f"{name} must be an int or a pair of ints in [{minimum}, {MAX_GEOMETRY}], got {value!r}")
    return tuple(ints)


def _positive_int(value, name: str) -> int:
    """A positive integer-like value as int; otherwise a ValueError naming `name`."""
    as_int = _int(value)
    if as_int is None or as_int < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return as_int


def resolve_geometry(
    input_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Conv2dGeometry:
    """Resolve Conv2d-style arguments for an (H, W) input and (kh, kw) kernel into a geometry.

    padding: int, pair, "valid" (no padding) or "same" (output size = input size, stride 1 only;
    an odd total padding puts the extra row/column at the bottom/right, as conv2d does).
    """
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding_before, padding_after = (0, 0), (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided adders (stride={stride}); use stride=1")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            padding_before = tuple(t // 2 for t in totals)
            padding_after = tuple(t - t // 2 for t in totals)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        padding_before = padding_after = _pair(padding, "padding", 0)
    out_size = []
    for size, k, s, d, before, after, axis in zip(
        input_size, kernel_size, stride, dilation, padding_before, padding_after, ("height", "width")
    ):
        reach = d * (k - 1) + 1
        if size + before + after < reach:
            raise ValueError(
                f"kernel {axis} with dilation ({reach}) is larger than the padded input {axis} "
                f"({size} + padding {before + after} = {size + before + after})"
            )
        out_size.append((size + before + after - reach) // s + 1)
    return Conv2dGeometry(stride, padding_before, dilation, groups, tuple(out_size))


def _check_padded_size(input: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> None:
    """Refuse, before allocating, a geometry whose zero-padded input dwarfs the input itself.

    The CPU path builds the padded input (the rows and columns the taps can read,
    `Conv2dGeometry.padded_extent`) and the kernels index in int32. conv2d computes, e.g.,
    padding=2**19, dilation=2**20 on a 1x1 input (a 1x1 output); here that padded input would hold
    2**40 elements (4 TiB in float32), so it is a clear error instead of an allocation failure.
    """
    hpad, wpad = geom.padded_extent(tuple(weight.shape[2:]))
    n, cin = input.shape[:2]
    padded = n * cin * hpad * wpad
    if padded >= contract.INT32_LIMIT and padded > PADDING_BLOWUP_LIMIT * max(1, input.numel()):
        gib = padded * input.element_size() / 2**30
        raise ValueError(
            f"padding {geom.padding} with dilation {geom.dilation} and stride {geom.stride} needs a zero-padded "
            f"input of {n}x{cin}x{hpad}x{wpad} = {padded} elements ({gib:.0f} GiB), over {PADDING_BLOWUP_LIMIT}x the "
            f"input and past the kernels' int32 indexing; adder2d does not support such geometry (conv2d does): "
            "reduce the padding or dilation"
        )


def _check_tensors(input: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> None:
    for name, tensor in (("input", input), ("weight", weight), ("bias", bias)):
        if isinstance(tensor, torch.Tensor) and tensor.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (torch.strided) tensor, got layout {tensor.layout}; "
                            "call .to_dense() first")  # fmt: skip
    if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4):
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"input must be a 3-d (C, H, W) or 4-d (N, C, H, W) tensor, got {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-d (out_channels, in_channels/groups, kh, kw) tensor, got {shape}")
    if min(weight.shape[2:]) < 1:
        raise ValueError(f"weight kernel size must be at least 1x1, got weight shape {tuple(weight.shape)}")
    if min(input.shape[-2:]) < 1:
        raise ValueError(f"input height and width must be at least 1 (as in conv2d), got shape {tuple(input.shape)}")
    if input.dtype not in contract.SUPPORTED_DTYPES:
        raise TypeError(f"input dtype must be one of {[str(d) for d in contract.SUPPORTED_DTYPES]}, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype ({weight.dtype}) must match input dtype ({input.dtype})")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}; they must be on one device")
    in_channels, out_channels = input.shape[-3], weight.shape[0]
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups ({groups}) must divide both input channels ({in_channels}) and output channels ({out_channels})"
        )
    if weight.shape[1] * groups != in_channels:
        raise ValueError(
            f"input has {in_channels} channels but weight expects {weight.shape[1]} x groups {groups} = "
            f"{weight.shape[1] * groups} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (out_channels,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a tensor of shape ({out_channels},), got {shape}")
        if bias.dtype != input.dtype or bias.device != input.device:
            raise TypeError(
                f"bias ({bias.dtype}, {bias.device}) must match input dtype and device ({input.dtype}, {input.device})"
            )


def _autocast_operands(input, weight, bias):
    """(input, weight, bias), cast to the autocast dtype when autocast is on for input's device.

    Mirrors autocast's conv2d policy (lower precision, cast of every floating operand except
    float64) so that a model whose first, multiplicative layer already returns bfloat16 under
    autocast feeds its adder layers without a dtype mismatch.
    """
    if not isinstance(input, torch.Tensor):
        return input, weight, bias
    device_type = input.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(input), cast(weight), cast(bias)


def adder2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    grad_mode: str = "paper",
) -> torch.Tensor:
    """Adder layer: ``Y[n,t,p,q] = bias[t] - sum_{k,i,j} |Xpad[n, g*Cg+k, p*s+i*d, q*s+j*d] - W[t,k,i,j]|``.

    Arguments follow `torch.nn.functional.conv2d`.

    Args:
        input: (N, Cin, H, W) or unbatched (Cin, H, W); float16, bfloat16, float32 or float64.
            NCHW, channels_last and non-contiguous layouts all work; the output keeps the layout.
        weight: (Cout, Cin / groups, kh, kw), same dtype and device as input.
        bias: optional (Cout,).
        stride, dilation: int or (h, w) pair, >= 1.
        padding: int or (h, w) pair >= 0, or "valid" / "same". Zero padding: a padded tap
            contributes ``-|w|``, as in the published implementation.
        groups: splits channels as in conv2d; must divide Cin and Cout.
        grad_mode: "paper" (default): full-precision weight gradient ``gY * (X - W)`` (eq. 5) and
            HardTanh input gradient ``gY * clamp(W - X, -1, 1)`` (eq. 6); "exact": the true sign
            derivatives. No learning-rate scaling happens here; see `triton_adder.adaptive_lr_`.

    Returns:
        (N, Cout, Ho, Wo), or (Cout, Ho, Wo) for unbatched input, in input's dtype (float16 and
        bfloat16 accumulate in float32).

    Under `torch.autocast` for the input's device, input, weight and bias are first cast to the
    autocast dtype (float64 operands are left alone), as `F.conv2d` does: the op then runs in
    that dtype with float32 accumulation, and gradients reach float32 parameters as float32
    through the cast.
    """
    groups = _positive_int(groups, "groups")
    input, weight, bias = _autocast_operands(input, weight, bias)
    _check_tensors(input, weight, bias, groups)
    if grad_mode not in contract.GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {contract.GRAD_MODES}, got {grad_mode!r}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    geom = resolve_geometry(tuple(input.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation, groups)
    _check_padded_size(input, weight, geom)
    output = ops.adder2d_op(input, weight, bias, geom, grad_mode)
    return output.squeeze(0) if unbatched else output
