"""The augmentation protocol: draw parameters, then apply them.

MaxUp applies an augmentation to the batch already expanded to ``m * B`` rows. Any callable
``augment(batch, generator=...) -> batch`` qualifies. The built-ins subclass :class:`Augmentation`, which splits
the call into :meth:`~Augmentation.sample` (all randomness, one value per row) and :meth:`~Augmentation.apply`
(deterministic), so a test can fix the draw and a draw can be replayed (as kornia's ``forward(x, params=...)``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from lightning_maxup.core.batch import batch_size, replace_inputs, split_inputs
from lightning_maxup.core.random import Generator

__all__ = ["Augmentation", "Compose", "Params", "num_rows", "replace_inputs", "split_inputs"]

Params = dict[str, Any]


def num_rows(batch: Any) -> int:
    """Number of rows (samples) in a batch."""
    return batch_size(batch)


class Augmentation(ABC):
    """Base class of the built-in augmentations.

    Subclasses implement :meth:`sample`, which makes every random draw for every row, and :meth:`apply`,
    which is deterministic given those parameters. Calling the augmentation does both.

    Neither reads a tensor's values on the host, so a call makes no host-device sync. Checks that must read
    values (labels or token ids in range) live in :meth:`check`, which a call runs on the first batch the
    augmentation sees only (the mixin's pre-flight check is such a first call); later batches are not checked
    on the host, and an out-of-range value there gives NaN targets or scales, which the step's ``check_finite``
    reports.
    """

    def check(self, batch: Any) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Validate the values of ``batch`` (may read them on the host); the base class has nothing to check."""

    @abstractmethod
    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw this augmentation's parameters for every row of ``batch``."""

    @abstractmethod
    def apply(self, batch: Any, params: Params) -> Any:
        """Apply the drawn ``params`` to ``batch``; returns a new batch and never modifies ``batch`` in place."""

    def __call__(self, batch: Any, *, generator: Generator | None = None, params: Params | None = None) -> Any:
        if not getattr(self, "_checked", False):
            self.check(batch)
            self._checked = True
        if params is None:
            params = self.sample(batch, generator)
        return self.apply(batch, params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Augmentation):
    """Apply augmentations in order, each with its own draw from the same generator.

    Args:
        augmentations: The augmentations to chain (built-ins or any ``augment(batch, generator=...)`` callable).

    Example:
        >>> import torch
        >>> from lightning_maxup.augment import Compose, Cutout, RandomHorizontalFlip
        >>> aug = Compose([RandomHorizontalFlip(), Cutout(size=2)])
        >>> x, y = aug((torch.ones(4, 1, 8, 8), torch.zeros(4)), generator=torch.Generator().manual_seed(0))
        >>> x.shape
        torch.Size([4, 1, 8, 8])
    """

    def __init__(self, augmentations: Sequence[Any]) -> None:
        for i, a in enumerate(augmentations):
            if not callable(a):
                raise TypeError(f"Expected `augmentations[{i}]` to be callable, got {type(a).__name__}")
        self.augmentations = list(augmentations)

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Not separable: a later step's draw may depend on an earlier step's output shape."""
        raise NotImplementedError("Compose draws each step's parameters when it applies it; call it directly")

    def apply(self, batch: Any, params: Params) -> Any:  # pragma: no cover - see sample()
        """See :meth:`sample`."""
        raise NotImplementedError("Compose draws each step's parameters when it applies it; call it directly")

    def __call__(self, batch: Any, *, generator: Generator | None = None, params: Params | None = None) -> Any:
        if params is not None:
            raise ValueError("`params` cannot be replayed through Compose; replay each augmentation instead")
        for a in self.augmentations:
            batch = a(batch, generator=generator)
        return batch
