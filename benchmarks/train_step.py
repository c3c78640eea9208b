"""One ResNet-20 training step, AdderNet against its CNN twin, on the CPU; alone and under torchrun.

    python benchmarks/train_step.py [--batch-size 32] [--repeats 9] [--ranks 2] [--output FILE]

A step is what `triton_adder.training.loop.fit` does per batch: forward under autocast (off or
bf16), cross-entropy, backward, the adaptive learning rate (AdderNet only, `optim.adaptive_lr_`),
SGD. Both models come from the zoo (`models.build("resnet20", adder=...)`), CIFAR-sized inputs
(3x32x32, random: a step's cost does not depend on pixel values). Each (model, precision) is warmed
up first (its first step, which includes the CPU path's compilation, is reported separately); then
the timed steps are interleaved, one of each per round, so load from other processes hits all
alike, and "ratio" is the median over rounds of that round's AdderNet/CNN ratio.

--ranks N then reruns the float32 comparison under torchrun with N processes (gloo, one thread
each, DistributedDataParallel, batch/N per process): the time is rank 0's step, which includes the
gradient all-reduce. The output (and --output, default results/benchmarks/train_step.txt) starts
with the machine and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from triton_adder.cli_args import nonnegative_int, positive_int  # noqa: E402
from triton_adder.measure.machine import machine_metadata  # noqa: E402
from triton_adder.models import build  # noqa: E402
from triton_adder.optim import PUBLISHED_ETA, adaptive_lr_  # noqa: E402
from triton_adder.training import distributed  # noqa: E402

PRECISIONS = {"float32": None, "bf16 autocast": torch.bfloat16}


def make_step(adder: bool, batch: int, precision, context: distributed.Context):
    """A closure running one training step of ResNet-20 (AdderNet or CNN) on a fixed random batch."""
    torch.manual_seed(0)
    model = build("resnet20", adder=adder)
    trained = nn.parallel.DistributedDataParallel(model) if context.distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    autocast = (lambda: torch.autocast("cpu", dtype=precision)) if precision else contextlib.nullcontext

    def step() -> float:
        started = time.perf_counter()
        with autocast():
            loss = F.cross_entropy(trained(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if adder:
            adaptive_lr_(model, eta=PUBLISHED_ETA)
        optimizer.step()
        return time.perf_counter() - started

    return step


def compare(batch: int, repeats: int, precisions, context: distributed.Context) -> list[dict]:
    """Per precision: first-step and median step times of both models, and the median round ratio."""
    steps = {(p, adder): make_step(adder, batch, PRECISIONS[p], context) for p in precisions for adder in (True, False)}
    first = {key: step() for key, step in steps.items()}  # includes compilation
    for step in steps.values():
        step()  # a second warm-up: the first backward may compile too
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(step())
    rows = []
    for p in precisions:
        adder, cnn = times[(p, True)], times[(p, False)]
        rows.append({
            "precision": p,
            "adder_ms": 1e3 * statistics.median(adder),
            "cnn_ms": 1e3 * statistics.median(cnn),
            "ratio": statistics.median(a / c for a, c in zip(adder, cnn)),
            "adder_first_s": first[(p, True)],
            "cnn_first_s": first[(p, False)],
        })  # fmt: skip
    return rows


def table(rows: list[dict], label: str) -> list[str]:
    header = f"{'precision':<14} {'AdderNet ms':>12} {'CNN ms':>8} {'ratio':>6} {'first step s (adder/CNN)':>26}"
    lines = [label, header]
    for r in rows:
        lines.append(f"{r['precision']:<14} {r['adder_ms']:>12.1f} {r['cnn_ms']:>8.1f} {r['ratio']:>6.2f} "
                     f"{r['adder_first_s']:>17.1f} / {r['cnn_first_s']:.1f}")
    return lines


def worker(args) -> None:
    """Under torchrun: the float32 comparison with DDP; rank 0 writes the rows as JSON."""
    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    rows = compare(args.batch_size // context.world_size, args.repeats, ["float32"], context)
    if context.main:
        Path(args.worker).write_text(json.dumps(rows))
    distributed.teardown(context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global batch (split over --ranks)")
    parser.add_argument("--repeats", type=positive_int, default=9, help="timed rounds")
    parser.add_argument("--ranks", type=nonnegative_int, default=2, help="processes of the torchrun run (0: skip it)")
    parser.add_argument("--output", type=Path, default=Path("results/benchmarks/train_step.txt"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set when started by torchrun
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    meta = machine_metadata(torch.device("cpu"))
    lines = [f"machine: {meta['device']}; torch {meta['torch']} ({torch.get_num_threads()} threads), "
             f"triton {meta['triton']}, python {meta['python']}; git {meta['git revision']}; {meta['date']}",
             f"command: {shlex.join(['python', *sys.argv])}",
             f"ResNet-20 (CIFAR), batch {args.batch_size}, SGD + adaptive lr (AdderNet), median of {args.repeats} "
             "interleaved rounds; ratio = median of per-round AdderNet/CNN", ""]
    context = distributed.Context(0, 1, 0, torch.device("cpu"))
    lines += table(compare(args.batch_size, args.repeats, list(PRECISIONS), context),
                   f"one process, {torch.get_num_threads()} threads:")
    if args.ranks > 1:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "rows.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(args.ranks), __file__, "--batch-size", str(args.batch_size), "--repeats",
                       str(args.repeats), "--worker", str(out)]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows = json.loads(out.read_text())
        lines += ["", *table(rows, f"torchrun, {args.ranks} processes x 1 thread, gloo DDP, "
                                   f"batch {args.batch_size // args.ranks} per process (rank 0's step):")]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
