"""The generic autotuner (tuning/): search on a synthetic cost model, failure handling, the JSON cache.

No kernel runs here: a fake benchmarker returns a synthetic cost for the config last run, so the
search is checked against a known optimum and its evaluation count against exhaustive search.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tuning
from tuning import (
    Constraint,
    DeviceIdentity,
    Measurement,
    SearchSpace,
    Tunable,
    TuningCache,
    WallClockBenchmarker,
    search,
    tile_within,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

SPACE = SearchSpace.from_dict(
    {
        "block_m": (16, 32, 64, 128, 256),
        "block_n": (16, 32, 64, 128, 256),
        "block_k": (8, 16, 32, 64),
        "num_warps": (1, 2, 4, 8),
        "num_stages": (1, 2, 3, 4),
    }
)
DEFAULT = {"block_m": 32, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}
# Optimum deliberately off the coarse grid (block_m=128 and block_k=16 are odd indices), so the
# refinement step, not the coarse pass, has to find it.
OPTIMUM = {"block_m": 128, "block_n": 64, "block_k": 16, "num_warps": 4, "num_stages": 3}


def synthetic_cost(config):
    """A convex bowl in knob-index space with one coupling term; minimum 1.0 at OPTIMUM."""
    d = {k: SPACE._by_name[k].values.index(config[k]) - SPACE._by_name[k].values.index(OPTIMUM[k]) for k in config}
    return (
        1.0
        + 0.30 * d["block_m"] ** 2
        + 0.20 * d["block_n"] ** 2
        + 0.15 * d["block_k"] ** 2
        + 0.10 * d["num_warps"] ** 2
        + 0.05 * d["num_stages"] ** 2
        + 0.10 * d["block_m"] * d["block_n"]
    )


class FakeBenchmarker:
    """Returns synthetic_cost of the config the last run() saw; counts measurements."""

    functional = True

    def __init__(self, state):
        self.state = state
        self.calls = 0

    def measure(self, fn):
        fn()
        self.calls += 1
        cost = synthetic_cost(self.state["last"])
        return Measurement(cost, (cost,), functional=True)


def make_tunable(fail_if=None, wrong_if=None, constraints=()):
    """fail_if(config): run raises (a compile error / out of resources); wrong_if(config): returns a wrong output."""
    state = {"last": None}

    def run(config):
        state["last"] = config
        if fail_if and fail_if(config):
            raise RuntimeError(f"out of resources: shared memory for {config}")
        return "wrong" if wrong_if and wrong_if(config) else "right"

    tunable = Tunable("synthetic", SPACE, {"batch": 8}, run, DEFAULT, constraints=constraints)
    return tunable, FakeBenchmarker(state)


def test_search_finds_optimum_with_fewer_runs_than_exhaustive():
    tunable, bench = make_tunable()
    result = search(tunable, bench, budget_s=60)
    assert result.best == OPTIMUM
    assert result.best_time_s == pytest.approx(1.0)
    assert result.default_time_s == pytest.approx(synthetic_cost(DEFAULT))
    assert result.speedup == pytest.approx(synthetic_cost(DEFAULT))
    assert result.runs == bench.calls
    assert result.runs < len(SPACE) / 4, f"{result.runs} runs for a space of {len(SPACE)}"
    assert {e.phase for e in result.evaluations} == {"default", "coarse", "refine"}


def test_search_prunes_with_constraints_before_running():
    # Forbid the two largest block_m (say, shared memory) and any tile beyond a 100-wide problem.
    constraints = [
        Constraint("block_m <= 64", lambda c: c["block_m"] <= 64),
        tile_within("block_n", 100),
    ]
    tunable, bench = make_tunable(constraints=constraints)
    result = search(tunable, bench, budget_s=60)
    assert result.pruned == len(SPACE) - 3 * 4 * 4 * 4 * 4
    assert all(e.config["block_m"] <= 64 for e in result.evaluations)
    valid_best = min((c for c in SPACE if not tunable.violations(c)), key=synthetic_cost)
    assert result.best == valid_best
    assert tunable.violations({**OPTIMUM, "block_n": 256}) == ["block_m <= 64", "block_n <= 128 (extent 100)"]


def test_failing_configs_are_recorded_and_skipped():
    # The optimum and its whole block_m=128 row fail (e.g. out of shared memory): the search must
    # still finish and return the best config that runs.
    tunable, bench = make_tunable(fail_if=lambda c: c["block_m"] == 128)
    result = search(tunable, bench, budget_s=60)
    failed = [e for e in result.evaluations if e.status == "failed"]
    assert failed and all(e.config["block_m"] == 128 and "out of resources" in e.error for e in failed)
    assert result.best["block_m"] != 128
    runnable_best = min((c for c in SPACE if c["block_m"] != 128), key=synthetic_cost)
    assert synthetic_cost(result.best) == pytest.approx(synthetic_cost(runnable_best))


def test_default_failing_returns_no_winner_instead_of_raising():
    tunable, bench = make_tunable(fail_if=lambda c: c == DEFAULT)
    result = search(tunable, bench, budget_s=60)
    assert result.best is None and result.speedup is None
    assert [e.status for e in result.evaluations] == ["failed"]


def test_winner_whose_output_differs_from_default_is_rejected():
    # The optimum "miscompiles": its output differs from the default config's.
    tunable, bench = make_tunable(wrong_if=lambda c: c == OPTIMUM)
    result = search(tunable, bench, budget_s=60)
    assert result.best != OPTIMUM
    mismatched = [e for e in result.evaluations if e.status == "mismatch"]
    assert [e.config for e in mismatched] == [OPTIMUM]
    second = sorted((e for e in result.evaluations if e.status == "ok"), key=lambda e: e.time_s)[0]
    assert result.best == second.config


def test_evaluation_cap_stops_the_search_with_a_verified_answer():
    tunable, bench = make_tunable()
    result = search(tunable, bench, budget_s=60, max_evaluations=5)
    assert result.runs == 5 and result.budget_exhausted
    assert result.best_time_s == min(e.time_s for e in result.evaluations if e.status == "ok")


def test_space_neighbours_and_coarse_grid():
    space = SearchSpace.from_dict({"a": (1, 2, 4, 8, 16), "b": (1, 2)})
    assert space.coarse().knobs[0].values == (1, 4, 16)
    assert space.coarse().knobs[1].values == (1, 2)
    assert space.neighbours({"a": 1, "b": 2}) == [{"a": 2, "b": 2}, {"a": 1, "b": 1}]
    assert len(space) == 10 and {"a": 4, "b": 1} in space and {"a": 3, "b": 1} not in space
    with pytest.raises(ValueError, match="distinct"):
        SearchSpace.from_dict({"a": (1, 1)})


def test_wall_clock_results_are_functional():
    bench = WallClockBenchmarker(warmup=0, repeats=3)
    m = bench.measure(lambda: sum(range(100)))
    assert m.functional and bench.functional and len(m.samples) == 3 and m.time_s >= 0


# --- cache -------------------------------------------------------------------------------------

IDENTITY = DeviceIdentity("NVIDIA H100 80GB HBM3", "sm90", "3.6.0")
PROBLEM = {"batch": 8, "in_channels": 16, "height": 9, "width": 7, "kernel": [3, 3]}


def store_one(cache, problem=PROBLEM, config=None, kernel_hash="hashA", functional=False, **overrides):
    entry = cache.make_entry(
        "forward", kernel_hash, "float32", "channels_last", problem, config or {"block_m": 64},
        time_s=1e-3, default_time_s=2e-3, functional=functional,
    )
    entry.update(overrides)
    cache.store([entry])


def test_cache_round_trip_is_json_in_a_file_per_device(tmp_path):
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    store_one(cache, config={"block_m": 128, "block_n": 64})
    assert cache.path.name == "NVIDIA-H100-80GB-HBM3__sm90__triton-3.6.0.json"
    data = json.loads(cache.path.read_text())
    assert data["device"] == IDENTITY.as_dict() and len(data["entries"]) == 1
    fresh = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    hit = fresh.lookup("forward", "hashA", "float32", "channels_last", PROBLEM)
    assert hit.config == {"block_m": 128, "block_n": 64} and hit.match == "exact" and hit.source == "user"
    # Every key part matters: another dtype, layout or op finds nothing.
    assert fresh.lookup("forward", "hashA", "float16", "channels_last", PROBLEM) is None
    assert fresh.lookup("forward", "hashA", "float32", "contiguous", PROBLEM) is None
    assert fresh.lookup("grad_input", "hashA", "float32", "channels_last", PROBLEM) is None
    # Another device identity is another file.
    other = TuningCache(tmp_path, DeviceIdentity("NVIDIA H200", "sm90", "3.6.0"), shipped_dirs=())
    assert other.lookup("forward", "hashA", "float32", "channels_last", PROBLEM) is None


def test_bucketed_lookup_exact_then_nearest(tmp_path):
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    store_one(cache, {**PROBLEM, "batch": 8}, {"block_m": 8})
    store_one(cache, {**PROBLEM, "batch": 64}, {"block_m": 64})

    def find(batch, **kw):
        return cache.lookup("forward", "hashA", "float32", "channels_last", {**PROBLEM, "batch": batch}, **kw)

    assert (find(5).config, find(5).match) == ({"block_m": 8}, "exact")  # 5 -> bucket 8
    assert (find(33).config, find(33).match) == ({"block_m": 64}, "exact")  # 33 -> bucket 64
    assert (find(16).config, find(16).match) == ({"block_m": 8}, "nearest")  # 16: 1 octave from 8, 2 from 64
    assert (find(256).config, find(256).match) == ({"block_m": 64}, "nearest")
    assert find(16, allow_nearest=False) is None
    assert cache.lookup("forward", "hashA", "float32", "channels_last", {**PROBLEM, "batch": 8, "height": 10}) is None


def test_functional_entries_can_be_excluded(tmp_path):
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    store_one(cache, functional=True)
    assert cache.lookup("forward", "hashA", "float32", "channels_last", PROBLEM).entry["functional"] is True
    assert cache.lookup("forward", "hashA", "float32", "channels_last", PROBLEM, allow_functional=False) is None


def test_stale_kernel_hash_and_triton_version_are_ignored(tmp_path):
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    store_one(cache, kernel_hash="old-kernel")
    assert cache.lookup("forward", "new-kernel", "float32", "channels_last", PROBLEM) is None
    store_one(cache, kernel_hash="new-kernel", triton_version="3.5.0")  # copied from another Triton
    assert cache.lookup("forward", "new-kernel", "float32", "channels_last", PROBLEM) is None
    store_one(cache, kernel_hash="new-kernel")
    assert cache.lookup("forward", "new-kernel", "float32", "channels_last", PROBLEM) is not None


def test_corrupt_cache_is_moved_aside_and_rebuilt(tmp_path):
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    cache.path.write_text('{"format": "tuning-cache", "entries": [{"op": ')  # a torn write
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert cache.lookup("forward", "hashA", "float32", "channels_last", PROBLEM) is None
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1
    store_one(cache)
    assert TuningCache(tmp_path, IDENTITY, shipped_dirs=()).lookup(
        "forward", "hashA", "float32", "channels_last", PROBLEM
    ) is not None
    # Corrupt again, then write straight away: the store recovers as well.
    cache.path.write_text("not json")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        store_one(cache, {**PROBLEM, "batch": 64})
    assert len(TuningCache(tmp_path, IDENTITY, shipped_dirs=()).entries()) == 1


def test_shipped_configs_sit_beneath_the_user_cache(tmp_path):
    shipped_dir, user_dir = tmp_path / "shipped", tmp_path / "user"
    store_one(TuningCache(shipped_dir, IDENTITY, shipped_dirs=()), config={"block_m": 32})
    store_one(TuningCache(shipped_dir, IDENTITY, shipped_dirs=()), {**PROBLEM, "in_channels": 32}, {"block_m": 16})
    cache = TuningCache(user_dir, IDENTITY, shipped_dirs=[shipped_dir])
    hit = cache.lookup("forward", "hashA", "float32", "channels_last", PROBLEM)
    assert (hit.config, hit.source) == ({"block_m": 32}, "shipped")
    store_one(cache, config={"block_m": 256})
    hit = cache.lookup("forward", "hashA", "float32", "channels_last", PROBLEM)
    assert (hit.config, hit.source) == ({"block_m": 256}, "user")
    other = cache.lookup("forward", "hashA", "float32", "channels_last", {**PROBLEM, "in_channels": 32})
    assert other.source == "shipped"
    assert not (user_dir / "shipped").exists() and len(cache.entries()) == 1  # shipped data is never copied up


WRITER = textwrap.dedent(
    """
    import sys
    from tuning import DeviceIdentity, TuningCache
    cache_dir, writer = sys.argv[1], int(sys.argv[2])
    identity = DeviceIdentity("NVIDIA H100 80GB HBM3", "sm90", "3.6.0")
    for i in range(40):
        cache = TuningCache(cache_dir, identity, shipped_dirs=())  # a fresh reader each time, like a new tuner
        problem = {"batch": 8, "in_channels": 1000 * writer + i}
        entry = cache.make_entry("forward", "h", "float32", "contiguous", problem, {"block_m": i}, 1.0, 2.0, False)
        cache.store([entry])
    """
)


def test_two_processes_storing_at_once_lose_no_entry(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w)], cwd=REPO_ROOT, stderr=subprocess.PIPE)
        for w in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    cache = TuningCache(tmp_path, IDENTITY, shipped_dirs=())
    channels = sorted(e["problem"]["in_channels"] for e in cache.entries())
    assert channels == sorted([1000 + i for i in range(40)] + [2000 + i for i in range(40)])
    assert not list(tmp_path.glob("*.tmp"))


def test_tuning_and_reports_import_nothing_of_triton_adder():
    """tuning/ and reports/ are generic: installed inside triton_adder, they import only the standard
    library, third-party packages and their own modules (relatively), never triton_adder."""
    own = re.compile(r"^\s*(?:from\s+(?:triton_adder|tuning|reports)\b|import\s+(?:triton_adder|tuning|reports)\b)",
                     re.MULTILINE)
    sources = [path for folder in ("tuning", "reports") for path in sorted((REPO_ROOT / folder).glob("*.py"))]
    assert len(sources) >= 4
    assert [str(p.relative_to(REPO_ROOT)) for p in sources if own.search(p.read_text())] == []
    assert Path(tuning.__file__).resolve().parent == REPO_ROOT / "tuning"  # the folder checked is the one installed
