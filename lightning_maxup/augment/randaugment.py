"""RandAugment on batches of float images, with its own ops, magnitudes and signs drawn for every row.

Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search space" (CVPR Workshops
2020, arXiv:1909.13719), applies ``num_ops`` operations drawn uniformly (with replacement) from a fixed list of 14,
all at one magnitude ``M`` on a scale of ``0..30``. MaxUp needs the ``m`` copies of a sample to be independent
draws, so here every row of the batch draws its own ops, its own signs and, with ``random_magnitude=True``, its
own magnitudes.

The op list and the magnitude of each op at each bin follow torchvision's ``transforms.v2.RandAugment``; every op
reproduces torchvision's tensor kernel on float images (tested against it, row by row). The batch is never
looped over: for each of the ``num_ops`` slots the rows are sorted by op, each op runs once on its rows with
per-row parameters (all five geometric ops share one ``grid_sample`` with one inverse affine matrix per row;
equalisation builds all histograms with one ``scatter_add``); one gather restores the row order at the end.
Sorting needs the group sizes on the host, one sync per call, so on accelerators every op instead runs on every
row and ``torch.where`` keeps each row's own result (``grouping`` of :class:`RandAugment`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_maxup._validation import non_negative_int, one_of
from lightning_maxup.augment._base import Augmentation, Params, replace_inputs, split_inputs
from lightning_maxup.core import random as lr
from lightning_maxup.core.batch import memory_format_of
from lightning_maxup.core.random import Generator

__all__ = ["OPS", "RandAugment", "magnitude_table", "op_values"]

#: The 14 ops, in torchvision's order; ``params["op"]`` holds indices into this tuple.
OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_INDEX = {name: i for i, name in enumerate(OPS)}
_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
# Contiguous in OPS, so that "signed" is a range test on the op index, with no lookup table to copy to the device.
assert [_INDEX[name] for name in _SIGNED] == list(range(_INDEX[_SIGNED[0]], _INDEX[_SIGNED[-1]] + 1))
# Contiguous in OPS, so that after sorting rows by op they form one chunk for one grid_sample, and "geometric" is a
# range test on the op index.
_AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
# Op value at the top bin (the translations' are relative to the image width/height: torchvision's 150 / 331).
_TOP = {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9}
_TOP |= {"Sharpness": 0.9}
_TRANSLATE_TOP = 150.0 / 331.0
Interpolation = Literal["nearest", "bilinear"]
Grouping = Literal["auto", "sorted", "masked"]


def magnitude_table(num_magnitude_bins: int, height: int, width: int) -> Tensor:
    """Unsigned value of every op at every magnitude bin: torchvision's RandAugment tables, as float64.

    The tables are built as torchvision builds them (float32 ``linspace``), so that integer magnitudes give
    exactly torchvision's values: shear ``0..0.3``, translation ``0..150/331`` of the image size, rotation
    ``0..30`` degrees, brightness/colour/contrast/sharpness factor offset ``0..0.9``, solarize threshold ``1..0``,
    posterize bits ``round(8 - 4 * bin / (num_magnitude_bins - 1))``; 0 for Identity, AutoContrast and Equalize.

    Example:
        >>> table = magnitude_table(31, 32, 32)
        >>> table.shape, table[OPS.index("Rotate"), 30].item(), table[OPS.index("Posterize"), 30].item()
        (torch.Size([14, 31]), 30.0, 4.0)
    """
    table = torch.zeros(len(OPS), num_magnitude_bins, dtype=torch.float64)
    tops = _TOP | {"TranslateX": _TRANSLATE_TOP * width, "TranslateY": _TRANSLATE_TOP * height}
    for name, top in tops.items():
        table[_INDEX[name]] = torch.linspace(0.0, top, num_magnitude_bins)
    table[_INDEX["Solarize"]] = torch.linspace(1.0, 0.0, num_magnitude_bins)
    bins = torch.arange(num_magnitude_bins)
    table[_INDEX["Posterize"]] = (8 - bins / ((num_magnitude_bins - 1) / 4)).round()
    return table


def op_values(op: Tensor, magnitude: Tensor, sign: Tensor, num_magnitude_bins: int, height: int, width: int) -> Tensor:
    """The signed value each drawn op is applied with, from :func:`magnitude_table`.

    An integer magnitude picks its bin's value; a fractional one (``random_magnitude=True``) interpolates
    linearly between the two neighbouring bins, and posterize bits are rounded to an integer. Signed ops
    (the geometric ones and the four colour-factor ones) are multiplied by ``sign``.

    Args:
        op: Op indices into :data:`OPS`, any shape.
        magnitude: Magnitudes in bins, in ``[0, num_magnitude_bins - 1]``, of ``op``'s shape.
        sign: ``+1`` or ``-1``, of ``op``'s shape.
        num_magnitude_bins: Number of bins of the magnitude scale.
        height: Image height (scales ``TranslateY``).
        width: Image width (scales ``TranslateX``).

    Returns:
        Float64 values of ``op``'s shape, on ``op``'s device.

    Example:
        >>> ops = torch.tensor([OPS.index("Rotate"), OPS.index("Posterize"), OPS.index("Solarize")])
        >>> op_values(ops, torch.full((3,), 15.0), torch.full((3,), -1), 31, 32, 32).tolist()
        [-15.0, 6.0, 0.5]
    """
    device = op.device
    table = _device_table(num_magnitude_bins, height, width, device)
    magnitude = magnitude.to(device=device, dtype=torch.float64).clamp(0, num_magnitude_bins - 1)
    low = magnitude.floor().long()
    high = (low + 1).clamp(max=num_magnitude_bins - 1)
    value = table[op, low] + (table[op, high] - table[op, low]) * (magnitude - low)
    value = torch.where(op == _INDEX["Posterize"], value.round(), value)
    signed = (op >= _INDEX[_SIGNED[0]]) & (op <= _INDEX[_SIGNED[-1]])
    return torch.where(signed, value * sign.to(device=device, dtype=torch.float64), value)


@functools.lru_cache(maxsize=32)
def _device_table(num_magnitude_bins: int, height: int, width: int, device: torch.device) -> Tensor:
    """:func:`magnitude_table` on ``device``, copied there once per image size rather than on every call."""
    return magnitude_table(num_magnitude_bins, height, width).to(device)


def _check_images(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"RandAugment expects images of shape [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"RandAugment expects float images in [0, 1], got dtype {x.dtype}; convert with `x.float() / 255`"
            " (uint8), or use TorchvisionAdapter(v2.RandAugment()) on uint8 images"
        )
    if x.shape[1] not in (1, 3):
        raise ValueError(f"RandAugment expects images with 1 or 3 channels, got {x.shape[1]}")


def _rows(v: Tensor, x: Tensor) -> Tensor:
    """Per-row values ``[n]`` as a ``[n, 1, 1, 1]`` tensor of ``x``'s dtype, for broadcasting."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------------------------------
# Geometric ops: one inverse affine matrix per row, one grid_sample (torchvision's _affine_grid / grid transform)
# --------------------------------------------------------------------------------------------------------------------


def _inverse_affine(op: Tensor, v: Tensor, height: int, width: int) -> Tensor:
    """``[n, 2, 3]`` float64 matrices mapping output pixels to input pixels, centred coordinates.

    These are torchvision's ``_get_inverse_affine_matrix`` for RandAugment's calls: shears about the top-left
    corner (``center=[0, 0]``) with ``tan(shear) = v``, translations by ``int(v)`` pixels, rotations by ``v``
    degrees about the centre.
    """
    zero, one = torch.zeros_like(v), torch.ones_like(v)
    is_op = {name: op == _INDEX[name] for name in _AFFINE}
    shift = torch.trunc(v)
    angle = torch.deg2rad(-torch.remainder(v, 360.0))
    cos, sin = torch.where(is_op["Rotate"], torch.cos(angle), one), torch.where(is_op["Rotate"], torch.sin(angle), zero)
    m01 = torch.where(is_op["ShearX"], v, sin)
    m10 = torch.where(is_op["ShearY"], v, -sin)
    m02 = torch.where(is_op["ShearX"], v * (0.5 * height), torch.where(is_op["TranslateX"], -shift, zero))
    m12 = torch.where(is_op["ShearY"], v * (0.5 * width), torch.where(is_op["TranslateY"], -shift, zero))
    return torch.stack([cos, m01, m02, m10, cos, m12], dim=1).view(-1, 2, 3)


def _affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """Sampling grid ``[n, H, W, 2]`` for ``grid_sample(align_corners=False)``, computed as torchvision does."""
    n, dtype, device = theta.shape[0], theta.dtype, theta.device
    base = torch.empty(1, height, width, 3, dtype=dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device)[:, None])
    base[..., 2].fill_(1)
    # Filled on the device (a tensor built from a list would be a host-to-device copy), divided as torchvision does.
    scale = torch.where(torch.arange(2, device=device) == 0, 0.5 * width, 0.5 * height).to(dtype)
    rescaled = theta.transpose(1, 2) / scale
    return base.view(1, height * width, 3).expand(n, -1, -1).bmm(rescaled).view(n, height, width, 2)


def _grid_transform(x: Tensor, grid: Tensor, mode: Interpolation, fill: Tensor | None) -> Tensor:
    """``grid_sample`` with zeros outside, or with ``fill`` there through a mask channel (as torchvision)."""
    if fill is None:
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    with_mask = torch.cat([x, x.new_ones(x.shape[0], 1, *x.shape[2:])], dim=1)
    out, mask = F.grid_sample(with_mask, grid, mode=mode, padding_mode="zeros", align_corners=False).split(
        [x.shape[1], 1], dim=1
    )
    fill_img = fill.to(dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if mode == "nearest":
        return torch.where(mask < 0.5, fill_img, out)
    return (out - fill_img) * mask + fill_img


# --------------------------------------------------------------------------------------------------------------------
# Colour ops: torchvision's float kernels with a per-row factor. Each one overwrites `x`, a slice of the private
# buffer of RandAugment.apply (never the caller's tensor), which spares most temporaries.
# --------------------------------------------------------------------------------------------------------------------


def _blend_(x: Tensor, degenerate: Tensor, v: Tensor) -> None:
    """``x * (1 + v) + degenerate * (1 - (1 + v))``, clamped to ``[0, 1]`` (torchvision's ``_blend``)."""
    x.mul_(_rows(1.0 + v, x)).add_(degenerate * _rows(-v, x)).clamp_(0.0, 1.0)


def _grayscale(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _brightness_(x: Tensor, v: Tensor) -> None:
    x.mul_(_rows(1.0 + v, x)).clamp_(0.0, 1.0)


def _color_(x: Tensor, v: Tensor) -> None:
    if x.shape[1] == 3:  # saturation is undefined for grey images; torchvision (and PIL) leave them
        _blend_(x, _grayscale(x), v)


def _contrast_(x: Tensor, v: Tensor) -> None:
    grey = _grayscale(x) if x.shape[1] == 3 else x
    _blend_(x, grey.mean(dim=(1, 2, 3), keepdim=True), v)


def _sharpness_(x: Tensor, v: Tensor) -> None:
    if x.shape[2] <= 2 or x.shape[3] <= 2:
        return
    # torchvision blurs with the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13; as a 3x3 box sum plus 4 times
    # the centre it is four shifted additions, far cheaper on a CPU than a depthwise conv2d.
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    inner = x[..., 1:-1, 1:-1]
    blurred = box.add_(inner, alpha=4.0).div_(13.0)
    # The border keeps its pixels: the blur has no valid value there (torchvision, PIL).
    inner.add_(blurred.sub_(inner).mul_(_rows(-v, x)))
    x.clamp_(0.0, 1.0)


def _posterize_(x: Tensor, v: Tensor) -> None:
    levels = _rows(torch.exp2(v), x)
    x.mul_(levels).floor_().clamp_(max=levels - 1.0).clamp_(min=0.0).mul_(1.0 / levels)


def _solarize_(x: Tensor, v: Tensor) -> None:
    torch.where(x >= _rows(v, x), 1.0 - x, x, out=x)


def _autocontrast_(x: Tensor, v: Tensor) -> None:
    low, high = x.flatten(2).aminmax(dim=-1)
    low, high = low[..., None, None], high[..., None, None]
    flat = high == low
    x.sub_(torch.where(flat, 0.0, low)).div_(torch.where(flat, 1.0, high - low)).clamp_(0.0, 1.0)


def _equalize_(x: Tensor, v: Tensor) -> None:
    """Per-channel histogram equalisation of the image quantised to uint8, with PIL's lookup table (torchvision)."""
    # torchvision's float -> uint8 conversion, x * 255.999 truncated, as int64 bin indices; in float32 for 16-bit
    # floats, in which 255.999 rounds to 256.
    flat = x.view(*x.shape[:2], -1)
    levels = (flat.float() if flat.dtype.itemsize < 4 else flat).mul_(255.999).long().clamp_(0, 255)
    hist = torch.zeros(*levels.shape[:2], 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(-1, levels, hist.new_ones(1).expand_as(levels))
    cum = hist.cumsum(-1)
    # The last occupied bin is where the cumulative histogram first reaches its maximum.
    step = (levels.shape[-1] - hist.gather(-1, cum.argmax(-1, keepdim=True))) // 255
    lut = ((cum[..., :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], dim=-1)
    # A channel with (almost) a single value has step 0 and keeps its (quantised) values: the identity table.
    lut = torch.where(step != 0, lut, torch.arange(256, device=x.device))
    torch.gather(lut.to(x.dtype).mul_(1.0 / 255), -1, levels, out=x.view(*x.shape[:2], -1))


_COLOUR_OPS: dict[str, Callable[[Tensor, Tensor], None]] = {
    "Brightness": _brightness_,
    "Color": _color_,
    "Contrast": _contrast_,
    "Sharpness": _sharpness_,
    "Posterize": _posterize_,
    "Solarize": _solarize_,
    "AutoContrast": _autocontrast_,
    "Equalize": _equalize_,
}


class RandAugment(Augmentation):
    """RandAugment (Cubuk et al., 2019, arXiv:1909.13719) with every row drawing its own ops, signs and magnitudes.

    Each row applies ``num_ops`` ops in turn, each drawn uniformly from the 14 of :data:`OPS` (Identity, ShearX,
    ShearY, TranslateX, TranslateY, Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize,
    AutoContrast, Equalize), with replacement; a signed op is negated with probability 1/2. The magnitude scale
    and every op follow torchvision's ``transforms.v2.RandAugment`` on float images, so for the same draw the
    output equals torchvision's, row by row (up to float rounding; see ``tests/augment/test_randaugment.py``). Unlike
    torchvision's transform, which makes one draw per call, and kornia's, which draws the ops once per batch,
    the draw here is per row, as MaxUp's ``m`` copies of a sample need, and the batch is processed without a
    loop over rows.

    Images are float tensors ``[N, C, H, W]`` with values in ``[0, 1]`` and 1 or 3 channels (normalise after
    augmenting, e.g. in the network), on any device; the output has the input's dtype and device.

    Args:
        num_ops: Ops applied to each row, one after the other (``N`` in the paper); 0 returns a copy.
        magnitude: Magnitude bin of every op, ``0 <= magnitude < num_magnitude_bins`` (``M`` in the paper,
            whose scale has 31 bins, ``0..30``).
        num_magnitude_bins: Number of bins of the magnitude scale.
        random_magnitude: Draw each row's magnitude for each op uniformly from ``[0, magnitude]`` (continuous)
            instead of using ``magnitude`` itself (a common variant, e.g. timm's ``mstd=inf``).
        fill: Value written where a geometric op moves pixels in from outside the image: one number, or one per
            channel.
        interpolation: ``"nearest"`` (torchvision's default for RandAugment) or ``"bilinear"``.
        grouping: How a batch whose rows drew different ops is processed. ``"sorted"``: for each op slot the rows
            are sorted by op and every op runs once on its own rows; the group sizes are read on the host (one
            sync per call). ``"masked"``: every op runs on every row and ``torch.where`` keeps each row's own
            result; no sync, but about 14 times the arithmetic. ``"auto"`` (default): ``"sorted"`` on the CPU,
            where reading the sizes waits for no device queue, ``"masked"`` on accelerators, where a sync would
            stall the queue and the extra arithmetic is cheap on small images. Both give the same output (to
            float rounding; ``tests/augment/test_randaugment.py`` compares them row by row). Measured on the CPU
            at 32 px, 512 rows: see ``docs/augmentations.md``.

    Example:
        >>> import torch
        >>> from lightning_maxup.augment import RandAugment
        >>> aug = RandAugment(num_ops=2, magnitude=9)
        >>> x = torch.rand(8, 3, 32, 32)
        >>> params = aug.sample(x, torch.Generator().manual_seed(0))
        >>> params["op"].shape, params["magnitude"].shape, params["sign"].shape
        (torch.Size([8, 2]), torch.Size([8, 2]), torch.Size([8, 2]))
        >>> out = aug(x, params=params)
        >>> out.shape, torch.equal(aug(x, params=params), out)
        (torch.Size([8, 3, 32, 32]), True)
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        random_magnitude: bool = False,
        fill: float | Sequence[float] = 0.0,
        interpolation: Interpolation = "nearest",
        grouping: Grouping = "auto",
    ) -> None:
        self.num_ops = non_negative_int(num_ops, "num_ops")
        if isinstance(num_magnitude_bins, bool) or not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
            raise ValueError(f"Expected `num_magnitude_bins` to be an integer >= 2, got {num_magnitude_bins!r}")
        self.num_magnitude_bins = num_magnitude_bins
        self.magnitude = non_negative_int(magnitude, "magnitude")
        if self.magnitude >= num_magnitude_bins:
            raise ValueError(
                f"Expected `magnitude` to be below `num_magnitude_bins`={num_magnitude_bins}, got {magnitude!r}"
            )
        if not isinstance(random_magnitude, bool):
            raise ValueError(f"Expected `random_magnitude` to be True or False, got {random_magnitude!r}")
        self.random_magnitude = random_magnitude
        self.fill = _check_fill(fill)
        self.interpolation = one_of(interpolation, "interpolation", ("nearest", "bilinear"))
        self.grouping = one_of(grouping, "grouping", ("auto", "sorted", "masked"))

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw every row's ops, magnitudes (in bins) and signs, each of shape ``[N, num_ops]``."""
        x, _ = split_inputs(batch)
        _check_images(x)
        shape, device = (int(x.shape[0]), self.num_ops), x.device
        op = lr.randint(0, len(OPS), shape, generator=generator, device=device)
        if self.random_magnitude:
            magnitude = lr.uniform(shape, generator=generator, device=device, dtype=torch.float64) * self.magnitude
        else:
            magnitude = torch.full(shape, float(self.magnitude), dtype=torch.float64, device=device)
        negative = lr.uniform(shape, generator=generator, device=device) < 0.5
        sign = 1 - 2 * negative.to(torch.int64)
        return {"op": op, "magnitude": magnitude, "sign": sign}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each slot's op index into :data:`OPS` (``op_<slot>``) and, with ``random_magnitude``, its magnitude."""
        out: dict[str, Tensor] = {}
        for s in range(params["op"].shape[1]):
            out[f"op_{s}"] = params["op"][:, s]
            if self.random_magnitude:
                out[f"magnitude_{s}"] = params["magnitude"][:, s]
        return out

    def apply(self, batch: Any, params: Params) -> Any:
        """Apply each row's ops in order; returns a new batch with a new ``x`` in the input's memory format."""
        x, _ = split_inputs(batch)
        _check_images(x)
        op, value = self._values(x, params)
        if op.numel() == 0:
            return replace_inputs(batch, x.clone())
        fill = self._fill_tensor(x)
        masked = self.grouping == "masked" or (self.grouping == "auto" and x.device.type != "cpu")
        out = self._apply_masked(x, op, value, fill) if masked else self._apply_grouped(x, op, value, fill)
        # The ops work on contiguous buffers (equalisation views rows as flat pixels); channels-last comes back.
        return replace_inputs(batch, out.contiguous(memory_format=memory_format_of(x)))

    def _apply_grouped(self, x: Tensor, op: Tensor, value: Tensor, fill: Tensor | None) -> Tensor:
        """Rows sorted by op per slot, each op once on its rows; reads the group sizes on the host (a sync)."""
        # The size of every (slot, op) group: the one host read (F.one_hot would add two more, checking the range).
        counts = (op[..., None] == torch.arange(len(OPS), device=op.device)).sum(0).tolist()
        # For each slot the rows are sorted by their op, so that every op runs once, in place, on one contiguous
        # slice of a private buffer. Two buffers take turns, whatever `num_ops`: on a CPU, fresh full-batch tensors
        # cost more than the arithmetic (large allocations are new, page-faulted memory). Work row i is input row
        # source[i].
        buffers = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2)]
        work, source = x, torch.arange(x.shape[0], device=x.device)
        for slot in range(op.shape[1]):
            order = torch.argsort(op[source, slot], stable=True)
            work = torch.index_select(work, 0, order, out=buffers[slot % 2])
            source = source[order]
            self._apply_sorted(work, op[source, slot], value[source, slot], counts[slot], fill)
        inverse = torch.empty_like(source).scatter_(0, source, torch.arange(x.shape[0], device=x.device))
        return torch.index_select(work, 0, inverse, out=buffers[op.shape[1] % 2])

    def _apply_masked(self, x: Tensor, op: Tensor, value: Tensor, fill: Tensor | None) -> Tensor:
        """Every op on every row, each row keeping its own op's result: no host sync, ~14x the arithmetic."""
        h, w = int(x.shape[2]), int(x.shape[3])
        out = x.clone(memory_format=torch.contiguous_format)
        scratch = torch.empty_like(out)
        for slot in range(op.shape[1]):
            o, v = op[:, slot], value[:, slot]
            # Rows of other ops get the identity matrix (and their result is discarded anyway).
            theta = _inverse_affine(o, v, h, w).to(x.dtype)
            moved = _grid_transform(out, _affine_grid(theta, h, w), self.interpolation, fill)
            affine = (o >= _INDEX[_AFFINE[0]]) & (o <= _INDEX[_AFFINE[-1]])
            torch.where(affine.view(-1, 1, 1, 1), moved, out, out=out)
            for name, colour_op in _COLOUR_OPS.items():
                is_op = o == _INDEX[name]
                scratch.copy_(out)
                # A neutral value on other rows keeps their (discarded) arithmetic finite.
                colour_op(scratch, torch.where(is_op, v, 0.0))
                torch.where(is_op.view(-1, 1, 1, 1), scratch, out, out=out)
        return out

    def _values(self, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        expected = (int(x.shape[0]), self.num_ops)
        for key in ("op", "magnitude", "sign"):
            if key not in params or tuple(params[key].shape) != expected:
                got = tuple(params[key].shape) if key in params else "nothing"
                raise ValueError(f"Expected `params[{key!r}]` of shape {expected}, got {got}")
        op = params["op"].to(device=x.device, dtype=torch.int64)
        h, w = int(x.shape[2]), int(x.shape[3])
        return op, op_values(op, params["magnitude"], params["sign"], self.num_magnitude_bins, h, w)

    def _fill_tensor(self, x: Tensor) -> Tensor | None:
        fill = self.fill if isinstance(self.fill, tuple) else (self.fill,)
        if len(fill) not in (1, x.shape[1]):
            raise ValueError(f"Expected `fill` to have 1 or C={x.shape[1]} values, got {len(fill)}")
        if all(f == 0.0 for f in fill):
            return None  # grid_sample's zero padding already fills with 0
        # One full() per value, made on the device: a tensor built from the tuple would be a host-to-device copy.
        values = [torch.full((1,), f, dtype=x.dtype, device=x.device) for f in fill]
        return (values[0] if len(values) == 1 else torch.cat(values)).expand(x.shape[1])

    def _apply_sorted(self, x: Tensor, op: Tensor, value: Tensor, counts: list[int], fill: Tensor | None) -> None:
        """Apply each row's op to ``x``, a private buffer whose rows are sorted by op, in place."""
        for name, (start, stop) in _group_bounds(counts).items():
            if start == stop or name == "Identity":
                continue
            rows, v = x[start:stop], value[start:stop]
            if name == "Affine":
                h, w = int(x.shape[2]), int(x.shape[3])
                theta = _inverse_affine(op[start:stop], v, h, w).to(x.dtype)
                rows.copy_(_grid_transform(rows, _affine_grid(theta, h, w), self.interpolation, fill))
            else:
                _COLOUR_OPS[name](rows, v)


def _group_bounds(counts: list[int]) -> dict[str, tuple[int, int]]:
    """Row ranges, in sorted-op order, of Identity, of the five geometric ops together, and of each colour op."""
    bounds: dict[str, tuple[int, int]] = {}
    start = 0
    for i, name in enumerate(OPS):
        group = "Affine" if name in _AFFINE else name
        first = bounds.get(group, (start, start))[0]
        start += counts[i]
        bounds[group] = (first, start)
    return bounds


def _check_fill(fill: Any) -> float | tuple[float, ...]:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(fill):
        return float(fill)
    if isinstance(fill, Sequence) and not isinstance(fill, str) and len(fill) > 0 and all(number(f) for f in fill):
        return tuple(float(f) for f in fill)
    raise ValueError(f"Expected `fill` to be a number or a sequence of numbers, got {fill!r}")
