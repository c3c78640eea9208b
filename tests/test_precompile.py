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
    # and, last, a layer whose kernel covers its input (its own input-gradient path); dropout draws
    return nn.Sequential(
        triton_adder.Adder2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Dropout(0.1),
        triton_adder.Adder2d(5, 7, 3, stride=2, padding=1, bias=True), triton_adder.Adder2d(7, 4, (5, 4)),
    )  # fmt: skip


def test_precompile_fills_the_index_so_the_first_step_compiles_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    if not cpu.compiler_enabled():
        pytest.skip(f"inductor unavailable here: {common._compiler_failure}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # workers inherit it: one fresh cache
    model, x = _model(), torch.randn(2, 3, 9, 8, requires_grad=True)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    random_state = torch.get_rng_state()

    report = triton_adder.precompile(model, x, workers=2)
    # forward of the three layers; the input gradients of all three (x requires grad here); paper-mode
    # weight gradients take the convolution identity, uncompiled
    assert report.workers == 2 and report.needed >= 6 and report.compiled == report.needed
    assert len(list((tmp_path / "triton_adder_cpu_index").glob("*.json"))) == report.needed
    # the caller's model, input and random stream are untouched: BatchNorm statistics, no gradients
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    assert torch.equal(torch.get_rng_state(), random_state)
    assert triton_adder.precompile(model, x, workers=2).needed == 0  # all in the index now

    # a process that has compiled nothing (emptied in-process cache) must run it all from the index
    monkeypatch.setattr(common, "_compiled", collections.OrderedDict())

    compiled_anyway = []

    def no_compiler(fn, args, symbolic):  # compiled_call would catch a raise here and fall back to eager
        compiled_anyway.append((fn.func.__name__, [(tuple(a.shape), a.stride()) for a in args]))
        raise RuntimeError("compiled although precompile filled the index")

    monkeypatch.setattr(common, "_inductor_compile", no_compiler)
    monkeypatch.setattr(common, "_compiler_failure", None)  # restored afterwards, whatever happens here
    seen = {}
    for name in ("0", "4", "5"):
        model.get_submodule(name).register_forward_hook(
            lambda layer, inputs, output, name=name: seen.update({name: (inputs[0].detach(), output.detach())}))
    for name in ("4", "5"):
        model.get_submodule(name).register_full_backward_hook(
            lambda layer, grad_input, grad_output, name=name: seen.update(
                {name + ".grad": (grad_output[0].detach(), grad_input[0])}))
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()  # grad_out ~ N(0, 1): the O(1) terms the tolerances assume
    assert compiled_anyway == [] and common._compiler_failure is None
    for name in ("0", "4", "5"):
        layer = model.get_submodule(name)
        inputs, output = seen[name]
        geom = Conv2dGeometry(layer.stride, layer.padding, layer.dilation, layer.groups, tuple(output.shape[-2:]))
        bias = None if layer.bias is None else layer.bias.detach()
        terms = layer.weight[0].numel()
        expected = reference.adder2d_forward(inputs.double(), layer.weight.detach().double(), bias, geom)
        assert_matches_reference(output, expected, torch.float32, terms)
    for name in ("4", "5"):  # the phase gather (stride 2) and the fully connected input gradient
        grad_out, grad_x = seen[name + ".grad"]
        layer = model.get_submodule(name)
        inputs, output = seen[name]
        geom = Conv2dGeometry(layer.stride, layer.padding, layer.dilation, layer.groups, tuple(output.shape[-2:]))
        expected_dx, _ = reference.adder2d_backward(grad_out.double(), inputs.double(),
                                                    layer.weight.detach().double(), geom)  # fmt: skip
        assert_matches_reference(grad_x, expected_dx, torch.float32, layer.out_channels * layer.weight[0, 0].numel())


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


def test_recording_is_per_thread(monkeypatch):
    """A dry step in one thread must not turn another thread's real calls into zeros."""
    import threading

    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    if not cpu.compiler_enabled():
        pytest.skip(f"inductor unavailable here: {common._compiler_failure}")
    torch.manual_seed(0)
    layer, x = triton_adder.Adder2d(3, 4, 3), torch.randn(1, 3, 6, 5)
    result = {}

    def real_call():
        with backends.use_backend("cpu"), torch.no_grad():
            result["y"] = layer(x)

    with common.recording() as seen, torch.no_grad():
        other = threading.Thread(target=real_call)
        other.start()
        other.join()
        dry = layer(x)
    assert len(seen) == 1 and torch.count_nonzero(dry) == 0
    geom = Conv2dGeometry((1, 1), (0, 0), (1, 1), 1, (4, 3))
    expected = reference.adder2d_forward(x.double(), layer.weight.detach().double(), None, geom)
    assert_matches_reference(result["y"], expected, torch.float32, 27)
