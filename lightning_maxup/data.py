"""Bundled data: scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package, no download)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_maxup._lightning import pl

__all__ = ["DigitsDataModule", "IndexedDataset", "load_digits_split"]


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
