"""Data parallelism on torch.distributed: `python -m torch.distributed.run` (torchrun) sets the environment.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) `setup` joins the process group, gloo on the CPU and
NCCL on CUDA (process LOCAL_RANK takes GPU LOCAL_RANK); without it the run is one process (world size 1)
and nothing here touches torch.distributed.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def setup(device: str | None = None) -> Context:
    """The process's Context; joins the process group under torchrun.

    device: "cpu", "cuda" or None (CUDA when available). Under torchrun with CUDA, GPU LOCAL_RANK.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(rank, world_size, local_rank, target)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(context: Context, values: list[float]) -> list[float]:
    """`values` summed over all processes (themselves when alone), float64."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(context: Context, value) -> list:
    """[value of rank 0, value of rank 1, ...] in every process (picklable values; `[value]` when alone)."""
    if not context.distributed:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
