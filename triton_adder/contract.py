"""What every part of the library agrees on: dtypes, gradient modes, memory formats, index limits.

One home for each of these facts. The argument checks (`functional.py`), the backends, the
kernels' launchers, the tuner and the jobs import them from here instead of keeping copies.
"""

from __future__ import annotations

import torch

GRAD_MODES = ("paper", "exact")
""""paper": the full-precision weight gradient (eq. 5) and HardTanh input gradient (eq. 6) of
DESIGN.md section 1; "exact": the sign derivatives of the forward."""

GRAD_WEIGHT_METHODS = ("triton", "conv_identity")
"""How a weight gradient can be computed: "triton", the split-reduction kernel (both grad modes);
"conv_identity", convolutions plus a per-channel correction (paper mode only, DESIGN.md section 1).
The tuner searches between them and caches the winner (`autotune.lookup.GradWeightChoice`)."""

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
"""Every dtype `adder2d` accepts, by name (the CLIs' --dtype values)."""

SUPPORTED_DTYPES = tuple(DTYPES.values())

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes the Triton kernels compute (accumulating in float32); float64 takes the portable
torch path, since the kernels are written for float32 accumulation."""

INT32_LIMIT = 2**31
"""Element offsets below this fit the kernels' int32 index arithmetic."""


def max_element_offset(t: torch.Tensor) -> int:
    """Largest element offset a kernel can form from t's strides (numel - 1 when contiguous)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))


def needs_int64_indexing(*tensors: torch.Tensor) -> bool:
    """True when some tensor has 2**31 elements or more, or strides reaching that far: int32 would wrap."""
    return any(t.numel() >= INT32_LIMIT or max_element_offset(t) >= INT32_LIMIT for t in tensors)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way (and not also NCHW-contiguous), else contiguous.

    Outputs and input gradients keep the input's memory format, as `F.conv2d` does.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def layout_name(x: torch.Tensor) -> str:
    """Memory layout of activation x (N, C, H, W): "contiguous", "channels_last" or "strided"."""
    if x.is_contiguous():
        return "contiguous"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def is_power_of_two(value: int) -> bool:
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


def next_power_of_two(value: int) -> int:
    """Smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()
