"""The ``MaxUp`` callback: the warm-up schedule and trainer-level overrides of ``m`` and ``selection_size``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from lightning_maxup.functional import _validate_m as validate_m
from lightning_maxup.functional import _validate_optional_positive_int as validate_optional_positive_int
from lightning_maxup.mixin import MaxUpMixin

__all__ = ["MaxUp"]


class MaxUp(Callback):
    """Schedule MaxUp: ``warmup_epochs`` of ordinary augmentation, then MaxUp with ``m`` copies.

    The paper trains 5 epochs with ordinary augmentation before switching MaxUp on (Gong et al., 2021, Sec. 4).
    The schedule is a function of ``trainer.current_epoch`` alone, set at the start of every epoch and batch,
    so a run resumed from a checkpoint saved mid-warm-up or mid-epoch follows it exactly. The callback only
    sets the module's public ``maxup_*`` attributes; the loss logic stays in :class:`~lightning_maxup.MaxUpMixin`.

    Args:
        warmup_epochs: Epochs of ordinary augmentation (``m = 1``) before MaxUp starts.
        m: Copies per sample once MaxUp runs; ``None`` keeps the module's ``m``.
        selection_size: Select on images downsampled to this side; ``None`` keeps the module's setting.

    Example:
        >>> cb = MaxUp(warmup_epochs=5, m=4, selection_size=16)
        >>> cb.state_dict()
        {'warmup_epochs': 5, 'm': 4, 'selection_size': 16}
    """

    def __init__(self, warmup_epochs: int = 5, m: int | None = None, selection_size: int | None = None) -> None:
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"Expected `warmup_epochs` to be a non-negative integer, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self.m = None if m is None else validate_m(m)
        self.selection_size = validate_optional_positive_int(selection_size, "selection_size")

    def active(self, epoch: int) -> bool:
        """Whether MaxUp runs in ``epoch`` (0-based)."""
        return epoch >= self.warmup_epochs

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, MaxUpMixin):
            raise TypeError(
                f"The MaxUp callback needs a LightningModule that subclasses MaxUpMixin, got {type(pl_module).__name__}"
            )

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, MaxUpMixin)
        pl_module.maxup_enabled = self.active(trainer.current_epoch)
        if self.m is not None:
            pl_module.maxup_m = self.m
        if self.selection_size is not None:
            pl_module.maxup_selection_size = self.selection_size

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warmup_epochs": self.warmup_epochs, "m": self.m, "selection_size": self.selection_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict.get(k) for k in ("warmup_epochs", "m", "selection_size")}
        if saved != self.state_dict():
            rank_zero_warn(
                f"The MaxUp callback was saved with {saved} and resumes with {self.state_dict()};"
                " the new settings apply"
            )
