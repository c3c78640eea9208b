"""How much of a model's tuning space the compile-time screen prunes, what screening costs, and its verdicts.

For each chosen problem (ResNet-50 by default) and op, every config of `spaces.FULL_SPACES[op]` (or
with --space coarse only the coarse grid the search's first pass screens) goes through the
tunable's constraints and then its compile-time screen (`tunables.compile_screen`: compiled for
sm_<arch> without a GPU, `tuning.prune`), and the counts by reason and the wall time are printed.
Compiling the whole space for all 22 problems takes hours on a small machine, so the default is a
subset (the 3x3 64-channel layer, and a stride-2 3x3 layer with --layers; `--layers all` takes
every problem, by work, largest first); a per-op --max-seconds caps the screening (configs visited
in a seeded random order, so a capped run is a spread-out sample; a compile in flight at the cap is
cut short and counted as not screened), and a capped op says how many it screened. Nothing is
extrapolated.

--write-verdicts PATH merges every verdict computed into a screening-verdict file
(`tuning.verdicts`, the format `search` loads from `tuning/screens/`): keyed by the Triton version
running this script, sm_<arch>, the kernel hash (`tunables.screen_kernel_hash`), the op and the
problem (batch, float32, contiguous: what `python -m triton_adder.tune` tunes on a GPU by default),
so ship it as tuning/screens/sm<arch>__triton-<version>.json.

    python benchmarks/prune_space.py --out results/benchmarks/prune_space.txt
    python benchmarks/prune_space.py --layers all --space coarse --max-seconds 1200 \
        --write-verdicts tuning/screens/sm90__triton-3.6.0.json      # under Triton 3.6.0
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

import torch

from triton_adder import models
from triton_adder.autotune.problems import by_work, collect_problems
from triton_adder.autotune.spaces import OPS
from triton_adder.autotune.tunables import INSTRUCTION_BUDGET_FACTOR, make_tunable
from triton_adder.cli_args import positive_finite_float, positive_int
from triton_adder.measure import sass
from triton_adder.models.census import DEFAULT_GPU_BATCH, MODEL_INPUT_SIZE
from tuning import prune, verdict_entries, write_verdicts

DEFAULT_LAYERS = ("layer1.0.conv2",)


def screen_op(tunable, workers: int, max_seconds: float, space: str = "full") -> tuple[list[str], float]:
    """Lines reporting one op's pruning; no screen call starts after max_seconds (one in flight is cut
    short there: `tuning.screen_time_left`). space: "full" (every valid config) or "coarse" (the coarse
    grid the search screens first). The verdicts stay in `tunable.screen_cache`."""
    configs = tunable.space if space == "full" else tunable.space.coarse()
    valid = [c for c in configs if not tunable.violations(c)]
    random.Random(0).shuffle(valid)  # a capped run screens a spread-out sample, not one corner
    started = time.perf_counter()
    result = prune(tunable, valid, max_workers=workers, deadline=started + max_seconds)
    wall = time.perf_counter() - started
    done = len(valid) - len(result.unscreened)
    lines = [
        f"  {tunable.name}: space {len(configs)}{' (coarse grid)' if space == 'coarse' else ''}, constraints prune "
        f"{len(configs) - len(valid)}, screened {done} of {len(valid)} in {wall:.0f} s with {workers} workers, "
        f"kept {len(result.kept)}",
    ]
    for reason, count in sorted(result.reasons().items(), key=lambda item: -item[1]):
        lines.append(f"    pruned {count}: {reason}")
    for config, verdict in result.kept[:3]:
        lines.append(f"    best: {config} ({verdict.score:.2f} instructions/element)")
    return lines, wall


def verdicts_of(tunable) -> list[dict]:
    """The file entries (`tuning.verdict_entries`) of every verdict in the tunable's screen cache."""
    pairs = [(dict(key), verdict) for key, verdict in tunable.screen_cache.items()]
    return verdict_entries(tunable.screen_identity, tunable.name, pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(DEFAULT_GPU_BATCH))
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS),
                        help="layer names of the model, or 'all' (every problem, largest work first)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--batch", type=positive_int, default=None, help="default: the model's GPU tuning batch")
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90))
    parser.add_argument("--space", default="full", choices=("full", "coarse"),
                        help="every valid config, or the coarse grid the search screens first")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--max-seconds", type=positive_finite_float, default=180.0, help="screening cap per op")
    parser.add_argument("--write-verdicts", default=None, metavar="PATH",
                        help="merge the verdicts into this screening-verdict file (tuning/screens/ format)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    batch = args.batch or DEFAULT_GPU_BATCH[args.model]
    size = MODEL_INPUT_SIZE[args.model]
    problems = by_work(collect_problems(models.build(args.model, adder=True),
                                        (batch, models.MODELS[args.model][2], size, size)))  # fmt: skip
    chosen = problems if args.layers == ["all"] else [p for p in problems if any(n in p.layers for n in args.layers)]
    if not chosen:
        parser.error(f"--layers: none of {args.layers} is a {args.model} adder layer")
    lines = [
        f"# {' '.join([os.path.basename(sys.executable), *sys.argv])}",
        f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, no GPU "
        f"needed (compiled for sm_{args.arch}); torch {torch.__version__}, triton {sass.triton_version()}",
        f"# subset: {len(chosen)} of {args.model}'s {len(problems)} problems at batch {batch} (the full space of "
        "every problem takes hours here); nothing is extrapolated",
        f"# rules: spills (stack or any LDL/STL), shared memory over the sm_{args.arch} limit, "
        f"instructions/element > {INSTRUCTION_BUDGET_FACTOR}x the best screened config's",
    ]
    print("\n".join(lines), flush=True)
    written = 0
    for problem in chosen:
        lines.append(f"{problem.shape_text} ({', '.join(problem.layers[:3])})")
        print(lines[-1], flush=True)
        for op in args.ops:
            tunable = make_tunable(op, problem, torch.float32, torch.device("cpu"), False, False,
                                   screen_arch=args.arch)  # fmt: skip
            if tunable.screen is None:
                raise SystemExit("no screen: unset TRITON_INTERPRET and make cuobjdump available")
            op_lines, _ = screen_op(tunable, args.workers, args.max_seconds, args.space)
            lines += op_lines
            print("\n".join(op_lines), flush=True)
            if args.write_verdicts:  # after each op: a run cut short keeps what it computed
                identity = tunable.screen_identity
                written = write_verdicts(args.write_verdicts, identity.triton_version, identity.target,
                                         verdicts_of(tunable))  # fmt: skip
    if args.write_verdicts:
        print(f"# {written} verdicts in {args.write_verdicts}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
