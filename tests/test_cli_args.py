"""The CLIs (train, bench, tune) reject bad numbers and unwritable output folders before any work.

Each bad case must be argparse's usage error: exit status 2, the option named on stderr, no traceback.
The valid arguments around each bad one keep a run short, should the check ever be skipped.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_adder import bench, train, tune
from triton_adder.cli_args import (
    check_writable,
    nonnegative_finite_float,
    nonnegative_int,
    positive_finite_float,
    positive_int,
)


def assert_usage_error(capsys, call, option: str) -> str:
    """Run `call`; check argparse's usage error (exit 2, no traceback) names `option`; return its error line."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    # The error line itself must name the option: the usage lines above it name every option.
    error_line = err.strip().splitlines()[-1]
    assert ": error: " in error_line and option in error_line and "Traceback" not in err, err
    return error_line


def a_path_under_a_file(tmp_path):
    """A folder that cannot be created even by root (chmod does not stop root): its parent is a file."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "sub"


@pytest.mark.parametrize(("option", "value"), [
    ("--batch-size", "0"), ("--batch-size", "-5"), ("--train-subset", "0"), ("--train-subset", "-3"),
    ("--threads", "0"), ("--epochs", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.1"),
    ("--eta", "nan"), ("--momentum", "nan"), ("--momentum", "-0.5"), ("--weight-decay", "-1"),
    ("--weight-decay", "inf"), ("--max-shift", "-1"), ("--seed", "-1"), ("--workers", "-1"),
])  # fmt: skip
def test_train_rejects_bad_numbers(option, value, tmp_path, capsys):
    argv = ["--cnn", "--epochs", "1", "--train-subset", "16", "--batch-size", "16", "--no-progress",
            "--output-dir", str(tmp_path)]  # fmt: skip
    err = assert_usage_error(capsys, lambda: train.main([*argv, option, value]), option)
    assert "expected" in err  # what is accepted


@pytest.mark.parametrize("figures", [False, True])
def test_train_rejects_an_unwritable_output_dir_before_training(figures, tmp_path, capsys):
    target = a_path_under_a_file(tmp_path)
    argv = ["--cnn", "--epochs", "1", "--train-subset", "16", "--batch-size", "16", "--no-progress",
            "--output-dir", str(target)] + (["--figures"] if figures else [])  # fmt: skip
    err = assert_usage_error(capsys, lambda: train.main(argv), "--output-dir")
    assert str(target) in err


@pytest.mark.parametrize(("option", "value"), [
    ("--max-layers", "0"), ("--max-layers", "-1"), ("--batch-size", "0"), ("--batch-size", "-2"),
    ("--batch-size", "two"),
])  # fmt: skip
def test_bench_rejects_bad_numbers(option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    argv = ["--model", "lenet5bn", "--backend", "cpu", "--quick", "--max-layers", "1", "--out", str(tmp_path)]
    assert_usage_error(capsys, lambda: bench.main([*argv, option, value]), option)


def test_bench_rejects_an_unwritable_out_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    target = a_path_under_a_file(tmp_path)
    argv = ["--model", "lenet5bn", "--backend", "cpu", "--quick", "--max-layers", "1", "--out", str(target)]
    err = assert_usage_error(capsys, lambda: bench.main(argv), "--out")
    assert str(target) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_triton_backend_without_cuda_or_interpreter_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    argv = ["--model", "lenet5bn", "--backend", "triton", "--quick", "--max-layers", "1", "--out", str(tmp_path)]
    err = assert_usage_error(capsys, lambda: bench.main(argv), "--backend triton")
    assert "TRITON_INTERPRET" in err


@pytest.mark.parametrize(("option", "value"), [
    ("--budget-s", "nan"), ("--budget-s", "inf"), ("--budget-s", "0"), ("--budget-s", "-1"),
    ("--batch-size", "0"), ("--batch-size", "-1"),
])  # fmt: skip
def test_tune_rejects_bad_numbers(option, value, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU-path report only, should the check be skipped
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    argv = ["--model", "lenet5bn", "--quick", "--cache-dir", str(cache_dir), "--report", str(tmp_path / "report")]
    err = assert_usage_error(capsys, lambda: tune.main([*argv, option, value]), option)
    assert "expected" in err or "must be" in err


@pytest.mark.parametrize("name", ["sub", "report.html"])
def test_tune_rejects_an_unwritable_report_before_tuning(name, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")
    target = a_path_under_a_file(tmp_path)
    argv = ["--model", "lenet5bn", "--quick", "--cache-dir", str(cache_dir), "--report", str(target / name)]
    err = assert_usage_error(capsys, lambda: tune.main(argv), "--report")
    assert str(target) in err


@pytest.mark.parametrize(("parse", "good", "bad"), [
    (positive_int, {"1": 1, "64": 64}, ["0", "-1", "1.5", "x", ""]),
    (nonnegative_int, {"0": 0, "3": 3}, ["-1", "nan", "x"]),
    (positive_finite_float, {"0.1": 0.1, "2": 2.0}, ["0", "-0.1", "nan", "inf", "-inf", "x"]),
    (nonnegative_finite_float, {"0": 0.0, "0.9": 0.9}, ["-0.1", "nan", "inf", "x"]),
])  # fmt: skip
def test_type_helpers(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            parse(text)


def test_check_writable_creates_the_folder_and_leaves_no_probe(tmp_path):
    folder = tmp_path / "a" / "b"
    check_writable(argparse.ArgumentParser(), "--out", folder)
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.parametrize(("script", "option", "value"), [
    ("cpu_symbolic_ab.py", "--pairs", "0"), ("cpu_vs_conv2d.py", "--repeats", "-1"),
    ("prune_space.py", "--max-seconds", "nan"), ("sass_screen.py", "--warps", "0"),
    ("train_step.py", "--ranks", "-1"), ("wide_conv.py", "--threads", "0"),
])  # fmt: skip
def test_benchmark_scripts_reject_bad_numbers(script, option, value):
    """The user-facing scripts in benchmarks/ share the helpers (run as a user runs them: not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), option, value], capture_output=True, text=True, timeout=300)
    error_line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and option in error_line and "expected" in error_line, done.stderr
    assert "Traceback" not in done.stderr
