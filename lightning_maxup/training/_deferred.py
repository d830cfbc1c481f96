"""Device values the host reads a fixed number of steps late, so that no step waits for the device.

On an accelerator the host runs ahead of the device: reading a value the current step computes (``.item()``,
``int(t)``) waits until the device has finished everything queued before it, the previous step's backward and
optimizer included. The two readings MaxUp makes every step are therefore deferred:

- :class:`StepClock`, the share of the time between steps spent selecting (``maxup/selection_share``), timed with
  CUDA events and read ``lag`` steps later;
- :class:`FiniteGuard`, the count of non-finite losses (``check_finite``), copied to pinned host memory without
  blocking and read ``lag`` steps later, or sooner when the caller flushes it (the mixin does at the last batch of
  an epoch, at the last step of ``max_steps``, when the module's ``state_dict`` is taken for a checkpoint, and at
  the end of training).

:class:`HostCopy` is the copy both make (``SelectionFidelity`` reads its agreement through one too).

Each waits, when it reads, only on an event the device passed long ago (it runs at most a step or two behind);
every rank reads on the same steps. On the CPU, where nothing waits, both read at once.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_maxup.core.functional import check_finite, raise_if_nonfinite

__all__ = ["FiniteGuard", "HostCopy", "StepClock"]


class HostCopy:
    """A device scalar copied to host memory without blocking, read once the device has passed the copy.

    On CUDA the copy goes to pinned memory with ``non_blocking=True`` and an event is recorded after it; on the CPU
    it is an ordinary copy. :meth:`read` waits on the event (which the device has passed if the read comes a step
    or more later) and reads the host buffer through its memory: the buffer is host memory on every machine, so the
    read waits for nothing (``.item()`` would, to a sync counter, look like a read of device data).

    Args:
        value: A one-element tensor.
        event: Makes the event recorded after the copy (default ``torch.cuda.Event`` on CUDA, none elsewhere).

    Example:
        >>> HostCopy(torch.tensor(3)).read()
        3.0
    """

    def __init__(self, value: Tensor, event: Callable[[], Any] | None = None) -> None:
        value = value.detach()
        cuda = value.device.type == "cuda"
        self.host = torch.empty((), dtype=torch.float64, pin_memory=cuda)
        # Other accelerators copy blocking (Lightning's rule for MPS); CUDA and the CPU without waiting.
        self.host.copy_(value.reshape(()), non_blocking=cuda or value.device.type == "cpu")
        make_event = event or (torch.cuda.Event if cuda else None)
        self.event = make_event() if make_event is not None else None
        if self.event is not None:
            self.event.record()

    def read(self) -> float:
        """The value, after waiting on the copy's event."""
        if self.event is not None:
            self.event.synchronize()
        return float(ctypes.c_double.from_address(self.host.data_ptr()).value)


class StepClock:
    """Share of the time between consecutive steps spent selecting, without stalling on the device.

    On the CPU the share is the previous step's selection seconds over the host time from its start to this
    step's start (backward, optimizer and data loading included). On CUDA, events are recorded at each step's
    start and at the end of its selection; a step's share is read ``lag`` selecting steps later, waiting on an
    event the device passed long ago (it runs at most a step or two behind), so every rank reports on the same
    steps (the epoch value is reduced over ranks) and no step waits for the device.

    Example:
        >>> clock = StepClock()
        >>> clock.tick(torch.device("cpu")) is None  # no earlier step yet
        True
    """

    lag = 2

    def __init__(self) -> None:
        self._start = 0.0
        self._selection: float | None = None
        self._open: list[Any] | None = None  # CUDA: [start, selected] of the running step
        self._closed: list[tuple[Any, Any, Any]] = []  # CUDA: (start, selected, next start), oldest first

    def tick(self, device: torch.device) -> float | None:
        """Start a step; return an earlier step's selection share, or ``None``."""
        if device.type != "cuda":
            now, selection = time.perf_counter(), self._selection
            total, self._start, self._selection = now - self._start, now, None
            return selection / total if selection is not None and total > 0 else None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if self._open is not None and self._open[1] is not None:
            self._closed.append((self._open[0], self._open[1], start))
        self._open = [start, None]
        if len(self._closed) <= self.lag:
            return None
        begin, selected, end = self._closed.pop(0)
        end.synchronize()  # recorded `lag` steps ago: long done
        total = begin.elapsed_time(end)
        return begin.elapsed_time(selected) / total if total > 0 else None

    def selection_done(self, seconds: float) -> None:
        """Mark the end of this step's selection."""
        if self._open is None:
            self._selection = seconds
            return
        selected = torch.cuda.Event(enable_timing=True)
        selected.record()
        self._open[1] = selected


class FiniteGuard:
    """Raise ``FloatingPointError`` on non-finite losses without a host sync per step on accelerators.

    On the CPU the count is checked at once. On an accelerator the count is copied to (pinned) host memory without
    blocking and an event recorded; the count of the step that called the guard ``t`` is read during the call of
    step ``t + lag`` (or at :meth:`flush`), waiting on that event, which the device has long passed by then, so the
    check costs no stall and every rank raises at the same step.

    Args:
        read_at_once: Device types whose counts are read at the call (where reading waits for nothing).
        event: Makes the event recorded after the count's copy (default ``torch.cuda.Event`` on CUDA, none
            elsewhere); a test passes a fake one to run the deferred branch on the CPU.

    Example:
        >>> guard = FiniteGuard()
        >>> guard(torch.tensor([0.5, float("nan")]), "candidate losses")  # on the CPU: at once
        Traceback (most recent call last):
        ...
        FloatingPointError: 1 of 2 candidate losses are NaN or infinite; check the model, the learning rate and the augmentation (or pass check_finite=False)
    """  # noqa: E501

    lag = 2

    def __init__(self, read_at_once: tuple[str, ...] = ("cpu",), event: Callable[[], Any] | None = None) -> None:
        self.read_at_once = read_at_once
        self.event = event
        self._pending: list[tuple[HostCopy, int, str]] = []

    @property
    def pending(self) -> int:
        """Counts copied but not read yet."""
        return len(self._pending)

    def __call__(self, losses: Tensor, what: str) -> None:
        """Check ``losses`` (at once, or record their count and read the one from ``lag`` calls ago)."""
        losses = losses.detach()
        if losses.device.type in self.read_at_once:
            check_finite(losses, what)
            return
        bad = HostCopy((~torch.isfinite(losses)).sum(), self.event)
        self._pending.append((bad, losses.numel(), what))
        while len(self._pending) > self.lag:
            self._read(*self._pending.pop(0))

    def flush(self) -> None:
        """Read every pending count, oldest first (one wait, not one per step)."""
        pending, self._pending = self._pending, []
        for entry in pending:
            self._read(*entry)

    @staticmethod
    def _read(bad: HostCopy, total: int, what: str) -> None:
        raise_if_nonfinite(int(bad.read()), total, what)
