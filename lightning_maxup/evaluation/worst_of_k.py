"""Worst-of-k evaluation: the test-time counterpart of MaxUp's objective.

MaxUp (Gong et al., CVPR 2021) minimises each sample's worst loss over ``m`` random augmentations. The matching
evaluation asks, for each test sample, whether the model survives ``k`` random augmentations of it: a sample
counts as correct only when *all* ``k`` augmented copies are classified correctly. Engstrom et al., "Exploring the
landscape of spatial robustness" (ICML 2019) report it as "worst-of-10" accuracy over random rotations and
translations; AugMax (Wang et al., NeurIPS 2021) validates on the same worst-of-k quantity.

The copies can come from the DataLoader, made the way training makes them: a validation loader over
``MultiView(val_set, transform, k, evaluation=True)`` yields :class:`~lightning_maxup.core.batch.Candidates` of ``k *
B``
rows keyed by ``(seed, index, copy)``, which :func:`worst_of_k_correct_candidates` and
``WorstOfKAccuracy.update(predict, candidates)`` score as they are. Otherwise the ``k`` copies are built exactly as
the MaxUp step builds its candidates: the batch is expanded copy-major
(row ``j * B + i`` is copy ``j`` of sample ``i``, :func:`~lightning_maxup.core.batch.expand_copies`) and the
augmentation is called once on all ``k * B`` rows as ``augment(batch, generator=...)``. Everything runs without
gradient.

:func:`worst_of_k_accuracy` and :func:`worst_of_k_loss` are plain functions of tensors (no Lightning);
:class:`WorstOfKAccuracy` is the torchmetrics ``Metric`` around :func:`worst_of_k_correct`, summed over batches
and reduced over DDP ranks.

:class:`WorstOfKValidation` logs :class:`WorstOfKAccuracy` on the validation batches. Whether a cheap
selection pass picks what the full input would is measured in :mod:`lightning_maxup.evaluation.fidelity`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.exceptions import TorchMetricsUserError
from typing_extensions import override

from lightning_maxup._lightning import Callback
from lightning_maxup._validation import callable_or_none, optional_positive_int, positive_int
from lightning_maxup.core.batch import (
    Candidates,
    batch_size,
    expand_copies,
    slice_rows,
    split_inputs,
    unwrap_shared,
)
from lightning_maxup.core.functional import augment_rows, check_losses, chunk_bounds
from lightning_maxup.core.random import Generator, KeyedGenerator

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = [
    "WorstOfKAccuracy",
    "WorstOfKValidation",
    "copy_keys",
    "worst_of_k_accuracy",
    "worst_of_k_correct",
    "worst_of_k_correct_candidates",
    "worst_of_k_loss",
    "worst_of_k_losses",
]

Predict = Callable[[Tensor], Tensor]
LossFn = Callable[[Any], Tensor]
Augment = Callable[..., Any]


def _check_k(k: Any) -> int:
    return positive_int(k, "k")


def _check_callable(fn: Any, name: str) -> None:
    if fn is None:
        raise TypeError(f"Expected `{name}` to be callable, got None")
    callable_or_none(fn, name)


def _check_chunk_size(chunk_size: Any) -> None:
    optional_positive_int(chunk_size, "chunk_size")


def copy_keys(rows: Tensor, k: int) -> Tensor:
    """Keys ``[k * B, 2]`` of the copy-major expanded batch: ``(row key, copy index)`` for row ``j * B + i``.

    Give them, with a seed, to a :class:`~lightning_maxup.core.random.KeyedGenerator`: copy ``j`` of a sample then
    draws the same augmentation whatever ``k`` is, so worst-of-``k`` and worst-of-``k + 1`` see nested copies.

    Args:
        rows: Integer keys ``[B]`` of the samples (e.g. dataset indices).
        k: Number of copies per sample.

    Example:
        >>> copy_keys(torch.tensor([7, 9]), 2).tolist()
        [[7, 0], [9, 0], [7, 1], [9, 1]]
    """
    rows = rows.to(torch.int64).flatten()
    copy = torch.arange(_check_k(k), device=rows.device, dtype=torch.int64).repeat_interleave(rows.shape[0])
    return torch.stack([rows.repeat(k), copy], dim=1)


def _augmented_copies(batch: Any, augment: Augment, k: int, generator: Generator | None) -> Any:
    b = batch_size(batch)
    return augment_rows(augment, expand_copies(batch, k), k * b, generator, k)


def worst_of_k_correct(
    predict: Predict,
    batch_x: Tensor,
    target: Tensor,
    augment: Augment,
    k: int,
    *,
    generator: Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per sample, whether all ``k`` augmented copies are classified correctly (a bool tensor ``[B]``).

    The augmentation receives the expanded ``(inputs, target)`` pair, as in training, so label-aware
    augmentations run unchanged; each copy is judged against the sample's original ``target``. Label-mixing
    augmentations (Mixup, CutMix) have no single correct class: use :func:`worst_of_k_loss` for them.

    Args:
        predict: Maps inputs ``[rows, ...]`` to logits ``[rows, C]``.
        batch_x: Inputs ``[B, ...]``.
        target: Class indices ``[B]``.
        augment: ``augment(batch, generator=...) -> batch``, called once on the ``k * B`` copy-major rows.
        k: Augmented copies per sample (``k >= 1``).
        generator: Source of the augmentation's randomness (a ``KeyedGenerator`` must serve ``k * B`` rows).
        chunk_size: Rows per forward of ``predict`` (default: all ``k * B`` at once).

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> ok = worst_of_k_correct(net, x, y, GaussianNoise(0.1), k=5, generator=torch.Generator().manual_seed(0))
        >>> ok.shape, ok.dtype
        (torch.Size([8]), torch.bool)
    """
    k = _check_k(k)
    _check_callable(predict, "predict")
    _check_callable(augment, "augment")
    _check_chunk_size(chunk_size)
    b = int(batch_x.shape[0])
    if target.dim() != 1 or target.shape[0] != b:
        raise ValueError(
            f"Expected `target` to hold one class per sample (shape [{b}]), got shape {list(target.shape)}"
        )
    with torch.no_grad():
        copies = _augmented_copies((batch_x, target), augment, k, generator)
        x = copies[0] if isinstance(copies, (tuple, list)) else copies
        labels = target.repeat(k)
        hits = []
        for lo, hi in chunk_bounds(k * b, chunk_size):
            logits = predict(x if hi - lo >= k * b else x[lo:hi])
            hits.append(logits.argmax(dim=-1) == labels[lo:hi].to(logits.device))
        per_copy = hits[0] if len(hits) == 1 else torch.cat(hits)
    return per_copy.view(k, b).all(dim=0)


def worst_of_k_correct_candidates(predict: Predict, candidates: Candidates, *, chunk_size: int | None = None) -> Tensor:
    """Per sample, whether all copies of premade ``candidates`` are classified correctly (a bool tensor ``[B]``).

    ``candidates.batch`` holds ``k * B`` rows, copy-major (a :class:`~lightning_maxup.data.multiview.MultiView` loader
    makes them, with the training pipeline); its inputs and targets are found as the built-in augmentations find
    them (:func:`~lightning_maxup.core.batch.split_inputs`: the inputs are the leaf with the most dimensions).

    Args:
        predict: Maps inputs ``[rows, ...]`` to logits ``[rows, C]``.
        candidates: The ``k`` copies per sample and their class indices (``k * B`` rows each).
        chunk_size: Rows per forward of ``predict`` (default: all ``k * B`` at once).

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(2, 4), torch.tensor([0, 2])
        >>> copies = Candidates((torch.cat([x, x + 0.1, x - 0.1]), y.repeat(3)), m=3)  # k=3 copies of 2 samples
        >>> worst_of_k_correct_candidates(net, copies).shape
        torch.Size([2])
    """
    _check_callable(predict, "predict")
    _check_chunk_size(chunk_size)
    if not isinstance(candidates, Candidates):
        raise TypeError(f"Expected `candidates` to be Candidates (k * B rows), got {type(candidates).__name__}")
    x, labels = split_inputs(candidates.batch)
    if labels is None or labels.shape != x.shape[:1]:
        got = "none" if labels is None else f"shape {list(labels.shape)}"
        raise ValueError(f"Expected the candidates to hold one class per row (shape [{x.shape[0]}]), got {got}")
    k, rows = candidates.m, int(x.shape[0])
    with torch.no_grad():
        hits = []
        for lo, hi in chunk_bounds(rows, chunk_size):
            logits = predict(x if hi - lo >= rows else x[lo:hi])
            hits.append(logits.argmax(dim=-1) == labels[lo:hi].to(logits.device))
        per_copy = hits[0] if len(hits) == 1 else torch.cat(hits)
    return per_copy.view(k, rows // k).all(dim=0)


def worst_of_k_accuracy(
    predict: Predict,
    batch_x: Tensor,
    target: Tensor,
    augment: Augment,
    k: int,
    *,
    generator: Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Share of samples whose ``k`` augmented copies are all classified correctly (a float scalar).

    Arguments as :func:`worst_of_k_correct`. With ``k = 1`` and the identity augmentation it is plain accuracy;
    on nested draws (a ``KeyedGenerator`` over :func:`copy_keys`) it never increases with ``k``.

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> acc = worst_of_k_accuracy(net, x, y, GaussianNoise(0.1), k=10, generator=torch.Generator().manual_seed(0))
        >>> 0.0 <= float(acc) <= 1.0
        True
    """
    ok = worst_of_k_correct(predict, batch_x, target, augment, k, generator=generator, chunk_size=chunk_size)
    return ok.float().mean()


def worst_of_k_losses(
    loss_fn: LossFn,
    batch: Any,
    augment: Augment,
    k: int,
    *,
    generator: Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample losses ``[k, B]`` of ``k`` augmented copies, without gradient (copy ``j`` in row ``j``).

    Args:
        loss_fn: Maps a batch to a 1-D tensor of per-sample losses (``reduction="none"``), as in MaxUp.
        batch: A tensor or a (nested) tuple/list/dict of tensors whose first dimension is the batch.
        augment: ``augment(batch, generator=...) -> batch``, called once on the ``k * B`` copy-major rows.
        k: Augmented copies per sample (``k >= 1``).
        generator: Source of the augmentation's randomness.
        chunk_size: Rows per call of ``loss_fn`` (default: all ``k * B`` at once).

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = torch.nn.Linear(4, 1)
        >>> loss_fn = lambda b: (net(b[0]).squeeze(1) - b[1]) ** 2
        >>> worst_of_k_losses(loss_fn, (torch.randn(5, 4), torch.randn(5)), GaussianNoise(0.1), k=3).shape
        torch.Size([3, 5])
    """
    k = _check_k(k)
    _check_callable(loss_fn, "loss_fn")
    _check_callable(augment, "augment")
    _check_chunk_size(chunk_size)
    b = batch_size(batch)
    name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
    with torch.no_grad():
        copies = _augmented_copies(batch, augment, k, generator)
        parts = []
        for lo, hi in chunk_bounds(k * b, chunk_size):
            chunk = copies if hi - lo >= k * b else slice_rows(copies, lo, hi)
            parts.append(check_losses(loss_fn(unwrap_shared(chunk)), hi - lo, name).float())
        losses = parts[0] if len(parts) == 1 else torch.cat(parts)
    return losses.view(k, b)


def worst_of_k_loss(
    loss_fn: LossFn,
    batch: Any,
    augment: Augment,
    k: int,
    *,
    generator: Generator | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean over samples of the largest loss over ``k`` augmented copies: MaxUp's objective, evaluated.

    Arguments as :func:`worst_of_k_losses`.

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = torch.nn.Linear(4, 1)
        >>> loss_fn = lambda b: (net(b[0]).squeeze(1) - b[1]) ** 2
        >>> batch = (torch.randn(5, 4), torch.randn(5))
        >>> g = torch.Generator().manual_seed(0)
        >>> bool(worst_of_k_loss(loss_fn, batch, GaussianNoise(0.1), k=4, generator=g) >= 0)
        True
    """
    losses = worst_of_k_losses(loss_fn, batch, augment, k, generator=generator, chunk_size=chunk_size)
    return losses.amax(dim=0).mean()


class WorstOfKAccuracy(Metric):
    """Worst-of-k accuracy accumulated over batches and summed over DDP ranks.

    Each :meth:`update` draws the ``k`` copies from a :class:`~lightning_maxup.core.random.KeyedGenerator` seeded
    with ``seed``, keyed per row by ``(update number, row in the batch, copy index)``, or by
    ``(index, copy index)`` when ``update`` is given the samples' dataset ``index``. So an evaluation *replays*:
    after :meth:`reset`, the same model fed the same batches in the same order draws the very same copies and
    gives the same value, on any device and whatever else used the global random state. With ``index`` the draws
    also do not depend on the batch size, the order, or how samples are split across ranks. Copy ``j`` draws the
    same augmentation whatever ``k`` is, so metrics with larger ``k`` see a superset of the copies.

    Without ``index``, ranks that are at the same update draw the same augmentation for the same row of their
    (different) batches; every sample still gets independent draws over its copies.

    Copies made the way training makes them: ``update(predict, candidates)`` with the
    :class:`~lightning_maxup.core.batch.Candidates` of a loader over ``MultiView(val_set, transform, k,
    evaluation=True)`` scores the loader's ``k`` copies as they are (``augment`` may then be ``None``); their keys
    ``(seed, index, copy)`` are fixed per sample, so an evaluation replays as well.

    Args:
        augment: ``augment(batch, generator=...) -> batch``; it receives the expanded ``(inputs, target)`` pair.
            ``None`` when every update gets loader-made ``Candidates``.
        k: Augmented copies per sample (Engstrom et al. use 10).
        seed: Base seed of the copies' draws.
        chunk_size: Rows per forward of ``predict`` (default: all ``k * B`` at once).
        **kwargs: Passed to ``torchmetrics.Metric`` (e.g. ``dist_sync_fn``).

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = torch.nn.Linear(4, 3)
        >>> metric = WorstOfKAccuracy(GaussianNoise(0.1), k=10)
        >>> for _ in range(3):
        ...     metric.update(net, torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> 0.0 <= float(metric.compute()) <= 1.0
        True
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(
        self, augment: Augment | None, k: int = 10, seed: int = 0, chunk_size: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if augment is not None:
            _check_callable(augment, "augment")
        self.k = _check_k(k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an integer, got {seed!r}")
        _check_chunk_size(chunk_size)
        self.augment = augment
        self.seed = seed
        self.chunk_size = chunk_size
        self.num_updates = 0
        self._batch_correct = torch.zeros(0, dtype=torch.bool)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def generator(self, batch_x: Tensor, index: Tensor | None = None) -> KeyedGenerator:
        """The keyed stream of the next :meth:`update` on ``batch_x`` (does not advance the update count)."""
        b, device = int(batch_x.shape[0]), batch_x.device
        if index is None:
            rows = torch.arange(b, device=device, dtype=torch.int64)
            keys = torch.cat([torch.full((self.k * b, 1), self.num_updates, device=device), copy_keys(rows, self.k)], 1)
        else:
            rows = index.to(device=device, dtype=torch.int64)
            keys = torch.cat([torch.full((self.k * b, 1), -1, device=device), copy_keys(rows, self.k)], 1)
        return KeyedGenerator(self.seed, keys)

    def update(
        self, predict: Predict, batch_x: Tensor | Candidates, target: Tensor | None = None, index: Tensor | None = None
    ) -> None:
        """Classify ``k`` augmented copies of each sample of ``batch_x`` with ``predict`` and count the survivors.

        Args:
            predict: Maps inputs to logits ``[rows, C]``; called without gradient.
            batch_x: Inputs ``[B, ...]``, or loader-made ``Candidates`` of ``k * B`` rows (inputs and targets).
            target: Class indices ``[B]`` (none with ``Candidates``).
            index: Optional dataset indices ``[B]`` keying the draws per sample (see the class docstring).
        """
        if isinstance(batch_x, Candidates):
            self._update_candidates(predict, batch_x, target)
            return
        if self.augment is None or target is None:
            what = "`augment` is None" if self.augment is None else "no `target` was given"
            raise ValueError(
                f"WorstOfKAccuracy.update got a plain batch but {what}: pass Candidates from a MultiView loader, or"
                " construct the metric with an `augment` and pass `target`"
            )
        generator = self.generator(batch_x, index)
        self.num_updates += 1
        ok = worst_of_k_correct(
            predict, batch_x, target, self.augment, self.k, generator=generator, chunk_size=self.chunk_size
        )
        self.correct += ok.sum()
        self.total += ok.numel()
        self._batch_correct = ok

    def _update_candidates(self, predict: Predict, candidates: Candidates, target: Tensor | None) -> None:
        if target is not None:
            raise ValueError("Expected no `target` with Candidates (their batch holds the targets), got a tensor")
        if candidates.m != self.k:
            raise ValueError(
                f"The batch holds Candidates with {candidates.m} copies per sample, but the metric's `k` is"
                f" {self.k}; make them agree (MultiView(val_set, transform, {self.k}, evaluation=True))"
            )
        self.num_updates += 1
        ok = worst_of_k_correct_candidates(predict, candidates, chunk_size=self.chunk_size)
        self.correct += ok.sum()
        self.total += ok.numel()
        self._batch_correct = ok

    def forward(
        self, predict: Predict, batch_x: Tensor | Candidates, target: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        """Update with this batch and return the batch's own worst-of-k accuracy.

        Unlike ``Metric.forward``, the batch is evaluated once: torchmetrics' default would reset the draws' update
        count or draw every copy twice. ``dist_sync_on_step`` has no effect.
        """
        if self._is_synced:
            raise TorchMetricsUserError("The Metric shouldn't be synced when performing ``forward``; call ``unsync``")
        self.update(predict, batch_x, target, index)
        value = self._batch_correct.float().mean()
        self._forward_cache = value  # type: ignore[assignment]  # what Lightning logs on_step
        return value

    def compute(self) -> Tensor:
        """Share of the samples seen whose ``k`` copies were all classified correctly."""
        return self.correct.float() / self.total.clamp(min=1)

    def reset(self) -> None:
        """Clear the counts and restart the draws, so the next evaluation replays the last one."""
        super().reset()
        self.num_updates = 0


class WorstOfKValidation(Callback):
    """Log ``val/worst_of_{k}_acc``: the share of validation samples whose ``k`` augmented copies all pass.

    The evaluation counterpart of MaxUp's training objective (Engstrom et al., "Exploring the landscape of
    spatial robustness", ICML 2019: worst-of-10). On every validation batch it splits the batch into inputs and
    targets, classifies ``k`` augmented copies of each sample with ``predict`` (default: the module's forward,
    in the validation loop's eval mode and without gradient) and updates a :class:`WorstOfKAccuracy`, computed (summed
    over ranks) and reset at the end of the epoch. The draws are
    keyed by ``seed`` and the batch's position in the epoch, so every validation epoch (and a rerun) draws the
    same copies; only the model changes between epochs. Several validation dataloaders count as one set.

    Copies made the way training makes them: with ``augment=None`` it scores the loader-made
    :class:`~lightning_maxup.core.batch.Candidates` of a validation loader over ``MultiView(val_set, transform, k,
    evaluation=True)`` as they are (keyed by ``(seed, index, copy)``, the same at every validation) and skips the
    batches of any other validation loader, so a plain loader beside it keeps the ordinary metrics.

    Args:
        augment: ``augment(batch, generator=...) -> batch``, called on the expanded ``(inputs, target)`` pair;
            ``None`` for loader-made copies (see above).
        k: Augmented copies per sample.
        seed: Base seed of the draws.
        predict: ``predict(pl_module, x) -> logits``; default ``pl_module(x)``.
        chunk_size: Rows per forward (default: all ``k * B`` at once).

    Example:
        >>> from lightning_maxup.augment import RandomCrop
        >>> callback = WorstOfKValidation(RandomCrop(8, padding=1), k=10)
        >>> callback.name
        'val/worst_of_10_acc'
    """

    def __init__(
        self,
        augment: Callable[..., Any] | None,
        k: int = 10,
        seed: int = 0,
        predict: Callable[[Any, Tensor], Tensor] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.metric = WorstOfKAccuracy(augment, k=k, seed=seed, chunk_size=chunk_size)
        if predict is not None and not callable(predict):
            raise TypeError(f"Expected `predict` to be callable as predict(pl_module, x) or None, got {predict!r}")
        self.predict = predict
        self.name = f"val/worst_of_{self.metric.k}_acc"

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(batch, Candidates) or self.metric.augment is None:
            self._update_candidates(pl_module, batch)
            return
        x, y = split_inputs(batch)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} needs validation batches with targets, got {type(batch).__name__} without one"
            )
        predict = self.predict
        if predict is None:
            self.metric.update(pl_module, x, y)
        else:
            self.metric.update(lambda inputs: predict(pl_module, inputs), x, y)

    def _update_candidates(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if not isinstance(batch, Candidates):
            return  # another validation loader: with `augment=None` only the MultiView loader's batches count
        predict = self.predict
        if predict is None:
            self.metric.update(pl_module, batch)
        else:
            self.metric.update(lambda inputs: predict(pl_module, inputs), batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metric.num_updates:
            value = self.metric.compute()  # summed over ranks by torchmetrics: every rank logs the same value
            pl_module.log(self.name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.metric.reset()
