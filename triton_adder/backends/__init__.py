"""Backends of the adder op, and the one rule that picks the backend for a call.

Each backend module implements the same contract: ``forward(x, weight, bias, geom)``,
``grad_input(grad_out, x, weight, geom, grad_mode)`` and
``grad_weight(grad_out, x, weight, geom, grad_mode)`` on validated tensors and a resolved
`Conv2dGeometry`.

- "triton" (`triton_adder.backends.triton`): the Triton kernels with the tuner's launch config;
  for CUDA tensors, and for CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
- "cpu" (`triton_adder.backends.cpu`): torch code, compiled with inductor on CPU tensors and run
  eagerly (memory-bounded chunks) on any other device. It is the path for CPU tensors without the
  interpreter and for float64 everywhere: the kernels compute float16/bfloat16/float32 only
  (`contract.KERNEL_DTYPES`).

`use_backend` forces one of them for the calls inside a ``with`` block (tests use it to run both
paths in one process; the benchmarks to time each one).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch

from triton_adder import contract

BACKENDS = ("cpu", "triton")
"""The backend names `use_backend` and `select_backend` accept (besides None: automatic)."""

_forced_backend: str | None = None


def triton_interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET is set to a value other than "" and "0" (the Triton interpreter runs kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force backend `name` ("cpu", "triton" or None for automatic) inside the `with` block."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def forced_backend() -> str | None:
    """The backend `use_backend` forces at this point, or None (automatic)."""
    return _forced_backend


def select_backend(device_type: str, dtype: torch.dtype, interpreter: bool, forced: str | None) -> str:
    """The name of the backend module ("cpu" or "triton") that runs a call on tensors like these.

    device_type: the tensors' ``device.type`` ("cpu", "cuda", "meta", ...); dtype: their dtype;
    interpreter: whether the Triton interpreter is on (`triton_interpreter_enabled`); forced:
    None (automatic) or a name from `BACKENDS` (`use_backend`).

    Automatic: "triton" for CUDA tensors, and for CPU tensors under the interpreter; "cpu"
    otherwise. float64 always takes "cpu" (no kernel computes it), also when "triton" is forced.
    Forced "triton" needs CUDA tensors or CPU tensors under the interpreter, else a RuntimeError.
    Forced "cpu" runs the torch backend on any device (eagerly off the CPU).
    """
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"forced must be one of {BACKENDS} or None, got {forced!r}")
    if dtype not in contract.SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {list(contract.DTYPES)}, got {dtype}")
    triton_runs_here = device_type == "cuda" or (device_type == "cpu" and interpreter)
    if forced == "triton" and not triton_runs_here:
        raise RuntimeError(
            "forced='triton': the Triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got {device_type} tensors with the interpreter "
            f"{'on' if interpreter else 'off'}. Use forced='cpu' or None (automatic)."
        )
    if forced == "cpu" or dtype not in contract.KERNEL_DTYPES:
        return "cpu"
    return "triton" if triton_runs_here else "cpu"


def backend_name(x: torch.Tensor) -> str:
    """The name of the backend that runs for tensors like `x` now (forced one, interpreter setting)."""
    return select_backend(x.device.type, x.dtype, triton_interpreter_enabled(), _forced_backend)


def backend_for(x: torch.Tensor) -> ModuleType:
    """The backend module that runs for tensors like `x` (imported on first use: triton, inductor)."""
    return importlib.import_module(f"triton_adder.backends.{backend_name(x)}")
