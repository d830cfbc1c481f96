"""Selection views: the cheaper version of a candidate batch that MaxUp's selection pass scores.

The paper selects the worst copy on a low-resolution image (16 px on CIFAR, 96 px on ImageNet) and
back-propagates it at full resolution (Gong et al., 2021, Sec. 4). A view is any callable
``view(batch) -> batch`` that keeps the rows: :class:`Downsample` resizes images (``selection_size=s`` is shorthand
for ``Downsample(s)``), :class:`PointSubset` keeps ``k`` points of each cloud. Both only touch per-sample leaves,
so :class:`~lightning_maxup.core.batch.Shared` tensors pass through unchanged. A custom view follows the same protocol;
it may also define ``check(batch)``, which the mixin's pre-flight check calls on the first real batch.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_maxup._validation import non_negative_int, one_of, positive_int
from lightning_maxup.core import random as lr
from lightning_maxup.core.batch import first_floating, memory_format_of, replace_leaf, split_inputs
from lightning_maxup.core.random import KeyedGenerator, hash32

__all__ = [
    "Downsample",
    "PointSubset",
    "SelectionView",
    "check_points",
    "content_keys",
    "downsample_view",
    "farthest_point_sample",
    "resize_antialiased",
]


@runtime_checkable
class SelectionView(Protocol):
    """What a selection view is: a callable mapping a candidate batch to the batch the selection pass scores."""

    def __call__(self, batch: Any) -> Any:
        """Return the view of ``batch``, with the same rows."""


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------
# Up to this side, two small matrix products beat the direct antialiased kernel on CPU by an order of magnitude
# (docs/benchmarks.md); above it the dense matrices waste too many FLOPs.
_MATMUL_RESIZE_MAX_SIDE = 64


@functools.lru_cache(maxsize=32)
def _resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[n_out, n_in]`` matrix of 1-D antialiased bilinear resizing, read off ``F.interpolate`` of the identity.

    Resizing is linear and separable, so ``A_h @ x @ A_w.T`` equals ``F.interpolate(x, ..., antialias=True)`` up
    to float rounding.
    """
    eye = torch.eye(n_in, dtype=torch.float64, device=device).view(n_in, 1, 1, n_in)
    cols = F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=True, align_corners=False)
    return cols.view(n_in, n_out).t().to(dtype).contiguous()


def resize_antialiased(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of images ``[N, C, H, W]`` to ``size x size``.

    bfloat16 and float16 images are resized in float32 and returned in their own dtype.

    Example:
        >>> resize_antialiased(torch.ones(2, 3, 32, 32), 16).shape
        torch.Size([2, 3, 16, 16])
        >>> resize_antialiased(torch.ones(2, 3, 32, 32, dtype=torch.bfloat16), 16).dtype
        torch.bfloat16
    """
    if x.dtype not in (torch.float32, torch.float64):
        # PyTorch's antialiased kernel takes no bfloat16/float16 on the CPU; resizing in float32 and rounding once
        # at the end is also the more accurate result on any device.
        return resize_antialiased(x.float(), size).to(dtype=x.dtype, memory_format=memory_format_of(x))
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if max(h, w) > _MATMUL_RESIZE_MAX_SIDE:
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    a_h = _resize_matrix(h, size, x.dtype, x.device)
    a_w = a_h if w == h else _resize_matrix(w, size, x.dtype, x.device)
    out = torch.matmul(torch.matmul(a_h, x), a_w.t())
    return out.contiguous(memory_format=memory_format_of(x))


class Downsample:
    """Selection view that resizes the images (the first per-sample 4-D floating tensor) to ``size x size``.

    Antialiased bilinear resizing, as the paper selects on 16 px CIFAR and 96 px ImageNet views. Images already
    ``size`` px pass through; smaller images are an error, since upsampling makes the selection pass dearer and
    no more faithful.

    Args:
        size: Side of the selection view in pixels.

    Example:
        >>> x, y = Downsample(16)((torch.rand(2, 3, 32, 32), torch.zeros(2)))
        >>> x.shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, size: int) -> None:
        self.size = positive_int(size, "selection_size")

    def check(self, batch: Any) -> None:
        """Raise unless ``batch`` holds images at least ``size`` px on each side."""
        self._images(batch)

    def _images(self, batch: Any) -> Tensor:
        x = first_floating(batch, 4)
        if x is None:
            raise ValueError(
                f"`selection_size`={self.size} resizes images, but the batch holds no per-sample 4-D floating"
                " tensor [N, C, H, W]; pass `selection_view` to make the selection view of other data"
            )
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if min(h, w) < self.size:
            raise ValueError(
                f"`selection_size`={self.size} is larger than the images ({h}x{w}): the selection view would"
                f" upsample, which costs more than selecting at full resolution; use a size below {min(h, w)}"
            )
        return x

    def __call__(self, batch: Any) -> Any:
        """Return ``batch`` with its images resized to ``size x size``."""
        x = self._images(batch)
        if x.shape[-2:] == (self.size, self.size):
            return batch
        return replace_leaf(batch, x, resize_antialiased(x, self.size))

    def __repr__(self) -> str:
        return f"Downsample({self.size})"


def downsample_view(batch: Any, size: int) -> Any:
    """Return the batch with its images resized to ``size x size``: ``Downsample(size)(batch)``.

    Example:
        >>> x, y = downsample_view((torch.rand(2, 3, 32, 32), torch.zeros(2)), 16)
        >>> x.shape
        torch.Size([2, 3, 16, 16])
    """
    return Downsample(size)(batch)


# --------------------------------------------------------------------------------------------------------------------
# Point clouds
# --------------------------------------------------------------------------------------------------------------------
def check_points(x: Tensor, name: str) -> int:
    """Return the number of points of clouds ``[N, P, 3]``, or raise naming ``name``.

    Example:
        >>> check_points(torch.zeros(2, 5, 3), "PointJitter")
        5
    """
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"{name} expects point clouds of shape [N, P, 3], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects floating-point coordinates, got dtype {x.dtype}")
    return int(x.shape[1])


def content_keys(x: Tensor) -> Tensor:
    """One 32-bit hash per cloud of its coordinates' bit patterns (order-sensitive), as int64 ``[N]``.

    Example:
        >>> content_keys(torch.zeros(2, 4, 3)).shape
        torch.Size([2])
    """
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).reshape(x.shape[0], -1).to(torch.int64)
    position = torch.arange(bits.shape[1], device=x.device, dtype=torch.int64)
    h = hash32(bits ^ hash32(position * 0x9E3779B9 + 1)[None, :])
    # A sum of per-element hashes modulo 2**32: cheap, and any single changed coordinate changes the key.
    return h.sum(dim=1) & 0xFFFFFFFF


def farthest_point_sample(x: Tensor, k: int) -> Tensor:
    """Indices ``[N, k]`` of ``k`` points per cloud chosen by farthest-point sampling, starting at point 0.

    Deterministic; ``k`` sequential steps of ``O(N * P)`` work each (PointNet++'s sampling layer).

    Example:
        >>> pts = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [5.0, 0, 0], [2.4, 0, 0]]])
        >>> farthest_point_sample(pts, 3).tolist()
        [[0, 2, 3]]
    """
    n, p = x.shape[0], x.shape[1]
    if not 1 <= k <= p:
        raise ValueError(f"Expected `k` in [1, {p}] (the number of points), got {k!r}")
    idx = torch.zeros(n, k, dtype=torch.long, device=x.device)
    dist = torch.full((n, p), float("inf"), dtype=x.dtype, device=x.device)
    rows = torch.arange(n, device=x.device)
    last = torch.zeros(n, dtype=torch.long, device=x.device)
    for j in range(1, k):
        d = (x - x[rows, last][:, None, :]).pow(2).sum(-1)
        dist = torch.minimum(dist, d)
        last = dist.argmax(dim=1)
        idx[:, j] = last
    return idx


class PointSubset:
    """Selection view: keep ``k`` points of each cloud, so MaxUp's selection pass is cheaper.

    Use it as ``selection_view=PointSubset(k)`` of :func:`~lightning_maxup.maxup_step` or
    :class:`~lightning_maxup.MaxUpMixin`: the ``m * B`` candidates are scored on ``k`` points each, and the
    worst copy is back-propagated with all its points, as the paper scores low-resolution images (Sec. 4).

    ``selection_view`` receives only the batch, so ``"random"`` derives each cloud's subset deterministically
    from the cloud itself: a hash of its coordinates (and ``seed``) keys a
    :class:`~lightning_maxup.core.random.KeyedGenerator`. The view is therefore stateless and replayable, needs nothing
    saved in checkpoints, draws the same subset for a cloud on any rank and any batch split, and gives differently
    augmented copies of a sample different subsets. ``"fps"`` takes farthest-point samples instead (deterministic,
    better coverage, ``k`` sequential steps).

    Args:
        k: Points kept per cloud; clouds with at most ``k`` points are returned unchanged.
        method: ``"random"`` (uniform subset without replacement) or ``"fps"`` (farthest-point sampling).
        seed: Mixed into the content hash of ``"random"``.

    Example:
        >>> x, y = torch.randn(6, 1024, 3), torch.zeros(6, dtype=torch.long)
        >>> view = PointSubset(256)
        >>> sub, _ = view((x, y))
        >>> sub.shape, torch.equal(view((x, y))[0], sub)
        (torch.Size([6, 256, 3]), True)
    """

    def __init__(self, k: int, method: Literal["random", "fps"] = "random", seed: int = 0) -> None:
        self.k = positive_int(k, "k")
        self.method = one_of(method, "method", ("random", "fps"))
        self.seed = non_negative_int(seed, "seed")

    def indices(self, x: Tensor) -> Tensor:
        """The kept points' indices ``[N, k]`` of each cloud, in increasing order."""
        p = check_points(x, "PointSubset")
        if self.method == "fps":
            return farthest_point_sample(x, self.k).sort(dim=1).values
        u = lr.uniform((x.shape[0], p), generator=KeyedGenerator(self.seed, content_keys(x)), device=x.device)
        return u.topk(self.k, dim=1).indices.sort(dim=1).values

    def __call__(self, batch: Any) -> Any:
        """Return the batch with each cloud reduced to ``k`` of its points (other tensors unchanged)."""
        x, _ = split_inputs(batch)
        p = check_points(x, "PointSubset")
        if p <= self.k:
            return batch
        idx = self.indices(x)
        # Every occurrence of the clouds, as Downsample resizes every occurrence of the images: in an autoencoder's
        # batch ``(x, x)`` the selection pass scores the subset against itself.
        return replace_leaf(batch, x, x.gather(1, idx[:, :, None].expand(-1, -1, 3)))

    def __repr__(self) -> str:
        return f"PointSubset(k={self.k}, method={self.method!r}, seed={self.seed})"
