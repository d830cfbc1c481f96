"""``MaxUpMixin``: MaxUp training for a LightningModule through one hook, ``per_sample_loss``."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from lightning_maxup._lightning import rank_zero_warn
from lightning_maxup.augment.image import GaussianNoise
from lightning_maxup.batch import batch_size
from lightning_maxup.config import MaxUpConfig, option_names
from lightning_maxup.functional import (
    MaxUpOutput,
    augment_rows,
    check_finite,
    expand_copies,
    gradient_norm_estimate,
    maxup_step,
    raise_if_nonfinite,
    selection_losses,
)
from lightning_maxup.random import Generator, KeyedGenerator, mix_seed, resolve_seed

__all__ = ["MaxUpMixin"]

_CHECKPOINT_KEY = "lightning_maxup"


class _StepClock:
    """Share of a training step spent selecting, from host clocks (CPU) or CUDA events (deferred one step)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.selection = 0.0
        self._selected = False
        self._events: tuple[Any, Any, Any] | None = None
        self._pending: tuple[Any, Any, Any] | None = None

    def step_started(self, device: torch.device) -> None:
        self.start = time.perf_counter()
        self.selection = 0.0
        self._selected = False
        self._events = None
        if device.type == "cuda":
            events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
            events[0].record()
            events[1].record()  # re-recorded when the step selects; as it is, a step without selection took 0 s
            self._events = events  # type: ignore[assignment]

    def selection_done(self, seconds: float) -> None:
        self.selection = seconds
        self._selected = True
        if self._events is not None:
            self._events[1].record()

    def share(self) -> float | None:
        """Selection time over step time of the step that just ended (CPU) or of the previous one (CUDA)."""
        if self._events is None:
            total = time.perf_counter() - self.start
            return self.selection / total if total > 0 and self._selected else None
        self._events[2].record()
        previous, self._pending = self._pending, self._events
        self._events = None
        if previous is None:
            return None
        start, selected, end = previous
        end.synchronize()  # the previous step ended long ago: this waits for nothing in practice
        total = start.elapsed_time(end)
        return start.elapsed_time(selected) / total if total > 0 else None


class _FiniteGuard:
    """Raise on non-finite losses without a host sync per step on accelerators.

    On the CPU the count is checked at once. On an accelerator the count is copied to the host asynchronously
    and an event recorded; the check happens at a later step, once the event has completed (``query()`` never
    blocks), so the error comes one or two steps late instead of costing a sync every step.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, Any, int, str]] = []

    def __call__(self, losses: Tensor, what: str) -> None:
        losses = losses.detach()
        if losses.device.type == "cpu":
            check_finite(losses, what)
            return
        self.poll()
        bad = (~torch.isfinite(losses)).sum()
        host = torch.empty((), dtype=bad.dtype, pin_memory=losses.device.type == "cuda")
        host.copy_(bad, non_blocking=True)
        event = torch.cuda.Event() if losses.device.type == "cuda" else None
        if event is not None:
            event.record()
        self._pending.append((host, event, losses.numel(), what))

    def poll(self) -> None:
        """Check the counts whose copies have reached the host."""
        waiting = []
        for host, event, total, what in self._pending:
            if event is not None and not event.query():
                waiting.append((host, event, total, what))
                continue
            raise_if_nonfinite(int(host), total, what)
        self._pending = waiting


class MaxUpMixin:
    """Mix into a ``LightningModule`` to train it with MaxUp; implement :meth:`per_sample_loss`.

    Each training step expands the batch to ``m`` augmented copies per sample, finds every sample's worst copy
    in forwards without gradient, and returns the mean loss of one ordinary forward on those worst copies (Gong et
    al., "MaxUp", CVPR 2021). Without the :class:`~lightning_maxup.MaxUp` callback, MaxUp runs from the first
    step; the callback adds the warm-up of ordinary augmentation and can override options.

    The options live in one frozen :class:`~lightning_maxup.MaxUpConfig`, ``self.maxup_config``; pass it as
    ``maxup=`` or pass its fields as keyword arguments (``m=4, augment=...``). Each option is also readable and
    settable as ``self.maxup_<name>`` (setting validates and replaces the config).

    **The selection pass leaves the model exactly as it was**, whatever its layers: every buffer is restored,
    every parameter checked, every module's ``training`` flag restored through its own ``train()``, and the
    global random state restored (see :mod:`lightning_maxup._state`). What the copies are scored with:

    - ``selection_mode="eval"`` (default): normalisation layers use running statistics and **dropout is off**,
      so each copy's loss depends on that copy alone, chunking changes nothing and SyncBatchNorm makes no
      collective call.
    - ``selection_mode="train"``: normalisation layers use the candidates' batch statistics and **dropout is on**,
      with masks of its own (drawn from the global generator, whose state is then restored, so the gradient pass
      draws the masks it would have drawn without selection).

    **Pre-flight check.** At the first training batch of a fit, before any optimizer step and whatever the
    warm-up, the real batch goes through the augmentation, the selection view and the model once, so a
    wrong ``per_sample_loss`` shape, an augmentation that drops rows or a ``selection_size`` the network cannot
    take fails in seconds rather than after the warm-up. Non-finite losses raise during warm-up too.

    **Randomness** comes from a generator reseeded at every step from ``(seed, global rank, step count)``. With
    ``seed=None`` the seed is ``seed_everything``'s or rank 0's ``torch.initial_seed()``, broadcast to every rank
    when the fit starts, so ranks differ only by their rank in the stream key; the seed and step count are saved
    in checkpoints. ``randomness="sample"`` keys every draw by ``(seed, epoch, sample index, copy index)``
    instead (:meth:`maxup_sample_index`), which makes the run independent of the world size.

    **Collectives.** With more than one rank and ``chunk_size`` set, every rank makes the same number of
    selection forwards on every step, uneven last batch included (``ceil(m * B / chunk_size)`` for the largest
    batch ``B`` seen), in both modes: under FSDP, DeepSpeed ZeRO-3 and train-mode SyncBatchNorm each forward is a
    collective.

    **Logging** (``maxup/<name>`` per step on this rank, ``maxup/<name>_epoch`` per epoch reduced over ranks):
    ``loss`` (the trained loss, from the gradient pass, on the progress bar), and when ``m > 1``:
    ``worst_loss`` and ``mean_loss`` (both from the selection pass, so ``worst >= mean``), ``gap`` (their
    difference), ``grad_norm`` (Theorem 1's estimate of ``‖∇ₓL‖`` when ``augment`` is
    :class:`~lightning_maxup.augment.GaussianNoise`), ``selection_share`` and ``m``.

    If you override ``on_fit_start``, ``on_train_batch_start``, ``on_train_batch_end``, ``on_save_checkpoint``
    or ``on_load_checkpoint``, call ``super()`` in them.

    Args:
        *args: Passed on to the next class (the LightningModule).
        maxup: The MaxUp options; keyword arguments named like its fields override it.
        **kwargs: :class:`~lightning_maxup.MaxUpConfig` fields (``m``, ``augment``, ``chunk_size``,
            ``selection_size``, ``selection_view``, ``selection_mode``, ``selection_dtype``,
            ``selection_memory_format``, ``check_finite``, ``seed``, ``randomness``); the rest go on to the next
            class.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch.nn.functional as F
        >>> from lightning_maxup.augment import GaussianNoise
        >>> class Lit(MaxUpMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(m=4, augment=GaussianNoise(0.1))
        ...         self.net = torch.nn.Linear(3, 2)
        ...     def per_sample_loss(self, batch):
        ...         x, y = batch
        ...         return F.cross_entropy(self.net(x), y, reduction="none")
        >>> Lit().maxup_config.m
        4
    """

    maxup_config: MaxUpConfig

    def __init__(self, *args: Any, maxup: MaxUpConfig | None = None, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in option_names() if name in kwargs}
        super().__init__(*args, **kwargs)
        if maxup is not None and not isinstance(maxup, MaxUpConfig):
            raise TypeError(f"Expected `maxup` to be a MaxUpConfig, got {type(maxup).__name__}")
        base = maxup if maxup is not None else MaxUpConfig()
        self.maxup_config = base.replace(**options) if options else base
        #: False runs ordinary augmentation (one copy, no selection); the MaxUp callback sets it during warm-up.
        self.maxup_enabled = True
        #: True keeps the next steps' :class:`~lightning_maxup.MaxUpOutput` in :attr:`maxup_last_output` (for
        #: monitors); off by default, since it holds the ``m * B`` candidates until the following step.
        self.maxup_record = False
        self.maxup_last_output: MaxUpOutput | None = None
        self._maxup_draws = 0
        self._maxup_warned_identity = False
        self._maxup_preflight_done = False
        self._maxup_nominal_rows = 0
        self._maxup_generator: torch.Generator | None = None
        self._maxup_clock = _StepClock()
        self._maxup_finite = _FiniteGuard()
        self._maxup_cached_config: tuple[MaxUpConfig, int, MaxUpConfig] | None = None

    # ---------------------------------------------------------------------------------------------------------------
    # What the user implements
    # ---------------------------------------------------------------------------------------------------------------
    def per_sample_loss(self, batch: Any) -> Tensor:
        """Return a 1-D tensor of the batch's per-sample losses (``reduction="none"``).

        Raises:
            NotImplementedError: Subclasses must implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin")

    def maxup_sample_index(self, batch: Any) -> Tensor:
        """Return the dataset index of every sample of ``batch`` (``LongTensor [B]``), for ``randomness="sample"``.

        Wrap the dataset in :class:`~lightning_maxup.data.IndexedDataset`, which appends each item's index, and
        return ``batch[-1]``.

        Raises:
            NotImplementedError: Subclasses using ``randomness="sample"`` must implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} uses `randomness`='sample' and must implement `maxup_sample_index(batch)`,"
            " returning the dataset index of each sample: wrap the dataset in"
            " lightning_maxup.data.IndexedDataset and return batch[-1]"
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Randomness
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def maxup_active_m(self) -> int:
        """The ``m`` the next step uses: ``maxup_config.m`` when enabled, else 1 (ordinary augmentation)."""
        return self.maxup_config.m if self.maxup_enabled else 1

    def _maxup_trainer(self) -> Any:
        return getattr(self, "_trainer", None)

    def _maxup_rank(self) -> int:
        trainer = self._maxup_trainer()
        return int(trainer.global_rank) if trainer is not None else 0

    def maxup_resolved_seed(self) -> int:
        """The base seed of the augmentation stream.

        The configured seed, or ``seed_everything``'s, or this process's ``torch.initial_seed()`` (replaced by
        rank 0's when a fit starts).
        """
        if self.maxup_config.seed is None:
            self.maxup_config = self.maxup_config.replace(seed=resolve_seed(None))
        assert self.maxup_config.seed is not None
        return self.maxup_config.seed

    def maxup_keyed_generator(self, batch: Any, m: int, device: torch.device) -> KeyedGenerator:
        """The per-row stream of ``randomness="sample"``: rows keyed ``(epoch, sample index, copy index)``.

        Row ``k * B + i`` of the copy-major expanded batch is copy ``k`` of sample ``i``.
        """
        index = torch.as_tensor(self.maxup_sample_index(batch)).to(device=device, dtype=torch.int64).flatten()
        b = int(index.shape[0])
        trainer = self._maxup_trainer()
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        copy = torch.arange(m, device=device, dtype=torch.int64).repeat_interleave(b)
        keys = torch.stack([torch.full_like(copy, epoch), index.repeat(m), copy], dim=1)
        self._maxup_draws += 1
        return KeyedGenerator(self.maxup_resolved_seed(), keys)

    def maxup_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next step's augmentation, reseeded from ``(seed, rank, step count)``."""
        seed = self.maxup_resolved_seed()
        if self._maxup_generator is None or self._maxup_generator.device.type != device.type:
            self._maxup_generator = torch.Generator(device=device)
        self._maxup_generator.manual_seed(mix_seed(seed, self._maxup_rank(), self._maxup_draws))
        self._maxup_draws += 1
        return self._maxup_generator

    def _maxup_next_generator(self, batch: Any, m: int) -> Generator:
        device = self.device  # type: ignore[attr-defined]
        if self.maxup_config.randomness == "sample":
            return self.maxup_keyed_generator(batch, m, device)
        return self.maxup_generator(device)

    def _maxup_num_chunks(self, batch: Any, m: int) -> int | None:
        """Selection forwards per step, equal on all ranks, where each may be a collective (FSDP, SyncBN)."""
        trainer = self._maxup_trainer()
        chunk = self.maxup_config.chunk_size
        if chunk is None or m == 1 or trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
            return None
        self._maxup_nominal_rows = max(self._maxup_nominal_rows, batch_size(batch))
        return -(-m * self._maxup_nominal_rows // chunk)

    # ---------------------------------------------------------------------------------------------------------------
    # The step
    # ---------------------------------------------------------------------------------------------------------------
    def maxup_preflight(self, batch: Any) -> None:
        """Run ``batch`` through the augmentation, the selection view and the model once; raise on a problem.

        Checks that the augmentation keeps the rows, that ``per_sample_loss`` returns one loss per row and that
        the selection view runs through the model (a ``selection_size`` larger than the images, or one the
        network cannot take, raises). It runs the very forwards a MaxUp step's selection pass runs, on the same
        shapes and chunks, so ``torch.compile`` sees no new shape and every rank makes the same collectives. The
        model is left exactly as it was, and the augmentation stream is not consumed.
        """
        cfg = self.maxup_config
        b = batch_size(batch)
        device = self.device  # type: ignore[attr-defined]
        generator: Generator = torch.Generator(device=device).manual_seed(0)
        if cfg.randomness == "sample":
            generator = KeyedGenerator(0, torch.arange(cfg.m * b, device=device))
        candidates = augment_rows(cfg.augment, expand_copies(batch, cfg.m), cfg.m * b, generator, cfg.m)
        check = getattr(cfg.view, "check", None)
        if callable(check):
            check(candidates)
        num_chunks = self._maxup_num_chunks(batch, cfg.m)
        losses = selection_losses(self.per_sample_loss, candidates, cfg, model=self, num_chunks=num_chunks)  # type: ignore[arg-type]
        if cfg.check_finite:
            self._maxup_finite(losses, "losses of the pre-flight check")

    def maxup_step(self, batch: Any) -> MaxUpOutput:
        """Run one MaxUp step on ``batch`` with this module's settings and log its statistics.

        Call it from your own ``training_step`` (or manual optimisation) when you need more than the default
        ``training_step``, which returns ``self.maxup_step(batch).loss``.
        """
        if not self._maxup_preflight_done:
            self.maxup_preflight(batch)
            self._maxup_preflight_done = True
        cfg = self.maxup_config
        m = self.maxup_active_m
        self._maxup_warn_identity(m)
        out = maxup_step(
            self.per_sample_loss,
            batch,
            self._maxup_step_config(m),
            generator=self._maxup_next_generator(batch, m),
            model=self,  # type: ignore[arg-type]
            num_chunks=self._maxup_num_chunks(batch, m),
        )
        if cfg.check_finite:
            what = "candidate losses in the MaxUp selection pass" if m > 1 else "training losses"
            self._maxup_finite(out.candidate_losses, what)
        self._maxup_clock.selection_done(out.selection_seconds)
        self._maxup_log(out)
        self.maxup_last_output = out if self.maxup_record else None
        return out

    def _maxup_step_config(self, m: int) -> MaxUpConfig:
        """``maxup_config`` with this step's ``m`` and the finiteness check left to the deferred guard.

        Built once per change of ``maxup_config`` or ``m`` (the warm-up switches ``m`` once), not every step.
        """
        cached = self._maxup_cached_config
        if cached is None or cached[0] is not self.maxup_config or cached[1] != m:
            cached = (self.maxup_config, m, self.maxup_config.replace(m=m, check_finite=False))
            self._maxup_cached_config = cached
        return cached[2]

    def _maxup_warn_identity(self, m: int) -> None:
        if m > 1 and self.maxup_config.augment is None and not self._maxup_warned_identity:
            self._maxup_warned_identity = True
            rank_zero_warn(
                f"MaxUp runs with `m`={m} but `augment` is None: every copy is the same sample, so the selection"
                " pass costs time and changes nothing; pass an augmentation or set m=1"
            )

    def _maxup_log_value(self, name: str, value: Tensor | float, b: int, prog_bar: bool = False) -> None:
        log = self.log  # type: ignore[attr-defined]
        # The step value stays on this rank (no collective per step); the epoch value is reduced over ranks.
        log(f"maxup/{name}", value, on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=b)
        log(f"maxup/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=b)

    def _maxup_log(self, out: MaxUpOutput) -> None:
        if self._maxup_trainer() is None:  # a plain loop calling maxup_step: nothing to log to
            return
        b = int(out.losses.shape[0])
        self._maxup_log_value("loss", out.loss.detach(), b, prog_bar=True)
        self.log("maxup/m", float(out.m), on_step=True, on_epoch=False, batch_size=b)  # type: ignore[attr-defined]
        if out.m == 1:
            return
        self._maxup_log_value("worst_loss", out.worst_candidate_loss, b)
        self._maxup_log_value("mean_loss", out.mean_candidate_loss, b)
        self._maxup_log_value("gap", out.gap, b)
        augment = self.maxup_config.augment
        augment = getattr(augment, "__wrapped__", augment)  # a monitor may wrap it on the steps it records
        if isinstance(augment, GaussianNoise):
            self._maxup_log_value("grad_norm", gradient_norm_estimate(out.candidate_losses, augment.sigma), b)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Return the MaxUp loss of ``batch`` (the mean of the per-sample worst-copy losses)."""
        return self.maxup_step(batch).loss

    # ---------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Check the module implements ``per_sample_loss`` and give every rank rank 0's seed."""
        if type(self).per_sample_loss is MaxUpMixin.per_sample_loss and type(self).training_step is (
            MaxUpMixin.training_step
        ):
            raise NotImplementedError(
                f"{type(self).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin's training_step"
            )
        self._maxup_preflight_done = False
        trainer = self._maxup_trainer()
        seed = self.maxup_resolved_seed()
        if trainer is not None and int(getattr(trainer, "world_size", 1)) > 1:
            seed = int(trainer.strategy.broadcast(seed, src=0))
            self.maxup_config = self.maxup_config.replace(seed=seed)
        parent = getattr(super(), "on_fit_start", None)
        if parent is not None:
            parent()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        """Start the step clock."""
        self._maxup_clock.step_started(self.device)  # type: ignore[attr-defined]
        parent = getattr(super(), "on_train_batch_start", None)
        return parent(batch, batch_idx) if parent is not None else None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the share of the step spent selecting."""
        share = self._maxup_clock.share()
        if share is not None and self.maxup_active_m > 1:
            self._maxup_log_value("selection_share", share, 1)
        parent = getattr(super(), "on_train_batch_end", None)
        if parent is not None:
            parent(outputs, batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the augmentation stream's seed and position."""
        checkpoint[_CHECKPOINT_KEY] = {
            "seed": self.maxup_resolved_seed(),
            "draws": self._maxup_draws,
            "nominal_rows": self._maxup_nominal_rows,
        }
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the augmentation stream's seed and position."""
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            if state["seed"] is not None:
                self.maxup_config = self.maxup_config.replace(seed=int(state["seed"]))
            self._maxup_draws = int(state["draws"])
            self._maxup_nominal_rows = int(state.get("nominal_rows", 0))
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)


def _option_property(name: str) -> property:
    def get(self: MaxUpMixin) -> Any:
        return getattr(self.maxup_config, name)

    def set_(self: MaxUpMixin, value: Any) -> None:
        self.maxup_config = self.maxup_config.replace(**{name: value})

    return property(get, set_, doc=f"``maxup_config.{name}``; setting it validates and replaces the config.")


for _option in option_names():
    setattr(MaxUpMixin, f"maxup_{_option}", _option_property(_option))
