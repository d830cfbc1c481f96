"""Batched image augmentations with one independent draw per row.

All of them take ``x`` of shape ``[N, C, H, W]`` (or a tuple ``(x, y, ...)``), draw every parameter on the
data's device from the given generator, build masks by broadcasting instead of looping over samples, and return
new tensors. Mixing augmentations (:class:`CutMix`, :class:`Mixup`) turn the labels into soft targets of shape
``[N, num_classes]``, which ``F.cross_entropy`` accepts as class probabilities.

References:
    DeVries & Taylor, "Improved Regularization of CNNs with Cutout" (2017);
    Yun et al., "CutMix" (ICCV 2019); Zhang et al., "mixup" (ICLR 2018).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_maxup.augment._base import Augmentation, Params, replace_inputs, split_inputs
from lightning_maxup.core import random as lr
from lightning_maxup.core.batch import memory_format_of
from lightning_maxup.core.random import Generator

__all__ = ["CutMix", "Cutout", "GaussianNoise", "Mixup", "RandomCrop", "RandomHorizontalFlip"]


def _check_image(x: Tensor, name: str) -> tuple[int, int]:
    if x.dim() != 4:
        raise ValueError(f"{name} expects images of shape [N, C, H, W], got shape {tuple(x.shape)}")
    return int(x.shape[-2]), int(x.shape[-1])


def _check_floating(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(
            f"{name} expects floating-point inputs, got dtype {x.dtype}: noise of scale `sigma` has no integer"
            " version; convert first, e.g. `x.float() / 255` for uint8 images"
        )


def _positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected `{name}` to be a positive number, got {value!r}")
    return float(value)


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")
    return value


def _box_mask(top: Tensor, bottom: Tensor, left: Tensor, right: Tensor, h: int, w: int) -> Tensor:
    """Boolean ``[N, 1, H, W]`` mask, true inside each row's half-open box ``[top, bottom) x [left, right)``."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < bottom[:, None])
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < right[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def soft_targets(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return ``y`` as class probabilities ``[N, num_classes]``: one-hot for integer labels, unchanged if soft.

    Integer labels are checked to lie in ``[0, num_classes)``, which reads them on the host (a sync on an
    accelerator); the mixing augmentations check once, on their first batch, and then use the unchecked encoding.

    Example:
        >>> soft_targets(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    if not y.is_floating_point():
        _check_labels(y, num_classes)
    return _soft_targets(y, num_classes, dtype)


def _check_labels(y: Tensor, num_classes: int) -> None:
    if y.dim() != 1:
        raise ValueError(f"Expected integer labels of shape [N], got shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"Expected labels in [0, `num_classes`={num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )


def _soft_targets(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """:func:`soft_targets` without reading values on the host: a label outside the classes gives a NaN row.

    ``F.one_hot`` checks the range with a host sync on the CPU; comparing with ``arange`` does not, and the NaN
    row makes the loss NaN, which the step's ``check_finite`` reports.
    """
    if y.is_floating_point():
        if y.dim() != 2 or y.shape[1] != num_classes:
            raise ValueError(f"Expected soft targets of shape [N, {num_classes}], got shape {tuple(y.shape)}")
        return y
    if y.dim() != 1:
        raise ValueError(f"Expected integer labels of shape [N], got shape {tuple(y.shape)}")
    classes = torch.arange(num_classes, device=y.device)
    one_hot = (y[:, None] == classes).to(dtype)
    valid = ((y >= 0) & (y < num_classes))[:, None]
    return torch.where(valid, one_hot, float("nan"))


def _partners(n: int, generator: Generator | None, device: torch.device) -> Tensor:
    """For each row, another row of the batch, uniformly (itself only when the batch has one row)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    offset = lr.randint(1, n, (n,), generator=generator, device=device)
    return (torch.arange(n, device=device) + offset) % n


class GaussianNoise(Augmentation):
    """Add isotropic Gaussian noise ``N(0, sigma^2)`` to the inputs (the augmentation of randomized smoothing).

    Args:
        sigma: Standard deviation of the noise.

    Example:
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> out = GaussianNoise(0.5)(x, generator=torch.Generator().manual_seed(0))
        >>> out.shape, bool(x.eq(0).all())
        (torch.Size([2, 3, 4, 4]), True)
    """

    def __init__(self, sigma: float) -> None:
        self.sigma = _positive(sigma, "sigma")

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw one noise tensor of the inputs' shape."""
        x, _ = split_inputs(batch)
        _check_floating(x, "GaussianNoise")
        return {"noise": lr.normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """The norm of the noise added to each row, ``sigma * ||noise||`` (``noise_norm``)."""
        return {"noise_norm": self.sigma * params["noise"].flatten(1).double().norm(dim=1)}

    @property
    @override
    def input_noise_std(self) -> float | None:
        """``sigma``: this is the pure Gaussian input noise of Theorem 1."""
        return self.sigma

    def apply(self, batch: Any, params: Params) -> Any:
        """Add ``sigma * noise`` to the inputs."""
        x, _ = split_inputs(batch)
        _check_floating(x, "GaussianNoise")
        return replace_inputs(batch, x + self.sigma * params["noise"])


class Cutout(Augmentation):
    """Zero a ``size x size`` square at a uniformly drawn centre of each image (clipped at the border).

    Args:
        size: Side of the square in pixels.
        fill: Value written inside the square.

    Example:
        >>> x = torch.ones(3, 1, 8, 8)
        >>> out = Cutout(size=4)(x, generator=torch.Generator().manual_seed(0))
        >>> bool((out.eq(0).sum(dim=(1, 2, 3)) <= 16).all())
        True
    """

    def __init__(self, size: int, fill: float = 0.0) -> None:
        self.size = _positive_int(size, "size")
        self.fill = float(fill)

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each row's square centre."""
        x, _ = split_inputs(batch)
        h, w = _check_image(x, "Cutout")
        n = x.shape[0]
        centre = lr.randint(0, (h, w), (n, 2), generator=generator, device=x.device)
        return {"cy": centre[:, 0], "cx": centre[:, 1]}

    def mask(self, x: Tensor, params: Params) -> Tensor:
        """Boolean ``[N, 1, H, W]`` mask of the cut squares."""
        h, w = _check_image(x, "Cutout")
        cy, cx = params["cy"], params["cx"]
        half = self.size // 2
        return _box_mask(
            (cy - half).clamp(0, h), (cy - half + self.size).clamp(0, h),
            (cx - half).clamp(0, w), (cx - half + self.size).clamp(0, w),
            h, w,
        )  # fmt: skip

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each row's box centre (``centre_y``, ``centre_x``)."""
        return {"centre_y": params["cy"], "centre_x": params["cx"]}

    def apply(self, batch: Any, params: Params) -> Any:
        """Fill each row's square."""
        x, _ = split_inputs(batch)
        if not (x.is_floating_point() or x.is_complex() or self.fill.is_integer()):
            raise ValueError(f"Cutout's `fill`={self.fill} is not a value of integer images (dtype {x.dtype})")
        # A 0-d tensor of the images' dtype (made on the device: no copy from the host), so uint8 stays uint8.
        fill = torch.full((), self.fill, dtype=x.dtype, device=x.device)
        out = torch.where(self.mask(x, params), fill, x)
        return replace_inputs(batch, out)


class _Mixing(Augmentation):
    """Shared parts of CutMix and Mixup: a Beta(alpha, alpha) weight and a partner row per row."""

    def __init__(self, alpha: float, num_classes: int) -> None:
        self.alpha = _positive(alpha, "alpha")
        self.num_classes = _positive_int(num_classes, "num_classes")

    def _draw(self, x: Tensor, generator: Generator | None) -> Params:
        n = x.shape[0]
        return {
            "lam": lr.beta(self.alpha, n, generator=generator, device=x.device),
            "partner": _partners(n, generator, x.device),
        }

    def check(self, batch: Any) -> None:
        """Raise unless the batch holds labels, and integer labels lie in ``[0, num_classes)`` (a host sync)."""
        y = self._labels(batch)
        if not y.is_floating_point():
            _check_labels(y, self.num_classes)

    def _labels(self, batch: Any) -> Tensor:
        _, y = split_inputs(batch)
        if y is None:
            raise ValueError(f"{type(self).__name__} mixes labels: expected a batch `(x, y, ...)`, got a bare tensor")
        return y

    def _mix_labels(self, batch: Any, lam: Tensor, partner: Tensor, dtype: torch.dtype) -> Tensor:
        soft = _soft_targets(self._labels(batch), self.num_classes, dtype)
        lam = lam.to(soft.dtype)[:, None]
        return lam * soft + (1 - lam) * soft[partner]


class CutMix(_Mixing):
    """Paste a box from a partner row of the same batch; labels mix in proportion to the pasted area.

    The box has area ``(1 - lam) * H * W`` for ``lam ~ Beta(alpha, alpha)`` and a uniform centre; after clipping
    at the border, the label weight is recomputed from the box actually pasted (Yun et al., 2019).

    Args:
        alpha: Concentration of the Beta distribution of ``lam``.
        num_classes: Number of classes, for one-hot encoding integer labels.

    Example:
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> out_x, out_y = CutMix(alpha=1.0, num_classes=4)((x, y), generator=torch.Generator().manual_seed(0))
        >>> out_y.shape, bool(torch.allclose(out_y.sum(1), torch.ones(4)))
        (torch.Size([4, 4]), True)
    """

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each row's weight, box centre and partner."""
        x, _ = split_inputs(batch)
        h, w = _check_image(x, "CutMix")
        params = self._draw(x, generator)
        centre = lr.randint(0, (h, w), (x.shape[0], 2), generator=generator, device=x.device)
        params["cy"], params["cx"] = centre[:, 0], centre[:, 1]
        return params

    def boxes(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each row's clipped box ``(top, bottom, left, right)``."""
        h, w = _check_image(x, "CutMix")
        ratio = torch.sqrt(1.0 - params["lam"].to(torch.float64))
        cut_h = torch.floor(h * ratio).to(torch.long)
        cut_w = torch.floor(w * ratio).to(torch.long)
        cy, cx = params["cy"], params["cx"]
        top, bottom = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
        left, right = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
        return top, bottom, left, right

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each row's drawn weight ``lam`` and box centre (``centre_y``, ``centre_x``)."""
        return {"lam": params["lam"], "centre_y": params["cy"], "centre_x": params["cx"]}

    def apply(self, batch: Any, params: Params) -> Any:
        """Paste the boxes and mix the labels by pasted area."""
        x, _ = split_inputs(batch)
        h, w = _check_image(x, "CutMix")
        top, bottom, left, right = self.boxes(x, params)
        partner = params["partner"]
        mask = _box_mask(top, bottom, left, right, h, w)
        out = torch.where(mask, x[partner], x)
        kept = 1.0 - ((bottom - top) * (right - left)).to(torch.float64) / (h * w)
        y_dtype = x.dtype if x.is_floating_point() else torch.float32
        return replace_inputs(batch, out, self._mix_labels(batch, kept, partner, y_dtype))


class Mixup(_Mixing):
    """Blend each row with a partner row: ``lam * x + (1 - lam) * x[partner]``, labels likewise.

    Args:
        alpha: Concentration of the Beta distribution of ``lam``.
        num_classes: Number of classes, for one-hot encoding integer labels.

    Example:
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> out_x, out_y = Mixup(alpha=0.4, num_classes=4)((x, y), generator=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(out_y.sum(1), torch.ones(4)))
        True
    """

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each row's weight and partner."""
        x, _ = split_inputs(batch)
        return self._draw(x, generator)

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each row's drawn weight ``lam``."""
        return {"lam": params["lam"]}

    def apply(self, batch: Any, params: Params) -> Any:
        """Blend inputs and labels."""
        x, _ = split_inputs(batch)
        lam, partner = params["lam"], params["partner"]
        if x.is_floating_point():
            lam_x = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            out = lam_x * x + (1 - lam_x) * x[partner]
            return replace_inputs(batch, out, self._mix_labels(batch, lam, partner, x.dtype))
        # Integer images (uint8) blend in float32 and round back: a weight cast to uint8 would be 0 or 1.
        lam_x = lam.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))
        blended = lam_x * x + (1 - lam_x) * x[partner]
        out = blended.round_().to(x.dtype)
        return replace_inputs(batch, out, self._mix_labels(batch, lam, partner, torch.float32))


class RandomCrop(Augmentation):
    """Pad, then crop a ``size`` window at an independently drawn offset per row.

    Args:
        size: Output ``(height, width)``, or one int for a square.
        padding: Pixels added on every side before cropping.
        padding_mode: How to pad (as ``torch.nn.functional.pad``).

    Example:
        >>> x = torch.rand(5, 3, 32, 32)
        >>> RandomCrop(32, padding=4)(x, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 3, 32, 32])
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        padding: int = 0,
        padding_mode: Literal["constant", "reflect", "replicate", "circular"] = "constant",
    ) -> None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2:
            raise ValueError(f"Expected `size` to be an int or a pair, got {size!r}")
        self.size = (_positive_int(hw[0], "size"), _positive_int(hw[1], "size"))
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"Expected `padding` to be a non-negative integer, got {padding!r}")
        self.padding = padding
        if padding_mode not in ("constant", "reflect", "replicate", "circular"):
            raise ValueError(
                "Expected `padding_mode` to be one of 'constant', 'reflect', 'replicate', 'circular',"
                f" got {padding_mode!r}"
            )
        self.padding_mode = padding_mode

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each row's crop offset."""
        x, _ = split_inputs(batch)
        h, w = _check_image(x, "RandomCrop")
        hp, wp = h + 2 * self.padding, w + 2 * self.padding
        if self.size[0] > hp or self.size[1] > wp:
            raise ValueError(f"`size`={self.size} is larger than the padded image ({hp}, {wp})")
        high = (hp - self.size[0] + 1, wp - self.size[1] + 1)
        offset = lr.randint(0, high, (x.shape[0], 2), generator=generator, device=x.device)
        return {"top": offset[:, 0], "left": offset[:, 1]}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each row's crop offset into the padded image (``offset_y``, ``offset_x``)."""
        return {"offset_y": params["top"], "offset_x": params["left"]}

    def apply(self, batch: Any, params: Params) -> Any:
        """Crop each row at its offset with one gather."""
        x, _ = split_inputs(batch)
        p = self.padding
        xp = F.pad(x, (p, p, p, p), mode=self.padding_mode) if p else x
        ch, cw = self.size
        # A view of every ch x cw window, [N, C, top, left, ch, cw]; indexing one (top, left) per row copies whole
        # windows, several times faster on CPU than gathering pixel by pixel (docs/benchmarks.md).
        windows = xp.unfold(2, ch, 1).unfold(3, cw, 1)
        n = torch.arange(x.shape[0], device=x.device)
        out = windows[n, :, params["top"], params["left"]]  # [N, C, ch, cw]
        return replace_inputs(batch, out.contiguous(memory_format=memory_format_of(x)))


class RandomHorizontalFlip(Augmentation):
    """Mirror each row left-right with probability ``p``, independently per row.

    Args:
        p: Probability of flipping a row.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 1, 4).expand(6, 1, 1, 4)
        >>> out = RandomHorizontalFlip(p=1.0)(x, generator=torch.Generator().manual_seed(0))
        >>> out[0, 0, 0].tolist()
        [3.0, 2.0, 1.0, 0.0]
    """

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"Expected `p` to be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw which rows flip."""
        x, _ = split_inputs(batch)
        return {"flip": lr.uniform((x.shape[0],), generator=generator, device=x.device) < self.p}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Whether each row was flipped (``flip``, 0 or 1)."""
        return {"flip": params["flip"]}

    def apply(self, batch: Any, params: Params) -> Any:
        """Flip the chosen rows."""
        x, _ = split_inputs(batch)
        flip = params["flip"].view(-1, *([1] * (x.dim() - 1)))
        return replace_inputs(batch, torch.where(flip, x.flip(-1), x))
