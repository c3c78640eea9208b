"""The multiplication-free baselines a user would otherwise write: the published unfold-and-broadcast
adder (github.com/huawei-noah/AdderNet, adder.py) and torch.cdist(p=1), with their working sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_adder.geometry import Conv2dGeometry, LayerShape

CONV_PRECISIONS = ("fp32", "tf32", "float16", "bfloat16")


def conv_padding(shape: LayerShape) -> tuple[int, int] | None:
    """Symmetric conv2d padding equal to the geometry's, or None when the geometry is asymmetric."""
    ho, wo = shape.geom.out_size
    ph, pw = shape.geom.padding
    (sh, sw), (dh, dw) = shape.geom.stride, shape.geom.dilation
    if (shape.h + 2 * ph - dh * (shape.kh - 1) - 1) // sh + 1 != ho:
        return None
    if (shape.w + 2 * pw - dw * (shape.kw - 1) - 1) // sw + 1 != wo:
        return None
    return ph, pw


def unfold_broadcast_adder(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    """The published AdderNet forward (huawei-noah/AdderNet adder.py): unfold, broadcast |W - X|, sum.

    x: (N, Cin, H, W), weight: (Cout, Cin, kh, kw), groups must be 1. Memory: 2 * Cout * K * L
    elements for the broadcast difference and its abs (K = Cin*kh*kw, L = N*Ho*Wo).
    """
    n, cout = x.shape[0], weight.shape[0]
    ho, wo = geom.out_size
    x_col = F.unfold(x, weight.shape[2:], dilation=geom.dilation, padding=geom.padding, stride=geom.stride)
    x_col = x_col.permute(1, 2, 0).contiguous().view(x_col.shape[1], -1)  # (K, Ho*Wo*N), as published
    w_col = weight.view(cout, -1)
    out = -(w_col.unsqueeze(2) - x_col.unsqueeze(0)).abs().sum(1)  # (Cout, Ho*Wo*N)
    return out.view(cout, ho, wo, n).permute(3, 0, 1, 2).contiguous()


def cdist_adder(x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    """-torch.cdist(p=1) between unfolded input patches and the flattened filters: (N, Cout, Ho, Wo)."""
    n, cout = x.shape[0], weight.shape[0]
    ho, wo = geom.out_size
    x_col = F.unfold(x, weight.shape[2:], dilation=geom.dilation, padding=geom.padding, stride=geom.stride)
    distance = torch.cdist(x_col.transpose(1, 2), weight.reshape(1, cout, -1), p=1)  # (N, L, Cout)
    return -distance.transpose(1, 2).reshape(n, cout, ho, wo)


def unfold_broadcast_bytes(shape: LayerShape, itemsize: int) -> int:
    """Working set of `unfold_broadcast_adder`: unfold + its contiguous copy, difference + abs, sums."""
    k = shape.cin * shape.kh * shape.kw
    cols = shape.batch * shape.geom.out_size[0] * shape.geom.out_size[1]
    return itemsize * (2 * k * cols + 2 * shape.cout * k * cols + 2 * shape.cout * cols)


def cdist_bytes(shape: LayerShape, itemsize: int) -> int:
    """Working set of `cdist_adder`: unfolded input (and a contiguous copy), distances, output."""
    k = shape.cin * shape.kh * shape.kw
    cols = shape.batch * shape.geom.out_size[0] * shape.geom.out_size[1]
    return itemsize * (2 * k * cols + 2 * shape.cout * cols + shape.cout * k)
