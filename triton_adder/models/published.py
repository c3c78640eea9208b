"""Loading checkpoints saved by the published AdderNet code (github.com/huawei-noah/AdderNet).

The published adder layer (`adder.adder2d`) names its weight ``adder`` and its optional bias
``b``; our `Adder2d` names them ``weight`` and ``bias`` (as `nn.Conv2d` does). The published
training and test scripts wrap the model in `nn.DataParallel`, so every key also starts with
``module.``. Everything else (BatchNorm, the multiplicative stem and classifier) already carries
the same names in our models (see `triton_adder.models.resnet`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from triton_adder.nn import Adder2d

PUBLISHED_PARAMETER_NAMES = {"adder": "weight", "b": "bias"}


def from_published_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict:
    """The published-format `state_dict` renamed for `model`.

    Drops a ``module.`` prefix that every key carries (`nn.DataParallel`), then renames
    ``<prefix>.adder`` -> ``<prefix>.weight`` and ``<prefix>.b`` -> ``<prefix>.bias`` where
    ``<prefix>`` is an `Adder2d` of `model` (only there: a ``b`` elsewhere is someone else's
    parameter). Other keys pass through unchanged.
    """
    keys = list(state_dict)
    strip = "module." if keys and all(key.startswith("module.") for key in keys) else ""
    adder_names = {name for name, module in model.named_modules() if isinstance(module, Adder2d)}
    renamed = OrderedDict()
    for key, value in state_dict.items():
        key = key[len(strip) :]
        prefix, _, leaf = key.rpartition(".")
        if prefix in adder_names and leaf in PUBLISHED_PARAMETER_NAMES:
            key = f"{prefix}.{PUBLISHED_PARAMETER_NAMES[leaf]}"
        renamed[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # Per-module version records (BatchNorm uses them for num_batches_tracked); same prefixes.
        renamed._metadata = OrderedDict(
            (name[len(strip) :] if name.startswith(strip) else name, record) for name, record in metadata.items()
        )
    return renamed


def load_published(model: nn.Module, checkpoint, strict: bool = True):
    """Load a published-format AdderNet checkpoint into `model`; returns `load_state_dict`'s result.

    checkpoint: a path to a file saved with `torch.save` (loaded on the CPU with
    ``weights_only=True``), or a state dict (a mapping of names to tensors, optionally nested
    under a ``"state_dict"`` key). For example, the published ResNet-20 CIFAR-10 checkpoint::

        model = triton_adder.models.build("resnet20", adder=True, num_classes=10)
        load_published(model, "ResNet20-AdderNet.pth")
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a state dict mapping, got {type(checkpoint).__name__}")
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    return model.load_state_dict(from_published_state_dict(checkpoint, model), strict=strict)
