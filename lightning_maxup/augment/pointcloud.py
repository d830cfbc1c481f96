"""Batched point-cloud augmentations with one independent draw per cloud, and a point-subset selection view.

Every augmentation takes clouds ``x`` of shape ``[N, P, 3]`` (``N`` clouds of ``P`` points, xyz last), or a tuple
``(x, y, ...)``, and transforms the whole batch with broadcast tensor operations: the random parameters (one
angle, one scale, or one noise tensor per cloud) are drawn through :mod:`lightning_maxup.random`, so a
:class:`~lightning_maxup.random.KeyedGenerator` makes the draws independent of how the clouds are split across
ranks.

:class:`PointSubset` is the point-cloud analogue of MaxUp's low-resolution selection (Gong et al., 2021, Sec. 4):
pass it as ``selection_view`` and the no-gradient selection pass scores each candidate on ``k`` of its points,
while the gradient pass uses the full cloud.

References:
    Qi et al., "PointNet" (CVPR 2017) and "PointNet++" (NeurIPS 2017): jitter ``N(0, 0.01^2)`` clipped at 0.05,
    rotation about the up axis, scaling in ``[0.8, 1.25]``; Wang et al., "Dynamic Graph CNN" (TOG 2019).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_maxup import random as lr
from lightning_maxup.augment._base import Augmentation, Params, replace_inputs, split_inputs
from lightning_maxup.random import Generator, KeyedGenerator, _hash32

__all__ = [
    "PointGaussianNoise",
    "PointJitter",
    "PointSubset",
    "RandomPointRotation",
    "RandomPointScale",
    "farthest_point_sample",
    "rotation_matrices",
]

Axis = Literal["x", "y", "z"]
_AXES = {"x": 0, "y": 1, "z": 2}


def _check_points(x: Tensor, name: str) -> int:
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"{name} expects point clouds of shape [N, P, 3], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects floating-point coordinates, got dtype {x.dtype}")
    return int(x.shape[1])


def _positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected `{name}` to be a positive number, got {value!r}")
    return float(value)


class PointJitter(Augmentation):
    """Move every point by Gaussian noise ``N(0, sigma^2)`` clipped to ``[-clip, clip]`` per coordinate.

    The jitter of PointNet and DGCNN: small, bounded perturbations of each point.

    Args:
        sigma: Standard deviation of the noise before clipping.
        clip: Largest displacement per coordinate.

    Example:
        >>> x = torch.zeros(2, 100, 3)
        >>> out = PointJitter(sigma=0.01, clip=0.02)(x, generator=torch.Generator().manual_seed(0))
        >>> out.shape, bool(out.abs().max() <= 0.02), bool(x.eq(0).all())
        (torch.Size([2, 100, 3]), True, True)
    """

    def __init__(self, sigma: float = 0.01, clip: float = 0.05) -> None:
        self.sigma = _positive(sigma, "sigma")
        self.clip = _positive(clip, "clip")

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw one standard normal tensor of the clouds' shape."""
        x, _ = split_inputs(batch)
        _check_points(x, "PointJitter")
        return {"noise": lr.normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)}

    def apply(self, batch: Any, params: Params) -> Any:
        """Add the clipped, scaled noise."""
        x, _ = split_inputs(batch)
        _check_points(x, "PointJitter")
        return replace_inputs(batch, x + (self.sigma * params["noise"]).clamp(-self.clip, self.clip))


class PointGaussianNoise(Augmentation):
    """Add unclipped Gaussian noise to every point, with a standard deviation drawn per cloud.

    Each cloud's standard deviation is uniform in ``[min_sigma, sigma]``; ``min_sigma=sigma`` (the default) gives
    every cloud the same ``sigma``, as :class:`~lightning_maxup.augment.GaussianNoise` does for images.

    Args:
        sigma: Largest standard deviation of the noise.
        min_sigma: Smallest standard deviation; ``None`` means ``sigma``.

    Example:
        >>> x = torch.zeros(4, 500, 3)
        >>> out = PointGaussianNoise(sigma=0.1, min_sigma=0.0)(x, generator=torch.Generator().manual_seed(0))
        >>> bool((out.std(dim=(1, 2)) < 0.11).all())
        True
    """

    def __init__(self, sigma: float, min_sigma: float | None = None) -> None:
        self.sigma = _positive(sigma, "sigma")
        if min_sigma is None:
            min_sigma = self.sigma
        if isinstance(min_sigma, bool) or not isinstance(min_sigma, (int, float)) or not 0 <= min_sigma <= sigma:
            raise ValueError(f"Expected `min_sigma` to be a number in [0, `sigma`={sigma}], got {min_sigma!r}")
        self.min_sigma = float(min_sigma)

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each cloud's standard deviation and a standard normal tensor of the clouds' shape."""
        x, _ = split_inputs(batch)
        _check_points(x, "PointGaussianNoise")
        u = lr.uniform((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        noise = lr.normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return {"sigma": self.min_sigma + (self.sigma - self.min_sigma) * u, "noise": noise}

    def apply(self, batch: Any, params: Params) -> Any:
        """Add ``sigma[i] * noise[i]`` to cloud ``i``."""
        x, _ = split_inputs(batch)
        _check_points(x, "PointGaussianNoise")
        return replace_inputs(batch, x + params["sigma"].to(x.dtype)[:, None, None] * params["noise"])


class RandomPointScale(Augmentation):
    """Scale each cloud about the origin by a factor drawn uniformly in ``[low, high]``.

    Args:
        low: Smallest scale factor.
        high: Largest scale factor.
        anisotropic: Draw a separate factor per axis (DGCNN's ``[2/3, 3/2]`` per-axis scaling) instead of one.

    Example:
        >>> x = torch.ones(3, 10, 3)
        >>> out = RandomPointScale(0.8, 1.25)(x, generator=torch.Generator().manual_seed(0))
        >>> bool(((out >= 0.8) & (out <= 1.25)).all()), bool((out == out[:, :1, :1]).all())
        (True, True)
    """

    def __init__(self, low: float = 0.8, high: float = 1.25, anisotropic: bool = False) -> None:
        self.low = _positive(low, "low")
        self.high = _positive(high, "high")
        if self.high < self.low:
            raise ValueError(f"Expected `high` to be at least `low`={low}, got {high!r}")
        self.anisotropic = bool(anisotropic)

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each cloud's factor (``[N, 1]``), or three factors (``[N, 3]``) when anisotropic."""
        x, _ = split_inputs(batch)
        _check_points(x, "RandomPointScale")
        u = lr.uniform((x.shape[0], 3 if self.anisotropic else 1), generator=generator, device=x.device, dtype=x.dtype)
        return {"scale": self.low + (self.high - self.low) * u}

    def apply(self, batch: Any, params: Params) -> Any:
        """Multiply each cloud's coordinates by its factor(s)."""
        x, _ = split_inputs(batch)
        _check_points(x, "RandomPointScale")
        return replace_inputs(batch, x * params["scale"].to(x.dtype)[:, None, :])


def rotation_matrices(angle: Tensor, axis: Axis = "y") -> Tensor:
    """Right-handed rotation matrices ``[N, 3, 3]`` by ``angle`` (radians, ``[N]``) about a coordinate axis.

    Points (as rows) rotate by ``x @ R.transpose(1, 2)``.

    Example:
        >>> r = rotation_matrices(torch.tensor([math.pi / 2]), "z")
        >>> ((torch.tensor([[1.0, 0.0, 0.0]]) @ r[0].T).round(decimals=6) + 0.0).tolist()
        [[0.0, 1.0, 0.0]]
    """
    if axis not in _AXES:
        raise ValueError(f"Expected `axis` to be one of 'x', 'y', 'z', got {axis!r}")
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == "x":
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == "y":
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


class RandomPointRotation(Augmentation):
    """Rotate each cloud about the gravity (up) axis by an angle drawn uniformly in ``[-max_angle, max_angle]``.

    ModelNet40's ``modelnet40_ply_hdf5_2048`` files are y-up, hence the default axis (PointNet's
    ``rotate_point_cloud``); use ``axis="z"`` for z-up data such as ScanNet.

    Args:
        axis: The up axis.
        max_angle: Largest rotation in radians; ``pi`` (the default) draws any rotation about the axis.

    Example:
        >>> x = torch.randn(4, 50, 3)
        >>> out = RandomPointRotation()(x, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)), bool(torch.equal(out[..., 1], x[..., 1]))
        (True, True)
    """

    def __init__(self, axis: Axis = "y", max_angle: float = math.pi) -> None:
        if axis not in _AXES:
            raise ValueError(f"Expected `axis` to be one of 'x', 'y', 'z', got {axis!r}")
        self.axis: Axis = axis
        self.max_angle = _positive(max_angle, "max_angle")

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw each cloud's angle."""
        x, _ = split_inputs(batch)
        _check_points(x, "RandomPointRotation")
        u = lr.uniform((x.shape[0],), generator=generator, device=x.device, dtype=torch.float64)
        return {"angle": (2.0 * u - 1.0) * self.max_angle}

    def apply(self, batch: Any, params: Params) -> Any:
        """Rotate every cloud by its angle with one batched matrix product."""
        x, _ = split_inputs(batch)
        _check_points(x, "RandomPointRotation")
        r = rotation_matrices(params["angle"], self.axis).to(device=x.device, dtype=x.dtype)
        out = torch.bmm(x, r.transpose(1, 2))
        # The up coordinate is unchanged by construction; copy it exactly rather than through a rounded product.
        a = _AXES[self.axis]
        out = torch.cat([out[..., :a], x[..., a : a + 1], out[..., a + 1 :]], dim=-1)
        return replace_inputs(batch, out)


def _content_keys(x: Tensor) -> Tensor:
    """One 32-bit hash per cloud of its coordinates' bit patterns (order-sensitive), as int64 ``[N]``."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).reshape(x.shape[0], -1).to(torch.int64)
    position = torch.arange(bits.shape[1], device=x.device, dtype=torch.int64)
    h = _hash32(bits ^ _hash32(position * 0x9E3779B9 + 1)[None, :])
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
    :class:`~lightning_maxup.random.KeyedGenerator`. The view is therefore stateless and replayable, needs nothing
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Expected `k` to be a positive integer, got {k!r}")
        if method not in ("random", "fps"):
            raise ValueError(f"Expected `method` to be 'random' or 'fps', got {method!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, got {seed!r}")
        self.k = k
        self.method = method
        self.seed = seed

    def indices(self, x: Tensor) -> Tensor:
        """The kept points' indices ``[N, k]`` of each cloud, in increasing order."""
        p = _check_points(x, "PointSubset")
        if self.method == "fps":
            return farthest_point_sample(x, self.k).sort(dim=1).values
        u = lr.uniform((x.shape[0], p), generator=KeyedGenerator(self.seed, _content_keys(x)), device=x.device)
        return u.topk(self.k, dim=1).indices.sort(dim=1).values

    def __call__(self, batch: Any) -> Any:
        """Return the batch with each cloud reduced to ``k`` of its points (other tensors unchanged)."""
        x, _ = split_inputs(batch)
        p = _check_points(x, "PointSubset")
        if p <= self.k:
            return batch
        idx = self.indices(x)
        return replace_inputs(batch, x.gather(1, idx[:, :, None].expand(-1, -1, 3)))

    def __repr__(self) -> str:
        return f"PointSubset(k={self.k}, method={self.method!r}, seed={self.seed})"
