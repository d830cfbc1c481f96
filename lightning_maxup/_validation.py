"""Argument checks shared by every public entry point: one message format, one place.

Each check returns the validated value, so callers write ``self.m = positive_int(m, "m")``. Messages name the
argument in backticks and show what was received (the torchmetrics / Lightning convention).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import torch

__all__ = [
    "callable_or_none",
    "non_negative_int",
    "one_of",
    "optional_positive_int",
    "positive_int",
    "positive_float",
    "precision",
]

T = TypeVar("T")

#: Reduced-precision dtypes a forward without gradient may run in (``None`` keeps full precision).
PRECISION_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
#: Memory formats an image forward may run in (``None`` leaves inputs as they are).
MEMORY_FORMATS = (None, torch.contiguous_format, torch.channels_last)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an integer ``>= 1``.

    Example:
        >>> positive_int(0, "m")
        Traceback (most recent call last):
        ...
        ValueError: Expected `m` to be a positive integer, got 0
    """
    if not _is_int(value) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")
    return int(value)


def optional_positive_int(value: Any, name: str) -> int | None:
    """Return ``value`` if it is ``None`` or an integer ``>= 1``.

    Example:
        >>> optional_positive_int(None, "chunk_size") is None
        True
    """
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer or None, got {value!r}")
    return int(value)


def non_negative_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an integer ``>= 0``.

    Example:
        >>> non_negative_int(5, "warmup_epochs")
        5
    """
    if not _is_int(value) or value < 0:
        raise ValueError(f"Expected `{name}` to be a non-negative integer, got {value!r}")
    return int(value)


def positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a finite number ``> 0``.

    Example:
        >>> positive_float(0.25, "sigma")
        0.25
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"Expected `{name}` to be a positive finite number, got {value!r}")
    return float(value)


def one_of(value: T, name: str, choices: Iterable[Any]) -> T:
    """Return ``value`` if it is one of ``choices`` (for ``Literal`` options).

    Example:
        >>> one_of("eval", "selection_mode", ("eval", "train"))
        'eval'
    """
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Expected `{name}` to be one of {allowed}, got {value!r}")
    return value


def callable_or_none(value: T, name: str, signature: str = "") -> T:
    """Return ``value`` if it is ``None`` or callable.

    Example:
        >>> callable_or_none(3, "augment", "augment(batch, generator=...)")
        Traceback (most recent call last):
        ...
        TypeError: Expected `augment` to be callable as augment(batch, generator=...), got 3
    """
    if value is not None and not callable(value):
        how = f" as {signature}" if signature else ""
        raise TypeError(f"Expected `{name}` to be callable{how}, got {value!r}")
    return value


def precision(
    dtype: Any, memory_format: Any, *, dtype_name: str = "dtype", format_name: str = "memory_format"
) -> tuple[torch.dtype | None, torch.memory_format | None]:
    """Check a reduced-precision forward's ``(dtype, memory_format)`` pair.

    Example:
        >>> precision(torch.bfloat16, torch.channels_last)
        (torch.bfloat16, torch.channels_last)
    """
    if dtype not in PRECISION_DTYPES:
        raise ValueError(
            f"Expected `{dtype_name}` to be torch.bfloat16, torch.float16, torch.float32 or None, got {dtype!r}"
        )
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(
            f"Expected `{format_name}` to be torch.channels_last, torch.contiguous_format or None, got"
            f" {memory_format!r}"
        )
    return dtype, memory_format
