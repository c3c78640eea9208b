"""The int8 kernel's tuned blockings: the cache keys, the entry check, and the layer's run-time lookup.

`autotune.int8` tunes the blocking (`native.Blocking`) and stores winners here; `QuantizedAdder2d`
(blocking None) looks its call up with `blocking_for`. Keys (one home, DESIGN.md section 7):

- Cache file: one per CPU model and kernel variant, beside the kernels' caches (`lookup.cache_dir`):
  ``DeviceIdentity(name=<CPU model name>, capability="int8-<variant>[-ifma]", triton_version="none")``.
- Entry: op "int8_forward"; kernel hash = the compiled library's name (a hash of the source, the
  flags and the compiler's version, `native.library_path`), so a rebuilt kernel is tuned again;
  dtype "float32" and layout "contiguous" always (the blocking only sees the int8 operands);
  problem = `lookup.problem_key` of the layer call (batch bucketed to a power of two, nearest bucket
  at lookup) plus "threads", torch's thread count when tuned: a winner for 2 threads says nothing
  about 16.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import asdict

from triton_adder.autotune import lookup
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.quant import native
from tuning import DeviceIdentity, TuningCache

OP = "int8_forward"
KEY_DTYPE, KEY_LAYOUT = "float32", "contiguous"


@functools.cache
def cpu_name() -> str:
    """The CPU model ("Intel(R) Xeon(R) Processor"): /proc/cpuinfo's model name, else the platform's word."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def identity(library: native.Library) -> DeviceIdentity:
    """The cache identity: CPU model and kernel variant (timings are valid for nothing else)."""
    variant = library.isa + ("-ifma" if "-mavx512ifma" in native.isa_flags(library.isa) else "")
    return DeviceIdentity(cpu_name(), f"int8-{variant}", "none")


def kernel_hash(library: native.Library) -> str:
    """The compiled library's name: it changes with the source, the flags and the compiler."""
    return library.path.stem


def problem_of(shape: LayerShape, threads: int) -> dict:
    return {**lookup.problem_key(shape), "threads": int(threads)}


def config_of(blocking: native.Blocking) -> dict:
    return asdict(blocking)


def blocking_of(config: dict) -> native.Blocking:
    """A config dict as a checked Blocking; ValueError (naming the entry) for anything else."""
    if set(config) != {"mr", "nr", "mc", "nc", "kc", "threads"}:
        raise ValueError(f"int8 config must have the fields mr, nr, mc, nc, kc, threads, got {sorted(config)}")
    if config["threads"] is None:
        raise ValueError("int8 config.threads must be a positive int, got None")
    return native.Blocking(**config).check("cached int8 config")


def accept_entry(entry: dict) -> None:
    """The cache's validator: ValueError unless the layer could run `entry`."""
    if entry["op"] != OP:
        raise ValueError(f"op must be {OP!r}, got {entry['op']!r}")
    problem = dict(entry["problem"])
    threads = problem.pop("threads", None)
    if type(threads) is not int or threads < 1:
        raise ValueError(f"{OP} problem.threads must be a positive int, got {threads!r}")
    lookup.check_problem_key(problem, f"{OP} problem")
    blocking = blocking_of(dict(entry["config"]))
    if blocking.threads > threads:
        raise ValueError(f"{OP} config.threads {blocking.threads} exceeds the problem's {threads}")


_caches: dict[tuple, TuningCache] = {}


def cache_for(library: native.Library) -> TuningCache:
    """The TuningCache of this CPU and variant in `lookup.cache_dir()`, one per process and directory."""
    ident, directory = identity(library), lookup.cache_dir()
    key = (ident, directory)
    if key not in _caches:
        _caches[key] = TuningCache(directory, ident, shipped_dirs=(), accept_entry=accept_entry)
    return _caches[key]


_memo: dict[tuple, native.Blocking] = {}
_CACHE_SETTINGS = (lookup.CACHE_DIR_ENV, "XDG_CACHE_HOME", "HOME")


def blocking_for(
    library: native.Library, x_shape: Sequence[int], weight_shape: Sequence[int], geom: Conv2dGeometry, threads: int
) -> native.Blocking:
    """The blocking a `QuantizedAdder2d` call runs: the tuned one cached for this CPU, variant, shape (nearest
    batch bucket) and thread count, else `native.DEFAULT_BLOCKING`. Memoised; never raises for the cache."""
    # Cheap to build (a layer call pays it): the settings `lookup.cache_dir` reads, not the path it makes.
    key = (library.path, tuple(x_shape), tuple(weight_shape), geom, threads, *map(os.environ.get, _CACHE_SETTINGS))
    found = _memo.get(key)
    if found is not None:
        return found
    found = native.DEFAULT_BLOCKING[library.isa]
    try:
        shape = LayerShape.of(tuple(x_shape), tuple(weight_shape), geom)
        hit = cache_for(library).lookup(OP, kernel_hash(library), KEY_DTYPE, KEY_LAYOUT, problem_of(shape, threads))
        if hit is not None:  # the cache returns only entries `accept_entry` took, so this parses
            found = blocking_of(hit.config)
    except (OSError, ValueError, TypeError) as error:  # never let the cache break a forward
        warnings.warn(f"ignoring the int8 tuning cache: {error}", RuntimeWarning, stacklevel=3)
    _memo[key] = found
    return found


def clear() -> None:
    """Forget memoised blockings and loaded cache files (after tuning, or a cache changed on disk)."""
    _memo.clear()
    for cache in _caches.values():
        cache.reload()
