"""Timing callbacks for comparing training recipes."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

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
