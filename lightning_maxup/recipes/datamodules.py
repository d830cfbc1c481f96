"""Ready-made data modules: the bundled digits, and ImageNet with MaxUp's copies made in the workers.

:class:`DigitsDataModule` serves scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the
package, no download); :class:`ImageNetMultiViewDataModule` makes each sample's ``m`` views in the DataLoader
workers with :class:`~lightning_maxup.data.multiview.MultiView`, kept in step with the trainer by
:class:`~lightning_maxup.training.schedule.MultiViewSchedule`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_maxup._lightning import pl
from lightning_maxup._validation import non_negative_int, positive_int
from lightning_maxup.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule, load_digits_split
from lightning_maxup.data.multiview import MultiView
from lightning_maxup.training.schedule import training_epoch

__all__ = ["DigitsDataModule", "ImageNetMultiViewDataModule", "multiview_pipeline"]


class DigitsDataModule(pl.LightningDataModule):
    """The scikit-learn digits as a LightningDataModule (train 70%, validation 15%, test 15%, stratified).

    Args:
        batch_size: Samples per batch.
        seed: Seed of the training shuffle.
        num_workers: DataLoader workers (the data is in memory; 0 is fastest).
        split_seed: Seed of the train/validation/test split (fixed by default, so runs with different ``seed``
            are compared on the same test set).
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0, split_seed: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        """Load and split the digits."""
        train, val, test = load_digits_split(self.split_seed)
        self.train_set, self.val_set, self.test_set = TensorDataset(*train), TensorDataset(*val), TensorDataset(*test)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, the shuffle seeded by ``seed``."""
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=g, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return DataLoader(self.val_set, 256, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return DataLoader(self.test_set, 256, num_workers=self.num_workers)


def multiview_pipeline(
    image_size: int, num_ops: int = 2, magnitude: int = 9, mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD
) -> Any:
    """The worker pipeline of :class:`ImageNetMultiViewDataModule`: one view of a decoded image per call.

    torchvision ``v2``: ``ToImage``, ``RandomResizedCrop(image_size)`` from the original image,
    ``RandomHorizontalFlip``, ``RandAugment(num_ops, magnitude)`` on ``uint8``, ``ToDtype(float32)`` and
    ``Normalize(mean, std)``.

    Example:
        >>> multiview_pipeline(32)(torch.zeros(3, 50, 70, dtype=torch.uint8)).shape
        torch.Size([3, 32, 32])
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=num_ops, magnitude=magnitude),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class _GeneratedImages(Dataset):
    """``(uint8 [3, H, W] image, label)`` of mixed sizes (``H, W`` in ``[side / 2, 2 * side]``), from the index."""

    def __init__(self, length: int, side: int, num_classes: int, seed: int) -> None:
        self.length, self.side, self.num_classes, self.seed = length, side, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        h, w = torch.randint(self.side // 2, 2 * self.side + 1, (2,), generator=g).tolist()
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        return image, int(torch.randint(self.num_classes, (), generator=g))


class ImageNetMultiViewDataModule(ImageNetDataModule):
    """ImageNet from an ``ImageFolder`` tree whose MaxUp copies are made in the DataLoader workers.

    Training images are decoded once per sample in a worker and turned into ``m`` views by
    :func:`multiview_pipeline` (random-resized crop from the original image, flip, RandAugment, normalisation),
    each keyed by ``(seed, epoch, index, copy)`` (:class:`MultiView`); batches are
    :class:`~lightning_maxup.core.batch.Candidates` of ``m * B`` rows, which the module scores as they are, so its MaxUp
    ``augment`` is ``None``. The :class:`~lightning_maxup.MaxUp` callback sets the views (one per sample during the
    warm-up). Validation resizes and centre-crops as :class:`~lightning_maxup.data.datasets.ImageNetDataModule`.

    Args:
        root: Directory with ``train`` and ``val`` subdirectories in ``ImageFolder`` layout.
        batch_size: Samples per batch (each gives ``m`` rows).
        num_workers: DataLoader workers (persistent when positive).
        image_size: Side of the crops.
        resize_size: Shorter side of validation images before the centre crop.
        m: Views per sample: the module's MaxUp ``m``.
        num_ops: RandAugment's operations per view.
        magnitude: RandAugment's magnitude (0-30).
        fake_data: Generated images of mixed sizes instead of ``root`` (no files needed).
        fake_size: Training samples of the fake data.
        num_classes: Classes of the fake data.
        seed: Seed of the shuffle, of the views and of the fake data.

    Example:
        >>> dm = ImageNetMultiViewDataModule(batch_size=2, num_workers=0, image_size=32, m=3, fake_data=True)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.m, batch.batch[0].shape
        (3, torch.Size([6, 3, 32, 32]))
    """

    train_set: MultiView

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
        m: int = 4,
        num_ops: int = 2,
        magnitude: int = 9,
        fake_data: bool = False,
        fake_size: int = 64,
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            num_workers=num_workers,
            image_size=image_size,
            resize_size=resize_size,
            fake_data=fake_data,
            fake_size=fake_size,
            num_classes=num_classes,
            seed=seed,
        )
        self.m = positive_int(m, "m")
        self.num_ops = non_negative_int(num_ops, "num_ops")
        if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude <= 30:
            raise ValueError(f"Expected `magnitude` to be an integer in [0, 30], got {magnitude!r}")
        self.magnitude = magnitude

    def setup(self, stage: str | None = None) -> None:
        """Open the ``train`` folder as decoded images wrapped in :class:`MultiView`, and the ``val`` folder."""
        transform = multiview_pipeline(self.image_size, self.num_ops, self.magnitude)
        raw: Any
        if self.fake_data:
            super().setup(stage)  # the generated validation set
            raw = _GeneratedImages(self.fake_size, self.image_size, self.num_classes, self.seed)
        else:
            raw = self._image_folders()
        self.train_set = MultiView(raw, transform, self.m, seed=self.seed)

    def _image_folders(self) -> Any:
        """The decoded ``train`` folder (PIL images, no transform) and the resized, centre-cropped ``val`` folder.

        Built here rather than by the parent's ``setup``, which would list the training folder a second time.
        """
        from pathlib import Path

        from torchvision import datasets, transforms

        for split in ("train", "val"):
            if not (Path(self.root) / split).is_dir():
                raise FileNotFoundError(
                    f"Expected `root`={self.root!r} to hold '{split}/' in ImageFolder layout;"
                    " pass `fake_data=True` to run on generated images"
                )
        val = transforms.Compose(
            [
                transforms.Resize(self.resize_size),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self.val_set = datasets.ImageFolder(str(Path(self.root) / "val"), val)
        # No transform: ImageFolder decodes to a PIL image (in the worker); MultiView makes the m views from it.
        train = datasets.ImageFolder(str(Path(self.root) / "train"))
        self.num_classes = len(train.classes)
        return train

    def train_dataloader(self) -> DataLoader:
        """Shuffled ``Candidates`` batches of ``m * batch_size`` rows; the views keyed by the fit loop's epoch."""
        if self.trainer is not None:
            # Lightning iterates this loader before any callback hook of the first epoch of a (resumed) fit.
            self.train_set.set_epoch(training_epoch(self.trainer))
        return DataLoader(
            self.train_set,
            self.batch_size,
            shuffle=True,
            drop_last=True,  # a last batch of one sample would break BatchNorm in train mode
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.train_set.collate_fn,
        )
