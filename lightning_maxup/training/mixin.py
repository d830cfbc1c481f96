"""``MaxUpMixin``: MaxUp training for a LightningModule through one hook, ``per_sample_loss``."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, overload

import torch
from torch import Tensor

from lightning_maxup._lightning import rank_zero_warn
from lightning_maxup.augment.image import GaussianNoise
from lightning_maxup.core.batch import Candidates, batch_size, expand_copies, slice_rows
from lightning_maxup.core.config import (
    MaxUpConfig,
    Randomness,
    SelectionDtype,
    SelectionFormat,
    SelectionMode,
    option_names,
)
from lightning_maxup.core.functional import (
    MaxUpOutput,
    augment_rows,
    check_candidates,
    check_per_sample,
    gradient_norm_estimate,
    maxup_step,
    selection_losses,
)
from lightning_maxup.core.random import Generator, KeyedGenerator, mix_seed, resolve_seed
from lightning_maxup.training._deferred import FiniteGuard, StepClock
from lightning_maxup.training._epoch_checks import EpochChecks
from lightning_maxup.training._stream_state import (
    CHILD,
    StreamState,
    legacy_checkpoint_state,
    migrate_state_dict,
)

__all__ = ["MaxUpMixin", "require_maxup_module"]

T = TypeVar("T")


class _Option(Generic[T]):
    """``self.maxup_<name>``: reads ``maxup_config.<name>``; setting it validates and replaces the config."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"``maxup_config.{name}``; setting it validates and replaces the config."

    @overload
    def __get__(self, obj: None, owner: type) -> _Option[T]: ...

    @overload
    def __get__(self, obj: MaxUpMixin, owner: type) -> T: ...

    def __get__(self, obj: MaxUpMixin | None, owner: type) -> T | _Option[T]:
        if obj is None:
            return self
        return cast(T, getattr(obj.maxup_config, self.name))

    def __set__(self, obj: MaxUpMixin, value: T) -> None:
        obj.maxup_config = obj.maxup_config.replace(**{self.name: value})


class MaxUpMixin:
    """Mix into a ``LightningModule`` to train it with MaxUp; implement :meth:`per_sample_loss`.

    Each training step expands the batch to ``m`` augmented copies per sample, finds every sample's worst copy
    in forwards without gradient, and returns the mean loss of one ordinary forward on those worst copies (Gong et
    al., "MaxUp", CVPR 2021). Without the :class:`~lightning_maxup.MaxUp` callback, MaxUp runs from the first
    step; the callback adds the warm-up of ordinary augmentation and can override options.

    The options live in one frozen :class:`~lightning_maxup.MaxUpConfig`, ``self.maxup_config``; pass it as
    ``maxup=`` or pass its fields as keyword arguments (``m=4, augment=...``). Each option is also a typed
    property ``self.maxup_<name>`` (setting it validates and replaces the config).

    **The selection pass leaves the model exactly as it was**, whatever its layers: every buffer is restored,
    every parameter checked, every module's ``training`` flag restored through its own ``train()``, and the
    global random state restored (see :mod:`lightning_maxup.core._state`). What the copies are scored with:

    - ``selection_mode="eval"`` (default): normalisation layers use running statistics and **dropout is off**,
      so each copy's loss depends on that copy alone, chunking changes nothing and SyncBatchNorm makes no
      collective call.
    - ``selection_mode="train"``: normalisation layers use the candidates' batch statistics and **dropout is on**,
      with masks of its own: the global generator is seeded from the step's ``(seed, rank, step)`` for the
      selection forwards and restored after, so the gradient pass draws the masks it would have drawn without
      selection, independent of the selection's, and a run replays.

    **Your code during selection.** ``per_sample_loss`` also runs on the ``m * B`` candidate rows and on the
    pre-flight check's rows; :attr:`maxup_selecting` is ``True`` then, so a metric updated inside it can skip
    those calls, and ``self.log``/``self.log_dict`` calls made then are dropped with a one-time warning.

    **Pre-flight check.** At the first training batch of a fit, before any optimizer step and whatever the
    warm-up, the real batch goes through the augmentation, the selection view and the model once, so a
    wrong ``per_sample_loss`` shape, an augmentation that drops rows or a ``selection_size`` the network cannot
    take fails in seconds rather than after the warm-up. Non-finite losses raise during warm-up too.

    **Randomness** comes from a generator reseeded at every step from ``(seed, global rank, step count)``. With
    ``seed=None`` the seed is ``seed_everything``'s or rank 0's ``torch.initial_seed()``, broadcast to every rank
    at the first step of a fit, so ranks differ only by their rank in the stream key. ``randomness="sample"``
    keys every draw by ``(seed, epoch, step, sample index, occurrence in the batch, copy index)`` instead
    (:meth:`maxup_sample_index`), which makes the run independent of the world size for a fixed global batch, and
    gives an index that appears twice (samplers with replacement, repeated augmentation) draws of its own.

    **State that survives your hooks.** The seed and step count are the extra state of a child module the mixin
    owns (``state_dict`` key ``_maxup_state._extra_state``), and everything else happens inside
    :meth:`maxup_step`, so defining your own ``get_extra_state``/``set_extra_state`` or ``__getstate__``, or
    overriding ``on_fit_start``, ``on_train_batch_start``, ``on_save_checkpoint`` or ``on_load_checkpoint``
    without ``super()``, loses nothing: a resumed run continues the augmentation stream exactly.

    **Collectives.** With more than one rank and ``chunk_size`` set, the ranks agree at the first step of a fit
    on the largest batch any of them holds (one all-reduce) and every rank then makes
    ``ceil(m * B_max / chunk_size)`` selection forwards on every step, whatever its own batch size, in both
    modes: under FSDP, DeepSpeed ZeRO-3 and train-mode SyncBatchNorm each forward is a collective. A later batch
    larger than ``B_max`` is split into the same number of larger chunks.

    **Logging** (``maxup/<name>`` per step on this rank, ``maxup/<name>_epoch`` per epoch reduced over ranks;
    nothing under ``Trainer(barebones=True)``): ``loss`` (the trained loss, from the gradient pass), and when
    ``m > 1``: ``worst_loss`` and ``mean_loss`` (both from the selection pass, so ``worst >= mean``), ``gap``
    (their difference), ``grad_norm`` (Theorem 1's estimate of ``‖∇ₓL‖`` when ``augment`` is
    :class:`~lightning_maxup.augment.GaussianNoise`), ``selection_share`` (of the time between steps, reported two
    steps late on CUDA rather than waiting for the device) and ``m``. Lightning reads logged values on the host
    (one ``.item()``, a device sync, each): progress-bar values at every step, so ``loss`` joins the bar only with
    ``self.maxup_progress_bar = True``; step values on the steps its logger writes (``log_every_n_steps``), so
    ``self.maxup_log_steps = False`` keeps only the epoch values.

    **torch.compile.** ``trainer.fit(torch.compile(module))`` compiles ``forward`` and ``training_step``; the
    step's bookkeeping (:meth:`maxup_step`) runs outside the graph, so nothing in it is a guard and no step
    recompiles; forwards through ``self(...)`` inside ``per_sample_loss`` stay compiled.

    Args:
        *args: Passed on to the next class (the LightningModule).
        maxup: The MaxUp options; keyword arguments named like its fields override it.
        **kwargs: :class:`~lightning_maxup.MaxUpConfig` fields (``m``, ``augment``, ``chunk_size``,
            ``selection_size``, ``selection_view``, ``selection_mode``, ``selection_dtype``,
            ``selection_memory_format``, ``check_finite``, ``seed``, ``randomness``, ``selection_temperature``);
            the rest go on to the next class.

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
        >>> Lit().maxup_m
        4
    """

    maxup_config: MaxUpConfig
    maxup_m = _Option[int]("m")
    maxup_augment = _Option[Callable[..., Any] | None]("augment")
    maxup_chunk_size = _Option[int | None]("chunk_size")
    maxup_selection_size = _Option[int | None]("selection_size")
    maxup_selection_view = _Option[Callable[[Any], Any] | None]("selection_view")
    maxup_selection_mode = _Option[SelectionMode]("selection_mode")
    maxup_selection_dtype = _Option[SelectionDtype | None]("selection_dtype")
    maxup_selection_memory_format = _Option[SelectionFormat | None]("selection_memory_format")
    maxup_check_finite = _Option[bool]("check_finite")
    maxup_seed = _Option[int | None]("seed")
    maxup_randomness = _Option[Randomness]("randomness")
    maxup_selection_temperature = _Option[float | None]("selection_temperature")

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
        #: True shows ``maxup/loss`` on the progress bar. Off by default: Lightning reads every progress-bar value
        #: on the host at every step (one ``.item()``, a device sync), with the bar shown or not.
        self.maxup_progress_bar = False
        #: False logs only the per-epoch values (``maxup/<name>_epoch``): on the steps its logger writes
        #: (``log_every_n_steps``), Lightning reads every per-step value on the host, one ``.item()`` each.
        self.maxup_log_steps = True
        #: True while the selection pass or the pre-flight check runs ``per_sample_loss`` on candidate rows.
        self.maxup_selecting = False
        #: The augmentation stream (seed, step count, agreed rows), saved as a child's extra state
        #: (``_maxup_state._extra_state``), so no override of the user's own hooks can drop it.
        self._maxup_state = StreamState(self)
        self._maxup_prepared_for: tuple[Any] | None = None  # (weak reference to the Trainer or None,) once prepared
        self._maxup_warned: set[str] = set()
        self._maxup_generator: torch.Generator | None = None
        self._maxup_clock = StepClock()
        self._maxup_finite = FiniteGuard()
        self._maxup_epoch_checks = EpochChecks()
        self._maxup_cached_config: tuple[MaxUpConfig, int, MaxUpConfig] | None = None
        register = getattr(self, "register_load_state_dict_pre_hook", None)
        if callable(register):  # checkpoints of 0.3 (the stream at the module's root) and before load too
            register(migrate_state_dict)

    @property
    def _maxup_draws(self) -> int:
        return cast(int, self._maxup_state.draws)

    @_maxup_draws.setter
    def _maxup_draws(self, value: int) -> None:
        self._maxup_state.draws = value

    @property
    def _maxup_agreed_rows(self) -> int:
        return cast(int, self._maxup_state.agreed_rows)

    @_maxup_agreed_rows.setter
    def _maxup_agreed_rows(self, value: int) -> None:
        self._maxup_state.agreed_rows = value

    # ---------------------------------------------------------------------------------------------------------------
    # What the user implements
    # ---------------------------------------------------------------------------------------------------------------
    def per_sample_loss(self, batch: Any) -> Tensor:
        """Return a 1-D tensor of the batch's per-sample losses (``reduction="none"``).

        Also called on the selection pass's candidate rows, while :attr:`maxup_selecting` is ``True``.

        Raises:
            NotImplementedError: Subclasses must implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin")

    def maxup_sample_index(self, batch: Any) -> Tensor:
        """Return the dataset index of every sample of ``batch`` (``LongTensor [B]``), for ``randomness="sample"``.

        Wrap the dataset in :class:`~lightning_maxup.data.datasets.IndexedDataset`, which appends each item's index, and
        return ``batch[-1]``.

        Raises:
            NotImplementedError: Subclasses using ``randomness="sample"`` must implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} uses `randomness`='sample' and must implement `maxup_sample_index(batch)`,"
            " returning the dataset index of each sample: wrap the dataset in"
            " lightning_maxup.data.datasets.IndexedDataset and return batch[-1]"
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

    def _maxup_world_size(self) -> int:
        trainer = self._maxup_trainer()
        return int(getattr(trainer, "world_size", 1)) if trainer is not None else 1

    def maxup_resolved_seed(self) -> int:
        """The base seed of the augmentation stream.

        The configured seed, or ``seed_everything``'s, or this process's ``torch.initial_seed()`` (replaced by
        rank 0's at the first step of a fit).
        """
        if self.maxup_config.seed is None:
            self.maxup_config = self.maxup_config.replace(seed=resolve_seed(None))
        assert self.maxup_config.seed is not None
        return self.maxup_config.seed

    def maxup_keyed_generator(self, batch: Any, m: int, device: torch.device) -> KeyedGenerator:
        """The per-row stream of ``randomness="sample"``.

        Row ``k * B + i`` of the copy-major expanded batch is copy ``k`` of sample ``i`` and is keyed
        ``(epoch, step, sample index, occurrence, k)``, where ``occurrence`` counts earlier rows of the *global*
        batch (lower ranks first, then this rank's earlier rows) with the same index, so a repeated index draws
        copies of its own wherever its repeats are (repeated-augmentation samplers put them on different ranks).
        With more than one rank this is one all-gather of the ``B`` indices per step (no host sync); rows beyond
        the largest first batch of any rank (agreed at the first step) are compared with this rank's rows only.
        """
        index = torch.as_tensor(self.maxup_sample_index(batch)).to(device=device, dtype=torch.int64)
        b = batch_size(batch)
        if index.dim() != 1 or index.shape[0] != b:
            raise ValueError(
                f"Expected `maxup_sample_index(batch)` to return one dataset index per sample (shape [{b}]), got"
                f" shape {list(index.shape)}"
            )
        trainer = self._maxup_trainer()
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        copy = torch.arange(m, device=device, dtype=torch.int64).repeat_interleave(b)
        occurrence = self._maxup_occurrence(index).repeat(m)
        keys = torch.stack(
            [torch.full_like(copy, epoch), torch.full_like(copy, self._maxup_draws), index.repeat(m), occurrence, copy],
            dim=1,
        )
        self._maxup_draws += 1
        return KeyedGenerator(self.maxup_resolved_seed(), keys)

    def _maxup_occurrence(self, index: Tensor) -> Tensor:
        """Per row, how many earlier rows of the global batch (lower ranks, then this rank) hold the same index."""
        local = _repeat_counts(index)
        trainer = self._maxup_trainer()
        rank = self._maxup_rank()
        if self._maxup_world_size() <= 1 or trainer is None:
            return local
        # Every rank gathers the same shape: its first `cap` indices, padded with -1 (no dataset index).
        cap = max(self._maxup_agreed_rows, 1)
        padded = torch.full((cap,), -1, dtype=torch.int64, device=index.device)
        rows = min(int(index.shape[0]), cap)
        padded[:rows] = index[:rows]
        gathered = trainer.strategy.all_gather(padded).reshape(-1, cap)
        lower = torch.sort(gathered[:rank].reshape(-1)).values
        earlier = torch.searchsorted(lower, index, right=True) - torch.searchsorted(lower, index, right=False)
        return local + earlier

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
            return self.maxup_keyed_generator(_samples(batch), m, device)
        return self.maxup_generator(device)

    def _maxup_num_chunks(self, batch: Any, m: int) -> int | None:
        """Selection forwards per step, equal on all ranks, where each may be a collective (FSDP, SyncBN)."""
        chunk = self.maxup_config.chunk_size
        if chunk is None or m == 1 or self._maxup_world_size() <= 1:
            return None
        rows = max(self._maxup_agreed_rows, 1)
        return -(-m * rows // chunk)

    def _maxup_agree_rows(self, batch: Any) -> None:
        """All ranks take the largest first-batch size of any rank (one all-reduce per fit, at its first step).

        Needed for equal selection forwards with ``chunk_size`` and for the index gather of ``randomness="sample"``.
        """
        rows = _num_samples(batch)
        cfg = self.maxup_config
        if (cfg.chunk_size is not None or cfg.randomness == "sample") and self._maxup_world_size() > 1:
            local = torch.tensor(max(rows, self._maxup_agreed_rows), device=self.device)  # type: ignore[attr-defined]
            rows = int(self._maxup_trainer().strategy.reduce(local, reduce_op="max"))
        self._maxup_agreed_rows = max(self._maxup_agreed_rows, rows)

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
        device = self.device  # type: ignore[attr-defined]
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
        num_chunks = self._maxup_num_chunks(batch, cfg.m)
        losses = selection_losses(self.maxup_selection_loss, candidates, cfg, model=self, num_chunks=num_chunks)  # type: ignore[arg-type]
        if cfg.check_finite:
            self._maxup_finite(losses, "losses of the pre-flight check")

    def _maxup_prepare(self, batch: Any) -> None:
        """Once per Trainer, at its first step: the seed of rank 0, the agreed chunk count, the pre-flight check."""
        trainer = self._maxup_trainer()
        prepared = self._maxup_prepared_for
        if prepared is not None and (prepared[0]() if prepared[0] is not None else None) is trainer:
            return
        key = (weakref.ref(trainer) if trainer is not None else None,)
        self._maxup_finite.flush()  # counts an earlier fit left unread (it ended without its last batch)
        if type(self).per_sample_loss is MaxUpMixin.per_sample_loss:
            raise NotImplementedError(
                f"{type(self).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin's step"
            )
        seed = self.maxup_resolved_seed()
        if self._maxup_world_size() > 1:
            self.maxup_config = self.maxup_config.replace(seed=int(trainer.strategy.broadcast(seed, src=0)))
        check_per_sample(batch)
        self._maxup_agree_rows(batch)
        self.maxup_preflight(batch)
        self._maxup_warn_unscheduled(batch, trainer)  # after the checks, whose errors say more
        self._maxup_prepared_for = key

    def _maxup_warn_unscheduled(self, batch: Any, trainer: Any) -> None:
        callbacks = getattr(trainer, "callbacks", None) or []
        if isinstance(batch, Candidates) and not any(getattr(c, "sets_multiview_epochs", False) for c in callbacks):
            self._maxup_warn_once(
                "multiview",
                "The batches hold loader-made Candidates but the Trainer has no MaxUp callback: a MultiView dataset"
                " then makes epoch 0's views in every epoch, and m views during the warm-up; add"
                " lightning_maxup.MaxUp(...) to the callbacks (it sets the MultiView's epoch and views)",
            )

    @torch.compiler.disable
    def maxup_step(self, batch: Any) -> MaxUpOutput:
        """Run one MaxUp step on ``batch`` with this module's settings and log its statistics.

        Call it from your own ``training_step`` (or manual optimisation) when you need more than the default
        ``training_step``, which returns ``self.maxup_step(batch).loss``. It runs outside ``torch.compile``'s
        graphs (its bookkeeping would be a guard per step); your ``per_sample_loss`` and the forwards it makes
        compile as usual.
        """
        device = self.device  # type: ignore[attr-defined]
        share = self._maxup_clock.tick(device)
        self._maxup_prepare(batch)
        cfg = self.maxup_config
        m = self.maxup_active_m
        self._maxup_warn_identity(m, batch)
        seed = mix_seed(self.maxup_resolved_seed(), self._maxup_rank(), self._maxup_draws, _DROPOUT_STREAM)
        out = maxup_step(
            self.per_sample_loss,
            batch,
            self._maxup_step_config(m),
            generator=self._maxup_next_generator(batch, m),
            model=self,  # type: ignore[arg-type]
            num_chunks=self._maxup_num_chunks(batch, m),
            selection_seed=seed,
            selection_fn=self.maxup_selection_loss,
        )
        if cfg.check_finite:
            what = "candidate losses in the MaxUp selection pass" if m > 1 else "training losses"
            self._maxup_finite(out.candidate_losses, what)
            if self._maxup_finite.pending and _last_step_of_run(self._maxup_trainer()):
                self._maxup_finite.flush()
        self._maxup_epoch_checks.step(self._maxup_epoch(), out.candidate_losses.detach(), *self._maxup_check_args())
        self._maxup_clock.selection_done(out.selection_seconds)
        self._maxup_log(out, share)
        self.maxup_last_output = out if self.maxup_record else None
        return out

    def _maxup_epoch(self) -> int:
        trainer = self._maxup_trainer()
        return int(trainer.current_epoch) if trainer is not None else 0

    def _maxup_check_args(self) -> tuple[Any, Callable[[str], None]]:
        augment = self.maxup_config.augment
        augment = getattr(augment, "__wrapped__", augment)  # a monitor may wrap it on the steps it records
        return augment, lambda message: self._maxup_warn_once("identical-copies", message)

    def maxup_selection_loss(self, batch: Any) -> Tensor:
        """``per_sample_loss`` with :attr:`maxup_selecting` set, for candidate rows.

        How the selection pass, the pre-flight check and the diagnostics
        (:class:`~lightning_maxup.evaluation.fidelity.SelectionFidelity`) score candidates.
        """
        self.maxup_selecting = True
        try:
            return self.per_sample_loss(batch)
        finally:
            self.maxup_selecting = False

    maxup_selection_loss.__name__ = "per_sample_loss"  # error messages name the hook the user wrote

    def _maxup_step_config(self, m: int) -> MaxUpConfig:
        """``maxup_config`` with this step's ``m`` and the finiteness check left to the deferred guard.

        Built once per change of ``maxup_config`` or ``m`` (the warm-up switches ``m`` once), not every step.
        """
        cached = self._maxup_cached_config
        if cached is None or cached[0] is not self.maxup_config or cached[1] != m:
            cached = (self.maxup_config, m, self.maxup_config.replace(m=m, check_finite=False))
            self._maxup_cached_config = cached
        return cached[2]

    def _maxup_warn_once(self, key: str, message: str) -> None:
        if key not in self._maxup_warned:
            self._maxup_warned.add(key)
            rank_zero_warn(message)

    def _maxup_warn_identity(self, m: int, batch: Any) -> None:
        if m > 1 and self.maxup_config.augment is None and not isinstance(batch, Candidates):
            self._maxup_warn_once(
                "identity",
                f"MaxUp runs with `m`={m} but `augment` is None: every copy is the same sample, so the selection"
                " pass costs time and changes nothing; pass an augmentation or set m=1",
            )

    # ---------------------------------------------------------------------------------------------------------------
    # Logging
    # ---------------------------------------------------------------------------------------------------------------
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, except during the selection pass, where the call is dropped with a warning.

        ``per_sample_loss`` runs on candidate rows during selection; a value logged there would describe rows
        that are not trained on.
        """
        if self.maxup_selecting:
            self._maxup_warn_dropped_log(name)
            return
        super().log(name, value, *args, **kwargs)  # type: ignore[misc]

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log_dict``, except during the selection pass (see :meth:`log`)."""
        if self.maxup_selecting:
            self._maxup_warn_dropped_log(", ".join(map(str, dictionary)))
            return
        super().log_dict(dictionary, *args, **kwargs)  # type: ignore[misc]

    def _maxup_warn_dropped_log(self, name: str) -> None:
        self._maxup_warn_once(
            "log",
            f"self.log({name!r}) was called while MaxUp's selection pass ran `per_sample_loss` on candidate rows;"
            " such calls are dropped (check `self.maxup_selecting` to skip work meant for the trained rows)",
        )

    def _maxup_logging(self) -> bool:
        trainer = self._maxup_trainer()
        # A plain loop calling maxup_step has nothing to log to; a barebones Trainer refuses self.log.
        return trainer is not None and not getattr(trainer, "barebones", False)

    def _maxup_log_value(self, name: str, value: Tensor | float, b: int, prog_bar: bool = False) -> None:
        # The step value stays on this rank (no collective per step); the epoch value is reduced over ranks, so
        # every rank logs the same names on the same steps.
        if self.maxup_log_steps:
            self.log(f"maxup/{name}", value, on_step=True, on_epoch=False, prog_bar=prog_bar, batch_size=b)
        self.log(f"maxup/{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=b)

    def _maxup_log(self, out: MaxUpOutput, share: float | None) -> None:
        if not self._maxup_logging():
            return
        b, device = int(out.losses.shape[0]), out.loss.device
        self._maxup_log_value("loss", out.loss.detach(), b, prog_bar=self.maxup_progress_bar)
        # Host numbers go to the device as a fill (torch.full), not a copy: Lightning's own conversion of a float
        # (torch.tensor) is a synchronous host-to-device copy on CUDA.
        if self.maxup_log_steps:
            m = torch.full((), float(out.m), device=device)
            self.log("maxup/m", m, on_step=True, on_epoch=False, batch_size=b)
        if share is not None and out.m > 1:
            self._maxup_log_value("selection_share", torch.full((), share, device=device), b)
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
    # State: the stream lives in the child ``_maxup_state`` (see training/_stream_state.py)
    # ---------------------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickle (``torch.save(module)``, ``ddp_spawn``, ``deepcopy``) without per-fit runtime state.

        The Trainer reference, CUDA events and in-flight checks belong to the fit that made them; a copy prepares
        itself again at its first step. The stream (seed, step count) is kept.
        """
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state.update(
            _maxup_prepared_for=None,
            _maxup_clock=StepClock(),
            _maxup_finite=FiniteGuard(),
            _maxup_epoch_checks=EpochChecks(),
            maxup_last_output=None,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a module pickled by 0.3 (its stream in plain attributes) gets its child ``_maxup_state``."""
        draws, rows = state.pop("_maxup_draws", 0), state.pop("_maxup_agreed_rows", 0)
        parent = getattr(super(), "__setstate__", None)
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)
        if CHILD not in getattr(self, "_modules", self.__dict__):
            self._maxup_state = StreamState(self)
            self._maxup_state.draws, self._maxup_state.agreed_rows = int(draws), int(rows)

    def on_train_end(self) -> None:
        """Read the checks still in flight: non-finite counts (accelerators only) and the last epoch's checks."""
        self._maxup_finite.flush()
        self._maxup_epoch_checks.close(*self._maxup_check_args())
        parent = getattr(super(), "on_train_end", None)
        if parent is not None:
            parent()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the stream of a checkpoint written before 0.3 (``checkpoint["lightning_maxup"]``)."""
        legacy_checkpoint_state(checkpoint)
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)


_DROPOUT_STREAM = 0x5E1EC7


def _last_step_of_run(trainer: Any) -> bool:
    """Whether the running training step is the last of its epoch or of ``max_steps`` (public Trainer state)."""
    if trainer is None:
        return False
    max_steps = getattr(trainer, "max_steps", -1)
    last_step = max_steps is not None and max_steps > 0 and trainer.global_step + 1 >= max_steps
    return bool(getattr(trainer, "is_last_batch", False)) or last_step


def _samples(batch: Any) -> Any:
    """The ``B`` samples of a batch: copy 0 of premade candidates, or the batch itself."""
    if isinstance(batch, Candidates):
        return slice_rows(batch.batch, 0, batch.num_samples)
    return batch


def _num_samples(batch: Any) -> int:
    return batch.num_samples if isinstance(batch, Candidates) else batch_size(batch)


def _repeat_counts(index: Tensor) -> Tensor:
    """For each entry, how many earlier entries hold the same value (``[3, 5, 3, 3] -> [0, 0, 1, 2]``), sync-free."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    position = torch.arange(index.shape[0], device=index.device)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.where(starts, position, torch.zeros_like(position)).cummax(0).values
    return torch.empty_like(position).scatter_(0, order, position - run_start)


def require_maxup_module(module: Any, callback: str) -> MaxUpMixin:
    """Return ``module`` if it subclasses :class:`MaxUpMixin`, else raise naming ``callback`` (for ``setup``).

    Example:
        >>> require_maxup_module(torch.nn.Linear(2, 2), "MaxUp")
        Traceback (most recent call last):
        ...
        TypeError: The MaxUp callback needs a LightningModule that subclasses MaxUpMixin, got Linear
    """
    if not isinstance(module, MaxUpMixin):
        raise TypeError(
            f"The {callback} callback needs a LightningModule that subclasses MaxUpMixin, got {type(module).__name__}"
        )
    return module
