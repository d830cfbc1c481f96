"""Datasets: CIFAR-10/100 and ImageNet data modules, sample indices and the bundled digits.

:class:`IndexedDataset` appends each item's index (for ``randomness="sample"``); :func:`load_digits_split`
splits scikit-learn's handwritten digits (shipped with the package, no download). The data modules are those
of the paper's benchmarks, each with a generated stand-in for CI.

They deliver un-augmented tensors: with MaxUp the augmentation (crop, flip, Cutout, CutMix, noise) runs inside
the training step on the ``m`` copies of every sample, so it belongs in the model's ``augment`` (for example
``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), Cutout(16)])``), not in the data pipeline.

``fake_data=True`` replaces the real images with random ones of the same shape, normalisation and number of
classes, made on the fly from a seed, so configs and pipelines can be exercised without downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    TensorDataset,  # noqa: F401 (doctests)
)

from lightning_maxup._extras import require
from lightning_maxup._lightning import pl

__all__ = [
    "CIFARDataModule",
    "CIFAR_MEAN_STD",
    "FakeImages",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetDataModule",
    "IndexedDataset",
    "load_digits_split",
]

#: Per-channel mean and standard deviation of the CIFAR training sets.
CIFAR_MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
#: Per-channel mean of the ImageNet training set.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: Per-channel standard deviation of the ImageNet training set.
IMAGENET_STD = (0.229, 0.224, 0.225)


class FakeImages(Dataset):
    """Random images in ``[0, 1]`` and random labels, each sample drawn from ``(seed, index)`` when read.

    Args:
        length: Number of samples.
        shape: Shape of one image, ``(C, H, W)``.
        num_classes: Labels are drawn from ``range(num_classes)``.
        seed: Seed of the whole dataset; sample ``i`` depends on ``(seed, i)`` only.
        transform: Applied to each image tensor (e.g. normalisation).

    Example:
        >>> ds = FakeImages(4, (3, 8, 8), num_classes=10)
        >>> x, y = ds[1]
        >>> x.shape, 0 <= y < 10, bool(torch.equal(x, ds[1][0]))
        (torch.Size([3, 8, 8]), True, True)
    """

    def __init__(
        self,
        length: int,
        shape: tuple[int, int, int],
        num_classes: int,
        seed: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        _check_positive_int(length, "length")
        _check_positive_int(num_classes, "num_classes")
        self.length = length
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"Index {index} out of range for FakeImages of length {self.length}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.rand(self.shape, generator=g)
        y = int(torch.randint(self.num_classes, (), generator=g))
        return (self.transform(x) if self.transform is not None else x), y


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")
    return value


def _check_non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative integer, got {value!r}")
    return value


class _ImageDataModule(pl.LightningDataModule):
    """Loaders shared by the data modules: seeded shuffled training batches, validation and test on one split."""

    train_set: Dataset
    val_set: Dataset

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.num_workers = _check_non_negative_int(num_workers, "num_workers")
        self.seed = seed

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            self.batch_size,
            shuffle=train,
            # A last batch of one row would break BatchNorm in train mode.
            drop_last=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the shuffle seeded by ``seed``), the last partial batch dropped."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (the validation split)."""
        return self._loader(self.val_set, train=False)


class CIFARDataModule(_ImageDataModule):
    """CIFAR-10 or CIFAR-100 (Krizhevsky, 2009) as normalised 32x32 tensors, without augmentation.

    Training uses the 50,000 training images; validation and test both use the 10,000 test images, as the
    MaxUp paper reports test error. Put crop, flip and Cutout in the MaxUp ``augment`` instead (see the module
    docstring).

    Args:
        root: Directory of torchvision's CIFAR files (``cifar-10-batches-py`` or ``cifar-100-python``).
        dataset: ``"cifar10"`` or ``"cifar100"``.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        fake_data: Use random images of the same shape and classes instead (no files needed).
        download: Let torchvision download the dataset into ``root`` if it is missing.
        normalize: Normalise with the dataset's channel mean and std; ``False`` keeps pixels in ``[0, 1]``, as
            randomized smoothing needs (the network then normalises, e.g. ``CIFARResNet(mean=..., std=...)``).
        fake_size: Training samples of the fake data (validation gets a quarter, at least one batch).
        seed: Seed of the training shuffle and of the fake data.

    Example:
        >>> dm = CIFARDataModule(dataset="cifar100", batch_size=4, num_workers=0, fake_data=True, fake_size=8)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, dm.num_classes
        (torch.Size([4, 3, 32, 32]), 100)
    """

    def __init__(
        self,
        root: str = "data",
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        fake_data: bool = False,
        download: bool = False,
        normalize: bool = True,
        fake_size: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if dataset not in CIFAR_MEAN_STD:
            raise ValueError(f"Expected `dataset` to be 'cifar10' or 'cifar100', got {dataset!r}")
        self.root = root
        self.dataset = dataset
        self.fake_data = bool(fake_data)
        self.download = bool(download)
        self.normalize = bool(normalize)
        self.fake_size = _check_positive_int(fake_size, "fake_size")
        self.num_classes = 10 if dataset == "cifar10" else 100

    def _transform(self) -> Callable[[Tensor], Tensor] | None:
        from torchvision import transforms

        mean, std = CIFAR_MEAN_STD[self.dataset]
        return transforms.Normalize(mean, std) if self.normalize else None

    def prepare_data(self) -> None:
        """Download the dataset when ``download=True`` (on one process only)."""
        if self.download and not self.fake_data:
            cls = self._torchvision_class()
            cls(self.root, train=True, download=True)
            cls(self.root, train=False, download=True)

    def _torchvision_class(self) -> Any:
        from torchvision import datasets

        return datasets.CIFAR10 if self.dataset == "cifar10" else datasets.CIFAR100

    def setup(self, stage: str | None = None) -> None:
        """Open the training and test splits (or make the fake ones)."""
        norm = self._transform()
        if self.fake_data:
            val_size = max(self.fake_size // 4, self.batch_size)
            self.train_set = FakeImages(self.fake_size, (3, 32, 32), self.num_classes, self.seed, norm)
            self.val_set = FakeImages(val_size, (3, 32, 32), self.num_classes, self.seed + 1, norm)
            return
        from torchvision import transforms

        steps: list[Any] = [transforms.ToTensor()] + ([norm] if norm is not None else [])
        transform = transforms.Compose(steps)
        cls = self._torchvision_class()
        try:
            self.train_set = cls(self.root, train=True, transform=transform)
            self.val_set = cls(self.root, train=False, transform=transform)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.dataset} not found under `root`={self.root!r}: pass `download=True` to fetch it, or"
                " `fake_data=True` to run on generated images"
            ) from err


class ImageNetDataModule(_ImageDataModule):
    """ImageNet (ILSVRC-2012) from an ``ImageFolder`` tree, resized and cropped to ``image_size``, normalised.

    ``root`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``. Validation resizes the shorter side to
    ``resize_size`` and takes the centre ``image_size`` crop; training does the same by default
    (``train_crop="center"``), leaving the flip and CutMix to the MaxUp ``augment``, or takes torchvision's
    random-resized crop per sample (``"random_resized"``), the usual ImageNet training crop, which is drawn once per
    sample in the loader and shared by its ``m`` MaxUp copies.

    Args:
        root: Directory with ``train`` and ``val`` subdirectories in ``ImageFolder`` layout.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        image_size: Side of the crops.
        resize_size: Shorter side after resizing, before the centre crop.
        train_crop: ``"center"`` or ``"random_resized"`` (see above).
        fake_data: Use random ``image_size`` images and ``num_classes`` classes instead (no files needed).
        fake_size: Training samples of the fake data (validation gets a quarter, at least one batch).
        num_classes: Classes of the fake data (the real data has as many as ``train`` has subdirectories).
        seed: Seed of the training shuffle and of the fake data.

    Example:
        >>> dm = ImageNetDataModule(batch_size=2, num_workers=0, fake_data=True, fake_size=4, image_size=64)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.val_dataloader()))
        >>> x.shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
        train_crop: Literal["center", "random_resized"] = "center",
        fake_data: bool = False,
        fake_size: int = 64,
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.image_size = _check_positive_int(image_size, "image_size")
        self.resize_size = _check_positive_int(resize_size, "resize_size")
        if resize_size < image_size:
            raise ValueError(f"Expected `resize_size` >= `image_size`={image_size}, got {resize_size!r}")
        if train_crop not in ("center", "random_resized"):
            raise ValueError(f"Expected `train_crop` to be 'center' or 'random_resized', got {train_crop!r}")
        self.root = root
        self.train_crop = train_crop
        self.fake_data = bool(fake_data)
        self.fake_size = _check_positive_int(fake_size, "fake_size")
        self.num_classes = _check_positive_int(num_classes, "num_classes")

    def setup(self, stage: str | None = None) -> None:
        """Open the ``train`` and ``val`` folders (or make the fake data)."""
        from torchvision import datasets, transforms

        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if self.fake_data:
            shape = (3, self.image_size, self.image_size)
            val_size = max(self.fake_size // 4, self.batch_size)
            self.train_set = FakeImages(self.fake_size, shape, self.num_classes, self.seed, norm)
            self.val_set = FakeImages(val_size, shape, self.num_classes, self.seed + 1, norm)
            return
        for split in ("train", "val"):
            if not (Path(self.root) / split).is_dir():
                raise FileNotFoundError(
                    f"Expected `root`={self.root!r} to hold '{split}/' in ImageFolder layout;"
                    " pass `fake_data=True` to run on generated images"
                )
        center = [transforms.Resize(self.resize_size), transforms.CenterCrop(self.image_size)]
        tail = [transforms.ToTensor(), norm]
        train_head = center if self.train_crop == "center" else [transforms.RandomResizedCrop(self.image_size)]
        self.train_set = datasets.ImageFolder(str(Path(self.root) / "train"), transforms.Compose(train_head + tail))
        self.val_set = datasets.ImageFolder(str(Path(self.root) / "val"), transforms.Compose(center + tail))
        self.num_classes = len(self.train_set.classes)  # type: ignore[attr-defined]


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
    load_digits = require("sklearn.datasets", "load_digits_split", "demo").load_digits
    train_test_split = require("sklearn.model_selection", "load_digits_split", "demo").train_test_split

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
