"""Triton backward kernels (triton_adder.kernels.backward) against the float64 reference.

Runs under the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so shapes are tiny and odd (masking bugs cannot hide behind powers of two) and configs are
16 x 16 x 4. Every case reaches both gradients in both grad modes; the geometry grid covers
stride, padding (including padding beyond what the taps need, and taps that never reach the last
rows), dilation, groups, non-square kernels and an implied bottom/right padding.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest also does this)

import pytest  # noqa: E402

from tests.tolerance import assert_matches_reference  # noqa: E402
from triton_adder.geometry import Conv2dGeometry  # noqa: E402
from triton_adder.kernels import backward  # noqa: E402
from triton_adder.kernels.launch_config import KernelConfig  # noqa: E402
from triton_adder.reference import adder2d_backward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = KernelConfig(16, 16, 4, num_warps=4, num_stages=1)


def _out(size, k, s, pad_before, pad_after, d):
    return (size + pad_before + pad_after - d * (k - 1) - 1) // s + 1


def _case(n, cin, h, w, cout, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, pad_after=None):
    """(x shape, weight shape, geometry); pad_after defaults to padding (symmetric)."""
    pad_after = padding if pad_after is None else pad_after
    out = tuple(
        _out(size, k, s, p, q, d)
        for size, k, s, p, q, d in zip((h, w), kernel, stride, padding, pad_after, dilation, strict=True)
    )
    geom = Conv2dGeometry(stride, padding, dilation, groups, out)
    return (n, cin, h, w), (cout, cin // groups, *kernel), geom


# The core grid. Ids say what each case is there for.
CASES = {
    "3x3_pad1": _case(2, 5, 5, 7, 6, (3, 3), padding=(1, 1)),
    "stride2_groups2": _case(2, 6, 7, 9, 4, (3, 3), stride=(2, 2), padding=(1, 1), groups=2),
    # stride 3 x 1, dilation 2 x 1, padding 0 x 2, 2 x 3 kernel; the last input rows are never read.
    "asymmetric_dilated": _case(1, 3, 8, 7, 5, (2, 3), stride=(3, 1), padding=(0, 2), dilation=(2, 1)),
    "depthwise_stride2_pad2": _case(1, 4, 6, 5, 4, (3, 3), stride=(2, 2), padding=(2, 2), groups=4),
    # padding="same" with an even kernel: 0 before, 1 after (implied by out_size).
    "same_even_kernel": _case(1, 3, 5, 6, 3, (2, 2), padding=(0, 0), pad_after=(1, 1)),
}
GRAD_MODES = ("paper", "exact")


def _operands(case, dtype=torch.float32, seed=0):
    x_shape, w_shape, geom = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen)
    # Weights at the scale of x so that |W - X| straddles the clamp at 1 in both directions.
    weight = torch.randn(w_shape, generator=gen) * 0.8
    grad_out = torch.randn(x_shape[0], w_shape[0], *geom.out_size, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (grad_out, x, weight)] + [geom]


def _input_terms(weight, geom):
    """Upper bound on the terms summed into one dX element: Cout/groups * kh * kw."""
    return weight.shape[0] // geom.groups * weight.shape[2] * weight.shape[3]


def _weight_terms(grad_out):
    return grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_grad_input_matches_reference(case, grad_mode):
    grad_out, x, weight, geom = _operands(case)
    expected, _ = adder2d_backward(grad_out, x, weight, geom, grad_mode)
    actual = backward.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
    assert actual.dtype == x.dtype
    assert_matches_reference(actual, expected, torch.float32, _input_terms(weight, geom))


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_grad_weight_matches_reference_and_methods_agree(case, grad_mode):
    """The Triton kernel (both modes) and, in paper mode, the conv identity: each against the reference
    and against each other."""
    grad_out, x, weight, geom = _operands(case)
    _, expected = adder2d_backward(grad_out, x, weight, geom, grad_mode)
    terms = _weight_terms(grad_out)
    # split_k=2: the two-pass split reduction is exercised on every case.
    kernel = backward.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, method="triton", split_k=2)
    assert kernel.dtype == weight.dtype and kernel.is_contiguous()
    assert_matches_reference(kernel, expected, torch.float32, terms)
    if grad_mode == "paper":
        identity = backward.grad_weight(grad_out, x, weight, geom, grad_mode, method="conv_identity")
        assert identity.dtype == weight.dtype and identity.is_contiguous()
        assert_matches_reference(identity, expected, torch.float32, terms)
        assert_matches_reference(kernel, identity.double(), torch.float32, terms)


def test_split_counts_agree_and_are_deterministic():
    grad_out, x, weight, geom = _operands("asymmetric_dilated", seed=2)
    _, expected = adder2d_backward(grad_out, x, weight, geom, "paper")
    results = {}
    for split_k in (1, 3, 1000):  # 1000 is clamped to one BLOCK_K of steps per split
        results[split_k] = backward.grad_weight(grad_out, x, weight, geom, "paper", SMALL, "triton", split_k)
        assert_matches_reference(results[split_k], expected, torch.float32, _weight_terms(grad_out))
    again = backward.grad_weight(grad_out, x, weight, geom, "paper", SMALL, "triton", 3)
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
    grad_x = backward.grad_input(strided_grad_out, x_cl, weight, geom, "paper", SMALL)
    grad_w = backward.grad_weight(strided_grad_out, x_cl, weight, geom, "paper", SMALL, "triton", 2)
    assert grad_x.is_contiguous(memory_format=torch.channels_last), "grad_x keeps x's memory format"
    assert_matches_reference(grad_x, expected_x, torch.float32, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float32, _weight_terms(grad_out))
    identity = backward.grad_weight(strided_grad_out, x_cl, weight, geom, "paper", method="conv_identity")
    assert_matches_reference(identity, expected_w, torch.float32, _weight_terms(grad_out))


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_float16_inputs(grad_mode):
    """float16 operands: float32 accumulation, float16 results, within the float16 row of the table."""
    grad_out, x, weight, geom = _operands("3x3_pad1", dtype=torch.float16, seed=4)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, grad_mode)  # on the float16 values
    grad_x = backward.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
    grad_w = backward.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, "triton", 2)
    assert grad_x.dtype == torch.float16 and grad_w.dtype == torch.float16
    assert_matches_reference(grad_x, expected_x, torch.float16, _input_terms(weight, geom))
    assert_matches_reference(grad_w, expected_w, torch.float16, _weight_terms(grad_out))
    if grad_mode == "paper":
        identity = backward.grad_weight(grad_out, x, weight, geom, grad_mode, method="conv_identity")
        assert identity.dtype == torch.float16
        assert_matches_reference(identity, expected_w, torch.float16, _weight_terms(grad_out))


def test_float64_inputs_accumulate_in_float64():
    grad_out, x, weight, geom = _operands("asymmetric_dilated", dtype=torch.float64, seed=5)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")
    grad_x = backward.grad_input(grad_out, x, weight, geom, "paper", SMALL)
    grad_w = backward.grad_weight(grad_out, x, weight, geom, "paper", SMALL, "triton", 2)
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
        grad_x = backward.grad_input(grad_out, x, weight, geom, grad_mode, SMALL)
        grad_w = backward.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL, "triton", 1)
        assert_matches_reference(grad_x, expected_x, torch.float32, 8)
        assert_matches_reference(grad_w, expected_w, torch.float32, 6)


def test_default_configs_and_methods():
    grad_out, x, weight, geom = _operands("stride2_groups2", seed=6)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "exact")
    # config=None and method=None: the heuristic defaults; exact mode must pick the kernel.
    assert backward.default_grad_weight_method(x.device, "exact") == "triton"
    assert backward.default_grad_weight_method(x.device, "paper") in backward.GRAD_WEIGHT_METHODS
    assert_matches_reference(
        backward.grad_input(grad_out, x, weight, geom, "exact"), expected_x, torch.float32, _input_terms(weight, geom)
    )
    assert_matches_reference(
        backward.grad_weight(grad_out, x, weight, geom, "exact"), expected_w, torch.float32, _weight_terms(grad_out)
    )
    for device_type in ("cuda", "cpu"):
        for default_of in (backward.default_grad_input_config, backward.default_grad_weight_config):
            default_of((64, 256, 28, 28), (256, 256, 3, 3), geom, device_type).validate()


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("case", ["depthwise_stride2_pad2", "narrow_w16"])
def test_gpu_narrow_layer_defaults_compute_the_gradient(case, grad_mode):
    """The GPU defaults' narrow-layer branches (depthwise: 1 channel per program; 17-32 channels with
    W a multiple of 16: 64 x 32 x 2 on one warp) run under the interpreter on odd shapes."""
    cases = {**CASES, "narrow_w16": _case(1, 20, 3, 16, 7, (3, 3), padding=(1, 1))}
    x_shape, w_shape, geom = cases[case]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(x_shape, generator=gen).to(DEVICE)
    weight = (torch.randn(w_shape, generator=gen) * 0.8).to(DEVICE)
    grad_out = torch.randn(x_shape[0], w_shape[0], *geom.out_size, generator=gen).to(DEVICE)
    config = backward.default_grad_input_config(x_shape, w_shape, geom, "cuda")
    expected = {"depthwise_stride2_pad2": (1024, 1, 1, 4), "narrow_w16": (64, 32, 2, 1)}[case]
    assert (config.block_m, config.block_n, config.block_k, config.num_warps) == expected
    expected_x, _ = adder2d_backward(grad_out, x, weight, geom, grad_mode)
    actual = backward.grad_input(grad_out, x, weight, geom, grad_mode, config)
    assert_matches_reference(actual, expected_x, torch.float32, _input_terms(weight, geom))


def test_argument_errors_name_the_argument():
    grad_out, x, weight, geom = _operands("3x3_pad1")
    with pytest.raises(ValueError, match="grad_mode"):
        backward.grad_input(grad_out, x, weight, geom, "hardtanh", SMALL)
    with pytest.raises(ValueError, match="config.block_m"):
        backward.grad_input(grad_out, x, weight, geom, "paper", KernelConfig(24, 16, 4))
    with pytest.raises(ValueError, match="config must be a KernelConfig"):
        backward.grad_weight(grad_out, x, weight, geom, "paper", {"block_m": 16}, method="triton")
    with pytest.raises(ValueError, match="method"):
        backward.grad_weight(grad_out, x, weight, geom, "paper", method="cudnn")
    with pytest.raises(ValueError, match="conv_identity.*exact"):
        backward.grad_weight(grad_out, x, weight, geom, "exact", method="conv_identity")
    with pytest.raises(ValueError, match="split_k"):
        backward.grad_weight(grad_out, x, weight, geom, "paper", SMALL, "triton", split_k=0)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        backward.grad_input(grad_out[:, :, :-1], x, weight, geom, "paper", SMALL)


def test_float32_identity_restores_tf32_flags():
    """The identity forces IEEE float32 for its own call only; the user's TF32 choice survives it."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no per-operator fp32_precision flags")
    saved = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    try:
        conv.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with backward._ieee_float32():
            assert conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_kernel_hashes_identify_the_sources():
    for digest in (backward.GRAD_INPUT_KERNEL_HASH, backward.GRAD_WEIGHT_KERNEL_HASH):
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert backward.GRAD_INPUT_KERNEL_HASH != backward.GRAD_WEIGHT_KERNEL_HASH


def test_accumulates_into_existing_grad_through_the_op():
    """Through triton_adder.adder2d on the Triton backend: .grad accumulates, forward and backward."""
    functional = pytest.importorskip("triton_adder.functional", reason="triton_adder.functional (the lead's) not yet")
    ops = pytest.importorskip("triton_adder.ops", reason="triton_adder.ops (the lead's) not yet")
    grad_out, x, weight, geom = _operands("3x3_pad1", seed=7)
    expected_x, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")
    x = x.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    previous_x = torch.full_like(x, 0.5)
    previous_w = torch.linspace(-1, 1, weight.numel(), device=DEVICE).reshape(weight.shape)
    x.grad, weight.grad = previous_x.clone(), previous_w.clone()
    with ops.use_backend("triton"):
        y = functional.adder2d(x, weight, None, stride=1, padding=1)
        y.backward(grad_out)
    assert_matches_reference(x.grad, expected_x + previous_x.double(), torch.float32, _input_terms(weight, geom))
    assert_matches_reference(weight.grad, expected_w + previous_w.double(), torch.float32, _weight_terms(grad_out))
