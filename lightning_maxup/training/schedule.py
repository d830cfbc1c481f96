"""Keep each :class:`~lightning_maxup.data.multiview.MultiView` in step with the trainer's epoch and MaxUp."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_maxup._lightning import (
    Callback,
    pl,  # noqa: F401 (doctests)
    rank_zero_warn,
)
from lightning_maxup._validation import non_negative_int
from lightning_maxup.data.multiview import MultiView
from lightning_maxup.training._wiring import check_same_seed, multiview_datasets
from lightning_maxup.training.callback import MaxUp
from lightning_maxup.training.mixin import MaxUpMixin

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl as _pl

__all__ = ["MultiViewSchedule", "training_epoch"]


_multiview_datasets = multiview_datasets  # the name before 0.4


def training_epoch(trainer: Any) -> int:
    """The epoch the trainer's fit loop runs next, as its samplers' ``set_epoch`` gets it; for ``train_dataloader()``.

    ``trainer.current_epoch`` counts completed epochs: in the ``train_dataloader()`` of a fit resumed from a
    checkpoint saved at an epoch's end it is one behind the epoch about to run. The fit loop's count of processed
    epochs is not, and it is what Lightning passes to ``DistributedSampler.set_epoch``. In ``train_dataloader()``:
    ``self.train_set.set_epoch(training_epoch(self.trainer))``.

    Example:
        >>> training_epoch(pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False))
        0
    """
    return int(trainer.fit_loop.epoch_progress.current.processed)


class MultiViewSchedule(Callback):
    """Deprecated since 0.4: the :class:`~lightning_maxup.MaxUp` callback drives the training loader's MultiView.

    Beside a ``MaxUp`` callback this one does nothing but check that its ``warmup_epochs`` (when given) is the
    ``MaxUp`` callback's: two warm-ups would make one-view batches for MaxUp steps. Without a ``MaxUp`` callback it
    sets the epoch and ``m`` views at every epoch start, as before.

    With several ranks, when training starts, it checks that every rank built the ``MultiView`` with rank 0's seed
    and raises otherwise (it does not set rank 0's seed: the workers may have made batches with their own).

    Args:
        warmup_epochs: Epochs of one view before ``m``; ``None`` follows the trainer's ``MaxUp`` callback (or
            makes ``m`` views throughout when there is none).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     MultiViewSchedule(warmup_epochs=2).views(epoch=1, m=4), MultiViewSchedule(warmup_epochs=2).views(2, 4)
        (1, 4)
    """

    sets_multiview_epochs = True

    def __init__(self, warmup_epochs: int | None = None) -> None:
        warnings.warn(
            "MultiViewSchedule is deprecated since lightning_maxup 0.4 and will be removed: the MaxUp callback now"
            " sets the training MultiView's epoch and views; use Trainer(callbacks=[MaxUp(...)]) alone",
            DeprecationWarning,
            stacklevel=2,
        )
        self.warmup_epochs = None if warmup_epochs is None else non_negative_int(warmup_epochs, "warmup_epochs")

    def views(self, epoch: int, m: int, maxup: MaxUp | None = None, fast_dev_run: bool = False) -> int:
        """Views per item in ``epoch``: ``m`` when MaxUp runs then, else 1.

        With ``warmup_epochs=None`` the ``maxup`` callback decides (``fast_dev_run`` skips its warm-up, as it does);
        without either, ``m``.
        """
        if self.warmup_epochs is not None:
            return m if epoch >= self.warmup_epochs else 1
        if maxup is None:
            return m
        return m if fast_dev_run or maxup.active(epoch) else 1

    @staticmethod
    def _maxup(trainer: _pl.Trainer) -> MaxUp | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, MaxUp)), None)  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule, stage: str) -> None:
        maxup = self._maxup(trainer)
        if stage == "fit" and maxup is not None and self.warmup_epochs not in (None, maxup.warmup_epochs):
            raise ValueError(
                f"MultiViewSchedule's `warmup_epochs`={self.warmup_epochs} differs from the MaxUp callback's"
                f" `warmup_epochs`={maxup.warmup_epochs}: MaxUp steps would get one-view batches. Remove"
                " MultiViewSchedule (the MaxUp callback sets the views now)"
            )

    def _apply(self, trainer: _pl.Trainer, datasets: list[MultiView]) -> None:
        epoch = int(trainer.current_epoch)
        for dataset in datasets:
            dataset.set_epoch(epoch)
            dataset.set_views(self.views(epoch, dataset.m))

    def _datasets(self, trainer: _pl.Trainer) -> list[MultiView]:
        pairs = multiview_datasets(trainer.train_dataloader)
        if not pairs:
            raise ValueError(
                "MultiViewSchedule found no MultiView in the training DataLoader(s), got"
                f" {type(trainer.train_dataloader).__name__}; wrap the training dataset in"
                " lightning_maxup.data.multiview.MultiView, or remove the callback"
            )
        return [dataset for _, dataset in pairs]

    @override
    def on_train_start(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        datasets = self._datasets(trainer)
        if self._maxup(trainer) is not None:
            return  # the MaxUp callback checks and sets them
        for dataset in datasets:
            if isinstance(pl_module, MaxUpMixin) and dataset.m != pl_module.maxup_config.m:
                raise ValueError(
                    f"The training loader's MultiView makes `m`={dataset.m} views per sample, but the module's MaxUp"
                    f" `m` is {pl_module.maxup_config.m}; give both the same value"
                )
            check_same_seed(trainer, dataset)
            if dataset.epoch != trainer.current_epoch:
                rank_zero_warn(
                    f"The training loader's first batches were made at epoch {dataset.epoch}, not the trainer's"
                    f" {trainer.current_epoch}: Lightning starts a resumed fit's loader before any callback hook;"
                    " call `dataset.set_epoch(lightning_maxup.training.schedule.training_epoch(self.trainer))`"
                    " in train_dataloader()"
                )
        self._apply(trainer, datasets)

    @override
    def on_train_epoch_start(self, trainer: _pl.Trainer, pl_module: _pl.LightningModule) -> None:
        if self._maxup(trainer) is None:
            self._apply(trainer, self._datasets(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warmup_epochs": self.warmup_epochs}
