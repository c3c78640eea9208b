"""SASS of the adder kernels compiled for an explicit GPU target, without a GPU (DESIGN.md sections 2 and 4).

Triton compiles for `GPUTarget("cuda", arch, 32)` on any machine, `cuobjdump` (shipped in the
triton wheel) disassembles the cubin, and the hottest innermost loop is counted by instruction
class. Each SASS instruction is issued once per warp and does one lane's work, so per-thread
counts divided by the elements one thread reduces per loop iteration give instructions per
reduced element.

Public API:

- `compile_stats(op, x_meta, weight_meta, geom, config, *, grad_mode, arch) -> CompileStats`:
  registers, spills, shared memory, SHFL in the loop and instructions per element of one launch,
  the compile-time facts a tuner can prune on before timing anything;
- `compile_stats_isolated(...)`: the same in a child process killed at a deadline (what the
  tuner's screen uses: one large unrolled tile can keep a compile busy for many minutes);
- `kernel_mix(...)`: the same compile, with the full `LoopMix` (per-class counts, loop text) and
  `access_efficiency` (bytes fetched per byte used, per operand), which `benchmarks/sass_screen.py`
  prints;
- `FP32_FLOOR_PER_ELEMENT` / `fp32_target`: the FP32-pipe instructions per element each kernel's
  loop needs, the one source that `measure.derived` divides device peaks by.

The compile path mirrors Triton's launcher (same argument specialisation: divisibility by 16,
ints equal to 1) through `JITFunction` internals shared by Triton 3.6-3.9; it is checked by
tests/test_sass.py under the installed version only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from triton_adder.child_process import child_env, track_session
from triton_adder.contract import memory_format
from triton_adder.geometry import Conv2dGeometry

OPS = ("forward", "grad_input", "grad_weight")
ARCHES = (80, 90)
"""Targets the screens cover: A100 (sm_80) and H100/H200 (sm_90), DESIGN.md section 4."""

# FP32-pipe instructions per reduced element of each kernel's loop, paper mode. 16-bit operands
# are widened to float32 as they are loaded, so the loop, and this count, is the float32 one.
# forward: FADD d = x - w, FADD acc += |d| (abs is a free operand modifier).
# grad_input (eq. 6): FFMA.SAT of W/2 + 1/2 - X/2, FFMA with 2gY (grad_input.py's rewrite).
# grad_weight (eq. 5): FFMA acc += gY * X (W * sum gY once at the end).
FP32_FLOOR_PER_ELEMENT = {"forward": 2.0, "grad_input": 2.0, "grad_weight": 1.0}
TARGET_MARGIN = 1.1
"""A loop may issue 10% over its floor and still meet its target."""

# Instruction classes, by opcode (the text before the first '.'); HADD2.F32 is a half->float convert.
OPCODE_CLASSES = {
    "fp32_alu": set("FADD FMUL FFMA FMNMX FSEL FSET FSETP FCHK FSWZADD".split()),
    "fp16_alu": set("HADD2 HFMA2 HMUL2 HMNMX2 HSET2 HSETP2".split()),
    "convert": set("F2F F2FP I2F F2I I2FP F2IP FRND".split()),
    "int_alu": set(
        "IMAD IADD3 IADD LEA SHF LOP3 ISETP SEL IMNMX IABS PRMT MOV I2I FLO POPC BMSK SGXT VIADD VIMNMX IDP "
        "VABSDIFF VABSDIFF4".split()
    ),
    "uniform": set(),  # every U-prefixed opcode (UIADD3, UMOV, ULDC, ...): `classify` routes them here
    "predicate": set("PLOP3 P2R R2P CSETP PSETP".split()),
    "load_global": set("LDG LD".split()),
    "store_global": set("STG ST RED ATOM ATOMG".split()),
    "shared": set("LDS STS LDSM LDGSTS LDGDEPBAR DEPBAR ATOMS".split()),
    "local_spill": set("LDL STL".split()),
    "shuffle": set("SHFL".split()),
    "control": set(
        "BRA BRX JMP EXIT RET CALL BSSY BSYNC WARPSYNC BAR NOP YIELD BPT ELECT S2R S2UR CS2R LDC MEMBAR ERRBAR CCTL "
        "VOTE VOTEU".split()
    ),
}
_INSTRUCTION_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LOAD_WIDTH_RE = re.compile(r"\.(128|64)\b")


def classify(opcode_with_modifiers: str) -> str:
    """Instruction class of one SASS opcode such as 'FADD.FTZ' or 'HADD2.F32'."""
    if opcode_with_modifiers.startswith("HADD2.F32"):
        return "convert"
    opcode = opcode_with_modifiers.split(".")[0]
    for name, opcodes in OPCODE_CLASSES.items():
        if opcode in opcodes:
            return name
    if opcode.startswith("U") or opcode in ("R2UR",):
        return "uniform"
    return "other"


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """[(address, 'OPCODE operands')] of `cuobjdump -sass` text; predicates ('@P0 ') stay in the text."""
    return [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION_RE.finditer(sass)]


def opcode_of(text: str) -> str:
    """'LDG.E.128' of '@P0 LDG.E.128 R4, desc[UR4][R2.64]'."""
    return text.split()[1] if text.startswith("@") else text.split()[0]


def innermost_loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) index ranges of loops: a branch back to an earlier address closes one."""
    index_of = {addr: i for i, (addr, _) in enumerate(instructions)}
    loops = []
    for i, (_, text) in enumerate(instructions):
        if opcode_of(text).startswith("BRA"):
            target = re.search(r"(0x[0-9a-f]+)", text.split(None, 2)[-1])
            # `BRA` to itself is the trap after EXIT, not a loop
            if target and int(target.group(1), 16) in index_of and index_of[int(target.group(1), 16)] < i:
                loops.append((index_of[int(target.group(1), 16)], i))
    # innermost: no other loop nested strictly inside
    return [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]


def is_abs_fadd(text: str) -> bool:
    """FADD with an |operand|: in float32 the accumulate `acc + |x - w|`, one per reduced element."""
    return opcode_of(text).startswith("FADD") and "|" in text


def is_fp32_alu(text: str) -> bool:
    """Any FP32-pipe ALU instruction: the backward kernels' work (FADD.SAT, FFMA, FSEL ...)."""
    return classify(opcode_of(text)) == "fp32_alu"


# Per kernel: (marker predicate, marker name) that finds the hot loop: the one with the most markers.
HOT_LOOP_MARKERS = {
    "forward": (is_abs_fadd, "FADD |.|"),
    "grad_input": (is_fp32_alu, "FP32 ALU"),
    "grad_weight": (is_fp32_alu, "FP32 ALU"),
}


def fp32_target(op: str, grad_mode: str = "paper") -> float | None:
    """FP32 ALU instructions per element the loop of `op` may issue; None: no target (exact gradients)."""
    _check_op(op)
    if op != "forward" and grad_mode != "paper":
        return None
    return FP32_FLOOR_PER_ELEMENT[op] * TARGET_MARGIN


@dataclass
class LoopMix:
    """Instruction counts of one loop body (per thread, per iteration) and of the whole kernel.

    marker_count: instructions of the loop that match the kernel's marker (e.g. "FADD |.|": one
    per reduced element of the forward), the check that the right loop was counted.
    """

    loop_counts: Counter
    elements_per_iteration: float
    marker_count: int
    kernel_counts: Counter
    registers: int | None
    stack_bytes: int | None
    loop_text: list[str] = field(default_factory=list)
    scope: str = "inner loop"
    marker: str = "FADD |.|"

    def per_element(self) -> dict[str, float]:
        return {name: n / self.elements_per_iteration for name, n in self.loop_counts.items()}

    @property
    def total_per_element(self) -> float:
        return sum(self.loop_counts.values()) / self.elements_per_iteration

    @property
    def spills(self) -> int:
        """LDL/STL instructions anywhere in the kernel."""
        return self.kernel_counts.get("local_spill", 0)

    def global_loads(self) -> Counter:
        """Global loads of the loop by width: {'LDG.32': n, 'LDG.64': n, 'LDG.128': n}."""
        widths = Counter()
        for text in self.loop_text:
            opcode = opcode_of(text)
            if classify(opcode) == "load_global":
                match = _LOAD_WIDTH_RE.search(opcode)
                widths[f"LDG.{match.group(1) if match else 32}"] += 1
        return widths


def loop_mix_of_sass(
    sass: str,
    elements_per_thread_iteration: float,
    elements_per_thread_kernel: float,
    marker=is_abs_fadd,
    marker_name: str = "FADD |.|",
    registers: int | None = None,
    stack_bytes: int | None = None,
) -> LoopMix:
    """Count the hottest innermost loop of disassembled SASS (most `marker` instructions, then the longest).

    Without any loop (e.g. Cin/groups == 1 is specialised to a constant, resolving the channel loop
    at compile time) the whole kernel is counted against `elements_per_thread_kernel`.
    """
    instructions = parse_sass(sass)
    if not instructions:
        raise ValueError("sass holds no instructions (expected `cuobjdump -sass` output)")
    kernel_counts = Counter(classify(opcode_of(t)) for _, t in instructions)
    loops = innermost_loops(instructions)
    if not loops:
        return LoopMix(
            kernel_counts, elements_per_thread_kernel, sum(marker(t) for _, t in instructions), kernel_counts,
            registers, stack_bytes, [t for _, t in instructions], scope="whole kernel (no loop)", marker=marker_name,
        )  # fmt: skip
    start, end = max(loops, key=lambda ab: (sum(marker(t) for _, t in instructions[ab[0] : ab[1] + 1]), ab[1] - ab[0]))
    body = instructions[start : end + 1]
    counts = Counter(classify(opcode_of(t)) for _, t in body)
    return LoopMix(
        counts, elements_per_thread_iteration, sum(marker(t) for _, t in body), kernel_counts, registers,
        stack_bytes, [t for _, t in body], marker=marker_name,
    )  # fmt: skip


def cuobjdump_path() -> str:
    """The `cuobjdump` binary of the installed triton wheel; RuntimeError if it is missing."""
    try:
        from triton import knobs  # noqa: PLC0415

        path = knobs.nvidia.cuobjdump.path
    except Exception as error:  # noqa: BLE001 - any failure here means: no usable cuobjdump
        raise RuntimeError(f"cannot locate cuobjdump through triton.knobs ({error}); install triton>=3.6") from error
    if not path or not os.path.isfile(path):
        raise RuntimeError(
            f"cuobjdump not found at {path!r}: the SASS screen needs the cuobjdump the triton wheel ships "
            "(or TRITON_CUOBJDUMP_PATH pointing at one)"
        )
    return path


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.check_output([cuobjdump_path(), flag, f.name], text=True)
    finally:
        os.remove(f.name)


def sass_of(cubin: bytes) -> str:
    """`cuobjdump -sass` text of a cubin."""
    return _cuobjdump(cubin, "-sass")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of `cuobjdump -res-usage` (0 where absent).

    SHARED is the static shared memory only; Triton's is dynamic (compiled.metadata.shared).
    """
    text = _cuobjdump(cubin, "-res-usage")
    return {
        key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", text)) else 0
        for key in ("REG", "STACK", "SHARED", "LOCAL")
    }


def compile_kernel(kernel, args, kwargs, arch: int = 90):
    """Compile a @triton.jit kernel for sm_<arch> with the launcher's specialisation of (args, kwargs)."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(f"unset TRITON_INTERPRET: the interpreter replaces kernels and cannot compile for sm_{arch}")
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource, make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


def meta_layer(dtype, shape, cout, kernel_size, stride, padding, groups, channels_last):
    """(x, weight, geom) on the meta device: shapes and strides only, nothing allocated."""
    n, cin, h, w = shape
    kh, kw = kernel_size
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    geom = Conv2dGeometry((stride, stride), (padding, padding), (1, 1), groups, (ho, wo))
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.empty((cout, cin // groups, kh, kw), dtype=dtype, device="meta")
    return x, weight, geom


def default_config(op: str, x_meta, weight_meta, geom: Conv2dGeometry):
    """The launcher's heuristic default config of `op` for a GPU (what a layer without a tuned entry gets)."""
    from triton_adder.kernels import forward as fwd  # noqa: PLC0415
    from triton_adder.kernels import grad_input as gi  # noqa: PLC0415
    from triton_adder.kernels import grad_weight as gw  # noqa: PLC0415

    _check_op(op)
    if op == "forward":
        return fwd.default_config(x_meta, weight_meta, geom)
    if op == "grad_input":
        return gi.default_grad_input_config(x_meta.shape, weight_meta.shape, geom, "cuda")
    return gw.default_grad_weight_config(x_meta.shape, weight_meta.shape, geom, "cuda")


@dataclass(frozen=True)
class Launch:
    """One launch of an adder kernel on meta tensors: what to compile and how many elements it reduces."""

    kernel: object
    args: tuple
    kwargs: dict
    config: object
    elements_per_thread_iteration: float
    elements_per_thread_kernel: float
    operands: dict  # name -> (tensor as the kernel reads it)


def prepare_launch(op: str, x, weight, geom: Conv2dGeometry, config, grad_mode: str = "paper") -> Launch:
    """The launcher's (args, kwargs) for `op` on meta tensors x (N, Cin, H, W), weight (Cout, Cin/g, kh, kw).

    config None takes the heuristic default. An element is one reduced term: |x - w| (forward),
    gY * clamp(W - X) (grad_input, one (position, input channel, output channel, tap)), gY * X
    (grad_weight, one (output channel, input channel, n*p*q)). Each loop iteration unrolls BLOCK_K of
    them over a BLOCK_M x BLOCK_N tile, so a thread reduces BLOCK_M * BLOCK_N * BLOCK_K / threads.
    """
    from triton_adder.kernels import forward as fwd  # noqa: PLC0415
    from triton_adder.kernels import grad_input as gi  # noqa: PLC0415
    from triton_adder.kernels import grad_weight as gw  # noqa: PLC0415

    _check_op(op)
    config = default_config(op, x, weight, geom) if config is None else config
    n, cin = x.shape[:2]
    cout, cg, kh, kw = weight.shape
    dtype = x.dtype
    grad_out = torch.empty((n, cout, *geom.out_size), dtype=dtype, device="meta")
    if op == "forward":
        config = fwd.validate_config(config)
        y = torch.empty((n, cout, *geom.out_size), dtype=dtype, device="meta", memory_format=memory_format(x))
        _, args, kwargs = fwd.kernel_launch(x, weight, None, y, geom, config)
        kernel, per_thread_kernel_terms = fwd.adder2d_forward_kernel, cg * kh * kw
        operands = {"x": args[0], "w": args[1]}
    elif op == "grad_input":
        config = config.validate("config")
        _, args, kwargs = gi.grad_input_launch(grad_out, x, weight, torch.empty_like(x), geom, grad_mode, config)
        # Without a loop (output channels per group resolved at compile time): every reaching tap once.
        kernel = gi.grad_input_kernel
        per_thread_kernel_terms = (cout // geom.groups) * kh * kw / (geom.stride[0] * geom.stride[1])
        operands = {"gy": args[0], "x": args[1], "w": args[2]}
    else:
        config = config.validate("config")
        # The split is `grad_weight_split` on the meta device (counted as 1 SM, so fewer splits than on
        # a GPU): the split count only changes the run-time scalar L_PER_SPLIT, not the loop.
        split_k, l_per_split = gw.grad_weight_split(n, weight.shape, geom, config, x.device)
        partial = torch.empty((split_k, cout, cg, kh, kw), dtype=torch.float32, device="meta")
        _, args, kwargs = gw.grad_weight_launch(grad_out, x, weight, partial, geom, grad_mode, config, l_per_split)
        kernel, per_thread_kernel_terms = gw.grad_weight_kernel, l_per_split
        operands = {"gy": args[0], "x": args[1], "w": args[2]}
    threads = 32 * config.num_warps
    tile = config.block_m * config.block_n
    return Launch(
        kernel, args, kwargs, config, tile * config.block_k / threads, tile * per_thread_kernel_terms / threads,
        operands,
    )  # fmt: skip


SECTOR_BYTES = 32


def sector_ratio(offsets: torch.Tensor, element_size: int) -> float:
    """Bytes fetched per byte used when `offsets` (element offsets, int64) are loaded in one go.

    The memory system moves 32-byte sectors: a load fetches every sector one of its addresses
    touches. Offsets are relative to a 128-byte-aligned base (the allocator's), so the ratio is
    32 * distinct sectors / (elements * element_size): 1 for a contiguous run, 32 / element_size
    when every element sits in its own sector.
    """
    offsets = offsets.reshape(-1)
    if offsets.numel() == 0:
        return float("nan")
    sectors = torch.unique(torch.div(offsets * element_size, SECTOR_BYTES, rounding_mode="floor")).numel()
    return SECTOR_BYTES * sectors / (offsets.numel() * element_size)


def access_efficiency(op: str, launch: Launch, x, weight, geom: Conv2dGeometry) -> dict[str, float]:
    """Bytes fetched per byte used, per operand, of the first program's loads (sector model, `sector_ratio`).

    Model: one tile-wide load of the loop (all threads of the program together), counted at the
    centre tap, first k step, of program (0, 0, 0); sectors touched once by the program count once
    (lanes that share a sector are served by one transaction), reuse across loop iterations through
    L1 is NOT credited, so this is the traffic each load instruction asks the L1/L2 for:

    - forward: x = BLOCK_M positions of one input channel; w = BLOCK_N output channels of one
      (input channel, tap) in the layout the launcher passes;
    - grad_input: gy = BLOCK_M output positions of one output channel; w = BLOCK_N input channels
      of one output channel; x is the BLOCK_M x BLOCK_N tile read once per program ("x once");
    - grad_weight: gy = BLOCK_M output channels of one (n, p, q); x = BLOCK_N input channels of one
      input position; w is the tile read once ("w once").
    Padding taps and masked lanes load nothing and are left out.
    """
    _check_op(op)
    cfg = launch.config
    n, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    ho, wo = geom.out_size
    arange = torch.arange
    es = x.element_size()

    def strides(name):
        return launch.operands[name].stride()

    if op == "forward":
        sx, sw_ = strides("x"), strides("w")
        m = arange(min(cfg.block_m, n * ho * wo))
        img, oh, ow = m // (ho * wo), (m // wo) % ho, m % wo
        ih = oh * geom.stride[0] - geom.padding[0] + (kh // 2) * geom.dilation[0]
        iw = ow * geom.stride[1] - geom.padding[1] + (kw // 2) * geom.dilation[1]
        inside = (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
        x_offs = (img * sx[0] + ih * sx[2] + iw * sx[3])[inside]
        t = arange(min(cfg.block_n, cout // geom.groups))
        return {"x": sector_ratio(x_offs, es), "w": sector_ratio(t * sw_[0], es)}
    sg, sx, sw_ = strides("gy"), strides("x"), strides("w")
    if op == "grad_input":
        rows, cols = -(-h // geom.stride[0]), -(-w // geom.stride[1])
        m = arange(min(cfg.block_m, n * rows * cols))
        img, hh, ww = m // (rows * cols), (m // cols) % rows, m % cols
        inside = (hh < ho) & (ww < wo)
        gy_offs = (img * sg[0] + hh * sg[2] + ww * sg[3])[inside]
        k = arange(min(cfg.block_n, cg))
        hpos, wpos = hh * geom.stride[0], ww * geom.stride[1]
        x_tile = (img * sx[0] + hpos * sx[2] + wpos * sx[3])[:, None] + (k * sx[1])[None, :]
        return {"gy": sector_ratio(gy_offs, es), "w": sector_ratio(k * sw_[1], es), "x once": sector_ratio(x_tile, es)}
    t = arange(min(cfg.block_m, cout // geom.groups))
    k = arange(min(cfg.block_n, cg))
    w_tile = (t * sw_[0])[:, None] + (k * sw_[1])[None, :]
    return {"gy": sector_ratio(t * sg[1], es), "x": sector_ratio(k * sx[1], es), "w once": sector_ratio(w_tile, es)}


def triton_version() -> str:
    import triton  # noqa: PLC0415

    return triton.__version__


@dataclass(frozen=True)
class CompileStats:
    """Compile-time facts of one kernel launch for one GPU target (`compile_stats`).

    registers: per thread; spill_bytes: the stack frame (> 0 means registers spilled to local
    memory); local_ops: LDL + STL instructions anywhere in the kernel; shared_bytes: shared memory
    per program (Triton's dynamic allocation, or the static one if larger); shfl_in_loop: SHFL in
    the hot loop; fp32_per_element / instructions_per_element: FP32-pipe and all instructions per
    reduced element in the hot loop (the whole kernel when it has no loop, `loop_scope`);
    global_loads_in_loop: the loop's global loads by width ('LDG.32', 'LDG.64', 'LDG.128').
    """

    op: str
    arch: int
    triton_version: str
    registers: int
    spill_bytes: int
    local_ops: int
    shared_bytes: int
    shfl_in_loop: int
    fp32_per_element: float
    instructions_per_element: float
    loop_scope: str
    global_loads_in_loop: tuple[tuple[str, int], ...] = ()

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0 or self.local_ops > 0


def kernel_mix(op: str, x_meta, weight_meta, geom: Conv2dGeometry, config=None, *, grad_mode="paper", arch=90):
    """(LoopMix, Launch, compiled kernel) of one launch compiled for sm_<arch>; config None: the default."""
    launch = prepare_launch(op, x_meta, weight_meta, geom, config, grad_mode)
    compiled = compile_kernel(launch.kernel, launch.args, launch.kwargs, arch)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    marker, name = HOT_LOOP_MARKERS[op]
    mix = loop_mix_of_sass(
        sass_of(cubin), launch.elements_per_thread_iteration, launch.elements_per_thread_kernel, marker, name,
        usage["REG"], usage["STACK"],
    )  # fmt: skip
    return mix, launch, compiled


def compile_stats(op: str, x_meta, weight_meta, geom: Conv2dGeometry, config, *, grad_mode="paper", arch: int = 90):
    """Compile `op`'s kernel for sm_<arch> (no GPU needed) and return its `CompileStats`.

    op: "forward" | "grad_input" | "grad_weight"; x_meta (N, Cin, H, W) and weight_meta
    (Cout, Cin/groups, kh, kw): tensors whose shapes, strides and dtype are the launch's (meta
    device is enough); geom: the layer's Conv2dGeometry; config: a KernelConfig (None: the heuristic
    default); grad_mode: "paper" | "exact" (gradients only); arch: 80 or 90. Triton caches the
    compile on disk, so a repeated call costs the disassembly only. Raises RuntimeError without
    cuobjdump or under TRITON_INTERPRET, ValueError for a bad op, arch or config.
    """
    cuobjdump_path()  # fail before a compile that cannot be read
    mix, launch, compiled = kernel_mix(op, x_meta, weight_meta, geom, config, grad_mode=grad_mode, arch=arch)
    usage = resource_usage(compiled.asm["cubin"])
    shared = max(int(getattr(compiled.metadata, "shared", 0) or 0), usage["SHARED"])
    per = mix.per_element()
    return CompileStats(
        op=op,
        arch=arch,
        triton_version=triton_version(),
        registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"],
        local_ops=mix.spills,
        shared_bytes=shared,
        shfl_in_loop=mix.loop_counts.get("shuffle", 0),
        fp32_per_element=per.get("fp32_alu", 0.0),
        instructions_per_element=mix.total_per_element,
        loop_scope=mix.scope,
        global_loads_in_loop=tuple(sorted(mix.global_loads().items())),
    )


def isolated_request(op: str, x_meta, weight_meta, geom: Conv2dGeometry, config, grad_mode: str, arch: int) -> dict:
    """The JSON request `compile_child` reads: everything `compile_stats` needs, as plain values."""

    def operand(t: torch.Tensor) -> dict:
        return {"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype).removeprefix("torch.")}

    return {"op": op, "x": operand(x_meta), "weight": operand(weight_meta), "geom": list(geom),
            "config": None if config is None else asdict(config), "grad_mode": grad_mode,
            "arch": arch}  # fmt: skip


def compile_stats_isolated(
    op: str, x_meta, weight_meta, geom: Conv2dGeometry, config, *, grad_mode="paper", arch: int = 90,
    timeout_s: float = 300.0,
) -> CompileStats:  # fmt: skip
    """`compile_stats` in a child process (`measure.compile_child`), killed after `timeout_s` seconds.

    Raises TimeoutError past the deadline (the child's whole process group is killed, ptxas
    included), RuntimeError with the child's last error line if it fails. The child compiles
    without TRITON_INTERPRET, so this also works inside an interpreter run. Costs one Python start
    (about 2 s here) on top of the compile.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    request = json.dumps(isolated_request(op, x_meta, weight_meta, geom, config, grad_mode, arch))
    env = child_env(without=("TRITON_INTERPRET",))
    child = subprocess.Popen(
        [sys.executable, "-m", "triton_adder.measure.compile_child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    track_session(child.pid, alive=True)
    try:
        out, err = child.communicate(request, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"compiling {op} with {config} for sm_{arch} took over {timeout_s:g} s") from None
    finally:  # past the deadline, or this thread interrupted: the compile (and its ptxas) must not outlive it
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
        track_session(child.pid, alive=False)
    if child.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {child.returncode}"
        raise RuntimeError(f"compiling {op} with {config} for sm_{arch} failed: {last}")
    fields = json.loads(out)
    fields["global_loads_in_loop"] = tuple(tuple(pair) for pair in fields["global_loads_in_loop"])
    return CompileStats(**fields)
