"""Data: MaxUp copies made in the DataLoader workers, sample indices, and the bundled digits.

* :class:`MultiView` and :func:`multiview_collate` (from :mod:`lightning_maxup.multiview`, which imports no
  Lightning) make each sample's ``m`` views in the workers; the :class:`~lightning_maxup.MaxUp` callback keeps
  their epoch and view count in step with the trainer and its warm-up (:class:`MultiViewSchedule`, which did
  this before 0.4, is deprecated).
* :class:`IndexedDataset` appends each item's index, for ``randomness="sample"``.
* scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package, no download).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_maxup._lightning import Callback, pl, rank_zero_warn
from lightning_maxup._validation import non_negative_int, positive_int
from lightning_maxup._wiring import check_same_seed, multiview_datasets
from lightning_maxup.callback import MaxUp
from lightning_maxup.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule
from lightning_maxup.mixin import MaxUpMixin
from lightning_maxup.multiview import MultiView, multiview_collate

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl as _pl

__all__ = [
    "DigitsDataModule",
    "ImageNetMultiViewDataModule",
    "IndexedDataset",
    "MultiView",
    "MultiViewSchedule",
    "load_digits_split",
    "multiview_collate",
    "multiview_pipeline",
    "training_epoch",
]

_multiview_datasets = multiview_datasets  # the name before 0.4


def training_epoch(trainer: Any) -> int:
    """The epoch the trainer's fit loop runs next, as its samplers' ``set_epoch`` gets it; for ``train_dataloader()``.

    ``trainer.current_epoch`` counts completed epochs: in the ``train_dataloader()`` of a fit resumed from a
    checkpoint saved at an epoch's end it is one behind the epoch about to run. The fit loop's count of processed
    epochs is not, and it is what Lightning passes to ``DistributedSampler.set_epoch``. In ``train_dataloader()``:
    ``self.train_set.set_epoch(training_epoch(self.trainer))``.

    Example:
        >>> training_epoch(pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False))
        0
    """
    return int(trainer.fit_loop.epoch_progress.current.processed)


class MultiViewSchedule(Callback):
    """Deprecated since 0.4: the :class:`~lightning_maxup.MaxUp` callback drives the training loader's MultiView.

    Beside a ``MaxUp`` callback this one does nothing but check that its ``warmup_epochs`` (when given) is the
    ``MaxUp`` callback's: two warm-ups would make one-view batches for MaxUp steps. Without a ``MaxUp`` callback it
    sets the epoch and ``m`` views at every epoch start, as before.

    With several ranks, when training starts, it checks that every rank built the ``MultiView`` with rank 0's seed
    and raises otherwise (it does not set rank 0's seed: the workers may have made batches with their own).

    Args:
        warmup_epochs: Epochs of one view before ``m``; ``None`` follows the trainer's ``MaxUp`` callback (or
            makes ``m`` views throughout when there is none).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     MultiViewSchedule(warmup_epochs=2).views(epoch=1, m=4), MultiViewSchedule(warmup_epochs=2).views(2, 4)
        (1, 4)
    """

    sets_multiview_epochs = True

    def __init__(self, warmup_epochs: int | None = None) -> None:
        warnings.warn(
            "MultiViewSchedule is deprecated since lightning_maxup 0.4 and will be removed: the MaxUp callback now"
            " sets the training MultiView's epoch and views; use Trainer(callbacks=[MaxUp(...)]) alone",
            DeprecationWarning,
            stacklevel=2,
        )
        self.warmup_epochs = None if warmup_epochs is None else non_negative_int(warmup_epochs, "warmup_epochs")

    def views(self, epoch: int, m: int, maxup: MaxUp | None = None, fast_dev_run: bool = False) -> int:
        """Views per item in ``epoch``: ``m`` when MaxUp runs then, else 1.

        With ``warmup_epochs=None`` the ``maxup`` callback decides (``fast_dev_run`` skips its warm-up, as it does);
        without either, ``m``.
        """
        if self.warmup_epochs is not None:
            return m if epoch >= self.warmup_epochs else 1
        if maxup is None:
            return m
        return m if fast_dev_run or maxup.active(epoch) else 1

    @staticmethod
    def _maxup(trainer: _pl.Trainer) -> MaxUp | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, MaxUp)), None)  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, stage: str) -> None:
        maxup = self._maxup(trainer)
        if stage == "fit" and maxup is not None and self.warmup_epochs not in (None, maxup.warmup_epochs):
            raise ValueError(
                f"MultiViewSchedule's `warmup_epochs`={self.warmup_epochs} differs from the MaxUp callback's"
                f" `warmup_epochs`={maxup.warmup_epochs}: MaxUp steps would get one-view batches. Remove"
                " MultiViewSchedule (the MaxUp callback sets the views now)"
            )

    def _apply(self, trainer: _pl.Trainer, datasets: list[MultiView]) -> None:
        epoch = int(trainer.current_epoch)
        for dataset in datasets:
            dataset.set_epoch(epoch)
            dataset.set_views(self.views(epoch, dataset.m))

    def _datasets(self, trainer: _pl.Trainer) -> list[MultiView]:
        pairs = multiview_datasets(trainer.train_dataloader)
        if not pairs:
            raise ValueError(
                "MultiViewSchedule found no MultiView in the training DataLoader(s), got"
                f" {type(trainer.train_dataloader).__name__}; wrap the training dataset in"
                " lightning_maxup.data.MultiView, or remove the callback"
            )
        return [dataset for _, dataset in pairs]

    @override
    def on_train_start(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        datasets = self._datasets(trainer)
        if self._maxup(trainer) is not None:
            return  # the MaxUp callback checks and sets them
        for dataset in datasets:
            if isinstance(pl_module, MaxUpMixin) and dataset.m != pl_module.maxup_config.m:
                raise ValueError(
                    f"The training loader's MultiView makes `m`={dataset.m} views per sample, but the module's MaxUp"
                    f" `m` is {pl_module.maxup_config.m}; give both the same value"
                )
            check_same_seed(trainer, dataset)
            if dataset.epoch != trainer.current_epoch:
                rank_zero_warn(
                    f"The training loader's first batches were made at epoch {dataset.epoch}, not the trainer's"
                    f" {trainer.current_epoch}: Lightning starts a resumed fit's loader before any callback hook;"
                    " call `dataset.set_epoch(lightning_maxup.data.training_epoch(self.trainer))` in train_dataloader()"
                )
        self._apply(trainer, datasets)

    @override
    def on_train_epoch_start(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        if self._maxup(trainer) is None:
            self._apply(trainer, self._datasets(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warmup_epochs": self.warmup_epochs}


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that each item also carries its index: ``(*item, index)``.

    MaxUp's ``randomness="sample"`` keys augmentation draws by dataset index; with this wrapper, a
    :class:`~lightning_maxup.MaxUpMixin`'s ``maxup_sample_index(batch)`` is ``batch[-1]``. Tuple items gain one
    trailing element; any other item ``x`` becomes ``(x, index)``.

    Args:
        dataset: A map-style dataset (with ``__getitem__`` and ``__len__``).

    Example:
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([7, 8, 9])))
        >>> x, y, i = ds[2]
        >>> int(y), i
        (9, 2)
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Expected `dataset` to be a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)


def load_digits_split(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Stratified train/validation/test splits of the digits as ``(x [N, 1, 8, 8] in [0, 1], y [N])`` pairs.

    Example:
        >>> (xtr, ytr), (xva, yva), (xte, yte) = load_digits_split()
        >>> xtr.shape[1:], len(xtr) + len(xva) + len(xte)
        (torch.Size([1, 8, 8]), 1797)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"Expected `{name}` in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"Expected `val_fraction` + `test_fraction` < 1, got {val_fraction} + {test_fraction}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=y.numpy()[rest]
    )
    pick = lambda i: (x[torch.as_tensor(i)], y[torch.as_tensor(i)])  # noqa: E731
    return pick(train), pick(val), pick(test)


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
    :class:`~lightning_maxup.batch.Candidates` of ``m * B`` rows, which the module scores as they are, so its MaxUp
    ``augment`` is ``None``. The :class:`~lightning_maxup.MaxUp` callback sets the views (one per sample during the
    warm-up). Validation resizes and centre-crops as :class:`~lightning_maxup.datasets.ImageNetDataModule`.

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
