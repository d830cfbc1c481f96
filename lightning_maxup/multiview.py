"""MaxUp's ``m`` copies made in the DataLoader workers: a dataset wrapper and the collate that lays them out.

MaxUp (Gong et al., CVPR 2021) trains each sample on the worst of ``m`` random augmentations. When the augmentation
is a per-image pipeline that needs the original image (torchvision ``v2.RandomResizedCrop`` from the decoded image,
``RandAugment`` on ``uint8``, ``ToDtype``, ``Normalize``, or any callable), the copies are best made where the image
is decoded, in the DataLoader workers, as DINO's multi-crop and SimCLR's two views are:

* :class:`MultiView` applies ``transform`` ``m`` times to each item's input, each time to the original input and
  under the global random generators (torch, ``random``, numpy) seeded from ``(seed, epoch, sample index, copy)``,
  and stacks the views on a new first axis. The draws therefore replay exactly, resume mid-epoch and do not depend
  on ``num_workers``, the sampler or the world size.
* :func:`multiview_collate` turns a list of such items into a :class:`~lightning_maxup.batch.Candidates` of
  ``m * B`` rows, copy-major (row ``k * B + i`` is copy ``k`` of sample ``i``), which
  :func:`~lightning_maxup.maxup_step` and :class:`~lightning_maxup.MaxUpMixin` score as they are.

The epoch and the number of views live in a small shared-memory tensor that the workers read at every item, so a
callback in the training process (:class:`~lightning_maxup.data.MultiViewSchedule`) can switch them per epoch, with
persistent workers too: one view per sample during MaxUp's warm-up, ``m`` after it. This module imports no
Lightning.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import Dataset, default_collate, get_worker_info

from lightning_maxup.batch import Candidates
from lightning_maxup.random import mix_seed, resolve_seed

__all__ = ["MultiView", "multiview_collate"]

InputKey = int | str
_SEED, _EPOCH, _VIEWS = 0, 1, 2


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
            return type(item)(*fields)
        return tuple(fields) if isinstance(item, tuple) else fields
    return value


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

    Use it with :func:`multiview_collate` (``DataLoader(ds, collate_fn=ds.collate_fn)``) and, under Lightning,
    the :class:`~lightning_maxup.data.MultiViewSchedule` callback, which sets the epoch and switches to one view
    during MaxUp's warm-up. In a plain loop call :meth:`set_epoch` at every epoch, as for a ``DistributedSampler``.

    Args:
        dataset: A map-style dataset (``__getitem__`` and ``__len__``); decoding happens in its ``__getitem__``.
        transform: Maps one input (PIL image, tensor, array ...) to one view, a tensor of the same shape for every
            copy (end an image pipeline with a fixed-size crop or resize).
        m: Views per sample once MaxUp runs (the module's ``m``).
        input_key: Which field of an item is the input: a position in a tuple or list item, a key of a dict
            item; an item of any other type is the input itself.
        seed: Base seed of the views; ``None`` takes ``seed_everything``'s seed (``PL_GLOBAL_SEED``) or this
            process's ``torch.initial_seed()`` (``MultiViewSchedule`` gives every rank rank 0's).
        clone: Hand ``transform`` a copy of a tensor or array input for every view.
        reseed: Also called with each view's seed before ``transform``, for libraries with their own generators
            (albumentations 2: ``lambda s: pipeline.set_random_seed(s % 2**32)``).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = MultiView(TensorDataset(torch.zeros(6, 3), torch.arange(6)), lambda x: x + torch.rand(3), m=4, seed=0)
        >>> x, y = ds[2]
        >>> x.shape, int(y)
        (torch.Size([4, 3]), 2)
        >>> batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)))
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
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Expected `dataset` to be a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}"
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
        # (seed, epoch, views) in shared memory: DataLoader workers, persistent or not, forked or spawned, read
        # what the training process writes; ranks launched by `ddp_spawn` share it too (and write the same values).
        self._state = torch.tensor([resolve_seed(seed) & ((1 << 63) - 1), 0, m], dtype=torch.int64).share_memory_()

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
        """Set the base seed (``MultiViewSchedule`` sets rank 0's on every rank)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an integer, got {seed!r}")
        self._state[_SEED] = seed & ((1 << 63) - 1)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the views' key; call it before the epoch's DataLoader iterator is made."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Expected `epoch` to be a non-negative integer, got {epoch!r}")
        self._state[_EPOCH] = epoch

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
        seed, epoch, views = self._state.tolist()  # one snapshot per item
        item = self.dataset[index]
        return _set_input(item, self.input_key, self._make(_get_input(item, self.input_key), index, seed, epoch, views))

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
        The batch wrapped in :class:`~lightning_maxup.batch.Candidates` with ``m`` = the items' number of views.

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
        return type(like)(*columns)
    return tuple(columns) if isinstance(like, tuple) else columns


def _check_views(inputs: list[Any]) -> int:
    bad = next((type(x).__name__ for x in inputs if not isinstance(x, Tensor) or x.dim() == 0), None)
    if bad is not None:
        raise TypeError(
            f"multiview_collate expects each item's input to be a [views, ...] tensor from MultiView, got {bad};"
            " wrap the dataset in lightning_maxup.data.MultiView, or check `input_key`"
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
