"""Run-time lookup of tuned launch configs: the bridge from the kernel launchers to `tuning`'s cache.

    config = triton_adder.autotune.lookup.lookup("forward", x, weight, geom)   # KernelConfig or None
    y = forward(x, weight, bias, geom, config)                          # None -> heuristic default

The cache lives in ``$TRITON_ADDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton-adder``, else
``~/.cache/triton-adder``, one JSON file per device identity (GPU name, compute capability, Triton
version; the interpreter is its own identity), above the configs shipped in ``tuning/configs/``.
An entry is keyed by op, kernel source hash, dtype, memory layout and the problem (`problem_key`
of its `geometry.LayerShape`), batch bucketed to a power of two: lookup takes the exact bucket,
then the nearest one, then None.
Timings taken by wall clock (interpreter/CPU) are never used on a GPU. An entry is used only if its
launcher would launch it (`accept_entry`, the cache's validator: exact int fields, the launcher's limits);
the cache ignores any other content with one warning naming the file, and the tuner re-tunes it.

The backward ops' entries are also keyed by grad_mode (the kernels compile differently for each,
and only paper mode may take the convolution identity). A "grad_weight" entry is a choice, not
only a launch config: the method (`contract.GRAD_WEIGHT_METHODS`) and, for the kernel, its
KernelConfig and the split of its reduction (`GradWeightChoice`; `grad_weight_choice` reads it).

Every answer is memoised per (op, device, dtype, shapes, strides, geometry, grad_mode), so after the
first call for a shape a lookup is one dict probe; `clear()` forgets (the tuner calls it after
storing; call it too after changing $TRITON_ADDER_CACHE_DIR in a running process).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from triton_adder.contract import GRAD_MODES, GRAD_WEIGHT_METHODS, layout_name
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.kernels.launch_config import MAX_ACCUMULATORS_PER_THREAD, KernelConfig
from tuning import DeviceIdentity, TuningCache, device_identity

OPS = ("forward", "grad_input", "grad_weight")
BACKWARD_OPS = ("grad_input", "grad_weight")
CACHE_DIR_ENV = "TRITON_ADDER_CACHE_DIR"
APP_NAME = "triton-adder"


@dataclass(frozen=True)
class GradWeightChoice:
    """How one weight-gradient problem is computed: what the tuner searched and cached for it.

    method: one of `contract.GRAD_WEIGHT_METHODS`; config and split_k: the kernel's launch config
    and the number of splits of its N*Ho*Wo reduction (`kernels.grad_weight.grad_weight_split`),
    used when method is "triton". As a plain dict (the tuner's config and cache format) it is the
    KernelConfig's fields plus "method" and "split_k".
    """

    method: str
    config: KernelConfig
    split_k: int

    def as_dict(self) -> dict:
        return {**self.config.as_dict(), "method": self.method, "split_k": self.split_k}

    @classmethod
    def from_dict(cls, values: dict, argument: str = "grad_weight choice") -> GradWeightChoice:
        """Parse the dict form, with ValueError naming `argument` and what is accepted."""
        values = dict(values)
        if "method" not in values or "split_k" not in values:
            raise ValueError(f"{argument} needs 'method' and 'split_k' besides the kernel config, got {sorted(values)}")
        method, split_k = values.pop("method"), values.pop("split_k")
        if method not in GRAD_WEIGHT_METHODS:
            raise ValueError(f"{argument}.method must be one of {GRAD_WEIGHT_METHODS}, got {method!r}")
        if not (isinstance(split_k, int) and not isinstance(split_k, bool) and split_k >= 1):
            raise ValueError(f"{argument}.split_k must be a positive int, got {split_k!r}")
        return cls(method, KernelConfig.from_dict(values, argument=argument), split_k)


_memo: dict[tuple, KernelConfig | GradWeightChoice | None] = {}
_caches: dict[tuple[str, Path], TuningCache] = {}
_identities: dict[torch.device, DeviceIdentity] = {}


def cache_dir() -> Path:
    """The user's tuning cache directory: $TRITON_ADDER_CACHE_DIR, else ``$XDG_CACHE_HOME/triton-adder``,
    else ``~/.cache/triton-adder`` on every platform, as torch.hub and Triton place their caches
    (no platformdirs: the GPU machines' image lacks it and nothing can be installed there)."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / APP_NAME


def kernel_hash(op: str) -> str:
    """Source hash of the kernel that `op` launches: a cached config is only valid for that source."""
    if op == "forward":
        from triton_adder.kernels.forward import KERNEL_SOURCE_HASH

        return KERNEL_SOURCE_HASH
    if op == "grad_input":
        from triton_adder.kernels.grad_input import GRAD_INPUT_KERNEL_HASH

        return GRAD_INPUT_KERNEL_HASH
    if op == "grad_weight":
        # The entry is a choice between the kernel and the convolution identity, so it is only
        # valid for both sources (and for this choice's format: an older kernel-only entry is not one).
        from triton_adder.backends import conv_identity
        from triton_adder.kernels.grad_weight import GRAD_WEIGHT_KERNEL_HASH

        digest = hashlib.sha256(f"{GRAD_WEIGHT_KERNEL_HASH} method,split_k ".encode())
        digest.update(inspect.getsource(conv_identity).encode())
        return digest.hexdigest()
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def op_problem(op: str, problem: dict, grad_mode: str) -> dict:
    """The cache's problem key for `op`: `problem` (`problem_key`), plus "grad_mode" for the backward ops."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    return {**problem, "grad_mode": grad_mode} if op in BACKWARD_OPS else dict(problem)


def problem_key(shape: LayerShape) -> dict:
    """The problem an adder layer call solves, as the cache keys it (JSON-serialisable).

    "batch" is the field the cache buckets to a power of two.
    """
    return {
        "batch": shape.batch,
        "in_channels": shape.cin,
        "height": shape.h,
        "width": shape.w,
        "out_channels": shape.cout,
        "kernel": [shape.kh, shape.kw],
        "stride": list(shape.geom.stride),
        "padding": list(shape.geom.padding),
        "dilation": list(shape.geom.dilation),
        "groups": int(shape.geom.groups),
        "out_size": list(shape.geom.out_size),
    }


def identity(device: torch.device) -> DeviceIdentity:
    """The cache identity of `device` (memoised: querying the GPU name is not free)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _identities:
        _identities[device] = device_identity(device)
    return _identities[device]


def cache_for(device: torch.device, directory: str | Path | None = None) -> TuningCache:
    """The TuningCache of `device`'s identity in `directory` (default `cache_dir()`), one per process."""
    ident = identity(device)
    directory = Path(directory) if directory is not None else cache_dir()
    key = (ident.filename, directory)
    if key not in _caches:
        _caches[key] = TuningCache(directory, ident, accept_entry=accept_entry)
    return _caches[key]


_SIZES = ("batch", "in_channels", "height", "width", "out_channels", "groups")  # `problem_key`'s ints
_PAIRS = ("kernel", "stride", "padding", "dilation", "out_size")  # and its [int, int] fields


def _check_problem(problem: dict, where: str, sizes: tuple[str, ...]) -> None:
    """ValueError unless `problem` has exactly `problem_key`'s fields (`sizes` of them ints), as exact ints."""
    if set(problem) != {*sizes, *_PAIRS}:
        raise ValueError(f"{where} has the fields {sorted(problem)}, expected {sorted({*sizes, *_PAIRS})}")
    for name, value in problem.items():
        values = value if name in _PAIRS and isinstance(value, list) and len(value) == 2 else [value]
        # The launchers index with int64: anything outside cannot be a real layer (and no float, bool or string).
        if (name in _PAIRS and values is not value) or not all(type(v) is int and 0 <= v < 2**63 for v in values):
            raise ValueError(f"{where}.{name} must be {'[int, int]' if name in _PAIRS else 'an int'}, got {value!r}")


def check_problem_key(problem: dict, where: str) -> None:
    """ValueError (naming `where`) unless `problem` is a `problem_key` of a real layer call."""
    _check_problem(problem, where, _SIZES)


def parse_config(op: str, values: dict, grad_mode: str) -> KernelConfig | GradWeightChoice:
    """A cached config of `op` as its launcher takes it; ValueError unless the launcher would launch it."""
    if op == "grad_weight":
        found = GradWeightChoice.from_dict(values, argument="cached grad_weight choice")
        if found.method == "conv_identity" and grad_mode == "exact":
            raise ValueError("cached grad_weight choice: method 'conv_identity' cannot compute grad_mode='exact'")
        kernel = found.config
    else:
        found = kernel = KernelConfig.from_dict(values, argument=f"cached {op} config")
    if op == "forward":
        from triton_adder.kernels.forward import validate_config

        validate_config(kernel, argument="cached forward config")
    elif kernel.accumulators_per_thread() > MAX_ACCUMULATORS_PER_THREAD:
        # The backward launchers check only the generic ranges; this is the limit the tuner searches within
        # (`spaces.ACCUMULATOR_CONSTRAINT`): beyond it the accumulator tile spills, or fails to compile.
        raise ValueError(f"cached {op} config: block_m * block_n / (32 * num_warps) = "
                         f"{kernel.accumulators_per_thread():g} > {MAX_ACCUMULATORS_PER_THREAD} (accumulators/thread)")
    return found


def accept_entry(entry: dict) -> None:
    """The cache's validator (`TuningCache(accept_entry=...)`): ValueError unless an adder layer could use `entry`.

    The tuner and the layer share it, so whatever the layer would ignore the tuner re-tunes.
    """
    op, problem = entry["op"], dict(entry["problem"])
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    grad_mode = problem.pop("grad_mode", "paper") if op in BACKWARD_OPS else "paper"
    if grad_mode not in GRAD_MODES or (op in BACKWARD_OPS and "grad_mode" not in entry["problem"]):
        raise ValueError(f"{op} problem.grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    reduced_from = problem.pop("reduced_from", None)
    _check_problem(problem, f"{op} problem", _SIZES)
    if reduced_from is not None:  # a functional run's shrunk problem names the real one, without its batch
        if not isinstance(reduced_from, dict):
            raise ValueError(f"{op} problem.reduced_from must be an object")
        _check_problem(reduced_from, f"{op} problem.reduced_from", _SIZES[1:])
    parse_config(op, entry["config"], grad_mode)


def _cached(op: str, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str):
    """The parsed cache entry for this call (KernelConfig, or GradWeightChoice for "grad_weight"), or None."""
    key = (op, x.device, x.dtype, tuple(x.shape), x.stride(), tuple(weight.shape), geom, grad_mode)
    try:
        return _memo[key]
    except KeyError:
        pass
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    problem = op_problem(op, problem_key(LayerShape.of(x.shape, weight.shape, geom)), grad_mode)
    found = None
    try:
        hit = cache_for(x.device).lookup(
            op,
            kernel_hash(op),
            str(x.dtype).removeprefix("torch."),
            layout_name(x),
            problem,
            allow_functional=x.device.type != "cuda",  # a wall-clock ranking says nothing about a GPU
        )
        # The cache returns only entries `accept_entry` took (it warned once about the others), so this parses.
        found = None if hit is None else parse_config(op, hit.config, grad_mode)
    except (OSError, ValueError, TypeError) as error:  # never let the cache break a forward
        warnings.warn(f"ignoring the tuning cache for {op}: {error}", RuntimeWarning, stacklevel=3)
        found = None
    _memo[key] = found
    return found


def lookup(
    op: str, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str = "paper"
) -> KernelConfig | None:
    """Tuned KernelConfig for launching `op`'s Triton kernel on these operands, or None (use the default).

    op: "forward", "grad_input" or "grad_weight" (the weight-gradient *kernel*'s config: None when
    the cached choice is the convolution identity, see `grad_weight_choice`); x: the layer input
    (N, Cin, H, W); weight (Cout, Cin/groups, kh, kw); geom: the resolved geometry. Memoised per
    shape; never raises for a missing or unreadable cache.
    """
    found = _cached(op, x, weight, geom, grad_mode)
    if isinstance(found, GradWeightChoice):
        return found.config if found.method == "triton" else None
    return found


def grad_weight_choice(
    x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry, grad_mode: str
) -> GradWeightChoice | None:
    """The tuned weight-gradient choice (method, kernel config, split) for this call, or None."""
    return _cached("grad_weight", x, weight, geom, grad_mode)


def clear() -> None:
    """Forget memoised answers and loaded cache files (call after the cache changed on disk)."""
    _memo.clear()
    for cache in _caches.values():
        cache.reload()
