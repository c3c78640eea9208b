"""One (op, layer problem) described to the generic tuner: operands, runner, default, space, constraints.

The runners launch the kernels with the config under test (`kernels.forward.forward`,
`kernels.grad_input.grad_input`); the weight gradient's runner is the layer's own entry point
(`backends.triton.grad_weight`) with the method, kernel config and split under test, so the kernel
competes with the convolution identity. The winner's output is checked against the default
config's (`outputs_match`).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from triton_adder.autotune.lookup import GradWeightChoice, op_problem
from triton_adder.autotune.problems import LayerProblem
from triton_adder.autotune.spaces import (
    ACCUMULATOR_CONSTRAINT,
    FULL_SPACES,
    OPS,
    SHARED_MEMORY_BYTES,
    SPLIT_K_VALUES,
    constraints,
    grad_weight_methods,
    identity_takes_the_defaults,
    launcher_accepts,
    reduced_space,
    splits_within,
)
from triton_adder.backends import triton as triton_backend
from triton_adder.contract import layout_name
from triton_adder.kernels import forward, grad_input, grad_weight
from triton_adder.kernels.launch_config import KernelConfig, kernel_config_of
from triton_adder.measure import sass
from triton_adder.tolerance import tolerances
from tuning import ScreenIdentity, ScreenOutOfTime, ScreenResult, SearchSpace, Tunable, screen_time_left

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


# Shared memory one block may use (DESIGN.md section 2): A100 163 KiB, H100/H200 227 KiB.
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: SHARED_MEMORY_BYTES}
# A config whose loop issues more than this multiple of the best screened config's instructions per
# element is not timed: the loop is issue-bound (DESIGN.md section 2), so 1.5x the instructions is
# at best ~1.5x slower, a gap no better memory behaviour of the same tiling family makes up.
INSTRUCTION_BUDGET_FACTOR = 1.5
DEFAULT_SCREEN_ARCH = 90
SCREEN_COMPILE_TIMEOUT_S = 120.0
"""A screened config whose compile runs longer is dropped. Most compiles of the sampled ResNet-50 problem
finish within it on a 2-core box (`results/benchmarks/prune_space.txt` counts those that did not); large
unrolled tiles (256x32x32 on 2 warps, 128 accumulators per thread) can compile for many minutes."""


SCREEN_TOP_N = 8
"""How many of the best-ranked screened configs the coarse pass times (`search`'s screen_top_n; refinement
still reaches the others as neighbours). Instructions per element ranks an issue-bound loop only to first
order (memory behaviour, occupancy and wave quantisation differ between configs within the
INSTRUCTION_BUDGET_FACTOR band), so the pass times a handful rather than the single best: enough to seed
the refinement's 3 starting points with room for the ranking's misses, few enough that at the CLI's
default 60 s per problem (each timed config costs a JIT compile of a second or more plus its runs) the
pass stays within its half of the budget. At the GPU script's 3 s per problem the budget, not this, is
what stops the pass."""

SCREEN_RULES_VERSION = 1
"""Part of the shipped verdicts' kernel hash (`screen_kernel_hash`): bump it when what `compile_screen`
decides changes without a kernel or launcher source change (its rules, the limits, `measure.sass`'s
counting), so verdicts computed under the old rules are ignored."""


def _screen_kernel_hashes() -> dict[str, str]:
    hashes = {}
    for op, (kernel_hash, launch) in {
        "forward": (forward.KERNEL_SOURCE_HASH, forward.kernel_launch),
        "grad_input": (grad_input.GRAD_INPUT_KERNEL_HASH, grad_input.grad_input_launch),
        "grad_weight": (grad_weight.GRAD_WEIGHT_KERNEL_HASH, grad_weight.grad_weight_launch),
    }.items():
        digest = hashlib.sha256(f"{kernel_hash} screen rules {SCREEN_RULES_VERSION} ".encode())
        digest.update(inspect.getsource(launch).encode())
        hashes[op] = digest.hexdigest()
    return hashes


# At import, like the kernels' own hashes: inspect.getsource reads the file when called, so a long
# verdict run (benchmarks/prune_space.py) asking later would label its verdicts from an edited file
# (lines shifted under the loaded code) rather than from the code it compiles.
_SCREEN_KERNEL_HASHES = _screen_kernel_hashes()


def screen_kernel_hash(op: str) -> str:
    """The kernel hash of `op`'s screening verdicts (`tuning.ScreenIdentity`): the kernel source, the
    launcher code that builds its compile-time arguments, and SCREEN_RULES_VERSION."""
    return _SCREEN_KERNEL_HASHES[op]


def screen_identity(op: str, problem: dict, x, arch: int) -> ScreenIdentity:
    """What `op`'s screening verdicts for this problem are valid for: Triton version, sm_<arch>, the
    kernel hash (`screen_kernel_hash`) and the problem key plus the operands' dtype and memory layout."""
    dtype = str(x.dtype).removeprefix("torch.")
    return ScreenIdentity(sass.triton_version(), f"sm{arch}", screen_kernel_hash(op),
                          {**problem, "dtype": dtype, "layout": layout_name(x)})  # fmt: skip


def screen_key(config: dict) -> dict:
    """The part of a config a screen verdict depends on: the kernel's knobs (a weight gradient's split is a
    run-time argument and its method does not change the kernel)."""
    return kernel_config_of(config).as_dict()


def compile_screen(op: str, x, weight, geom, grad_mode: str, arch: int) -> Callable[[dict], ScreenResult]:
    """The tuner's compile-time screen of `op`'s configs for sm_<arch> (`measure.sass.compile_stats`).

    x (N, Cin, H, W), weight (Cout, Cin/g, kh, kw): the launch's operands (only shapes, strides and
    dtype are read). Drops a config that spills (any stack frame or LDL/STL: ptxas caps registers at
    255, so running out of them shows as spills, and local memory traffic in a loop issue-bound on
    the ALUs costs more than any tile shape gains) or needs more shared memory than a block gets;
    scores the rest by instructions per reduced element (lower first). Each compile runs in a child
    process killed after `SCREEN_COMPILE_TIMEOUT_S` (the config is then dropped), so no single config
    can stall a search, and the screen also runs inside an interpreter run. Within a search's budget
    (`tuning.screen_time_left`) the compile gets at most the time left; one cut short by that raises
    `tuning.ScreenOutOfTime` (the config stays unscreened, and a later call compiles it again).
    """
    if arch not in SHARED_MEMORY_LIMITS:
        raise ValueError(f"arch must be one of {tuple(SHARED_MEMORY_LIMITS)}, got {arch!r}")
    x_meta, weight_meta = torch.empty_like(x, device="meta"), torch.empty_like(weight, device="meta")
    shared_limit = SHARED_MEMORY_LIMITS[arch]

    def kernel_verdict(kernel: KernelConfig) -> ScreenResult:
        left = screen_time_left()
        timeout_s = SCREEN_COMPILE_TIMEOUT_S if left is None else min(SCREEN_COMPILE_TIMEOUT_S, left)
        if timeout_s <= 0:
            raise ScreenOutOfTime(f"no time left to compile {kernel}")
        try:
            stats = sass.compile_stats_isolated(op, x_meta, weight_meta, geom, kernel, grad_mode=grad_mode,
                                                arch=arch, timeout_s=timeout_s)  # fmt: skip
        except TimeoutError:
            if timeout_s < SCREEN_COMPILE_TIMEOUT_S:  # the search's budget, not the config, ran out
                raise ScreenOutOfTime(f"the budget ran out compiling {kernel}") from None
            return ScreenResult(False, f"compile over {SCREEN_COMPILE_TIMEOUT_S:g} s")
        if stats.spills:
            return ScreenResult(False, "spills", stats.instructions_per_element)
        if stats.shared_bytes > shared_limit:
            return ScreenResult(False, f"shared memory > {shared_limit // 1024} KiB", stats.instructions_per_element)
        return ScreenResult(True, "", stats.instructions_per_element)

    verdicts: dict[KernelConfig, Future] = {}
    lock = threading.Lock()

    def screen(config: dict) -> ScreenResult:
        # By the kernel's knobs only: a weight gradient's split is a run-time argument and its method
        # does not change the kernel, so the 2 x 8 method/split variants of one tile compile once,
        # also when the pruner's threads ask for several of them at the same time (they wait for it).
        kernel = kernel_config_of(config)
        with lock:
            verdict = verdicts.get(kernel)
            first = verdict is None
            if first:
                verdict = verdicts[kernel] = Future()
        if first:
            try:
                verdict.set_result(kernel_verdict(kernel))
            except BaseException as error:  # the waiting threads see it too (prune drops the config)
                if isinstance(error, ScreenOutOfTime):  # not a verdict: with more time, compile again
                    with lock:
                        verdicts.pop(kernel, None)
                verdict.set_exception(error)
        return verdict.result()

    return screen


def screen_arch_for(device: torch.device, arch: int | None) -> int | None:
    """The target the tuner screens for: the GPU's own, else `arch` (default sm_90); None: no screen.

    Under TRITON_INTERPRET only when `arch` is given: the compiles run in child processes without
    the interpreter (`compile_screen`), but at seconds each they would multiply the functional
    run's minutes, so there it is opt-in (`tune --screen-arch`). No screen without cuobjdump or on a
    GPU outside SHARED_MEMORY_LIMITS.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and arch is None:
        return None
    try:
        sass.cuobjdump_path()
    except RuntimeError:
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    elif arch is None:
        arch = DEFAULT_SCREEN_ARCH
    return arch if arch in SHARED_MEMORY_LIMITS else None


def make_tunable(
    op: str,
    problem: LayerProblem,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool,
    quick: bool,
    grad_mode: str = "paper",
    screen_arch: int | None = None,
) -> Tunable:
    """Describe one (op, layer problem) to the tuner: operands, runner, default, space, constraints.

    op: "forward", "grad_input" or "grad_weight"; quick: the reduced space (`spaces.reduced_space`)
    instead of `spaces.FULL_SPACES[op]`. Operands are seeded (seed 0), so runs are reproducible.
    screen_arch: the target of the compile-time screen off a GPU (`screen_arch_for`).
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
        kernel_default = grad_weight.default_grad_weight_config(x.shape, weight.shape, geom, device.type)
        default_split, _ = grad_weight.grad_weight_split(n, weight.shape, geom, kernel_default, device)
        method = triton_backend.default_grad_weight_method(device, grad_mode)
        default = GradWeightChoice(method, kernel_default, default_split)
        extents = {"block_m": tg, "block_n": cg, "block_k": n * ho * wo}
        reduction = n * ho * wo

        def run(config):
            choice = GradWeightChoice.from_dict(config)
            return triton_backend.grad_weight(grad_out, x, weight, geom, grad_mode, method=choice.method,
                                              config=choice.config, split_k=choice.split_k)  # fmt: skip

        extra = [ACCUMULATOR_CONSTRAINT, splits_within(reduction), identity_takes_the_defaults(default.as_dict())]

    default = default.as_dict()
    arch = screen_arch_for(device, screen_arch)
    screen = None if arch is None else compile_screen(op, x, weight, geom, grad_mode, arch)
    key = op_problem(op, problem.cache_problem(), grad_mode)
    values = reduced_space(default, 16 if problem.reduced_from is not None else 32) if quick else FULL_SPACES[op]
    if op == "grad_weight":  # the method always competes; the full search also tries the splits
        split_values = (default["split_k"],) if quick else tuple(sorted({*SPLIT_K_VALUES, default["split_k"]}))
        values = {**values, "split_k": split_values, "method": grad_weight_methods(grad_mode)}
    return Tunable(
        name=op,
        space=SearchSpace.from_dict(values),
        problem=key,
        run=run,
        default=default,
        constraints=constraints(extents, values, element_bytes, extra),
        outputs_match=outputs_match(dtype, reduction),
        screen=screen,
        screen_relative_limit=INSTRUCTION_BUDGET_FACTOR,
        screen_key=screen_key,
        screen_identity=None if arch is None else screen_identity(op, key, x, arch),
    )
