"""CPU weight gradient: eq. 5 through the convolution identity ("paper", `backends.conv_identity`), or
the sign reduction ("exact")."""

from __future__ import annotations

import torch

from triton_adder.backends import conv_identity
from triton_adder.backends.cpu import common
from triton_adder.geometry import Conv2dGeometry


def _grad_weight_exact_body(taps, grad_out, weight):
    """dW = sum_{n,p,q} gY * sign(X - W) (the exact derivative).

    taps (N, Ho, Wo, kh, kw, G, Cg) view, grad_out (N, Ho, Wo, G, Tg), weight (G, Tg, kh, kw, Cg).
    Returns (G, Tg, kh, kw, Cg).
    """
    diff = taps.permute(0, 1, 2, 5, 3, 4, 6)[:, :, :, :, None] - weight  # N, Ho, Wo, G, Tg, kh, kw, Cg
    return (diff.sign() * grad_out[..., None, None, None]).sum(dim=(0, 1, 2))


def grad_weight(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str = "paper"
) -> torch.Tensor:
    """dW = sum_{n,p,q} gY * (X - W) (eq. 5; "exact": sign(X - W)), X the input value tap (i, j) reads.

    grad_out: (N, Cout, Ho, Wo); x: (N, Cin, H, W); weight: (Cout, Cin/groups, kh, kw).
    Returns (Cout, Cin/groups, kh, kw) contiguous, in weight.dtype.
    """
    common.check(x, weight, geom, grad_mode)
    if grad_mode == "paper":
        return conv_identity.grad_weight(grad_out, x, weight, geom)
    grad_out, x, weight = grad_out.detach(), x.detach(), weight.detach()
    dtype = common.compute_dtype(x.dtype)
    kernel_size = tuple(weight.shape[2:])
    groups = geom.groups
    cout, cg, kh, kw = weight.shape
    taps = common.taps_view(common.padded_channels_last(x, kernel_size, geom, dtype), kernel_size, geom)
    grad_cl = grad_out.to(dtype).permute(0, 2, 3, 1).reshape(*grad_out.shape[:1], *geom.out_size, groups, -1)
    grad_cl = grad_cl.contiguous()
    w = common.weight_taps_last(weight, groups, dtype)
    dw = None
    if common.use_compiler(x):
        dw = common.compiled_call(_grad_weight_exact_body, {}, (taps, grad_cl, w))
    if dw is None:
        dw = _grad_weight_exact_eager(taps, grad_cl, w)
    # (G, Tg, kh, kw, Cg) -> (Cout, Cg, kh, kw)
    return dw.reshape(cout, kh, kw, cg).permute(0, 3, 1, 2).contiguous().to(weight.dtype)


def _grad_weight_exact_eager(taps, grad_cl, w):
    n, ho, wo, kh, kw, groups, cg = taps.shape
    tg = w.shape[1]
    dw = w.new_zeros(w.shape)
    budget = common.memory_budget_bytes()
    item = taps.element_size() * common.TEMPORARIES_PER_ELEMENT * groups * kh * kw * cg
    for t0, t1 in common.chunks(tg, wo * item, budget):
        for n0, n1, r0, r1 in common.row_blocks(n, ho, wo * (t1 - t0) * item, budget):
            dw[:, t0:t1] += _grad_weight_exact_body(taps[n0:n1, r0:r1], grad_cl[n0:n1, r0:r1, :, :, t0:t1], w[:, t0:t1])
    return dw
