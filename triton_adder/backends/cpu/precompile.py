"""Compile a model's CPU reductions ahead of its first step, in parallel worker processes.

A fresh process meets each layer shape's reductions one at a time, in the order the layers run,
and compiles each before it can go on: ResNet-50's first step at batch 2 waits for 53 inductor
compilations in a row (`results/benchmarks/cold_start.txt`), using one core. `precompile` instead

1. runs one forward and backward of a deep copy of the model (the caller's model, its buffers and
   gradients, the example input and the random stream are untouched; forward hooks are copied with
   the model and run, on zeros) with the reductions replaced by zeros of their outputs' shapes,
   which costs the layout copies only, and records each reduction's exact call signature that the
   code index (`code_index`) does not hold yet;
2. compiles those signatures in `workers` processes at once; each writes the code index, exactly
   as a first call would;

so that the real first step finds every reduction in the index and compiles nothing. Worth it on
a machine with more than one core, for a model of many layer shapes; the steps after the first
are unchanged. Only the default compile mode (`common.compile_mode` "exact") keeps a code index
to fill, so in any other mode, and for an example input the CPU path does not run (a CUDA
tensor; a CPU tensor under TRITON_INTERPRET, which runs the Triton kernels), it does nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from triton_adder import backends
from triton_adder.backends.cpu import code_index, common
from triton_adder.child_process import child_env

DEFAULT_MAX_WORKERS = 8
"""Default cap on worker processes: each holds its own torch and inductor in memory, so one per core
of a large machine would multiply that by the core count."""


@dataclasses.dataclass(frozen=True)
class Reduction:
    """One compiled reduction to build: the function (by module and name), its options, its signature."""

    module: str
    name: str
    options: tuple  # sorted (name, value) pairs
    signature: tuple  # `common._signature` of its operands

    @property
    def fn(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.name)


@dataclasses.dataclass(frozen=True)
class PrecompileReport:
    """What `precompile` did: reductions the step needs, how many were compiled now, workers, seconds."""

    needed: int
    compiled: int
    workers: int
    seconds: float


def collect(model: torch.nn.Module, example_input: torch.Tensor) -> list[Reduction]:
    """The reductions one forward + backward of `model` on `example_input` needs that the index lacks."""
    probe = copy.deepcopy(model)  # keeps each submodule's mode; the caller's buffers and grads stay as they are
    # fork_rng: dropout's draws in the dry step do not move the caller's random stream
    with torch.random.fork_rng(devices=[]), common.recording() as seen:
        # a leaf of its own: an input that needs a gradient gets one here, not in the caller's tensor
        out = probe(example_input.detach().requires_grad_(example_input.requires_grad))
        outputs = [o for o in (out if isinstance(out, (list, tuple)) else (out,))
                   if isinstance(o, torch.Tensor) and o.requires_grad]  # fmt: skip
        if outputs:  # dense gradients, as a real loss gives (sum()'s are stride-0 expansions)
            torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    wanted = {}
    for fn, options, signature in seen:
        reduction = Reduction(fn.__module__, fn.__name__, tuple(sorted(options.items())), signature)
        if not code_index.has(code_index.key(fn, options, signature)):
            wanted.setdefault(reduction, None)
    return list(wanted)


def operand(shape, stride, dtype, aligned: bool) -> torch.Tensor:
    """A zero tensor with these sizes and strides, whose data pointer is 16-byte aligned or not."""
    span = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
    base = torch.zeros(span + 16, dtype=dtype)
    offset = 0 if aligned else 1  # one element past an aligned allocation is misaligned
    return base.as_strided(shape, stride, offset)


def compile_all(reductions: list[Reduction]) -> int:
    """Compile `reductions` in this process (each lands in the code index); returns compilations run."""
    before = common.compile_count
    for reduction in reductions:
        args = tuple(operand(*spec) for spec in reduction.signature)
        common.compiled_call(reduction.fn, dict(reduction.options), args)
    return common.compile_count - before


def _worker() -> None:
    """A worker process: imports what compiling needs, then pickled reductions on stdin, the count on stdout."""
    import torch._inductor.compile_fx  # noqa: F401, PLC0415  (while the parent's dry step still runs)

    threads, reductions = pickle.load(sys.stdin.buffer)
    # the parent's thread count, not fewer for sharing the cores: inductor generates the loops for it
    torch.set_num_threads(threads)
    print(compile_all(reductions))


_WORKER_COMMAND = "from triton_adder.backends.cpu.precompile import _worker; _worker()"


def _start_worker() -> subprocess.Popen:
    # A fresh interpreter (not multiprocessing, which re-runs a caller's unguarded script), importing
    # this same copy of the package (`child_env`) and sharing this process's inductor cache through it.
    # stderr goes to a file: a pipe nobody reads while waiting on another worker could fill and stall it.
    error_log = tempfile.TemporaryFile()
    worker = subprocess.Popen([sys.executable, "-c", _WORKER_COMMAND], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=error_log, env=child_env())  # fmt: skip
    worker.error_log = error_log
    return worker


def _send(worker: subprocess.Popen, reductions: list[Reduction]) -> None:
    try:
        # pickle over a pipe to a child this process started (never a file): dtypes and tuples as they are
        worker.stdin.write(pickle.dumps((torch.get_num_threads(), reductions)))  # read whole before any output
        worker.stdin.close()
    except BrokenPipeError:  # it died before reading: `_wait` reports it
        pass


def _wait(worker: subprocess.Popen) -> int:
    """What a worker compiled, once it is done (0, with a warning, if it failed)."""
    out = worker.stdout.read()
    if worker.wait() == 0:
        return int(out.split()[-1])
    worker.error_log.seek(0)
    lines = [line for line in worker.error_log.read().decode(errors="replace").splitlines() if line.strip()]
    warnings.warn(f"triton_adder.precompile: a worker failed ({lines[-1] if lines else worker.returncode}); "
                  "the first step compiles what it left", RuntimeWarning, stacklevel=3)  # fmt: skip
    return 0


def precompile(model: torch.nn.Module, example_input: torch.Tensor, workers: int | None = None) -> PrecompileReport:
    """Compile every CPU reduction one training step of `model` on `example_input` needs, in parallel.

    workers: processes (default: the usable CPUs, at most `DEFAULT_MAX_WORKERS`; 1 compiles in this
    process). They start first and
    import torch while the dry step runs; those with nothing to compile are stopped. Returns a
    `PrecompileReport`. Compilations the code index already holds are skipped, so a second call
    costs one dry step. A worker that fails is reported with a warning; what it did not compile is
    compiled by the first step, as without `precompile`.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    started = time.perf_counter()
    on_the_cpu_path = backends.backend_name(example_input) == "cpu" and example_input.device.type == "cpu"
    if not on_the_cpu_path or common.compile_mode() != "exact" or not common.compiler_enabled():
        return PrecompileReport(0, 0, 0, time.perf_counter() - started)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = workers or min(DEFAULT_MAX_WORKERS, usable)
    running = [_start_worker() for _ in range(count)] if count > 1 else []
    try:
        todo = collect(model, example_input)
        if not running:
            return PrecompileReport(len(todo), compile_all(todo), 1, time.perf_counter() - started)
        used = running[: len(todo)]
        for i, worker in enumerate(used):
            _send(worker, todo[i :: len(used)])
        compiled = sum(_wait(worker) for worker in used)
        return PrecompileReport(len(todo), compiled, len(used), time.perf_counter() - started)
    finally:
        for worker in running:
            if worker.poll() is None:  # not needed (or interrupted): stop it
                worker.kill()
                worker.wait()
            for stream in (worker.stdin, worker.stdout, worker.error_log):
                stream.close()
