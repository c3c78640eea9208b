"""Shared argparse checks for the command lines (train, bench, tune, benchmarks/).

Every numeric option goes through one of the `type=` helpers below, so a bad value (0 batches, a
negative subset, a NaN learning rate) is argparse's one-line usage error naming the option, with
exit status 2, before any work, instead of a traceback or a silently wrong run. `check_writable`
does the same for output folders before a long run, rather than failing after it.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

__all__ = ["check_writable", "nonnegative_finite_float", "nonnegative_int", "positive_finite_float", "positive_int"]


def _int(text: str, minimum: int, accepted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
    return value


def _float(text: str, positive: bool, accepted: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
    # float() accepts "nan" and "inf"; neither is a usable rate, budget or coefficient.
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, threads)."""
    return _int(text, 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (seeds, workers, pixel shifts)."""
    return _int(text, 0, "an integer >= 0")


def positive_finite_float(text: str) -> float:
    """A finite number > 0 (learning rates, time budgets)."""
    return _float(text, True, "a finite number > 0")


def nonnegative_finite_float(text: str) -> float:
    """A finite number >= 0 (momentum, weight decay)."""
    return _float(text, False, "a finite number >= 0")


def check_writable(parser: argparse.ArgumentParser, option: str, folder: str | os.PathLike) -> None:
    """Create `folder` and write and delete a probe file in it, or exit through `parser.error` naming the
    option and the path. Run before the work, so an unwritable output fails in seconds, not after a
    benchmark or a training run. The probe's name is unique: torchrun's ranks may probe at once."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except FileExistsError as error:  # mkdir's answer when a file stands where a folder must be
        parser.error(f"{option}: cannot create folder {str(folder)!r}: {str(error.filename)!r} is not a folder")
    except OSError as error:
        parser.error(f"{option}: cannot write to folder {str(folder)!r} ({error.strerror or error})")
