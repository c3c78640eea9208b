"""What the two gradient passes (`grad_input`, `grad_weight`) share: the sign helper of the exact
mode, and the checks of the operands their launchers receive."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_adder.contract import GRAD_MODES, INT32_LIMIT, SUPPORTED_DTYPES, max_element_offset, needs_int64_indexing
from triton_adder.geometry import Conv2dGeometry


@triton.jit
def _sign(d):
    """sign(d) with sign(0) = sign(NaN) = 0, as torch.sign (and the reference, which uses it).

    Not NaN-propagating: the grad_input kernel's masked taps load gY = 0, and 0 * sign(W - X) must
    stay 0 there, or a NaN weight tap that only meets the padding made every input gradient it does not
    reach NaN (and, through grad_weight's padded X = 0, its own weight gradient NaN, not the reference's).
    """
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


def check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")


def check_operands(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> None:
    """Shapes, dtypes, devices and index range the gradient kernels rely on.

    functional.py has checked the user's arguments; this guards the launchers' own callers (the
    tuner, the benchmarks). The gradient kernels have no int64 index path: a tensor whose offsets
    reach `contract.INT32_LIMIT` (where the forward switches to int64) is refused, by name.
    """
    for name, tensor in (("grad_out", grad_out), ("x", x), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got {getattr(tensor, 'shape', type(tensor).__name__)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}; all operands must share a device")
        if needs_int64_indexing(tensor):
            raise ValueError(
                f"{name} spans {max(tensor.numel(), max_element_offset(tensor) + 1)} elements; the gradient "
                f"kernels index with int32 and take fewer than {INT32_LIMIT} (2**31)"
            )
    n, cin = x.shape[:2]
    cout, cg = weight.shape[:2]
    if geom.groups < 1 or cin % geom.groups or cout % geom.groups or cin // geom.groups != cg:
        raise ValueError(
            f"groups={geom.groups} does not fit x channels {cin} and weight shape {tuple(weight.shape)}: "
            "need in_channels = groups * weight.shape[1] and out_channels divisible by groups"
        )
    expected = (n, cout, *geom.out_size)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out must have shape {expected} (N, Cout, Ho, Wo), got {tuple(grad_out.shape)}")


def accumulate_in_float64(*tensors: torch.Tensor) -> bool:
    """float64 operands accumulate in float64 (so the float64 tolerance holds); all others in float32."""
    return any(t.dtype == torch.float64 for t in tensors)
