"""The sm_90 SASS instruction-mix screen (benchmarks/sass_screen.py), run as a developer runs it.

Compile-only (no GPU needed: Triton compiles for GPUTarget("cuda", 90, 32) and the triton wheel
ships ptxas and cuobjdump): each kernel's heuristic default config on a 1x1 layer (the shortest
compile, ~5 s each) must meet its FP32-instruction target per element with no warp shuffle and no
spill in the loop. The screen runs in a child process without TRITON_INTERPRET, which conftest
turns on without CUDA and which replaces kernels so they cannot compile for sm_90.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCREEN = Path(__file__).resolve().parent.parent / "benchmarks" / "sass_screen.py"
LAYER_1X1 = ["--shape", "8", "64", "14", "14", "--cout", "64", "--kernel-size", "1", "--padding", "0"]


def _run_screen(*arguments: str, interpreter: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; fusion is what FFMA.SAT needs
    command = [sys.executable, str(SCREEN), *arguments]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def _screen(*arguments: str) -> str:
    result = _run_screen(*arguments)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _class_counts(out: str) -> dict[str, tuple[int, float]]:
    """{instruction class: (count in the loop, per element)} from the screen's table."""
    return {m.group(1): (int(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^  (\w+)\s+(\d+)\s+([\d.]+) /element$", out, re.MULTILINE)}  # fmt: skip


LOOP_LINE = re.compile(
    r"(inner loop|whole kernel \(no loop\)): registers/thread (\d+), stack (\d+) B, "
    r"LDL/STL in kernel (\d+), length (\d+) instrs, ([\d.]+) elements/thread \((\d+) "
)


def _loop_line(out: str) -> re.Match:
    return LOOP_LINE.search(out)


def test_forward_default_reports_instruction_counts_and_meets_the_float32_targets():
    out = _screen(*LAYER_1X1)  # heuristic default: 128x64x4, 4 warps
    assert out.startswith("forward float32 x(8, 64, 14, 14) cout=64 k=(1, 1)"), out
    assert "block 128x64x4 warps=4" in out, out
    loop = _loop_line(out)
    assert loop is not None and loop.group(1) == "inner loop", out
    counts = _class_counts(out)
    # The table is consistent: per-class counts sum to the loop length, per-element = count / elements.
    length, elements = int(loop.group(5)), float(loop.group(6))
    assert sum(n for name, (n, _) in counts.items() if name != "total") == length == counts["total"][0], out
    assert counts["fp32_alu"][1] == pytest.approx(counts["fp32_alu"][0] / elements, abs=1e-3), out
    # One FADD |.| per reduced element: the marker count equals the elements per thread and iteration.
    assert int(loop.group(7)) == pytest.approx(elements), out
    assert 2.0 <= counts["fp32_alu"][1] <= 2.2, out
    assert "fp32_alu <= 2.2" in out and "SHFL in loop: 0; spills: 0" in out, out
    assert "shuffle" not in counts and "local_spill" not in counts, out
    assert int(loop.group(2)) <= 255 and int(loop.group(4)) == 0, out


@pytest.mark.parametrize(
    "kernel, floor, target, block",
    [
        # FADD.SAT + FFMA per element (grad_input.py's clamp rewrite); default 32x32x2, 1 warp.
        ("grad_input", 2.0, 2.2, "32x32x2 warps=1"),
        # One FFMA per element (sum gY*X, W*sum gY once at the end); default 64x64x2, 2 warps.
        ("grad_weight", 1.0, 1.1, "64x64x2 warps=2"),
    ],
)
def test_gradient_defaults_meet_their_fp32_targets(kernel, floor, target, block):
    out = _screen("--kernel", kernel, *LAYER_1X1)
    assert out.startswith(f"{kernel} paper float32 x(8, 64, 14, 14)") and f"block {block}" in out, out
    assert _loop_line(out).group(1) == "inner loop", out
    fp32 = _class_counts(out)["fp32_alu"][1]
    assert floor <= fp32 <= target, out
    assert f"fp32_alu <= {target:g}" in out, out
    # A few spilled registers outside the loop are tolerated (grad_weight's epilogue); none inside it.
    assert "SHFL in loop: 0" in out and "(0 in the inner loop)" in out, out


def test_exact_mode_has_no_target_and_bad_flags_are_refused():
    out = _screen("--kernel", "grad_weight", "--grad-mode", "exact", *LAYER_1X1)
    assert out.startswith("grad_weight exact float32") and "fp32_alu: no target (reported only)" in out, out
    bad = _run_screen("--kernel", "grad_bias")
    assert bad.returncode == 2 and "invalid choice: 'grad_bias'" in bad.stderr, bad.stderr


def test_the_interpreter_is_refused_with_a_clear_message():
    result = _run_screen(*LAYER_1X1, interpreter=True)
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr, result.stderr[-2000:]


# --- triton_adder.measure.sass, the library the screen and the tuner's pre-filter share ---

from triton_adder.measure import sass  # noqa: E402

# A recorded sm_90 loop (trimmed `cuobjdump -sass` of the forward kernel): two FADD |.| per element
# pair, one scalar and one 128-bit global load, a spill, a shuffle, and the back branch that closes it.
RECORDED_SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   S2R R0, SR_TID.X ;
        /*0120*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0130*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0140*/                   FADD R12, R4, -R8 ;
        /*0150*/                   FADD R20, R20, |R12| ;
        /*0160*/                   FADD R13, R4, -R9 ;
        /*0170*/                   FADD R21, R21, |R13| ;
        /*0180*/                   STL [R1+0x4], R21 ;
        /*0190*/                   SHFL.BFLY PT, R5, R4, 0x1, 0x1f ;
        /*01a0*/               @P0 BRA 0x120 ;
        /*01b0*/                   EXIT ;
        /*01c0*/                   BRA 0x1c0 ;
"""


def test_parser_finds_the_loop_and_counts_it_per_element():
    instructions = sass.parse_sass(RECORDED_SASS)
    assert len(instructions) == 13 and instructions[0] == (0x100, "MOV R1, c[0x0][0x28]")
    # The BRA to itself after EXIT is the trap, not a loop; the predicated back branch is the loop.
    assert sass.innermost_loops(instructions) == [(2, 10)]
    mix = sass.loop_mix_of_sass(RECORDED_SASS, elements_per_thread_iteration=2, elements_per_thread_kernel=99)
    assert mix.scope == "inner loop" and mix.marker_count == 2
    assert mix.loop_counts == {"load_global": 2, "fp32_alu": 4, "local_spill": 1, "shuffle": 1, "control": 1}
    assert mix.per_element()["fp32_alu"] == 2.0 and mix.total_per_element == 4.5
    assert mix.spills == 1 and mix.global_loads() == {"LDG.32": 1, "LDG.128": 1}


def test_parser_without_a_loop_counts_the_whole_kernel_and_refuses_empty_text():
    straight = "\n".join(line for line in RECORDED_SASS.splitlines() if "@P0 BRA" not in line)
    mix = sass.loop_mix_of_sass(straight, 2, elements_per_thread_kernel=4)
    assert mix.scope == "whole kernel (no loop)" and mix.elements_per_iteration == 4
    assert mix.kernel_counts["control"] == 3  # S2R, EXIT, the trap BRA
    with pytest.raises(ValueError, match="no instructions"):
        sass.loop_mix_of_sass("not sass", 1, 1)


def test_classify_routes_converts_uniforms_and_unknowns():
    assert sass.classify("HADD2.F32") == "convert" and sass.classify("HADD2") == "fp16_alu"
    assert sass.classify("UIADD3") == "uniform" and sass.classify("FFMA.SAT") == "fp32_alu"
    assert sass.classify("XYZ") == "other"


def test_sector_model_counts_32_byte_sectors():
    import torch  # noqa: PLC0415

    assert sass.sector_ratio(torch.arange(64), 4) == 1.0  # contiguous: every fetched byte used
    assert sass.sector_ratio(torch.arange(64) * 576, 4) == 8.0  # one float per 32-byte sector
    assert sass.sector_ratio(torch.arange(8) * 2, 4) == 2.0  # every other float


def test_fp32_targets_come_from_the_floors_and_the_report_uses_them():
    from triton_adder.measure.derived import ADDER_INSTRUCTIONS_PER_ELEMENT  # noqa: PLC0415

    assert sass.fp32_target("grad_input") == pytest.approx(2.2) and sass.fp32_target("grad_weight", "exact") is None
    assert ADDER_INSTRUCTIONS_PER_ELEMENT[("forward", "float16")] == sass.FP32_FLOOR_PER_ELEMENT["forward"]
    assert ADDER_INSTRUCTIONS_PER_ELEMENT[("grad_input", "float32")] == 2.0
    with pytest.raises(ValueError, match="op must be one of"):
        sass.fp32_target("grad_bias")


def _cuobjdump_available() -> bool:
    try:
        sass.cuobjdump_path()
    except RuntimeError:
        return False
    return True


_COMPILE_CHILD = """
import json, sys, torch
from triton_adder.kernels.launch_config import KernelConfig
from triton_adder.measure import sass
x, w, geom = sass.meta_layer(torch.float32, (2, 16, 8, 8), 16, (1, 1), 1, 0, 1, False)
out = {}
for arch in (80, 90):
    s = sass.compile_stats("forward", x, w, geom, KernelConfig(32, 16, 4, num_warps=1), arch=arch)
    out[arch] = [s.arch, s.registers, s.spill_bytes, s.local_ops, s.shfl_in_loop, s.fp32_per_element,
                 s.instructions_per_element, s.triton_version, s.loop_scope]
try:
    sass.compile_stats("forward", x, w, geom, None, arch=75)
except ValueError as e:
    out["bad_arch"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(not _cuobjdump_available(), reason="cuobjdump (shipped in the triton wheel) not found")
def test_compile_stats_on_a_tiny_forward_config_for_sm80_and_sm90():
    import json  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], env=env, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for arch in ("80", "90"):
        got_arch, regs, spill, local, shfl, fp32, total, version, scope = out[arch]
        assert got_arch == int(arch) and 0 < regs <= 255 and spill == 0 and local == 0 and shfl == 0
        assert scope == "inner loop" and 2.0 <= fp32 <= 2.2 and total >= fp32 and version
    assert "arch must be one of (80, 90)" in out["bad_arch"]
