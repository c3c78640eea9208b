"""Does a converted model learn? A quick check anyone can run after `triton_adder.convert`.

Converting a CNN keeps its architecture, and an adder layer whose output (never positive with a zero bias) feeds a
ReLU or a gate gets no gradient, silently: training runs, the loss just stays where it started. `check` shows both
symptoms on one small batch: which adder layers get an all-zero weight gradient where the convolution they replaced
gets a non-zero one, and whether the model can fit the batch at all. A live model can still fit slowly when it is
chaotic: `perturbation_gain` (reported for both models) says how much a small change of the input grows through
it; deep converted networks at the published N(0, 1) adder initialisation can amplify one thousands of times where
their CNN amplifies it about ten times, which makes the loss surface too rough for a short SGD fit (see
`convert`'s weight_std, whose default "auto" widens the templates of layers that read signed inputs).

Both models run in "fit mode": normalisations in training mode (batch statistics, which is what recentres an adder
layer's output) and everything else in eval mode, so dropout and stochastic depth (torchvision's StochasticDepth,
timm's DropPath) neither drop a branch of one model and not of the other nor add noise to a fit of four images.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from triton_adder.models.consumers import NORMS
from triton_adder.nn import Adder2d
from triton_adder.optim import adaptive_lr_


@dataclasses.dataclass
class Trainability:
    losses: list[float]  # cross-entropy on the batch before each step, then once after the last step
    dead: list[str]  # adder layers with an all-zero weight gradient whose convolution's gradient is non-zero
    adders: int  # adder layers in the model
    gain: float | None = None  # perturbation_gain of the adder model on the batch, before the fit
    cnn_gain: float | None = None  # the same for the CNN

    @property
    def loss_start(self) -> float:
        return self.losses[0]

    @property
    def loss_end(self) -> float:
        return self.losses[-1]

    @property
    def loss_best(self) -> float:
        return min(self.losses)

    def learns(self, ratio: float = 0.5) -> bool:
        """No dead adder layer, and the loss fell below `ratio` times its start during the fit.

        The lowest loss, not the last: a converted network's loss surface is rougher than its CNN's (an adder
        layer is piecewise linear in its weights with a kink wherever x = w), so a fit with a fixed step size
        oscillates; a model that cannot learn (a closed gate, every layer dead) never gets there at all.
        """
        return not self.dead and self.loss_best < ratio * self.loss_start


def fit_mode(model: nn.Module) -> nn.Module:
    """Normalisations in training mode, every other module in eval mode (see the module docstring)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, NORMS):
            module.train()
    return model


@torch.no_grad()
def perturbation_gain(model: nn.Module, x: torch.Tensor, *, eps: float = 1e-4, seed: int = 0) -> float:
    """How much a small random change of the input grows through `model`, as it is (set fit mode first).

    (||f(x + d) - f(x)|| / ||f(x)||) / (||d|| / ||x||) with d = eps * rms(x) * noise, noise ~ N(0, 1) drawn from
    `seed`: 1 for a map that scales every input change like its input; a CNN with BatchNorm at random
    initialisation gives about 1 to 15; thousands mean a chaotic network, whose outputs change completely when its
    parameters move a little, so the features a classifier has just fitted keep changing under it.
    """
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    delta = (eps * x.float().pow(2).mean().sqrt() * noise).to(device=x.device, dtype=x.dtype)
    out, moved = model(x).float(), model(x + delta).float()
    return ((moved - out).norm() / out.norm() / (delta.float().norm() / x.float().norm())).item()


def _weight_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: m.weight.grad for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, Adder2d))}


def check(
    model_cnn: nn.Module,
    model_adder: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int = 40,
    lr: float = 0.005,
    momentum: float = 0.9,
    eta: float = 0.2,
) -> Trainability:
    """Dead adder layers after one backward, and the losses while fitting `batch` for `steps` steps.

    batch: (inputs, class labels); the models map inputs to logits (cross-entropy loss). Both models are copied
    (in fit mode), so the caller's are untouched. An adder layer named "a.b" (or "a.b.0", as `insert_norm` wraps
    it) is compared with the convolution "a.b" of model_cnn. The fit is SGD (lr, momentum) on every parameter with
    `triton_adder.adaptive_lr_(model, eta)` after each backward, the paper's recipe. With these defaults and
    `convert`'s, every fitted model in `results/zoo/*_auto.csv` (`benchmarks/zoo_trainability.py`) that has
    adder layers learns; at the published N(0, 1) adder initialisation (`convert(..., weight_std=1.0)`) torchvision's
    MobileNetV3-Large and timm's GhostNets do not: no dead layer, but chaotic (`gain` 4.2e3 against the CNN's
    11.5 for MobileNetV3-Large) and slow to fit. `gain` and `cnn_gain` are `perturbation_gain` of the two models
    on the batch before the fit.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    x, y = batch
    cnn, adder = fit_mode(copy.deepcopy(model_cnn)), fit_mode(copy.deepcopy(model_adder))
    gains = perturbation_gain(adder, x), perturbation_gain(cnn, x)
    cnn_grads, adder_grads = _weight_grads(cnn, x, y), _weight_grads(adder, x, y)
    dead = []
    for name, module in adder.named_modules():
        if not isinstance(module, Adder2d):
            continue
        original = cnn_grads.get(name, cnn_grads.get(name.removesuffix(".0")))
        grad = adder_grads[name]
        if original is not None and original.abs().sum() > 0 and (grad is None or not grad.abs().sum() > 0):
            dead.append(name)
    optimizer = torch.optim.SGD(adder.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(adder(x), y)
        loss.backward()
        adaptive_lr_(adder, eta)
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(nn.functional.cross_entropy(adder(x), y).item())
    return Trainability(losses, dead, sum(isinstance(m, Adder2d) for m in adder.modules()), *gains)
