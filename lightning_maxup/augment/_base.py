"""The augmentation protocol: draw parameters, then apply them.

MaxUp applies an augmentation to the batch already expanded to ``m * B`` rows. Any callable
``augment(batch, generator=...) -> batch`` qualifies. The built-ins subclass :class:`Augmentation`, which splits
the call into :meth:`~Augmentation.sample` (all randomness, one value per row) and :meth:`~Augmentation.apply`
(deterministic), so a test can fix the draw and a draw can be replayed (as kornia's ``forward(x, params=...)``).

An augmentation also describes what it drew, for the diagnostics: :meth:`~Augmentation.describe` turns its
parameters into named per-row numbers (the :class:`~lightning_maxup.callbacks.SelectionMonitor` draws their
histograms), and :attr:`~Augmentation.input_noise_std` says whether it is pure Gaussian input noise of a fixed
standard deviation (what Theorem 1's ``grad_norm`` estimate needs). The diagnostics read these two and never the
class, so an augmentation a user writes is described as the built-ins are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from lightning_maxup.core.batch import batch_size, replace_inputs, split_inputs
from lightning_maxup.core.random import Generator

__all__ = [
    "Augmentation",
    "Compose",
    "DescribedAugmentation",
    "Params",
    "num_rows",
    "per_row_columns",
    "replace_inputs",
    "split_inputs",
]

Params = dict[str, Any]


def num_rows(batch: Any) -> int:
    """Number of rows (samples) in a batch."""
    return batch_size(batch)


def per_row_columns(name: str, values: Tensor, suffixes: Sequence[str]) -> dict[str, Tensor]:
    """Name the columns of a ``[rows]`` or ``[rows, k]`` parameter: ``name`` alone, or ``name_<suffix>`` each.

    Example:
        >>> import torch
        >>> sorted(per_row_columns("scale", torch.ones(4, 3), "xyz"))
        ['scale_x', 'scale_y', 'scale_z']
        >>> list(per_row_columns("angle", torch.ones(4), "xyz"))
        ['angle']
    """
    if values.dim() == 1 or values.shape[1] == 1:
        return {name: values.reshape(-1)}
    return {f"{name}_{suffixes[j]}": values[:, j] for j in range(values.shape[1])}


@runtime_checkable
class DescribedAugmentation(Protocol):
    """What the diagnostics need of an augmentation to record and describe its draws (duck-typed).

    :class:`Augmentation` satisfies it; an object of any other class does too if it has these three methods and
    calling it means ``apply(batch, sample(batch, generator))``. ``describe`` returns, for parameters drawn for
    ``N`` rows, named 1-D tensors of ``N`` numbers; it is called only on the steps a monitor records.
    """

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw the parameters for every row of ``batch``."""
        ...

    def apply(self, batch: Any, params: Params) -> Any:
        """Apply drawn ``params`` to ``batch``."""
        ...

    def describe(self, params: Params) -> dict[str, Tensor]:
        """Name one number per row for what ``params`` drew."""
        ...


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

    def describe(self, params: Params) -> dict[str, Tensor]:
        """One number per row for each readable drawn parameter, by name (read by the diagnostics).

        The default reads the parameters themselves: each 1-D tensor, and each column of a 2-D tensor of at most
        four columns (``name_0``, ``name_1``, ...). Override it to say what was drawn in the augmentation's own
        terms (a box centre, the norm of the noise); return ``{}`` when nothing drawn is worth a histogram.

        Args:
            params: What :meth:`sample` returned for ``N`` rows.

        Returns:
            ``{name: Tensor of shape [N]}``, on the parameters' device.
        """
        out: dict[str, Tensor] = {}
        for key, value in params.items():
            if isinstance(value, Tensor) and value.dim() in (1, 2) and (value.dim() == 1 or value.shape[1] <= 4):
                out.update(per_row_columns(key, value, [str(j) for j in range(value.shape[-1])]))
        return out

    @property
    def input_noise_std(self) -> float | None:
        """``σ`` if this augmentation is exactly ``x + σ z`` with ``z`` standard normal per input entry, else None.

        Theorem 1 of the MaxUp paper relates the selection gap of such noise to ``σ ‖∇ₓL‖``; the mixin logs
        ``maxup/grad_norm`` when the augmentation gives a ``σ`` here.
        """
        return None

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
