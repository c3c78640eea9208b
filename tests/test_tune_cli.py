"""`python -m triton_adder.tune` and the run-time lookup `triton_adder.autotune.lookup`, through the interpreter.

The end-to-end runs tune LeNet-5-BN's three adder layers (forward, reduced space) into a
temporary cache: once at the real shapes (--full-size, batch 1) to check the run-time lookup,
once the default no-GPU way (shrunk problems, then the report, with a tiny real benchmark standing
in for the model's). The backward tunables are checked on the smallest layer only (the
interpreter takes seconds per backward launch). Nothing here times anything: interpreter wall
clock only ranks configs on this machine and is marked functional.
"""

import json
import math
import os

import pytest
import torch

import reports
from tests.tolerance import assert_matches_reference
from triton_adder import Adder2d, bench, models, reference, report, tune
from triton_adder.autotune import lookup as configs
from triton_adder.autotune import problems, spaces, tunables, tuner
from triton_adder.functional import resolve_geometry
from triton_adder.geometry import LayerShape
from triton_adder.kernels import forward
from triton_adder.kernels.launch_config import KernelConfig
from tuning import WallClockBenchmarker, search

LENET_PROBLEMS = [  # (layer, x shape at batch 1, weight shape)
    ("conv2", (1, 6, 14, 14), (16, 6, 5, 5)),
    ("conv3", (1, 16, 5, 5), (120, 16, 5, 5)),
    ("conv4", (1, 120, 1, 1), (84, 120, 1, 1)),
]


def test_parse_ops():
    assert spaces.parse_ops("fwd,bwd") == ("forward", "grad_input", "grad_weight")
    assert spaces.parse_ops("bwd, fwd") == ("grad_input", "grad_weight", "forward")
    assert spaces.parse_ops("grad_weight") == ("grad_weight",)
    with pytest.raises(ValueError, match="--ops entries must be among"):
        spaces.parse_ops("fwd,backward")


def test_collect_problems_lenet5bn():
    found = problems.collect_problems(models.build("lenet5bn"), (1, 1, 28, 28))
    assert [(p.layers, p.x_shape, p.weight_shape) for p in found] == [
        ([name], x, w) for name, x, w in LENET_PROBLEMS
    ]


def test_collect_problems_merges_repeated_layers():
    model = models.build("resnet20")
    found = problems.collect_problems(model, (4, 3, 32, 32))
    layers = [name for p in found for name in p.layers]
    adder_layers = [name for name, m in model.named_modules() if type(m).__name__ == "Adder2d"]
    assert sorted(layers) == sorted(adder_layers)  # every adder layer, once
    assert len(found) < len(adder_layers)
    assert len({(p.x_shape, p.weight_shape, p.geom) for p in found}) == len(found)
    assert all(p.x_shape[0] == 4 for p in found)


def test_full_space_prunes_to_configs_the_launcher_accepts():
    shape = LayerShape.of((1, 16, 9, 7), (24, 16, 3, 3), resolve_geometry((9, 7), (3, 3), 1, 1))
    problem = problems.LayerProblem(["layer"], shape)
    tunable = tunables.make_tunable("forward", problem, torch.float32, torch.device("cpu"), False, quick=False)
    valid = [c for c in tunable.space if not tunable.violations(c)]
    assert 0 < len(valid) < len(tunable.space)
    for config in valid:
        forward.validate_config(KernelConfig(**config))
        assert config["block_n"] <= 32 and config["block_k"] <= 16  # Cout 24, Cin 16
    assert tunable.default == forward.default_config(
        torch.empty(problem.x_shape), torch.empty(problem.weight_shape), problem.geom
    ).as_dict()


def test_miscompile_check_tolerates_summation_order_only():
    match = tunables.outputs_match(torch.float32, reduction_length=150)
    reference_out = torch.randn(2, 8, 5, 5) * 100
    assert match(reference_out + 1e-5 * torch.randn_like(reference_out), reference_out)
    broken = reference_out.clone()
    broken[1, 3, 2, 2] += 1.0  # one wrong element, as a bad mask or index would give
    assert not match(broken, reference_out)
    assert not match(reference_out[:1], reference_out)
    assert not match(torch.full_like(reference_out, math.nan), reference_out)


@pytest.mark.parametrize("op", ["grad_input", "grad_weight"])
def test_backward_tunable_on_smallest_lenet_layer(op):
    _, x_shape, w_shape = LENET_PROBLEMS[2]
    geom = resolve_geometry(x_shape[2:], w_shape[2:])
    problem = problems.LayerProblem(["conv4"], LayerShape.of(x_shape, w_shape, geom))
    tunable = tunables.make_tunable(op, problem, torch.float32, torch.device("cpu"), False, quick=True)
    result = search(tunable, WallClockBenchmarker(warmup=0, repeats=1), budget_s=60)
    assert result.best is not None and result.functional and not result.failures
    # The reduced space: the default and one other BLOCK_M, unless that tile exceeds the problem.
    assert len(result.evaluations) == 1 + len(tunable.space) - 1 - result.pruned
    # The stored winner computes the right gradient (the tunable's operands, seed 0).
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(x_shape, generator=generator), torch.randn(w_shape, generator=generator)
    grad_out = torch.randn((1, w_shape[0], *geom.out_size), generator=generator)
    expected_x, expected_w = reference.adder2d_backward(grad_out.double(), x.double(), w.double(), geom, "paper")
    actual = tunable.run(result.best)
    if op == "grad_input":
        assert_matches_reference(actual, expected_x, torch.float32, reduction_length=w_shape[0])
    else:
        assert_matches_reference(actual, expected_w, torch.float32, reduction_length=geom.out_size[0])


def test_cli_end_to_end_lenet5bn_quick(cache_dir, tmp_path, capsys, monkeypatch):
    # The report step benchmarks the whole model (minutes in the interpreter): record its call instead.
    calls = {}

    def fake_write_report(target, rows, model_name, batch_size, dtype_name, device, quick, command_line):
        calls.update(target=target, rows=len(rows), model=model_name, batch=batch_size, quick=quick)
        return {"html": tmp_path / "report" / "report.html"}

    monkeypatch.setattr(tune, "write_report", fake_write_report)
    argv = ["--model", "lenet5bn", "--quick", "--ops", "fwd", "--batch-size", "1", "--cache-dir", str(cache_dir),
            "--full-size"]
    assert tune.main([*argv, "--report", str(tmp_path / "report")]) == 0
    out = capsys.readouterr()
    assert "NOT GPU timings" in out.out and "NOT GPU timings" in out.err
    table = [line for line in out.out.splitlines() if " forward " in line]
    assert [line.split()[0] for line in table] == ["conv2", "conv3", "conv4"]
    assert all("tuned" in line for line in table)
    assert calls == dict(target=tmp_path / "report", rows=3, model="lenet5bn", batch=1, quick=True)

    files = list(cache_dir.glob("*.json"))
    assert [f.name for f in files] == [configs.identity(torch.device("cpu")).filename]
    entries = json.loads(files[0].read_text())["entries"]
    assert len(entries) == 3
    assert all(e["functional"] and e["op"] == "forward" and e["kernel_hash"] == forward.KERNEL_SOURCE_HASH
               for e in entries)

    # A second run finds everything cached and runs no search (this is how it resumes).
    def no_search(*args, **kwargs):
        raise AssertionError("a cached problem was tuned again")

    monkeypatch.setattr(tuner, "search", no_search)
    assert tune.main([*argv, "--no-report"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if " forward " in line]
    assert len(table) == 3 and all("cached" in line for line in table)

    # The layer's run-time lookup finds the winners: exact bucket, then nearest bucket.
    _, x_shape, w_shape = LENET_PROBLEMS[0]
    geom = resolve_geometry(x_shape[2:], w_shape[2:])
    stored = next(e for e in entries if e["problem"]["in_channels"] == 6)
    config = configs.lookup("forward", torch.empty(x_shape), torch.empty(w_shape), geom)
    assert config == KernelConfig.from_dict(stored["config"])
    assert configs.lookup("forward", torch.empty(3, *x_shape[1:]), torch.empty(w_shape), geom) == config
    assert configs.lookup("grad_input", torch.empty(x_shape), torch.empty(w_shape), geom) is None


@pytest.mark.parametrize(
    ("x_shape", "weight_shape", "stride", "padding", "dilation", "groups"),
    [
        ((1, 64, 56, 56), (64, 64, 3, 3), 2, 1, 1, 1),  # ResNet-50's stride-2 3x3
        ((1, 12, 33, 30), (18, 4, 2, 2), 1, "same", 1, 3),  # implied asymmetric padding, groups
        ((1, 10, 20, 9), (6, 10, 3, 3), (2, 1), (0, 2), (5, 2), 1),  # dilated span 11 > the cap of 8
    ],
)
def test_interpreter_problem_keeps_the_layer_type(x_shape, weight_shape, stride, padding, dilation, groups):
    geom = resolve_geometry(x_shape[2:], weight_shape[2:], stride, padding, dilation, groups)
    real = problems.LayerProblem(["layer"], LayerShape.of(x_shape, weight_shape, geom))
    small = problems.interpreter_problem(real, divisor=2, spatial_cap=8)
    assert small.x_shape[0] == 1 and small.reduced_from is real
    assert small.x_shape[1] == groups * math.ceil(x_shape[1] // groups / 2)
    assert small.weight_shape == (groups * math.ceil(weight_shape[0] // groups / 2), small.x_shape[1] // groups,
                                  *weight_shape[2:])
    assert (small.geom.stride, small.geom.padding, small.geom.dilation, small.geom.groups) == (
        geom.stride, geom.padding, geom.dilation, geom.groups)
    assert all(1 <= size <= max(8, real_size) for size, real_size in zip(small.x_shape[2:], x_shape[2:]))
    # The shrunk geometry is the one conv2d's rule (the same padding rule as the real layer) gives.
    assert small.geom == resolve_geometry(small.x_shape[2:], weight_shape[2:], stride, padding, dilation, groups)
    # ... and the kernel computes it (forward against the float64 reference).
    tunable = tunables.make_tunable("forward", small, torch.float32, torch.device("cpu"), False, quick=True)
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(small.x_shape, generator=generator), torch.randn(small.weight_shape, generator=generator)
    expected = reference.adder2d_forward(x.double(), w.double(), None, small.geom)
    assert_matches_reference(tunable.run(tunable.default), expected, torch.float32,
                             small.weight_shape[1] * weight_shape[2] * weight_shape[3])
    # Its cache key is the shrunk problem plus where it came from: it can never answer a real lookup.
    key = small.cache_problem()
    assert key["height"] == small.x_shape[2] and key["reduced_from"]["height"] == x_shape[2]
    assert "batch" not in key["reduced_from"] and "reduced_from" not in real.cache_problem()


def test_channel_divisor_is_one_power_of_two_for_the_model():
    found = problems.collect_problems(models.build("resnet50"), (2, 3, 224, 224))
    assert problems.channel_divisor(found, channel_cap=64) == 32  # 2048 -> 64
    assert problems.channel_divisor(found, channel_cap=2048) == 1
    lenet = problems.collect_problems(models.build("lenet5bn"), (1, 1, 28, 28))
    assert problems.channel_divisor(lenet, channel_cap=64) == 2  # 120 -> 60
    with pytest.raises(ValueError, match="channel_cap must be >= 1"):
        problems.channel_divisor(lenet, channel_cap=0)


def one_layer(layer):
    return torch.nn.Sequential(layer(3, 4, 3, padding=1))


def test_cli_default_run_shrinks_problems_and_writes_the_report(cache_dir, tmp_path, capsys, monkeypatch):
    """No flags: functional run on shrunk problems, then the report under runs/<model>-cpu/ (not committed)."""
    measured = {}
    real_measure = bench.measure

    def tiny_measure(model, batch_size=None, **kwargs):
        # The model's CPU benchmark takes minutes: measure a one-layer pair the same way instead.
        measured.update(model=model, batch=batch_size, **kwargs)
        monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
        pair = ("lenet5bn", one_layer(Adder2d), one_layer(torch.nn.Conv2d), (2, 3, 6, 6))
        return real_measure(pair, **{**kwargs, "whole_model": False, "baselines": False})

    monkeypatch.setattr(bench, "measure", tiny_measure)
    monkeypatch.chdir(tmp_path)
    assert tune.main(["--model", "lenet5bn", "--ops", "fwd", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr()
    assert "NOT GPU timings" in out.out and "shrunk" in out.out and "NOT GPU timings" in out.err
    table = [line for line in out.out.splitlines() if " forward " in line]
    assert [line.split()[0] for line in table] == ["conv2", "conv3", "conv4"]
    assert all("tuned" in line for line in table)
    assert "1x3x8x8->8 5x5 s1 p0" in table[0] and "2x6x14x14->16 5x5 s1 p0" in table[0]  # run vs model shape
    # The report's benchmark: the CPU path at the model's real shapes, batch 2 (not the interpreter).
    assert measured["model"] == "lenet5bn" and measured["batch"] == 2
    assert measured["backend"] == "cpu" and measured["device"].type == "cpu"

    out_dir = tmp_path / "runs" / "lenet5bn-cpu"
    html = (out_dir / "report.html").read_text()
    assert "FUNCTIONAL RUN, NOT GPU TIMINGS" in html and "not GPU timings" in html
    assert html.count("2x6x14x14-&gt;16 5x5 s1 p0") >= 1 and "1x3x8x8-&gt;8 5x5 s1 p0" in html
    tuning, metadata = reports.read_raw(out_dir / "tuning.json")
    assert list(tuning["layer"]) == ["conv2", "conv3", "conv4"] and "shrunk" in metadata["tuning note"]
    assert (out_dir / "results.json").is_file() and (out_dir / "tuning.csv").is_file()
    # Re-rendering the saved run keeps the tuning section (tuning.json beside results.json).
    assert report.main([str(out_dir / "results.json"), "-o", str(tmp_path / "again.html")]) == 0
    assert "FUNCTIONAL RUN, NOT GPU TIMINGS" in (tmp_path / "again.html").read_text()

    entries = json.loads(next(cache_dir.glob("*.json")).read_text())["entries"]
    assert len(entries) == 3 and all(e["functional"] and "reduced_from" in e["problem"] for e in entries)
    # Shrunk entries never answer a lookup of the model's real layer.
    _, x_shape, w_shape = LENET_PROBLEMS[0]
    configs.clear()
    assert configs.lookup("forward", torch.empty(x_shape), torch.empty(w_shape),
                          resolve_geometry(x_shape[2:], w_shape[2:])) is None


def test_cli_report_flags(cache_dir, monkeypatch, capsys):
    def unreachable(*args, **kwargs):
        raise AssertionError("--no-report still benchmarked")

    monkeypatch.setattr(tune, "write_report", unreachable)
    argv = ["--model", "lenet5bn", "--ops", "fwd", "--cache-dir", str(cache_dir)]
    assert tune.main([*argv, "--no-report"]) == 0
    with pytest.raises(SystemExit):
        tune.main([*argv, "--no-report", "--report", "x.html"])
    assert "exclude each other" in capsys.readouterr().err


def test_lookup_is_memoised_and_never_fails(cache_dir, monkeypatch):
    x, w = torch.empty(2, 3, 8, 8), torch.empty(4, 3, 3, 3)
    geom = resolve_geometry((8, 8), (3, 3))
    assert configs.lookup("forward", x, w, geom) is None  # nothing cached

    def unreachable(*args, **kwargs):
        raise AssertionError("the memo was bypassed")

    monkeypatch.setattr(configs, "cache_for", unreachable)
    assert configs.lookup("forward", x, w, geom) is None  # answered from the memo
    configs.clear()
    with pytest.raises(AssertionError, match="memo was bypassed"):
        configs.lookup("forward", x, w, geom)
    with pytest.raises(ValueError, match="op must be one of"):
        configs.lookup("backward", x, w, geom)
    cache_dir.mkdir(parents=True)
    monkeypatch.undo()
    monkeypatch.setenv(configs.CACHE_DIR_ENV, str(cache_dir))
    (cache_dir / configs.identity(torch.device("cpu")).filename).write_text("{ not json")
    configs.clear()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert configs.lookup("forward", x, w, geom) is None


def test_cli_without_interpreter_skips_kernel_tuning_and_never_sets_it(cache_dir, tmp_path, capsys, monkeypatch):
    """No GPU and TRITON_INTERPRET unset: tune does not turn the interpreter on itself (that is the
    user's choice); it skips kernel tuning, tunes the int8 CPU kernel instead (tests/test_int8_tuning.py)
    and still writes the CPU-path report."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    written = {}

    def fake_write_report(target, rows, *args):
        written["rows"] = rows
        return {"html": tmp_path / "report.html"}

    def unreachable(*args, **kwargs):
        raise AssertionError("tuned without the interpreter")

    monkeypatch.setattr(tune, "write_report", fake_write_report)
    monkeypatch.setattr(tune, "tune_model", unreachable)
    assert tune.main(["--model", "lenet5bn", "--budget-s", "0.2", "--cache-dir", str(cache_dir)]) == 0
    assert "no kernel tuning" in capsys.readouterr().err
    assert [row.op for row in written["rows"]] == ["int8_forward"] * 3 and os.environ["TRITON_INTERPRET"] == "0"


def test_cli_refuses_the_interpreter_on_a_gpu_machine(cache_dir, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        tune.main(["--model", "lenet5bn", "--cache-dir", str(cache_dir)])
    assert "TRITON_INTERPRET is set on a machine with a GPU" in capsys.readouterr().err


def test_cache_dir_is_the_override_else_the_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert configs.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(configs.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert configs.cache_dir() == tmp_path / "xdg" / "triton-adder"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert configs.cache_dir() == tmp_path / "home" / ".cache" / "triton-adder"


def test_problem_key_is_the_layer_shape():
    geom = resolve_geometry((9, 7), (3, 3), 2, 1, 1, 2)
    shape = LayerShape.of((3, 16, 9, 7), (24, 8, 3, 3), geom)
    assert configs.problem_key(shape) == {
        "batch": 3, "in_channels": 16, "height": 9, "width": 7, "out_channels": 24, "kernel": [3, 3],
        "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 2, "out_size": list(geom.out_size),
    }
    assert problems.LayerProblem(["layer"], shape).cache_problem() == configs.problem_key(shape)


def test_problems_go_by_their_share_of_the_model_work():
    """N*Cout*Ho*Wo*Cin/g*kh*kw x the layers sharing the problem, largest first; ties keep first-use order."""
    found = problems.collect_problems(models.build("resnet20", adder=True), (4, 3, 32, 32))
    ordered = problems.by_work(found)
    assert sorted(map(id, ordered)) == sorted(map(id, found))
    work = [p.shape.elements * len(p.layers) for p in ordered]
    assert work == sorted(work, reverse=True) and [p.work for p in ordered] == work
    # ResNet-20: stage 1's six 16-channel 3x3 layers, then stages 2 and 3 (five 3x3 layers each, equal work:
    # first use first), the two stride-2 3x3 layers (equal), the two 1x1 shortcuts (equal)
    assert [found.index(p) for p in ordered] == [0, 3, 6, 2, 5, 1, 4]
    shrunk = problems.interpreter_problem(found[1], 4)
    assert shrunk.work == found[1].work  # a shrunk problem stands for its real one


def test_tuner_takes_the_problems_by_work_largest_first(cache_dir, monkeypatch):
    from tuning import Evaluation, TuningResult

    seen = []

    def fake_make_tunable(op, problem, *args):
        seen.append((problem.model_shape_text, op))
        return None

    def fake_search(tunable, benchmarker, **kwargs):
        return TuningResult("forward", {}, {}, None, None, None, True, [Evaluation({}, "default", "failed", error="x")])

    monkeypatch.setattr(tuner, "make_tunable", fake_make_tunable)
    monkeypatch.setattr(tuner, "search", fake_search)
    cache = configs.cache_for(torch.device("cpu"))
    rows = tuner.tune_model("resnet20", 4, torch.float32, ("forward", "grad_input"), 1, cache, torch.device("cpu"),
                            quick=True, shrink=True)  # fmt: skip
    found = problems.by_work(problems.collect_problems(models.build("resnet20", adder=True), (4, 3, 32, 32)))
    expected = [(p.shape_text, op) for p in found for op in ("forward", "grad_input")]
    assert seen == expected and [row.model_shape for row in rows] == [shape for shape, _ in expected]
    assert seen[0][0] == "4x16x32x32->16 3x3 s1 p1" and seen[-1][0] == "4x32x16x16->64 1x1 s2 p0"


def test_cli_reports_a_screen_that_only_raises(cache_dir, monkeypatch, capsys):
    """Every screen compile raises (a broken toolchain): each problem fails with an ERROR line naming it and
    the first error, the summary repeats them, the exit status is 1, and nothing is cached."""
    from triton_adder.measure import sass

    try:
        sass.cuobjdump_path()
    except RuntimeError as error:
        pytest.skip(str(error))

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: broken toolchain")

    monkeypatch.setattr(sass, "compile_stats_isolated", broken)
    argv = ["--model", "lenet5bn", "--ops", "forward", "--no-report", "--screen-arch", "90", "--cache-dir",
            str(cache_dir)]  # fmt: skip
    assert tune.main(argv) == 1
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("ERROR")]
    assert any("forward of conv2" in line and "ptxas fatal: broken toolchain" in line for line in errors), out.err
    assert any("compile-time screen raised for every config of 3 problem(s)" in line for line in errors)
    table = [line for line in out.out.splitlines() if " forward " in line]
    assert len(table) == 3 and all("failed (screen failed: screen raised RuntimeError" in line for line in table)
    assert not list(cache_dir.glob("*.json"))


def test_weight_gradient_choices_are_shown_with_their_method_and_split():
    kernel = {"block_m": 64, "block_n": 64, "block_k": 2, "num_warps": 2, "num_stages": 2}
    assert tune.format_config(kernel) == "64x64x2 w2 s2"
    assert tune.format_config({**kernel, "method": "triton", "split_k": 4}) == "triton 64x64x2 w2 s2 split 4"
    assert tune.format_config({**kernel, "method": "conv_identity", "split_k": 1}) == "conv_identity"
    assert tune.format_config(None) == "-"
