"""Per-epoch training checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors, numbers, strings and containers of them (the model, optimizer,
GradScaler and LR-schedule state dicts, the RNG states as uint8 tensors, the epoch and step), so
loading it cannot run code. It is written to a temporary file in the same directory and renamed over
the old one (`os.replace`), so a kill at any moment leaves either the previous or the new checkpoint,
never half of one. The loop draws no numpy or Python `random` numbers, so only torch's generators
are kept.

A checkpoint also records, under "run", what it belongs to (model, AdderNet or CNN, gradient mode, data,
the settings that fix the trajectory), and `load(path, run)` refuses one recorded for another run, or a
damaged one, with a one-line `CheckpointError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, damaged, foreign, or another run's. One line, naming the file."""


# What a checkpoint must hold, and of which type, for `loop.fit` to resume from it.
FIELDS = {"model": dict, "optimizer": dict, "schedule": dict, "scaler": dict, "rng": dict, "epoch": int,
          "step": int, "curve": list, "run": dict}  # fmt: skip


def one_line(error: BaseException, limit: int = 200) -> str:
    """`error` as "Type: message" on one line (torch's messages span several), cut to `limit` characters."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return type(error).__name__ + (f": {message[:limit]}" if message else "")


def rng_state() -> dict:
    """torch's CPU generator and, if CUDA is initialised, every GPU's, as uint8 tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically (temporary file in the same directory, then `os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, run: dict | None = None) -> dict:
    """The checkpoint at `path`, on the CPU, tensors and plain values only (``weights_only=True``).

    run: the record of the run about to resume (`train.train` builds it); any difference from the one in the
    checkpoint raises `CheckpointError`, as does a file that is missing, damaged or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # A truncated, empty or foreign file fails inside torch or pickle with almost any exception type
        # (EOFError, RuntimeError, UnpicklingError, IndexError, ...): any failure here means "not readable".
        # The UnpicklingError's text advises weights_only=False, i.e. running the file's code: not repeated.
        reason = (f"{type(error).__name__}: not a pickle of tensors and plain values"
                  if isinstance(error, pickle.UnpicklingError) else one_line(error))  # fmt: skip
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint ({reason})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint")
    if "run" not in state and "model" in state:
        # Refused rather than matched by state-dict keys and shapes: an AdderNet and its CNN twin (and the two
        # gradient modes) have identical keys and shapes, so that check would accept exactly the wrong resumes.
        raise CheckpointError(f"checkpoint {path} was written by an older version, which did not record its run; "
                              "it cannot be checked, so start over (--overwrite)")  # fmt: skip
    missing = [key for key in FIELDS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a training checkpoint")
    wrong = [f"{key} is {type(state[key]).__name__}, not {kind.__name__}" for key, kind in FIELDS.items()
             if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool))]  # fmt: skip
    if not wrong and (len(state["curve"]) != state["epoch"] or not all(isinstance(r, dict) for r in state["curve"])):
        wrong = [f"its curve has {len(state['curve'])} rows for {state['epoch']} epochs"]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is malformed: {'; '.join(wrong)}")
    if run is not None and state["run"] != run:
        recorded = state["run"]
        differences = [f"{key}: checkpoint {recorded.get(key)!r}, now {run.get(key)!r}"
                       for key in sorted(set(run) | set(recorded)) if recorded.get(key) != run.get(key)]  # fmt: skip
        raise CheckpointError(f"checkpoint {path} belongs to another run ({'; '.join(differences)}); resume it "
                              "with its own settings, or start over (--overwrite)")  # fmt: skip
    return state
