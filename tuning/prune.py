"""Compile-time pruning: screen candidate configs (compile, read resources) before any is timed.

A tunable may supply `screen(config) -> ScreenResult`: typically a compile for the target device
that reports spills, registers, shared memory and instructions per element. `prune` runs it over
candidates on a thread pool (a compile spends its time in ptxas subprocesses and native code, which
release the GIL), caches each verdict per tunable, and returns the survivors ranked by score
(lower = better) plus the dropped configs with reasons. A screen that raises drops the config with
the error as the reason; it never stops the search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .space import Config, config_key


@dataclass(frozen=True)
class ScreenResult:
    """One config's screening verdict. ok False drops it (reason says why); score ranks the kept (lower first)."""

    ok: bool
    reason: str = ""
    score: float = 0.0


@dataclass
class PruneResult:
    """kept: (config, ScreenResult) best score first; dropped: (config, reason)."""

    kept: list[tuple[Config, ScreenResult]] = field(default_factory=list)
    dropped: list[tuple[Config, str]] = field(default_factory=list)

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
) -> list[tuple[Config, ScreenResult]]:
    """(config, ScreenResult) for each distinct config, in input order.

    cache: config_key -> verdict, read and filled (a config in it is not screened again).
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    cache = {} if cache is None else cache
    distinct: dict[tuple, Config] = {}
    for config in configs:
        distinct.setdefault(config_key(config), dict(config))
    todo = [key for key in distinct if key not in cache]

    def run_one(key: tuple) -> ScreenResult:
        try:
            verdict = screen(dict(distinct[key]))
            if not isinstance(verdict, ScreenResult):
                raise TypeError(f"screen must return a ScreenResult, got {type(verdict).__name__}")
            return verdict
        except Exception as error:  # a config the compiler rejects is data, not a crash
            return ScreenResult(ok=False, reason=_describe(error))

    if todo:
        with ThreadPoolExecutor(max_workers=min(max_workers, len(todo))) as pool:
            for key, verdict in zip(todo, pool.map(run_one, todo)):
                cache[key] = verdict
    return [(distinct[key], cache[key]) for key in distinct]


def prune(
    tunable,
    configs: Iterable[Mapping],
    max_workers: int = 4,
    top_n: int | None = None,
    relative_limit: float | None = None,
) -> PruneResult:
    """Screen `configs` with `tunable.screen` and split them into kept (ranked) and dropped.

    tunable: a Tunable (its `screen` None keeps every config, unranked, in input order);
    top_n: keep only the N best-scored (the rest are dropped as "not in the top N");
    relative_limit: drop a kept config whose score exceeds relative_limit x the best kept score
    (e.g. 1.5: instructions per element far off the best config's). A tunable's own
    `screen_relative_limit` is used when this is None.
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
    verdicts = screen_configs(tunable.screen, configs, max_workers, tunable.screen_cache)
    kept = sorted(((c, v) for c, v in verdicts if v.ok), key=lambda item: item[1].score)
    result.dropped = [(c, v.reason) for c, v in verdicts if not v.ok]
    if kept and limit is not None:
        ceiling = limit * kept[0][1].score
        far = [(c, v) for c, v in kept if v.score > ceiling]
        kept = [(c, v) for c, v in kept if v.score <= ceiling]
        result.dropped += [(c, f"score > {limit:g}x the best screened config's") for c, _ in far]
    if top_n is not None and len(kept) > top_n:
        result.dropped += [(c, f"not in the top {top_n}") for c, _ in kept[top_n:]]
        kept = kept[:top_n]
    result.kept = kept
    return result
