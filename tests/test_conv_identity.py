"""The convolution identity (triton_adder.backends.conv_identity) and the Triton backend's
weight-gradient method policy (triton_adder.backends.triton), against the float64 reference and
against the Triton kernel (which runs under the interpreter without CUDA, see conftest)."""

import pytest
import torch

from tests.cases import GRADIENT_CASES as CASES
from tests.cases import gradient_operands, weight_terms
from tests.tolerance import assert_matches_reference
from triton_adder.backends import conv_identity
from triton_adder.backends import cpu as cpu_backend
from triton_adder.backends import triton as triton_backend
from triton_adder.kernels import grad_weight as gw
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.reference import adder2d_backward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = KernelConfig(16, 16, 4, num_warps=4, num_stages=1)


def _operands(case, dtype=torch.float32, seed=0):
    return gradient_operands(case, dtype, seed, DEVICE)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_matches_reference_and_the_kernel(case):
    """Paper mode: the identity against the reference and against the Triton kernel."""
    grad_out, x, weight, geom = _operands(case)
    _, expected = adder2d_backward(grad_out, x, weight, geom, "paper")
    terms = weight_terms(grad_out)
    identity = conv_identity.grad_weight(grad_out, x, weight, geom)
    assert identity.dtype == weight.dtype and identity.is_contiguous() and identity.shape == weight.shape
    assert_matches_reference(identity, expected, torch.float32, terms)
    kernel = gw.grad_weight(grad_out, x, weight, geom, "paper", SMALL, split_k=2)
    assert_matches_reference(kernel, identity.double(), torch.float32, terms)
    through_backend = triton_backend.grad_weight(grad_out, x, weight, geom, "paper", method="conv_identity")
    assert torch.equal(through_backend, identity)


def test_identity_on_strided_grad_out_and_channels_last_x():
    grad_out, x, weight, geom = _operands("stride2_groups2", seed=3)
    wide = torch.zeros(*grad_out.shape[:3], 2 * grad_out.shape[3], device=DEVICE)
    wide[..., ::2] = grad_out
    strided_grad_out = wide[..., ::2]
    assert not strided_grad_out.is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    _, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")
    identity = conv_identity.grad_weight(strided_grad_out, x_cl, weight, geom)
    assert identity.is_contiguous()
    assert_matches_reference(identity, expected_w, torch.float32, weight_terms(grad_out))


def test_identity_on_float16_keeps_the_dtype():
    grad_out, x, weight, geom = _operands("3x3_pad1", dtype=torch.float16, seed=4)
    _, expected_w = adder2d_backward(grad_out, x, weight, geom, "paper")  # on the float16 values
    identity = conv_identity.grad_weight(grad_out, x, weight, geom)
    assert identity.dtype == torch.float16
    assert_matches_reference(identity, expected_w, torch.float16, weight_terms(grad_out))


def test_identity_is_the_cpu_paths_weight_gradient():
    """A drop-in for the CPU path's paper-mode weight gradient, padding and cropping cases included."""
    for case in ("3x3_pad1", "asymmetric_dilated", "same_even_kernel", "depthwise_stride2_pad2"):
        grad_out, x, weight, geom = (t.cpu() if isinstance(t, torch.Tensor) else t for t in _operands(case, seed=8))
        cpu_result = cpu_backend.grad_weight(grad_out, x, weight, geom, "paper")
        identity = conv_identity.grad_weight(grad_out, x, weight, geom)
        assert identity.dtype == cpu_result.dtype and identity.shape == cpu_result.shape
        assert_matches_reference(identity, cpu_result.double(), torch.float32, weight_terms(grad_out))


def test_identity_of_an_empty_batch_is_zero():
    grad_out, x, weight, geom = _operands("3x3_pad1")
    result = conv_identity.grad_weight(grad_out[:0], x[:0], weight, geom)
    assert result.shape == weight.shape and result.is_contiguous() and not result.any()


def _fp32_flags():
    flags = [
        getattr(torch.backends.cudnn, "conv", None),
        torch.backends.cuda.matmul,
        getattr(torch.backends.mkldnn, "conv", None),
        getattr(torch.backends.mkldnn, "matmul", None),
    ]
    return [flag for flag in flags if flag is not None and hasattr(flag, "fp32_precision")]


def test_identity_forces_ieee_float32_and_restores_the_callers_flags():
    """Inside the identity every float32 precision flag is "ieee"; the caller's TF32/BF16 choice survives."""
    flags = _fp32_flags()
    if not flags:
        pytest.skip("this torch has no per-operator fp32_precision flags")
    saved = [flag.fp32_precision for flag in flags]
    reduced = ["bf16" if flag in (torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul) else "tf32"
               for flag in flags]  # fmt: skip
    try:
        for flag, value in zip(flags, reduced, strict=True):
            flag.fp32_precision = value
        with conv_identity.ieee_float32():
            assert [flag.fp32_precision for flag in flags] == ["ieee"] * len(flags)
            with conv_identity.ieee_float32():  # nested: the inner exit must not restore early
                pass
            assert [flag.fp32_precision for flag in flags] == ["ieee"] * len(flags)
        assert [flag.fp32_precision for flag in flags] == reduced
        # Under the reduced settings, the identity still meets the float32 tolerance.
        grad_out, x, weight, geom = _operands("3x3_pad1", seed=9)
        _, expected = adder2d_backward(grad_out, x, weight, geom, "paper")
        assert_matches_reference(
            conv_identity.grad_weight(grad_out, x, weight, geom), expected, torch.float32, weight_terms(grad_out)
        )
        assert [flag.fp32_precision for flag in flags] == reduced
    finally:
        for flag, value in zip(flags, saved, strict=True):
            flag.fp32_precision = value


def test_method_policy():
    grad_out, x, weight, geom = _operands("stride2_groups2", seed=6)
    # Exact mode needs the kernel; paper mode takes the per-device default.
    assert triton_backend.default_grad_weight_method(x.device, "exact") == "triton"
    assert triton_backend.default_grad_weight_method(x.device, "paper") == (
        triton_backend.DEFAULT_GRAD_WEIGHT_METHOD.get(x.device.type, "triton")
    )
    assert set(triton_backend.DEFAULT_GRAD_WEIGHT_METHOD.values()) <= set(triton_backend.GRAD_WEIGHT_METHODS)
    for grad_mode in ("paper", "exact"):
        _, expected_w = adder2d_backward(grad_out, x, weight, geom, grad_mode)
        assert_matches_reference(
            triton_backend.grad_weight(grad_out, x, weight, geom, grad_mode), expected_w, torch.float32,
            weight_terms(grad_out),
        )  # fmt: skip
        kernel = triton_backend.grad_weight(grad_out, x, weight, geom, grad_mode, method="triton", config=SMALL)
        assert torch.equal(kernel, gw.grad_weight(grad_out, x, weight, geom, grad_mode, SMALL))


def test_method_errors_name_the_argument():
    grad_out, x, weight, geom = _operands("3x3_pad1")
    with pytest.raises(ValueError, match="method"):
        triton_backend.grad_weight(grad_out, x, weight, geom, "paper", method="cudnn")
    with pytest.raises(ValueError, match="conv_identity.*exact"):
        triton_backend.grad_weight(grad_out, x, weight, geom, "exact", method="conv_identity")
    with pytest.raises(ValueError, match="config must be a KernelConfig"):
        triton_backend.grad_weight(grad_out, x, weight, geom, "paper", method="triton", config={"block_m": 16})
    with pytest.raises(ValueError, match="config must be a KernelConfig"):
        triton_backend.grad_weight(grad_out, x, weight, geom, "paper", method="conv_identity", config=(16, 16, 4))
    with pytest.raises(ValueError, match="grad_mode"):
        triton_backend.grad_weight(grad_out, x, weight, geom, "hardtanh", method="conv_identity")
    with pytest.raises(ValueError, match="grad_out must have shape"):
        triton_backend.grad_weight(grad_out[:, :, :-1], x, weight, geom, "paper", method="conv_identity")
