"""SASS of the int8 forward kernel (triton_adder/kernels/forward_int8.py), per reduced element, no GPU needed.

The int8 counterpart of `sass_screen.py` / `sass_matrix.py` (DESIGN.md sections 2 and 7): each
variant ("unpacked", the default, and "vabsdiff4", inline PTX) is compiled through the launcher's
`kernel_launch` for sm_80 and sm_90 under every Triton in --pythons, disassembled with the wheel's
cuobjdump, and the hot loop (the innermost loop with the most abs-difference instructions: IMNMX /
VIMNMX for "unpacked", VABSDIFF4 for "vabsdiff4") is counted by instruction class and by opcode.
An element is one byte term |x_q - w_q| of the padded reduction (channels padded to a multiple of
4 per group count too); a thread reduces BLOCK_M * BLOCK_N * 4 * BLOCK_K / threads of them per
iteration. A layer with one word per group (Cin/groups <= 4, e.g. depthwise) has no channel loop
(the word count is specialised to 1): its whole kernel is counted, epilogue included.

    python benchmarks/sass_int8.py --pythons .venv/bin/python,/work/venv-t36/bin/python

Each interpreter must have triton (with its cuobjdump) and torch; this checkout is put on its
PYTHONPATH. Run without TRITON_INTERPRET (it is removed from the children's environment).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (N, Cin, H, W), Cout, kernel, stride, padding, groups: ResNet-50's 64-channel 3x3, 128->256
# stride-2 3x3 and 256-channel 1x1 layers, and a depthwise 3x3 (sass_screen.SCREEN_SHAPES 0, 1, 3, 4).
SHAPES = [
    ((32, 64, 56, 56), 64, 3, 1, 1, 1),
    ((32, 128, 28, 28), 256, 3, 2, 1, 1),
    ((32, 256, 14, 14), 256, 1, 1, 0, 1),
    ((32, 64, 56, 56), 64, 3, 1, 1, 64),
]
ABS_DIFF_OPCODES = {"IMNMX", "VIMNMX", "IABS", "VABSDIFF", "VABSDIFF4"}


def is_abs_diff(text: str) -> bool:
    """The instruction that does each term's |.| work: a max (unpacked), VABSDIFF4 (packed), IABS."""
    from triton_adder.measure import sass  # noqa: PLC0415

    return sass.opcode_of(text).split(".")[0] in ABS_DIFF_OPCODES


def screen(variant: str, shape, cout: int, k: int, stride: int, padding: int, groups: int, arch: int, block) -> dict:
    """Compile one (variant, layer, arch) and return its row: counts per element, registers, spills, text."""
    import torch  # noqa: PLC0415

    from benchmarks.sass_screen import format_mix  # noqa: PLC0415
    from triton_adder.kernels import forward_int8 as f8  # noqa: PLC0415
    from triton_adder.kernels.launch_config import KernelConfig  # noqa: PLC0415
    from triton_adder.measure import sass  # noqa: PLC0415

    x, weight, geom = sass.meta_layer(torch.float32, shape, cout, (k, k), stride, padding, groups, False)
    weight_q = torch.empty(weight.shape, dtype=torch.int8, device="meta")
    if block is None:
        config = f8.default_config(x.shape, weight.shape, geom, variant)
    else:
        config = KernelConfig(*block[:3], num_warps=block[3])
    config = f8.validate_config(config)
    y = torch.empty((shape[0], cout, *geom.out_size), dtype=torch.float32, device="meta")
    x_words, w_words = f8.quantize_input(x, 1.0, groups), f8.pack_weight(weight_q)
    _, args, kwargs = f8.kernel_launch(x_words, w_words, None, y, geom, 1.0, config, variant)
    compiled = sass.compile_kernel(f8.adder2d_forward_int8_kernel, args, kwargs, arch)
    cubin = compiled.asm["cubin"]
    usage = sass.resource_usage(cubin)
    threads = 32 * config.num_warps
    per_iteration = config.block_m * config.block_n * f8.BYTES_PER_WORD * config.block_k / threads
    per_kernel = config.block_m * config.block_n * f8.BYTES_PER_WORD * w_words.shape[1] * k * k / threads
    text = sass.sass_of(cubin)
    mix = sass.loop_mix_of_sass(text, per_iteration, per_kernel, is_abs_diff, "abs-diff", usage["REG"], usage["STACK"])
    opcodes = Counter(sass.opcode_of(t) for t in mix.loop_text)
    layer = f"x{shape} cout={cout} k={k} s={stride} p={padding} g={groups}"
    used = f"{config.block_m}x{config.block_n}x{config.block_k}w warps={config.num_warps}"
    title = f"forward_int8 {variant} {layer} | block {used} | sm_{arch} triton {sass.triton_version()}"
    body = format_mix(mix, title, None).replace("fp32_alu: no target (reported only); ", "")
    body += "\n  opcodes in the loop (count, per element): " + ", ".join(
        f"{name} {n} ({n / mix.elements_per_iteration:.3f})" for name, n in opcodes.most_common()
    )
    per = mix.per_element()
    abs_diff = mix.marker_count / mix.elements_per_iteration
    return {
        "variant": variant, "layer": layer, "config": used, "triton": sass.triton_version(), "arch": arch,
        "registers": mix.registers, "stack_bytes": mix.stack_bytes, "local_ops": mix.spills,
        "shfl_in_loop": mix.loop_counts.get("shuffle", 0), "abs_diff_per_element": abs_diff,
        "int_alu_per_element": per.get("int_alu", 0.0), "total_per_element": mix.total_per_element,
        "scope": mix.scope, "text": body,
    }  # fmt: skip


def worker(a) -> int:
    """Compile every job in this interpreter; one JSON row per line."""
    from triton_adder.measure import sass  # noqa: PLC0415

    sass.cuobjdump_path()
    for variant in a.variants.split(","):
        for shape, cout, k, stride, padding, groups in SHAPES[: a.shapes]:
            for arch in a.arch:
                row = screen(variant, shape, cout, k, stride, padding, groups, arch, a.block)
                print(json.dumps(row), flush=True)
    return 0


def run_worker(python: str, argv: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [python, str(Path(__file__).resolve()), "--worker", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'variant':<10} {'layer':<52} {'config':<18} {'triton':<7} {'arch':<5} {'regs':>4} {'stack':>5} "
        f"{'LDL/STL':>7} {'SHFL':>4} {'absdiff/el':>10} {'int/el':>6} {'total/el':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r["variant"], r["layer"], r["triton"], r["arch"])):
        lines.append(
            f"{r['variant']:<10} {r['layer']:<52} {r['config']:<18} {r['triton']:<7} sm_{r['arch']:<2} "
            f"{r['registers']:>4} {r['stack_bytes']:>5} {r['local_ops']:>7} {r['shfl_in_loop']:>4} "
            f"{r['abs_diff_per_element']:>10.3f} {r['int_alu_per_element']:>6.3f} {r['total_per_element']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pythons", default=sys.executable, help="comma-separated interpreters, one per Triton")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=(80, 90))
    parser.add_argument("--variants", default="unpacked,vabsdiff4", help="comma-separated subset of the VARIANTS")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help=f"screen the first n of {len(SHAPES)} layers")
    parser.add_argument("--block", type=int, nargs=4, metavar=("M", "N", "K_WORDS", "WARPS"), help="default: heuristic")
    parser.add_argument("--jobs", type=int, default=2, help="interpreters run at once")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    unknown = sorted(set(a.variants.split(",")) - {"unpacked", "vabsdiff4"})
    if unknown:
        parser.error(f"--variants accepts unpacked, vabsdiff4; got {unknown}")
    if a.worker:
        return worker(a)
    forwarded = ["--arch", *map(str, a.arch), "--variants", a.variants, "--shapes", str(a.shapes)]
    if a.block:
        forwarded += ["--block", *map(str, a.block)]
    pythons = a.pythons.split(",")
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        results = list(pool.map(lambda python: run_worker(python, forwarded), pythons))
    rows = [row for result in results for row in result]
    for row in rows:
        print(row["text"], end="\n\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
