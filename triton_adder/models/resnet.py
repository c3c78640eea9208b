"""ResNets with the published AdderNet topology and module names (github.com/huawei-noah/AdderNet).

Module names match the published resnet20.py / resnet50.py (conv1, bn1, layerK.B.convJ,
layerK.B.downsample.0, fc, bn2), so the published checkpoints load after only the adder layer's
parameter names are mapped (see `triton_adder.models.published`). As published, the classifier is
a 1x1 convolution followed by BatchNorm over the logits.

- CIFAR (He et al. 2016, section 4.2): 3x3 stem with 16 channels, three stages of 16/32/64
  channels, 6n+2 layers: ResNet-20 (n=3), ResNet-32 (n=5).
- ImageNet: 7x7/2 stem + 3x3/2 max-pool, four stages of 64..512 channels: ResNet-18 (basic
  blocks 2-2-2-2), ResNet-50 (bottlenecks 3-4-6-3).
"""

from __future__ import annotations

import torch
from torch import nn

from triton_adder.models.layers import ConvFactory, init_multiplicative_


class BasicBlock(nn.Module):
    """Two 3x3 layers with a residual connection; (N, inplanes, H, W) -> (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, hidden_conv: ConvFactory, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = hidden_conv(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = hidden_conv(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with a residual; (N, inplanes, H, W) -> (N, 4*planes, H/stride, W/stride)."""

    expansion = 4

    def __init__(self, hidden_conv: ConvFactory, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = hidden_conv(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = hidden_conv(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = hidden_conv(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Input (N, in_channels, H, W) -> logits (N, num_classes).

    stem="cifar": 3x3/1 conv, stage widths 16, 32, 64. stem="imagenet": 7x7/2 conv + 3x3/2
    max-pool, widths 64, 128, 256, 512. `layers` gives the blocks per stage (one entry per
    width). The stem conv and the classifier `fc` are `nn.Conv2d`; `hidden_conv` builds the rest.
    """

    def __init__(
        self,
        hidden_conv: ConvFactory,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        stem: str = "cifar",
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_bias: bool = False,
    ):
        super().__init__()
        if stem == "cifar":
            widths, self.inplanes = (16, 32, 64), 16
            self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            widths, self.inplanes = (64, 128, 256, 512), 64
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if len(layers) != len(widths):
            raise ValueError(f"layers must have {len(widths)} entries for stem={stem!r}, got {layers!r}")
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        for index, (width, blocks) in enumerate(zip(widths, layers)):
            stage = self._make_stage(hidden_conv, block, width, blocks, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
        self.stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(widths[-1] * block.expansion, num_classes, kernel_size=1, bias=classifier_bias)
        self.bn2 = nn.BatchNorm2d(num_classes)
        init_multiplicative_(self)

    def _make_stage(self, hidden_conv, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # The published shortcut: a 1x1 (adder, in the AdderNet) projection + BatchNorm.
            downsample = nn.Sequential(
                hidden_conv(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(hidden_conv, self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(hidden_conv, self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.bn2(self.fc(self.avgpool(x))).flatten(1)
