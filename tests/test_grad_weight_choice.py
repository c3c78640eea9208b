"""The weight-gradient method and split as tuned choices: searched, cached, and what the layer runs.

Through the interpreter (conftest), on LeNet-5-BN's adder layers at batch 1. The timings are faked
(a benchmarker that reports the method under test as 10x faster), so each test decides the winner
and checks that the cache holds it and the layer's backward takes it; the gradients are compared
with the float64 reference.
"""

import pytest
import torch

from tests.tolerance import assert_matches_reference
from triton_adder import Adder2d, backends, reference
from triton_adder.autotune import lookup as configs
from triton_adder.autotune import problems, spaces, tunables, tuner
from triton_adder.backends import conv_identity
from triton_adder.functional import resolve_geometry
from triton_adder.geometry import LayerShape
from triton_adder.kernels import grad_weight as grad_weight_kernel
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.measure import sass
from tuning import Measurement, TuningCache


def lenet_conv2_problem(batch: int = 1) -> problems.LayerProblem:
    geom = resolve_geometry((14, 14), (5, 5))
    return problems.LayerProblem(["conv2"], LayerShape.of((batch, 6, 14, 14), (16, 6, 5, 5), geom))


def test_choice_round_trips_and_rejects_what_it_cannot_run():
    choice = configs.GradWeightChoice("triton", KernelConfig(16, 16, 4, 4, 1), 3)
    assert configs.GradWeightChoice.from_dict(choice.as_dict()) == choice
    values = choice.as_dict()
    for change, message in (({"method": "winograd"}, "method must be one of"),
                            ({"split_k": 0}, "split_k must be a positive int"),
                            ({"split_k": 2.0}, "split_k must be a positive int"),
                            ({"block_m": 24}, "block_m must be a power of two"),
                            ({"tile": 1}, "unknown keys")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            configs.GradWeightChoice.from_dict({**values, **change})
    with pytest.raises(ValueError, match="needs 'method' and 'split_k'"):
        configs.GradWeightChoice.from_dict(choice.config.as_dict())  # a kernel-only entry is not a choice


@pytest.mark.parametrize("grad_mode", ["paper", "exact"])
def test_full_space_searches_method_and_split(grad_mode):
    problem = lenet_conv2_problem(batch=8)
    tunable = tunables.make_tunable("grad_weight", problem, torch.float32, torch.device("cpu"), False,
                                    quick=False, grad_mode=grad_mode)  # fmt: skip
    assert tunable.problem["grad_mode"] == grad_mode
    valid = [c for c in tunable.space if not tunable.violations(c)]
    methods = {c["method"] for c in valid}
    assert methods == ({"triton", "conv_identity"} if grad_mode == "paper" else {"triton"})
    identity = [c for c in valid if c["method"] == "conv_identity"]
    if grad_mode == "paper":  # no launch knobs: one config, the default's
        assert identity == [tunable.default]
    reduction = 8 * 10 * 10  # N * Ho * Wo
    splits = {c["split_k"] for c in valid}
    assert {1, 2, 4} <= splits and all(s == 1 or s * c["block_k"] <= reduction for c in valid for s in [c["split_k"]])
    assert tunable.default["split_k"] == grad_weight_kernel.grad_weight_split(
        8, problem.weight_shape, problem.geom, KernelConfig.from_dict(
            {k: v for k, v in tunable.default.items() if k not in ("method", "split_k")}), torch.device("cpu"))[0]


class FakeBenchmarker:
    """Reports the last config run by the wrapped tunable: `winner`'s method 10x faster than the other."""

    functional = True

    def __init__(self, winner: str, last: dict):
        self.winner, self.last = winner, last

    def measure(self, fn):
        fn()
        time_s = 1e-3 if self.last["method"] == self.winner else 1e-2
        return Measurement(time_s, (time_s,), True)


@pytest.mark.parametrize("winner", ["triton", "conv_identity"])
def test_the_searched_method_is_cached_and_the_layer_takes_it(cache_dir, monkeypatch, winner):
    last = {}
    make_tunable = tuner.make_tunable

    def recording_tunable(*args, **kwargs):
        tunable = make_tunable(*args, **kwargs)
        run = tunable.run

        def recorded(config):
            last["method"] = config["method"]
            return run(config)

        tunable.run = recorded
        return tunable

    monkeypatch.setattr(tuner, "make_tunable", recording_tunable)
    monkeypatch.setattr(tuner, "benchmarker_for", lambda device, quick: FakeBenchmarker(winner, last))
    cache = configs.cache_for(torch.device("cpu"))
    rows = tuner.tune_model("lenet5bn", 1, torch.float32, ("grad_weight",), 60, cache, torch.device("cpu"),
                            quick=True)  # fmt: skip
    assert [row.status for row in rows] == ["tuned"] * 3
    assert all(row.config["method"] == winner for row in rows)

    calls = []
    monkeypatch.setattr(conv_identity, "grad_weight",
                        lambda *a, real=conv_identity.grad_weight: calls.append("conv_identity") or real(*a))
    monkeypatch.setattr(grad_weight_kernel, "grad_weight",
                        lambda *a, real=grad_weight_kernel.grad_weight: calls.append("triton") or real(*a))
    layer = Adder2d(6, 16, 5)
    x = torch.randn(1, 6, 14, 14, requires_grad=True)
    grad_out = torch.randn(1, 16, 10, 10)
    with backends.use_backend("triton"):
        layer(x).backward(grad_out)
    assert calls == [winner]
    geom = resolve_geometry((14, 14), (5, 5))
    _, expected = reference.adder2d_backward(grad_out.double(), x.detach().double(), layer.weight.detach().double(),
                                             geom, "paper")  # fmt: skip
    assert_matches_reference(layer.weight.grad, expected, torch.float32, reduction_length=100)

    # Exact mode is a separate entry: the paper-mode winner is not used for it.
    assert configs.grad_weight_choice(x.detach(), layer.weight.detach(), geom, "exact") is None


def test_a_cached_identity_is_refused_for_exact_mode(cache_dir):
    x, w = torch.empty(1, 6, 14, 14), torch.empty(16, 6, 5, 5)
    geom = resolve_geometry((14, 14), (5, 5))
    # Written without the layer's validator (`cache_for`'s refuses to store it), as another tool might.
    cache = TuningCache(cache_dir, configs.identity(x.device))
    choice = configs.GradWeightChoice("conv_identity", KernelConfig(16, 16, 4, 4, 1), 1)
    problem = configs.op_problem("grad_weight", configs.problem_key(LayerShape.of(x.shape, w.shape, geom)), "exact")
    cache.store([cache.make_entry("grad_weight", configs.kernel_hash("grad_weight"), "float32", "contiguous",
                                  problem, choice.as_dict(), 1.0, 1.0, True)])  # fmt: skip
    configs.clear()
    with pytest.warns(RuntimeWarning, match="cannot compute grad_mode='exact'"):
        assert configs.grad_weight_choice(x, w, geom, "exact") is None
    assert spaces.grad_weight_methods("exact") == ("triton",)


def test_screen_compiles_each_kernel_tile_once_whatever_its_method_and_split(monkeypatch):
    # The split is a run-time argument and the method does not change the kernel: one compile per tile.
    compiled = []

    def fake_compile_stats(op, x_meta, weight_meta, geom, config, *, grad_mode, arch, timeout_s):
        compiled.append(config)
        spills = config.block_k == 8  # a verdict that depends on the tile only
        return sass.CompileStats(op, arch, "fake", 128, 64 if spills else 0, 0, 0, 0, 1.0, 2.0 + config.block_k, "loop")

    monkeypatch.setattr(tunables.sass, "compile_stats_isolated", fake_compile_stats)
    problem = lenet_conv2_problem()
    x, weight = torch.empty(problem.shape.x_shape), torch.empty(problem.shape.weight_shape)
    screen = tunables.compile_screen("grad_weight", x, weight, problem.geom, "paper", 90)
    tile = {"block_m": 16, "block_n": 16, "block_k": 4, "num_warps": 1, "num_stages": 1}
    verdicts = [screen({**tile, "method": method, "split_k": split})
                for method in ("triton", "conv_identity") for split in (1, 2, 8)]  # fmt: skip
    assert compiled == [KernelConfig(16, 16, 4, 1, 1)]
    assert all(v.ok and v.score == 6.0 for v in verdicts)
    spilling = screen({**tile, "block_k": 8, "method": "triton", "split_k": 1})
    assert not spilling.ok and spilling.reason == "spills" and len(compiled) == 2


def test_screen_compiles_a_tile_once_when_its_variants_arrive_at_the_same_time(monkeypatch):
    # The pruner screens on threads: variants of one tile asked for at once wait for one compile.
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    compiled, gate = [], threading.Barrier(6, timeout=10)

    def slow_compile(op, x_meta, weight_meta, geom, config, *, grad_mode, arch, timeout_s):
        compiled.append(config)
        time.sleep(0.3)  # the other five threads ask while this one compiles
        return sass.CompileStats(op, arch, "fake", 128, 0, 0, 0, 0, 1.0, 2.5, "loop")

    monkeypatch.setattr(tunables.sass, "compile_stats_isolated", slow_compile)
    problem = lenet_conv2_problem()
    x, weight = torch.empty(problem.shape.x_shape), torch.empty(problem.shape.weight_shape)
    screen = tunables.compile_screen("grad_weight", x, weight, problem.geom, "paper", 90)
    tile = {"block_m": 16, "block_n": 16, "block_k": 4, "num_warps": 1, "num_stages": 1}
    variants = [{**tile, "method": method, "split_k": split} for method in ("triton", "conv_identity")
                for split in (1, 2, 8)]  # fmt: skip

    def ask(config):
        gate.wait()
        return screen(config)

    with ThreadPoolExecutor(len(variants)) as pool:
        verdicts = list(pool.map(ask, variants))
    assert compiled == [KernelConfig(16, 16, 4, 1, 1)]
    assert all(v.ok and v.score == 2.5 for v in verdicts)
