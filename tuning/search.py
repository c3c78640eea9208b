"""Search a tunable's space: prune, coarse pass, local refinement, then verify the winner.

Strategy (per problem, within a time budget):
1. prune every config that breaks a constraint (no run at all); when the tunable supplies a
   `screen` (compile-time pruning, `prune.prune`: spills, resources, far off the instruction
   budget), each batch of configs about to be timed (the coarse pass, each refinement step's
   neighbours) is screened first and what it drops is never timed; the default is never screened
   out, it is the baseline;
2. run the default config: the baseline time and the reference output;
3. coarse pass: every second value of each knob (both ends kept), valid configs only, in a
   seeded shuffled order and with at most `coarse_fraction` of the budget, so a pass the budget
   cuts short is still a spread-out sample (not one corner of the grid) and leaves time to refine;
4. local refinement: from the `top_k` best configs so far, hill-climb over neighbours (one knob
   one step) until no neighbour is faster;
5. verify: the fastest config's output is compared with the default's; a mismatch (a
   miscompile) is recorded and the next fastest is tried; the default always qualifies.
A config that raises (compile error, out of resources, ...) is recorded as failed and skipped.
When the budget runs out, the search stops and verifies what it has.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from .prune import prune
from .space import Config, Tunable, config_key


@dataclass
class Evaluation:
    """One config tried. status: "ok", "failed" (raised), "mismatch" (output differs from the default's)."""

    config: Config
    phase: str  # "default", "coarse", "refine"
    status: str
    time_s: float | None = None
    error: str | None = None


@dataclass
class TuningResult:
    """Outcome of `search`. best is None only when the default config itself failed."""

    name: str
    problem: dict
    default: Config
    best: Config | None
    best_time_s: float | None
    default_time_s: float | None
    functional: bool
    evaluations: list[Evaluation] = field(default_factory=list)
    space_size: int = 0
    pruned: int = 0  # by constraints and by the screen
    elapsed_s: float = 0.0
    budget_exhausted: bool = False
    screened: int = 0
    screen_dropped: list[tuple[Config, str]] = field(default_factory=list)
    screen_s: float = 0.0

    @property
    def speedup(self) -> float | None:
        """default time / best time (>= 1 when the search found something faster)."""
        if not self.best_time_s or self.default_time_s is None:
            return None
        return self.default_time_s / self.best_time_s

    @property
    def failures(self) -> list[Evaluation]:
        return [e for e in self.evaluations if e.status != "ok"]

    @property
    def runs(self) -> int:
        """Configs measured (ok or failed), the default included: the search's cost."""
        return len(self.evaluations)


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def search(
    tunable: Tunable,
    benchmarker,
    budget_s: float = 60.0,
    max_evaluations: int | None = None,
    coarse_stride: int = 2,
    top_k: int = 3,
    verify_limit: int = 3,
    coarse_fraction: float = 0.5,
    seed: int = 0,
    screen_workers: int = 4,
    screen_top_n: int | None = None,
) -> TuningResult:
    """Tune one problem. Returns a TuningResult; never raises for a failing config.

    budget_s: wall-clock seconds for this problem (checked before each run; the default config and
    the winner's verification always run). max_evaluations: optional cap on measured configs.
    verify_limit: how many of the fastest configs to check against the default's output before
    falling back to the default. coarse_fraction: share of budget_s the coarse pass may use.
    seed: the coarse pass's visiting order (deterministic for a given seed). screen_workers,
    screen_top_n: threads for `tunable.screen` and how many of its best-ranked configs to keep
    (None: all it accepts); the screen's time is not charged to budget_s.
    """
    started = time.perf_counter()
    evaluations: list[Evaluation] = []
    tried: dict[tuple, Evaluation] = {}
    result = TuningResult(
        name=tunable.name,
        problem=dict(tunable.problem),
        default=dict(tunable.default),
        best=None,
        best_time_s=None,
        default_time_s=None,
        functional=bool(benchmarker.functional),
        evaluations=evaluations,
        space_size=len(tunable.space),
    )

    def out_of_budget() -> bool:
        if max_evaluations is not None and len(evaluations) >= max_evaluations:
            return True
        return time.perf_counter() - started - result.screen_s > budget_s

    # The output of the fastest config so far is kept (one tensor at most), so verifying the
    # usual winner costs no extra run.
    fastest: dict[str, Any] = {"key": None, "time_s": float("inf"), "output": None}

    def evaluate(config: Config, phase: str) -> tuple[Evaluation, Any]:
        output = None
        try:
            output = tunable.run(config)  # first call: compiles, warms up, gives the output
            measurement = benchmarker.measure(lambda: tunable.run(config))
            evaluation = Evaluation(dict(config), phase, "ok", time_s=measurement.time_s)
        except Exception as error:  # a bad config is data, not a crash
            evaluation = Evaluation(dict(config), phase, "failed", error=_describe(error))
            output = None
        evaluations.append(evaluation)
        tried[config_key(config)] = evaluation
        if evaluation.status == "ok" and phase != "default" and evaluation.time_s < fastest["time_s"]:
            fastest.update(key=config_key(config), time_s=evaluation.time_s, output=output)
        return evaluation, output

    default_eval, reference = evaluate(dict(tunable.default), "default")
    if default_eval.status != "ok":
        result.elapsed_s = time.perf_counter() - started
        return result
    result.default_time_s = default_eval.time_s

    valid = {}
    for config in tunable.space:
        if not tunable.violations(config):
            valid[config_key(config)] = config
    default_key = config_key(tunable.default)
    screened_keys: set[tuple] = {default_key}  # the default is never screened out: it is the baseline

    def screen(configs) -> None:
        """Compile-time pruning of the configs the search is about to time, in parallel, each once.

        Lazy, batch by batch (the coarse pass, then each refinement step's neighbours), so a search
        compiles what it would visit, not the whole space; dropped configs leave `valid`.
        """
        todo = [c for c in configs if config_key(c) in valid and config_key(c) not in screened_keys]
        if tunable.screen is None or not todo:
            return
        screen_started = time.perf_counter()
        outcome = prune(tunable, todo, max_workers=screen_workers, top_n=screen_top_n)
        result.screen_s += time.perf_counter() - screen_started
        result.screened += len(todo)
        screened_keys.update(config_key(c) for c in todo)
        for config, reason in outcome.dropped:
            valid.pop(config_key(config), None)
            result.screen_dropped.append((config, reason))


    def try_config(config: Config, phase: str) -> Evaluation | None:
        key = config_key(config)
        if key in tried:
            return tried[key]
        if key not in valid or out_of_budget():
            return None
        return evaluate(config, phase)[0]

    coarse = [c for c in tunable.space.coarse(coarse_stride) if config_key(c) in valid]
    random.Random(seed).shuffle(coarse)
    screen(coarse)
    coarse = [c for c in coarse if config_key(c) in valid]
    coarse_deadline = started + result.screen_s + coarse_fraction * budget_s
    for config in coarse:
        if out_of_budget() or time.perf_counter() > coarse_deadline:
            break
        try_config(config, "coarse")

    def ranked() -> list[Evaluation]:
        return sorted((e for e in evaluations if e.status == "ok"), key=lambda e: e.time_s)

    for seed in ranked()[:top_k]:
        current = seed
        while not out_of_budget():
            neighbours = tunable.space.neighbours(current.config)
            screen(neighbours)
            candidates = [try_config(n, "refine") for n in neighbours]
            better = [c for c in candidates if c is not None and c.status == "ok" and c.time_s < current.time_s]
            if not better:
                break
            current = min(better, key=lambda e: e.time_s)
    result.budget_exhausted = out_of_budget()
    result.pruned = result.space_size - len(valid)  # by constraints, and by the screen among those it saw

    for candidate in ranked()[: max(1, verify_limit)]:
        if config_key(candidate.config) == config_key(tunable.default):
            result.best, result.best_time_s = dict(candidate.config), candidate.time_s
            break
        try:
            same = config_key(candidate.config) == fastest["key"]
            output = fastest["output"] if same else tunable.run(candidate.config)
            agrees = tunable.outputs_agree(output, reference)
            reason = "output differs from the default config's"
        except Exception as error:
            agrees, reason = False, _describe(error)
        if agrees:
            result.best, result.best_time_s = dict(candidate.config), candidate.time_s
            break
        candidate.status, candidate.error = "mismatch", reason
    fastest["output"] = None
    if result.best is None:  # every checked candidate mismatched: keep the default
        result.best, result.best_time_s = dict(tunable.default), default_eval.time_s
    result.elapsed_s = time.perf_counter() - started
    return result
