"""Timing callbacks for comparing training recipes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from typing_extensions import override

from lightning_maxup._lightning import Callback

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = ["EpochTimer"]


class EpochTimer(Callback):
    """Record the wall-clock seconds of every training epoch in :attr:`seconds`.

    Example:
        >>> timer = EpochTimer()
        >>> timer.seconds
        []
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)
