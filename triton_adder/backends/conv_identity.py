"""The adder weight gradient (paper eq. 5) through the vendor's convolution weight-gradient routine.

    dW[t, k, i, j] = sum_{n,p,q} gY[n,t,p,q] * (Xpad[n, c, p*s_h + i*d_h, q*s_w + j*d_w] - W[t,k,i,j])
                   = conv2d_weight(Xpad, gY)[t, k, i, j] - W[t, k, i, j] * sum_{n,p,q} gY[n, t, p, q]

The identity is exact (DESIGN.md section 1), zero padding included: a padded tap reads Xpad = 0 and
still contributes -W * gY, which the second term counts. Paper mode only: the exact derivative
needs sign(Xpad - W) per element, which no convolution computes.

Precision rule. Everything accumulates in float32 (float64 when any operand is float64): gY, X
and W are widened to that dtype before the convolution (float16/bfloat16 included), the
convolution, the per-channel sum of gY and the subtraction all run in it, and the result is
rounded to weight's dtype once, at the end. The convolution runs in IEEE float32: for the call,
every reduced-precision float32 mode torch offers (cuDNN/cuBLAS TF32, oneDNN TF32/BF16, set
through the per-operator `fp32_precision` flags or the legacy `allow_tf32` ones) is switched off,
and the caller's settings are restored afterwards (float64 convolutions have no reduced mode).

Why: gY has both signs, so a sum of L = N*Ho*Wo terms gY * X is about sqrt(L) times smaller than
the sum of their magnitudes, to which the rounding error of the convolution is proportional; the
identity then subtracts a term of the same size. The float32 tolerance of the kernel path this
replaces allows float32's unit roundoff (2**-24) times that growth; TF32 (2**-11) or BF16 (2**-8)
would be 2**13 to 2**16 times over it, and for a ResNet-50 stage-1 layer at batch 64 (L = 200704)
TF32 alone would leave an error of order 0.1 relative to dW. Rounding a float16 convolution output before the
subtraction would lose the same digits, hence the widening.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from triton_adder.contract import memory_format
from triton_adder.geometry import Conv2dGeometry


def _precision_flags() -> list[tuple[object, str, object]]:
    """(object, attribute, IEEE value) of every float32-precision switch the convolution may consult."""
    per_operator = [
        (getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
        (torch.backends.cuda.matmul, "fp32_precision"),
        (getattr(torch.backends.mkldnn, "conv", None), "fp32_precision"),
        (getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
    ]
    flags = [(owner, name) for owner, name in per_operator if owner is not None and hasattr(owner, name)]
    if flags:
        return [(owner, name, "ieee") for owner, name in flags]
    # torch without per-operator flags: only CUDA has reduced-precision float32 convolutions there.
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


_lock = threading.Lock()
_depth = 0
_saved: list = []


@contextlib.contextmanager
def ieee_float32():
    """Run convolutions and matmuls in IEEE float32 inside the block; restore the caller's flags after.

    The flags are process-wide, so nested or concurrent (threaded) uses share one save/restore: the
    first to enter saves and sets, the last to leave restores. The legacy `allow_tf32` flags are only
    touched on a torch without the per-operator flags (reading them after the per-operator API was
    used can raise).
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            flags = _precision_flags()
            _saved = [(owner, name, getattr(owner, name)) for owner, name, _ in flags]
            for owner, name, value in flags:
                setattr(owner, name, value)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for owner, name, value in _saved:
                    setattr(owner, name, value)
                _saved = []


def _conv_input(x: torch.Tensor, kernel_size, geom: Conv2dGeometry, dtype: torch.dtype):
    """(input, padding) for a convolution whose output is exactly geom.out_size over Xpad.

    When the convolution's own symmetric padding (top, left) yields out_size, x is passed as it is
    (no copy beyond the dtype widening); otherwise (implied bottom/right padding that differs, or
    input rows the taps never read) a zero-padded buffer of exactly the rows and columns the taps
    read (`geom.padded_extent`), in x's memory format, with padding 0.
    """
    n, cin, h, w = x.shape
    top, left = geom.padding
    conv_out = tuple(
        (size + 2 * pad - d * (k - 1) - 1) // s + 1
        for size, pad, d, k, s in zip((h, w), (top, left), geom.dilation, kernel_size, geom.stride, strict=True)
    )
    if conv_out == tuple(geom.out_size):
        return x.to(dtype), [top, left]
    hpad, wpad = geom.padded_extent(kernel_size)
    xpad = x.new_zeros((n, cin, hpad, wpad), dtype=dtype).contiguous(memory_format=memory_format(x))
    rows, cols = min(h, hpad - top), min(w, wpad - left)
    if rows > 0 and cols > 0:
        xpad[:, :, top : top + rows, left : left + cols] = x[:, :, :rows, :cols]
    return xpad, [0, 0]


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    """Paper eq. 5 by the convolution identity, under the module's precision rule (any device).

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W) unpadded, any memory format or strides;
    weight: (Cout, Cin/groups, kh, kw). Returns a contiguous tensor of weight's shape and dtype.
    """
    if grad_out.numel() == 0 or x.numel() == 0:  # nothing to reduce over
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    dtype = torch.float64 if torch.float64 in (grad_out.dtype, x.dtype, weight.dtype) else torch.float32
    kernel_size = tuple(weight.shape[2:])
    gy = grad_out.detach().to(dtype)
    w = weight.detach().to(dtype)
    with ieee_float32():
        x_conv, padding = _conv_input(x.detach(), kernel_size, geom, dtype)
        conv_grad = torch.ops.aten.convolution_backward(
            gy, x_conv, w, None, list(geom.stride), padding, list(geom.dilation), False, [0, 0], geom.groups,
            [False, True, False],
        )[1]  # fmt: skip
    grad_w = conv_grad - w * gy.sum(dim=(0, 2, 3))[:, None, None, None]
    return grad_w.to(weight.dtype).contiguous()
