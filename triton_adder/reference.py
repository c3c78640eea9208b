"""Float64 ground truth for the adder layer (DESIGN.md section 1, arXiv 1912.13200).

Written for clarity, not speed: one loop over kernel taps, broadcasting over the rest. Only
tests and tiny checks should call it; memory grows as N * Cout * Cin/groups * Ho * Wo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_adder.contract import GRAD_MODES
from triton_adder.geometry import Conv2dGeometry


def _padded(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    """Zero-pad x (float64) top/left by geom.padding and bottom/right as far as the taps read."""
    hpad, wpad = geom.padded_extent(tuple(weight.shape[2:]))
    top, left = geom.padding
    bottom = max(0, hpad - top - x.shape[2])
    right = max(0, wpad - left - x.shape[3])
    return F.pad(x.double(), (left, right, top, bottom))


def _tap(xpad: torch.Tensor, i: int, j: int, geom: Conv2dGeometry) -> torch.Tensor:
    """The input values kernel tap (i, j) reads: shape (N, Cin, Ho, Wo)."""
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    return xpad[:, :, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw]


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, Ho, Wo) -> (N, groups, C/groups, Ho, Wo)."""
    return t.reshape(t.shape[0], groups, t.shape[1] // groups, *t.shape[2:])


def _differences(x, weight, geom):
    """Yield (i, j, tap, diff) with diff[n, g, t, k, p, q] = X_tap[n, g*Cg+k, p, q] - W[g*Tg+t, k, i, j]."""
    xpad = _padded(x, weight, geom)
    cout, cg, kh, kw = weight.shape
    w = weight.double().reshape(geom.groups, cout // geom.groups, cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            tap = _grouped(_tap(xpad, i, j, geom), geom.groups)  # (N, G, Cg, Ho, Wo)
            diff = tap[:, :, None] - w[None, :, :, :, i, j, None, None]  # (N, G, Tg, Cg, Ho, Wo)
            yield i, j, diff


def adder2d_forward(x, weight, bias, geom: Conv2dGeometry) -> torch.Tensor:
    """Y[n,t,p,q] = bias[t] - sum_{k,i,j} |Xpad[n, g*Cg+k, p*s+i*d, q*s+j*d] - W[t,k,i,j]|.

    x: (N, Cin, H, W); weight: (Cout, Cin/groups, kh, kw); bias: (Cout,) or None.
    Returns float64 (N, Cout, Ho, Wo).
    """
    n = x.shape[0]
    cout = weight.shape[0]
    out = torch.zeros(n, geom.groups, cout // geom.groups, *geom.out_size, dtype=torch.float64, device=x.device)
    for _, _, diff in _differences(x, weight, geom):
        out -= diff.abs().sum(dim=3)
    out = out.reshape(n, cout, *geom.out_size)
    if bias is not None:
        out += bias.double()[None, :, None, None]
    return out


def adder2d_backward(grad_out, x, weight, geom: Conv2dGeometry, grad_mode: str = "paper"):
    """Returns float64 (grad_input, grad_weight).

    grad_mode="paper" (eq. 5 and 6): dW = sum gY * (X - W), dX = sum gY * clamp(W - X, -1, 1).
    grad_mode="exact": dW = sum gY * sign(X - W), dX = sum gY * sign(W - X).
    grad_out: (N, Cout, Ho, Wo). Padded taps receive no input gradient.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    n, cin, h, wd = x.shape
    cout, cg, kh, kw = weight.shape
    g = geom.groups
    gy = grad_out.double().reshape(n, g, cout // g, 1, *geom.out_size)  # (N, G, Tg, 1, Ho, Wo)
    xpad = _padded(x, weight, geom)
    grad_xpad = torch.zeros_like(xpad)
    grad_w = torch.zeros(g, cout // g, cg, kh, kw, dtype=torch.float64, device=x.device)
    (sh, sw), (dh, dw), (ho, wo) = geom.stride, geom.dilation, geom.out_size
    for i, j, diff in _differences(x, weight, geom):
        dw_term = diff if grad_mode == "paper" else diff.sign()
        dx_term = (-diff).clamp(-1, 1) if grad_mode == "paper" else (-diff).sign()
        grad_w[:, :, :, i, j] = (gy * dw_term).sum(dim=(0, 4, 5))
        dx_tap = (gy * dx_term).sum(dim=2).reshape(n, cin, ho, wo)
        grad_xpad[:, :, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw] += dx_tap
    top, left = geom.padding
    grad_x = grad_xpad[:, :, top : top + h, left : left + wd]
    return grad_x, grad_w.reshape(cout, cg, kh, kw)
