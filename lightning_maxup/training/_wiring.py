"""How the ``MaxUp`` callback drives the loader's :class:`~lightning_maxup.data.multiview.MultiView` (wired once).

A user writes ``MultiView(dataset, transform, m)``, a plain ``DataLoader(..., shuffle=True, num_workers=...)`` and
``Trainer(callbacks=[MaxUp(...)])``. Three things must then hold at the first batch of every epoch, including the
first epoch of a resumed fit, whose loader iterator (and the workers' prefetch) Lightning makes before any callback
hook can see the loader:

* **the views' epoch and count**: the epoch in the views' key, one view during the warm-up and ``m`` after it.
  Before a fit's first iterator exists the callback writes them into every training ``MultiView`` alive in the
  process (:func:`~lightning_maxup.data.multiview.live_training_multiviews`), at the epoch the fit starts with: 0, or
  the one saved in the callback's checkpoint state; from ``on_train_start`` on, into the MultiViews found in the
  training loader.
* **the order**: a ``shuffle=True`` loader draws its workers' base seed and then its permutation's seed from
  torch's global generator when its iterator is made, and Lightning does not restore that generator on resume.
  Around the making of a fit's first iterator the callback seeds torch's CPU generator from ``(seed, epoch)`` and
  puts the previous state back at the epoch's first batch; for each later epoch it hands the loader's
  ``RandomSampler`` (when it has no generator of its own) a generator seeded with the very value the sampler would
  have drawn there. The order is thus a function of the epoch alone, persistent workers or not, and the rest of the
  global stream is left as it was. A loader given its own ``generator`` keeps its own order (and its own resume).
  Lightning itself restarts a plain loader at its first batch after a mid-epoch checkpoint; a mid-epoch resume is
  exact when the loader is resumable (``state_dict``/``load_state_dict`` that skip the batches already given):
  then its replayed order is skipped into at the right place.
* **the checks**: the dataset's ``m`` is the module's, and every DDP rank has the same view seed.

This module is the callback's, kept apart from its schedule; it imports Lightning only through the callback.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from lightning_maxup.core.random import mix_seed
from lightning_maxup.data.multiview import MultiView, live_training_multiviews

__all__ = ["MultiViewWiring", "multiview_datasets"]

_DATASET_DEPTH = 8  # wrappers (Subset, IndexedDataset, ...) searched through for a MultiView
_SHUFFLE_STREAM = 0x5A0FF1E


def multiview_datasets(dataloaders: Any) -> list[tuple[DataLoader, MultiView]]:
    """Every ``(DataLoader, MultiView)`` pair in ``dataloaders``: the MultiView found through ``.dataset`` wrappers.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = MultiView(TensorDataset(torch.zeros(4, 2)), lambda x: x, m=2, seed=0)
        >>> [type(d).__name__ for _, d in multiview_datasets([DataLoader(ds), DataLoader(ds.dataset)])]
        ['MultiView']
    """
    found: list[tuple[DataLoader, MultiView]] = []

    def visit(loader: DataLoader) -> DataLoader:
        dataset: Any = loader.dataset
        for _ in range(_DATASET_DEPTH):
            if isinstance(dataset, MultiView):
                found.append((loader, dataset))
                break
            dataset = getattr(dataset, "dataset", None)
            if dataset is None:
                break
        return loader

    apply_to_collection(dataloaders, DataLoader, visit)
    return found


def next_epoch(trainer: Any) -> int:
    """The epoch a fit resumed from a checkpoint written now would start with (Lightning's restart rules)."""
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    # Saved at the last batch's end, before the epoch counts as processed: the resumed fit starts the next epoch.
    return int(epochs.processed) + int(bool(batches.is_last_batch) and epochs.processed < epochs.started)


class MultiViewWiring:
    """The MultiView side of one ``MaxUp`` callback: what it sets, when, and what it saves (see the module doc).

    Args:
        active: ``active(epoch)``: whether MaxUp runs in ``epoch`` (the callback's schedule).
    """

    def __init__(self, active: Any) -> None:
        self.active = active
        self.datasets: list[MultiView] = []
        self.loaders: list[DataLoader] = []
        self._samplers: list[RandomSampler] = []
        self._trainer: weakref.ReferenceType[Any] | None = None
        self._start_epoch = 0
        self._saved_rng: Tensor | None = None
        self._forked_epoch: int | None = None

    # ---------------------------------------------------------------------------------------------------------------
    # Before the first iterator: every training MultiView of the process
    # ---------------------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        """A fit starts: epoch 0 unless a checkpoint says otherwise (``load``)."""
        self._trainer = weakref.ref(trainer)
        self.datasets = []
        self._forked_epoch = None
        self._start_epoch = 0
        self._set(live_training_multiviews(), 0)

    def load(self, epoch: Any) -> None:
        """The callback's checkpoint state holds the epoch the resumed fit starts with."""
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
            self._start_epoch = epoch
            self._set(live_training_multiviews(), epoch)

    def state(self) -> int | None:
        """The epoch to save, or ``None`` outside a fit with a MultiView."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or not self.datasets:
            return None
        return next_epoch(trainer)

    def fit_start(self, seed: int) -> None:
        """Just before Lightning makes the first iterator: fix the order of the fit's first epoch."""
        if live_training_multiviews():
            self._fork_rng(seed, self._start_epoch)

    # ---------------------------------------------------------------------------------------------------------------
    # From on_train_start: the MultiViews of the training loader
    # ---------------------------------------------------------------------------------------------------------------
    def train_start(self, trainer: Any, module_m: int) -> None:
        """Find the training MultiViews, check them, and set them for the epoch that runs."""
        self._find(trainer)
        epoch = int(trainer.current_epoch)
        for dataset in self.datasets:
            if dataset.m != module_m:
                raise ValueError(
                    f"The training loader's MultiView makes `m`={dataset.m} views per sample, but the module's MaxUp"
                    f" `m` is {module_m}; give both the same value"
                )
            check_same_seed(trainer, dataset)
            stale = dataset.epoch != epoch or dataset.views != self.views(dataset, epoch)
            if stale:
                from lightning_maxup._lightning import rank_zero_warn

                rank_zero_warn(
                    f"The training loader's first batches were made at epoch {dataset.epoch} with"
                    f" {dataset.views} views, not at the trainer's epoch {epoch} with"
                    f" {self.views(dataset, epoch)}: the MultiView was not alive when the fit started (build it"
                    " before `trainer.fit`, or in the data module's `setup`)"
                )
        self._set(self.datasets, epoch)

    def epoch_start(self, trainer: Any, seed: int) -> None:
        """Before each later epoch's iterator: its epoch, view count and order."""
        epoch = int(trainer.current_epoch)
        if self.datasets:  # again: `reload_dataloaders_every_n_epochs` gives new loaders (of the same datasets)
            self._find(trainer)
        self._set(self.datasets, epoch)
        if self.datasets:
            self._fork_rng(seed, epoch)
            for loader in self.loaders:
                self._seed_sampler(loader.sampler, seed, epoch)

    def batch_start(self) -> None:
        """The epoch's iterator has drawn its order: give torch's generator its state back."""
        if self._saved_rng is not None:
            torch.set_rng_state(self._saved_rng)
            self._saved_rng = None

    def end(self) -> None:
        self.batch_start()
        self._trainer = None
        for sampler in self._samplers:
            sampler.generator = None  # as the user made it: the next fit's first epoch draws from the global one
        self._samplers = []

    # ---------------------------------------------------------------------------------------------------------------
    def _find(self, trainer: Any) -> None:
        pairs = [(dl, ds) for dl, ds in multiview_datasets(trainer.train_dataloader) if not ds.evaluation]
        self.loaders = [dl for dl, _ in pairs]
        self.datasets = [ds for _, ds in pairs]

    def views(self, dataset: MultiView, epoch: int) -> int:
        return dataset.m if self.active(epoch) else 1

    def _set(self, datasets: list[MultiView], epoch: int) -> None:
        for dataset in datasets:
            dataset.set_epoch(epoch)
            dataset.set_views(self.views(dataset, epoch))

    def _seed_sampler(self, sampler: Any, seed: int, epoch: int) -> None:
        if not isinstance(sampler, RandomSampler):
            return  # Lightning's DistributedSampler orders by (seed, epoch) already
        if sampler.generator is not None and sampler not in self._samplers:
            return  # the user's own generator
        sampler.generator = order_generator(seed, epoch)
        if sampler not in self._samplers:
            self._samplers.append(sampler)

    def _fork_rng(self, seed: int, epoch: int) -> None:
        if self._forked_epoch == epoch:
            return  # the first epoch of a fit: set in on_fit_start, before its iterator
        if self._saved_rng is None:
            self._saved_rng = torch.get_rng_state()
        torch.default_generator.manual_seed(mix_seed(seed, epoch, _SHUFFLE_STREAM))
        self._forked_epoch = epoch


def order_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator a ``RandomSampler`` makes when a fit's first iterator is made in ``epoch``.

    Its seed is the second value the DataLoader draws from the global generator seeded by ``(seed, epoch)``; the
    first is the workers' base seed.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> _ = torch.default_generator.manual_seed(mix_seed(3, 1, _SHUFFLE_STREAM))
        >>> first = [int(i) for b in DataLoader(range(6), batch_size=6, shuffle=True) for i in b]
        >>> first == torch.randperm(6, generator=order_generator(3, 1)).tolist()
        True
    """
    draws = torch.Generator().manual_seed(mix_seed(seed, epoch, _SHUFFLE_STREAM))
    torch.empty((), dtype=torch.int64).random_(generator=draws)  # the base seed of the loader's workers
    return torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_(generator=draws).item()))


def check_same_seed(trainer: Any, dataset: MultiView) -> None:
    """Raise if ``dataset``'s seed differs from rank 0's (the views would differ across ranks)."""
    if int(getattr(trainer, "world_size", 1)) <= 1:
        return
    seed = int(trainer.strategy.broadcast(dataset.seed, src=0))
    if seed != dataset.seed:
        raise ValueError(
            f"MultiView's seed differs across ranks ({dataset.seed} here, {seed} on rank 0): pass `seed`=... to"
            " MultiView or call seed_everything before building the dataset"
        )
