"""``MaxUpMixin``: MaxUp training for a LightningModule through one hook, ``per_sample_loss``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_maxup.core.config import (
    MaxUpConfig,
    Randomness,
    SelectionDtype,
    SelectionFormat,
    SelectionMode,
    option_names,
)
from lightning_maxup.core.functional import MaxUpOutput, gradient_norm_estimate, maxup_step
from lightning_maxup.core.random import Generator, KeyedGenerator, mix_seed, resolve_seed
from lightning_maxup.training import _bookkeeping as book
from lightning_maxup.training import _stream_state as stream
from lightning_maxup.training._options import _Option

__all__ = ["MaxUpMixin", "require_maxup_module"]


class MaxUpMixin(book.MaxUpHooks):
    """Mix into a ``LightningModule`` to train it with MaxUp; implement :meth:`per_sample_loss`.

    Each training step expands the batch to ``m`` augmented copies per sample, finds every sample's worst copy
    in forwards without gradient, and returns the mean loss of one ordinary forward on those worst copies (Gong et
    al., "MaxUp", CVPR 2021). Without the :class:`~lightning_maxup.MaxUp` callback, MaxUp runs from the first
    step; the callback adds the warm-up of ordinary augmentation and can override options.

    The options live in one frozen :class:`~lightning_maxup.MaxUpConfig`, ``self.maxup_config``; pass it as
    ``maxup=`` or pass its fields as keyword arguments (``m=4, augment=...``); ``self.maxup_<name>`` reads one.
    ``per_sample_loss`` also scores the candidate rows, with :attr:`maxup_selecting` set. The augmentation stream
    (seed, step count) is the extra state of a child module, ``_maxup_state``, so no override of your hooks,
    ``get_extra_state`` or ``__getstate__`` drops it. The guide's "Options" and "Guarantees" pages describe the
    selection modes, the pre-flight check, randomness, collectives, the logged ``maxup/*`` values and compile.

    Args:
        *args: Passed on to the next class (the LightningModule).
        maxup: The MaxUp options; keyword arguments named like its fields override it.
        **kwargs: :class:`~lightning_maxup.MaxUpConfig` fields (``m``, ``augment``, ``chunk_size``, ...); the rest
            go on to the next class.

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
        #: True keeps each step's :class:`~lightning_maxup.MaxUpOutput` in ``maxup_last_output`` (for monitors).
        self.maxup_record = False
        #: True shows ``maxup/loss`` on the progress bar (Lightning reads it on the host at every step).
        self.maxup_progress_bar = False
        self.maxup_log_steps = True  # False logs only per-epoch values (each step value written is a host read)
        #: True while the selection pass or the pre-flight check scores candidate rows with ``per_sample_loss``.
        self.maxup_selecting = False
        self._maxup_state = stream.StreamState(self)  # the stream, saved as the child's extra state
        for name, value in {**book.runtime_state(), **book.kept_state()}.items():
            setattr(self, name, value)
        register = getattr(self, "register_load_state_dict_pre_hook", None)
        if callable(register):  # checkpoints of 0.3 (the stream at the module's root) and before load too
            register(stream.migrate_state_dict)

    _maxup_draws = stream.stream_attribute("draws")
    _maxup_agreed_rows = stream.stream_attribute("agreed_rows")
    _maxup_generator: torch.Generator | None

    def per_sample_loss(self, batch: Any) -> Tensor:
        """Return a 1-D tensor of the batch's per-sample losses (``reduction="none"``).

        Also called on the selection pass's candidate rows, while :attr:`maxup_selecting` is ``True``.

        Raises:
            NotImplementedError: Subclasses must implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `per_sample_loss(batch)` to use MaxUpMixin")

    per_sample_loss._maxup_unimplemented = True  # type: ignore[attr-defined]

    def maxup_sample_index(self, batch: Any) -> Tensor:
        """Return the dataset index of every sample of ``batch`` (``LongTensor [B]``), for ``randomness="sample"``.

        Wrap the dataset in :class:`~lightning_maxup.data.datasets.IndexedDataset` and return ``batch[-1]``.

        Raises:
            NotImplementedError: Subclasses using ``randomness="sample"`` must implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} uses `randomness`='sample' and must implement `maxup_sample_index(batch)`,"
            " returning each sample's dataset index: wrap the dataset in IndexedDataset and return batch[-1]"
        )

    @property
    def maxup_active_m(self) -> int:
        """The ``m`` the next step uses: ``maxup_config.m`` when enabled, else 1 (ordinary augmentation)."""
        return self.maxup_config.m if self.maxup_enabled else 1

    def _maxup_rank(self) -> int:
        trainer = book.trainer_of(self)
        return int(trainer.global_rank) if trainer is not None else 0

    def maxup_resolved_seed(self) -> int:
        """The stream's base seed: configured, ``seed_everything``'s or ``torch.initial_seed()`` (rank 0's in a fit)."""
        if self.maxup_config.seed is None:
            self.maxup_config = self.maxup_config.replace(seed=resolve_seed(None))
        assert self.maxup_config.seed is not None
        return self.maxup_config.seed

    def maxup_keyed_generator(self, batch: Any, m: int, device: torch.device) -> KeyedGenerator:
        """The per-row stream of ``randomness="sample"``, keyed ``(epoch, step, index, occurrence, copy)``."""
        return stream.keyed_generator(self, batch, m, device)

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
            return self.maxup_keyed_generator(book.samples(batch), m, device)
        return self.maxup_generator(device)

    def maxup_preflight(self, batch: Any) -> None:
        """Run ``batch`` through the augmentation, the selection view and the model once; raise on a problem."""
        book.preflight(self, batch)

    @torch.compiler.disable
    def maxup_step(self, batch: Any) -> MaxUpOutput:
        """Run one MaxUp step on ``batch`` with this module's settings and log its statistics.

        Call it from your own ``training_step`` (or manual optimisation). It runs outside ``torch.compile``'s
        graphs; your ``per_sample_loss`` and the forwards it makes compile as usual.
        """
        share = self._maxup_clock.tick(self.device)  # type: ignore[attr-defined]
        book.prepare(self, batch)
        m = self.maxup_active_m
        book.warn_identity(self, m, batch)
        out = maxup_step(
            self.per_sample_loss,
            batch,
            book.step_config(self, m),
            generator=self._maxup_next_generator(batch, m),
            model=self,  # type: ignore[arg-type]
            num_chunks=book.num_chunks(self, m),
            selection_seed=mix_seed(self.maxup_resolved_seed(), self._maxup_rank(), self._maxup_draws, _DROPOUT),
            selection_fn=self.maxup_selection_loss,
        )
        book.after_step(self, out, m)
        self._maxup_log(out, share)
        self.maxup_last_output = out if self.maxup_record else None
        return out

    def maxup_selection_loss(self, batch: Any) -> Tensor:
        """``per_sample_loss`` with :attr:`maxup_selecting` set: how candidates are scored (selection, diagnostics)."""
        self.maxup_selecting = True
        try:
            return self.per_sample_loss(batch)
        finally:
            self.maxup_selecting = False

    maxup_selection_loss.__name__ = "per_sample_loss"  # error messages name the hook the user wrote

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
        sigma = getattr(augment, "input_noise_std", None)  # Theorem 1 holds for pure Gaussian input noise only
        if sigma is not None:
            self._maxup_log_value("grad_norm", gradient_norm_estimate(out.candidate_losses, float(sigma)), b)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Return the MaxUp loss of ``batch`` (the mean of the per-sample worst-copy losses)."""
        return self.maxup_step(batch).loss


_DROPOUT = _DROPOUT_STREAM = 0x5E1EC7  # the stream of train-mode selection's dropout masks


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
