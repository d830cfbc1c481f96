"""``MaxUpConfig``: every option of a MaxUp step, validated once, in one frozen object.

:func:`~lightning_maxup.core.functional.maxup_step`, :class:`~lightning_maxup.MaxUpMixin`, the
:class:`~lightning_maxup.MaxUp` callback's overrides, :class:`~lightning_maxup.recipes.models.MaxUpClassifier` and
LightningCLI YAML (``model.init_args.maxup``) all read this object, so an option is added, documented and checked
in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch

from lightning_maxup._serialization import allow_in_checkpoints
from lightning_maxup._validation import (
    callable_or_none,
    one_of,
    optional_positive_int,
    positive_float,
    positive_int,
    precision,
)
from lightning_maxup.core.views import Downsample

__all__ = ["MaxUpConfig", "SelectionDtype", "SelectionFormat", "SelectionMode"]

#: How the selection pass runs the model (``selection_mode``).
SelectionMode = Literal["eval", "train"]
#: The names of the reduced-precision dtypes of the selection forward (``selection_dtype``).
SelectionDtype = Literal["bfloat16", "float16", "float32"]
#: The memory formats of the selection forward (``selection_memory_format``).
SelectionFormat = Literal["channels_last", "contiguous"]
Randomness = Literal["rank", "sample"]

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FORMATS: dict[str, torch.memory_format] = {
    "channels_last": torch.channels_last,
    "contiguous": torch.contiguous_format,
}


def _dtype_name(value: Any) -> SelectionDtype | None:
    if isinstance(value, torch.dtype):
        precision(value, None, dtype_name="selection_dtype")
        return next(k for k, v in _DTYPES.items() if v == value)  # type: ignore[misc]
    return None if value is None else one_of(value, "selection_dtype", (*_DTYPES, None))


def _format_name(value: Any) -> SelectionFormat | None:
    if isinstance(value, torch.memory_format):
        precision(None, value, format_name="selection_memory_format")
        return next(k for k, v in _FORMATS.items() if v == value)  # type: ignore[misc]
    return None if value is None else one_of(value, "selection_memory_format", (*_FORMATS, None))


@dataclasses.dataclass(frozen=True)
class MaxUpConfig:
    """The options of a MaxUp step (Gong et al., "MaxUp", CVPR 2021).

    Args:
        m: Augmented copies per sample; ``m = 1`` is ordinary augmentation (one augmented forward, no selection).
        augment: ``augment(batch, generator=...) -> batch``, applied to the ``m * B``-row expanded batch, or
            ``None``.
        chunk_size: Rows per selection forward, to bound memory; ``None`` forwards all ``m * B`` at once.
        selection_size: Select on images downsampled to this side (16 px on CIFAR, 96 px on ImageNet in the
            paper): shorthand for ``selection_view=Downsample(selection_size)``.
        selection_view: Custom view ``view(batch) -> batch`` the selection pass scores, e.g.
            :class:`~lightning_maxup.core.views.PointSubset`; give either this or ``selection_size``.
        selection_mode: ``"eval"`` scores copies in eval mode (running statistics, dropout off); ``"train"`` in
            train mode (batch statistics of the candidates, dropout on with its own masks). Either way the model
            is left exactly as it was.
        selection_dtype: ``"bfloat16"`` or ``"float16"`` runs the selection forward under autocast (also accepts
            a ``torch.dtype``); ``None`` keeps full precision (or the trainer's own autocast).
        selection_memory_format: ``"channels_last"`` converts the selection view's images to that memory format
            (also accepts a ``torch.memory_format``).
        check_finite: Raise when a loss is NaN or infinite, naming how many (the mixin on accelerators two steps
            later; see the options guide). A non-finite candidate never wins the selection either way.
        seed: Base seed of the augmentation stream; ``None`` takes ``seed_everything``'s seed or rank 0's
            ``torch.initial_seed()``, shared by all ranks.
        randomness: ``"rank"`` draws from a stream per ``(seed, rank, step)``; ``"sample"`` keys every draw by
            ``(seed, epoch, sample index, copy index)``, independent of the world size.
        selection_temperature: ``None`` trains on each sample's worst copy (MaxUp's arg-max). A positive ``τ``
            draws the trained copy with probability ``softmax(L / τ)`` over the sample's ``m`` selection losses,
            from the step's generator: an unbiased one-backward estimate of the gradient of the tilted loss
            ``τ · log mean_k exp(L_k / τ)`` (Li, Beirami, Sanjabi & Smith, "Tilted Empirical Risk
            Minimization", ICLR 2021), a dial from the worst copy (``τ → 0``) to a uniformly random copy
            (``τ → ∞``, ordinary augmentation).

    Example:
        >>> cfg = MaxUpConfig(m=4, selection_size=16)
        >>> cfg.replace(m=8).m, cfg.view
        (8, Downsample(16))
        >>> MaxUpConfig(m=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `m` to be a positive integer, got 0
    """

    m: int = 4
    augment: Callable[..., Any] | None = None
    chunk_size: int | None = None
    selection_size: int | None = None
    selection_view: Callable[[Any], Any] | None = None
    selection_mode: SelectionMode = "eval"
    selection_dtype: SelectionDtype | None = None
    selection_memory_format: SelectionFormat | None = None
    check_finite: bool = True
    seed: int | None = None
    randomness: Randomness = "rank"
    selection_temperature: float | None = None

    def __post_init__(self) -> None:
        self._check_sizes()
        one_of(self.selection_mode, "selection_mode", ("eval", "train"))
        object.__setattr__(self, "selection_dtype", _dtype_name(self.selection_dtype))
        object.__setattr__(self, "selection_memory_format", _format_name(self.selection_memory_format))
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"Expected `check_finite` to be a bool, got {self.check_finite!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(1 << 63) <= self.seed < 1 << 64
        ):
            # torch.manual_seed's range: what a checkpoint stores in one int64 (seeds >= 2**63 as two's complement)
            raise ValueError(f"Expected `seed` to be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        one_of(self.randomness, "randomness", ("rank", "sample"))
        if self.selection_temperature is not None:
            object.__setattr__(
                self, "selection_temperature", positive_float(self.selection_temperature, "selection_temperature")
            )

    def _check_sizes(self) -> None:
        positive_int(self.m, "m")
        callable_or_none(self.augment, "augment", "augment(batch, generator=...)")
        optional_positive_int(self.chunk_size, "chunk_size")
        optional_positive_int(self.selection_size, "selection_size")
        callable_or_none(self.selection_view, "selection_view", "view(batch)")
        if self.selection_size is not None and self.selection_view is not None:
            raise ValueError(
                f"Pass either `selection_size` or `selection_view`, got both ({self.selection_size!r} and"
                f" {self.selection_view!r}); `selection_size=s` is shorthand for `selection_view=Downsample(s)`"
            )

    def replace(self, **changes: Any) -> MaxUpConfig:
        """A copy with ``changes`` applied and validated; unknown names raise ``TypeError`` naming them.

        Setting ``selection_size`` clears ``selection_view`` and the other way round, so an override wins.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Unknown MaxUp option(s) {unknown}; the options are {option_names()}")
        if changes.get("selection_size") is not None:
            changes.setdefault("selection_view", None)
        if changes.get("selection_view") is not None:
            changes.setdefault("selection_size", None)
        return dataclasses.replace(self, **changes)

    @property
    def view(self) -> Callable[[Any], Any] | None:
        """The selection view: ``selection_view``, or ``Downsample(selection_size)``, or ``None``."""
        if self.selection_view is not None:
            return self.selection_view
        return Downsample(self.selection_size) if self.selection_size is not None else None

    @property
    def dtype(self) -> torch.dtype | None:
        """``selection_dtype`` as a ``torch.dtype``."""
        return None if self.selection_dtype is None else _DTYPES[self.selection_dtype]

    @property
    def memory_format(self) -> torch.memory_format | None:
        """``selection_memory_format`` as a ``torch.memory_format``."""
        return None if self.selection_memory_format is None else _FORMATS[self.selection_memory_format]


allow_in_checkpoints(MaxUpConfig)


def option_names() -> list[str]:
    """The names of :class:`MaxUpConfig`'s options, in order.

    Example:
        >>> option_names()[:3]
        ['m', 'augment', 'chunk_size']
    """
    return [f.name for f in dataclasses.fields(MaxUpConfig)]
