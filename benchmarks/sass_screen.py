"""SASS instruction mix of an adder kernel's inner loop, per reduced element, compiled for sm_90.

A GPU-free performance proxy (DESIGN.md sections 2 and 4): Triton compiles for an explicit Hopper
target without a GPU, `cuobjdump` (shipped in the triton wheel) disassembles the cubin, and the
innermost loop (the body of the hottest backward branch) is counted by instruction class. Each SASS
instruction is issued once per warp and does one lane's work, so per-thread counts divided by the
elements each thread reduces per loop iteration give instructions per reduced element.

Targets: float32 at most 2.2 FP32 ALU instructions per element (floor 2: FADD x - w, then
FADD acc + |d|), no SHFL in the loop, no LDL/STL anywhere (spills). The gradient kernels get the
same 10% over their floor in paper mode: grad_input 2.2 (FADD.SAT, FFMA), grad_weight 1.1
(FFMA); exact mode (sign) has no target and is reported only. Run without TRITON_INTERPRET:

    python benchmarks/sass_screen.py --dtype float32 --block 128 64 8 --warps 4
    python benchmarks/sass_screen.py --all-defaults      # the heuristic default on model shapes
    python benchmarks/sass_screen.py --kernel grad_input --all-defaults    # backward kernels too
    python benchmarks/sass_screen.py --kernel grad_weight --grad-mode exact --shape 64 128 28 28 --cout 128

`--kernel` picks the forward kernel (an element is one |x - w| term), `grad_input_kernel` (one
gY * clamp(W - X) term, paper eq. 6: floor 2 FP32 instructions, FADD.SAT + FFMA) or
`grad_weight_kernel` (one gY * X term, paper eq. 5: floor 1, an FFMA); each is compiled through its
launch helper (`kernel_launch`, `grad_input_launch`, `grad_weight_launch`), so the specialisation
is the launcher's. The hottest loop is the one with the most FADD |.| (forward) or FP32 instructions
(gradients), then the longest.

Measured with Triton 3.9 (sm_90 compile on a CPU box; instructions per reduced element in the loop,
layer 32x64x56x56, 64 out, 3x3; "spill" = LDL/STL anywhere in the kernel):
- float32 128x64x4 / 4 warps (default): FP32 2.000, total 2.47, 249 regs, no spill, no SHFL;
  128x64x8: 2.000 / 2.55, 198 regs, no spill (but spills on a 1x1 layer); 256x64x8 / 8 warps and
  64x64x8 / 4 warps spill (the latter 8.1 per element: per-element loads and index math).
- output offsets via div/mod in the store layout (not adopted): the epilogue spilled 68-212 LDL/STL.
- float16/bfloat16, widened to float32 at load (adopted): FP32 2.000, total 2.50 at 128x64x4.
  Difference formed in float16, summed in float32: 0.5 HADD2 + 1.0 HADD2.F32 convert + 1.0 FADD,
  total 4.14 (PRMT packing, scalar LDS.U16). Partial sums over BLOCK_K in float16 (packed HADD2
  both times): 1.0 HADD2 + 0.125 convert + 0.125 FADD, total 2.22, but spills at 128x64x8 and
  rounds every partial sum to float16: not adopted (the forward accumulates in float32).

The compile path mirrors Triton's launcher (same argument specialisation: divisibility by 16,
ints equal to 1), through `JITFunction` internals of Triton 3.x; it is a developer tool, not an API.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import torch

from triton_adder.contract import GRAD_MODES, memory_format
from triton_adder.geometry import Conv2dGeometry
from triton_adder.kernels import forward as fwd
from triton_adder.kernels import grad_input as gi
from triton_adder.kernels import grad_weight as gw
from triton_adder.kernels.launch_config import KernelConfig

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
_BRANCH_RE = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`?\(?\.?L_x_\d+\)?|(0x[0-9a-f]+))")


@dataclass
class LoopMix:
    """Instruction counts of one loop body (per thread, per iteration) and of the whole kernel.

    marker_count: instructions of the loop that match the kernel's marker (`marker`, e.g.
    "FADD |.|": one per reduced element of the forward), the sanity check that the right loop was counted.
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
        return self.kernel_counts.get("local_spill", 0)


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
    """[(address, 'OPCODE operands')] without predicates' '@P0 ' kept in the text."""
    return [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION_RE.finditer(sass)]


def _opcode(text: str) -> str:
    return text.split()[1] if text.startswith("@") else text.split()[0]


def innermost_loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) index ranges of loops: a branch back to an earlier address closes one."""
    index_of = {addr: i for i, (addr, _) in enumerate(instructions)}
    loops = []
    for i, (_, text) in enumerate(instructions):
        if _opcode(text).startswith("BRA"):
            target = re.search(r"(0x[0-9a-f]+)", text.split(None, 2)[-1])
            # `BRA` to itself is the trap after EXIT, not a loop
            if target and int(target.group(1), 16) in index_of and index_of[int(target.group(1), 16)] < i:
                loops.append((index_of[int(target.group(1), 16)], i))
    # innermost: no other loop nested strictly inside
    return [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]


def _is_abs_fadd(text: str) -> bool:
    """FADD with an |operand|: in float32 the accumulate `acc + |x - w|`, one per reduced element."""
    opcode = _opcode(text)
    return opcode.startswith("FADD") and "|" in text


def _is_fp32_alu(text: str) -> bool:
    """Any FP32-pipe ALU instruction: the backward kernels' work (FADD.SAT, FFMA, FSEL ...)."""
    return classify(_opcode(text)) == "fp32_alu"


# Per kernel: (marker predicate, marker name) that finds the hot loop.
HOT_LOOP_MARKERS = {
    "forward": (_is_abs_fadd, "FADD |.|"),
    "grad_input": (_is_fp32_alu, "FP32 ALU"),
    "grad_weight": (_is_fp32_alu, "FP32 ALU"),
}
# FP32 ALU instructions per element the loop may issue: 10% over the floor (module docstring).
# Keyed by (kernel, grad_mode); None: no target (reported only).
FP32_TARGETS = {
    ("forward", None): 2.2,
    ("grad_input", "paper"): 2.2,
    ("grad_weight", "paper"): 1.1,
    ("grad_input", "exact"): None,
    ("grad_weight", "exact"): None,
}


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack frame bytes) from `cuobjdump -res-usage`."""
    from triton import knobs  # noqa: PLC0415

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.check_output([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], text=True)
    finally:
        os.remove(f.name)
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (int(reg.group(1)) if reg else None, int(stack.group(1)) if stack else None)


def sass_of(cubin: bytes) -> str:
    from triton import knobs  # noqa: PLC0415

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.check_output([knobs.nvidia.cuobjdump.path, "-sass", f.name], text=True)
    finally:
        os.remove(f.name)


def compile_for_sm90(kernel, args, kwargs):
    """Compile a @triton.jit kernel for sm_90 with the launcher's specialisation of (args, kwargs)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces kernels and cannot compile for sm_90")
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource, make_backend  # noqa: PLC0415
    from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def loop_mix(
    compiled,
    elements_per_thread_iteration: float,
    elements_per_thread_kernel: float,
    marker=_is_abs_fadd,
    marker_name: str = "FADD |.|",
) -> LoopMix:
    """Count the hottest innermost loop of a compiled kernel (most `marker` instructions, then the longest).

    Without any loop (e.g. Cin/groups == 1 is specialised to a constant, resolving the channel loop
    at compile time) the whole kernel is counted against `elements_per_thread_kernel`.
    """
    instructions = parse_sass(sass_of(compiled.asm["cubin"]))
    kernel_counts = Counter(classify(_opcode(t)) for _, t in instructions)
    registers, stack = resource_usage(compiled.asm["cubin"])
    loops = innermost_loops(instructions)
    if not loops:
        return LoopMix(
            kernel_counts, elements_per_thread_kernel, sum(marker(t) for _, t in instructions), kernel_counts,
            registers, stack, [t for _, t in instructions], scope="whole kernel (no loop)", marker=marker_name,
        )  # fmt: skip
    start, end = max(loops, key=lambda ab: (sum(marker(t) for _, t in instructions[ab[0] : ab[1] + 1]), ab[1] - ab[0]))
    body = instructions[start : end + 1]
    counts = Counter(classify(_opcode(t)) for _, t in body)
    return LoopMix(
        counts, elements_per_thread_iteration, sum(marker(t) for _, t in body), kernel_counts, registers, stack,
        [t for _, t in body], marker=marker_name,
    )  # fmt: skip


def _meta_layer(dtype, shape, cout, kernel_size, stride, padding, groups, channels_last):
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


def forward_mix(
    dtype: torch.dtype,
    config,
    shape=(32, 64, 56, 56),
    cout=64,
    kernel_size=(3, 3),
    stride=1,
    padding=1,
    groups=1,
    channels_last=False,
):
    """Compile the forward kernel for one layer shape and launch config; return (inner-loop mix, config)."""
    x, weight, geom = _meta_layer(dtype, shape, cout, kernel_size, stride, padding, groups, channels_last)
    n, cin = shape[:2]
    kh, kw = kernel_size
    config = fwd.validate_config(fwd.default_config(x, weight, geom) if config is None else config)
    y = torch.empty((n, cout, *geom.out_size), dtype=dtype, device="meta", memory_format=memory_format(x))
    _, args, kwargs = fwd.kernel_launch(x, weight, None, y, geom, config)
    compiled = compile_for_sm90(fwd.adder2d_forward_kernel, args, kwargs)
    threads = 32 * config.num_warps
    tile = config.block_m * config.block_n
    whole = tile * (cin // groups) * kh * kw / threads
    return loop_mix(compiled, tile * config.block_k / threads, whole), config


def grad_input_mix(
    dtype: torch.dtype,
    config,
    shape=(32, 64, 56, 56),
    cout=64,
    kernel_size=(3, 3),
    stride=1,
    padding=1,
    groups=1,
    channels_last=False,
    grad_mode="paper",
):
    """Compile `grad_input_kernel` for one layer shape and launch config; return (inner-loop mix, config).

    An element is one (input position, input channel, output channel) term of one tap, so the loop's
    BLOCK_K unrolled output channels give BLOCK_M * BLOCK_N * BLOCK_K / threads elements per thread.
    """
    x, weight, geom = _meta_layer(dtype, shape, cout, kernel_size, stride, padding, groups, channels_last)
    if config is None:
        config = gi.default_grad_input_config(x.shape, weight.shape, geom, "cuda")
    config = config.validate("config")
    grad_out = torch.empty((shape[0], cout, *geom.out_size), dtype=dtype, device="meta")
    grad_x = torch.empty_like(x)
    _, args, kwargs = gi.grad_input_launch(grad_out, x, weight, grad_x, geom, grad_mode, config)
    compiled = compile_for_sm90(gi.grad_input_kernel, args, kwargs)
    threads = 32 * config.num_warps
    tile = config.block_m * config.block_n
    # Without a loop (output channels per group resolved at compile time): every reaching tap once.
    taps_reaching = kernel_size[0] * kernel_size[1] / (stride * stride)
    whole = tile * (cout // groups) * taps_reaching / threads
    marker, name = HOT_LOOP_MARKERS["grad_input"]
    return loop_mix(compiled, tile * config.block_k / threads, whole, marker, name), config


def grad_weight_mix(
    dtype: torch.dtype,
    config,
    shape=(32, 64, 56, 56),
    cout=64,
    kernel_size=(3, 3),
    stride=1,
    padding=1,
    groups=1,
    channels_last=False,
    grad_mode="paper",
):
    """Compile `grad_weight_kernel` for one layer shape and launch config; return (inner-loop mix, config).

    An element is one (output channel, input channel, n*p*q) term, so the loop's BLOCK_K unrolled
    reduction steps give BLOCK_M * BLOCK_N * BLOCK_K / threads elements per thread. The split of the
    reduction is `kernels.grad_weight.default_split_k` on the meta device (counted as 1 SM, so fewer splits than
    on a GPU): the split count only changes the run-time scalar L_PER_SPLIT, not the loop.
    """
    x, weight, geom = _meta_layer(dtype, shape, cout, kernel_size, stride, padding, groups, channels_last)
    if config is None:
        config = gw.default_grad_weight_config(x.shape, weight.shape, geom, "cuda")
    config = config.validate("config")
    cg, kh, kw = weight.shape[1:]
    split_k, l_per_split = gw.grad_weight_split(shape[0], weight.shape, geom, config, x.device)
    grad_out = torch.empty((shape[0], cout, *geom.out_size), dtype=dtype, device="meta")
    partial = torch.empty((split_k, cout, cg, kh, kw), dtype=torch.float32, device="meta")
    _, args, kwargs = gw.grad_weight_launch(grad_out, x, weight, partial, geom, grad_mode, config, l_per_split)
    compiled = compile_for_sm90(gw.grad_weight_kernel, args, kwargs)
    threads = 32 * config.num_warps
    tile = config.block_m * config.block_n
    marker, name = HOT_LOOP_MARKERS["grad_weight"]
    return loop_mix(compiled, tile * config.block_k / threads, tile * l_per_split / threads, marker, name), config


KERNEL_MIXES = {"forward": forward_mix, "grad_input": grad_input_mix, "grad_weight": grad_weight_mix}


def format_mix(mix: LoopMix, title: str, fp32_target: float | None = 2.2) -> str:
    """Text table of one mix: per-class counts per element, then the checks (FP32 ALU target, SHFL, spills)."""
    per = mix.per_element()
    lines = [
        title,
        f"  {mix.scope}: registers/thread {mix.registers}, stack {mix.stack_bytes} B, "
        f"LDL/STL in kernel {mix.spills}, length {sum(mix.loop_counts.values())} instrs, "
        f"{mix.elements_per_iteration:g} elements/thread "
        f"({mix.marker_count} {mix.marker} found)",
    ]
    for name in sorted(per, key=lambda k: -per[k]):
        lines.append(f"  {name:<13}{mix.loop_counts[name]:>6}  {per[name]:7.3f} /element")
    lines.append(f"  {'total':<13}{sum(mix.loop_counts.values()):>6}  {mix.total_per_element:7.3f} /element")
    fp32 = per.get("fp32_alu", 0.0)
    if fp32_target is None:
        verdict = "fp32_alu: no target (reported only)"
    elif fp32 <= fp32_target:
        verdict = f"fp32_alu <= {fp32_target:g}"
    else:
        verdict = f"fp32_alu > {fp32_target:g} (target missed)"
    lines.append(
        f"  checks: {verdict}; SHFL in loop: {mix.loop_counts.get('shuffle', 0)}; spills: {mix.spills} "
        f"({mix.loop_counts.get('local_spill', 0)} in the {mix.scope})"
    )
    return "\n".join(lines)


def fp32_target(kernel: str, grad_mode: str) -> float | None:
    """FP32 ALU instructions per element the loop of `kernel` may issue (FP32_TARGETS)."""
    return FP32_TARGETS[(kernel, None if kernel == "forward" else grad_mode)]


# Layer shapes for --all-defaults: (N, Cin, H, W), Cout, kernel, stride, padding, groups.
SCREEN_SHAPES = [
    ((32, 64, 56, 56), 64, (3, 3), 1, 1, 1),
    ((32, 128, 28, 28), 256, (3, 3), 2, 1, 1),
    ((32, 16, 32, 32), 16, (3, 3), 1, 1, 1),
    ((32, 256, 14, 14), 256, (1, 1), 1, 0, 1),
    ((32, 64, 56, 56), 64, (3, 3), 1, 1, 64),
    ((32, 32, 16, 16), 32, (3, 3), 1, 1, 1),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", default="forward", choices=sorted(KERNEL_MIXES), help="which kernel to compile")
    parser.add_argument("--grad-mode", default="paper", choices=GRAD_MODES, help="gradient kernels only")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--block", type=int, nargs=3, metavar=("M", "N", "K"), help="default: heuristic")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56], metavar=("N", "C", "H", "W"))
    parser.add_argument("--cout", type=int, default=64)
    parser.add_argument("--kernel-size", type=int, default=3, help="square kernel side (kh = kw)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--padding", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--all-defaults", action="store_true", help="heuristic default on SCREEN_SHAPES")
    parser.add_argument("--show-loop", action="store_true", help="print the loop's SASS")
    a = parser.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    if a.all_defaults:
        jobs = [(s, c, k, st, p, g, None) for s, c, k, st, p, g in SCREEN_SHAPES]
    else:
        config = None if a.block is None else KernelConfig(*a.block, num_warps=a.warps, num_stages=a.stages)
        jobs = [(tuple(a.shape), a.cout, (a.kernel_size, a.kernel_size), a.stride, a.padding, a.groups, config)]
    mix_of = KERNEL_MIXES[a.kernel]
    extra = {} if a.kernel == "forward" else {"grad_mode": a.grad_mode}
    mode = "" if a.kernel == "forward" else f" {a.grad_mode}"
    for shape, cout, kernel_size, stride, padding, groups, config in jobs:
        mix, used = mix_of(dtype, config, shape, cout, kernel_size, stride, padding, groups, a.channels_last, **extra)
        title = (
            f"{a.kernel}{mode} {a.dtype} x{shape} cout={cout} k={kernel_size} s={stride} p={padding} g={groups}"
            f"{' channels_last' if a.channels_last else ''} | block {used.block_m}x{used.block_n}x{used.block_k}"
            f" warps={used.num_warps} stages={used.num_stages}"
        )
        print(format_mix(mix, title, fp32_target(a.kernel, a.grad_mode)), flush=True)
        if a.show_loop:
            print("\n".join("    " + t for t in mix.loop_text))


if __name__ == "__main__":
    main()
