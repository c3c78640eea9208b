"""One (op, layer problem) described to the generic tuner: operands, runner, default, space, constraints.

The runners launch the kernels with the config under test (`kernels.forward.forward`,
`kernels.grad_input.grad_input`, `kernels.grad_weight.grad_weight`); the winner's output is checked
against the default config's (`outputs_match`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from triton_adder.autotune.problems import LayerProblem
from triton_adder.autotune.spaces import (
    ACCUMULATOR_CONSTRAINT,
    FULL_SPACES,
    OPS,
    constraints,
    launcher_accepts,
    reduced_space,
)
from triton_adder.kernels import forward, grad_input, grad_weight
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.tolerance import tolerances
from triton_adder.tuning import SearchSpace, Tunable

# Miscompile check of a winner against the default config's output (not a precision test: two
# Triton configs differ only in summation order, a miscompile is off by O(1)), so the library's
# error table is widened 10x.
MISCOMPILE_TOLERANCE_WIDENING = 10.0


def outputs_match(dtype: torch.dtype, reduction_length: int) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """The winner-vs-default output check for one op (see MISCOMPILE_TOLERANCE_WIDENING)."""
    tol = tolerances(dtype, reduction_length, widen=MISCOMPILE_TOLERANCE_WIDENING)

    def match(candidate: torch.Tensor, reference: torch.Tensor) -> bool:
        if candidate.shape != reference.shape:
            return False
        return bool(torch.allclose(candidate.double(), reference.double(), **tol))

    return match


def make_tunable(
    op: str,
    problem: LayerProblem,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool,
    quick: bool,
    grad_mode: str = "paper",
) -> Tunable:
    """Describe one (op, layer problem) to the tuner: operands, runner, default, space, constraints.

    op: "forward", "grad_input" or "grad_weight"; quick: the reduced space (`spaces.reduced_space`)
    instead of `spaces.FULL_SPACES[op]`. Operands are seeded (seed 0), so runs are reproducible.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    shape, geom = problem.shape, problem.geom
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(size):
        return torch.randn(size, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    x = randn(shape.x_shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = randn(shape.weight_shape)
    bias = randn(shape.weight_shape[:1]) if problem.has_bias else None
    n, h, w = shape.batch, shape.h, shape.w
    cg, tg = shape.cin // geom.groups, shape.cout // geom.groups
    ho, wo = geom.out_size
    grad_out = randn((n, shape.cout, ho, wo))
    element_bytes = torch.empty((), dtype=dtype).element_size()

    if op == "forward":
        default = forward.default_config(x, weight, geom)
        extents = {"block_m": n * ho * wo, "block_n": tg, "block_k": cg}
        reduction = cg * shape.kh * shape.kw

        def run(config):
            return forward.forward(x, weight, bias, geom, KernelConfig(**config))

        extra = [launcher_accepts(forward.validate_config, "forward.validate_config")]
    elif op == "grad_input":
        default = grad_input.default_grad_input_config(x.shape, weight.shape, geom, device.type)
        positions = n * math.ceil(h / geom.stride[0]) * math.ceil(w / geom.stride[1])
        extents = {"block_m": positions, "block_n": cg, "block_k": tg}
        reduction = tg * shape.kh * shape.kw

        def run(config):
            return grad_input.grad_input(grad_out, x, weight, geom, grad_mode, KernelConfig(**config))

        extra = [ACCUMULATOR_CONSTRAINT]
    else:
        default = grad_weight.default_grad_weight_config(x.shape, weight.shape, geom, device.type)
        extents = {"block_m": tg, "block_n": cg, "block_k": n * ho * wo}
        reduction = n * ho * wo

        def run(config):
            return grad_weight.grad_weight(grad_out, x, weight, geom, grad_mode, KernelConfig(**config))

        extra = [ACCUMULATOR_CONSTRAINT]

    default = default.as_dict()
    values = reduced_space(default, 16 if problem.reduced_from is not None else 32) if quick else FULL_SPACES[op]
    return Tunable(
        name=op,
        space=SearchSpace.from_dict(values),
        problem=problem.cache_problem(),
        run=run,
        default=default,
        constraints=constraints(extents, values, element_bytes, extra),
        outputs_match=outputs_match(dtype, reduction),
    )
