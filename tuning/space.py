"""A tunable described as data: named knobs with candidate values, constraints, a problem key, a runner.

Nothing here knows what is being tuned. A config is a plain ``dict`` mapping knob name -> value
(JSON-serialisable, so it can be cached as is).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Config = dict[str, Any]


def next_power_of_two(value: int) -> int:
    """Smallest power of two >= value (1 for value <= 1)."""
    value = int(value)
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class Knob:
    """One searchable parameter. `values` are ordered: neighbours in this order are what local refinement tries."""

    name: str
    values: tuple

    def __post_init__(self):
        values = tuple(self.values)
        if not values:
            raise ValueError(f"knob {self.name!r}: values must be a non-empty sequence, got {self.values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"knob {self.name!r}: values must be distinct, got {values!r}")
        object.__setattr__(self, "values", values)


@dataclass(frozen=True)
class Constraint:
    """A named predicate on a config; `accepts(config)` False prunes the config before any run.

    The name is what a pruned config is reported with, so make it say the rule ("block_m <= 64").
    """

    name: str
    accepts: Callable[[Config], bool]


def tile_within(knob: str, extent: int) -> Constraint:
    """Prune tiles larger than the problem extent rounded up to a power of two (they only compute padding)."""
    limit = next_power_of_two(extent)
    return Constraint(f"{knob} <= {limit} (extent {extent})", lambda config: config[knob] <= limit)


def estimate_at_most(name: str, estimate: Callable[[Config], float], limit: float) -> Constraint:
    """Prune configs whose resource `estimate` (shared memory bytes, registers per thread, ...) exceeds `limit`."""
    return Constraint(f"{name} <= {limit}", lambda config: estimate(config) <= limit)


class SearchSpace:
    """The Cartesian product of some knobs' candidate values."""

    def __init__(self, knobs: Sequence[Knob]):
        names = [k.name for k in knobs]
        if not names:
            raise ValueError("knobs must name at least one Knob")
        if len(set(names)) != len(names):
            raise ValueError(f"knobs must have distinct names, got {names}")
        self.knobs = tuple(knobs)
        self._by_name = {k.name: k for k in self.knobs}

    @classmethod
    def from_dict(cls, values: Mapping[str, Sequence]) -> SearchSpace:
        """SearchSpace({"block_m": (32, 64), ...}): one knob per key, in insertion order."""
        return cls([Knob(name, tuple(vals)) for name, vals in values.items()])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def __len__(self) -> int:
        size = 1
        for knob in self.knobs:
            size *= len(knob.values)
        return size

    def __iter__(self) -> Iterator[Config]:
        for values in itertools.product(*(k.values for k in self.knobs)):
            yield dict(zip(self.names, values))

    def __contains__(self, config: Mapping) -> bool:
        return set(config) == set(self._by_name) and all(config[n] in k.values for n, k in self._by_name.items())

    def neighbours(self, config: Mapping) -> list[Config]:
        """Configs that differ from `config` in one knob by one step in that knob's value order."""
        result = []
        for knob in self.knobs:
            i = knob.values.index(config[knob.name])
            for j in (i - 1, i + 1):
                if 0 <= j < len(knob.values):
                    result.append({**config, knob.name: knob.values[j]})
        return result

    def coarse(self, stride: int = 2) -> SearchSpace:
        """Every `stride`-th value of each knob, always keeping both ends: the grid of the coarse pass."""
        knobs = []
        for knob in self.knobs:
            picked = list(knob.values[::stride])
            if picked[-1] != knob.values[-1]:
                picked.append(knob.values[-1])
            knobs.append(Knob(knob.name, tuple(picked)))
        return SearchSpace(knobs)


def config_key(config: Mapping) -> tuple:
    """A hashable, order-independent identity of a config."""
    return tuple(sorted(config.items()))


@dataclass
class Tunable:
    """Everything the search needs to tune one problem.

    name: the op ("forward", "matmul", ...); problem: the problem key (JSON-serialisable mapping,
    e.g. sizes); run(config) executes the op once with that config and returns its output;
    default: the heuristic config (the baseline the speedup is measured against and the reference
    output every winner is checked against); outputs_match(candidate, reference) -> bool decides
    that check (None: ``candidate == reference``, fine for plain numbers; pass a tolerance-aware
    comparison for tensors). screen(config) -> prune.ScreenResult: an optional compile-time
    pre-filter (`prune.prune`) run before anything is timed; screen_relative_limit: drop configs
    scoring above this multiple of the best score screened in the search; screen_key(config) -> the
    part of a config the screen's verdict depends on (None: all of it; e.g. without a run-time
    argument), so configs that share it are screened once; screen_cache: the verdicts by
    config_key(screen_key(config)), in memory; screen_identity: a `verdicts.ScreenIdentity` (Triton
    version, target, kernel hash, problem) under which `search` takes shipped verdicts into
    screen_cache (None: none are loaded).
    """

    name: str
    space: SearchSpace
    problem: Mapping[str, Any]
    run: Callable[[Config], Any]
    default: Config
    constraints: Sequence[Constraint] = field(default_factory=tuple)
    outputs_match: Callable[[Any, Any], bool] | None = None
    screen: Callable[[Config], Any] | None = None
    screen_relative_limit: float | None = None
    screen_key: Callable[[Config], Mapping] | None = None
    screen_cache: dict = field(default_factory=dict, repr=False, compare=False)
    screen_identity: Any = None

    def violations(self, config: Mapping) -> list[str]:
        """Names of the constraints `config` breaks (empty: valid)."""
        return [c.name for c in self.constraints if not c.accepts(config)]

    def outputs_agree(self, candidate: Any, reference: Any) -> bool:
        if self.outputs_match is None:
            return bool(candidate == reference)
        return bool(self.outputs_match(candidate, reference))
