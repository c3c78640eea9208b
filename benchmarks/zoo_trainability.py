"""`convert` over a real model zoo, and whether each converted model learns (`trainability.check`).

    python benchmarks/zoo_trainability.py --zoo torchvision [--models a,b] [--out results/zoo/torchvision.csv]
    python benchmarks/zoo_trainability.py --zoo timm --models resnet18,vgg11,...

Needs torchvision (and timm for --zoo timm): see README, "Model-zoo tests", for a venv that has them.
Every model is built with random weights and 10 classes and converted with `convert(model, report=True)`;
a model whose conversion kept layers for feeding an activation, a gate or an addition is also converted with
`insert_norm=True` (a second row). Per row, on the CPU path (eager, `TRITON_ADDER_CPU_COMPILE=0`), on one
batch of --batch random 3 x --size x --size images with labels 0, 1, 2, ...:

- the layer decisions (adder layers, layers kept and why, the warning's count);
- dead: adder layers with an all-zero weight gradient where the CNN's convolution has a non-zero one;
- the fit (models of at most --max-fit-params parameters): the adder model's loss before the first step,
  its lowest and its last over --steps steps, and the CNN's own start and lowest with the same optimiser;
  `learns` is `Trainability.learns()`.

--weight-std S converts with `convert(..., weight_std=S)`: "auto" (convert's default: N(0, 1) for a layer whose input
is never negative, else weights 5 times as wide as its input, measured by one training-mode pass of the CNN on
convert's guessed input) or a number (adder weights N(0, S^2); 1 is the published N(0, 1)); a number's rows' mode
reads "default,weight_std=S" (write them to their own --out). Each printed line also
gives `perturbation_gain` of the adder model and of the CNN (`Trainability.gain`, `cnn_gain`; not in the CSV).

Models above --max-grad-params get the decisions only (a backward pass of the largest RegNets and ViTs on
the eager path takes many minutes on 2 cores); their families' smaller members are checked in full.
Rows are appended as each model finishes, and models already in --out are skipped, so an interrupted sweep
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_ADDER_CPU_COMPILE", "0")

import torch  # noqa: E402

from triton_adder import convert  # noqa: E402
from triton_adder.backends import use_backend  # noqa: E402
from triton_adder.models import trainability  # noqa: E402

FIELDS = [
    "model", "mode", "params_m", "adders", "kept", "kept_reasons", "warned", "dead", "loss_start", "loss_best",
    "loss_end", "cnn_loss_start", "cnn_loss_best", "learns", "seconds", "error",
]  # fmt: skip
TIMM_MODELS = [  # the twelve of the issue that reported the dead layers (issue 26)
    "resnet18", "resnet50", "resnext26ts", "regnety_002", "densenet121", "dla34", "resnetv2_50x1_bit", "vgg11",
    "mobilenetv3_small_100", "efficientnet_b0", "tf_efficientnet_b0", "convnext_atto",
]  # fmt: skip


def builders(zoo: str):
    """(default model names, build(name) -> model with random weights and 10 classes)."""
    if zoo == "torchvision":
        import torchvision.models as tvm

        return tvm.list_models(module=tvm), lambda name: tvm.get_model(name, weights=None, num_classes=10)
    import timm

    return TIMM_MODELS, lambda name: timm.create_model(name, pretrained=False, num_classes=10)


def _kept_reasons(decisions) -> str:
    counts = collections.Counter(d.reason for d in decisions if d.decision == "kept")
    return "; ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def measure(name: str, build, args) -> list[dict]:
    torch.manual_seed(0)
    cnn = build(name)
    params = sum(p.numel() for p in cnn.parameters())
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(args.batch, 3, args.size, args.size, generator=generator), torch.arange(args.batch) % 10)
    rows = []
    for mode in ("default", "insert_norm"):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adder, decisions = convert(
                cnn, report=True, insert_norm=mode == "insert_norm", weight_std=args.weight_std
            )
        warned = sum(d.decision == "kept" and d.reason.startswith("output reaches") for d in decisions)
        row = {
            "model": name, "mode": mode + (f",weight_std={args.weight_std:g}" if args.weight_std != "auto" else ""),
            "params_m": f"{params / 1e6:.1f}", "warned": warned, "error": "",
            "adders": sum(d.decision != "kept" for d in decisions),
            "kept": sum(d.decision == "kept" for d in decisions),
            "kept_reasons": _kept_reasons(decisions),
        }  # fmt: skip
        if any("consumer analysis" in str(w.message) for w in caught):
            row["error"] = "fx could not trace it: converted without the analysis"
        if params <= args.max_grad_params:
            steps = args.steps if params <= args.max_fit_params else 1
            with use_backend("cpu"):
                result = trainability.check(cnn, adder, batch, steps=steps)
                reference = trainability.check(cnn, cnn, batch, steps=steps)
            row.update(dead=" ".join(result.dead) or "-", loss_start=f"{result.loss_start:.3f}")
            if steps > 1:
                row.update(
                    loss_best=f"{result.loss_best:.3f}", loss_end=f"{result.loss_end:.3f}",
                    cnn_loss_start=f"{reference.loss_start:.3f}", cnn_loss_best=f"{reference.loss_best:.3f}",
                    learns=result.learns(),
                )  # fmt: skip
            gains = f"perturbation gain {result.gain:.3g} (CNN {result.cnn_gain:.3g})"
            print(f"# {name} {row['mode']}: {gains}", flush=True)
        row["seconds"] = f"{time.perf_counter() - start:.0f}"
        rows.append(row)
        if mode == "default" and not warned:
            break
    return rows


def _weight_std(text: str) -> str | float:
    return text if text == "auto" else float(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=("torchvision", "timm"), required=True)
    parser.add_argument("--models", help="comma-separated (default: every torchvision classifier, or TIMM_MODELS)")
    parser.add_argument("--out", type=Path, help="CSV to append to (default: results/zoo/<zoo>.csv)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--weight-std", type=_weight_std, default="auto", help='convert\'s weight_std: "auto" (default) or a number'
    )
    parser.add_argument("--max-fit-params", type=float, default=30e6)
    parser.add_argument("--max-grad-params", type=float, default=100e6)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    names, build = builders(args.zoo)
    if args.models:
        names = args.models.split(",")
    out = args.out or Path("results/zoo") / f"{args.zoo}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        with out.open() as f:
            done = {row["model"] for row in csv.DictReader(f)}
    torch.set_num_threads(args.threads)
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}")
    for name in names:
        if name in done:
            continue
        try:
            rows = measure(name, build, args)
        except Exception as error:  # noqa: BLE001 - one model's failure is a row, not the end of the sweep
            rows = [{"model": name, "mode": "default", "error": f"{type(error).__name__}: {str(error)[:200]}"}]
        new = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        for row in rows:
            print(" ".join(f"{k}={row.get(k, '')}" for k in FIELDS if row.get(k, "") != ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
