"""Which backend runs a call (`triton_adder.backends.select_backend`), and the torch backend off the CPU.

The selection table is written out row by row below, so a change of rule shows up as a failing
row rather than as an edit to a copy of the rule.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import triton_adder
from tests.tolerance import assert_matches_reference
from triton_adder import backends, contract, reference
from triton_adder.backends import cpu
from triton_adder.functional import resolve_geometry

# (device type, interpreter on, forced) -> backend for the kernel dtypes (float16, bfloat16,
# float32), or "error" (forced "triton" where no Triton runs). float64 has no kernel: every
# "triton" becomes "cpu", errors stay errors. "meta" stands for any device without kernels.
KERNEL_DTYPE_TABLE = {
    ("cpu", False, None): "cpu",
    ("cpu", False, "cpu"): "cpu",
    ("cpu", False, "triton"): "error",
    ("cpu", True, None): "triton",
    ("cpu", True, "cpu"): "cpu",
    ("cpu", True, "triton"): "triton",
    ("cuda", False, None): "triton",
    ("cuda", False, "cpu"): "cpu",  # the torch backend runs on the GPU, eagerly
    ("cuda", False, "triton"): "triton",
    ("cuda", True, None): "triton",
    ("cuda", True, "cpu"): "cpu",
    ("cuda", True, "triton"): "triton",
    ("meta", False, None): "cpu",
    ("meta", False, "cpu"): "cpu",
    ("meta", False, "triton"): "error",
    ("meta", True, None): "cpu",
    ("meta", True, "cpu"): "cpu",
    ("meta", True, "triton"): "error",
}


def _expected(device_type, dtype, interpreter, forced):
    chosen = KERNEL_DTYPE_TABLE[(device_type, interpreter, forced)]
    if dtype == torch.float64 and chosen == "triton":
        return "cpu"
    return chosen


@pytest.mark.parametrize("forced", [None, "cpu", "triton"])
@pytest.mark.parametrize("interpreter", [False, True], ids=["interpreter-off", "interpreter-on"])
@pytest.mark.parametrize("dtype_name", list(contract.DTYPES))
@pytest.mark.parametrize("device_type", ["cpu", "cuda", "meta"])
def test_select_backend(device_type, dtype_name, interpreter, forced):
    dtype = contract.DTYPES[dtype_name]
    expected = _expected(device_type, dtype, interpreter, forced)
    if expected == "error":
        with pytest.raises(RuntimeError, match="forced='triton': the Triton backend needs CUDA tensors") as error:
            backends.select_backend(device_type, dtype, interpreter, forced)
        assert "forced='cpu' or None" in str(error.value)  # what is accepted instead
    else:
        assert backends.select_backend(device_type, dtype, interpreter, forced) == expected


def test_every_chosen_backend_is_a_module_with_the_contract():
    for name in backends.BACKENDS:
        if name == "triton":
            pytest.importorskip("triton")  # a third-party dependency, optional off Linux
        module = importlib.import_module(f"triton_adder.backends.{name}")
        assert all(callable(getattr(module, f)) for f in ("forward", "grad_input", "grad_weight"))


def test_select_backend_rejects_unknown_arguments():
    with pytest.raises(ValueError, match=r"forced must be one of \('cpu', 'triton'\) or None, got 'cuda'"):
        backends.select_backend("cuda", torch.float32, False, "cuda")
    with pytest.raises(TypeError, match="dtype must be one of"):
        backends.select_backend("cpu", torch.int32, False, None)


def test_backend_name_reads_the_interpreter_setting_and_the_forced_backend(monkeypatch):
    x = torch.zeros(1)
    with backends.use_backend(None):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert backends.backend_name(x) == "cpu"
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.backend_name(x) == "triton"
        assert backends.backend_name(x.double()) == "cpu"
        with backends.use_backend("cpu"):
            assert backends.backend_name(x) == "cpu"
            assert backends.forced_backend() == "cpu"
        assert backends.forced_backend() is None  # restored on leaving the block
    with pytest.raises(ValueError, match="backend must be one of"):
        with backends.use_backend("cuda"):
            pass


def test_forced_triton_without_cuda_or_interpreter_fails_through_the_op(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backends.use_backend("triton"), pytest.raises(RuntimeError, match="Triton backend needs CUDA tensors"):
        triton_adder.adder2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1))


def test_meta_tensors_get_shapes_from_the_fake_kernel():
    x = torch.empty(2, 4, 9, 9, device="meta").contiguous(memory_format=torch.channels_last)
    y = triton_adder.adder2d(x, torch.empty(6, 2, 3, 3, device="meta"), stride=2, padding=1, groups=2)
    assert y.device.type == "meta" and y.shape == (2, 6, 5, 5)
    assert y.is_contiguous(memory_format=torch.channels_last)


# ---- the torch backend off the CPU (the path of float64 CUDA tensors) ----


def test_torch_backend_runs_on_a_device_without_a_compiler(monkeypatch):
    """On meta tensors (no data, no inductor): every pass runs the eager path and keeps device, dtype, shape."""
    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    common = importlib.import_module("triton_adder.backends.cpu.common")
    x = torch.empty(2, 4, 7, 6, dtype=torch.float64, device="meta")
    weight = torch.empty(6, 2, 3, 3, dtype=torch.float64, device="meta")
    geom = resolve_geometry((7, 6), (3, 3), stride=(2, 1), padding=1, groups=2)
    grad_out = torch.empty(2, 6, *geom.out_size, dtype=torch.float64, device="meta")
    assert not common.use_compiler(x)
    before = len(common._compiled)
    outputs = {
        "forward": (cpu.forward(x, weight, None, geom), (2, 6, *geom.out_size)),
        "grad_input": (cpu.grad_input(grad_out, x, weight, geom, "paper"), x.shape),
        "grad_weight paper": (cpu.grad_weight(grad_out, x, weight, geom, "paper"), weight.shape),
        "grad_weight exact": (cpu.grad_weight(grad_out, x, weight, geom, "exact"), weight.shape),
    }
    for name, (out, shape) in outputs.items():
        assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == shape, name
    assert len(common._compiled) == before, "a compiled callable was used off the CPU"


def test_torch_backend_requires_one_device():
    geom = resolve_geometry((5, 5), (3, 3))
    with pytest.raises(ValueError, match="x and weight must be on one device"):
        cpu.forward(torch.randn(1, 2, 5, 5), torch.empty(3, 2, 3, 3, device="meta"), None, geom)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, forced", [(torch.float64, None), (torch.float32, "cpu")])
def test_module_on_cuda_through_the_torch_backend(dtype, forced):
    """`Adder2d(...).cuda().double()` (and forced "cpu" on CUDA float32) vs the float64 reference."""
    layer = triton_adder.Adder2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True).cuda().to(dtype)
    x = torch.randn(2, 4, 9, 9, device="cuda", dtype=dtype, requires_grad=True)
    with backends.use_backend(forced):
        assert backends.backend_name(x) == "cpu"
        y = layer(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    geom = resolve_geometry((9, 9), (3, 3), stride=2, padding=1, groups=2)
    weight = layer.weight.detach()
    assert_matches_reference(y, reference.adder2d_forward(x.detach(), weight, layer.bias.detach(), geom), dtype, 18)
    expected_x, expected_w = reference.adder2d_backward(grad_out, x.detach(), weight, geom, "paper")
    assert_matches_reference(x.grad, expected_x, dtype, 3 * 9)
    assert_matches_reference(layer.weight.grad, expected_w, dtype, 2 * 25)
