"""How much of the full ResNet-50 tuning space the compile-time screen prunes, and what screening costs.

For each chosen ResNet-50 problem and op, every config of `spaces.FULL_SPACES[op]` goes through the
tunable's constraints and then its compile-time screen (`tunables.compile_screen`: compiled for
sm_<arch> without a GPU, `tuning.prune`), and the counts by reason and the wall time are printed.
Compiling the whole space for all 22 problems takes hours on a small machine, so the default is a
subset (the 3x3 64-channel layer, and a stride-2 3x3 layer with --layers); a per-op --max-seconds
caps the screening (configs visited in a seeded random order, so a capped run is a spread-out
sample), and a capped op says how many it screened. Nothing is extrapolated.

    python benchmarks/prune_space.py --out results/benchmarks/prune_space.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from triton_adder import models
from triton_adder.autotune.problems import collect_problems
from triton_adder.autotune.spaces import OPS
from triton_adder.autotune.tunables import INSTRUCTION_BUDGET_FACTOR, make_tunable
from triton_adder.measure import sass
from triton_adder.tuning import ScreenResult, config_key, prune

DEFAULT_LAYERS = ("layer1.0.conv2",)


def screen_op(tunable, workers: int, max_seconds: float) -> tuple[list[str], float]:
    """Lines reporting one op's pruning; screening stops submitting work after max_seconds."""
    valid = [c for c in tunable.space if not tunable.violations(c)]
    random.Random(0).shuffle(valid)  # a capped run screens a spread-out sample, not one corner
    started = time.perf_counter()
    deadline = started + max_seconds
    screen = tunable.screen

    def capped(config):  # past the cap: not screened (counted apart, never as pruned)
        if time.perf_counter() > deadline:
            return None
        return screen(config)

    verdicts: dict[tuple, ScreenResult | None] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {config_key(c): pool.submit(capped, c) for c in valid}
        for key, future in futures.items():
            try:
                verdicts[key] = future.result()
            except Exception as error:  # same rule as prune: a raising screen drops the config
                verdicts[key] = ScreenResult(False, f"screen raised {type(error).__name__}")
    wall = time.perf_counter() - started
    done = [c for c in valid if verdicts[config_key(c)] is not None]
    tunable.screen_cache.update({k: v for k, v in verdicts.items() if v is not None})
    result = prune(tunable, done, max_workers=1)  # all cached: applies the ranking and the 1.5x rule
    lines = [
        f"  {tunable.name}: space {len(tunable.space)}, constraints prune {len(tunable.space) - len(valid)}, "
        f"screened {len(done)} of {len(valid)} in {wall:.0f} s with {workers} workers, kept {len(result.kept)}",
    ]
    for reason, count in sorted(result.reasons().items(), key=lambda item: -item[1]):
        lines.append(f"    pruned {count}: {reason}")
    for config, verdict in result.kept[:3]:
        lines.append(f"    best: {config} ({verdict.score:.2f} instructions/element)")
    return lines, wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), help="ResNet-50 layer names")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-seconds", type=float, default=180.0, help="screening cap per op")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    problems = collect_problems(models.build("resnet50", adder=True), (args.batch, 3, 224, 224))
    chosen = [p for p in problems if any(name in p.layers for name in args.layers)]
    if not chosen:
        parser.error(f"--layers: none of {args.layers} is a ResNet-50 adder layer")
    lines = [
        f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}",
        f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, no GPU "
        f"needed (compiled for sm_{args.arch}); torch {torch.__version__}, triton {sass.triton_version()}",
        f"# subset: {len(chosen)} of ResNet-50's {len(problems)} problems (the full space of every problem takes "
        "hours here); nothing is extrapolated",
        f"# rules: spills (stack or any LDL/STL), shared memory over the sm_{args.arch} limit, "
        f"instructions/element > {INSTRUCTION_BUDGET_FACTOR}x the best screened config's",
    ]
    print("\n".join(lines), flush=True)
    for problem in chosen:
        lines.append(f"{problem.shape_text} ({', '.join(problem.layers[:3])})")
        print(lines[-1], flush=True)
        for op in args.ops:
            tunable = make_tunable(op, problem, torch.float32, torch.device("cpu"), False, False,
                                   screen_arch=args.arch)  # fmt: skip
            if tunable.screen is None:
                raise SystemExit("no screen: unset TRITON_INTERPRET and make cuobjdump available")
            op_lines, _ = screen_op(tunable, args.workers, args.max_seconds)
            lines += op_lines
            print("\n".join(op_lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
