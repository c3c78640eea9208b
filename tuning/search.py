"""Search a tunable's space: prune, coarse pass, local refinement, then verify the winner.

Strategy (per problem, within a wall-clock budget `budget_s` that covers everything, screening
included; only the default's run and the winner's verification run past it):
1. prune every config that breaks a constraint (no run at all); when the tunable supplies a
   `screen` (compile-time pruning, `prune.prune`: spills, resources, far off the instruction
   budget), each batch of configs about to be timed (the coarse pass, each refinement step's
   neighbours) is screened first and what it drops is never timed; the default is never screened
   out, it is the baseline. Screening spends the budget: a batch's screen stops at `screen_share`
   of the time left in its phase (the coarse pass's share, then the whole budget), so what it
   keeps can still be timed, and tells a screen call how long it has left
   (`prune.screen_time_left`); a config it did not reach is not timed. The
   relative limit (`screen_relative_limit` x the best score) is applied against the best score
   screened so far in this search, across batches: a config kept by an earlier batch that a later,
   better score puts beyond the limit is not timed either. Verdicts shipped for the tunable's
   `screen_identity` (`verdicts.load_verdicts`, from `verdict_dirs`) are taken first and cost
   nothing. If the screen was asked about configs and raised for every one of them (errors, not
   verdicts such as "spills"), the search raises `ScreenFailed` instead of timing the default only;
2. run the default config: the baseline time and the reference output;
3. coarse pass: every second value of each knob (both ends kept), valid configs only, with at most
   `coarse_fraction` of the budget. With a screen: the survivors best-ranked first (lowest score;
   ties in the seeded order), at most `screen_top_n` of them. Without one: in a seeded shuffled
   order, so a pass the budget cuts short is still a spread-out sample (not one corner of the grid);
4. local refinement: from the `top_k` best configs so far, hill-climb over neighbours (one knob
   one step, best-ranked first when screened) until no neighbour is faster;
5. verify: the fastest config's output is compared with the default's; a mismatch (a
   miscompile) is recorded and the next fastest is tried; the default always qualifies.
A config that raises (compile error, out of resources, ...) is recorded as failed and skipped.
When the budget runs out, the search stops and verifies what it has.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .prune import prune, relative_reason
from .space import Config, Tunable, config_key
from .verdicts import SHIPPED_SCREENS_DIR, load_verdicts


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
    screen_s: float = 0.0  # wall time spent screening (part of elapsed_s, charged to the budget)
    unscreened: int = 0  # configs the screen did not reach before its deadline (never timed)
    shipped_verdicts: int = 0  # verdicts taken from verdict files for this problem (not compiled)

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


class ScreenFailed(RuntimeError):
    """The compile-time screen raised for every config it was asked about, so no config but the
    default could be timed: a broken screen (missing tool, a compile that always fails), not a
    verdict. name, problem: the tunable's; errors: (config, error) of each; result: the
    TuningResult so far (the default's run)."""

    def __init__(self, name: str, problem: dict, errors: list[tuple[Config, str]], result: TuningResult):
        self.name, self.problem, self.errors, self.result = name, dict(problem), list(errors), result
        config, error = self.errors[0]
        super().__init__(
            f"the compile-time screen of {name} {self.problem} raised for each of the {len(self.errors)} config(s) "
            f"it screened, so nothing but the default could be timed; first error (config {config}): {error}"
        )

    @property
    def first_error(self) -> str:
        return self.errors[0][1]


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
    verdict_dirs: Sequence[str | os.PathLike] = (SHIPPED_SCREENS_DIR,),
    screen_share: float = 0.5,
) -> TuningResult:
    """Tune one problem. Returns a TuningResult; never raises for a failing config.

    budget_s: wall-clock seconds for this problem, screening included (checked before each run and
    each screen call; the default config and the winner's verification always run).
    max_evaluations: optional cap on measured configs. verify_limit: how many of the fastest
    configs to check against the default's output before falling back to the default.
    coarse_fraction: share of budget_s the coarse pass (its screening included) may use. seed: the
    coarse pass's visiting order without a screen, and the order of equal scores with one.
    screen_workers: threads for `tunable.screen`; screen_top_n: how many of the best-ranked screened
    configs the coarse pass times (None: all it kept; the others stay reachable by refinement).
    verdict_dirs: where shipped screening verdicts are looked up (`verdicts.load_verdicts`; only
    for a tunable with a screen and a `screen_identity`). screen_share: the share of the time left in
    its phase (the coarse pass's share, then the whole budget) that one screened batch may spend
    screening, so that what it keeps (and what shipped verdicts kept at no cost) can still be timed.
    Raises ScreenFailed when the screen raised for every config it was asked about.
    """
    if screen_top_n is not None and screen_top_n < 1:
        raise ValueError(f"screen_top_n must be >= 1 or None, got {screen_top_n!r}")
    if not 0 < screen_share <= 1:
        raise ValueError(f"screen_share must be in (0, 1], got {screen_share!r}")
    started = time.perf_counter()
    deadline = started + budget_s
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
    if tunable.screen is not None and tunable.screen_identity is not None and verdict_dirs:
        shipped = load_verdicts(verdict_dirs, tunable.screen_identity, tunable.name)
        for key, verdict in shipped.items():
            tunable.screen_cache.setdefault(key, verdict)
        result.shipped_verdicts = len(shipped)

    def out_of_budget() -> bool:
        if max_evaluations is not None and len(evaluations) >= max_evaluations:
            return True
        return time.perf_counter() > deadline

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
    unscreened_keys: set[tuple] = set()
    scores: dict[tuple, float] = {}  # configs the screen kept and that are within the limit: their score
    limit = tunable.screen_relative_limit
    state: dict[str, Any] = {"best_score": None, "with_verdict": 0}
    errors: list[tuple[Config, str]] = []

    def screen(configs, phase_deadline: float) -> None:
        """Compile-time pruning of the configs the search is about to time, in parallel, each once.

        Lazy, batch by batch (the coarse pass, then each refinement step's neighbours), so a search
        compiles what it would visit, not the whole space; dropped configs leave `valid`. No screen
        call starts (and none runs on) past `screen_share` of the time left before `phase_deadline`;
        the configs it leaves unscreened are not timed.
        """
        todo = [c for c in configs if config_key(c) in valid and config_key(c) not in screened_keys]
        if tunable.screen is None or not todo:
            return
        screen_started = time.perf_counter()
        until = screen_started + screen_share * max(0.0, phase_deadline - screen_started)
        outcome = prune(tunable, todo, max_workers=screen_workers, best_score=state["best_score"], deadline=until)
        result.screen_s += time.perf_counter() - screen_started
        missed = {config_key(c) for c in outcome.unscreened}
        unscreened_keys.update(missed)
        done = [config_key(c) for c in todo if config_key(c) not in missed]
        result.screened += len(done)
        screened_keys.update(done)
        state["with_verdict"] += len(done)
        errors.extend(outcome.errors)
        for config, reason in outcome.dropped:
            valid.pop(config_key(config), None)
            result.screen_dropped.append((config, reason))
        for config, verdict in outcome.kept:
            scores[config_key(config)] = verdict.score
        if outcome.kept and (state["best_score"] is None or outcome.kept[0][1].score < state["best_score"]):
            state["best_score"] = outcome.kept[0][1].score
            if limit is not None:  # a new best: what earlier batches kept may now lie beyond the limit
                ceiling = limit * state["best_score"]
                for key, score in list(scores.items()):
                    if score > ceiling:
                        del scores[key]
                        if key not in tried and key in valid:
                            result.screen_dropped.append((valid.pop(key), relative_reason(limit)))
        if state["with_verdict"] and len(errors) == state["with_verdict"]:
            result.elapsed_s = time.perf_counter() - started
            raise ScreenFailed(tunable.name, tunable.problem, errors, result)

    def try_config(config: Config, phase: str) -> Evaluation | None:
        key = config_key(config)
        if key in tried:
            return tried[key]
        if key not in valid or out_of_budget():
            return None
        if tunable.screen is not None and key not in scores:
            return None  # not screened (its batch's deadline passed first): never timed blind
        return evaluate(config, phase)[0]

    def rank(configs: list[Config]) -> list[Config]:
        """Best screen score first (stable: equal scores keep their order); unscored last."""
        return sorted(configs, key=lambda c: scores.get(config_key(c), float("inf")))

    coarse = [c for c in tunable.space.coarse(coarse_stride) if config_key(c) in valid]
    random.Random(seed).shuffle(coarse)
    coarse_deadline = started + coarse_fraction * budget_s
    if tunable.screen is not None:
        screen(coarse, coarse_deadline)
        coarse = rank([c for c in coarse if config_key(c) in scores])
        if screen_top_n is not None:
            coarse = coarse[:screen_top_n]
    for config in coarse:
        if out_of_budget() or time.perf_counter() > coarse_deadline:
            break
        try_config(config, "coarse")

    def ranked() -> list[Evaluation]:
        return sorted((e for e in evaluations if e.status == "ok"), key=lambda e: e.time_s)

    for start in ranked()[:top_k]:
        current = start
        while not out_of_budget():
            neighbours = tunable.space.neighbours(current.config)
            screen(neighbours, deadline)
            candidates = [try_config(n, "refine") for n in rank(neighbours)]
            better = [c for c in candidates if c is not None and c.status == "ok" and c.time_s < current.time_s]
            if not better:
                break
            current = min(better, key=lambda e: e.time_s)
    result.budget_exhausted = out_of_budget()
    result.pruned = result.space_size - len(valid)  # by constraints, and by the screen among those it saw
    result.unscreened = len(unscreened_keys - screened_keys)

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
