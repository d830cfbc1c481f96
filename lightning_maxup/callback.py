"""The ``MaxUp`` callback: the warm-up schedule and trainer-level overrides of the MaxUp options."""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_maxup._lightning import Callback, rank_zero_info, rank_zero_warn
from lightning_maxup._validation import non_negative_int
from lightning_maxup._wiring import MultiViewWiring
from lightning_maxup.config import MaxUpConfig
from lightning_maxup.mixin import MaxUpMixin, require_maxup_module

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = ["MaxUp"]


class MaxUp(Callback):
    """Schedule MaxUp: ``warmup_epochs`` of ordinary augmentation, then MaxUp, with options overridden.

    The paper trains 5 epochs with ordinary augmentation before switching MaxUp on (Gong et al., 2021, Sec. 4).
    The schedule is a function of ``trainer.current_epoch`` alone, set at the start of every epoch and batch,
    so a run resumed from a checkpoint saved mid-warm-up or mid-epoch follows it exactly. The callback only
    sets the module's public ``maxup_enabled`` and ``maxup_config``; the loss logic stays in
    :class:`~lightning_maxup.MaxUpMixin`.

    The overrides apply to ``fit`` alone: a Trainer used only to ``validate``, ``test`` or ``predict`` leaves the
    module's options as they are, and when a fit ends the module's own options and ``maxup_enabled`` come back.
    The first epoch's regime is set in ``setup``, so ``Tuner.lr_find`` (which swaps the Trainer's callbacks out
    while it runs) tunes the regime the fit starts with.

    Under ``Trainer(fast_dev_run=...)`` the warm-up is skipped, so a dev run exercises MaxUp steps. A fit that
    can never reach a MaxUp step (``max_epochs <= warmup_epochs``, or ``max_steps`` reached before the warm-up
    ends) warns once, naming the cause.

    Wired once with :class:`~lightning_maxup.data.MultiView`: when the training loader holds a ``MultiView`` (copies
    made in the workers), the callback sets its epoch and view count (one view per sample during the warm-up, ``m``
    after it) before every epoch's first batch, resumed fits and persistent workers included, and replays a
    ``shuffle=True`` loader's order on resume; no other callback, ``collate_fn`` or ``set_epoch`` is needed
    (details: ``lightning_maxup._wiring``).

    Args:
        warmup_epochs: Epochs of ordinary augmentation (``m = 1``) before MaxUp starts.
        m: Copies per sample once MaxUp runs; ``None`` keeps the module's ``m``.
        selection_size: Select on images downsampled to this side; ``None`` keeps the module's setting.
        **overrides: Any other :class:`~lightning_maxup.MaxUpConfig` field to override (``chunk_size``,
            ``selection_view``, ``selection_mode``, ``selection_dtype``, ...), validated here.

    Example:
        >>> cb = MaxUp(warmup_epochs=5, m=4, selection_size=16)
        >>> cb.state_dict()
        {'warmup_epochs': 5, 'overrides': {'m': 4, 'selection_size': 16}}
        >>> MaxUp(chunk_size=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `chunk_size` to be a positive integer or None, got 0
    """

    #: Read by :class:`~lightning_maxup.MaxUpMixin`: this callback sets the epochs of loader-made candidates.
    sets_multiview_epochs = True

    def __init__(
        self, warmup_epochs: int = 5, m: int | None = None, selection_size: int | None = None, **overrides: Any
    ) -> None:
        self.warmup_epochs = non_negative_int(warmup_epochs, "warmup_epochs")
        named = {"m": m, "selection_size": selection_size}
        self.overrides: dict[str, Any] = {k: v for k, v in {**named, **overrides}.items() if v is not None}
        MaxUpConfig().replace(**self.overrides)  # validates names and values now, before training
        self._skip_warmup = False
        self._saved: tuple[MaxUpConfig, bool] | None = None
        self._multiview = MultiViewWiring(self.active)

    @property
    def m(self) -> int | None:
        """The overridden ``m``, or ``None``."""
        return self.overrides.get("m")

    @property
    def selection_size(self) -> int | None:
        """The overridden ``selection_size``, or ``None``."""
        return self.overrides.get("selection_size")

    def active(self, epoch: int) -> bool:
        """Whether MaxUp runs in ``epoch`` (0-based)."""
        return self._skip_warmup or epoch >= self.warmup_epochs

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = require_maxup_module(pl_module, "MaxUp")
        if stage != "fit":
            return
        self._saved = (module.maxup_config, module.maxup_enabled)
        if self.overrides:
            module.maxup_config = module.maxup_config.replace(**self.overrides)
        self._skip_warmup = bool(getattr(trainer, "fast_dev_run", False)) and self.warmup_epochs > 0
        self._apply(trainer, pl_module)
        self._multiview.setup(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._multiview.end()
        if stage != "fit" or self._saved is None or not isinstance(pl_module, MaxUpMixin):
            return
        config, enabled = self._saved
        # The seed the fit resolved (or received from rank 0) stays: the stream goes on from where it stopped.
        pl_module.maxup_config = config.replace(seed=pl_module.maxup_config.seed)
        pl_module.maxup_enabled = enabled
        self._saved = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception: restore the module's options here.
        self.teardown(trainer, pl_module, "fit")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._multiview.fit_start(require_maxup_module(pl_module, "MaxUp").maxup_resolved_seed())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._multiview.train_start(trainer, require_maxup_module(pl_module, "MaxUp").maxup_config.m)
        if self._skip_warmup:
            rank_zero_info("MaxUp: `fast_dev_run` skips the warm-up, so the dev run exercises MaxUp steps")
            return
        cause = self.never_active_cause(trainer)
        if cause is not None:
            rank_zero_warn(f"This fit never runs a MaxUp step: {cause}")

    def never_active_cause(self, trainer: pl.Trainer) -> str | None:
        """Why ``trainer`` will stop before the warm-up ends, or ``None`` if MaxUp gets to run."""
        if self.warmup_epochs == 0:
            return None
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and max_epochs <= self.warmup_epochs:
            return f"`max_epochs`={max_epochs} is not above the MaxUp callback's `warmup_epochs`={self.warmup_epochs}"
        batches = trainer.num_training_batches
        if trainer.max_steps >= 0 and isinstance(batches, int) and batches > 0:
            per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
            warmup_steps = per_epoch * self.warmup_epochs
            if trainer.max_steps <= warmup_steps:
                return (
                    f"`max_steps`={trainer.max_steps} is reached within the {self.warmup_epochs} warm-up epochs"
                    f" ({warmup_steps} optimizer steps)"
                )
        return None

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, MaxUpMixin)
        pl_module.maxup_enabled = self.active(trainer.current_epoch)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)
        self._multiview.epoch_start(trainer, require_maxup_module(pl_module, "MaxUp").maxup_resolved_seed())

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)
        self._multiview.batch_start()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"warmup_epochs": self.warmup_epochs, "overrides": _plain(self.overrides)}
        multiview_epoch = self._multiview.state()
        if multiview_epoch is not None:
            state["multiview_epoch"] = multiview_epoch  # the epoch a resumed fit's first batches are made at
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._multiview.load(state_dict.get("multiview_epoch"))
        keys = ("warmup_epochs", "overrides")
        saved = {k: state_dict.get(k) for k in keys}
        if saved != {k: self.state_dict()[k] for k in keys}:
            rank_zero_warn(
                f"The MaxUp callback was saved with {saved} and resumes with {self.state_dict()};"
                " the new settings apply"
            )


def _plain(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides as checkpoint-safe values: functions by their qualified name, other objects by their repr."""
    return {k: v if isinstance(v, (int, float, str, bool)) else _name_of(v) for k, v in overrides.items()}


def _name_of(value: Any) -> str:
    """A name that is the same in every process (a function's ``repr`` holds its address)."""
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)
