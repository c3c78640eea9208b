"""Compile-time pruning: screen candidate configs (compile, read resources) before any is timed.

A tunable may supply `screen(config) -> ScreenResult`: typically a compile for the target device
that reports spills, registers, shared memory and instructions per element. `prune` runs it over
candidates on a thread pool (a compile spends its time in ptxas subprocesses and native code, which
release the GIL), caches each verdict per tunable, and returns the survivors ranked by score
(lower = better) plus the dropped configs with reasons. A screen that raises drops the config with
the error as the reason (`ScreenResult.raised`); it never stops the pruning (the search decides
what a screen that only raises means: `search.ScreenFailed`).

Verdicts are cached by the tunable's `screen_key(config)` (the part of a config the compile
depends on; the whole config by default), so configs that differ only in run-time arguments share
one screen call and one cached verdict.

Deadline: `prune(..., deadline=t)` (a `time.perf_counter()` value) starts no screen call after t;
configs not reached are returned as `unscreened` (no verdict, nothing cached). While a screen call
runs, `screen_time_left()` tells it how many seconds remain, so a screen that can bound its own
work (the adder screen's compile timeout) stops at the deadline and raises `ScreenOutOfTime`,
which also leaves the config unscreened (not cached: with more time it would get a verdict).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .space import Config, config_key


@dataclass(frozen=True)
class ScreenResult:
    """One config's screening verdict. ok False drops it (reason says why); score ranks the kept (lower first).

    raised: the screen raised instead of giving a verdict (set by `screen_configs`; reason holds the error).
    """

    ok: bool
    reason: str = ""
    score: float = 0.0
    raised: bool = False


class ScreenOutOfTime(Exception):
    """Raised by a screen that stopped at the deadline (`screen_time_left`): the config stays unscreened."""


_local = threading.local()


def screen_time_left() -> float | None:
    """Seconds left before the deadline of the screen call running in this thread (None: no deadline).

    A screen that can bound its own work (a compile timeout) reads this and raises `ScreenOutOfTime`
    when it runs out, instead of overrunning the search's budget.
    """
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else deadline - time.perf_counter()


@dataclass
class PruneResult:
    """kept: (config, ScreenResult) best score first; dropped: (config, reason); unscreened: configs
    the deadline left without a verdict; errors: (config, reason) of the dropped whose screen raised."""

    kept: list[tuple[Config, ScreenResult]] = field(default_factory=list)
    dropped: list[tuple[Config, str]] = field(default_factory=list)
    unscreened: list[Config] = field(default_factory=list)
    errors: list[tuple[Config, str]] = field(default_factory=list)

    @property
    def kept_configs(self) -> list[Config]:
        return [config for config, _ in self.kept]

    def reasons(self) -> dict[str, int]:
        """Drop reason -> how many configs it dropped."""
        counts: dict[str, int] = {}
        for _, reason in self.dropped:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"screen raised {type(error).__name__}: {text[:200]}"


def screen_configs(
    screen: Callable[[Config], ScreenResult],
    configs: Iterable[Mapping],
    max_workers: int = 4,
    cache: dict[tuple, ScreenResult] | None = None,
    key: Callable[[Mapping], Mapping] | None = None,
    deadline: float | None = None,
) -> list[tuple[Config, ScreenResult | None]]:
    """(config, ScreenResult) for each distinct config, in input order; None: not screened (deadline).

    cache: config_key(key(config)) -> verdict, read and filled (a config in it is not screened
    again); key: the part of a config its verdict depends on (None: all of it), so configs with one
    key are screened once; deadline: a `time.perf_counter()` value after which no screen call starts.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    cache = {} if cache is None else cache

    def screen_key(config: Mapping) -> tuple:
        return config_key(config if key is None else key(config))

    distinct: dict[tuple, Config] = {}
    for config in configs:
        distinct.setdefault(config_key(config), dict(config))
    representatives: dict[tuple, Config] = {}  # screen key -> the first config that has it
    for config in distinct.values():
        representatives.setdefault(screen_key(config), config)
    todo = [k for k in representatives if k not in cache]

    def run_one(k: tuple) -> ScreenResult | None:
        if deadline is not None and time.perf_counter() > deadline:
            return None
        _local.deadline = deadline
        try:
            verdict = screen(dict(representatives[k]))
            if not isinstance(verdict, ScreenResult):
                raise TypeError(f"screen must return a ScreenResult, got {type(verdict).__name__}")
            return verdict
        except ScreenOutOfTime:
            return None
        except Exception as error:  # a config the compiler rejects is data, not a crash
            return ScreenResult(ok=False, reason=_describe(error), raised=True)
        finally:
            _local.deadline = None

    if todo:
        with ThreadPoolExecutor(max_workers=min(max_workers, len(todo))) as pool:
            for k, verdict in zip(todo, pool.map(run_one, todo)):
                if verdict is not None:
                    cache[k] = verdict
    return [(config, cache.get(screen_key(config))) for config in distinct.values()]


def prune(
    tunable,
    configs: Iterable[Mapping],
    max_workers: int = 4,
    top_n: int | None = None,
    relative_limit: float | None = None,
    best_score: float | None = None,
    deadline: float | None = None,
) -> PruneResult:
    """Screen `configs` with `tunable.screen` and split them into kept (ranked), dropped and unscreened.

    tunable: a Tunable (its `screen` None keeps every config, unranked, in input order);
    top_n: keep only the N best-scored (the rest are dropped as "not in the top N");
    relative_limit: drop a kept config whose score exceeds relative_limit x the best score (e.g.
    1.5: instructions per element far off the best config's). A tunable's own
    `screen_relative_limit` is used when this is None. best_score: the best score screened before
    (earlier batches of one search), so the limit applies against the best seen, not only this
    batch's; deadline: see `screen_configs` (configs not reached come back in `unscreened`).
    """
    if top_n is not None and top_n < 1:
        raise ValueError(f"top_n must be >= 1 or None, got {top_n!r}")
    result = PruneResult()
    if tunable.screen is None:
        result.kept = [(dict(c), ScreenResult(ok=True)) for c in configs]
        return result
    limit = relative_limit if relative_limit is not None else tunable.screen_relative_limit
    if limit is not None and limit < 1:
        raise ValueError(f"relative_limit must be >= 1 or None, got {limit!r}")
    verdicts = screen_configs(tunable.screen, configs, max_workers, tunable.screen_cache,
                              key=getattr(tunable, "screen_key", None), deadline=deadline)  # fmt: skip
    result.unscreened = [c for c, v in verdicts if v is None]
    verdicts = [(c, v) for c, v in verdicts if v is not None]
    kept = sorted(((c, v) for c, v in verdicts if v.ok), key=lambda item: item[1].score)
    result.dropped = [(c, v.reason) for c, v in verdicts if not v.ok]
    result.errors = [(c, v.reason) for c, v in verdicts if v.raised]
    best = min([v.score for _, v in kept[:1]] + ([best_score] if best_score is not None else []), default=None)
    if kept and limit is not None and best is not None:
        ceiling = limit * best
        far = [(c, v) for c, v in kept if v.score > ceiling]
        kept = [(c, v) for c, v in kept if v.score <= ceiling]
        result.dropped += [(c, relative_reason(limit)) for c, _ in far]
    if top_n is not None and len(kept) > top_n:
        result.dropped += [(c, f"not in the top {top_n}") for c, _ in kept[top_n:]]
        kept = kept[:top_n]
    result.kept = kept
    return result


def relative_reason(limit: float) -> str:
    """The drop reason of the relative-score rule."""
    return f"score > {limit:g}x the best screened config's"
