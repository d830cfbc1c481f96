"""Batched augmentations with per-row randomness for MaxUp.

Any callable ``augment(batch, generator=...) -> batch`` can be a MaxUp augmentation; these built-ins draw one
independent set of parameters per row from a ``torch.Generator`` (or a
:class:`~lightning_maxup.core.random.KeyedGenerator`) and never modify their input in place.
"""

from lightning_maxup._serialization import allow_in_checkpoints
from lightning_maxup.augment._base import Augmentation, Compose, DescribedAugmentation
from lightning_maxup.augment.adapters import KorniaAdapter, TorchvisionAdapter
from lightning_maxup.augment.image import (
    CutMix,
    Cutout,
    GaussianNoise,
    Mixup,
    RandomCrop,
    RandomHorizontalFlip,
    soft_targets,
)
from lightning_maxup.augment.pointcloud import (
    PointGaussianNoise,
    PointJitter,
    PointSubset,
    RandomPointRotation,
    RandomPointScale,
)
from lightning_maxup.augment.randaugment import RandAugment
from lightning_maxup.augment.text import TokenBatch, WordEmbeddingDropout, embedding_scale, sequence_loss
from lightning_maxup.core.views import Downsample

# Hyperparameters saved with save_hyperparameters() load under torch.load(weights_only=True), Lightning's default.
allow_in_checkpoints(
    Compose, CutMix, Cutout, GaussianNoise, Mixup, RandomCrop, RandomHorizontalFlip, RandAugment,
    PointGaussianNoise, PointJitter, PointSubset, RandomPointRotation, RandomPointScale, WordEmbeddingDropout,
    Downsample,
)  # fmt: skip

__all__ = [
    "Augmentation",
    "Compose",
    "DescribedAugmentation",
    "CutMix",
    "Cutout",
    "GaussianNoise",
    "Mixup",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandAugment",
    "soft_targets",
    # point clouds
    "PointGaussianNoise",
    "PointJitter",
    "PointSubset",
    "RandomPointRotation",
    "RandomPointScale",
    # language models
    "TokenBatch",
    "WordEmbeddingDropout",
    "embedding_scale",
    "sequence_loss",
    # third-party adapters (kornia is imported only when a KorniaAdapter is built)
    "KorniaAdapter",
    "TorchvisionAdapter",
]
