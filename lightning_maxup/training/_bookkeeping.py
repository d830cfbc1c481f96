"""What ``MaxUpMixin`` does around its step: preparing a fit, the deferred checks, one-time warnings, logging.

Functions of the module (a ``MaxUpMixin``), kept out of the class so that the class shows only what a user meets.
The deferred readings themselves (:class:`~lightning_maxup.training._deferred.StepClock`,
:class:`~lightning_maxup.training._deferred.FiniteGuard`) and the per-epoch checks
(:class:`~lightning_maxup.training._epoch_checks.EpochChecks`) live in their own modules; this one wires them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_maxup._lightning import rank_zero_warn
from lightning_maxup.core.batch import Candidates, batch_size, expand_copies, slice_rows
from lightning_maxup.core.config import MaxUpConfig
from lightning_maxup.core.functional import (
    MaxUpOutput,
    augment_rows,
    check_candidates,
    check_per_sample,
    selection_losses,
)
from lightning_maxup.core.random import Generator, KeyedGenerator
from lightning_maxup.training._deferred import FiniteGuard, StepClock
from lightning_maxup.training._epoch_checks import EpochChecks
from lightning_maxup.training._stream_state import add_child, legacy_checkpoint_state

__all__ = [
    "MaxUpHooks",
    "after_step",
    "close_checks",
    "kept_state",
    "num_chunks",
    "prepare",
    "preflight",
    "runtime_state",
    "samples",
    "step_config",
    "trainer_of",
    "warn_identity",
    "warn_once",
    "world_size_of",
]


def runtime_state() -> dict[str, Any]:
    """The per-fit attributes of a fresh module (a pickled copy gets them anew: it prepares itself again)."""
    return {
        "_maxup_prepared_for": None,  # (weak reference to the Trainer or None,) once prepared
        "_maxup_clock": StepClock(),
        "_maxup_finite": FiniteGuard(),
        "_maxup_epoch_checks": EpochChecks(),
        "maxup_last_output": None,
    }


def kept_state() -> dict[str, Any]:
    """The other attributes of a fresh module (a pickled copy keeps them)."""
    return {"_maxup_warned": set(), "_maxup_generator": None, "_maxup_cached_config": None}


def trainer_of(module: Any) -> Any:
    return getattr(module, "_trainer", None)


def world_size_of(module: Any) -> int:
    trainer = trainer_of(module)
    return int(getattr(trainer, "world_size", 1)) if trainer is not None else 1


def warn_once(module: Any, key: str, message: str) -> None:
    if key not in module._maxup_warned:
        module._maxup_warned.add(key)
        rank_zero_warn(message)


def samples(batch: Any) -> Any:
    """The ``B`` samples of a batch: copy 0 of premade candidates, or the batch itself."""
    if isinstance(batch, Candidates):
        return slice_rows(batch.batch, 0, batch.num_samples)
    return batch


def num_samples(batch: Any) -> int:
    return batch.num_samples if isinstance(batch, Candidates) else batch_size(batch)


def last_step_of_run(trainer: Any) -> bool:
    """Whether the running training step is the last of its epoch or of ``max_steps`` (public Trainer state)."""
    if trainer is None:
        return False
    max_steps = getattr(trainer, "max_steps", -1)
    last_step = max_steps is not None and max_steps > 0 and trainer.global_step + 1 >= max_steps
    return bool(getattr(trainer, "is_last_batch", False)) or last_step


_samples, _num_samples, _last_step_of_run = samples, num_samples, last_step_of_run  # their 0.3 names (mixin)


# ---------------------------------------------------------------------------------------------------------------
# Preparing a fit
# ---------------------------------------------------------------------------------------------------------------
def prepare(module: Any, batch: Any) -> None:
    """Once per Trainer, at its first step: the seed of rank 0, the agreed chunk count, the pre-flight check."""
    trainer = trainer_of(module)
    prepared = module._maxup_prepared_for
    if prepared is not None and (prepared[0]() if prepared[0] is not None else None) is trainer:
        return
    key = (weakref.ref(trainer) if trainer is not None else None,)
    module._maxup_finite.flush()  # counts an earlier fit left unread (it ended without its last batch)
    if getattr(type(module).per_sample_loss, "_maxup_unimplemented", False):
        raise NotImplementedError(
            f"{type(module).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin's step"
        )
    seed = module.maxup_resolved_seed()
    if world_size_of(module) > 1:
        module.maxup_config = module.maxup_config.replace(seed=int(trainer.strategy.broadcast(seed, src=0)))
    check_per_sample(batch)
    agree_rows(module, batch)
    module.maxup_preflight(batch)
    _warn_unscheduled(module, batch, trainer)  # after the checks, whose errors say more
    module._maxup_prepared_for = key


def agree_rows(module: Any, batch: Any) -> None:
    """All ranks take the largest first-batch size of any rank (one all-reduce per fit, at its first step).

    Needed for equal selection forwards with ``chunk_size`` and for the index gather of ``randomness="sample"``.
    """
    rows = num_samples(batch)
    cfg = module.maxup_config
    if (cfg.chunk_size is not None or cfg.randomness == "sample") and world_size_of(module) > 1:
        local = torch.tensor(max(rows, module._maxup_agreed_rows), device=module.device)
        rows = int(trainer_of(module).strategy.reduce(local, reduce_op="max"))
    module._maxup_agreed_rows = max(module._maxup_agreed_rows, rows)


def num_chunks(module: Any, m: int) -> int | None:
    """Selection forwards per step, equal on all ranks, where each may be a collective (FSDP, SyncBN)."""
    chunk = module.maxup_config.chunk_size
    if chunk is None or m == 1 or world_size_of(module) <= 1:
        return None
    rows = max(module._maxup_agreed_rows, 1)
    return -(-m * rows // chunk)


def preflight(module: Any, batch: Any) -> None:
    """Run ``batch`` through the augmentation, the selection view and the model once (``maxup_preflight``).

    Checks that the augmentation keeps the rows, that ``per_sample_loss`` returns one loss per row and that the
    selection view runs through the model (a ``selection_size`` larger than the images, or one the network cannot
    take, raises). It runs the very forwards of a selection pass, on the same shapes and chunks, so
    ``torch.compile`` sees no new shape and every rank makes the same collectives. The model is left exactly as it
    was, and the augmentation stream is not consumed.
    """
    cfg = module.maxup_config
    device = module.device
    if isinstance(batch, Candidates):
        check_candidates(batch, cfg.augment, cfg.m, warmup=True)
        candidates = batch.batch
    else:
        b = batch_size(batch)
        generator: Generator = torch.Generator(device=device).manual_seed(0)
        if cfg.randomness == "sample":
            generator = KeyedGenerator(0, torch.arange(cfg.m * b, device=device))
        candidates = augment_rows(cfg.augment, expand_copies(batch, cfg.m), cfg.m * b, generator, cfg.m)
    check = getattr(cfg.view, "check", None)
    if callable(check):
        check(candidates)
    chunks = num_chunks(module, cfg.m)
    losses = selection_losses(module.maxup_selection_loss, candidates, cfg, model=module, num_chunks=chunks)
    if cfg.check_finite:
        module._maxup_finite(losses, "losses of the pre-flight check")


def _warn_unscheduled(module: Any, batch: Any, trainer: Any) -> None:
    callbacks = getattr(trainer, "callbacks", None) or []
    if isinstance(batch, Candidates) and not any(getattr(c, "sets_multiview_epochs", False) for c in callbacks):
        warn_once(
            module,
            "multiview",
            "The batches hold loader-made Candidates but the Trainer has no MaxUp callback: a MultiView dataset"
            " then makes epoch 0's views in every epoch, and m views during the warm-up; add"
            " lightning_maxup.MaxUp(...) to the callbacks (it sets the MultiView's epoch and views)",
        )


def warn_identity(module: Any, m: int, batch: Any) -> None:
    if m > 1 and module.maxup_config.augment is None and not isinstance(batch, Candidates):
        warn_once(
            module,
            "identity",
            f"MaxUp runs with `m`={m} but `augment` is None: every copy is the same sample, so the selection"
            " pass costs time and changes nothing; pass an augmentation or set m=1",
        )


# ---------------------------------------------------------------------------------------------------------------
# Each step
# ---------------------------------------------------------------------------------------------------------------
def step_config(module: Any, m: int) -> MaxUpConfig:
    """``maxup_config`` with this step's ``m`` and the finiteness check left to the deferred guard.

    Built once per change of ``maxup_config`` or ``m`` (the warm-up switches ``m`` once), not every step.
    """
    cached = module._maxup_cached_config
    if cached is None or cached[0] is not module.maxup_config or cached[1] != m:
        cached = (module.maxup_config, m, module.maxup_config.replace(m=m, check_finite=False))
        module._maxup_cached_config = cached
    return cached[2]


def _check_args(module: Any) -> tuple[Any, Callable[[str], None]]:
    augment = module.maxup_config.augment
    augment = getattr(augment, "__wrapped__", augment)  # a monitor may wrap it on the steps it records
    return augment, lambda message: warn_once(module, "identical-copies", message)


def after_step(module: Any, out: MaxUpOutput, m: int) -> None:
    """The step's deferred finiteness check, its per-epoch checks and the end of its selection on the clock."""
    if module.maxup_config.check_finite:
        what = "candidate losses in the MaxUp selection pass" if m > 1 else "training losses"
        module._maxup_finite(out.candidate_losses, what)
        if module._maxup_finite.pending and last_step_of_run(trainer_of(module)):
            module._maxup_finite.flush()
    trainer = trainer_of(module)
    epoch = int(trainer.current_epoch) if trainer is not None else 0
    module._maxup_epoch_checks.step(epoch, out.candidate_losses.detach(), *_check_args(module))
    module._maxup_clock.selection_done(out.selection_seconds)


def close_epoch_checks(module: Any) -> None:
    """Read the ended epoch's checks (the ``MaxUp`` callback calls it at each epoch's end, outside any step)."""
    module._maxup_epoch_checks.close(*_check_args(module))


def close_checks(module: Any) -> None:
    """Read the checks still in flight: non-finite counts (accelerators only) and the last epoch's checks."""
    module._maxup_finite.flush()
    module._maxup_epoch_checks.close(*_check_args(module))


def log_value(module: Any, name: str, value: Tensor | float, b: int, prog_bar: bool = False) -> None:
    """Log ``maxup/<name>`` per step on this rank and ``maxup/<name>_epoch`` per epoch reduced over ranks."""
    # The step value stays on this rank (no collective per step); the epoch value is reduced over ranks, so
    # every rank logs the same names on the same steps.
    if module.maxup_log_steps:
        module.log(f"maxup/{name}", value, on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=b)
    module.log(f"maxup/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=b)


def logging(module: Any) -> bool:
    """Whether there is something to log to: a plain loop calling maxup_step has not; a barebones Trainer refuses."""
    trainer = trainer_of(module)
    return trainer is not None and not getattr(trainer, "barebones", False)


def warn_dropped_log(module: Any, name: str) -> None:
    warn_once(
        module,
        "log",
        f"self.log({name!r}) was called while MaxUp's selection pass ran `per_sample_loss` on candidate rows;"
        " such calls are dropped (check `self.maxup_selecting` to skip work meant for the trained rows)",
    )


class MaxUpHooks:
    """The LightningModule and ``nn.Module`` methods ``MaxUpMixin`` overrides for its housekeeping.

    Dropping ``self.log`` calls made while candidates are scored, pickling without per-fit state, reading the
    checks still in flight at the end of training, and reading checkpoints from before 0.3. None of them holds
    state a user override could drop: the stream is the child ``_maxup_state``'s.
    """

    maxup_selecting: bool

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except during the selection pass, where the call is dropped with a warning."""
        if self.maxup_selecting:
            warn_dropped_log(self, name)
        else:
            super().log(name, value, *args, **kwargs)  # type: ignore[misc]

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log_dict``, except during the selection pass (see :meth:`log`)."""
        if self.maxup_selecting:
            warn_dropped_log(self, ", ".join(map(str, dictionary)))
        else:
            super().log_dict(dictionary, *args, **kwargs)  # type: ignore[misc]

    def _maxup_logging(self) -> bool:
        return logging(self)

    def _maxup_log_value(self, name: str, value: Tensor | float, b: int, prog_bar: bool = False) -> None:
        log_value(self, name, value, b, prog_bar)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``torch.save(module)``, ``ddp_spawn``, ``deepcopy``) without per-fit runtime state."""
        parent = getattr(super(), "__getstate__", None)
        return {**(parent() if parent is not None else self.__dict__), **runtime_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a module pickled by 0.3 (its stream in plain attributes) gets its child ``_maxup_state``."""
        stream = (state.pop("_maxup_draws", 0), state.pop("_maxup_agreed_rows", 0))
        parent = getattr(super(), "__setstate__", None)
        parent(state) if parent is not None else self.__dict__.update(state)
        add_child(self, *stream)

    def on_train_end(self) -> None:
        """Read the checks still in flight: non-finite counts (accelerators only) and the last epoch's checks."""
        close_checks(self)
        parent = getattr(super(), "on_train_end", None)
        if parent is not None:
            parent()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the stream of a checkpoint written before 0.3 (``checkpoint["lightning_maxup"]``)."""
        legacy_checkpoint_state(checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
