"""The training loop behind `python -m triton_adder.train`: one process, or one of W under torchrun.

Each step (the order `optim.adaptive_lr_` is designed for)::

    with autocast: loss = cross_entropy(model(x), y)
    scaler.scale(loss).backward()      # DDP all-reduces the gradients here
    scaler.unscale_(optimizer)         # GradScaler (fp16) only; a no-op otherwise
    adaptive_lr_(model, eta)           # paper eq. 7-8 on the synchronised, unscaled gradients
    scaler.step(optimizer); scaler.update(); schedule.step()

The learning rate follows a cosine from `lr` to 0 over epochs * steps, updated every step. After each
epoch rank 0 writes RUN.csv and the checkpoint (`checkpoint.py`); `resume_from` restarts from the
checkpoint's last completed epoch, and since the data order and augmentation are functions of
(seed, epoch) (`datasets.py`) the resumed run repeats what the killed one would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from triton_adder.optim import adaptive_lr_
from triton_adder.training import checkpoint, distributed

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Settings:
    """What the loop needs besides the model and data (the CLI fills it from a recipe and flags)."""

    epochs: int
    batch_size: int  # global; each of W processes takes batch_size // W
    lr: float
    momentum: float
    weight_decay: float
    eta: float | None  # None: no adaptive learning rate
    amp: str = "off"
    channels_last: bool = False


def autocast_for(device: torch.device, amp: str):
    """The autocast context of `amp` ("off", "fp16", "bf16") on `device`."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def per_rank_batch(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size})")
    return batch_size // world_size


@torch.no_grad()
def evaluate(model: nn.Module, dataset, context, settings: Settings, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy %) over the held-out split, shared across the processes."""
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for images, labels in dataset.batches(0, context.rank, context.world_size, batch_size, train=False):
        images, labels = to_device(images, labels, context.device, settings.channels_last)
        with autocast_for(context.device, settings.amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    loss_sum, correct, count = distributed.sum_across(context, [loss_sum, correct, count])
    return loss_sum / count, 100.0 * correct / count


def to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def fit(
    model: nn.Module,
    dataset,
    settings: Settings,
    context: distributed.Context,
    checkpoint_path: Path | None = None,
    resume_from: dict | None = None,
    run: dict | None = None,
    on_epoch=None,
    progress=None,
) -> tuple[nn.Module, list[dict]]:
    """Train `model` (on `context.device`) on `dataset` (a `datasets.TensorData`/`FolderData`).

    checkpoint_path: written by rank 0 after every epoch (None: no checkpoints), recording `run` (what the
    checkpoint belongs to, `checkpoint.load` checks it); resume_from: a checkpoint (`checkpoint.load`) to start from.
    on_epoch(curve): called on rank 0 after each epoch with the rows so far. progress(total, description):
    a bar factory (`EpochProgress`) used on rank 0, or None. Returns (the trained module, unwrapped from
    DDP; the per-epoch rows).
    """
    device = context.device
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    local_batch = per_rank_batch(settings.batch_size, context.world_size)
    steps = dataset.steps(context.world_size, local_batch)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    start_epoch, curve = 1, []
    if resume_from is not None:
        state = resume_from
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler"])
            checkpoint.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            # Its run record matched but its contents do not fit this model (edited or corrupted tensors).
            message = f"checkpoint {checkpoint_path} does not fit this model ({checkpoint.one_line(error)})"
            raise checkpoint.CheckpointError(message) from error
        start_epoch, curve = state["epoch"] + 1, list(state["curve"])
    trained = model
    if context.distributed:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    started = time.perf_counter() - (curve[-1]["elapsed_s"] if curve else 0.0)
    for epoch in range(start_epoch, settings.epochs + 1):
        trained.train()
        bar = progress(steps, f"epoch {epoch}/{settings.epochs}") if progress and context.main else None
        loss_sum, correct, seen = 0.0, 0.0, 0.0
        epoch_lr = optimizer.param_groups[0]["lr"]
        for images, labels in dataset.batches(epoch, context.rank, context.world_size, local_batch):
            images, labels = to_device(images, labels, device, settings.channels_last)
            with autocast_for(device, settings.amp):
                logits = trained(images)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if settings.eta is not None:
                adaptive_lr_(model, eta=settings.eta)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            if bar is not None:
                bar.update(f"loss {loss_sum / seen:.4f} acc {100.0 * correct / seen:.2f}%")
        loss_sum, correct, seen = distributed.sum_across(context, [loss_sum, correct, seen])
        held_out_loss, held_out_accuracy = evaluate(model, dataset, context, settings)
        row = {
            "epoch": epoch,
            "lr": epoch_lr,
            "train_loss": loss_sum / seen,
            "train_accuracy": 100.0 * correct / seen,
            "held_out_loss": held_out_loss,
            "held_out_accuracy": held_out_accuracy,
            "elapsed_s": time.perf_counter() - started,
        }
        curve.append(row)
        if context.main:
            if checkpoint_path is not None:
                checkpoint.save(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                    "rng": checkpoint.rng_state(), "epoch": epoch, "step": epoch * steps, "curve": curve,
                    "run": run or {},
                })  # fmt: skip
            if on_epoch is not None:
                on_epoch(curve)
            if bar is not None:
                bar.close(
                    f"loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2f}% | "
                    f"held-out loss {held_out_loss:.4f} acc {held_out_accuracy:.2f}%"
                )
        distributed.barrier(context)
    return model, curve
