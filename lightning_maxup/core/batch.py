"""Batches as trees of tensors: which leaves are per-sample, and the row operations MaxUp applies to them.

A batch is a tensor or any nesting of tuples, lists, namedtuples, dicts and dataclasses around tensors, as a
DataLoader collates it. MaxUp expands, slices and gathers its *per-sample* leaves: by default every tensor leaf
whose first dimension is the batch size ``B`` (the first dimension of the first tensor leaf). A tensor that is not
per-sample but may happen to have ``B`` rows (a class-weight vector, a lookup table) is marked by wrapping it in
:class:`Shared`: the step, every built-in augmentation and every selection view leave it as it is, and
:func:`unwrap_shared` hands the bare tensor to the loss.

The walker is ``lightning_utilities``' ``apply_to_collection``, the one Lightning and torchmetrics use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_maxup._transfer import transfer_kwargs

__all__ = [
    "Candidates",
    "Shared",
    "batch_size",
    "expand_copies",
    "first_floating",
    "gather_rows",
    "map_rows",
    "memory_format_of",
    "replace_inputs",
    "replace_leaf",
    "slice_rows",
    "split_inputs",
    "tensor_leaves",
    "unwrap_shared",
]


class Shared:
    """Mark a batch tensor as shared by all samples: MaxUp never expands, slices, augments or resizes it.

    The wrapper moves with the batch (Lightning's device transfer calls :meth:`to`) and is removed before the
    batch reaches ``per_sample_loss``, which receives the bare tensor.

    Args:
        value: The shared tensor.

    Example:
        >>> w = Shared(torch.tensor([1.0, 2.0, 3.0]))
        >>> x, y, weights = expand_copies((torch.zeros(3, 2), torch.arange(3), w), 2)
        >>> x.shape, y.shape, weights.value.shape
        (torch.Size([6, 2]), torch.Size([6]), torch.Size([3]))
    """

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"Expected `value` of Shared to be a tensor, got {type(value).__name__}")
        self.value = value

    def to(self, *args: Any, **kwargs: Any) -> Shared:
        """Move the wrapped tensor, as ``Tensor.to`` does (Lightning's batch transfer calls this).

        Without an explicit ``non_blocking``, the copy is non-blocking wherever Lightning copies a plain tensor so
        (any device but the CPU and MPS): Lightning calls this method with the device alone.
        """
        return Shared(self.value.to(*args, **transfer_kwargs(args, kwargs)))

    def pin_memory(self) -> Shared:
        """Pin the wrapped tensor (``DataLoader(pin_memory=True)`` calls this)."""
        return Shared(self.value.pin_memory())

    def __repr__(self) -> str:
        return f"Shared({self.value!r})"


def tensor_leaves(batch: Any) -> list[Tensor]:
    """The tensor leaves of ``batch`` in traversal order, leaving out :class:`Shared` ones.

    Example:
        >>> [t.tolist() for t in tensor_leaves({"x": torch.tensor([1]), "w": Shared(torch.tensor([2]))})]
        [[1]]
    """
    leaves: list[Tensor] = []
    apply_to_collection(batch, Tensor, leaves.append)
    return leaves


def batch_size(batch: Any) -> int:
    """Rows of a batch: the first dimension of its first tensor leaf that is not :class:`Shared`.

    Example:
        >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    for leaf in tensor_leaves(batch):
        if leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError(
        f"Expected a batch holding at least one per-sample tensor (first dimension = batch size), got"
        f" {type(batch).__name__}"
    )


def map_rows(batch: Any, fn: Callable[[Tensor], Tensor], rows: int | None = None) -> Any:
    """Apply ``fn`` to every per-sample leaf (first dimension ``rows``, default :func:`batch_size`).

    Example:
        >>> map_rows((torch.arange(3), torch.tensor(7)), lambda t: t * 10)
        (tensor([ 0, 10, 20]), tensor(7))
    """
    n = batch_size(batch) if rows is None else rows

    def visit(t: Tensor) -> Tensor:
        return fn(t) if t.dim() > 0 and t.shape[0] == n else t

    return apply_to_collection(batch, Tensor, visit)


def expand_copies(batch: Any, m: int) -> Any:
    """Repeat every per-sample leaf ``m`` times, copy-major: row ``k * B + i`` is copy ``k`` of sample ``i``.

    Each leaf keeps its memory format (``repeat`` would return channels-last images as contiguous ones).

    Example:
        >>> expand_copies(torch.tensor([10, 11, 12]), 2)
        tensor([10, 11, 12, 10, 11, 12])
        >>> x = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> expand_copies(x, 3).is_contiguous(memory_format=torch.channels_last)
        True
    """
    return map_rows(batch, lambda t: _repeat_rows(t, m))


def _repeat_rows(t: Tensor, m: int) -> Tensor:
    fmt = memory_format_of(t)
    if fmt == torch.contiguous_format:
        return t.repeat(m, *([1] * (t.dim() - 1)))
    # One copy into a buffer of the leaf's format: the m copies are its outermost dimension.
    out = torch.empty((m * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt)
    out.view(m, *t.shape).copy_(t.expand(m, *t.shape))
    return out


def memory_format_of(t: Tensor) -> torch.memory_format:
    """``torch.channels_last`` (``channels_last_3d``) if ``t`` is laid out so, else ``torch.contiguous_format``.

    What a tensor computed from ``t`` should be made contiguous in. A layout that is contiguous in both formats
    (one channel, or 1x1 pixels) counts as contiguous.

    Example:
        >>> memory_format_of(torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
        torch.channels_last
        >>> memory_format_of(torch.zeros(2, 3))
        torch.contiguous_format
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def gather_rows(batch: Any, rows: Tensor) -> Any:
    """Select ``rows`` (a 1-D index tensor) of every per-sample leaf.

    Each leaf keeps its memory format.

    Example:
        >>> gather_rows((torch.arange(6), torch.arange(6) * 10), torch.tensor([4, 1]))
        (tensor([4, 1]), tensor([40, 10]))
    """
    return map_rows(batch, lambda t: _in_format_of(t.index_select(0, rows.to(t.device)), t))


def _in_format_of(out: Tensor, t: Tensor) -> Tensor:
    fmt = memory_format_of(t)
    return out if fmt == torch.contiguous_format else out.contiguous(memory_format=fmt)


def slice_rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every per-sample leaf (views, no copy).

    Example:
        >>> slice_rows((torch.arange(6), torch.ones(2)), 1, 3)
        (tensor([1, 2]), tensor([1., 1.]))
    """
    return map_rows(batch, lambda t: t[start:stop])


def unwrap_shared(batch: Any) -> Any:
    """Replace every :class:`Shared` leaf by its tensor (what ``per_sample_loss`` receives).

    Example:
        >>> unwrap_shared((torch.zeros(1), Shared(torch.ones(2))))
        (tensor([0.]), tensor([1., 1.]))
    """
    return apply_to_collection(batch, Shared, lambda s: s.value)


def split_inputs(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Return ``(x, y)``: the inputs and the targets among the per-sample tensor leaves of ``batch``.

    The inputs are the per-sample leaf with the most dimensions (the first of them on a tie), so images come
    first in a Hugging Face-style ``{"labels": ..., "pixel_values": ...}`` too; the targets are the first other
    per-sample leaf (``None`` if there is none). This is how the built-in augmentations find the inputs and the
    targets of a tensor, a tuple ``(x, y, ...)``, a namedtuple, a dict or any nesting of these; in an
    autoencoder's ``(x, x)`` the first is the input and the second the target.

    Example:
        >>> x, y = split_inputs({"image": torch.zeros(2, 3), "label": torch.ones(2)})
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [1.0, 1.0])
        >>> x, y = split_inputs({"labels": torch.ones(2), "pixel_values": torch.zeros(2, 3, 4, 4)})
        >>> x.shape, y.tolist()
        (torch.Size([2, 3, 4, 4]), [1.0, 1.0])
    """
    per_sample = _per_sample_leaves(batch)
    if not per_sample:
        raise TypeError(f"Built-in augmentations need a batch holding a tensor, got {type(batch).__name__}")
    i, j = _input_target_positions(per_sample)
    return per_sample[i], None if j is None else per_sample[j]


def _input_target_positions(per_sample: list[Tensor]) -> tuple[int, int | None]:
    """Positions among the per-sample leaves of the inputs (most dimensions, first on a tie) and the targets."""
    i = max(range(len(per_sample)), key=lambda k: (per_sample[k].dim(), -k))
    j = next((k for k in range(len(per_sample)) if k != i), None)
    return i, j


def replace_inputs(batch: Any, x: Tensor, y: Tensor | None = None) -> Any:
    """Return a new batch of the same structure with the leaves :func:`split_inputs` finds replaced.

    Example:
        >>> replace_inputs((torch.zeros(2), torch.zeros(2), torch.arange(2)), torch.ones(2))
        (tensor([1., 1.]), tensor([0., 0.]), tensor([0, 1]))
        >>> replace_inputs({"labels": torch.zeros(2), "pixel_values": torch.zeros(2, 1)}, torch.ones(2, 1))
        {'labels': tensor([0., 0.]), 'pixel_values': tensor([[1.],
                [1.]])}
    """
    leaves = tensor_leaves(batch)
    n = _leading_rows(leaves)
    if not leaves:
        raise TypeError(f"Built-in augmentations need a batch holding a tensor, got {type(batch).__name__}")
    per_sample = _per_sample_leaves(batch)
    i, j = _input_target_positions(per_sample)
    if y is not None and j is None:
        raise ValueError("The batch holds no target tensor to replace")
    replacements = {i: x} if y is None or j is None else {i: x, j: y}
    position = -1

    # By position, not by identity: in a batch ``(x, x)`` (an autoencoder's input and target) only the input changes.
    def visit(t: Tensor) -> Tensor:
        nonlocal position
        if not _is_per_sample(t, n):
            return t
        position += 1
        return replacements.get(position, t)

    return apply_to_collection(batch, Tensor, visit)


def _leading_rows(leaves: list[Tensor]) -> int | None:
    """The batch size as :func:`batch_size` defines it, or ``None`` when every leaf is 0-dimensional."""
    return next((int(t.shape[0]) for t in leaves if t.dim() > 0), None)


def _is_per_sample(t: Tensor, n: int | None) -> bool:
    # A batch of 0-dimensional tensors only (a bare scalar) has that scalar as its input.
    return t.dim() == 0 if n is None else t.dim() > 0 and t.shape[0] == n


def _per_sample_leaves(batch: Any) -> list[Tensor]:
    leaves = tensor_leaves(batch)
    n = _leading_rows(leaves)
    per_sample = [t for t in leaves if _is_per_sample(t, n)]
    return per_sample[:1] if n is None else per_sample


def first_floating(batch: Any, ndim: int) -> Tensor | None:
    """The first per-sample floating tensor leaf with ``ndim`` dimensions (images: 4), or ``None``.

    Example:
        >>> first_floating((torch.zeros(2, 1, 4, 4), torch.arange(2)), 4).shape
        torch.Size([2, 1, 4, 4])
    """
    for t in _per_sample_leaves(batch):
        if t.dim() == ndim and torch.is_floating_point(t):
            return t
    return None


def replace_leaf(batch: Any, old: Tensor, new: Tensor) -> Any:
    """Return ``batch`` with the leaf that *is* ``old`` (by identity) replaced by ``new``.

    Example:
        >>> x = torch.zeros(2)
        >>> replace_leaf((x, torch.ones(2)), x, torch.full((2,), 5.0))
        (tensor([5., 5.]), tensor([1., 1.]))
    """
    return apply_to_collection(batch, Tensor, lambda t: new if t is old else t)


class Candidates:
    """A batch whose ``m`` augmented copies per sample were made already, e.g. in the DataLoader workers.

    ``batch`` holds ``m * B`` rows, copy-major (row ``k * B + i`` is copy ``k`` of sample ``i``), exactly the
    layout :func:`expand_copies` gives. :func:`~lightning_maxup.maxup_step` and the mixin score these rows as they
    are, with no second augmentation; with ``m == 1`` (the warm-up) they train on copy 0. The wrapper moves with
    the batch (Lightning's device transfer calls :meth:`to`).

    Args:
        batch: The ``m * B`` candidate rows (a tensor or a batch tree).
        m: Copies per sample.

    Example:
        >>> c = Candidates((torch.arange(6.0), torch.tensor([0, 1, 2, 0, 1, 2])), m=2)
        >>> c.m, c.num_samples
        (2, 3)
    """

    __slots__ = ("batch", "m")

    def __init__(self, batch: Any, m: int) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Expected `m` of Candidates to be a positive integer, got {m!r}")
        rows = batch_size(batch)
        if rows % m:
            raise ValueError(f"Candidates hold `m`={m} copies per sample, but the batch has {rows} rows")
        self.batch = batch
        self.m = m

    @property
    def num_samples(self) -> int:
        """``B``, the number of samples (rows over ``m``)."""
        return batch_size(self.batch) // self.m

    def to(self, *args: Any, **kwargs: Any) -> Candidates:
        """Move every tensor, as ``Tensor.to`` does (Lightning's batch transfer calls this).

        Without an explicit ``non_blocking``, the copies are non-blocking wherever Lightning copies a plain tensor
        so (any device but the CPU and MPS): Lightning calls this method with the device alone.
        """
        options = transfer_kwargs(args, kwargs)
        moved = apply_to_collection(self.batch, (Tensor, Shared), lambda t: t.to(*args, **options))
        return Candidates(moved, self.m)

    def pin_memory(self) -> Candidates:
        """Pin every tensor (``DataLoader(pin_memory=True)`` calls this)."""
        return Candidates(apply_to_collection(self.batch, (Tensor, Shared), lambda t: t.pin_memory()), self.m)

    def __repr__(self) -> str:
        return f"Candidates(m={self.m}, rows={batch_size(self.batch)})"
