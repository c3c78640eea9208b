"""The int8 CPU kernel's blocking as a tunable: the search space, the runner, the tuning loop.

The SAD kernel (`quant/sad.c`) takes its blocking at run time (`quant.native.Blocking`: register
block mr x nr, cache block mc x nc, K chunk kc, thread count), so the generic tuner
(`tuning`) searches it as it searches a Triton kernel's launch config, but times it for
real, by the wall clock, on the machine the user runs: ``python -m triton_adder.tune --model
resnet50`` tunes it by default where there is no GPU (``--ops int8`` anywhere).

- Cache keys and the layer's lookup: `quant.tuned` (winners are stored there, per CPU model).
- What is timed: the layer's whole forward (quantize the input, im2col, SAD, rescale), the work a
  user's call does, on a random float32 input. The blocking changes no sum, so a winner's output must
  equal the default's exactly.
- Noise: the search ranks configs by the median of a few wall-clock runs on a machine other work may
  share; the winner is kept only if it beats the default by `KEEP_MARGIN` when the two are timed
  interleaved (`confirm`), and those interleaved medians are the times stored and reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from triton_adder import models
from triton_adder.autotune.problems import LayerProblem, by_work, collect_problems
from triton_adder.autotune.tuner import Progress, Row
from triton_adder.geometry import LayerShape
from triton_adder.models.census import MODEL_INPUT_SIZE
from triton_adder.quant import native
from triton_adder.quant.tuned import (
    KEY_DTYPE,
    KEY_LAYOUT,
    OP,
    blocking_of,
    cache_for,
    clear,
    config_of,
    kernel_hash,
    problem_of,
)
from tuning import (
    Constraint,
    SearchSpace,
    Tunable,
    TuningCache,
    WallClockBenchmarker,
    interleaved,
    search,
)

DEFAULT_BUDGET_S = 10.0
"""Search seconds per layer problem: a config runs in milliseconds, so 10 s times tens of configs
(ResNet-50's 22 problems in about 4 minutes on a 2-core machine)."""
CONFIRM_REPEATS = 15
"""Interleaved calls of the winner and of the default (`confirm`)."""
KEEP_MARGIN = 0.97
"""The winner must take at most this share of the default's time in the interleaved check, else the
default is kept: a search over many configs on a noisy machine always finds one that looked faster."""

_SEARCH_SPACE = {
    "mr": native.MICRO_MR,
    "nr": native.MICRO_NR,
    "mc": (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    "nc": (8, 16, 32, 64, 128, 256, 512),
    "kc": (64, 128, 256, 512, 1024, 2048, 4096),
}
"""Candidate values per knob (besides "threads", `thread_counts`); every default's values are among them."""
VECTOR_REGISTERS = {"avx512bw": 32, "avx2": 16, "portable": 16}
VECTORS_PER_GROUP = {"avx512bw": 1, "avx2": 2, "portable": 2}
"""Vector registers per 8-channel weight group: one zmm, two ymm (the portable loop: SSE2's 16 xmm, as avx2)."""


def thread_counts(threads: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `threads`, and `threads` itself."""
    return tuple(sorted({1 << i for i in range(threads.bit_length()) if 1 << i <= threads} | {threads}))


def default_config(isa: str, threads: int) -> dict:
    return {**config_of(native.DEFAULT_BLOCKING[isa]), "threads": threads}


def within(knob: str, values: Sequence[int], extent: int) -> Constraint:
    """Prune values of `knob` beyond the smallest one that covers `extent`: larger ones run the same blocks."""
    limit = min((v for v in values if v >= extent), default=max(values))
    return Constraint(f"{knob} <= {limit} (extent {extent})", lambda config: config[knob] <= limit)


def constraints(isa: str, shape: LayerShape) -> list[Constraint]:
    registers, per_group = VECTOR_REGISTERS[isa], VECTORS_PER_GROUP[isa]
    tg = shape.cout // shape.geom.groups
    k = shape.cin // shape.geom.groups * shape.kh * shape.kw
    m = shape.batch * shape.geom.out_size[0] * shape.geom.out_size[1]

    def registers_needed(config: dict) -> int:  # accumulators + the weight vectors + one broadcast input
        vectors = config["nr"] // native.CHANNEL_GROUP * per_group
        return config["mr"] * vectors + vectors + 1

    return [
        Constraint("mc % mr == 0", lambda config: config["mc"] % config["mr"] == 0),
        Constraint("nr <= nc", lambda config: config["nr"] <= config["nc"]),
        Constraint(f"registers <= {registers}", lambda config: registers_needed(config) <= registers),
        within("mc", _SEARCH_SPACE["mc"], m),
        within("nc", _SEARCH_SPACE["nc"], -(-tg // native.CHANNEL_GROUP) * native.CHANNEL_GROUP),
        within("kc", _SEARCH_SPACE["kc"], -(-k // native.K_MULTIPLE) * native.K_MULTIPLE),
    ]


def make_tunable(shape: LayerShape, library: native.Library, threads: int, seed: int = 0) -> Tunable:
    """The layer call `shape` as a tunable: a random Adder2d quantized for a random input, timed whole."""
    from triton_adder.nn import Adder2d  # noqa: PLC0415  (nn imports the backends; only when tuning)
    from triton_adder.quant.module import QuantizedAdder2d  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    geom = shape.geom
    layer = Adder2d(shape.cin, shape.cout, (shape.kh, shape.kw), geom.stride, 0, geom.dilation, geom.groups)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    x = torch.randn(shape.x_shape, generator=generator)
    quantized = QuantizedAdder2d.from_float(layer, float(x.abs().max()))

    def run(config: dict) -> torch.Tensor:
        quantized.blocking = blocking_of(config)
        with torch.no_grad():  # the problem's own geometry (it may pad asymmetrically)
            return quantized._native(library, x, geom, integer=False)

    return Tunable(
        name=OP,
        space=SearchSpace.from_dict({**_SEARCH_SPACE, "threads": thread_counts(threads)}),
        problem=problem_of(shape, threads),
        run=run,
        default=default_config(library.isa, threads),
        constraints=constraints(library.isa, shape),
        outputs_match=torch.equal,
    )


def confirm(tunable: Tunable, best: dict, repeats: int = CONFIRM_REPEATS) -> tuple[dict, float, float]:
    """(config to keep, its time, the default's time): `best` and the default timed interleaved; the
    default is kept unless `best` takes at most `KEEP_MARGIN` of its time."""
    if best == tunable.default:
        (measurement,) = interleaved({"default": lambda: tunable.run(best)}, repeats).values()
        return best, measurement.time_s, measurement.time_s
    times = interleaved({"best": lambda: tunable.run(best), "default": lambda: tunable.run(tunable.default)}, repeats)
    best_s, default_s = times["best"].time_s, times["default"].time_s
    return (best, best_s, default_s) if best_s <= KEEP_MARGIN * default_s else (tunable.default, default_s, default_s)


def tune_model(
    model_name: str,
    batch_size: int,
    budget_s: float,
    force: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Tune the int8 blocking of every unique adder-layer call of `model_name` at `batch_size` on this CPU,
    largest share of the model's work first; store each winner as it is found. Returns the table rows."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    library = native.load()
    if library is None:
        raise RuntimeError("the int8 SAD kernel could not be built (see the warning above): nothing to tune")
    size = MODEL_INPUT_SIZE[model_name]
    problems = by_work(
        collect_problems(models.build(model_name, adder=True), (batch_size, models.MODELS[model_name][2], size, size))
    )
    cache = cache_for(library)
    cache.check_writable()
    threads = torch.get_num_threads()
    benchmarker = WallClockBenchmarker(warmup=1, repeats=3)
    rows = []
    for done, problem in enumerate(problems):
        rows.append(_tune_problem(problem, library, cache, threads, benchmarker, budget_s, force, log))
        if progress is not None:
            progress(done + 1, len(problems), rows[-1].layer)
    clear()
    return rows


def _tune_problem(
    problem: LayerProblem,
    library: native.Library,
    cache: TuningCache,
    threads: int,
    benchmarker,
    budget_s: float,
    force: bool,
    log: Callable[[str], None],
) -> Row:
    layer = problem.layers[0] + (f" (+{len(problem.layers) - 1})" if len(problem.layers) > 1 else "")
    row = Row(layer, OP, problem.shape_text, "tuned")
    key = problem_of(problem.shape, threads)
    hit = cache.lookup(OP, kernel_hash(library), KEY_DTYPE, KEY_LAYOUT, key, allow_nearest=False)
    if hit is not None and not force:
        row.status = "cached"
        row.config, row.time_s = hit.config, hit.entry.get("time_s")
        row.default_time_s = hit.entry.get("default_time_s")
        return row
    tunable = make_tunable(problem.shape, library, threads)
    result = search(tunable, benchmarker, budget_s=budget_s)
    row.runs, row.failures = result.runs, len(result.failures)
    if result.best is None:
        row.status = "failed"
        row.notes.append(result.evaluations[0].error or "default config failed")
        return row
    config, time_s, default_s = confirm(tunable, result.best)
    if config != result.best:
        row.notes.append("default kept: the search's winner was not faster interleaved")
    row.config, row.time_s, row.default_time_s = config, time_s, default_s
    cache.store(
        [
            cache.make_entry(
                OP, kernel_hash(library), KEY_DTYPE, KEY_LAYOUT, key, config, time_s, default_s, functional=False
            )
        ]
    )
    log(
        f"stored {OP} of {layer} ({problem.shape_text}): {time_s * 1e3:.4g} ms, default {default_s * 1e3:.4g} ms "
        f"(interleaved), {default_s / time_s:.2f}x, {result.runs} runs"
    )
    return row
