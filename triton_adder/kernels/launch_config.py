"""Launch configuration shared by every adder kernel launcher.

A kernel never picks its own tiles: its launcher receives a `KernelConfig` (from the tuner's
cache, or from the launcher's heuristic default), so `tuning/` can search these knobs as data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


def _is_power_of_two(v: int) -> bool:
    return isinstance(v, int) and v > 0 and (v & (v - 1)) == 0


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
        lo, hi = self.BLOCK_RANGE
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not (_is_power_of_two(value) and lo <= value <= hi):
                raise ValueError(f"{argument}.{name} must be a power of two in [{lo}, {hi}], got {value!r}")
        if self.num_warps not in self.WARPS:
            raise ValueError(f"{argument}.num_warps must be one of {self.WARPS}, got {self.num_warps!r}")
        if self.num_stages not in self.STAGES:
            raise ValueError(f"{argument}.num_stages must be one of {self.STAGES}, got {self.num_stages!r}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, argument: str = "config") -> KernelConfig:
        """Build from a plain dict (the tuner's cache format), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{argument} has unknown keys {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**values).validate(argument)
