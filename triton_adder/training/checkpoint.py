"""Per-epoch training checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors, numbers, strings and containers of them (the model, optimizer,
GradScaler and LR-schedule state dicts, the RNG states as uint8 tensors, the epoch and step), so
loading it cannot run code. It is written to a temporary file in the same directory and renamed over
the old one (`os.replace`), so a kill at any moment leaves either the previous or the new checkpoint,
never half of one. The loop draws no numpy or Python `random` numbers, so only torch's generators
are kept.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


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


def load(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`, on the CPU, tensors and plain values only (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
