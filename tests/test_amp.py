"""Mixed precision: the adder op under `torch.autocast` and with `torch.amp.GradScaler` (CPU path).

Tolerances: `triton_adder.tolerance`'s bfloat16 row, against the float64 reference on the
float32 operands. That row assumes the reference sees the bfloat16 values; here autocast also
rounds x and w to bfloat16 (relative 2^-9 each), which moves one term |x - w| by at most
2^-9 (|x| + |w|), about 3e-3 for N(0, 1) operands, and a gradient term gY * clamp(W - X) by about
2^-9 |gY| (1 + |x| + |w|), about 5e-3: both inside the row's 8e-3 per term. A computation that
accumulated in bfloat16 would be off by ~2^-9 per partial sum, R times over, and fail.
"""

import pytest
import torch
from torch import nn

from tests.cases import gradient_operands, input_terms, weight_terms
from tests.tolerance import assert_matches_reference
from triton_adder import Adder2d, adaptive_lr_, reference
from triton_adder.backends import use_backend

CASES = ["3x3_pad1", "stride2_groups2", "asymmetric_dilated"]


def _layer(weight, geom):
    cout, cg, kh, kw = weight.shape
    layer = Adder2d(
        cg * geom.groups,
        cout,
        (kh, kw),
        stride=geom.stride,
        padding=geom.padding,
        dilation=geom.dilation,
        groups=geom.groups,
    )
    layer.weight.data.copy_(weight)
    return layer


def _autocast_step(layer, x, grad_out, compiled: bool):
    """Forward under bfloat16 autocast, backward of <y, grad_out> outside it; returns y, dx, dW."""
    x = x.clone().requires_grad_()
    forward = torch.compile(layer, fullgraph=True) if compiled else layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = forward(x)
    (y.float() * grad_out).sum().backward()
    return y, x.grad, layer.weight.grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_autocast_matches_float64_reference(case, compiled):
    grad_out, x, weight, geom = gradient_operands(case)
    layer = _layer(weight, geom)
    with use_backend("cpu"):
        y, grad_x, grad_w = _autocast_step(layer, x, grad_out, compiled)
    # The op ran in the autocast dtype; gradients come back in the tensors' own dtype.
    assert y.dtype == torch.bfloat16
    assert grad_x.dtype == torch.float32 and grad_w.dtype == torch.float32
    expected_y = reference.adder2d_forward(x.double(), weight.double(), None, geom)
    # autocast hands the backward a bfloat16 grad_out: the reference sees that rounding too.
    expected_dx, expected_dw = reference.adder2d_backward(grad_out.bfloat16(), x.double(), weight.double(), geom)
    reduction = weight.shape[1] * weight.shape[2] * weight.shape[3]
    assert_matches_reference(y, expected_y, torch.bfloat16, reduction)
    assert_matches_reference(grad_x, expected_dx, torch.bfloat16, input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_dw, torch.bfloat16, weight_terms(grad_out))


def test_multiplicative_layer_then_adder_under_autocast():
    """The reported failure: conv2d returns bfloat16 under autocast and the adder's float32 weight must follow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Adder2d(4, 5, 3, stride=2), nn.Flatten())
    x = torch.randn(2, 3, 9, 7)
    with use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    with use_backend("cpu"):
        y.float().sum().backward()
        expected = model(x)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(y.float(), expected, **{"atol": 8e-3 * 36, "rtol": 8e-3})


def test_float64_is_not_cast_by_autocast():
    """autocast leaves float64 alone (as for conv2d), so a float64 adder stays exact."""
    _, x, weight, geom = gradient_operands("3x3_pad1", dtype=torch.float64)
    layer = _layer(weight, geom).double()
    with use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    assert_matches_reference(y, reference.adder2d_forward(x, weight, None, geom), torch.float64, 45)


def _train_steps(use_scaler: bool, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        Adder2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        Adder2d(6, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 2, 5),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    # A power-of-two scale keeps scaling and unscaling exact, so the two runs must agree to rounding.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
    gen = torch.Generator().manual_seed(2)
    with use_backend("cpu"):
        for _ in range(steps):
            x, target = torch.randn(4, 3, 8, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # adaptive_lr_ must see the unscaled gradient
            adaptive_lr_(model, eta=0.1)
            scaler.step(optimizer)
            scaler.update()
    return [p.detach().clone() for p in model.parameters()]


def test_grad_scaler_with_adaptive_lr_matches_unscaled_step():
    scaled, plain = _train_steps(use_scaler=True), _train_steps(use_scaler=False)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # The steps moved the weights (the comparison is not between two untouched initialisations).
    torch.manual_seed(1)
    initial = Adder2d(3, 6, 3, padding=1).weight
    assert (scaled[0] - initial).abs().max() > 1e-3
