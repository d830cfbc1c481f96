"""Copies to a device that leave the host free: Lightning's rule for plain tensors, applied everywhere.

Lightning's batch transfer (``move_data_to_device``) copies a tensor with ``non_blocking=True`` to any device but
the CPU and MPS; an object with a ``.to`` method of its own (:class:`~lightning_maxup.core.batch.Candidates`,
:class:`~lightning_maxup.core.batch.Shared`) is called with the device alone. A blocking copy to CUDA waits for the
whole stream (the previous step's backward and optimizer included): one device sync per copy. The wrappers and
the samplers that draw on the host therefore choose the flag as Lightning does for a plain tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCKING_DEVICE_TYPES", "non_blocking_for", "to_device", "transfer_kwargs"]

#: Device types Lightning copies to without ``non_blocking`` (``lightning_fabric``'s ``_BLOCKING_DEVICE_TYPES``).
BLOCKING_DEVICE_TYPES = ("cpu", "mps")


def non_blocking_for(device: torch.device | str | int) -> bool:
    """Whether Lightning copies a plain tensor to ``device`` with ``non_blocking=True``.

    Example:
        >>> non_blocking_for("cpu"), non_blocking_for("meta")
        (False, True)
    """
    return torch.device(device).type not in BLOCKING_DEVICE_TYPES


def transfer_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a ``.to(*args, **kwargs)`` call with ``non_blocking`` chosen as Lightning does.

    An explicit ``non_blocking`` (keyword or positional) is kept; a call to a device that Lightning copies plain
    tensors to without blocking gets ``non_blocking=True``.

    Example:
        >>> transfer_kwargs(("meta",), {})
        {'non_blocking': True}
        >>> transfer_kwargs(("cpu",), {}), transfer_kwargs((torch.float16,), {})
        ({}, {})
    """
    if "non_blocking" in kwargs or any(isinstance(a, bool) for a in args):
        return kwargs
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, Tensor):
        target = target.device
    if not isinstance(target, (str, int, torch.device)) or isinstance(target, bool):
        return kwargs
    try:
        device = torch.device(target)
    except (RuntimeError, TypeError):
        return kwargs
    return {**kwargs, "non_blocking": True} if non_blocking_for(device) else kwargs


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a host tensor bound for CUDA is pinned first and copied without blocking the host.

    Example:
        >>> to_device(torch.ones(2), torch.device("meta")).device
        device(type='meta')
    """
    if t.device == device:
        return t
    if not non_blocking_for(device):
        return t.to(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        # A non-blocking copy from pageable memory is staged synchronously; from pinned memory it is queued.
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
