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

from torch import Tensor

from lightning_maxup.random import Generator

Params = dict[str, Any]


def split_inputs(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Return ``(x, y)`` of a built-in batch: a tensor ``x`` or a tuple/list ``(x, y, *rest)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) >= 2 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(
        f"Built-in augmentations take a tensor `x` or a tuple `(x, y, ...)` of tensors, got {type(batch).__name__}"
    )


def replace_inputs(batch: Any, x: Tensor, y: Tensor | None = None) -> Any:
    """Return a new batch of the same container type with ``x`` (and ``y``, if given) replaced."""
    if isinstance(batch, Tensor):
        return x
    items = list(batch)
    items[0] = x
    if y is not None:
        items[1] = y
    return type(batch)(items) if isinstance(batch, tuple) else items


def num_rows(batch: Any) -> int:
    """Number of rows (samples) in a built-in batch."""
    return int(split_inputs(batch)[0].shape[0])


class Augmentation(ABC):
    """Base class of the built-in augmentations.

    Subclasses implement :meth:`sample`, which makes every random draw for every row, and :meth:`apply`,
    which is deterministic given those parameters. Calling the augmentation does both.
    """

    @abstractmethod
    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw this augmentation's parameters for every row of ``batch``."""

    @abstractmethod
    def apply(self, batch: Any, params: Params) -> Any:
        """Apply the drawn ``params`` to ``batch``; returns a new batch and never modifies ``batch`` in place."""

    def __call__(self, batch: Any, *, generator: Generator | None = None, params: Params | None = None) -> Any:
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
