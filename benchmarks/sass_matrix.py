"""The SASS screen (benchmarks/sass_screen.py) under several Triton versions and GPU targets, as one table.

Triton versions emit different code for the same config (DESIGN.md section 4), so every heuristic
default is screened under each version a user runs (3.6 on the H100/H200 machines, the current one
in CI) and for sm_80 (A100) and sm_90 (H100/H200). Each interpreter in --pythons is one installed
Triton (a venv with that triton and this package importable); the screen runs in it once per
kernel, for all --arch targets, and its JSON rows are merged here:

    python benchmarks/sass_matrix.py --pythons .venv/bin/python,/work/venv-triton36/bin/python

Columns: kernel, layer, config, triton, arch, regs, stack (bytes), LDL/STL (anywhere in the kernel),
SHFL (in the loop), FP32/elem and total/elem (in the hot loop), vector loads (LDG.64/.128 of all
global loads in the loop) and bytes fetched per byte used per operand (`sass.access_efficiency`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCREEN = Path(__file__).resolve().parent / "sass_screen.py"
KERNELS = ("forward", "grad_input", "grad_weight")


def run_screen(python: str, kernel: str, arches: list[int], extra: list[str]) -> list[dict]:
    """JSON rows of `sass_screen.py --kernel <kernel> --all-defaults --json` run by `python`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; fusion is what FFMA.SAT needs
    command = [python, str(SCREEN), "--kernel", kernel, "--all-defaults", "--json", "--arch", *map(str, arches)]
    result = subprocess.run(command + extra, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def format_table(rows: list[dict]) -> str:
    """One line per (kernel, layer, config, triton, arch), sorted so versions and arches sit together."""
    header = (
        f"{'kernel':<18} {'layer':<52} {'config':<26} {'triton':<7} {'arch':<5} {'regs':>4} {'stack':>5} "
        f"{'LDL/STL':>7} {'SHFL':>4} {'FP32/el':>7} {'total/el':>8} {'vec LDG':>7}  bytes fetched/used"
    )
    lines = [header, "-" * len(header)]
    key = lambda r: (r["kernel"], r["layer"], r["triton"], r["arch"])  # noqa: E731
    for r in sorted(rows, key=key):
        loads = r["loads"]
        vector = f"{loads.get('LDG.64', 0) + loads.get('LDG.128', 0)}/{sum(loads.values())}"
        access = " ".join(f"{name}={ratio:.2f}" for name, ratio in r["bytes_per_byte_used"].items())
        lines.append(
            f"{r['kernel']:<18} {r['layer']:<52} {r['config']:<26} {r['triton']:<7} sm_{r['arch']:<2} "
            f"{r['registers']:>4} {r['stack_bytes']:>5} {r['local_ops']:>7} {r['shfl_in_loop']:>4} "
            f"{r['fp32_per_element']:>7.3f} {r['total_per_element']:>8.2f} {vector:>7}  {access}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pythons", default=sys.executable, help="comma-separated interpreters, one per Triton")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=(80, 90))
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    parser.add_argument("--jobs", type=int, default=2, help="screens compiled at once (each uses one core)")
    parser.add_argument("--json-out", default=None, help="also write the rows (without their text) here")
    a, extra = parser.parse_known_args(argv)  # the rest goes to sass_screen.py (e.g. --dtype float16)
    kernels = a.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        parser.error(f"--kernels accepts {KERNELS}, got {unknown}")
    jobs = [(python, kernel) for python in a.pythons.split(",") for kernel in kernels]
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        results = list(pool.map(lambda job: run_screen(job[0], job[1], a.arch, extra), jobs))
    rows = [row for result in results for row in result]
    print(format_table(rows))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps([{k: v for k, v in r.items() if k != "text"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
