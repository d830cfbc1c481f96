"""MaxUp's ``m`` copies made in the DataLoader workers: a dataset wrapper and the collate that lays them out.

MaxUp (Gong et al., CVPR 2021) trains each sample on the worst of ``m`` random augmentations. When the augmentation
is a per-image pipeline that needs the original image (torchvision ``v2.RandomResizedCrop`` from the decoded image,
``RandAugment`` on ``uint8``, ``ToDtype``, ``Normalize``, or any callable), the copies are best made where the image
is decoded, in the DataLoader workers, as DINO's multi-crop and SimCLR's two views are:

* :class:`MultiView` applies ``transform`` ``m`` times to each item's input, each time to the original input and
  under the global random generators (torch, ``random``, numpy) seeded from ``(seed, epoch, sample index, copy)``,
  and stacks the views on a new first axis. The draws therefore replay exactly, resume mid-epoch and do not depend
  on ``num_workers``, the sampler or the world size.
* :func:`multiview_collate` turns a list of such items into a :class:`~lightning_maxup.core.batch.Candidates` of
  ``m * B`` rows, copy-major (row ``k * B + i`` is copy ``k`` of sample ``i``), which
  :func:`~lightning_maxup.maxup_step` and :class:`~lightning_maxup.MaxUpMixin` score as they are.

The epoch and the number of views live in a small shared-memory tensor that the workers read at every item, so a
callback in the training process (the :class:`~lightning_maxup.MaxUp` callback) can switch them per epoch, with
persistent workers too: one view per sample during MaxUp's warm-up, ``m`` after it. Items are marked so that
torch's ``default_collate`` collates them as :func:`multiview_collate` does. This module imports no Lightning.
"""

from __future__ import annotations

import random
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from lightning_maxup.core.batch import Candidates
from lightning_maxup.core.random import mix_seed, resolve_seed

__all__ = ["MultiView", "multiview_collate"]

InputKey = int | str
_SEED, _EPOCH, _VIEWS, _SERVED = 0, 1, 2, 3
#: Items a pass may serve beyond ``len(dataset)`` before MultiView warns that its epoch was never advanced (covers a
#: ``DistributedSampler``'s padding on ranks that share the state).
_SERVED_SLACK = 64


def _check_input_key(input_key: Any) -> InputKey:
    if isinstance(input_key, bool) or not isinstance(input_key, (int, str)):
        raise TypeError(f"Expected `input_key` to be an int (tuple items) or a str (dict items), got {input_key!r}")
    return input_key


def _get_input(item: Any, input_key: InputKey) -> Any:
    """The input of ``item``: ``item[input_key]`` of a tuple, list or dict, else the whole item."""
    if isinstance(item, Mapping) or (isinstance(item, (tuple, list)) and not isinstance(item, str)):
        container: Any = item
        try:
            return container[input_key]
        except (KeyError, IndexError, TypeError) as err:
            keys = list(item) if isinstance(item, Mapping) else f"positions 0..{len(item) - 1}"
            raise KeyError(
                f"`input_key`={input_key!r} names no field of the dataset's {type(item).__name__} item (it has {keys})"
            ) from err
    return item


def _set_input(item: Any, input_key: InputKey, value: Any) -> Any:
    """``item`` with its input replaced by ``value``, of the same type (tuple, namedtuple, list, dict)."""
    if isinstance(item, Mapping):
        return {**item, input_key: value}
    if isinstance(item, (tuple, list)):
        fields = list(item)
        fields[input_key] = value  # type: ignore[index]
        if hasattr(item, "_fields"):  # a namedtuple
            return _plain_type(item)(*fields)
        return tuple(fields) if isinstance(item, tuple) else fields
    return value


# ---------------------------------------------------------------------------------------------------------------
# Items that torch's ``default_collate`` turns into Candidates
# ---------------------------------------------------------------------------------------------------------------
class _ViewItem:
    """Marks an item made by :class:`MultiView`, which ``default_collate`` collates with :func:`multiview_collate`.

    The item types below are registered in torch's ``default_collate_fn_map``, the documented way to extend
    ``default_collate``. ``_input_key`` says which field holds the views.
    """

    _input_key: InputKey = 0


class _ViewTuple(tuple, _ViewItem):  # type: ignore[type-arg]
    """A tuple item of a MultiView: unpacks and compares as the plain tuple."""


class _ViewList(list, _ViewItem):  # type: ignore[type-arg]
    """A list item of a MultiView."""


class _ViewDict(dict, _ViewItem):  # type: ignore[type-arg]
    """A dict item of a MultiView."""


class _ViewTensor(Tensor, _ViewItem):
    """The ``[views, ...]`` tensor of a MultiView whose items are their input alone."""


_NAMEDTUPLE_VIEWS: dict[type, type] = {}


def _namedtuple_view_type(like: type) -> type:
    """A subclass of the namedtuple ``like`` marked as a MultiView item (made once per type; pickled via ``like``)."""
    cls = _NAMEDTUPLE_VIEWS.get(like)
    if cls is None:

        def reduce(self: Any) -> tuple[Any, ...]:
            return _make_namedtuple_view, (like, tuple(self), self._input_key)

        cls = type(like.__name__, (like, _ViewItem), {"__reduce__": reduce, "__module__": like.__module__})
        _NAMEDTUPLE_VIEWS[like] = cls
    return cls


def _make_namedtuple_view(like: type, fields: tuple[Any, ...], input_key: InputKey) -> Any:
    item = _namedtuple_view_type(like)(*fields)
    item._input_key = input_key
    return item


def _plain_type(item: Any) -> type:
    """The user's item type behind a marked item (``_ViewTuple`` -> ``tuple``, a marked namedtuple -> its type)."""
    cls = type(item)
    return cls.__mro__[1] if isinstance(item, _ViewItem) else cls


def _mark(item: Any, input_key: InputKey) -> Any:
    """``item`` as a marked MultiView item of the same kind, for ``default_collate``."""
    marked: Any
    if isinstance(item, Mapping):
        marked = _ViewDict(item)
    elif isinstance(item, tuple) and hasattr(item, "_fields"):
        marked = _namedtuple_view_type(type(item))(*item)
    elif isinstance(item, tuple):
        marked = _ViewTuple(item)
    elif isinstance(item, list):
        marked = _ViewList(item)
    else:
        marked = item.as_subclass(_ViewTensor)
    marked._input_key = input_key
    return marked


def _collate_view_items(batch: list[Any], *, collate_fn_map: Any = None) -> Candidates:
    """``default_collate``'s handler for MultiView items: :func:`multiview_collate`."""
    return multiview_collate(batch, batch[0]._input_key)


def _register_default_collate() -> None:
    # `_ViewItem` covers the namedtuple subclasses (found by isinstance after the exact-type look-up fails).
    for cls in (_ViewTuple, _ViewList, _ViewDict, _ViewTensor, _ViewItem):
        default_collate_fn_map[cls] = _collate_view_items


@contextmanager
def _seeded_global_rngs(restore: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``seed(value)``, which seeds torch's CPU generator, ``random`` and (if imported) numpy's global one.

    ``restore`` puts the three states back on exit: needed in the training process, whose streams others use;
    not in a DataLoader worker, where restoring numpy's state alone would cost ~0.2 ms per item.
    """
    np = sys.modules.get("numpy")
    saved = None
    if restore:
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state() if np is not None else None)

    def seed(value: int) -> None:
        torch.default_generator.manual_seed(value)
        random.seed(value)
        if np is not None:
            np.random.seed(value & 0xFFFFFFFF)

    try:
        yield seed
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            if np is not None:
                np.random.set_state(saved[2])


class MultiView(Dataset):
    """Wrap a map-style dataset so that item ``i`` carries ``m`` views of its input, made by ``transform``.

    ``MultiView(dataset, transform, m)[i]`` is ``dataset[i]`` with its input replaced by one tensor stacking the
    views on a new first axis (``[views, *view_shape]``); labels and other fields pass through. Every view is
    ``transform`` applied to the original input (a copy of it when it is a tensor, so an in-place transform cannot
    reach the next view or the dataset), with torch's CPU generator, Python's ``random`` and numpy's global
    generator seeded from ``mix_seed(seed, epoch, i, k)`` for copy ``k``: torchvision ``v2`` transforms and most
    others draw from these. A view is thus a function of ``(seed, epoch, i, k)`` alone, whatever the worker, the
    sampler or the world size; and copy 0 does not depend on how many views are made. In the training process
    (``num_workers=0``) the three global states are restored afterwards; in a worker they are left seeded.

    Wired once: a plain ``DataLoader(ds, batch_size, shuffle=True, num_workers=...)`` needs no ``collate_fn``
    (an item is marked as a MultiView item, and torch's ``default_collate`` lays a list of them out as
    :func:`multiview_collate` does, into :class:`~lightning_maxup.core.batch.Candidates`), and under Lightning the
    :class:`~lightning_maxup.MaxUp` callback finds the MultiView in the training loader and sets its epoch and
    view count (one view during the warm-up, ``m`` after it) before each epoch's first batch, resumed fits and
    persistent workers included. In a plain loop call :meth:`set_epoch` at every epoch, as for a
    ``DistributedSampler``; a pass that makes more than ``len(dataset)`` (+64) items at one epoch warns that the
    views repeat. ``DataLoader(ds, collate_fn=ds.collate_fn)`` gives the same batches.

    For evaluation (worst-of-k accuracy over the training pipeline's copies) pass ``evaluation=True``: the copies
    are keyed by ``(seed, 0, index, copy)`` at every pass, so an evaluation replays, and no callback changes them.

    Args:
        dataset: A map-style dataset (``__getitem__`` and ``__len__``); decoding happens in its ``__getitem__``.
        transform: Maps one input (PIL image, tensor, array ...) to one view, a tensor of the same shape for every
            copy (end an image pipeline with a fixed-size crop or resize).
        m: Views per sample once MaxUp runs (the module's ``m``).
        input_key: Which field of an item is the input: a position in a tuple or list item, a key of a dict
            item; an item of any other type is the input itself.
        seed: Base seed of the views; ``None`` takes ``seed_everything``'s seed (``PL_GLOBAL_SEED``) or this
            process's ``torch.initial_seed()``. Under DDP every rank must build the dataset with the same seed:
            when training starts the ``MaxUp`` callback compares each rank's with rank 0's and raises if they
            differ (it does not overwrite them: the workers may have made batches with it already).
        clone: Hand ``transform`` a copy of a tensor or array input for every view.
        reseed: Also called with each view's seed before ``transform``, for libraries with their own generators
            (albumentations 2: ``lambda s: pipeline.set_random_seed(s % 2**32)``).
        evaluation: Fixed copies for evaluation: epoch 0 always, ``m`` views always, never driven by a callback.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = MultiView(TensorDataset(torch.zeros(6, 3), torch.arange(6)), lambda x: x + torch.rand(3), m=4, seed=0)
        >>> x, y = ds[2]
        >>> x.shape, int(y)
        (torch.Size([4, 3]), 2)
        >>> batch = next(iter(DataLoader(ds, batch_size=2)))  # default_collate makes Candidates
        >>> batch.m, batch.batch[0].shape, batch.batch[1].tolist()
        (4, torch.Size([8, 3]), [0, 1, 0, 1, 0, 1, 0, 1])
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Tensor],
        m: int,
        *,
        input_key: InputKey = 0,
        seed: int | None = None,
        clone: bool = True,
        reseed: Callable[[int], Any] | None = None,
        evaluation: bool = False,
    ) -> None:
        iterable = isinstance(dataset, IterableDataset)
        if iterable or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            kind = "an IterableDataset" if iterable else type(dataset).__name__
            raise TypeError(
                "Expected `dataset` to be a map-style dataset (__getitem__ and __len__, items fetched by index), got"
                f" {kind} ({type(dataset).__name__}); a view is keyed by the sample's index, which an IterableDataset"
                " does not give"
            )
        if not callable(transform):
            raise TypeError(f"Expected `transform` to be callable, got {transform!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Expected `m` to be a positive integer, got {m!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Expected `seed` to be an integer or None, got {seed!r}")
        if reseed is not None and not callable(reseed):
            raise TypeError(f"Expected `reseed` to be callable or None, got {reseed!r}")
        self.dataset = dataset
        self.transform = transform
        self.m = m
        self.input_key = _check_input_key(input_key)
        self.clone = bool(clone)
        self.reseed = reseed
        self.evaluation = bool(evaluation)
        # (seed, epoch, views, items served at this epoch) in shared memory: DataLoader workers, persistent or not,
        # forked or spawned, read what the training process writes; ranks launched by `ddp_spawn` share it too (and
        # write the same values).
        self._state = torch.tensor([resolve_seed(seed) & ((1 << 63) - 1), 0, m, 0], dtype=torch.int64).share_memory_()
        self._warned_stale = False
        _register(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("evaluation", False)  # pickled before 0.4
        state.setdefault("_warned_stale", False)
        if state["_state"].numel() == 3:
            state["_state"] = torch.cat([state["_state"], torch.zeros(1, dtype=torch.int64)]).share_memory_()
        self.__dict__.update(state)
        _register(self)  # a copy in a `ddp_spawn` rank is driven by that rank's MaxUp callback

    # ---------------------------------------------------------------------------------------------------------------
    # The state the training process sets and the workers read
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """Base seed of the views."""
        return int(self._state[_SEED])

    @property
    def epoch(self) -> int:
        """The epoch in the views' key."""
        return int(self._state[_EPOCH])

    @property
    def views(self) -> int:
        """Views made per item now: ``m``, or 1 during MaxUp's warm-up."""
        return int(self._state[_VIEWS])

    def set_seed(self, seed: int) -> None:
        """Set the base seed; before the loader is iterated (the workers read it at every item)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, got {seed!r}")
        self._state[_SEED] = seed & ((1 << 63) - 1)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the views' key; call it before the epoch's DataLoader iterator is made.

        Under Lightning the :class:`~lightning_maxup.MaxUp` callback calls it; in a plain loop call it at every epoch,
        as for a ``DistributedSampler``. An evaluation MultiView keeps epoch 0 and refuses any other.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Expected `epoch` to be a non-negative integer, got {epoch!r}")
        if self.evaluation and epoch != 0:
            raise ValueError(
                f"Expected `epoch`=0 for an evaluation MultiView (its copies are fixed per sample), got {epoch}"
            )
        self._state[_EPOCH] = epoch
        self._state[_SERVED] = 0

    def set_views(self, views: int) -> None:
        """Make ``views`` views per item from now on: 1 (warm-up, ordinary augmentation) or ``m``."""
        if isinstance(views, bool) or views not in (1, self.m):
            raise ValueError(f"Expected `views` to be 1 or `m`={self.m}, got {views!r}")
        self._state[_VIEWS] = views

    # ---------------------------------------------------------------------------------------------------------------
    # Items
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def collate_fn(self) -> Callable[[list[Any]], Candidates]:
        """:func:`multiview_collate` for this dataset's ``input_key`` (picklable, for worker processes)."""
        return _Collate(self.input_key)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed, epoch, views, served = self._state.tolist()  # one snapshot per item
        if not self.evaluation:
            self._count_served(served, epoch)
        item = self.dataset[index]
        views_of_input = self._make(_get_input(item, self.input_key), index, seed, epoch, views)
        return _mark(_set_input(item, self.input_key, views_of_input), self.input_key)

    def _count_served(self, served: int, epoch: int) -> None:
        """Count the items made at this epoch; warn once when a second pass would repeat the epoch's views."""
        self._state[_SERVED] += 1  # not atomic across workers: an undercount only delays the warning
        if served >= len(self) + _SERVED_SLACK and not self._warned_stale:
            self._warned_stale = True
            warnings.warn(
                f"MultiView has made {served + 1} items at epoch {epoch} for a dataset of {len(self)} samples: a"
                " second pass over the data is repeating the first pass's views. Call `dataset.set_epoch(epoch)` at"
                " every epoch of a plain loop (the MaxUp callback does it under Lightning), or pass"
                " `evaluation=True` for copies that are fixed on purpose",
                UserWarning,
                stacklevel=2,
            )

    def make_views(self, x: Any, index: int, epoch: int | None = None, views: int | None = None) -> Tensor:
        """The ``[views, ...]`` tensor of views of input ``x`` of sample ``index`` (defaults: the current state).

        Example:
            >>> ds = MultiView([torch.zeros(2)], lambda x: x + torch.rand(2), m=3, seed=0)
            >>> torch.equal(ds.make_views(torch.zeros(2), 0)[:1], ds.make_views(torch.zeros(2), 0, views=1))
            True
        """
        epoch = self.epoch if epoch is None else epoch
        return self._make(x, index, self.seed, epoch, self.views if views is None else views)

    def _make(self, x: Any, index: int, seed: int, epoch: int, views: int) -> Tensor:
        out = []
        with _seeded_global_rngs(restore=get_worker_info() is None) as seed_all:
            for k in range(views):
                s = mix_seed(seed, epoch, int(index), k)
                seed_all(s)
                if self.reseed is not None:
                    self.reseed(s)
                view = self.transform(_copy(x) if self.clone else x)
                if not isinstance(view, Tensor):
                    raise TypeError(
                        f"Expected `transform` to return a tensor, got {type(view).__name__}; end a torchvision"
                        " pipeline with v2.ToImage() and v2.ToDtype(...)"
                    )
                out.append(view)
        shapes = [tuple(v.shape) for v in out]
        if len(set(shapes)) > 1:
            raise ValueError(
                f"`transform` returned views of different shapes for sample {index}: {shapes}; the views of a"
                " sample are stacked, so end the pipeline with a fixed-size crop or resize (e.g."
                " v2.RandomResizedCrop(size))"
            )
        return torch.stack(out)


def _copy(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.clone()
    copy = getattr(x, "copy", None)  # numpy arrays; PIL images are never modified in place by transforms
    return copy() if callable(copy) and type(x).__module__ == "numpy" else x


class _Collate:
    """``multiview_collate`` with a fixed ``input_key``: a picklable ``collate_fn``."""

    def __init__(self, input_key: InputKey) -> None:
        self.input_key = input_key

    def __call__(self, items: list[Any]) -> Candidates:
        return multiview_collate(items, self.input_key)

    def __repr__(self) -> str:
        return f"multiview_collate(input_key={self.input_key!r})"


def multiview_collate(items: Sequence[Any], input_key: InputKey = 0) -> Candidates:
    """Collate :class:`MultiView` items into ``Candidates`` of ``views * B`` rows, copy-major.

    The inputs ``[views, ...]`` of the ``B`` items become rows ``k * B + i`` (copy ``k`` of sample ``i``); every
    other field is collated by ``default_collate`` and its tensors are repeated ``views`` times along the first
    axis, copy-major, so that each row keeps its sample's label. Tuples stay tuples, namedtuples and lists keep
    their type, dict items give a dict.

    Items made while the view count was being switched (Lightning starts the first epoch's workers before any
    callback hook runs) may carry more views than the others: the batch keeps the smallest count. Since copy ``k``
    depends on ``(seed, epoch, index, k)`` alone, the batch is exactly what it would be had every item been made
    with that count.

    Args:
        items: Items of a :class:`MultiView` (the list a DataLoader hands its ``collate_fn``).
        input_key: The input's position or key, as given to :class:`MultiView`.

    Returns:
        The batch wrapped in :class:`~lightning_maxup.core.batch.Candidates` with ``m`` = the items' number of views.

    Example:
        >>> items = [(torch.tensor([[0.0], [10.0]]), 0), (torch.tensor([[1.0], [11.0]]), 1)]  # 2 views, 2 samples
        >>> c = multiview_collate(items)
        >>> c.m, c.batch[0].flatten().tolist(), c.batch[1].tolist()
        (2, [0.0, 1.0, 10.0, 11.0], [0, 1, 0, 1])
    """
    input_key = _check_input_key(input_key)
    if len(items) == 0:
        raise ValueError("Expected `items` to hold at least one item, got an empty list")
    inputs = [_get_input(item, input_key) for item in items]
    views = _check_views(inputs)
    inputs = [x.as_subclass(Tensor) if isinstance(x, _ViewTensor) else x for x in inputs]
    x = torch.stack([v[:views] for v in inputs], dim=1)  # [views, B, ...]: copy-major once flattened
    x = x.reshape(views * len(items), *x.shape[2:])
    first = items[0]
    if isinstance(first, Mapping):
        fields = {k: x if k == input_key else _expand(default_collate([it[k] for it in items]), views) for k in first}
        return Candidates(fields, views)
    if isinstance(first, (tuple, list)):
        columns = [
            x if j == input_key else _expand(default_collate([it[j] for it in items]), views) for j in range(len(first))
        ]
        return Candidates(_rebuild(first, columns), views)
    return Candidates(x, views)


def _rebuild(like: tuple[Any, ...] | list[Any], columns: list[Any]) -> Any:
    if hasattr(like, "_fields"):
        return _plain_type(like)(*columns)
    return tuple(columns) if isinstance(like, tuple) else columns


def _check_views(inputs: list[Any]) -> int:
    bad = next((type(x).__name__ for x in inputs if not isinstance(x, Tensor) or x.dim() == 0), None)
    if bad is not None:
        raise TypeError(
            f"multiview_collate expects each item's input to be a [views, ...] tensor from MultiView, got {bad};"
            " wrap the dataset in lightning_maxup.data.multiview.MultiView, or check `input_key`"
        )
    shapes = sorted({tuple(x.shape[1:]) for x in inputs})
    if len(shapes) > 1:
        raise ValueError(
            f"The samples' views have different shapes {shapes[:4]}; `transform` must end with a fixed-size crop or"
            " resize so that a batch can be stacked"
        )
    return min(int(x.shape[0]) for x in inputs)


def _expand(collated: Any, views: int) -> Any:
    """Repeat every tensor of a collated field ``views`` times along its first axis (copy-major)."""
    if views == 1:
        return collated
    return apply_to_collection(
        collated, Tensor, lambda t: t.repeat(views, *([1] * (t.dim() - 1))) if t.dim() > 0 else t
    )


_register_default_collate()

#: The training MultiViews alive in this process, which the MaxUp callback sets before a fit's first loader
#: iterator exists (Lightning makes it, and the workers start prefetching, before any callback hook sees a loader).
_LIVE: weakref.WeakSet[MultiView] = weakref.WeakSet()


def _register(dataset: MultiView) -> None:
    if not getattr(dataset, "evaluation", False):
        _LIVE.add(dataset)


def live_training_multiviews() -> list[MultiView]:
    """The MultiViews of this process that are not ``evaluation=True`` (for the MaxUp callback)."""
    return [d for d in list(_LIVE) if not d.evaluation]
