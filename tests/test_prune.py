"""Compile-time pruning (tuning/prune.py) with fake screens, its hook in search() (budget, ranking, failures),
shipped verdicts (tuning/verdicts.py), and the adder screen."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from tuning import (
    Measurement,
    ScreenFailed,
    ScreenIdentity,
    ScreenOutOfTime,
    ScreenResult,
    SearchSpace,
    Tunable,
    config_key,
    load_verdicts,
    prune,
    screen_time_left,
    search,
    verdict_entries,
    verdict_filename,
    write_verdicts,
)

SPACE = SearchSpace.from_dict({"block_m": (16, 32, 64, 128), "num_warps": (2, 4)})
DEFAULT = {"block_m": 32, "num_warps": 4}


def fake_compiler(calls=None):
    """Reports block_m=128 as spilling, raises for block_m=16 with 2 warps; score = 1 / block_m."""

    def screen(config):
        if calls is not None:
            calls.append(config_key(config))
        if config["block_m"] == 16 and config["num_warps"] == 2:
            raise RuntimeError("ptxas: out of resources")
        if config["block_m"] == 128:
            return ScreenResult(False, "spills", 0.0)
        return ScreenResult(True, "", 1.0 / config["block_m"])

    return screen


def tunable(screen, relative_limit=None, runs=None):
    def run(config):
        if runs is not None:
            runs.append(config_key(config))
        return 1

    return Tunable("fake", SPACE, {"n": 1}, run, dict(DEFAULT), screen=screen, screen_relative_limit=relative_limit)


def test_prune_drops_what_the_fake_compiler_rejects_and_ranks_the_rest():
    result = prune(tunable(fake_compiler()), list(SPACE), max_workers=2)
    dropped = {config_key(c): reason for c, reason in result.dropped}
    assert dropped[config_key({"block_m": 128, "num_warps": 2})] == "spills"
    assert dropped[config_key({"block_m": 128, "num_warps": 4})] == "spills"
    assert "out of resources" in dropped[config_key({"block_m": 16, "num_warps": 2})]
    assert len(dropped) == 3
    scores = [verdict.score for _, verdict in result.kept]
    assert scores == sorted(scores) and [c["block_m"] for c in result.kept_configs] == [64, 64, 32, 32, 16]
    assert result.reasons()["spills"] == 2


def test_prune_keeps_top_n_and_drops_far_off_the_best_score():
    top = prune(tunable(fake_compiler()), list(SPACE), top_n=2)
    assert [c["block_m"] for c in top.kept_configs] == [64, 64]
    assert top.reasons()["not in the top 2"] == 3
    # best score 1/64; 1.5x that keeps block_m=64 only (1/32 = 2x, 1/16 = 4x off)
    near = prune(tunable(fake_compiler(), relative_limit=1.5), list(SPACE))
    assert {c["block_m"] for c in near.kept_configs} == {64}
    with pytest.raises(ValueError, match="top_n"):
        prune(tunable(fake_compiler()), list(SPACE), top_n=0)


def test_each_config_is_screened_once_per_tunable():
    calls = []
    t = tunable(fake_compiler(calls))
    prune(t, list(SPACE) + list(SPACE), max_workers=2)
    prune(t, list(SPACE), max_workers=2)
    assert sorted(calls) == sorted(config_key(c) for c in SPACE)


def test_screens_run_concurrently():
    # Every screen waits at a barrier for a second party: with one thread, the barrier times out
    # and every config is dropped with the BrokenBarrierError as its reason.
    barrier = threading.Barrier(2, timeout=10)
    seen = set()

    def screen(config):
        seen.add(threading.get_ident())
        barrier.wait()
        return ScreenResult(True, "", 0.0)

    configs = [{"block_m": m, "num_warps": 4} for m in (16, 32, 64, 128)]
    result = prune(tunable(screen), configs, max_workers=2)
    assert len(result.kept) == 4 and len(seen) == 2


class CountingBenchmarker:
    functional = True

    def measure(self, fn):
        fn()
        return Measurement(1.0, (1.0,), functional=True)


def test_search_times_only_screened_configs_and_always_the_default():
    runs = []

    def screen(config):  # rejects every config, the default included
        return ScreenResult(False, "spills", 0.0)

    result = search(tunable(screen, runs=runs), CountingBenchmarker(), budget_s=30)
    assert set(runs) == {config_key(DEFAULT)}
    # Only what the search would time is screened (the coarse pass here: every config it visits is dropped).
    assert result.best == DEFAULT and 0 < result.screened < len(SPACE)
    assert len(result.screen_dropped) == result.screened  # the default is the baseline, not screened

    runs.clear()
    result = search(tunable(fake_compiler(), runs=runs), CountingBenchmarker(), budget_s=30)
    spilling = {config_key({"block_m": 128, "num_warps": w}) for w in (2, 4)}
    assert runs and not spilling & set(runs)
    assert config_key({"block_m": 16, "num_warps": 2}) not in runs
    assert {config_key(c) for c, _ in result.screen_dropped} >= spilling
    assert result.pruned == 3


def _skip_without_cuobjdump():
    from triton_adder.measure import sass

    try:
        sass.cuobjdump_path()
    except RuntimeError as error:
        pytest.skip(str(error))


def _small_forward_layer():
    import torch

    from triton_adder.measure import sass

    return sass.meta_layer(torch.float32, (2, 16, 8, 8), 16, (3, 3), 1, 1, 1, False)


def test_adder_screen_compiles_one_config_for_sm90_in_a_child_under_the_interpreter():
    # conftest sets TRITON_INTERPRET, which replaces the kernels in this process: the screen's
    # compile runs in a child without it, which is what lets an interpreter run screen at all.
    from triton_adder.autotune.tunables import compile_screen

    assert os.environ.get("TRITON_INTERPRET") == "1"
    _skip_without_cuobjdump()
    screen = compile_screen("forward", *_small_forward_layer(), "paper", 90)
    verdict = screen({"block_m": 32, "block_n": 16, "block_k": 8, "num_warps": 2, "num_stages": 1})
    # a small tile with 2 warps fits in registers; forward's floor is 2 FP32 instructions per element,
    # plus loads and address arithmetic, so the total lies above 2 and far below 20
    assert verdict.ok, verdict.reason
    assert 2.0 <= verdict.score < 20.0


def test_an_isolated_compile_is_killed_at_its_deadline():
    import time

    from triton_adder.kernels.launch_config import KernelConfig
    from triton_adder.measure import sass

    _skip_without_cuobjdump()
    started = time.perf_counter()
    # a child needs seconds to import torch and triton before it even compiles, so 0.5 s must expire
    with pytest.raises(TimeoutError, match="took over 0.5 s"):
        sass.compile_stats_isolated("forward", *_small_forward_layer(), KernelConfig(32, 16, 8, 2, 1),
                                    arch=90, timeout_s=0.5)  # fmt: skip
    assert time.perf_counter() - started < 10


def test_a_compile_past_its_deadline_drops_the_config(monkeypatch):
    from triton_adder.autotune import tunables
    from triton_adder.measure import sass

    def too_slow(*args, **kwargs):
        raise TimeoutError("took over 120 s")

    monkeypatch.setattr(sass, "compile_stats_isolated", too_slow)
    screen = tunables.compile_screen("forward", *_small_forward_layer(), "paper", 90)
    config = {"block_m": 256, "block_n": 32, "block_k": 32, "num_warps": 2, "num_stages": 1}
    verdict = screen(config)
    assert not verdict.ok and verdict.reason == f"compile over {tunables.SCREEN_COMPILE_TIMEOUT_S:g} s"
    result = prune(Tunable("fake", SPACE, {"n": 1}, lambda c: 1, dict(DEFAULT), screen=screen), [config])
    assert result.kept == [] and result.reasons() == {verdict.reason: 1}


def test_the_screen_is_opt_in_under_the_interpreter():
    import torch

    from triton_adder.autotune.tunables import screen_arch_for

    _skip_without_cuobjdump()
    cpu = torch.device("cpu")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert screen_arch_for(cpu, None) is None
    assert screen_arch_for(cpu, 80) == 80


def test_tune_screens_inside_the_interpreter_run_only_when_asked(cache_dir, monkeypatch):
    """`tune --screen-arch` reaches the tuner's screen in an interpreter run: what the (fake) compiler
    reports as spilling, here every config it sees, is dropped before timing, the default (never
    screened) wins, and the table row says how many were dropped."""
    import torch

    from triton_adder.autotune import lookup, tuner
    from triton_adder.kernels.launch_config import kernel_config_of
    from triton_adder.measure import sass

    _skip_without_cuobjdump()
    compiled = []

    def fake_isolated_compile(op, x, weight, geom, config, *, grad_mode, arch, timeout_s):
        compiled.append(config)
        return sass.CompileStats(op, arch, "fake", 255, 64, 4, 0, 0, 2.0, 2.5, "loop")  # 64 B stack: spills

    monkeypatch.setattr(sass, "compile_stats_isolated", fake_isolated_compile)
    cache = lookup.cache_for(torch.device("cpu"))
    args = ("lenet5bn", 1, torch.float32, ("forward",), 60, cache, torch.device("cpu"))
    rows = tuner.tune_model(*args, quick=True, shrink=True)
    assert not compiled and not any("screen" in note for row in rows for note in row.notes)
    rows = tuner.tune_model(*args, quick=True, shrink=True, force=True, screen_arch=90)
    assert compiled and all(row.status == "tuned" for row in rows)
    assert all(kernel_config_of(row.config) not in compiled for row in rows)
    dropped = [note for row in rows for note in row.notes if note.startswith("screen dropped")]
    assert len(dropped) == len(rows) and all(re.fullmatch(r"screen dropped (\d+) of \1", note) for note in dropped)


# --- the screen inside the search: budget, global relative limit, ranking, failures -----------------

WIDE = SearchSpace.from_dict({"block_m": (16, 32, 64, 128, 256, 512, 1024), "num_warps": (1, 2, 4, 8)})
WIDE_DEFAULT = {"block_m": 32, "num_warps": 2}


class ScoreBenchmarker:
    """Times the config last run at cost(config): a fake GPU whose time follows a known function."""

    functional = True

    def __init__(self, state, cost):
        self.state, self.cost = state, cost

    def measure(self, fn):
        fn()
        value = self.cost(self.state["last"])
        return Measurement(value, (value,), functional=True)


def scored_tunable(space, default, screen, cost, relative_limit=None, runs=None, **fields):
    state = {"last": None}

    def run(config):
        state["last"] = config
        if runs is not None:
            runs.append(config_key(config))
        return 1

    t = Tunable("fake", space, {"n": 1}, run, dict(default), screen=screen, screen_relative_limit=relative_limit,
                **fields)  # fmt: skip
    return t, ScoreBenchmarker(state, cost)


def test_screening_is_charged_to_the_budget():
    """A screen that takes 0.25 s per config, one worker, 0.5 s budget: the coarse grid alone (12 configs)
    would take 3 s to screen; charged to the budget, the search stops screening at its deadlines and the
    problem takes about the budget (plus one screen call in flight), the default and verification included."""
    seen_left = []

    def slow_screen(config):
        seen_left.append(screen_time_left())
        time.sleep(0.25)
        return ScreenResult(True, "", float(config["block_m"]))

    t, bench = scored_tunable(WIDE, WIDE_DEFAULT, slow_screen, lambda c: 1.0)
    started = time.perf_counter()
    result = search(t, bench, budget_s=0.5, screen_workers=1)
    wall = time.perf_counter() - started
    assert wall < 1.5 and result.elapsed_s <= wall
    assert result.budget_exhausted and result.best is not None and result.default_time_s is not None
    assert 0 < result.screened < len(list(WIDE.coarse())) and result.unscreened > 0
    assert result.screen_s <= result.elapsed_s
    # the screen is told how long it has: never more than the budget
    assert seen_left and all(left is not None and left <= 0.5 for left in seen_left)


def test_a_slow_screen_leaves_time_to_time_what_known_verdicts_kept():
    """One known-good verdict (as shipped ones arrive, in the screen cache) and a screen that needs 0.4 s a
    config: a batch screens for at most half the time left in its phase, so the known config is still timed
    in the coarse pass instead of the screen eating the pass's whole share."""

    def slow_screen(config):
        left = screen_time_left()
        time.sleep(min(0.4, left))
        if left < 0.4:
            raise ScreenOutOfTime("cut at the deadline")
        return ScreenResult(True, "", 2.0)

    runs = []
    t, bench = scored_tunable(WIDE, WIDE_DEFAULT, slow_screen, lambda c: 1.0, runs=runs)
    known = {"block_m": 256, "num_warps": 4}
    t.screen_cache[config_key(known)] = ScreenResult(True, "", 1.0)
    result = search(t, bench, budget_s=1.0, screen_workers=1)
    assert [e.config for e in result.evaluations if e.phase == "coarse"] == [known]
    with pytest.raises(ValueError, match="screen_share"):
        search(t, bench, screen_share=0)


def test_a_screen_deadline_leaves_configs_unscreened_and_uncached():
    calls = []

    def screen(config):
        calls.append(config_key(config))
        if screen_time_left() is not None:
            raise ScreenOutOfTime("a compile cut at the deadline")
        return ScreenResult(True, "", 1.0)

    t = tunable(screen)
    past = prune(t, list(SPACE), max_workers=2, deadline=time.perf_counter() - 1)
    assert not calls and len(past.unscreened) == len(SPACE) and not past.kept and not past.dropped
    cut = prune(t, list(SPACE)[:2], max_workers=2, deadline=time.perf_counter() + 60)
    assert len(calls) == 2 and len(cut.unscreened) == 2 and not t.screen_cache
    again = prune(t, list(SPACE)[:2], max_workers=2)  # no deadline: screened (not remembered as cut)
    assert len(again.kept) == 2 and len(t.screen_cache) == 2


AB = SearchSpace.from_dict({"a": (0, 1, 2, 3, 4), "b": (0, 1)})  # coarse grid: a in (0, 2, 4), b in (0, 1)
AB_DEFAULT = {"a": 0, "b": 0}


def ab_screen(scores, calls=None):
    def screen(config):
        if calls is not None:
            calls.append(config_key(config))
        return ScreenResult(True, "", scores[(config["a"], config["b"])])

    return screen


def test_relative_limit_applies_against_the_best_score_of_the_whole_search():
    """The coarse batch holds the best score (1.0); refinement's neighbours (odd a) all score 10, within
    1.5x of each other but 10x the best: none of them is timed."""
    scores = {(a, b): (10.0 if a % 2 else 1.0 + 0.1 * a + 0.1 * b) for a in range(5) for b in range(2)}
    runs = []
    t, bench = scored_tunable(AB, AB_DEFAULT, ab_screen(scores), lambda c: 1.0 + abs(c["a"] - 3) + c["b"],
                              relative_limit=1.5, runs=runs)  # fmt: skip
    result = search(t, bench, budget_s=30)
    assert not [key for key in runs if dict(key)["a"] % 2], "a config scoring 10x the best was timed"
    dropped = {config_key(c): reason for c, reason in result.screen_dropped}
    assert dropped[config_key({"a": 3, "b": 0})] == "score > 1.5x the best screened config's"


def test_a_config_kept_earlier_is_not_timed_once_a_better_score_puts_it_beyond_the_limit():
    """Coarse pass: (2, 0) scores 1.0 and (2, 1) 1.2, both kept; top_n=1 times (2, 0) only. Refinement then
    screens (1, 0) at 0.5: the limit falls to 0.75, so (2, 1), a neighbour of both, is never timed."""
    scores = {(a, b): 1.3 + 0.01 * a for a in range(5) for b in range(2)}
    scores.update({(2, 0): 1.0, (2, 1): 1.2, (1, 0): 0.5, (3, 0): 0.6, (1, 1): 0.55, (3, 1): 0.65})
    runs = []
    t, bench = scored_tunable(AB, AB_DEFAULT, ab_screen(scores), lambda c: scores[(c["a"], c["b"])] + 1.0,
                              relative_limit=1.5, runs=runs)  # fmt: skip
    result = search(t, bench, budget_s=30, screen_top_n=1)
    assert config_key({"a": 1, "b": 0}) in runs  # refinement got there
    assert config_key({"a": 2, "b": 1}) not in runs
    assert (({"a": 2, "b": 1}, "score > 1.5x the best screened config's")) in result.screen_dropped
    assert result.best == {"a": 1, "b": 0}


def test_the_coarse_pass_times_the_best_ranked_configs_first():
    runs = []

    def screen(config):  # larger tiles rank better; every config kept
        return ScreenResult(True, "", 1.0 / config["block_m"] + 1e-5 * config["num_warps"])

    t, bench = scored_tunable(WIDE, WIDE_DEFAULT, screen, lambda c: 1.0, runs=runs)
    result = search(t, bench, budget_s=30)
    coarse = [e.config for e in result.evaluations if e.phase == "coarse"]
    assert len(coarse) > 3 and coarse == sorted(coarse, key=lambda c: screen(c).score)
    # top_n: only the N best-ranked are timed in the coarse pass (refinement may still reach others)
    t, bench = scored_tunable(WIDE, WIDE_DEFAULT, screen, lambda c: 1.0)
    result = search(t, bench, budget_s=30, screen_top_n=3)
    coarse = [e.config for e in result.evaluations if e.phase == "coarse"]
    assert coarse == [{"block_m": 1024, "num_warps": 1}, {"block_m": 1024, "num_warps": 4},
                      {"block_m": 1024, "num_warps": 8}]  # fmt: skip
    with pytest.raises(ValueError, match="screen_top_n"):
        search(t, bench, screen_top_n=0)


def test_without_a_screen_the_coarse_pass_keeps_its_seeded_spread_out_order():
    import random

    t, bench = scored_tunable(WIDE, WIDE_DEFAULT, None, lambda c: 1.0)
    result = search(t, bench, budget_s=30, seed=3)
    expected = [c for c in WIDE.coarse() if config_key(c) != config_key(WIDE_DEFAULT)]
    random.Random(3).shuffle(expected)
    assert [e.config for e in result.evaluations if e.phase == "coarse"] == expected


def test_a_screen_that_only_raises_fails_the_search_loudly():
    def broken(config):
        raise RuntimeError("cuobjdump: not found")

    runs = []
    with pytest.raises(ScreenFailed, match="cuobjdump: not found") as caught:
        search(tunable(broken, runs=runs), CountingBenchmarker(), budget_s=30)
    error = caught.value
    assert error.name == "fake" and error.problem == {"n": 1} and "raised for each of the" in str(error)
    assert error.first_error.startswith("screen raised RuntimeError") and set(runs) == {config_key(DEFAULT)}
    assert error.result.runs == 1 and error.result.default_time_s is not None
    # errors among verdicts (fake_compiler raises for one config only), or verdicts only: no failure
    search(tunable(fake_compiler()), CountingBenchmarker(), budget_s=30)


# --- shipped verdicts ---------------------------------------------------------------------------

IDENTITY = ScreenIdentity("3.6.0", "sm90", "hashA", {"n": 1, "dtype": "float32"})
FORCED = {"block_m": 64, "num_warps": 4}  # the fake compiler keeps it; the shipped verdict says it spills


def shipped(tmp_path):
    """A verdict file for IDENTITY holding every coarse config of SPACE, FORCED marked as spilling."""
    verdicts = [(c, ScreenResult(False, "spills (shipped)") if c == FORCED else fake_compiler()(c))
                for c in SPACE.coarse() if not (c["block_m"] == 16 and c["num_warps"] == 2)]  # fmt: skip
    path = tmp_path / verdict_filename(IDENTITY.triton_version, IDENTITY.target)
    write_verdicts(path, IDENTITY.triton_version, IDENTITY.target, verdict_entries(IDENTITY, "fake", verdicts))
    return verdicts


@pytest.mark.parametrize("identity", [
    IDENTITY,
    ScreenIdentity("3.5.0", "sm90", "hashA", IDENTITY.problem),
    ScreenIdentity("3.6.0", "sm80", "hashA", IDENTITY.problem),
    ScreenIdentity("3.6.0", "sm90", "hashB", IDENTITY.problem),
    ScreenIdentity("3.6.0", "sm90", "hashA", {**IDENTITY.problem, "dtype": "float16"}),
], ids=["match", "other-triton", "other-arch", "other-kernel-hash", "other-problem"])  # fmt: skip
def test_shipped_verdicts_are_used_only_for_their_triton_arch_kernel_and_problem(tmp_path, identity):
    in_file = shipped(tmp_path)
    calls, runs = [], []
    t = tunable(fake_compiler(calls), runs=runs)
    t.screen_identity = identity
    result = search(t, CountingBenchmarker(), budget_s=30, verdict_dirs=[tmp_path])
    from_file = {config_key(c) for c, _ in in_file}
    if identity == IDENTITY:
        assert result.shipped_verdicts == len(in_file)
        assert not from_file & set(calls), "a config with a shipped verdict was screened again"
        assert config_key(FORCED) not in runs and (FORCED, "spills (shipped)") in result.screen_dropped
    else:
        assert result.shipped_verdicts == 0
        assert from_file & set(calls)
        assert (FORCED, "spills (shipped)") not in result.screen_dropped and config_key(FORCED) in runs


def test_a_verdict_file_round_trips_and_refuses_another_identity(tmp_path):
    verdicts = shipped(tmp_path)
    path = tmp_path / verdict_filename("3.6.0", "sm90")
    assert path.name == "sm90__triton-3.6.0.json"
    loaded = load_verdicts([tmp_path], IDENTITY, "fake")
    assert loaded == {config_key(c): ScreenResult(v.ok, v.reason, v.score) for c, v in verdicts}
    assert load_verdicts([tmp_path], IDENTITY, "other op") == {}
    # merging keeps the old entries; a raised verdict is not an entry
    extra = [({"block_m": 32, "num_warps": 2}, ScreenResult(True, "", 0.5)),
             ({"block_m": 16, "num_warps": 2}, ScreenResult(False, "screen raised X", raised=True))]  # fmt: skip
    assert write_verdicts(path, "3.6.0", "sm90", verdict_entries(IDENTITY, "fake", extra)) == len(verdicts) + 1
    with pytest.raises(ValueError, match="not sm80"):
        write_verdicts(path, "3.6.0", "sm80", [])
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable screen verdict file"):
        assert load_verdicts([tmp_path], IDENTITY, "fake") == {}


def test_the_adder_screen_compiles_within_the_time_left_and_forgets_a_cut_compile(monkeypatch):
    from triton_adder.autotune import tunables
    from triton_adder.measure import sass

    timeouts = []

    def fake_isolated_compile(op, x, weight, geom, config, *, grad_mode, arch, timeout_s):
        timeouts.append(timeout_s)
        if timeout_s < tunables.SCREEN_COMPILE_TIMEOUT_S:  # this compile needs longer than the budget left
            raise TimeoutError(f"took over {timeout_s:g} s")
        return sass.CompileStats(op, arch, "fake", 128, 0, 0, 0, 0, 2.0, 2.5, "loop")

    monkeypatch.setattr(sass, "compile_stats_isolated", fake_isolated_compile)
    screen = tunables.compile_screen("forward", *_small_forward_layer(), "paper", 90)
    config = {"block_m": 32, "block_n": 16, "block_k": 8, "num_warps": 2, "num_stages": 1}
    t = Tunable("forward", SearchSpace.from_dict({k: (v,) for k, v in config.items()}), {}, lambda c: 1, config,
                screen=screen)  # fmt: skip
    cut = prune(t, [config], deadline=time.perf_counter() + 5)
    assert len(timeouts) == 1 and 0 < timeouts[0] <= 5
    assert cut.unscreened == [config] and not cut.dropped and not t.screen_cache  # not a "compile over" verdict
    later = prune(t, [config])  # no deadline: the full per-compile timeout, and a verdict
    assert timeouts[1] == tunables.SCREEN_COMPILE_TIMEOUT_S and later.kept[0][1].score == 2.5


def _load_prune_space():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "prune_space.py"
    spec = importlib.util.spec_from_file_location("prune_space_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prune_space_writes_verdicts_that_the_tuner_takes_instead_of_compiling(tmp_path, monkeypatch, capsys):
    """benchmarks/prune_space.py --write-verdicts (fake compiler) -> a verdict file that a search of the same
    (Triton, sm_90, kernel hash, problem) loads: no config in it is compiled again; another arch's search
    loads nothing."""
    import torch

    from triton_adder import models
    from triton_adder.autotune import problems, tunables
    from triton_adder.measure import sass

    _skip_without_cuobjdump()
    compiled = []

    def fake_isolated_compile(op, x, weight, geom, config, *, grad_mode, arch, timeout_s):
        compiled.append((op, config))
        spill = 64 if config.block_m == 128 else 0
        return sass.CompileStats(op, arch, "fake", 128, spill, 0, 0, 0, 2.0, 2.0 + config.block_n / 256, "loop")

    monkeypatch.setattr(sass, "compile_stats_isolated", fake_isolated_compile)
    path = tmp_path / f"sm90__triton-{sass.triton_version()}.json"
    prune_space = _load_prune_space()
    assert prune_space.main(["--model", "lenet5bn", "--layers", "conv3", "--ops", "forward", "grad_weight",
                             "--space", "coarse", "--workers", "2", "--write-verdicts", str(path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "verdicts in" in out and "pruned" in out and path.exists()
    written = {op: {kernel for o, kernel in compiled if o == op} for op in ("forward", "grad_weight")}
    assert all(written.values())

    problem = next(p for p in problems.collect_problems(models.build("lenet5bn", adder=True), (256, 1, 28, 28))
                   if "conv3" in p.layers)  # fmt: skip
    for op in ("forward", "grad_weight"):
        tunable = tunables.make_tunable(op, problem, torch.float32, torch.device("cpu"), False, False, screen_arch=90)
        tunable.run, tunable.outputs_match = (lambda config: 1), None  # no kernel runs: only the screen matters
        compiled.clear()
        result = search(tunable, CountingBenchmarker(), budget_s=10, verdict_dirs=[tmp_path])
        assert result.shipped_verdicts == len(written[op])
        assert not {kernel for _, kernel in compiled} & written[op], "a shipped verdict was compiled again"
        assert any(reason == "spills" for _, reason in result.screen_dropped)
        other = tunables.make_tunable(op, problem, torch.float32, torch.device("cpu"), False, False, screen_arch=80)
        other.run, other.outputs_match = (lambda config: 1), None
        assert search(other, CountingBenchmarker(), budget_s=1, verdict_dirs=[tmp_path]).shipped_verdicts == 0


def test_verdict_writers_at_once_lose_nothing(tmp_path):
    """Two screening runs merging into one verdict file (read, merge, replace) under its lock: every entry stays."""
    import threading

    path = tmp_path / verdict_filename("3.6.0", "sm90")

    def writer(thread: int) -> None:
        for i in range(15):
            entry = ({"block_m": 1000 * thread + i, "num_warps": 2}, ScreenResult(True, "", float(i)))
            write_verdicts(path, "3.6.0", "sm90", verdict_entries(IDENTITY, "fake", [entry]))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(load_verdicts([tmp_path], IDENTITY, "fake")) == 6 * 15
