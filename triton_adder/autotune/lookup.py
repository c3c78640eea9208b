"""Run-time lookup of tuned launch configs: the bridge from the kernel launchers to `tuning`'s cache.

    config = triton_adder.autotune.lookup.lookup("forward", x, weight, geom)   # KernelConfig or None
    y = forward(x, weight, bias, geom, config)                          # None -> heuristic default

The cache lives in ``$TRITON_ADDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/triton-adder``, else
``~/.cache/triton-adder``, one JSON file per device identity (GPU name, compute capability, Triton
version; the interpreter is its own identity), above the configs shipped in ``tuning/configs/``.
An entry is keyed by op, kernel source hash, dtype, memory layout and the problem (`problem_key`
of its `geometry.LayerShape`), batch bucketed to a power of two: lookup takes the exact bucket,
then the nearest one, then None.
Timings taken by wall clock (interpreter/CPU) are never used on a GPU.

Every answer is memoised per (op, device, dtype, shapes, strides, geometry), so after the first
call for a shape a lookup is one dict probe; `clear()` forgets (the tuner calls it after storing;
call it too after changing $TRITON_ADDER_CACHE_DIR in a running process).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import platformdirs
import torch

from triton_adder.contract import layout_name
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.tuning import DeviceIdentity, TuningCache, device_identity

OPS = ("forward", "grad_input", "grad_weight")
CACHE_DIR_ENV = "TRITON_ADDER_CACHE_DIR"
APP_NAME = "triton-adder"

_memo: dict[tuple, KernelConfig | None] = {}
_caches: dict[tuple[str, Path], TuningCache] = {}
_identities: dict[torch.device, DeviceIdentity] = {}


def cache_dir() -> Path:
    """The user's tuning cache directory: $TRITON_ADDER_CACHE_DIR, else the platform's user cache
    directory for "triton-adder" (``$XDG_CACHE_HOME/triton-adder`` or ``~/.cache/triton-adder`` on Linux)."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def kernel_hash(op: str) -> str:
    """Source hash of the kernel that `op` launches: a cached config is only valid for that source."""
    if op == "forward":
        from triton_adder.kernels.forward import KERNEL_SOURCE_HASH

        return KERNEL_SOURCE_HASH
    if op == "grad_input":
        from triton_adder.kernels.grad_input import GRAD_INPUT_KERNEL_HASH

        return GRAD_INPUT_KERNEL_HASH
    if op == "grad_weight":
        from triton_adder.kernels.grad_weight import GRAD_WEIGHT_KERNEL_HASH

        return GRAD_WEIGHT_KERNEL_HASH
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


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
        _caches[key] = TuningCache(directory, ident)
    return _caches[key]


def lookup(op: str, x: torch.Tensor, weight: torch.Tensor, geom: Conv2dGeometry) -> KernelConfig | None:
    """Tuned KernelConfig for launching `op` on these operands, or None (use the launcher's default).

    op: "forward", "grad_input" or "grad_weight" (the weight-gradient *kernel*'s config);
    x: the layer input (N, Cin, H, W); weight (Cout, Cin/groups, kh, kw); geom: the resolved
    geometry. Memoised per shape; never raises for a missing or unreadable cache.
    """
    key = (op, x.device, x.dtype, tuple(x.shape), x.stride(), tuple(weight.shape), geom)
    try:
        return _memo[key]
    except KeyError:
        pass
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    config = None
    try:
        cache = cache_for(x.device)
        hit = cache.lookup(
            op,
            kernel_hash(op),
            str(x.dtype).removeprefix("torch."),
            layout_name(x),
            problem_key(LayerShape.of(x.shape, weight.shape, geom)),
            allow_functional=x.device.type != "cuda",  # a wall-clock ranking says nothing about a GPU
        )
        if hit is not None:
            config = KernelConfig.from_dict(hit.config, argument=f"cached {op} config")
    except (OSError, ValueError, TypeError) as error:
        warnings.warn(f"ignoring the tuning cache for {op}: {error}", RuntimeWarning, stacklevel=2)
        config = None
    _memo[key] = config
    return config


def clear() -> None:
    """Forget memoised answers and loaded cache files (call after the cache changed on disk)."""
    _memo.clear()
    for cache in _caches.values():
        cache.reload()
