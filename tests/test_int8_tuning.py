"""Tuning the int8 CPU kernel's blocking (`triton_adder.autotune.int8`) and the layer's run-time lookup.

The tuner's timings are wall clock and are not checked here (speed is measured by benchmarks); what
is checked: every config of the space the search may time computes the default's exact output
(checked against the float64 reference of the quantized math in test_quantize.py), the cache
keys (CPU, variant, kernel build, shape, threads), the lookup (tuned, nearest batch, ignored when
malformed), the interleaved confirmation, and the CLI. Every test tunes into its own empty cache.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch

from triton_adder import quantize, tune
from triton_adder.autotune import int8, lookup
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.quant import QuantizedAdder2d, native, tuned
from tuning import SearchSpace, Tunable, interleaved


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(lookup.CACHE_DIR_ENV, str(tmp_path / "cache"))
    for name in (native.ISA_ENV, native.COMPILER_ENV, native.IFMA_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    native.clear()
    tuned.clear()
    yield
    native.clear()
    tuned.clear()


def library() -> native.Library:
    found = native.load()
    assert found is not None, "the int8 kernel must build on the test machine (gcc is there)"
    return found


def entry(lib: native.Library, problem: dict, config: dict) -> dict:
    """A cache entry for `problem` (`tuned.problem_of`) holding `config`, as the tuner stores it."""
    cache = tuned.cache_for(lib)
    return cache.make_entry(
        tuned.OP,
        tuned.kernel_hash(lib),
        tuned.KEY_DTYPE,
        tuned.KEY_LAYOUT,
        problem,
        config,
        1e-3,
        2e-3,
        functional=False,
    )


# A 3x3 layer over 20 channels with groups 2 and stride 2 (K = 90, not a multiple of 8; 10 output
# channels per group, not a multiple of 8), and LeNet's 1x1 layer.
ODD = LayerShape(3, 20, 9, 7, 20, 3, 3, Conv2dGeometry((2, 2), (1, 1), (1, 1), 2, (5, 4)))
POINTWISE = LayerShape(2, 120, 1, 1, 84, 1, 1, Conv2dGeometry((1, 1), (0, 0), (1, 1), 1, (1, 1)))


@pytest.mark.parametrize("shape", [ODD, POINTWISE], ids=["odd-3x3-g2-s2", "1x1"])
def test_every_config_the_search_may_time_computes_the_default_output(shape):
    tunable = int8.make_tunable(shape, library(), threads=2)
    reference = tunable.run(tunable.default)
    valid = [config for config in tunable.space if not tunable.violations(config)]
    assert tunable.default in tunable.space and len(valid) > 50
    generator = torch.Generator().manual_seed(0)
    for index in torch.randperm(len(valid), generator=generator)[:60].tolist():
        assert torch.equal(tunable.run(valid[index]), reference), valid[index]


def test_constraints_prune_what_spills_or_repeats_a_larger_block():
    def allowed(shape: LayerShape, **config) -> bool:
        return not int8.make_tunable(shape, library(), threads=2).violations(config)

    # POINTWISE: M = 2 positions, 84 channels (88 padded), K = 120 bytes
    base = {"mr": 2, "nr": 16, "mc": 16, "nc": 32, "kc": 128, "threads": 1}
    assert allowed(POINTWISE, **base)
    assert not allowed(POINTWISE, **{**base, "mr": 3})  # mc not a multiple of mr
    assert not allowed(POINTWISE, **{**base, "nr": 32, "nc": 16})  # a register block wider than the cache block
    assert not allowed(POINTWISE, **{**base, "kc": 256})  # kc 128 already covers K
    assert not allowed(POINTWISE, **{**base, "mc": 24})  # mc 16 already covers M
    assert allowed(POINTWISE, **{**base, "nc": 128}) and not allowed(POINTWISE, **{**base, "nc": 256})
    if library().isa == "avx512bw":  # 32 zmm: 6 x 4 accumulators + 4 weights + 1 fit, 8 x 4 + 5 do not
        wide = LayerShape(1, 64, 8, 8, 64, 3, 3, Conv2dGeometry((1, 1), (1, 1), (1, 1), 1, (8, 8)))
        assert allowed(wide, **{**base, "mr": 6, "nr": 32, "mc": 48, "nc": 64, "kc": 1024})
        assert not allowed(wide, **{**base, "mr": 8, "nr": 32, "mc": 48, "nc": 64, "kc": 1024})


def test_blocking_for_returns_the_default_until_a_blocking_is_tuned_then_the_tuned_one():
    lib = library()
    x_shape, weight_shape, geom = ODD.x_shape, ODD.weight_shape, ODD.geom
    assert tuned.blocking_for(lib, x_shape, weight_shape, geom, 2) == native.DEFAULT_BLOCKING[lib.isa]
    chosen = {"mr": 2, "nr": 16, "mc": 32, "nc": 16, "kc": 64, "threads": 1}
    cache = tuned.cache_for(lib)
    cache.store([entry(lib, tuned.problem_of(ODD, 2), chosen)])
    tuned.clear()
    assert tuned.blocking_for(lib, x_shape, weight_shape, geom, 2) == native.Blocking(**chosen)
    # batch 5 lies in bucket 8; the entry (batch 3, bucket 4) is the nearest of its family
    assert tuned.blocking_for(lib, (5, *x_shape[1:]), weight_shape, geom, 2) == native.Blocking(**chosen)
    # another thread count, another shape: not this entry
    assert tuned.blocking_for(lib, x_shape, weight_shape, geom, 4) == native.DEFAULT_BLOCKING[lib.isa]
    other = Conv2dGeometry((1, 1), (1, 1), (1, 1), 2, (9, 7))
    assert tuned.blocking_for(lib, x_shape, weight_shape, other, 2) == native.DEFAULT_BLOCKING[lib.isa]
    # the cache file is named by the CPU model and the kernel variant
    assert cache.path.name.startswith(tuned.identity(lib).filename.split("__")[0])
    assert f"int8-{lib.isa}" in cache.path.name


def test_a_layer_runs_the_tuned_blocking_and_its_output_is_unchanged(monkeypatch):
    lib = library()
    layer_input = torch.randn(ODD.x_shape)
    from triton_adder.nn import Adder2d

    float_layer = Adder2d(20, 20, 3, stride=2, padding=1, groups=2, bias=True)
    q = quantize(torch.nn.Sequential(float_layer), [layer_input])[0]
    before = q(layer_input)
    chosen = native.Blocking(mr=1, nr=8, mc=16, nc=8, kc=64, threads=1)
    cache = tuned.cache_for(lib)
    cache.store([entry(lib, tuned.problem_of(ODD, torch.get_num_threads()), tuned.config_of(chosen))])
    tuned.clear()
    used = []
    original = tuned.blocking_for
    monkeypatch.setattr(tuned, "blocking_for", lambda *args: used.append(original(*args)) or used[-1])
    assert torch.equal(q(layer_input), before)
    assert used == [chosen]
    q.blocking = native.DEFAULT_BLOCKING[lib.isa]  # an explicit blocking bypasses the cache
    assert torch.equal(q(layer_input), before) and used == [chosen]


@pytest.mark.parametrize(
    "config, why",
    [
        ({"mr": 5, "nr": 8, "mc": 20, "nc": 8, "kc": 64, "threads": 1}, "mr must be one of"),
        ({"mr": 1, "nr": 8, "mc": 16, "nc": 8, "kc": 64, "threads": 3}, "exceeds the problem's 2"),
        ({"mr": 1, "nr": 8, "mc": 16, "nc": 8, "kc": 64}, "fields"),
        ({"mr": 1, "nr": 8, "mc": 16, "nc": 8, "kc": 64, "threads": None}, "threads must be a positive int"),
    ],
)
def test_a_malformed_entry_is_ignored_with_a_warning_and_the_default_runs(config, why):
    lib = library()
    cache = tuned.cache_for(lib)
    malformed = entry(lib, tuned.problem_of(ODD, 2), config)
    with pytest.raises(ValueError, match=why):
        tuned.accept_entry(malformed)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text(
        json.dumps(
            {"format": "tuning-cache", "version": 1, "device": tuned.identity(lib).as_dict(), "entries": [malformed]}
        )
    )
    tuned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = tuned.blocking_for(lib, ODD.x_shape, ODD.weight_shape, ODD.geom, 2)
    assert found == native.DEFAULT_BLOCKING[lib.isa]
    assert any(why in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_an_unreadable_cache_never_breaks_a_forward(tmp_path):
    lib = library()
    tuned.cache_for(lib).path.parent.mkdir(parents=True, exist_ok=True)
    tuned.cache_for(lib).path.mkdir()  # a directory where the file goes
    tuned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = tuned.blocking_for(lib, ODD.x_shape, ODD.weight_shape, ODD.geom, 2)
    assert found == native.DEFAULT_BLOCKING[lib.isa]


def sleeper(seconds: dict) -> Tunable:
    """A tunable whose configs {"c": name} take `seconds[name]` to run."""
    return Tunable(
        name="sleep",
        space=SearchSpace.from_dict({"c": tuple(seconds)}),
        problem={},
        default={"c": "d"},
        run=lambda config: time.sleep(seconds[config["c"]]),
    )


def test_confirm_keeps_the_default_unless_the_winner_is_faster_interleaved():
    kept, best_s, default_s = int8.confirm(sleeper({"d": 0.002, "b": 0.004}), {"c": "b"}, repeats=5)
    assert kept == {"c": "d"} and best_s == default_s and default_s >= 0.002
    kept, best_s, default_s = int8.confirm(sleeper({"d": 0.006, "b": 0.001}), {"c": "b"}, repeats=5)
    assert kept == {"c": "b"} and 0.001 <= best_s < default_s and default_s >= 0.006
    kept, best_s, default_s = int8.confirm(sleeper({"d": 0.001}), {"c": "d"}, repeats=3)
    assert kept == {"c": "d"} and best_s == default_s


def test_interleaved_calls_each_once_per_repetition_in_varying_order():
    """A call warms the caches for the next: in a fixed or rotated order each callable would always follow the
    same other one, so the order is shuffled (from a seed) per repetition."""
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abcd"}
    times = interleaved(calls, repeats=40, warmup=1)
    assert order[:4] == list("abcd") and set(times) == set("abcd")
    rounds = [order[i : i + 4] for i in range(4, len(order), 4)]
    assert len(rounds) == 40 and all(sorted(r) == list("abcd") for r in rounds)
    followers = {(r[i], r[i + 1]) for r in rounds for i in range(3)}
    assert followers == {(x, y) for x in "abcd" for y in "abcd" if x != y}  # every callable after every other
    assert all(len(m.samples) == 40 for m in times.values())
    again: list[str] = []
    interleaved({name: (lambda name=name: again.append(name)) for name in "abcd"}, repeats=40, warmup=1)
    assert again == order  # seeded: the same order every run


def test_thread_counts():
    assert int8.thread_counts(1) == (1,)
    assert int8.thread_counts(6) == (1, 2, 4, 6)
    assert int8.thread_counts(8) == (1, 2, 4, 8)


def test_tune_cli_tunes_int8_without_a_gpu_then_finds_it_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no GPU, no interpreter: int8 is the default op
    cache_dir = tmp_path / "cache"
    argv = [
        "--model",
        "lenet5bn",
        "--batch-size",
        "2",
        "--budget-s",
        "0.5",
        "--no-report",
        "--cache-dir",
        str(cache_dir),
    ]
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("conv")]
    assert [(row[0], row[1], "tuned" in row) for row in rows] == [(f"conv{i}", "int8_forward", True) for i in (2, 3, 4)]
    assert "wall-clock times of the int8 layer" in out
    lib = library()
    stored = json.loads(tuned.cache_for(lib).path.read_text())["entries"]
    assert sorted(e["problem"]["in_channels"] for e in stored) == [6, 16, 120]
    assert all(e["op"] == tuned.OP and e["problem"]["threads"] == torch.get_num_threads() for e in stored)
    assert all(e["problem"]["batch"] == 2 and not e["functional"] for e in stored)
    assert tune.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("conv")]
    assert ["cached" in row for row in rows] == [True] * 3
    # the layers of a quantized LeNet now run what was stored
    from triton_adder import models

    model = models.build("lenet5bn")
    images = torch.randn(2, 1, 28, 28)
    quantized = quantize(model, [images])
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedAdder2d)]
    used = []
    original = tuned.blocking_for
    monkeypatch.setattr(tuned, "blocking_for", lambda *args: used.append(original(*args)) or used[-1])
    quantized(images)
    assert len(used) == len(layers) == 3
    stored_configs = sorted(sorted(e["config"].items()) for e in stored)
    assert sorted(sorted(tuned.config_of(blocking).items()) for blocking in used) == stored_configs


def test_tune_cli_int8_without_a_compiler(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(native.COMPILER_ENV, str(tmp_path / "no-such-cc"))
    native.clear()
    argv = ["--model", "lenet5bn", "--no-report", "--cache-dir", str(tmp_path / "cache")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tune.main(argv) == 0  # the default op: a warning, and the run goes on
        assert "warning: no int8 tuning" in capsys.readouterr().err
        assert tune.main([*argv, "--ops", "int8"]) == 2  # asked for: an error
        assert "error: no int8 tuning" in capsys.readouterr().err


def test_tune_cli_names_int8_among_the_accepted_ops(capsys):
    with pytest.raises(SystemExit):
        tune.main(["--model", "lenet5bn", "--ops", "int4", "--no-report"])
    err = capsys.readouterr().err
    assert "int4" in err and "int8" in err and "fwd" in err
