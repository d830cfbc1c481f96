"""The CIFAR ResNets of He et al. (2016), depth ``6n + 2``: ResNet-20, -32, -44, -56, -110."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CIFARResNet", "InputNormalization"]


class InputNormalization(nn.Module):
    """Normalise inputs per channel inside the network: ``(x - mean) / std``.

    Randomized smoothing adds its noise in pixel space, so the smoothed classifier's network must normalise
    internally (Cohen et al., 2019); feed it un-normalised ``[0, 1]`` images.

    Args:
        mean: Per-channel mean.
        std: Per-channel standard deviation.

    Example:
        >>> norm = InputNormalization([0.5], [0.25])
        >>> norm(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Expected `mean` and `std` of equal length, got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Expected `std` to be positive, got {list(std)}")
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Return the normalised inputs."""
        return (x - self.mean) / self.std


def input_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """``InputNormalization(mean, std)``, or the identity when both are ``None``."""
    if (mean is None) != (std is None):
        raise ValueError(f"Expected `mean` and `std` both set or both None, got {mean!r} and {std!r}")
    return nn.Identity() if mean is None or std is None else InputNormalization(mean, std)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Literal["A", "B"]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        self.pad = 0
        self.stride = stride
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                # Option A of He et al.: subsample and zero-pad the channels, no extra parameters.
                self.pad = planes - in_planes
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            skip = x[:, :, :: self.stride, :: self.stride]
            skip = F.pad(skip, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


class CIFARResNet(nn.Module):
    """ResNet for 32x32 images with ``depth = 6n + 2`` layers (He et al., "Deep Residual Learning", CVPR 2016).

    Three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32, 16 and 8 pixel maps, global average
    pooling and a linear head. The MaxUp paper trains ResNet-110 (``n = 18``) on CIFAR-10/100 with Cutout, and
    randomized smoothing (Cohen et al., 2019) uses the same network.

    Args:
        depth: Number of layers, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Output classes.
        in_channels: Input channels.
        shortcut: ``"A"``: parameter-free zero-padding shortcuts when the shape changes (the paper's CIFAR choice);
            ``"B"``: 1x1 convolution projections.
        mean: Per-channel mean to normalise inputs with inside the network (see :class:`InputNormalization`);
            ``None`` when the data module already normalises.
        std: Per-channel standard deviation, with ``mean``.

    Example:
        >>> net = CIFARResNet(depth=20, num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in net.parameters())  # 0.27M, as He et al. Table 6
        269722
    """

    def __init__(
        self,
        depth: int = 110,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Literal["A", "B"] = "A",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"Expected `depth` to be 6n + 2 for an integer n >= 1 (20, 56, 110, ...), got {depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive integer, got {num_classes!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"Expected `shortcut` to be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.normalize = input_normalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits."""
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.blocks(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
