"""What the tuner searches for each adder kernel: the search spaces (data) and the constraints.

forward: BLOCK_M output positions x BLOCK_N output channels, BLOCK_K input channels per step;
grad_input: BLOCK_M input positions x BLOCK_N input channels, BLOCK_K output channels per step.
Both are the same rank-1 implicit GEMM loop, so they search the same space. grad_weight:
BLOCK_M output x BLOCK_N input channels, BLOCK_K reduction steps unrolled, and two more knobs:
split_k (splits of the N*Ho*Wo reduction) and method (the kernel or the convolution identity,
`contract.GRAD_WEIGHT_METHODS`), so the layer takes whichever the search found fastest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from triton_adder.autotune.lookup import OPS
from triton_adder.contract import GRAD_WEIGHT_METHODS
from triton_adder.kernels.launch_config import MAX_ACCUMULATORS_PER_THREAD, KernelConfig, kernel_config_of
from tuning import Constraint, estimate_at_most, tile_within

OP_GROUPS = {"fwd": ("forward",), "bwd": ("grad_input", "grad_weight")}

# Hopper: 227 KiB of shared memory per block (DESIGN.md section 2).
SHARED_MEMORY_BYTES = 227 * 1024

_IMPLICIT_GEMM_SPACE = {
    "block_m": (32, 64, 128, 256),
    "block_n": (16, 32, 64, 128),
    "block_k": (4, 8, 16, 32),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3),
}
FULL_SPACES = {
    "forward": _IMPLICIT_GEMM_SPACE,
    "grad_input": _IMPLICIT_GEMM_SPACE,
    "grad_weight": {
        "block_m": (16, 32, 64, 128),
        "block_n": (16, 32, 64, 128),
        "block_k": (4, 8, 16, 32),
        "num_warps": (2, 4, 8),
        "num_stages": (1, 2, 3),
    },
}


# Splits of the weight gradient's reduction the search tries (besides the heuristic default's,
# `kernels.grad_weight.default_split_k`): from one (no workspace) to enough programs for any SM count.
SPLIT_K_VALUES = (1, 2, 4, 8, 16, 32, 64)


def grad_weight_methods(grad_mode: str) -> tuple[str, ...]:
    """The weight-gradient methods that compute `grad_mode` (the identity gives the paper gradient only)."""
    return tuple(m for m in GRAD_WEIGHT_METHODS if grad_mode == "paper" or m != "conv_identity")


def identity_takes_the_defaults(default: Mapping) -> Constraint:
    """The convolution identity launches no kernel: its one config carries the default's kernel knobs and split."""
    knobs = [name for name in default if name != "method"]

    def accepts(config: Mapping) -> bool:
        return config["method"] != "conv_identity" or all(config[k] == default[k] for k in knobs)

    return Constraint("method conv_identity only with the default's kernel knobs", accepts)


def splits_within(reduction_length: int) -> Constraint:
    """Every split of the weight gradient's reduction gets at least one BLOCK_K step (more are the same launch)."""
    return Constraint(
        f"split_k * block_k <= {reduction_length} (the reduction length)",
        lambda config: config["split_k"] == 1 or config["split_k"] * config["block_k"] <= reduction_length,
    )


def parse_ops(text: str) -> tuple[str, ...]:
    """ "fwd,bwd" -> ("forward", "grad_input", "grad_weight"); op names are accepted too."""
    ops: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        names = OP_GROUPS.get(part, (part,) if part in OPS else None)
        if names is None:
            raise ValueError(f"--ops entries must be among {sorted(OP_GROUPS) + list(OPS)}, got {part!r}")
        ops.extend(n for n in names if n not in ops)
    if not ops:
        raise ValueError("--ops must name at least one op (fwd, bwd, forward, grad_input, grad_weight)")
    return tuple(ops)


def reduced_space(default: dict, halve_from: int = 32) -> dict:
    """The quick/interpreter space: the default config plus one other BLOCK_M (1-2 runs per op).

    The other BLOCK_M is half the default's when the default is >= halve_from, else twice it.
    Functional runs pass 16: their shrunk problems are often a single 16-row tile, where twice
    the tile would be pruned (larger than the problem) and the winner-vs-default check not run.
    """
    block_m = default["block_m"]
    other = block_m // 2 if block_m >= halve_from else block_m * 2
    return {**{k: (v,) for k, v in default.items()}, "block_m": (block_m, other)}


def accumulators_fit(config: Mapping) -> bool:
    """The rank-1 loops' float32 accumulator tile fits the per-thread budget of the kernels."""
    return config["block_m"] * config["block_n"] / (32 * config["num_warps"]) <= MAX_ACCUMULATORS_PER_THREAD


ACCUMULATOR_CONSTRAINT = Constraint(f"block_m*block_n/(32*num_warps) <= {MAX_ACCUMULATORS_PER_THREAD}",
                                    accumulators_fit)


def _valid_kernel_config(config: Mapping) -> bool:
    try:
        kernel_config_of(config).validate()
        return True
    except ValueError:
        return False


def constraints(extents: Mapping[str, int], values: Mapping[str, Sequence[int]], element_bytes: int,
                extra: Sequence[Constraint] = ()) -> list[Constraint]:
    """The constraints of one op's search.

    extents: the problem's size along block_m/block_n/block_k (a tile never exceeds it, but is
    never pruned below the smallest candidate: a 2-row problem still needs some tile); values:
    the space searched; element_bytes: the operands' element size; extra: the op's own checks.
    """
    knobs = ("block_m", "block_n", "block_k")
    found = [tile_within(knob, max(int(extents[knob]), min(values[knob]))) for knob in knobs]
    # Upper bound of what software pipelining may stage in shared memory: num_stages copies of the
    # BLOCK_K slices of both operands.
    found.append(
        estimate_at_most(
            "shared memory bytes",
            lambda c: c["num_stages"] * (c["block_m"] + c["block_n"]) * c["block_k"] * max(4, element_bytes),
            SHARED_MEMORY_BYTES,
        )
    )
    found.extend(extra)
    found.append(Constraint("KernelConfig.validate", _valid_kernel_config))
    return found


def launcher_accepts(validate: Callable[[KernelConfig], object], name: str) -> Constraint:
    """A constraint from a launcher's own config check (`validate` raises ValueError to refuse)."""

    def accepts(config: Mapping) -> bool:
        try:
            validate(kernel_config_of(config))
            return True
        except ValueError:
            return False

    return Constraint(name, accepts)
