"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016) for 32x32 images: WRN-28-10 and relatives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.recipes.models.resnet_cifar import input_normalization

__all__ = ["WideResNet"]


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, 1x1 projection when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # As the reference implementation, a projection shortcut reads the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

    Three stages of ``(depth - 4) / 6`` pre-activation blocks with ``16k``, ``32k`` and ``64k`` channels for
    widening factor ``k``. The MaxUp paper trains WRN-28-10 on CIFAR with Cutout and ``m = 10``.

    Args:
        depth: Number of layers, ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: Channel multiplier ``k``.
        num_classes: Output classes.
        dropout: Dropout probability between the convolutions of each block (0.3 in the WRN paper's dropout runs).
        in_channels: Input channels.
        mean: Per-channel mean to normalise inputs with inside the network; ``None`` when the data module does.
        std: Per-channel standard deviation, with ``mean``.

    Example:
        >>> net = WideResNet(depth=10, widen_factor=1, num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> round(sum(p.numel() for p in WideResNet(28, 10).parameters()) / 1e6, 1)  # 36.5M, as the WRN paper
        36.5
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Expected `depth` to be 6n + 4 for an integer n >= 1 (16, 28, 40, ...), got {depth!r}")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"Expected `widen_factor` to be a positive integer, got {widen_factor!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected `num_classes` to be a positive integer, got {num_classes!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"Expected `dropout` in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = input_normalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate(widths):
            for i in range(n):
                blocks.append(_WideBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.Linear):
                nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits."""
        out = self.blocks(self.conv1(self.normalize(x)))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
