"""adaptive_lr_ (paper eq. 7-8): equal to the published in-backward scaling in one process, and
equal to the single-process full-batch update under DistributedDataParallel (2 gloo processes)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from triton_adder import Adder2d, backends
from triton_adder.geometry import Conv2dGeometry
from triton_adder.optim import PUBLISHED_ETA, adaptive_lr_, adder_weights
from triton_adder.reference import adder2d_backward, adder2d_forward

BATCH, WORLD = 6, 2


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    # Tiny layers: the CPU path's eager mode skips per-shape compilation and gives the same numbers.
    monkeypatch.setenv("TRITON_ADDER_CPU_COMPILE", "0")


class PublishedAdderFunction(torch.autograd.Function):
    """The published adder.py's behaviour: eq. 5-6 gradients, and the weight gradient rescaled to
    eta * sqrt(numel) / ||dW||_2 * dW INSIDE backward (written here from the paper, on the reference)."""

    @staticmethod
    def forward(ctx, x, weight, geom):
        ctx.save_for_backward(x, weight)
        ctx.geom = geom
        return adder2d_forward(x, weight, None, geom)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = adder2d_backward(grad_out, x, weight, ctx.geom, "paper")
        grad_w = grad_w / grad_w.norm(p=2).clamp(min=1e-12) * math.sqrt(weight.numel()) * PUBLISHED_ETA
        return grad_x, grad_w, None


class PublishedAdder(nn.Module):
    def __init__(self, layer: Adder2d, out_size):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.geom = Conv2dGeometry(layer.stride, layer.padding, (1, 1), 1, out_size)

    def forward(self, x):
        return PublishedAdderFunction.apply(x, self.weight, self.geom)


class SmallNet(nn.Module):
    """conv -> BN -> adder (odd shape, stride 2) -> BN -> adder 1x1 -> pooled linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.adder1 = Adder2d(5, 3, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.adder2 = Adder2d(3, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.adder1(torch.relu(self.bn1(self.conv(x))))))
        return self.head(self.adder2(x).mean((2, 3)))


def published_copy(model: SmallNet, out_sizes) -> SmallNet:
    published = copy.deepcopy(model)
    published.adder1 = PublishedAdder(model.adder1, out_sizes[0])
    published.adder2 = PublishedAdder(model.adder2, out_sizes[1])
    return published


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def test_matches_published_in_backward_scaling():
    torch.manual_seed(0)
    ours = SmallNet().double()
    published = published_copy(ours, [(4, 3), (4, 3)])
    x, target = torch.randn(BATCH, 2, 7, 5, dtype=torch.float64), torch.randint(0, 3, (BATCH,))
    optimizers = sgd(ours), sgd(published)
    for _ in range(3):  # several steps, so momentum and weight decay see the scaled gradients
        for model, optimizer in zip((ours, published), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
        unscaled = [ours.adder1.weight.grad.norm(), ours.adder2.weight.grad.norm()]
        other_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if "adder" not in n}
        norms = adaptive_lr_(ours)
        torch.testing.assert_close(norms, torch.stack(unscaled).float())
        for name, param in published.named_parameters():
            torch.testing.assert_close(ours.get_parameter(name).grad, param.grad, msg=name)
        for name, grad in other_grads.items():
            assert torch.equal(ours.get_parameter(name).grad, grad), f"{name} is not an adder weight"
        for optimizer in optimizers:
            optimizer.step()
    for name, param in published.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name), param, msg=name)


def test_scaled_norm_and_loss_scale_invariance():
    """Every scaled gradient has norm eta*sqrt(numel), whatever the loss scale (AMP) was."""
    torch.manual_seed(1)
    model = SmallNet()
    x, target = torch.randn(BATCH, 2, 6, 6), torch.randint(0, 3, (BATCH,))
    results = []
    for loss_scale in (1.0, 1024.0):
        model.zero_grad()
        (loss_scale * nn.functional.cross_entropy(model(x), target)).backward()
        adaptive_lr_(model, eta=0.3)
        results.append([w.grad.clone() for w in adder_weights(model)])
    for weight, grad in zip(adder_weights(model), results[0]):
        torch.testing.assert_close(grad.norm(), torch.tensor(0.3 * math.sqrt(weight.numel())))
    for small, large in zip(*results):
        torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-6)


def test_accepts_parameters_and_skips_missing_gradients():
    weight = nn.Parameter(torch.zeros(4, 2, 3, 3))
    idle = nn.Parameter(torch.zeros(3))
    weight.grad = torch.full_like(weight, 1e-3)
    norms = adaptive_lr_([weight, idle])
    assert norms.shape == (1,) and idle.grad is None
    torch.testing.assert_close(weight.grad, torch.full_like(weight, PUBLISHED_ETA))
    tiny = nn.Parameter(torch.zeros(5))
    tiny.grad = torch.zeros(5)  # norm below 1e-12: clamped, no NaN
    adaptive_lr_(tiny)
    assert torch.equal(tiny.grad, torch.zeros(5))
    assert adaptive_lr_(nn.Linear(2, 2)).numel() == 0


@pytest.mark.parametrize("eta", [0, -0.2, float("nan"), True, "0.2"])
def test_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a positive finite number"):
        adaptive_lr_(SmallNet(), eta=eta)


def test_rejects_sparse_gradients():
    weight = nn.Parameter(torch.zeros(3, 3))
    weight.grad = torch.eye(3).to_sparse()
    with pytest.raises(ValueError, match="dense gradients"):
        adaptive_lr_([weight])


def _data():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * BATCH, 2, 7, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (WORLD * BATCH,), generator=generator)


class NoBatchNormNet(nn.Module):
    """Without BatchNorm a shard's loss mean averages to the full batch's, so the DDP all-reduce of
    the shards' gradients is exactly the full-batch gradient."""

    def __init__(self):
        super().__init__()
        self.adder1 = Adder2d(2, 4, 3, stride=2, padding=1)
        self.adder2 = Adder2d(4, 3, 1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.adder2(torch.tanh(self.adder1(x) / 10))).mean((2, 3)))


def _initial_model():
    torch.manual_seed(3)
    return NoBatchNormNet().double()


def _ddp_worker(rank: int, rendezvous: str, out_dir: str):
    os.environ["TRITON_ADDER_CPU_COMPILE"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        with backends.use_backend("cpu"):
            model = nn.parallel.DistributedDataParallel(_initial_model())
            optimizer = sgd(model)
            x, target = _data()
            shard = slice(rank * BATCH, (rank + 1) * BATCH)
            for _ in range(2):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[shard]), target[shard]).backward()  # all-reduce (mean)
                adaptive_lr_(model)
                optimizer.step()
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_update_equals_single_process_full_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    model, (x, target) = _initial_model(), _data()
    optimizer = sgd(model)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        adaptive_lr_(model)
        optimizer.step()
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(state[name], value, msg=f"rank {rank}: {name}")


def test_per_shard_scaling_differs_from_full_batch():
    """Why the scaling runs after the all-reduce: normalising each shard's gradient (what the
    published in-backward scaling does under data parallelism) gives another update."""
    model, (x, target) = _initial_model(), _data()
    nn.functional.cross_entropy(model(x), target).backward()
    adaptive_lr_(model)
    full_batch = model.adder1.weight.grad.clone()
    per_shard = torch.zeros_like(full_batch)
    for rank in range(WORLD):
        model.zero_grad()
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        nn.functional.cross_entropy(model(x[shard]), target[shard]).backward()
        adaptive_lr_(model)
        per_shard += model.adder1.weight.grad / WORLD
    assert (per_shard - full_batch).norm() > 1e-3 * full_batch.norm()
