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
import json
import sys

import torch

from triton_adder.cli_args import positive_int
from triton_adder.contract import GRAD_MODES
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.measure import sass
from triton_adder.measure.sass import LoopMix, fp32_target


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


# Layer shapes for --all-defaults: (N, Cin, H, W), Cout, kernel, stride, padding, groups. The first,
# second and fourth are ResNet-50's (64-channel 3x3, 128->256 stride-2 3x3, 256-channel 1x1); the
# others are the narrow, depthwise and small layers of the other models.
SCREEN_SHAPES = [
    ((32, 64, 56, 56), 64, (3, 3), 1, 1, 1),
    ((32, 128, 28, 28), 256, (3, 3), 2, 1, 1),
    ((32, 16, 32, 32), 16, (3, 3), 1, 1, 1),
    ((32, 256, 14, 14), 256, (1, 1), 1, 0, 1),
    ((32, 64, 56, 56), 64, (3, 3), 1, 1, 64),
    ((32, 32, 16, 16), 32, (3, 3), 1, 1, 1),
]


def screen_rows(a) -> list[dict]:
    """Compile every (shape, arch) job of the parsed arguments; one row per compile (`row_of`)."""
    dtype = getattr(torch, a.dtype)
    if a.all_defaults:
        jobs = [(s, c, k, st, p, g, None) for s, c, k, st, p, g in SCREEN_SHAPES]
    else:
        config = None if a.block is None else KernelConfig(*a.block, num_warps=a.warps, num_stages=a.stages)
        jobs = [(tuple(a.shape), a.cout, (a.kernel_size, a.kernel_size), a.stride, a.padding, a.groups, config)]
    mode = "" if a.kernel == "forward" else f" {a.grad_mode}"
    rows = []
    for shape, cout, kernel_size, stride, padding, groups, config in jobs:
        x, weight, geom = sass.meta_layer(dtype, shape, cout, kernel_size, stride, padding, groups, a.channels_last)
        for arch in a.arch:
            mix, launch, _ = sass.kernel_mix(a.kernel, x, weight, geom, config, grad_mode=a.grad_mode, arch=arch)
            used = launch.config
            layer = f"x{shape} cout={cout} k={kernel_size} s={stride} p={padding} g={groups}"
            layer += " channels_last" if a.channels_last else ""
            block = f"{used.block_m}x{used.block_n}x{used.block_k} warps={used.num_warps} stages={used.num_stages}"
            title = f"{a.kernel}{mode} {a.dtype} {layer} | block {block} | sm_{arch} triton {sass.triton_version()}"
            access = sass.access_efficiency(a.kernel, launch, x, weight, geom)
            text = format_mix(mix, title, fp32_target(a.kernel, a.grad_mode))
            loads = ", ".join(f"{n} {w}" for w, n in sorted(mix.global_loads().items())) or "none"
            text += "\n  global loads in the loop: " + loads
            text += "\n  bytes fetched per byte used (32-byte sectors): " + ", ".join(
                f"{name} {ratio:.2f}" for name, ratio in access.items()
            )
            if a.show_loop:
                text += "\n" + "\n".join("    " + t for t in mix.loop_text)
            per = mix.per_element()
            rows.append({
                "kernel": f"{a.kernel}{mode}", "dtype": a.dtype, "layer": layer, "config": block,
                "triton": sass.triton_version(), "arch": arch, "registers": mix.registers,
                "stack_bytes": mix.stack_bytes, "local_ops": mix.spills,
                "shfl_in_loop": mix.loop_counts.get("shuffle", 0), "fp32_per_element": per.get("fp32_alu", 0.0),
                "total_per_element": mix.total_per_element, "scope": mix.scope,
                "loads": dict(mix.global_loads()), "bytes_per_byte_used": access, "text": text,
            })  # fmt: skip
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", default="forward", choices=sass.OPS, help="which kernel to compile")
    parser.add_argument("--grad-mode", default="paper", choices=GRAD_MODES, help="gradient kernels only")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sass.ARCHES, help="sm_XX targets")
    parser.add_argument("--block", type=positive_int, nargs=3, metavar=("M", "N", "K"), help="default: heuristic")
    parser.add_argument("--warps", type=positive_int, default=4)
    parser.add_argument("--stages", type=positive_int, default=2)
    parser.add_argument("--shape", type=positive_int, nargs=4, default=[32, 64, 56, 56], metavar=("N", "C", "H", "W"))
    parser.add_argument("--cout", type=positive_int, default=64)
    parser.add_argument("--kernel-size", type=positive_int, default=3, help="square kernel side (kh = kw)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--padding", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--all-defaults", action="store_true", help="heuristic default on SCREEN_SHAPES")
    parser.add_argument("--show-loop", action="store_true", help="print the loop's SASS")
    parser.add_argument("--json", action="store_true", help="one JSON object per compile (benchmarks/sass_matrix.py)")
    a = parser.parse_args(argv)
    try:
        sass.cuobjdump_path()
        rows = screen_rows(a)
    except RuntimeError as error:
        print(f"sass_screen: {error}", file=sys.stderr)
        return 1
    for row in rows:
        print(json.dumps(row) if a.json else row["text"], flush=True)
    return 0


if __name__ == "__main__":
    from triton_adder.child_process import exit_on_sigterm

    exit_on_sigterm()  # a `timeout` (benchmarks/gpu_run.sh) must not leave compiles running
    sys.exit(main())
