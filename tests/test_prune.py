"""Compile-time pruning (tuning/prune.py) with fake screens, its hook in search(), and the adder screen."""

from __future__ import annotations

import os
import re
import threading

import pytest

from triton_adder.tuning import Measurement, ScreenResult, SearchSpace, Tunable, config_key, prune, search

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
