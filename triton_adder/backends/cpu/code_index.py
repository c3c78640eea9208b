"""On-disk index from a CPU reduction's exact call signature to the module inductor generated for it.

Without it, a fresh process re-traces each layer-pass shape with ``make_fx`` and looks it up in
inductor's FX graph cache before it can run: ResNet-50's first step at batch 2 spent 30 s doing that
for 56 shapes with a warm cache (`results/benchmarks/cold_start.txt`). Inductor writes each
compilation as a Python module (the generated C++ loops are built into shared libraries by it,
cached by their source) whose ``call(args)`` runs the graph; this index records, per signature, which
module that was, so the next process imports the module and calls it directly.

Keys cover everything the generated code depends on: torch version, the CPU's vector ISA, torch's
thread count, the function's source and options, and each operand's sizes, strides, dtype and alignment. One small
JSON file per key, written to a temporary name and renamed into place, so two processes writing
the same key (with the same content) cannot leave a torn file; a file that is missing, unreadable or
points at a module that is gone (or outside inductor's cache) is ignored and the shape compiled
again. Inductor settings a user changes in-process are not part of the key. The index lives beside
inductor's own cache (``$TORCHINDUCTOR_CACHE_DIR``, else inductor's default), so clearing that
cache clears both.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

INDEX_DIR_NAME = "triton_adder_cpu_index"


def _inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # noqa: PLC0415

    return Path(cache_dir())


def index_dir() -> Path:
    return _inductor_cache_dir() / INDEX_DIR_NAME


@functools.cache
def _vector_isa() -> str:
    from torch._inductor import cpu_vec_isa  # noqa: PLC0415

    _check_isas_at_once(cpu_vec_isa)
    return str(cpu_vec_isa.pick_vec_isa())


def _check_isas_at_once(cpu_vec_isa) -> None:
    """Run inductor's per-ISA build checks in parallel threads before `pick_vec_isa` runs them in turn.

    With an empty cache, `pick_vec_isa` builds a probe library per candidate ISA with g++, one after
    another, before the first compilation of a process can start. The checks are independent (each its own
    file lock and g++ process) and cached per ISA, so checking them at once leaves the same answer
    in that cache. Only on x86, where there are several candidates; a change in these inductor
    internals only loses the speed-up.
    """
    try:
        if platform.machine() not in ("x86_64", "AMD64"):
            return
        flags = cpu_vec_isa.x86_isa_checker()
        candidates = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
        with ThreadPoolExecutor(max(1, len(candidates))) as pool:
            list(pool.map(bool, candidates))
    except Exception:  # noqa: BLE001  (pick_vec_isa still checks each one itself)
        pass


def key(fn: Callable, options: dict, signature: tuple) -> str:
    """The index key of fn(*args, **options) for operands with this `common._signature`."""
    # the thread count too: inductor writes OpenMP loops for it (none at all for 1 thread)
    parts = [torch.__version__, _vector_isa(), str(torch.get_num_threads()), fn.__module__, fn.__qualname__,
             inspect.getsource(fn),
             repr(sorted(options.items())), repr(signature)]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def loaded_modules() -> list[ModuleType]:
    """The modules inductor has loaded so far (pass to `new_module` after a compilation)."""
    from torch._inductor.codecache import PyCodeCache  # noqa: PLC0415

    return list(PyCodeCache.modules)


def new_module(before: list[ModuleType]) -> ModuleType | None:
    """The one generated module with a ``call`` that a compilation loaded since `before`, else None."""
    seen = {id(m) for m in before}
    new = [m for m in loaded_modules() if id(m) not in seen and callable(getattr(m, "call", None))]
    return new[0] if len(new) == 1 else None


def runner(module: ModuleType) -> Callable:
    """fn(*args) -> outputs, calling the generated module directly (its ``call`` takes a list it empties)."""
    return lambda *args: module.call(list(args))


def store(index_key: str, module: ModuleType) -> None:
    """Record `module` for `index_key`; never raises (a read-only cache only costs the next process time)."""
    try:
        directory = index_dir()
        directory.mkdir(parents=True, exist_ok=True)
        record = {"module": Path(module.__file__).stem, "path": module.__file__}
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as out:
            json.dump(record, out)
        os.replace(out.name, directory / f"{index_key}.json")
    except (OSError, TypeError, AttributeError):
        pass


def has(index_key: str) -> bool:
    """Whether `load(index_key)` would find a recorded module (without importing it)."""
    try:
        path = json.loads((index_dir() / f"{index_key}.json").read_text())["path"]
        return os.path.isfile(path)
    except Exception:  # noqa: BLE001  (unreadable or torn: as good as absent)
        return False


def load(index_key: str) -> Callable | None:
    """The runner of the module recorded for `index_key`, or None (not recorded, unreadable, gone)."""
    try:
        record = json.loads((index_dir() / f"{index_key}.json").read_text())
        path, module_key = record["path"], record["module"]
        # only a module inside inductor's own cache, whose code inductor would run anyway
        if not os.path.isfile(path) or not Path(path).resolve().is_relative_to(_inductor_cache_dir().resolve()):
            return None
        from torch._inductor.codecache import PyCodeCache  # noqa: PLC0415

        return runner(PyCodeCache.load_by_key_path(module_key, path))
    except Exception:  # noqa: BLE001  (any failure: compile again, as without the index)
        return None
