"""The sm_90 SASS instruction-mix screen (triton_adder.kernels.sass): forward and backward kernels.

Compile-only (no GPU needed): each kernel's heuristic default config on a 1x1 layer (the shortest
compile, ~5 s each) must meet its FP32-instruction target per element with no warp shuffle in the
loop and no spill in it. The CLI runs in a child process because the Triton interpreter, which
conftest turns on without CUDA, replaces kernels and cannot compile for sm_90.
"""

import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from triton_adder.kernels import sass

LAYER_1X1 = ["--shape", "8", "64", "14", "14", "--cout", "64", "--kernel-size", "1", "--padding", "0"]


def _run_sass(*arguments: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; fusion is what FFMA.SAT needs
    command = [sys.executable, "-m", "triton_adder.kernels.sass", *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _fp32_per_element(out: str) -> float:
    return float(re.search(r"fp32_alu\s+\d+\s+([\d.]+) /element", out).group(1))


def test_forward_default_meets_the_float32_targets():
    out = _run_sass(*LAYER_1X1)  # heuristic default: 128x64x4, 4 warps
    assert "block 128x64x4 warps=4" in out and "inner loop:" in out, out
    assert _fp32_per_element(out) <= 2.2, out
    assert "SHFL in loop: 0; spills: 0" in out, out
    assert "shuffle" not in out and "local_spill" not in out, out


@pytest.mark.parametrize(
    "kernel, target, title",
    [
        # FADD.SAT + FFMA per element (backward.py's clamp rewrite); default 64x32x4, 2 warps.
        ("grad_input", 2.2, "grad_input paper float32"),
        # One FFMA per element (sum gY*X, W*sum gY once at the end); default 64x64x8, 2 warps.
        ("grad_weight", 1.1, "grad_weight paper float32"),
    ],
)
def test_backward_defaults_meet_their_fp32_targets(kernel, target, title):
    out = _run_sass("--kernel", kernel, *LAYER_1X1)
    assert out.startswith(title) and "inner loop:" in out, out
    assert _fp32_per_element(out) <= target, out
    assert f"fp32_alu <= {target:g}" in out, out
    # A few spilled registers outside the loop are tolerated (grad_weight's epilogue); none inside it.
    assert "SHFL in loop: 0" in out and "(0 in the inner loop)" in out, out
    assert "shuffle" not in out, out


SYNTHETIC_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R3, -R4 ;
        /*0020*/                   FADD R5, |R2|, R5 ;
        /*0030*/              @P0  BRA 0x10 ;
        /*0040*/                   FFMA R6, R7, R8, R6 ;
        /*0050*/                   FFMA R6, R7, R9, R6 ;
        /*0060*/                   IADD3 R10, R10, 0x1, RZ ;
        /*0070*/              @P1  BRA 0x40 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
"""


def test_loops_and_markers_on_synthetic_sass():
    instructions = sass.parse_sass(SYNTHETIC_SASS)
    assert [text.split()[0] for _, text in instructions[:3]] == ["MOV", "FADD", "FADD"]
    loops = sass.innermost_loops(instructions)  # the BRA-to-itself trap after EXIT is no loop
    assert loops == [(1, 3), (4, 7)]
    abs_fadd = [sum(sass._is_abs_fadd(t) for _, t in instructions[a : b + 1]) for a, b in loops]
    fp32 = [sum(sass._is_fp32_alu(t) for _, t in instructions[a : b + 1]) for a, b in loops]
    assert abs_fadd == [1, 0] and fp32 == [2, 2]
    assert Counter(sass.classify(sass._opcode(t)) for _, t in instructions[4:8]) == Counter(
        fp32_alu=2, int_alu=1, control=1
    )
    assert sass.classify("HADD2.F32") == "convert" and sass.classify("UIADD3") == "uniform"


def test_targets_cover_every_kernel_and_mode():
    assert sass.fp32_target("forward", "exact") == 2.2  # forward has no grad mode
    assert sass.fp32_target("grad_input", "paper") == 2.2 and sass.fp32_target("grad_weight", "paper") == 1.1
    assert sass.fp32_target("grad_input", "exact") is None and sass.fp32_target("grad_weight", "exact") is None
    assert set(sass.KERNEL_MIXES) == {"forward", "grad_input", "grad_weight"} == set(sass.HOT_LOOP_MARKERS)
