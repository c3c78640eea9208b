"""Shared layer cases of the test suite: the output-size rule and the case tables built from it.

A plain helper module (no tests in it): test modules import from here, never from each other.

- `out_size`: the convolution output size of one spatial dimension, with padding before and after;
- `geometry` / `layer_case`: a resolved `Conv2dGeometry` (symmetric padding unless told) and
  (x shape, weight shape, geometry) triples;
- `FORWARD_CASES` + `forward_inputs`: the layer grid of the public-API forward tests, written as
  `adder2d` arguments (so symbolic padding such as "same" is exercised);
- `GRADIENT_CASES` + `gradient_operands`: the small, odd geometry grid of the gradient kernels.

Sizes are odd throughout, so no tile or chunk boundary can hide a masking bug behind a power of two.
"""

from __future__ import annotations

import torch

from triton_adder.geometry import Conv2dGeometry


def out_size(size: int, kernel: int, stride: int = 1, pad_before: int = 0, pad_after: int | None = None,
             dilation: int = 1) -> int:
    """Output length of a convolution over `size` inputs (pad_after defaults to pad_before)."""
    pad_after = pad_before if pad_after is None else pad_after
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def geometry(hw, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, pad_after=None) -> Conv2dGeometry:
    """Conv2dGeometry of an (H, W) input; pad_after (bottom, right) defaults to padding (symmetric)."""
    pad_after = padding if pad_after is None else pad_after
    out = tuple(
        out_size(size, k, s, p, q, d)
        for size, k, s, p, q, d in zip(hw, kernel, stride, padding, pad_after, dilation, strict=True)
    )
    return Conv2dGeometry(tuple(stride), tuple(padding), tuple(dilation), groups, out)


def layer_case(n, cin, h, w, cout, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, pad_after=None):
    """(x shape, weight shape, geometry) of one layer call."""
    geom = geometry((h, w), kernel, stride, padding, dilation, groups, pad_after)
    return (n, cin, h, w), (cout, cin // groups, *kernel), geom


# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups, bias) as adder2d takes them.
# Pairwise-style coverage, not a full product, because each new shape costs a compile on the CPU path.
FORWARD_CASES = [
    (5, 7, 11, 13, 3, 3, 1, 0, 1, 1, False),
    (2, 4, 11, 13, 6, 3, 2, 1, 1, 2, True),
    (2, 3, 9, 7, 5, (3, 2), (3, 1), (2, 1), (2, 1), 1, True),
    (1, 6, 10, 9, 6, 3, 1, "same", 2, 6, False),  # depthwise, dilated "same"
    (3, 4, 8, 8, 4, 2, 1, "same", 1, 1, True),  # even kernel: asymmetric "same" padding
    (2, 5, 7, 12, 7, 1, 2, 0, 1, 1, False),  # 1x1 stride-2 downsample
    (2, 6, 6, 5, 4, 3, 1, "valid", 1, 2, False),
]


def forward_inputs(case, dtype=torch.float32, seed=0):
    """(x, weight, bias or None, adder2d keyword arguments) of a FORWARD_CASES entry, on the CPU."""
    n, cin, h, w, cout, k, stride, padding, dilation, groups, bias = case
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=gen).to(dtype)
    b = torch.randn(cout, generator=gen).to(dtype) if bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, weight, b, kwargs


# The gradient kernels' geometry grid. Ids say what each case is there for.
GRADIENT_CASES = {
    "3x3_pad1": layer_case(2, 5, 5, 7, 6, (3, 3), padding=(1, 1)),
    "stride2_groups2": layer_case(2, 6, 7, 9, 4, (3, 3), stride=(2, 2), padding=(1, 1), groups=2),
    # stride 3 x 1, dilation 2 x 1, padding 0 x 2, 2 x 3 kernel; the last input rows are never read.
    "asymmetric_dilated": layer_case(1, 3, 8, 7, 5, (2, 3), stride=(3, 1), padding=(0, 2), dilation=(2, 1)),
    "depthwise_stride2_pad2": layer_case(1, 4, 6, 5, 4, (3, 3), stride=(2, 2), padding=(2, 2), groups=4),
    # padding="same" with an even kernel: 0 before, 1 after (implied by out_size).
    "same_even_kernel": layer_case(1, 3, 5, 6, 3, (2, 2), padding=(0, 0), pad_after=(1, 1)),
}


def gradient_operands(case, dtype=torch.float32, seed=0, device="cpu"):
    """[grad_out, x, weight, geometry] of a GRADIENT_CASES entry (or an (x, w, geom) triple)."""
    x_shape, w_shape, geom = GRADIENT_CASES[case] if isinstance(case, str) else case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen)
    # Weights at the scale of x so that |W - X| straddles the clamp at 1 in both directions.
    weight = torch.randn(w_shape, generator=gen) * 0.8
    grad_out = torch.randn(x_shape[0], w_shape[0], *geom.out_size, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (grad_out, x, weight)] + [geom]


def input_terms(weight, geom) -> int:
    """Upper bound on the terms summed into one dX element: Cout/groups * kh * kw."""
    return weight.shape[0] // geom.groups * weight.shape[2] * weight.shape[3]


def weight_terms(grad_out) -> int:
    """Terms summed into one dW element: N * Ho * Wo."""
    return grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]


# Operands at the edges of eq. 5-6, where each gradient must still follow its formula (the float64
# reference's semantics): "infinite_and_huge" inputs, where clamp(W - X, -1, 1) is +-1 (and |X| >= 2**24,
# where X -+ 1 rounds to X in float32); "nan_in_padding_only", NaN weight taps that only ever meet the
# zero padding and NaN inputs that no tap reads, which must reach no input gradient (the padded taps
# contribute nothing, not 0 * NaN). Each: (x shape, weight shape, adder2d keyword arguments).
NONFINITE_CASES = {
    "infinite_and_huge": ((1, 2, 3, 3), (3, 2, 2, 2), dict(padding=1)),
    # stride 3 over 3 rows: the one output row reads rows -1, 0, 1, so kernel row 0 reads only the
    # padding and input row 2 is read by no tap.
    "nan_in_padding_only": ((1, 2, 3, 4), (4, 2, 3, 3), dict(stride=(3, 1), padding=1)),
}


def nonfinite_operands(case: str, device="cpu", seed=0):
    """(grad_out, x, weight, adder2d keyword arguments) of a NONFINITE_CASES entry, float32 on `device`."""
    x_shape, w_shape, kwargs = NONFINITE_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen)
    weight = torch.randn(w_shape, generator=gen) * 0.8
    if case == "infinite_and_huge":
        x[0, 0, 1, 1], x[0, 1, 0, 2], x[0, 0, 2, 0], x[0, 1, 2, 2] = -float("inf"), float("inf"), -3e9, 5e7
    else:
        weight[1, 0, 0, 1] = weight[3, 1, 0, 2] = float("nan")
        x[:, :, 2] = float("nan")
    out = [
        out_size(size, k, s, kwargs["padding"])
        for size, k, s in zip(x_shape[2:], w_shape[2:], kwargs.get("stride", (1, 1)), strict=True)
    ]
    grad_out = torch.randn(x_shape[0], w_shape[0], *out, generator=gen)
    return grad_out.to(device), x.to(device), weight.to(device), kwargs
