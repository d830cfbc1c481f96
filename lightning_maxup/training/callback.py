"""The ``MaxUp`` callback: the warm-up schedule and trainer-level overrides of the MaxUp options."""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_maxup._lightning import Callback, rank_zero_info, rank_zero_warn
from lightning_maxup._validation import non_negative_int, one_of, positive_float
from lightning_maxup.core.batch import Candidates, slice_rows
from lightning_maxup.core.config import MaxUpConfig
from lightning_maxup.training._bookkeeping import close_epoch_checks
from lightning_maxup.training._wiring import MultiViewWiring
from lightning_maxup.training.mixin import MaxUpMixin, require_maxup_module

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = ["BNStats", "MaxUp", "Ramp", "ramp_schedule"]

#: What a ramp after the warm-up eases in (``MaxUp(ramp=...)``).
Ramp = Literal["m", "temperature"]
#: Which rows update BatchNorm's running statistics once MaxUp runs (``MaxUp(bn_stats=...)``).
BNStats = Literal["selected", "clean"]
#: The switch-on warning compares the mean training loss of the first MaxUp epoch's first ``SWITCH_STEPS`` steps
#: with the mean of the warm-up's last epoch.
SWITCH_STEPS = 20
#: ... and warns when, over those steps, the selection pass's mean candidate loss exceeds ``SELECTION_FACTOR *
#: switch_warning`` times the trained loss.
SELECTION_FACTOR = 5


def ramp_schedule(
    k: int, ramp_epochs: int, m: int, ramp: Ramp = "m", temperature: float = 1.0
) -> tuple[int, float | None]:
    """The ``(m, selection_temperature)`` of ramp epoch ``k`` (0-based), or ``(m, None)`` once the ramp is over.

    ``ramp="m"`` raises the copies geometrically, ``m_k = round(m ** ((k + 1) / (ramp_epochs + 1)))`` (at least
    1), so ``m = 4`` over one epoch goes 1 → 2 → 4. ``ramp="temperature"`` trains on a copy drawn with probability
    ``softmax(L / τ_k)`` with ``τ_k = temperature * (ramp_epochs - k) / ramp_epochs``, from ``temperature`` down
    towards the arg-max, which takes over after the ramp.

    Example:
        >>> [ramp_schedule(k, 2, 4) for k in range(3)]
        [(2, None), (3, None), (4, None)]
        >>> [ramp_schedule(k, 2, 4, "temperature", 1.0) for k in range(3)]
        [(4, 1.0), (4, 0.5), (4, None)]
    """
    if k >= ramp_epochs:
        return m, None
    if ramp == "m":
        return max(1, round(m ** ((k + 1) / (ramp_epochs + 1)))), None
    return m, temperature * (ramp_epochs - k) / ramp_epochs


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

    **The switch.** After the warm-up the trained loss becomes each sample's worst copy's, larger than the
    ordinary loss, and at a learning rate tuned for ordinary augmentation that jump can throw training off (the
    first MaxUp epoch losing up to 58 points of validation accuracy, see the guide's "How it works"). Three things
    may ease it; in that measurement only the smaller learning rate was shown to:

    - ``ramp_epochs`` eases MaxUp in over that many epochs after the warm-up (:func:`ramp_schedule`): ``m`` raised
      geometrically (``ramp="m"``), or the trained copy drawn with a ``selection_temperature`` annealed from
      ``ramp_temperature`` towards the arg-max (``ramp="temperature"``).
    - ``bn_stats="clean"`` keeps BatchNorm's running statistics on the loader's batches instead of the worst
      copies: at every MaxUp step a forward without gradient runs ``per_sample_loss`` on the batch as loaded
      (copy 0 of loader-made candidates) in train mode, with :attr:`~lightning_maxup.MaxUpMixin.maxup_selecting`
      set and the global random state restored after, and the running statistics it leaves replace those the
      gradient forward on the selected copies leaves. Validation then normalises clean images with clean
      statistics (compare AdvProp's separate statistics for adversarial examples, Xie et al., CVPR 2020). It
      costs one forward of ``B`` rows per step, and changes nothing during the warm-up.
    - A smaller learning rate (the guide's "Options" says when).

    ``switch_warning`` warns once, naming these options, when over the first MaxUp epoch's first 20 steps
    (``SWITCH_STEPS``) the mean training loss exceeds ``switch_warning`` times the mean of the warm-up's last epoch,
    or the selection pass's mean candidate loss exceeds ``5 * switch_warning`` (``SELECTION_FACTOR``) times the
    trained loss. The second is what the measurement in the guide's "How it works" found: where the switch cost
    accuracy the trained (train-mode) loss looked normal, while the eval-mode loss of the candidates, scored with
    running statistics that no longer fit the batches, was 22-129 times larger (1.7-2.2 at a stable rate). The
    losses are summed on the device and read once per fit, at the end of the first MaxUp epoch: no step waits for
    the device. To see the selection loss the callback turns the module's ``maxup_record`` on for those 20 steps
    (the step's output stays in ``maxup_last_output`` until the next step replaces it). A fit resumed after the
    warm-up has no warm-up losses to compare with and does not warn.

    Under ``Trainer(fast_dev_run=...)`` the warm-up is skipped, so a dev run exercises MaxUp steps. A fit that
    can never reach a MaxUp step (``max_epochs <= warmup_epochs``, or ``max_steps`` reached before the warm-up
    ends) warns once, naming the cause.

    Wired once with :class:`~lightning_maxup.data.multiview.MultiView`: when the training loader holds a ``MultiView``
    (copies
    made in the workers), the callback sets its epoch and view count (one view per sample during the warm-up, ``m``
    after it) before every epoch's first batch, resumed fits and persistent workers included, and replays a
    ``shuffle=True`` loader's order on resume; no other callback, ``collate_fn`` or ``set_epoch`` is needed
    (details: ``lightning_maxup.training._wiring``).

    Args:
        warmup_epochs: Epochs of ordinary augmentation (``m = 1``) before MaxUp starts.
        m: Copies per sample once MaxUp runs; ``None`` keeps the module's ``m``.
        selection_size: Select on images downsampled to this side; ``None`` keeps the module's setting.
        ramp_epochs: Epochs after the warm-up that ease MaxUp in; ``0`` switches at once (the paper's switch).
        ramp: What the ramp eases in: ``"m"`` or ``"temperature"`` (see :func:`ramp_schedule`).
        ramp_temperature: The ``selection_temperature`` the ``"temperature"`` ramp starts from.
        bn_stats: ``"selected"`` (default) lets the trained (worst) copies update BatchNorm's running statistics;
            ``"clean"`` keeps them on the loader's batches.
        switch_warning: Warn when the loss right after the switch exceeds this multiple of the warm-up's last
            epoch (see above); ``None`` never warns.
        **overrides: Any other :class:`~lightning_maxup.MaxUpConfig` field to override (``chunk_size``,
            ``selection_view``, ``selection_mode``, ``selection_dtype``, ...), validated here.

    Example:
        >>> cb = MaxUp(warmup_epochs=5, m=4, selection_size=16)
        >>> cb.state_dict()["overrides"]
        {'m': 4, 'selection_size': 16}
        >>> MaxUp(bn_stats="worst")
        Traceback (most recent call last):
        ...
        ValueError: Expected `bn_stats` to be one of 'selected', 'clean', got 'worst'
        >>> MaxUp(chunk_size=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `chunk_size` to be a positive integer or None, got 0
    """

    #: Read by :class:`~lightning_maxup.MaxUpMixin`: this callback sets the epochs of loader-made candidates.
    sets_multiview_epochs = True

    def __init__(
        self,
        warmup_epochs: int = 5,
        m: int | None = None,
        selection_size: int | None = None,
        *,
        ramp_epochs: int = 0,
        ramp: Ramp = "m",
        ramp_temperature: float = 1.0,
        bn_stats: BNStats = "selected",
        switch_warning: float | None = 2.0,
        **overrides: Any,
    ) -> None:
        self.warmup_epochs = non_negative_int(warmup_epochs, "warmup_epochs")
        named = {"m": m, "selection_size": selection_size}
        self.overrides: dict[str, Any] = {k: v for k, v in {**named, **overrides}.items() if v is not None}
        MaxUpConfig().replace(**self.overrides)  # validates names and values now, before training
        self.ramp_epochs = non_negative_int(ramp_epochs, "ramp_epochs")
        self.ramp: Ramp = one_of(ramp, "ramp", ("m", "temperature"))
        self.ramp_temperature = positive_float(ramp_temperature, "ramp_temperature")
        self.bn_stats: BNStats = one_of(bn_stats, "bn_stats", ("selected", "clean"))
        self.switch_warning = None if switch_warning is None else positive_float(switch_warning, "switch_warning")
        self._skip_warmup = False
        self._saved: tuple[MaxUpConfig, bool] | None = None
        self._multiview = MultiViewWiring(self.active)
        self._bn_saved: list[tuple[Tensor, Tensor]] | None = None
        self._losses: dict[str, tuple[Tensor, int]] = {}  # what -> (loss sum on the device, steps)
        self._record_on = False  # this callback turned the module's maxup_record on for this step
        self._selection_mode = "eval"

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
        self._selection_mode = module.maxup_config.selection_mode
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
        self._apply_ramp(trainer.current_epoch, pl_module)

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
        module = require_maxup_module(pl_module, "MaxUp")
        if self.bn_stats == "clean":
            self._clean_bn_pass(module, batch)
        self._watch_selection(trainer, module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._restore_clean_bn()
        self._record_loss(trainer, require_maxup_module(pl_module, "MaxUp"), outputs)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_switch(trainer)
        # The module's per-epoch checks are read here, outside every step (a module's own hook may skip super();
        # without this callback they are read at the next epoch's first step or at the end of training).
        close_epoch_checks(require_maxup_module(pl_module, "MaxUp"))

    # ---------------------------------------------------------------------------------------------------------------
    # The switch: ramp, clean BatchNorm statistics, warning
    # ---------------------------------------------------------------------------------------------------------------
    def _ramp_step(self, epoch: int) -> int | None:
        """The ramp epoch ``epoch`` is in (0-based), or ``None`` outside the ramp."""
        if self.ramp_epochs == 0 or self._skip_warmup or not self.active(epoch):
            return None
        k = epoch - self.warmup_epochs
        return k if k < self.ramp_epochs else None

    def _apply_ramp(self, epoch: int, module: MaxUpMixin) -> None:
        """Set this epoch's ramped ``m`` or temperature; after the ramp, the fit's own options come back."""
        if self.ramp_epochs == 0 or self._saved is None:
            return
        target = self._fit_config(module)
        k = self._ramp_step(epoch)
        if k is not None:
            m, temperature = ramp_schedule(k, self.ramp_epochs, target.m, self.ramp, self.ramp_temperature)
            if temperature is not None:
                target = target.replace(selection_temperature=temperature)
            target = target.replace(m=m)
        current = module.maxup_config
        if (current.m, current.selection_temperature) != (target.m, target.selection_temperature):
            # Replaced only when it changes: the mixin rebuilds its step config when the object changes.
            module.maxup_config = current.replace(m=target.m, selection_temperature=target.selection_temperature)

    def _fit_config(self, module: MaxUpMixin) -> MaxUpConfig:
        """The options the fit runs with after the ramp: the module's own, with the overrides."""
        assert self._saved is not None
        config = self._saved[0]
        return config.replace(**self.overrides) if self.overrides else config

    def _clean_bn_pass(self, module: MaxUpMixin, batch: Any) -> None:
        """Update the running statistics on the loader's batch, without gradient, and keep them for the step's end."""
        self._bn_saved = None
        if not module.maxup_enabled or module.maxup_active_m == 1:
            return  # an ordinary step's forward is on an ordinary copy already
        norms = _running_norms(module)  # type: ignore[arg-type]
        if not norms:
            return
        if isinstance(batch, Candidates):
            batch = slice_rows(batch.batch, 0, batch.num_samples)
        devices = [d.index for d in {b.device for n in norms for b in _stats(n)} if d.type == "cuda"]
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            module.maxup_selecting = True
            try:
                module.per_sample_loss(batch)
            finally:
                module.maxup_selecting = False
        self._bn_saved = [(buf, buf.clone()) for n in norms for buf in _stats(n)]

    def _restore_clean_bn(self) -> None:
        saved, self._bn_saved = self._bn_saved, None
        for buf, value in saved or ():
            buf.copy_(value)

    def _watching(self, epoch: int) -> bool:
        """Whether ``epoch`` is the warm-up's last or the first MaxUp epoch of a fit that warms up and warns."""
        if self.switch_warning is None or self._skip_warmup or self.warmup_epochs == 0:
            return False
        return epoch in (self.warmup_epochs - 1, self.warmup_epochs)

    def _switch_steps_left(self, epoch: int) -> bool:
        return epoch == self.warmup_epochs and self._losses.get("after", (None, 0))[1] < SWITCH_STEPS

    def _watch_selection(self, trainer: pl.Trainer, module: MaxUpMixin) -> None:
        """Ask the mixin to keep the step's output during the first MaxUp steps (for the selection pass's loss)."""
        self._record_on = False
        watch = self._watching(trainer.current_epoch) and self._switch_steps_left(trainer.current_epoch)
        if watch and not module.maxup_record:  # another callback may have asked for this step's output already
            self._record_on = module.maxup_record = True

    def _record_loss(self, trainer: pl.Trainer, module: MaxUpMixin, outputs: Any) -> None:
        """Sum the losses on the device over the warm-up's last epoch and the first MaxUp steps (no read here)."""
        epoch = trainer.current_epoch
        out = module.maxup_last_output
        if self._record_on:  # turned off only if this callback turned it on; the next step drops the output
            module.maxup_record = self._record_on = False
        if not self._watching(epoch):
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        if epoch == self.warmup_epochs - 1:
            self._add("before", loss)
        elif self._switch_steps_left(epoch):
            self._add("after", loss)
            if out is not None and out.m > 1:
                self._add("selection", out.mean_candidate_loss)
                self._add("trained", loss)

    def _add(self, key: str, value: Tensor) -> None:
        total, steps = self._losses.get(key, (None, 0))
        value = value.detach().float().reshape(())
        self._losses[key] = (value if total is None else total + value, steps + 1)

    def _check_switch(self, trainer: pl.Trainer) -> None:
        """At the end of the first MaxUp epoch: one read of the sums, and the warning if a loss jumped."""
        if trainer.current_epoch != self.warmup_epochs or self.switch_warning is None:
            return
        losses, self._losses = self._losses, {}
        if "before" not in losses or "after" not in losses:
            return  # resumed after the warm-up, or no loss to read
        keys = [k for k in ("before", "after", "selection", "trained") if k in losses]
        means = dict(zip(keys, torch.stack([losses[k][0] / losses[k][1] for k in keys]).tolist(), strict=True))
        causes = []
        if means["after"] > self.switch_warning * means["before"]:
            causes.append(
                f"the training loss rose from {means['before']:.4g} (mean of the warm-up's last epoch) to"
                f" {means['after']:.4g} (mean of the first {losses['after'][1]} MaxUp steps)"
            )
        if "selection" in means and means["selection"] > SELECTION_FACTOR * self.switch_warning * means["trained"]:
            causes.append(
                f"the selection pass's loss of the candidates (mean {means['selection']:.4g}, in"
                f" `selection_mode`={self._selection_mode!r}) is more than {SELECTION_FACTOR} x `switch_warning`"
                f" times the trained loss ({means['trained']:.4g}): the running BatchNorm statistics no longer fit"
                " the batches"
            )
        if causes:
            rank_zero_warn(
                f"MaxUp's switch-on (`switch_warning`={self.switch_warning}): {'; and '.join(causes)}. Training may"
                " lose accuracy or collapse. Lower the learning rate (what helped where this was measured), or"
                " ease the switch with MaxUp(ramp_epochs=...) or keep BatchNorm statistics clean with"
                " MaxUp(bn_stats='clean')"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            "warmup_epochs": self.warmup_epochs,
            "overrides": _plain(self.overrides),
            **{k: v for k, v in self._switch_options().items() if v != _SWITCH_DEFAULTS[k]},
        }
        multiview_epoch = self._multiview.state()
        if multiview_epoch is not None:
            state["multiview_epoch"] = multiview_epoch  # the epoch a resumed fit's first batches are made at
        return state

    def _switch_options(self) -> dict[str, Any]:
        return {
            "ramp_epochs": self.ramp_epochs,
            "ramp": self.ramp,
            "ramp_temperature": self.ramp_temperature,
            "bn_stats": self.bn_stats,
            "switch_warning": self.switch_warning,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._multiview.load(state_dict.get("multiview_epoch"))
        keys = ("warmup_epochs", "overrides", *_SWITCH_DEFAULTS)
        saved = {k: state_dict[k] for k in state_dict if k in keys}
        now = {k: v for k, v in self.state_dict().items() if k in keys}
        if saved != now:
            rank_zero_warn(f"The MaxUp callback was saved with {saved} and resumes with {now}; the new settings apply")


#: The switch options' defaults; a ``state_dict`` names only those that differ (a 0.3 checkpoint matches).
_SWITCH_DEFAULTS: dict[str, Any] = {
    "ramp_epochs": 0,
    "ramp": "m",
    "ramp_temperature": 1.0,
    "bn_stats": "selected",
    "switch_warning": 2.0,
}


def _running_norms(module: nn.Module) -> list[nn.Module]:
    """The normalisation layers that track running statistics in train mode (BatchNorm, SyncBatchNorm, ...)."""
    return [
        n
        for n in module.modules()
        if isinstance(n, nn.modules.batchnorm._NormBase) and n.track_running_stats and n.running_mean is not None
    ]


def _stats(norm: nn.Module) -> list[Tensor]:
    return [b for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked) if isinstance(b, Tensor)]


def _plain(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides as checkpoint-safe values: functions by their qualified name, other objects by their repr."""
    return {k: v if isinstance(v, (int, float, str, bool)) else _name_of(v) for k, v in overrides.items()}


def _name_of(value: Any) -> str:
    """A name that is the same in every process (a function's ``repr`` holds its address)."""
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)
