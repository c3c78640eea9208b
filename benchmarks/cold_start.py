"""First-call cost of a ResNet-50 AdderNet on the CPU path, each measurement in a fresh process.

    python benchmarks/cold_start.py [--model resnet50] [--batch 2] [--size 224] [--steps 3] [--workers N]
                                    [--output FILE]

Four figures, as a new user meets them:

- cold: the first forward+backward in a fresh process with an EMPTY inductor cache (a new
  TORCHINDUCTOR_CACHE_DIR), so every layer shape is compiled from scratch;
- warm: the same in a second fresh process reusing that cache directory (inductor's on-disk code
  cache and the CPU path's index of it, `backends.cpu.code_index`, are warm; this process's
  compiled-callable cache is empty);
- steady: the median of `--steps` further forward+backward steps in the warm process;
- precompiled cold: a fresh process with another empty cache that first calls
  `triton_adder.precompile(model, x, workers=N)` (N = --workers, default the CPU count), then
  takes its first step; the figure is precompile plus that step.

Model construction and the import of triton_adder are excluded from every figure; the cold line
says how many compilations the first step ran (`common.compile_count`) and how many distinct call
signatures (sizes and strides of a pass's operands) they served. The triton_adder that is
measured is the one `python` imports (set PYTHONPATH to measure another copy of the package).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def child(args) -> None:
    """One fresh process: build the model, time the first step and `steps` more; print one JSON line."""
    import torch  # noqa: PLC0415

    import triton_adder  # noqa: PLC0415
    from triton_adder.backends.cpu import common  # noqa: PLC0415

    torch.manual_seed(0)
    model = triton_adder.models.build(args.model, adder=True)
    x = torch.randn(args.batch, 3, args.size, args.size)

    def step() -> float:
        start = time.perf_counter()
        model(x).sum().backward()
        return time.perf_counter() - start

    precompile_s = None
    if args.workers is not None:
        start = time.perf_counter()
        triton_adder.precompile(model, x, workers=args.workers)
        precompile_s = time.perf_counter() - start
    first = step()
    compiled, signatures = common.compile_count, len(common._compiled)
    steady = [step() for _ in range(args.steps)]
    print(json.dumps({"precompile_s": precompile_s, "first_s": first, "steady_s": statistics.median(steady),
                      "compiled": compiled, "signatures": signatures,
                      "package": os.path.dirname(triton_adder.__file__)}))


def run_child(args, cache_dir: str, workers: int | None = None) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    command = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model, "--batch",
               str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
    if workers is not None:
        command += ["--child-workers", str(workers)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a name from triton_adder.models.MODELS")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--steps", type=int, default=3, help="steady-state steps after the first (median)")
    parser.add_argument("--output", help="also write the report to this file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="precompile worker processes in the fourth run (default: the CPU count)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", dest="child_workers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("batch", "size", "steps", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    if args.child:
        args.workers = args.child_workers
        child(args)
        return

    import torch  # noqa: PLC0415

    from triton_adder.measure.machine import cpu_name, git_revision  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="cold-start-inductor-") as cache_dir:
        cold = run_child(args, cache_dir)
        warm = run_child(args, cache_dir)
    with tempfile.TemporaryDirectory(prefix="cold-start-inductor-") as cache_dir:
        ahead = run_child(args, cache_dir, workers=args.workers)
    lines = [
        f"command: python benchmarks/cold_start.py --model {args.model} --batch {args.batch} --size {args.size} "
        f"--steps {args.steps} --workers {args.workers}",
        f"machine: {cpu_name()} ({os.cpu_count()} logical CPUs, shared); torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); python {sys.version.split()[0]}",
        f"triton_adder: {cold['package']} at {git_revision()}; "
        f"TRITON_ADDER_CPU_COMPILE={os.environ.get('TRITON_ADDER_CPU_COMPILE', '(unset)')}",
        f"{args.model} AdderNet, batch {args.batch}, 3x{args.size}x{args.size}, float32, forward + backward of sum()",
        f"cold (fresh process, empty inductor cache): first step {cold['first_s']:7.1f} s, "
        f"{cold['compiled']} compilations serving {cold['signatures']} call signatures",
        f"warm (fresh process, warm inductor cache):  first step {warm['first_s']:7.1f} s, "
        f"{warm['compiled']} compilations",
        f"steady state (median of {args.steps} steps after the first): {warm['steady_s']:.2f} s "
        f"(cold process: {cold['steady_s']:.2f} s)",
        f"precompiled cold (fresh process, empty cache, precompile with {args.workers} workers, then the first step): "
        f"{ahead['precompile_s'] + ahead['first_s']:7.1f} s = precompile {ahead['precompile_s']:.1f} s + first step "
        f"{ahead['first_s']:.1f} s with {ahead['compiled']} compilations; steady {ahead['steady_s']:.2f} s",
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "a") as out:
            out.write(report + "\n\n")


if __name__ == "__main__":
    main()
