"""Count the ops that make the host wait for the device, under a ``TorchDispatchMode``.

On a CPU nothing waits, so a CPU test cannot time a sync; it can see the ops that *would* sync on an accelerator:

* ``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``.tolist()``;
* ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*`` and indexing with a boolean mask (``x[x > 0]``):
  outputs whose shape depends on the data;
* ``aten.lift_fresh`` / ``lift_fresh_copy``: a tensor built from Python data (``torch.tensor``, ``torch.as_tensor``
  of a list or a number), on CUDA a synchronous host-to-device copy;
* ``Tensor.tolist()`` and ``Tensor.numpy()``, which on a CPU tensor dispatch no op: the counter wraps them while
  it runs;
* ``blocking_copy``: a copy between devices (``aten._to_copy``, ``aten.copy_``) to or from a device other than the
  CPU without ``non_blocking=True``. On CUDA a blocking copy waits for the whole stream. Tests use the ``meta``
  device as the target, where the copy's flags are recorded like anywhere else (``SyncCounter.copies``).

torchmetrics keeps ``update()`` free of these; ``tests/guarantees/test_no_syncs.py`` holds the MaxUp step to the same
rule.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNCING_OPS", "SyncCounter", "cross_device_copy", "is_blocking_copy", "is_syncing"]

#: Overload packets whose every call is a sync (or a host-to-device copy of Python data).
SYNCING_OPS: frozenset[str] = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "nonzero_static",  # no sync on CUDA, but listed so a test notices it; see is_syncing
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "lift_fresh",
        "lift_fresh_copy",
    }
)


#: Tensor methods that read the data on the host without an aten op that the mode could see on the CPU.
_READ_ON_HOST = ("tolist", "numpy")


#: Indexing ops that sync when an index is a boolean mask (its ``nonzero`` runs inside the op on the CPU).
_MASK_INDEXED = frozenset({"index", "_index_put_impl_", "index_put", "index_put_"})


def cross_device_copy(func: Any, args: Any = (), kwargs: Any = None) -> tuple[str, str, bool] | None:
    """``(source device type, target device type, non_blocking)`` if ``func`` copies between devices, else None."""
    name, kwargs = func.overloadpacket.__name__, kwargs or {}
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        target = kwargs.get("device")
        if target is None or torch.device(target) == args[0].device:
            return None
        return args[0].device.type, torch.device(target).type, bool(kwargs.get("non_blocking", False))
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[0].device != args[1].device:
        flag = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[1].device.type, args[0].device.type, bool(flag)
    return None


def is_blocking_copy(copy: tuple[str, str, bool] | None) -> bool:
    """Whether a copy found by :func:`cross_device_copy` involves a device other than the CPU and blocks."""
    return copy is not None and not copy[2] and (copy[0] != "cpu" or copy[1] != "cpu")


def is_syncing(func: Any, args: Any = (), kwargs: Any = None) -> bool:
    """Whether the aten op ``func`` (an ``OpOverload``) called with ``args`` makes the host wait for the device."""
    name = func.overloadpacket.__name__
    if name in ("_to_copy", "copy_"):
        return is_blocking_copy(cross_device_copy(func, args, kwargs))
    if name in _MASK_INDEXED and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    return name in SYNCING_OPS and name != "nonzero_static"


@dataclass
class _Sync:
    op: str
    where: str


def _caller() -> str:
    """The innermost frames outside torch and this module: where the sync came from."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


class SyncCounter(TorchDispatchMode):
    """Record every syncing op run inside ``with SyncCounter() as c:``; ``c.ops`` lists their names.

    Example:
        >>> x = torch.arange(3)
        >>> with SyncCounter() as c:
        ...     _ = x + 1
        ...     _ = int(x.sum())
        >>> c.ops
        ['_local_scalar_dense']
        >>> with SyncCounter() as c:
        ...     _ = x.to("meta")
        ...     _ = x.to("meta", non_blocking=True)
        >>> c.ops, c.copies
        (['blocking_copy'], [('cpu', 'meta', False), ('cpu', 'meta', True)])
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[_Sync] = []
        #: Every copy between devices: ``(source device type, target device type, non_blocking)``.
        self.copies: list[tuple[str, str, bool]] = []
        self._patched: dict[str, Any] = {}

    def __enter__(self) -> SyncCounter:
        # A CPU tensor's ``tolist()`` and ``numpy()`` read its memory without dispatching an op (on CUDA they copy
        # to the host first), so the mode cannot see them: wrap them for as long as the counter runs.
        for name in _READ_ON_HOST:
            original = getattr(torch.Tensor, name)
            self._patched[name] = original
            setattr(torch.Tensor, name, self._recording(name, original))
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()

    def _recording(self, name: str, original: Any) -> Any:
        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.syncs.append(_Sync(name, _caller()))
            return original(tensor, *args, **kwargs)

        return method

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        copy = cross_device_copy(func, args, kwargs)
        if copy is not None:
            self.copies.append(copy)
            if is_blocking_copy(copy):
                self.syncs.append(_Sync("blocking_copy", _caller()))
        elif is_syncing(func, args, kwargs):
            self.syncs.append(_Sync(func.overloadpacket.__name__, _caller()))
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> list[str]:
        """Names of the syncing ops, in the order they ran."""
        return [s.op for s in self.syncs]

    def report(self) -> str:
        """One line per sync: the op and the innermost frames of library or test code that ran it."""
        return "\n".join(f"  {s.op}: {s.where}" for s in self.syncs) or "  (none)"
