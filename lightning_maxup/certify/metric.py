"""Certified accuracy as a torchmetrics ``Metric``: usable in ``test_step``, summed across processes under DDP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_maxup.certify.functional import certified_counts

__all__ = ["TABLE_RADII", "CertifiedAccuracy"]

#: The radii of the certified-accuracy tables: 0.25, 0.5, ..., 2.75 (MaxUp's Table 6 layout).
TABLE_RADII: tuple[float, ...] = tuple(0.25 * i for i in range(1, 12))


class CertifiedAccuracy(Metric):
    """Share of inputs whose smoothed prediction is correct with a certified ℓ2 radius of at least ``r``.

    The states are per-radius counts and the number of inputs, summed across processes, so the value under DDP
    equals the value of one process that saw all inputs (Cohen et al., 2019, "approximate certified accuracy").
    Abstentions count as wrong.

    Args:
        radii: The radii ``r`` at which to report certified accuracy.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = CertifiedAccuracy(radii=[0.0, 0.5])
        >>> metric.update(torch.tensor([1, 2, -1]), torch.tensor([0.6, 0.3, 0.0]), torch.tensor([1, 2, 0]))
        >>> metric.compute()
        tensor([0.6667, 0.3333])
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    certified: Tensor
    total: Tensor

    def __init__(self, radii: Sequence[float] = TABLE_RADII, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        radii = list(radii)
        if not radii or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0 for r in radii):
            raise ValueError(f"Expected `radii` to be a non-empty sequence of non-negative numbers, got {radii!r}")
        self.radii = tuple(float(r) for r in radii)
        self.add_state("certified", default=torch.zeros(len(self.radii), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, radius: Tensor, target: Tensor) -> None:
        """Add a batch of certificates: predicted class (-1 for abstain), certified radius and true label."""
        self.certified += certified_counts(prediction, radius, target, self.radii).to(self.certified.device)
        self.total += len(target)

    def compute(self) -> Tensor:
        """Certified accuracy at each radius, ``[len(radii)]``."""
        return self.certified.to(torch.float32) / self.total.clamp_min(1).to(torch.float32)

    def as_dict(self, values: Tensor | None = None, prefix: str = "certified_acc@") -> dict[str, Tensor]:
        """The computed values keyed by radius, e.g. ``{"certified_acc@0.25": ...}``, for ``log_dict``."""
        values = self.compute() if values is None else values
        return {f"{prefix}{r:g}": v for r, v in zip(self.radii, values, strict=True)}
