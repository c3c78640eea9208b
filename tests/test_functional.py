"""The public layer: forward and both gradient modes against the float64 reference,
argument conventions of conv2d, layouts, errors, and torch.compile. Runs the CPU path (see conftest)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import triton_adder
from tests import cases
from tests.tolerance import assert_matches_reference
from triton_adder import backends, reference
from triton_adder.functional import resolve_geometry


def _expected(x, weight, b, kwargs):
    geom = resolve_geometry(tuple(x.shape[-2:]), tuple(weight.shape[2:]), **kwargs)
    return reference.adder2d_forward(x, weight, b, geom), geom


def _reduction_length(weight):
    return weight.shape[1] * weight.shape[2] * weight.shape[3]


@pytest.mark.parametrize("case", cases.FORWARD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_reference(case, dtype):
    x, weight, b, kwargs = cases.forward_inputs(case, dtype)
    expected, _ = _expected(x, weight, b, kwargs)
    y = triton_adder.adder2d(x, weight, b, **kwargs)
    assert y.dtype == dtype
    assert_matches_reference(y, expected, dtype, _reduction_length(weight))


def test_output_size_matches_conv2d():
    for case in cases.FORWARD_CASES:
        x, weight, b, kwargs = cases.forward_inputs(case)
        assert triton_adder.adder2d(x, weight, b, **kwargs).shape == F.conv2d(x, weight, b, **kwargs).shape


def test_padded_taps_contribute_minus_abs_weight():
    # 1x1 input, 3x3 kernel, padding 1: eight taps read zeros, one reads x.
    x = torch.tensor([[[[2.0]]]])
    weight = torch.arange(9.0).reshape(1, 1, 3, 3) - 4
    y = triton_adder.adder2d(x, weight, padding=1)
    expected = -(weight.abs().sum() - weight[0, 0, 1, 1].abs() + (2.0 - weight[0, 0, 1, 1]).abs())
    assert y.item() == pytest.approx(expected.item())


def test_unbatched_and_batch_of_one():
    x, weight, b, kwargs = cases.forward_inputs(cases.FORWARD_CASES[1])
    batched = triton_adder.adder2d(x[:1], weight, b, **kwargs)
    unbatched = triton_adder.adder2d(x[0], weight, b, **kwargs)
    assert unbatched.shape == batched.shape[1:]
    torch.testing.assert_close(unbatched, batched[0])


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_layouts_give_same_result(layout):
    x, weight, b, kwargs = cases.forward_inputs(cases.FORWARD_CASES[1])
    expected = triton_adder.adder2d(x, weight, b, **kwargs)
    if layout == "channels_last":
        x_layout = x.contiguous(memory_format=torch.channels_last)
    else:  # every other column of a wider tensor: strides no kernel can assume
        x_layout = torch.randn(*x.shape[:3], 2 * x.shape[3])[..., ::2]
        x_layout.copy_(x)
        assert not x_layout.is_contiguous()
    y = triton_adder.adder2d(x_layout, weight, b, **kwargs)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch_returns_empty_output():
    x, weight, b, kwargs = cases.forward_inputs(cases.FORWARD_CASES[1])
    x = x[:0].requires_grad_()
    y = triton_adder.adder2d(x, weight, b, **kwargs)
    assert y.shape == F.conv2d(x, weight, b, **kwargs).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("case", cases.FORWARD_CASES)
@pytest.mark.parametrize("grad_mode", ["paper", "exact"])
def test_gradients_match_formulas(case, grad_mode):
    x, weight, b, kwargs = cases.forward_inputs(case, seed=1)
    x.requires_grad_()
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    y = triton_adder.adder2d(x, weight, b, grad_mode=grad_mode, **kwargs)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    geom = resolve_geometry(tuple(x.shape[-2:]), tuple(weight.shape[2:]), **kwargs)
    grad_x, grad_w = reference.adder2d_backward(grad_out, x.detach(), weight.detach(), geom, grad_mode)
    cout, _, kh, kw = weight.shape
    n = x.shape[0]
    assert_matches_reference(x.grad, grad_x, torch.float32, cout // kwargs["groups"] * kh * kw)
    assert_matches_reference(weight.grad, grad_w, torch.float32, n * geom.out_size[0] * geom.out_size[1])
    if b is not None:
        torch.testing.assert_close(b.grad, grad_out.sum(dim=(0, 2, 3)))


def test_exact_mode_is_autograd_of_reference():
    # Independent of the hand-written backward formulas: autograd through the float64 reference.
    x, weight, b, kwargs = cases.forward_inputs(cases.FORWARD_CASES[2], seed=2)
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    geom = resolve_geometry(tuple(x.shape[-2:]), tuple(weight.shape[2:]), **kwargs)
    out = reference.adder2d_forward(x64, w64, None, geom)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x32, w32 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    triton_adder.adder2d(x32, w32, grad_mode="exact", **kwargs).backward(grad_out.float())
    assert_matches_reference(x32.grad, x64.grad, torch.float32, weight.shape[0] * 6)
    assert_matches_reference(w32.grad, w64.grad, torch.float32, x.shape[0] * geom.out_size[0] * geom.out_size[1])


def test_gradients_of_low_precision_inputs_keep_dtype():
    x, weight, b, kwargs = cases.forward_inputs(cases.FORWARD_CASES[0], torch.float16)
    x.requires_grad_()
    weight.requires_grad_()
    triton_adder.adder2d(x, weight, **kwargs).sum().backward()
    assert x.grad.dtype == torch.float16 and weight.grad.dtype == torch.float16


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        triton_adder.Adder2d(4, 6, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
    )
    x = torch.randn(2, 3, 9, 9)
    eager = model(x)
    eager.sum().backward()
    eager_grad = model[2].weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model[2].weight.grad, eager_grad, rtol=1e-5, atol=1e-4)


def test_module_matches_functional_and_reprs():
    layer = triton_adder.Adder2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    assert "4, 6, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2" in repr(layer)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(layer(x), triton_adder.adder2d(x, layer.weight, layer.bias, 2, 1, 1, 2))
    assert layer.weight.shape == (6, 2, 3, 3) and layer.bias.shape == (6,)


def test_reset_parameters_draws_standard_normal_weights():
    torch.manual_seed(0)
    layer = triton_adder.Adder2d(64, 64, 3)
    # 36,864 draws: the sample std of N(0, 1) is within 0.02 of 1 with overwhelming probability.
    assert abs(layer.weight.std().item() - 1.0) < 0.02 and abs(layer.weight.mean().item()) < 0.02
    assert triton_adder.Adder2d(2, 2, 1, bias=True).bias.abs().sum() == 0


def test_module_dtype_and_same_padding():
    layer = triton_adder.Adder2d(3, 5, (2, 4), padding="same", dtype=torch.float64)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 5, 6, 7) and y.dtype == torch.float64
    expected, _ = _expected(x, layer.weight.detach(), None, dict(padding="same"))
    assert_matches_reference(y, expected, torch.float64, 24)


ERRORS = [
    (lambda x, w: triton_adder.adder2d(x[0, 0], w), ValueError, "input must be a 3-d"),
    (lambda x, w: triton_adder.adder2d(x, w[0]), ValueError, "weight must be a 4-d"),
    (lambda x, w: triton_adder.adder2d(x[:, :3], w), ValueError, "input has 3 channels"),
    (lambda x, w: triton_adder.adder2d(x, w[:, :2], groups=3), ValueError, "groups \\(3\\) must divide"),
    (lambda x, w: triton_adder.adder2d(x, w.double()), TypeError, "weight dtype"),
    (lambda x, w: triton_adder.adder2d(x.int(), w), TypeError, "input dtype must be one of"),
    (lambda x, w: triton_adder.adder2d(x, w.to("meta")), ValueError, "weight is on meta"),
    (lambda x, w: triton_adder.adder2d(x[..., :2, :2], w), ValueError, "larger than the padded input"),
    (lambda x, w: triton_adder.adder2d(x, w, grad_mode="sign"), ValueError, "grad_mode must be one of"),
    (lambda x, w: triton_adder.adder2d(x, w, stride=0), ValueError, "stride must be"),
    (lambda x, w: triton_adder.adder2d(x, w, padding="full"), ValueError, "padding must be"),
    (lambda x, w: triton_adder.adder2d(x, w, padding="same", stride=2), ValueError, "padding='same'"),
    (lambda x, w: triton_adder.adder2d(x, w, dilation=(1, 2, 3)), ValueError, "dilation must be"),
    (lambda x, w: triton_adder.adder2d(x, w, torch.zeros(3)), ValueError, "bias must be None or"),
    (lambda x, w: triton_adder.adder2d(x, w[..., :0]), ValueError, "weight kernel size must be at least 1x1"),
    (lambda x, w: triton_adder.adder2d(x[..., :0, :], w, padding=2), ValueError, "input height and width"),
    (lambda x, w: triton_adder.adder2d(x, w, stride=True), ValueError, "stride must be"),
    (lambda x, w: triton_adder.adder2d(x, w, groups=1.0), ValueError, "groups must be a positive int"),
    (lambda x, w: triton_adder.Adder2d(4, 4, 3, padding_mode="reflect"), ValueError, "padding_mode must be 'zeros'"),
    (lambda x, w: triton_adder.Adder2d(4, 6, 3, groups=4), ValueError, "groups \\(4\\) must divide"),
    (lambda x, w: triton_adder.Adder2d(4, 6, 3, grad_mode="sign"), ValueError, "grad_mode must be one of"),
]


@pytest.mark.parametrize("call, error, message", ERRORS)
def test_bad_arguments_raise_clear_errors(call, error, message):
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(error, match=message):
        call(x, w)


def test_integer_like_arguments_are_accepted_as_conv2d_accepts_them():
    x, w = torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3)
    expected = triton_adder.adder2d(x, w, stride=2, padding=1)
    for stride in (np.int64(2), (2,), torch.tensor(2), torch.Size([2, 2])):
        torch.testing.assert_close(triton_adder.adder2d(x, w, stride=stride, padding=(1,)), expected)
    layer = triton_adder.Adder2d(np.int64(4), 6, (3,), groups=np.int64(1))
    assert layer.weight.shape == (6, 4, 3, 3) and type(layer.in_channels) is int


def test_double_backward_raises_a_clear_error():
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    (grad_x,) = torch.autograd.grad(triton_adder.adder2d(x, torch.randn(6, 4, 3, 3)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize("case", [cases.FORWARD_CASES[1], cases.FORWARD_CASES[3]])
def test_triton_backend_through_the_op(case):
    """The op's Triton backend (kernels + config lookup), forward and paper gradients, vs the reference."""
    x, weight, b, kwargs = cases.forward_inputs(case, seed=3)
    x.requires_grad_()
    weight.requires_grad_()
    with backends.use_backend("triton"):
        y = triton_adder.adder2d(x, weight, b, **kwargs)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    expected, geom = _expected(x.detach(), weight.detach(), b, kwargs)
    grad_x, grad_w = reference.adder2d_backward(grad_out, x.detach(), weight.detach(), geom)
    assert_matches_reference(y, expected, torch.float32, _reduction_length(weight))
    cout, _, kh, kw = weight.shape
    assert_matches_reference(x.grad, grad_x, torch.float32, cout // kwargs["groups"] * kh * kw)
    assert_matches_reference(weight.grad, grad_w, torch.float32, x.shape[0] * geom.out_size[0] * geom.out_size[1])


@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("groups", [1, 2])
def test_output_can_be_modified_in_place(monkeypatch, compiled, groups):
    # Models apply ReLU(inplace=True) straight after a convolution (timm's squeeze-excite blocks);
    # autograd refuses that on a custom op's output if it is a view, as the CPU eager path's was.
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", compiled)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    y = triton_adder.adder2d(x, weight, groups=groups, padding=1)
    geom = resolve_geometry(x.shape[2:], weight.shape[2:], padding=1, groups=groups)
    expected = reference.adder2d_forward(x.detach(), weight.detach(), None, geom).relu()
    y.relu_().sum().backward()
    torch.testing.assert_close(y.detach(), expected)
    assert x.grad is not None and weight.grad is not None
