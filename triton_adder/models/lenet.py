"""LeNet-5-BN, the paper's MNIST network (arXiv 1912.13200, section 4.1).

LeNet-5 (LeCun et al. 1998) with BatchNorm after every layer. C5 of LeNet-5 is a 5x5
convolution over a 5x5 map and F6 a fully connected layer; both are written as convolutions here
(5x5 and 1x1), so the AdderNet variant turns every layer except the first convolution and the
classifier into an adder layer, the same rule as the published ResNets.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_adder.models.layers import ConvFactory, init_multiplicative_


class LeNet5BN(nn.Module):
    """Input (N, in_channels, 28, 28) -> logits (N, num_classes).

    conv1 5x5/pad 2 (multiplicative) -> 28x28, max-pool -> 14x14; conv2 5x5 -> 10x10, max-pool
    -> 5x5; conv3 5x5 -> 1x1 (C5, 120 channels); conv4 1x1 (F6, 84 channels); fc 1x1 (the
    multiplicative classifier); each followed by BatchNorm, ReLU after all but the last.
    """

    def __init__(self, hidden_conv: ConvFactory, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = hidden_conv(6, 16, kernel_size=5, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = hidden_conv(16, 120, kernel_size=5, bias=False)
        self.bn3 = nn.BatchNorm2d(120)
        self.conv4 = hidden_conv(120, 84, kernel_size=1, bias=False)
        self.bn4 = nn.BatchNorm2d(84)
        self.fc = nn.Conv2d(84, num_classes, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(num_classes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        init_multiplicative_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        x = _check_one_by_one(self.relu(self.bn4(self.conv4(x))))
        return self.bn5(self.fc(x)).flatten(1)


@torch.fx.wrap  # a leaf for torch.fx (convert's trace): a shape test cannot be traced symbolically
def _check_one_by_one(x: torch.Tensor) -> torch.Tensor:
    """x unchanged if its map is 1x1; otherwise flatten(1) would silently return Cout*H*W "logits" per image."""
    if x.shape[-2:] != (1, 1):
        h, w = x.shape[-2:]
        raise ValueError(f"LeNet-5-BN needs 28x28 inputs (1x1 before the classifier); this input gave {h}x{w}")
    return x
