"""Triton gradient kernels (triton_adder.kernels.grad_input, .grad_weight) against the float64 reference.

Runs under the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so shapes are tiny and odd (masking bugs cannot hide behind powers of two) and configs are
16 x 16 x 4. Every case reaches both gradients in both grad modes; the geometry grid
(tests/cases.py GRADIENT_CASES) covers stride, padding (including padding beyond what the taps
need, and taps that never reach the last rows), dilation, groups, non-square kernels and an
implied bottom/right padding. The convolution identity and the backend's method policy are in
tests/test_conv_identity.py.
"""

import pytest
import torch

from tests.cases import GRADIENT_CASES as CASES
from tests.cases import NONFINITE_CASES, gradient_operands, input_terms, layer_case, nonfinite_operands, weight_terms
from tests.tolerance import assert_matches_reference
from triton_adder import backends, functional
from triton_adder.contract import GRAD_MODES, needs_int64_indexing
from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels import grad_input as gi
from triton_adder.kernels import grad_weight as gw
from triton_adder.kernels.gradients import check_operands
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.reference import adder2d_backward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = KernelConfig(16, 16, 4, num_warps=4, num_stages=1)


def _operands(case, dtype=torch.float32, seed=0):
    return gradient_operands(case, dtype, seed, DEVICE)


_input_terms = input_terms
_weight_terms = weight_terms


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_grad_input_matches_reference(case, grad_mode):
    grad_out, x, weight, geom = _operands(case)
    expected, _ = adder2d_backward(grad_out, x, weight, geom, grad_mode)
    actual = gi.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
    assert actual.dtype == x.dtype
    assert_matches_reference(actual, expected, torch.float32, _input_terms(weight, geom))


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_grad_weight_matches_reference(case, grad_mode):
    grad_out, x, weight, geom = _operands(case)
    _, expected = adder2d_backward(grad_out, x, weight, geom, grad_mode)
    # split_k=2: the two-pass split reduction is exercised on every case.
    kernel = gw.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, split_k=2)
    assert kernel.dtype == weight.dtype and kernel.is_contiguous()
    assert_matches_reference(kernel, expected, torch.float32, _weight_terms(grad_out))


def test_split_counts_agree_and_are_deterministic():
    grad_out, x, weight, geom = _operands("asymmetric_dilated", seed=2)
    _, expected = adder2d_backward(grad_out, x, weight, geom, "paper")
    results = {}
    for split_k in (1, 3, 1000):  # 1000 is clamped to one BLOCK_K of steps per split
        results[split_k] = gw.grad_weight(grad_out, x, weight, geom, "paper", SMALL, split_k)
        assert_matches_reference(results[split_k], expected, torch.float32, _weight_terms(grad_out))
    again = gw.grad_weight(grad_out, x, weight, geom, "paper", SMALL, 3)
    assert torch.equal(again, results[3]), "the split reduction must be bitwise reproducible"


def test_non_contiguous_grad_out_and_channels_last_x():
    grad_out, x, weight, geom = _operands("stride2_groups2", seed=3)
    # gY as a strided view (every other element of a wider buffer) and x stored channels_last.
    wide = torch.zeros(*grad_out.shape[:3], 2 * grad_out.shape[3], device=DEVICE)
    wide[..., ::2] = grad_out
    strided_grad_out = wide[..., ::2]
    assert not strided_grad_out.is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")
    grad_x = gi.grad_input(strided_grad_out, x_cl, weight, geom, "paper", SMALL)
    grad_w = gw.grad_weight(strided_grad_out, x_cl, weight, geom, "paper", SMALL, 2)
    assert grad_x.is_contiguous(memory_format=torch.channels_last), "grad_x keeps x's memory format"
    assert_matches_reference(grad_x, expected_x, torch.float32, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float32, _weight_terms(grad_out))


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_float16_inputs(grad_mode):
    """float16 operands: float32 accumulation, float16 results, within the float16 row of the table."""
    grad_out, x, weight, geom = _operands("3x3_pad1", dtype=torch.float16, seed=4)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, grad_mode)  # on the float16 values
    grad_x = gi.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
    grad_w = gw.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, 2)
    assert grad_x.dtype == torch.float16 and grad_w.dtype == torch.float16
    assert_matches_reference(grad_x, expected_x, torch.float16, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float16, _weight_terms(grad_out))


def test_float64_inputs_accumulate_in_float64():
    grad_out, x, weight, geom = _operands("asymmetric_dilated", dtype=torch.float64, seed=5)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")
    grad_x = gi.grad_input(grad_out, x, weight, geom, "paper", SMALL)
    grad_w = gw.grad_weight(grad_out, x, weight, geom, "paper", SMALL, 2)
    assert_matches_reference(grad_x, expected_x, torch.float64, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float64, _weight_terms(grad_out))


def test_clamp_boundaries_and_sign_at_zero():
    """|W - X| exactly 1, exactly 0, and far beyond: the clamp and sign edges of eq. 6 and the exact mode."""
    geom = Conv2dGeometry((1, 1), (0, 0), (1, 1), 1, (2, 3))
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, 3.0, -2.5, 0.25, 1.5, -0.5, 2.0, 0.0, -3.0]).reshape(1, 1, 3, 4)
    weight = torch.tensor([[[[0.0, 0.5], [1.5, -1.0]]], [[[1.0, -1.0], [0.5, 0.25]]]])
    grad_out = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.25, -0.5, 1.5, 1.0, -1.5, 2.5]).reshape(1, 2, 2, 3)
    x, weight, grad_out = x.to(DEVICE), weight.to(DEVICE), grad_out.to(DEVICE)
    for grad_mode in GRAD_MODES:
        expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, grad_mode)
        grad_x = gi.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
        grad_w = gw.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, 1)
        assert_matches_reference(grad_x, expected_x, torch.float32, 8)
        assert_matches_reference(grad_w, expected_w, torch.float32, 6)


def test_default_configs():
    grad_out, x, weight, geom = _operands("stride2_groups2", seed=6)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "exact")
    # config=None: the heuristic defaults.
    assert_matches_reference(
        gi.grad_input(grad_out, x, weight, geom, "exact"), expected_x, torch.float32, _input_terms(weight, geom)
    )
    assert_matches_reference(
        gw.grad_weight(grad_out, x, weight, geom, "exact"), expected_w, torch.float32, _weight_terms(grad_out)
    )
    for device_type in ("cuda", "cpu"):
        for default_of in (gi.default_grad_input_config, gw.default_grad_weight_config):
            default_of((64, 256, 28, 28), (256, 256, 3, 3), geom, device_type).validate()


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", ["depthwise_stride2_pad2", "narrow_w16"])
def test_gpu_narrow_layer_defaults_compute_the_gradient(case, grad_mode):
    """The GPU defaults' branches (depthwise: 1 channel per program; more than 16 channels: 32 x 32 x 2
    on one warp) run under the interpreter on odd shapes."""
    cases = {**CASES, "narrow_w16": layer_case(1, 20, 3, 16, 7, (3, 3), padding=(1, 1))}
    x_shape, w_shape, geom = cases[case]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(x_shape, generator=gen).to(DEVICE)
    weight = (torch.randn(w_shape, generator=gen) * 0.8).to(DEVICE)
    grad_out = torch.randn(x_shape[0], w_shape[0], *geom.out_size, generator=gen).to(DEVICE)
    config = gi.default_grad_input_config(x_shape, w_shape, geom, "cuda")
    expected = {"depthwise_stride2_pad2": (1024, 1, 1, 4), "narrow_w16": (32, 32, 2, 1)}[case]
    assert (config.block_m, config.block_n, config.block_k, config.num_warps) == expected
    expected_x, _ = adder2d_backward(grad_out, x, weight, geom, grad_mode)
    actual = gi.grad_input(grad_out, x, weight, geom, grad_mode, config)
    assert_matches_reference(actual, expected_x, torch.float32, _input_terms(weight, geom))


def test_grad_input_launch_reads_the_weight_with_input_channels_contiguous():
    # grad_input tiles input channels: each step loads BLOCK_N of them for one (output channel, tap), so
    # the launcher passes a (Cout, kh, kw, Cg)-stored copy whose Cg stride is 1 (Triton specialises it).
    grad_out, x, weight, geom = _operands("stride2_groups2")
    _, args, _ = gi.grad_input_launch(grad_out, x, weight, torch.empty_like(x), geom, "paper", SMALL)
    launched = args[2]
    assert launched.shape == weight.shape and torch.equal(launched, weight)
    cout, cg, kh, kw = weight.shape
    assert launched.stride() == (kh * kw * cg, 1, kw * cg, cg)
    assert args[25:29] == launched.stride()  # the kernel's sw_t, sw_k, sw_i, sw_j
    assert gi.input_channels_contiguous(launched).data_ptr() == launched.data_ptr()


@pytest.mark.parametrize(
    "cg, stride, w, expected",
    [(64, 1, 56, (32, 32, 2, 1)), (128, 2, 28, (32, 32, 2, 1)), (32, 1, 16, (32, 32, 2, 1)),
     (32, 1, 15, (32, 32, 2, 1)), (16, 1, 32, (128, 16, 4, 2)), (8, 1, 32, (128, 16, 4, 2))],
)  # fmt: skip
def test_grad_input_default_is_the_screened_spill_free_config(cg, stride, w, expected):
    # The one config with no LDL/STL and no SHFL under Triton 3.6 and 3.9, sm_80 and sm_90, on the
    # screened ResNet layers (default_grad_input_config's docstring): W's width and the stride no longer
    # pick a different tile (64 x 32 x 2 on one warp had 8 SHFL in the loop under both versions).
    geom = Conv2dGeometry((stride, stride), (1, 1), (1, 1), 1, (w // stride, w // stride))
    config = gi.default_grad_input_config((32, cg, w, w), (2 * cg, cg, 3, 3), geom, "cuda")
    assert (config.block_m, config.block_n, config.block_k, config.num_warps) == expected


def test_argument_errors_name_the_argument():
    grad_out, x, weight, geom = _operands("3x3_pad1")
    with pytest.raises(ValueError, match="grad_mode"):
        gi.grad_input(grad_out, x, weight, geom, "hardtanh", SMALL)
    with pytest.raises(ValueError, match="grad_mode"):
        gw.grad_weight(grad_out, x, weight, geom, "hardtanh", SMALL)
    with pytest.raises(ValueError, match="config.block_m"):
        gi.grad_input(grad_out, x, weight, geom, "paper", KernelConfig(24, 16, 4))
    with pytest.raises(ValueError, match="config must be a KernelConfig"):
        gw.grad_weight(grad_out, x, weight, geom, "paper", {"block_m": 16})
    with pytest.raises(ValueError, match="split_k"):
        gw.grad_weight(grad_out, x, weight, geom, "paper", SMALL, split_k=0)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        gi.grad_input(grad_out[:, :, :-1], x, weight, geom, "paper", SMALL)


def test_int32_limit_is_refused_by_name():
    """The gradient kernels have no int64 path: an operand reaching contract.INT32_LIMIT is refused by
    name, at the threshold where the forward switches to int64 indexing (meta tensors: no memory)."""
    geom = Conv2dGeometry((1, 1), (0, 0), (1, 1), 1, (1, 1))
    weight = torch.empty(1, 1, 1, 1, device="meta")
    grad_out = torch.empty(2, 1, 1, 1, device="meta")
    reaching = torch.empty(2, 1, 1, 1, device="meta").as_strided((2, 1, 1, 1), (2**31, 1, 1, 1))
    fitting = torch.empty(2, 1, 1, 1, device="meta").as_strided((2, 1, 1, 1), (2**31 - 1, 1, 1, 1))
    assert needs_int64_indexing(reaching) and not needs_int64_indexing(fitting)
    check_operands(grad_out, fitting, weight, geom)
    with pytest.raises(ValueError, match=r"^x spans 2147483649 elements; .* fewer than 2147483648"):
        gi.grad_input(grad_out, reaching, weight, geom, "paper", SMALL)
    with pytest.raises(ValueError, match=r"^grad_out spans"):
        gw.grad_weight(reaching, fitting, weight, geom, "paper", SMALL)


def test_kernel_hashes_identify_the_sources():
    for digest in (gi.GRAD_INPUT_KERNEL_HASH, gw.GRAD_WEIGHT_KERNEL_HASH):
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert gi.GRAD_INPUT_KERNEL_HASH != gw.GRAD_WEIGHT_KERNEL_HASH


def test_accumulates_into_existing_grad_through_the_op():
    """Through triton_adder.adder2d on the Triton backend: .grad accumulates, forward and backward."""
    grad_out, x, weight, geom = _operands("3x3_pad1", seed=7)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    previous_x = torch.full_like(x, 0.5)
    previous_w = torch.linspace(-1, 1, weight.numel(), device=DEVICE).reshape(weight.shape)
    x.grad, weight.grad = previous_x.clone(), previous_w.clone()
    with backends.use_backend("triton"):
        y = functional.adder2d(x, weight, None, stride=1, padding=1)
        y.backward(grad_out)
    assert_matches_reference(x.grad, expected_x + previous_x.double(), torch.float32, _input_terms(weight, geom))
    assert_matches_reference(weight.grad, expected_w + previous_w.double(), torch.float32, _weight_terms(grad_out))


def _strided(view: str, grad_out, x, weight):
    """(grad_out, x, weight) with one of them replaced by a view of the same values whose strides are not the
    contiguous ones: a permutation, a slice with a step, or stride 0 (an expand)."""
    cout, cg, kh, kw = weight.shape
    if view == "weight permuted":
        weight = torch.zeros(kh, cout, kw, cg, device=DEVICE).permute(1, 3, 0, 2).copy_(weight)
    elif view == "weight sliced":
        weight = torch.zeros(cout, 2 * cg, kh, kw, device=DEVICE)[:, ::2].copy_(weight)
    elif view == "grad_out transposed":
        n, cout, ho, wo = grad_out.shape
        grad_out = torch.zeros(n, cout, wo, ho, device=DEVICE).transpose(2, 3).copy_(grad_out)
    elif view == "grad_out expanded":  # the gradient of a sum(): stride 0 everywhere
        grad_out = grad_out[:1, :1, :1, :1].expand_as(grad_out)
    elif view == "x expanded":
        x = x[:, :, :1].expand_as(x)
    return grad_out, x, weight


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize(
    "view", ["weight permuted", "weight sliced", "grad_out transposed", "grad_out expanded", "x expanded"]
)
def test_views_of_every_operand_are_read_through_their_strides(view, grad_mode):
    """Every operand of both gradient kernels as a view (issue 28 audit): the same gradients as the reference."""
    grad_out, x, weight, geom = _operands("stride2_groups2", seed=8)
    grad_out, x, weight = _strided(view, grad_out, x, weight)
    assert not (grad_out.is_contiguous() and x.is_contiguous() and weight.is_contiguous())
    expected_x, expected_w = adder2d_backward(grad_out.cpu(), x.cpu(), weight.cpu(), geom, grad_mode)
    grad_x = gi.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
    grad_w = gw.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, split_k=2)
    assert_matches_reference(grad_x, expected_x, torch.float32, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float32, _weight_terms(grad_out))


# The interpreter's numpy warns of 0 * inf in tile rows past the last output channel, which are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_gradients_follow_their_formulas_at_nonfinite_operands(case, grad_mode):
    """Both kernels at infinite and huge inputs and at NaN that only the padding meets (tests/cases.py): the
    reference's values, on the CPU (where torch.sign(NaN) is 0, as the kernels' sign). The exact mode's
    NaN-propagating sign made the masked taps' 0 * sign(NaN) NaN in both gradients."""
    grad_out, x, weight, kwargs = nonfinite_operands(case, DEVICE)
    geom = functional.resolve_geometry(tuple(x.shape[2:]), tuple(weight.shape[2:]), **kwargs)
    expected_x, expected_w = adder2d_backward(grad_out.cpu(), x.cpu(), weight.cpu(), geom, grad_mode)
    assert expected_x.isfinite().all(), "the formula is finite for every input element here"
    grad_x = gi.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
    grad_w = gw.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, split_k=2)
    assert_matches_reference(grad_x, expected_x, torch.float32, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float32, _weight_terms(grad_out), equal_nan=True)
