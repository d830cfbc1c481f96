"""Batched point-cloud augmentations with one independent draw per cloud, and a point-subset selection view.

Every augmentation takes clouds ``x`` of shape ``[N, P, 3]`` (``N`` clouds of ``P`` points, xyz last), or a tuple
``(x, y, ...)``, and transforms the whole batch with broadcast tensor operations: the random parameters (one
angle, one scale, or one noise tensor per cloud) are drawn through :mod:`lightning_maxup.core.random`, so a
:class:`~lightning_maxup.core.random.KeyedGenerator` makes the draws independent of how the clouds are split across
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
from typing_extensions import override

from lightning_maxup.augment._base import Augmentation, Params, per_row_columns, replace_inputs, split_inputs
from lightning_maxup.core import random as lr
from lightning_maxup.core.random import Generator
from lightning_maxup.core.views import PointSubset, check_points, farthest_point_sample

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
        check_points(x, "PointJitter")
        return {"noise": lr.normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """The norm of the clipped offset added to each cloud (``noise_norm``)."""
        return {
            "noise_norm": (self.sigma * params["noise"]).clamp(-self.clip, self.clip).flatten(1).double().norm(dim=1)
        }

    def apply(self, batch: Any, params: Params) -> Any:
        """Add the clipped, scaled noise."""
        x, _ = split_inputs(batch)
        check_points(x, "PointJitter")
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
        check_points(x, "PointGaussianNoise")
        u = lr.uniform((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        noise = lr.normal(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return {"sigma": self.min_sigma + (self.sigma - self.min_sigma) * u, "noise": noise}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each cloud's drawn ``sigma`` and the norm of the noise added to it (``noise_norm``)."""
        return {
            "sigma": params["sigma"],
            "noise_norm": params["sigma"].double() * params["noise"].flatten(1).double().norm(dim=1),
        }

    def apply(self, batch: Any, params: Params) -> Any:
        """Add ``sigma[i] * noise[i]`` to cloud ``i``."""
        x, _ = split_inputs(batch)
        check_points(x, "PointGaussianNoise")
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
        check_points(x, "RandomPointScale")
        u = lr.uniform((x.shape[0], 3 if self.anisotropic else 1), generator=generator, device=x.device, dtype=x.dtype)
        return {"scale": self.low + (self.high - self.low) * u}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each cloud's scale (``scale``, or ``scale_x``, ``scale_y``, ``scale_z`` when anisotropic)."""
        return per_row_columns("scale", params["scale"], "xyz")

    def apply(self, batch: Any, params: Params) -> Any:
        """Multiply each cloud's coordinates by its factor(s)."""
        x, _ = split_inputs(batch)
        check_points(x, "RandomPointScale")
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
        check_points(x, "RandomPointRotation")
        u = lr.uniform((x.shape[0],), generator=generator, device=x.device, dtype=torch.float64)
        return {"angle": (2.0 * u - 1.0) * self.max_angle}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each cloud's rotation angle (``angle``)."""
        return {"angle": params["angle"]}

    def apply(self, batch: Any, params: Params) -> Any:
        """Rotate every cloud by its angle with one batched matrix product."""
        x, _ = split_inputs(batch)
        check_points(x, "RandomPointRotation")
        r = rotation_matrices(params["angle"], self.axis).to(device=x.device, dtype=x.dtype)
        out = torch.bmm(x, r.transpose(1, 2))
        # The up coordinate is unchanged by construction; copy it exactly rather than through a rounded product.
        a = _AXES[self.axis]
        out = torch.cat([out[..., :a], x[..., a : a + 1], out[..., a + 1 :]], dim=-1)
        return replace_inputs(batch, out)
