"""Launch configuration shared by every adder kernel launcher, and the limits all of them obey.

A kernel never picks its own tiles: its launcher receives a `KernelConfig` (from the tuner's
cache, or from the launcher's heuristic default), so `tuning/` can search these knobs as data.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from triton_adder.contract import is_power_of_two, next_power_of_two

MAX_ACCUMULATORS_PER_THREAD = 128
"""float32 accumulators (block_m * block_n / (32 * num_warps)) one thread may hold in the rank-1
loops: a thread has 255 registers, and beyond this the accumulator tile alone spills."""


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch knobs: BLOCK_M x BLOCK_N outputs per program, BLOCK_K reduced per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    # Accepted ranges; Triton needs power-of-two block shapes (tl.arange).
    BLOCK_RANGE = (1, 1024)
    WARPS = (1, 2, 4, 8, 16)
    STAGES = (1, 2, 3, 4, 5)

    def validate(self, argument: str = "config") -> KernelConfig:
        """Raise ValueError naming `argument` and the accepted values if any knob is invalid."""
        for field in fields(self):  # exact ints: True == 1 and 64.0 == 64 would pass the checks below
            if type(getattr(self, field.name)) is not int:
                raise ValueError(f"{argument}.{field.name} must be an int, got {getattr(self, field.name)!r}")
        lo, hi = self.BLOCK_RANGE
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not (is_power_of_two(value) and lo <= value <= hi):
                raise ValueError(f"{argument}.{name} must be a power of two in [{lo}, {hi}], got {value!r}")
        if self.num_warps not in self.WARPS:
            raise ValueError(f"{argument}.num_warps must be one of {self.WARPS}, got {self.num_warps!r}")
        if self.num_stages not in self.STAGES:
            raise ValueError(f"{argument}.num_stages must be one of {self.STAGES}, got {self.num_stages!r}")
        return self

    def accumulators_per_thread(self) -> float:
        """block_m * block_n / (32 * num_warps): the float32 accumulator tile's share of one thread."""
        return self.block_m * self.block_n / (32 * self.num_warps)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, argument: str = "config") -> KernelConfig:
        """Build from a plain dict (the tuner's cache format), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{argument} has unknown keys {sorted(unknown)}; accepted: {sorted(known)}")
        missing = {"block_m", "block_n", "block_k"} - set(values)
        if missing:
            raise ValueError(f"{argument} lacks {sorted(missing)}")
        return cls(**values).validate(argument)


def kernel_config_of(values: Mapping) -> KernelConfig:
    """The KernelConfig in a tuner config that may hold other knobs too (a weight gradient's method, split)."""
    return KernelConfig(**{f.name: values[f.name] for f in fields(KernelConfig) if f.name in values})


def check_config(config, argument: str = "config") -> KernelConfig:
    """config itself if it is a valid KernelConfig; else ValueError naming `argument`."""
    if not isinstance(config, KernelConfig):
        raise ValueError(f"{argument} must be a KernelConfig or None, got {type(config).__name__}")
    return config.validate(argument)


def pow2_between(value: int, lo: int, hi: int) -> int:
    """The power of two >= value, clamped to [lo, hi] (lo and hi powers of two)."""
    return max(lo, min(hi, next_power_of_two(max(1, value))))


def source_hash(*kernels) -> str:
    """sha256 of the @triton.jit functions' Python source, in order (jitted helpers included).

    The tuner's cache keys on it, so editing a kernel (its docstring too) invalidates its tuned configs.
    """
    digest = hashlib.sha256()
    for kernel in kernels:
        digest.update(inspect.getsource(kernel.fn).encode())
    return digest.hexdigest()
