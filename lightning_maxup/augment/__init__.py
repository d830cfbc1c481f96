"""Batched augmentations with per-row randomness for MaxUp.

Any callable ``augment(batch, generator=...) -> batch`` can be a MaxUp augmentation; these built-ins draw one
independent set of parameters per row from a ``torch.Generator`` (or a
:class:`~lightning_maxup.random.KeyedGenerator`) and never modify their input in place.
"""

from lightning_maxup.augment._base import Augmentation, Compose
from lightning_maxup.augment.image import (
    CutMix,
    Cutout,
    GaussianNoise,
    Mixup,
    RandomCrop,
    RandomHorizontalFlip,
    soft_targets,
)

__all__ = [
    "Augmentation",
    "Compose",
    "CutMix",
    "Cutout",
    "GaussianNoise",
    "Mixup",
    "RandomCrop",
    "RandomHorizontalFlip",
    "soft_targets",
]
