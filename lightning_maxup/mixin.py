"""``MaxUpMixin``: MaxUp training for a LightningModule through one hook, ``per_sample_loss``."""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_maxup.functional import Augment, MaxUpOutput, SelectionMode, batch_size, maxup_step
from lightning_maxup.functional import _validate_m as validate_m
from lightning_maxup.functional import _validate_optional_positive_int as validate_optional_positive_int
from lightning_maxup.functional import _validate_selection_precision as validate_selection_precision
from lightning_maxup.random import Generator, KeyedGenerator, mix_seed

__all__ = ["MaxUpMixin"]

_CHECKPOINT_KEY = "lightning_maxup"
class _StepClock:
    """Share of a training step spent selecting, from host clocks (CPU) or CUDA events (deferred one step)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.selection = 0.0
        self._events: tuple[Any, Any, Any] | None = None
        self._pending: tuple[Any, Any, Any] | None = None

    def step_started(self, device: torch.device) -> None:
        self.start = time.perf_counter()
        self.selection = 0.0
        self._events = None
        if device.type == "cuda":
            events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
            events[0].record()
            self._events = events  # type: ignore[assignment]

    def selection_done(self, seconds: float) -> None:
        self.selection = seconds
        if self._events is not None:
            self._events[1].record()

    def share(self) -> float | None:
        """Selection time over step time of the step that just ended (CPU) or of the previous one (CUDA)."""
        if self._events is None:
            total = time.perf_counter() - self.start
            return self.selection / total if total > 0 else None
        self._events[2].record()
        previous, self._pending = self._pending, self._events
        if previous is None:
            return None
        start, selected, end = previous
        end.synchronize()  # the previous step ended long ago: this waits for nothing in practice
        total = start.elapsed_time(end)
        return start.elapsed_time(selected) / total if total > 0 else None


class MaxUpMixin:
    """Mix into a ``LightningModule`` to train it with MaxUp; implement :meth:`per_sample_loss`.

    Each training step expands the batch to ``m`` augmented copies per sample, finds every sample's worst copy
    in one forward without gradient, and returns the mean loss of one ordinary forward on those worst copies
    (Gong et al., "MaxUp", CVPR 2021). Without the :class:`~lightning_maxup.MaxUp` callback, MaxUp runs from the
    first step with this ``m``; the callback adds the warm-up of ordinary augmentation and can override ``m``
    and ``selection_size``.

    The selection pass runs the model in eval mode by default: normalisation layers use their running
    statistics, so each copy's loss depends on that copy alone, chunking changes nothing, SyncBatchNorm makes no
    collective call, and no running statistic moves. ``selection_mode="train"`` uses the candidates' batch
    statistics instead (running statistics still untouched); it helps when running statistics are poor, such as
    MaxUp from the very first step without warm-up.

    Randomness comes from a generator this mixin owns, reseeded at every step from ``(seed, global rank, step
    count)``: ranks draw differently, the same seed replays the same run, and the seed and step count are
    saved in checkpoints, so a resumed run continues the same stream. ``randomness="sample"`` keys every draw by
    ``(seed, epoch, sample index, copy index)`` instead (a :class:`~lightning_maxup.random.KeyedGenerator`), so
    a sample's augmentations do not depend on the rank, the step or the batch it lands in: with a model without
    batch statistics, 2 ranks with batches of ``B / 2`` make the same update as 1 process with batches of ``B``.
    It needs :meth:`maxup_sample_index`.

    With ``selection_mode="train"``, ``chunk_size`` and more than one rank, every rank makes the same number of
    selection forwards, ``ceil(m * B / chunk_size)`` for the largest batch ``B`` seen so far (the first one),
    even on an uneven last batch: under SyncBatchNorm each of those forwards is a collective.

    If you override ``on_train_batch_start``, ``on_train_batch_end``, ``on_save_checkpoint`` or
    ``on_load_checkpoint``, call ``super()`` in them.

    Args:
        m: Augmented copies per sample; ``m=1`` is ordinary augmentation.
        augment: ``augment(batch, generator=...) -> batch`` applied to the expanded batch, or ``None``.
        chunk_size: Rows per selection forward, to bound memory; ``None`` forwards all ``m * B`` at once.
        selection_size: Select on images downsampled to this side (the paper uses 16 px on CIFAR, 96 px on
            ImageNet); the gradient forward stays at full resolution.
        selection_view: Custom ``view(batch) -> batch`` for the selection forward; overrides ``selection_size``.
        selection_mode: ``"eval"`` or ``"train"`` for the selection pass (see above).
        check_finite: Raise when a candidate loss is NaN or infinite.
        seed: Base seed of the augmentation stream; ``None`` takes ``seed_everything``'s seed or
            ``torch.initial_seed()`` when training starts.
        randomness: ``"rank"`` (default) draws from a stream per ``(seed, rank, step)``; ``"sample"`` keys draws
            by ``(seed, epoch, sample index, copy index)``, independent of the world size (see above).
        selection_dtype: Run the selection forward under autocast in this dtype (e.g. ``torch.bfloat16``, 2x
            faster on CPUs with AMX/AVX-512 BF16, docs/benchmarks.md); copies whose losses differ by less than that
            precision may rank differently. ``None`` keeps full precision (or the trainer's own autocast).
        selection_memory_format: Memory format of the selection view's images, e.g. ``torch.channels_last``.
        *args: Passed on to the next class (the LightningModule).
        **kwargs: Passed on to the next class (the LightningModule).

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

    def __init__(
        self,
        *args: Any,
        m: int = 4,
        augment: Augment | None = None,
        chunk_size: int | None = None,
        selection_size: int | None = None,
        selection_view: Any = None,
        selection_mode: SelectionMode = "eval",
        check_finite: bool = True,
        seed: int | None = None,
        randomness: Literal["rank", "sample"] = "rank",
        selection_dtype: torch.dtype | None = None,
        selection_memory_format: torch.memory_format | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if augment is not None and not callable(augment):
            raise TypeError(f"Expected `augment` to be callable as augment(batch, generator=...), got {augment!r}")
        if selection_view is not None and not callable(selection_view):
            raise TypeError(f"Expected `selection_view` to be callable, got {selection_view!r}")
        if selection_mode not in ("eval", "train"):
            raise ValueError(f"Expected `selection_mode` to be 'eval' or 'train', got {selection_mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Expected `seed` to be an integer or None, got {seed!r}")
        if randomness not in ("rank", "sample"):
            raise ValueError(f"Expected `randomness` to be 'rank' or 'sample', got {randomness!r}")
        #: Copies per sample; the MaxUp callback may set it.
        self.maxup_m = validate_m(m)
        #: False runs ordinary augmentation (one copy, no selection); the MaxUp callback sets it during warm-up.
        self.maxup_enabled = True
        self.maxup_augment = augment
        self.maxup_chunk_size = validate_optional_positive_int(chunk_size, "chunk_size")
        self.maxup_selection_size = validate_optional_positive_int(selection_size, "selection_size")
        self.maxup_selection_view = selection_view
        self.maxup_selection_mode: SelectionMode = selection_mode
        self.maxup_check_finite = bool(check_finite)
        self.maxup_seed = seed
        self.maxup_randomness: Literal["rank", "sample"] = randomness
        validate_selection_precision(selection_dtype, selection_memory_format)
        self.maxup_selection_dtype = selection_dtype
        self.maxup_selection_memory_format = selection_memory_format
        self._maxup_draws = 0
        self._maxup_warned_identity = False
        self._maxup_nominal_rows = 0
        self._maxup_generator: torch.Generator | None = None
        self._maxup_clock = _StepClock()

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
    # The step
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def maxup_active_m(self) -> int:
        """The ``m`` the next step uses: ``maxup_m`` when enabled, else 1 (ordinary augmentation)."""
        return self.maxup_m if self.maxup_enabled else 1

    def _maxup_rank(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def _maxup_resolve_seed(self) -> int:
        if self.maxup_seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            self.maxup_seed = int(env) if env is not None else int(torch.initial_seed())
        return self.maxup_seed

    def maxup_keyed_generator(self, batch: Any, m: int, device: torch.device) -> KeyedGenerator:
        """The per-row stream of ``randomness="sample"``: rows keyed ``(epoch, sample index, copy index)``.

        Row ``k * B + i`` of the copy-major expanded batch is copy ``k`` of sample ``i``.
        """
        index = torch.as_tensor(self.maxup_sample_index(batch)).to(device=device, dtype=torch.int64).flatten()
        b = int(index.shape[0])
        trainer = getattr(self, "_trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        copy = torch.arange(m, device=device, dtype=torch.int64).repeat_interleave(b)
        keys = torch.stack([torch.full_like(copy, epoch), index.repeat(m), copy], dim=1)
        self._maxup_draws += 1
        return KeyedGenerator(self._maxup_resolve_seed(), keys)

    def _maxup_num_chunks(self, batch: Any, m: int) -> int | None:
        """Selection forwards per step, equal on all ranks, where SyncBatchNorm makes each one a collective."""
        trainer = getattr(self, "_trainer", None)
        if self.maxup_selection_mode != "train" or self.maxup_chunk_size is None or m == 1 or trainer is None:
            return None
        if int(getattr(trainer, "world_size", 1)) <= 1:
            return None
        self._maxup_nominal_rows = max(self._maxup_nominal_rows, batch_size(batch))
        return -(-m * self._maxup_nominal_rows // self.maxup_chunk_size)

    def maxup_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next step's augmentation, reseeded from ``(seed, rank, step count)``."""
        seed = self._maxup_resolve_seed()
        if self._maxup_generator is None or self._maxup_generator.device.type != device.type:
            self._maxup_generator = torch.Generator(device=device)
        self._maxup_generator.manual_seed(mix_seed(seed, self._maxup_rank(), self._maxup_draws))
        self._maxup_draws += 1
        return self._maxup_generator

    def maxup_step(self, batch: Any) -> MaxUpOutput:
        """Run one MaxUp step on ``batch`` with this module's settings and log its statistics.

        Call it from your own ``training_step`` (or manual optimisation) when you need more than the default
        ``training_step``, which returns ``self.maxup_step(batch).loss``.
        """
        device = self.device  # type: ignore[attr-defined]
        m = self.maxup_active_m
        if m > 1 and self.maxup_augment is None and not self._maxup_warned_identity:
            self._maxup_warned_identity = True
            rank_zero_warn(
                f"MaxUp runs with `m`={m} but `augment` is None: every copy is the same sample, so the selection"
                " pass costs time and changes nothing; pass an augmentation or set m=1"
            )
        generator: Generator
        if self.maxup_randomness == "sample":
            generator = self.maxup_keyed_generator(batch, m, device)
        else:
            generator = self.maxup_generator(device)
        out = maxup_step(
            self.per_sample_loss,
            batch,
            self.maxup_augment,
            m,
            generator=generator,
            model=self,  # type: ignore[arg-type]
            selection_mode=self.maxup_selection_mode,
            chunk_size=self.maxup_chunk_size,
            selection_size=self.maxup_selection_size,
            selection_view=self.maxup_selection_view,
            check_finite=self.maxup_check_finite,
            num_chunks=self._maxup_num_chunks(batch, m),
            selection_dtype=self.maxup_selection_dtype,
            selection_memory_format=self.maxup_selection_memory_format,
        )
        self._maxup_clock.selection_done(out.selection_seconds)
        b = int(out.losses.shape[0])
        log = self.log  # type: ignore[attr-defined]
        log("maxup/worst_loss", out.loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=b)
        log("maxup/mean_loss", out.mean_candidate_loss, on_step=True, on_epoch=True, batch_size=b)
        log("maxup/m", float(out.m), on_step=True, on_epoch=False, batch_size=b)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Return the MaxUp loss of ``batch`` (the mean of the per-sample worst-copy losses)."""
        return self.maxup_step(batch).loss

    # ---------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Check before the first step that the module can compute per-sample losses."""
        if type(self).per_sample_loss is MaxUpMixin.per_sample_loss and type(self).training_step is (
            MaxUpMixin.training_step
        ):
            raise NotImplementedError(
                f"{type(self).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin's training_step"
            )
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
        if share is not None:
            self.log("maxup/selection_share", share, on_step=True, on_epoch=True, batch_size=1)  # type: ignore[attr-defined]
        parent = getattr(super(), "on_train_batch_end", None)
        if parent is not None:
            parent(outputs, batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the augmentation stream's seed and position."""
        checkpoint[_CHECKPOINT_KEY] = {
            "seed": self.maxup_seed,
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
            self.maxup_seed = state["seed"]
            self._maxup_draws = int(state["draws"])
            self._maxup_nominal_rows = int(state.get("nominal_rows", 0))
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
