"""`triton_adder.precompile`: a model's CPU reductions compiled ahead, in worker processes."""

from __future__ import annotations

import collections
import importlib

import pytest
import torch
from torch import nn

import triton_adder
from tests.tolerance import assert_matches_reference
from triton_adder import backends, reference
from triton_adder.backends import cpu
from triton_adder.geometry import Conv2dGeometry

common = importlib.import_module("triton_adder.backends.cpu.common")


def _model():
    torch.manual_seed(0)
    # shapes no other test compiles; a stride-2 layer (several input-gradient phases) after a BatchNorm
    return nn.Sequential(
        triton_adder.Adder2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        triton_adder.Adder2d(5, 7, 3, stride=2, padding=1, bias=True),
    )  # fmt: skip


def test_precompile_fills_the_index_so_the_first_step_compiles_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    if not cpu.compiler_enabled():
        pytest.skip(f"inductor unavailable here: {common._compiler_failure}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # workers inherit it: one fresh cache
    model, x = _model(), torch.randn(2, 3, 9, 8)
    state = {name: value.clone() for name, value in model.state_dict().items()}

    report = triton_adder.precompile(model, x, workers=2)
    # forward of both layers; the second layer's input gradient (its input requires grad, the
    # first's does not); paper-mode weight gradients take the convolution identity, uncompiled
    assert report.workers == 2 and report.needed >= 3 and report.compiled == report.needed
    assert len(list((tmp_path / "triton_adder_cpu_index").glob("*.json"))) == report.needed
    # the caller's model is untouched: BatchNorm statistics, no gradients
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert triton_adder.precompile(model, x, workers=2).needed == 0  # all in the index now

    # a process that has compiled nothing (emptied in-process cache) must run it all from the index
    monkeypatch.setattr(common, "_compiled", collections.OrderedDict())

    def no_compiler(fn, args, symbolic):
        raise AssertionError("compiled although precompile filled the index")

    monkeypatch.setattr(common, "_inductor_compile", no_compiler)
    seen = {}
    for name in ("0", "3"):
        model.get_submodule(name).register_forward_hook(
            lambda layer, inputs, output, name=name: seen.update({name: (inputs[0].detach(), output.detach())}))
    model[3].register_full_backward_hook(  # the first layer's input needs no gradient
        lambda layer, grad_input, grad_output: seen.update({"3.grad": (grad_output[0].detach(), grad_input[0])}))
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()  # grad_out ~ N(0, 1): the O(1) terms the tolerances assume
    for name in ("0", "3"):
        layer = model.get_submodule(name)
        inputs, output = seen[name]
        geom = Conv2dGeometry(layer.stride, layer.padding, layer.dilation, layer.groups, tuple(output.shape[-2:]))
        bias = None if layer.bias is None else layer.bias.detach()
        terms = layer.weight[0].numel()
        expected = reference.adder2d_forward(inputs.double(), layer.weight.detach().double(), bias, geom)
        assert_matches_reference(output, expected, torch.float32, terms)
    grad_out, grad_x = seen["3.grad"]
    layer = model[3]
    inputs, output = seen["3"]
    geom = Conv2dGeometry(layer.stride, layer.padding, layer.dilation, layer.groups, tuple(output.shape[-2:]))
    expected_dx, _ = reference.adder2d_backward(grad_out.double(), inputs.double(), layer.weight.detach().double(),
                                                geom)  # fmt: skip
    assert_matches_reference(grad_x, expected_dx, torch.float32, layer.out_channels * 9)


def test_precompile_rejects_bad_arguments_and_skips_what_it_cannot_fill(monkeypatch):
    model, x = _model(), torch.randn(2, 3, 9, 8)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        triton_adder.precompile(model, x, workers=0)
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        triton_adder.precompile(model, [x])
    monkeypatch.setenv(cpu.COMPILE_ENV, "0")  # eager: nothing to compile, nothing run
    assert triton_adder.precompile(model, x).needed == 0
    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    if backends.triton_interpreter_enabled():  # CPU tensors then run the Triton kernels, not the CPU path
        with backends.use_backend(None), common.recording() as seen:  # a dry step would raise in here
            report = triton_adder.precompile(model, x)
        assert (report.needed, report.compiled, report.workers, seen) == (0, 0, 0, [])


def test_a_failing_worker_is_reported_and_leaves_the_work_to_the_first_step(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    if not cpu.compiler_enabled():
        pytest.skip(f"inductor unavailable here: {common._compiler_failure}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    precompile = importlib.import_module("triton_adder.backends.cpu.precompile")
    monkeypatch.setattr(precompile, "_WORKER_COMMAND", "import sys; sys.exit('worker exploded')")
    with pytest.warns(RuntimeWarning, match="a worker failed \\(worker exploded\\)"):
        report = triton_adder.precompile(_model(), torch.randn(2, 3, 9, 8), workers=2)
    assert report.needed >= 3 and report.compiled == 0


def test_the_index_key_covers_the_thread_count():
    # inductor generates OpenMP loops for torch's thread count (none for 1): a module compiled for
    # one count must not serve a process with another (precompile's workers take the parent's)
    code_index = importlib.import_module("triton_adder.backends.cpu.code_index")
    forward = importlib.import_module("triton_adder.backends.cpu.forward")
    signature = (((1, 2, 3), (6, 3, 1), torch.float32, True),)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = code_index.key(forward._forward_body, {}, signature)
        torch.set_num_threads(2)
        two = code_index.key(forward._forward_body, {}, signature)
    finally:
        torch.set_num_threads(threads)
    assert one != two


def test_child_processes_import_this_copy_of_the_package(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from triton_adder.child_process import PACKAGE_ROOT, child_env

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    code = "import os, triton_adder; print(triton_adder.__file__); print(os.environ.get('TRITON_INTERPRET'))"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(without=("TRITON_INTERPRET",)), cwd=tmp_path,
                          capture_output=True, text=True, check=True)  # fmt: skip
    path, interpret = done.stdout.split()
    assert Path(path).resolve().is_relative_to(Path(PACKAGE_ROOT)) and interpret == "None"
