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
        # FADD.SAT + FFMA per element (grad_input.py's clamp rewrite); default 64x32x4, 2 warps.
        ("grad_input", 2.0, 2.2, "64x32x4 warps=2"),
        # One FFMA per element (sum gY*X, W*sum gY once at the end); default 64x64x8, 2 warps.
        ("grad_weight", 1.0, 1.1, "64x64x8 warps=2"),
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
