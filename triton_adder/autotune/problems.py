"""The tuner's problems: a model's unique adder-layer calls, and their shrunk copies for the interpreter.

A `LayerProblem` is a `geometry.LayerShape` (the one description of a layer call) plus the names
of the model's layers that make that call and, for a shrunk problem, the real one it stands for.
`by_work` orders them by their share of the model's work, the order the tuner takes them in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from triton_adder.autotune.lookup import problem_key
from triton_adder.geometry import Conv2dGeometry, LayerShape
from triton_adder.models.census import census

# The interpreter runs one Triton program after another in Python at ~0.5-2.5 ms per rank-1 tile
# update, so a launch costs about (programs x reduction steps); measured on a 2-core machine at the
# real channel counts and 8x8 inputs, ResNet-50's forward launches alone took 92 s (one each) and a
# 64-channel 3x3 weight gradient at 8x8 took 23 s. Functional runs therefore shrink each problem;
# with these caps ResNet-50's 22 problems x 3 ops tune in about a minute on that machine.
INTERPRETER_SPATIAL_CAP = 8  # input height/width at most this (larger only where the kernel needs it)
INTERPRETER_CHANNEL_CAP = 64  # widest per-group channel count after dividing all layers by one power of two


@dataclass
class LayerProblem:
    """One unique adder-layer call of a model, and the model layers that make it.

    Tuned without a bias: the zoo's adder layers have none, and a bias is one epilogue add.
    reduced_from: the model's real problem, for a functional (shrunk) run.
    """

    layers: list[str]
    shape: LayerShape
    reduced_from: LayerProblem | None = None
    has_bias: bool = field(default=False, repr=False)

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return self.shape.x_shape

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return self.shape.weight_shape

    @property
    def geom(self) -> Conv2dGeometry:
        return self.shape.geom

    @property
    def shape_text(self) -> str:
        """The problem run, e.g. "2x64x56x56->64 3x3 s1 p1" (d/g only when not 1)."""
        s = self.shape
        (sh, _), (ph, _) = s.geom.stride, s.geom.padding
        text = f"{s.batch}x{s.cin}x{s.h}x{s.w}->{s.cout} {s.kh}x{s.kw} s{sh} p{ph}"
        if s.geom.dilation != (1, 1):
            text += f" d{s.geom.dilation[0]}"
        return text + (f" g{s.geom.groups}" if s.geom.groups != 1 else "")

    @property
    def work(self) -> int:
        """The problem's share of the model's work: reduced elements of one call (N * Cout * Ho * Wo *
        Cin/groups * kh * kw, `LayerShape.elements`) x the number of layers that make it; of the real
        problem for a shrunk one."""
        real = self.reduced_from or self
        return real.shape.elements * len(real.layers)

    @property
    def model_shape_text(self) -> str:
        """The shape of the model's own layer (differs from shape_text for a reduced problem)."""
        return (self.reduced_from or self).shape_text

    def cache_problem(self) -> dict:
        """The cache's problem key: the problem run, plus "reduced_from" (the real problem) when shrunk."""
        key = problem_key(self.shape)
        if self.reduced_from is not None:
            # Without its batch: the shrunk problem (batch 1) is the same for any model batch size.
            real = problem_key(self.reduced_from.shape)
            key["reduced_from"] = {k: v for k, v in real.items() if k != "batch"}
        return key


def collect_problems(model: torch.nn.Module, input_shape: Sequence[int]) -> list[LayerProblem]:
    """Unique adder-layer problems of `model` for input `input_shape` (N, C, H, W), in first-use order.

    Uses `models.census` (one forward on the meta device: shapes only, no memory); layers with
    the same input shape, weight shape and geometry share one problem.
    """
    found: dict[LayerShape, LayerProblem] = {}
    for call in census(model, tuple(input_shape)):
        if call.kind != "adder":
            continue
        if call.shape not in found:
            found[call.shape] = LayerProblem([], call.shape)
        found[call.shape].layers.append(call.module)
    return list(found.values())


def by_work(problems: Sequence[LayerProblem]) -> list[LayerProblem]:
    """`problems` by their share of the model's work (`LayerProblem.work`), largest first; equal work keeps
    the given (first-use) order. The tuner's order, so a run cut short has tuned what costs the most."""
    return sorted(problems, key=lambda problem: -problem.work)


def channel_divisor(problems: Sequence[LayerProblem], channel_cap: int | None = None) -> int:
    """The smallest power of two that brings every per-group channel count of `problems` to <= channel_cap.

    One divisor for the whole model keeps the layers' relative widths (and so their distinct
    problems) after shrinking.
    """
    channel_cap = INTERPRETER_CHANNEL_CAP if channel_cap is None else channel_cap
    if channel_cap < 1:
        raise ValueError(f"channel_cap must be >= 1, got {channel_cap}")
    widest = max((max(p.shape.cin, p.shape.cout) // p.geom.groups for p in problems), default=1)
    divisor = 1
    while math.ceil(widest / divisor) > channel_cap:
        divisor *= 2
    return divisor


def _reduced_axis(size: int, kernel: int, stride: int, before: int, dilation: int, out: int,
                  cap: int) -> tuple[int, int]:
    """(input size, output size) of one axis shrunk to about `cap`, with the same padding rule.

    The bottom/right padding is implied by `out` (Conv2dGeometry): keep it when it is the
    symmetric padding conv2d would use, else keep the implied amount (e.g. padding="same").
    """
    span = dilation * (kernel - 1) + 1
    if (size + 2 * before - span) // stride + 1 == out:
        after = before
    else:
        after = max(0, (out - 1) * stride + span - size - before)
    reduced = min(size, max(cap, span - before - after))  # at least one output position
    return reduced, (reduced + before + after - span) // stride + 1


def interpreter_problem(problem: LayerProblem, divisor: int, spatial_cap: int | None = None) -> LayerProblem:
    """The functional-run version of `problem`: batch 1, H and W capped, channels per group / divisor (ceil).

    Kernel size, stride, padding, dilation and groups are kept, so the same kernel code paths
    (taps, stride phases, padding masks, channel tails) run; `reduced_from` records the real problem.
    """
    spatial_cap = INTERPRETER_SPATIAL_CAP if spatial_cap is None else spatial_cap
    s, geom = problem.shape, problem.geom
    groups = geom.groups
    (h, ho), (w, wo) = (
        _reduced_axis(size, k, st, p, d, o, spatial_cap)
        for size, k, st, p, d, o in zip((s.h, s.w), (s.kh, s.kw), geom.stride, geom.padding, geom.dilation,
                                        geom.out_size)
    )
    cg = math.ceil(s.cin // groups / divisor)
    tg = math.ceil(s.cout // groups / divisor)
    reduced_geom = Conv2dGeometry(geom.stride, geom.padding, geom.dilation, groups, (ho, wo))
    shape = LayerShape(1, groups * cg, h, w, groups * tg, s.kh, s.kw, reduced_geom)
    return LayerProblem(list(problem.layers), shape, reduced_from=problem, has_bias=problem.has_bias)
