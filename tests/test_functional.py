"""The public layer: forward and both gradient modes against the float64 reference,
argument conventions of conv2d, layouts, errors, and torch.compile. Runs the CPU path (see conftest)."""

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import triton_adder
from tests import cases
from tests.tolerance import assert_matches_reference
from triton_adder import backends, reference
from triton_adder.backends import cpu
from triton_adder.functional import resolve_geometry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


# Every path a call can take: (backend, TRITON_ADDER_CPU_COMPILE, device). The Triton kernels run under
# the interpreter without CUDA (tests/conftest.py).
PATHS = {"cpu-eager": ("cpu", "0", "cpu"), "cpu-compiled": ("cpu", "1", "cpu"), "triton": ("triton", "1", DEVICE)}


@pytest.fixture(params=list(PATHS))
def path_device(request, monkeypatch):
    """Run the test on one path of `PATHS`; yields the device its tensors go on."""
    backend, compile_flag, device = PATHS[request.param]
    monkeypatch.setenv(cpu.COMPILE_ENV, compile_flag)
    if request.param == "cpu-compiled" and not cpu.compiler_enabled():
        pytest.skip("inductor is unavailable here")
    with backends.use_backend(backend):
        yield device


STRIDED_VIEWS = ["bias sliced", "bias expanded", "weight permuted", "weight sliced", "input expanded",
                 "grad_out transposed", "grad_out expanded"]  # fmt: skip


def _strided_operands(view: str, n, cin, h, w, cout, cg, k, device) -> dict:
    """x, weight, bias and grad_out (padding 1: Ho, Wo = H, W) on `device`, one of them the view `view`,
    whose strides are not the contiguous ones (a step, a permutation, stride 0)."""
    operands = {
        "x": torch.randn(n, cin, h, w, device=device),
        "weight": torch.randn(cout, cg, k, k, device=device),
        "bias": torch.randn(cout, device=device),
        "grad_out": torch.randn(n, cout, h, w, device=device),
    }
    views = {
        "bias sliced": ("bias", lambda: torch.randn(2 * cout, device=device)[1::2]),
        "bias expanded": ("bias", lambda: torch.randn(1, device=device).expand(cout)),
        "weight permuted": ("weight", lambda: torch.randn(cout, k, k, cg, device=device).permute(0, 3, 1, 2)),
        "weight sliced": ("weight", lambda: torch.randn(cout, 2 * cg, k, k, device=device)[:, ::2]),
        "input expanded": ("x", lambda: torch.randn(n, cin, 1, w, device=device).expand(n, cin, h, w)),
        "grad_out transposed": ("grad_out", lambda: torch.randn(n, cout, w, h, device=device).transpose(2, 3)),
        "grad_out expanded": ("grad_out", lambda: torch.randn(1, cout, 1, 1, device=device).expand(n, cout, h, w)),
    }
    name, make = views[view]
    operands[name] = make()
    assert not operands[name].is_contiguous()
    return operands


@pytest.mark.parametrize("view", STRIDED_VIEWS)
def test_strided_operands_follow_their_strides(view, path_device):
    """Each operand as a view with non-contiguous strides, forward and both gradient modes on every path,
    against the reference on the same values (issue 28: the forward kernel read bias[t] at bias_ptr + t)."""
    torch.manual_seed(0)
    n, cin, h, w, cout, k, groups = 2, 4, 5, 6, 6, 3, 2
    cg = cin // groups
    operands = _strided_operands(view, n, cin, h, w, cout, cg, k, path_device)
    x, weight, bias = (operands[key].detach().requires_grad_() for key in ("x", "weight", "bias"))
    grad_out = operands["grad_out"]
    geom = resolve_geometry((h, w), (k, k), padding=1, groups=groups)
    expected_y = reference.adder2d_forward(x.detach(), weight.detach(), bias.detach(), geom)
    for grad_mode in ("paper", "exact"):
        y = triton_adder.adder2d(x, weight, bias, padding=1, groups=groups, grad_mode=grad_mode)
        grad_x, grad_w, grad_b = torch.autograd.grad(y, (x, weight, bias), grad_out)
        expected_x, expected_w = reference.adder2d_backward(grad_out, x.detach(), weight.detach(), geom, grad_mode)
        assert_matches_reference(y, expected_y, torch.float32, cg * k * k)
        assert_matches_reference(grad_x, expected_x, torch.float32, cout // groups * k * k)
        assert_matches_reference(grad_w, expected_w, torch.float32, n * h * w)
        assert_matches_reference(grad_b, grad_out.double().sum(dim=(0, 2, 3)), torch.float32, n * h * w)


def _jvp(f, x, v):
    return torch.func.jvp(f, (x,), (v,))[1]


def _jacfwd(f, x, v):
    return torch.func.jacfwd(f)(x)


def _forward_ad(f, x, v, requires_grad=False):
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x.requires_grad_(requires_grad), v))).tangent


FORWARD_AD = {
    "torch.func.jvp": _jvp,
    "torch.func.jacfwd": _jacfwd,
    "forward_ad": _forward_ad,
    "forward_ad, requires_grad": lambda f, x, v: _forward_ad(f, x, v, requires_grad=True),
}


@pytest.mark.parametrize("wrt", ["input", "weight", "bias"])
@pytest.mark.parametrize("transform", list(FORWARD_AD))
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(transform, wrt):
    """The op has no forward-mode formula: a tangent reaching it is refused, never silently dropped (issue 28:
    torch.func.jvp gave a zero tangent, forward_ad None)."""
    operands = {"input": torch.randn(1, 2, 4, 4), "weight": torch.randn(3, 2, 3, 3), "bias": torch.randn(3)}

    def f(operand):
        return triton_adder.adder2d(**{**operands, wrt: operand})

    message = f"does not support forward-mode AD .*: {wrt} carries a forward-mode tangent"
    with pytest.raises(NotImplementedError, match=message):
        FORWARD_AD[transform](f, operands[wrt], torch.randn_like(operands[wrt]))


def test_forward_mode_ad_of_a_dual_cotangent_raises():
    """Forward-over-reverse: a tangent on the gradient that reaches the backward ops is refused too."""
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    y = triton_adder.adder2d(x, torch.randn(3, 2, 3, 3))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="grad_out carries a forward-mode tangent"):
        torch.autograd.grad(y, x, fwAD.make_dual(torch.randn_like(y), torch.randn_like(y)))


def test_forward_mode_ad_around_the_op_still_works():
    """Inside a dual level, a call whose operands carry no tangent runs: the tangent of the rest is exact."""
    x, weight, a, v = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    _, tangent = torch.func.jvp(lambda a: triton_adder.adder2d(x, weight) * a, (a,), (v,))
    torch.testing.assert_close(tangent, triton_adder.adder2d(x, weight) * v)


@pytest.mark.parametrize("case", list(cases.NONFINITE_CASES))
def test_gradients_follow_their_formulas_at_nonfinite_operands(case, path_device):
    """Infinite and huge inputs (paper mode's clamp(W - X, -1, 1) is +-1 there: it gave NaN at X = -inf and
    -1 for +1 at X = -3e9 on the CPU paths), and NaN that only the padding meets (a weight tap that reads no
    input, an input no tap reads: 0 * NaN gave NaN input gradients), in both modes, on every path."""
    grad_out, x, weight, kwargs = cases.nonfinite_operands(case, path_device)
    geom = resolve_geometry(tuple(x.shape[2:]), tuple(weight.shape[2:]), **kwargs)
    x.requires_grad_()
    weight.requires_grad_()
    for grad_mode in ("paper", "exact"):
        y = triton_adder.adder2d(x, weight, grad_mode=grad_mode, **kwargs)
        grad_x, grad_w = torch.autograd.grad(y, (x, weight), grad_out)
        # on the CPU, where torch.sign(NaN) is 0 (the kernels' sign follows it)
        operands = (grad_out.cpu(), x.detach().cpu(), weight.detach().cpu())
        expected_x, expected_w = reference.adder2d_backward(*operands, geom, grad_mode)
        assert expected_x.isfinite().all(), "the formula is finite for every input element here"
        assert_matches_reference(grad_x, expected_x, torch.float32, weight.shape[0] * weight.shape[2] * weight.shape[3])
        # eq. 5 is legitimately infinite (or NaN, at a NaN weight) where X is infinite: the same values
        assert_matches_reference(grad_w, expected_w, torch.float32, grad_out[0, 0].numel(), equal_nan=True)


# ---- hostile arguments: clear errors that name the argument, before any allocation ----


@pytest.mark.parametrize(
    "arguments, name",
    [({"padding": 2**62}, "padding"), ({"stride": 2**63}, "stride"), ({"dilation": (1, 2**40)}, "dilation"),
     ({"stride": (2**31, 1)}, "stride")],
)  # fmt: skip
def test_huge_geometry_integers_are_refused_by_name(arguments, name):
    with pytest.raises(ValueError, match=rf"^{name} must be an int or a pair of ints in \["):
        triton_adder.adder2d(torch.zeros(1, 1, 3, 3), torch.zeros(2, 1, 2, 2), **arguments)


def test_geometry_whose_padded_input_dwarfs_the_input_is_refused_before_allocating():
    # conv2d gives a 1x1 output here; the padded input would be (2**20 + 1)**2 elements (4 TiB).
    x, weight = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 2, 2)
    assert F.conv2d(x, weight, padding=2**19, dilation=2**20).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"padding \(524288, 524288\) with dilation \(1048576, 1048576\)"):
        triton_adder.adder2d(x, weight, padding=2**19, dilation=2**20)


@pytest.mark.parametrize("operand", ["input", "weight", "bias"])
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_non_strided_layouts_are_refused_by_name(operand, layout):
    tensors = {"input": torch.randn(1, 2, 3, 3), "weight": torch.randn(2, 2, 2, 2), "bias": torch.randn(2)}
    dense = tensors[operand]
    # CSR is 2-d: a 4-d CSR tensor is batched over its first dimensions, a 1-d bias gets none.
    if layout == "sparse_csr" and operand == "bias":
        pytest.skip("a 1-d tensor has no CSR form")
    tensors[operand] = dense.to_sparse() if layout == "sparse_coo" else dense.to_sparse_csr(dense_dim=None)
    with pytest.raises(TypeError, match=rf"^{operand} must be a dense \(torch.strided\) tensor, got layout"):
        triton_adder.adder2d(tensors["input"], tensors["weight"], tensors["bias"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "lots"])
def test_memory_budget_variable_is_validated_by_name(value, monkeypatch):
    monkeypatch.setenv(cpu.MEMORY_BUDGET_ENV, value)
    with pytest.raises(ValueError, match=rf"^{cpu.MEMORY_BUDGET_ENV} must be a positive, finite number of megabytes"):
        cpu.common.memory_budget_bytes()
