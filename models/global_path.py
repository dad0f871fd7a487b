"""LCNN's global path: a ResNeXt50 (32x4d) trunk trained from scratch.

The ``2T+1`` slices enter as channels. The trunk is the standard ResNeXt50 32x4d
(stem 7x7/2 + max-pool, bottleneck stages [3, 4, 6, 3] with 32 groups of width 4 at
the first stage, outputs 256/512/1024/2048 channels, stride 32), written here with
plain torch so that nothing is downloaded. With 3 input channels the trunk has
exactly the parameters of torchvision's ``resnext50_32x4d`` without its ``fc`` layer
(22,979,904); each further input channel adds ``64 * 7 * 7`` weights.
A light head (1x1 convs) predicts logits at stride 32, upsampled bilinearly to H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["GlobalPath", "ResNeXtBottleneck", "ResNeXtTrunk"]

RESNEXT50_LAYERS = (3, 4, 6, 3)


class ResNeXtBottleneck(nn.Module):
    """Grouped bottleneck: 1x1 -> grouped 3x3 (stride) -> 1x1 (x4), plus shortcut.

    Args:
        in_ch: input channels.
        planes: bottleneck planes; the block outputs ``4 * planes`` channels.
        stride: stride of the grouped 3x3 conv.
        groups: cardinality (32).
        base_width: width per group at ``planes == 64`` (4).
    """

    expansion = 4

    def __init__(
        self, in_ch: int, planes: int, stride: int = 1, groups: int = 32, base_width: int = 4
    ) -> None:
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block.

        Args:
            x: ``(B, in_ch, h, w)``.

        Returns:
            ``(B, 4 * planes, h / stride, w / stride)``.
        """
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXtTrunk(nn.Module):
    """ResNeXt trunk (stem + four stages), no classifier.

    Args:
        in_channels: input channels (the slices).
        layers: blocks per stage; ``(3, 4, 6, 3)`` is ResNeXt50.
        checkpointing: recompute each stage in the backward pass to save memory.
    """

    def __init__(
        self,
        in_channels: int,
        layers: tuple[int, ...] = RESNEXT50_LAYERS,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        in_ch = 64
        for index, num_blocks in enumerate(layers):
            planes = 64 * 2**index
            blocks = []
            for block_index in range(num_blocks):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(ResNeXtBottleneck(in_ch, planes, stride))
                in_ch = planes * ResNeXtBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = in_ch
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes stride-32 features.

        Args:
            x: ``(B, in_channels, H, W)``.

        Returns:
            ``(B, out_channels, H / 32, W / 32)``.
        """
        x = self.stem(x)
        for stage in self.stages:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x


class GlobalPath(nn.Module):
    """ResNeXt50 trunk over the stacked slices + a 1x1 head, logits upsampled to H x W.

    Args:
        in_slices: slices per stack (input channels).
        num_classes: output channels.
        head_channels: channels of the head's hidden 1x1 conv.
        checkpointing: recompute trunk stages in the backward pass.
    """

    required_multiple = 32

    def __init__(
        self,
        in_slices: int = 5,
        num_classes: int = 2,
        head_channels: int = 256,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.trunk = ResNeXtTrunk(in_slices, checkpointing=checkpointing)
        self.head = nn.Sequential(
            nn.Conv2d(self.trunk.out_channels, head_channels, 1, bias=False),
            nn.BatchNorm2d(head_channels),
            nn.ReLU(),
            nn.Conv2d(head_channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits for the centre slice from the whole stack.

        Args:
            x: ``(B, in_slices, H, W)``; H and W multiples of 32.

        Returns:
            ``(B, num_classes, H, W)`` logits.
        """
        logits = self.head(self.trunk(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
