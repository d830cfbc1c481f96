"""The MaxUp step as a plain function of tensors: no Lightning here.

MaxUp (Gong, Ren, Ye & Liu, "MaxUp: Lightweight Adversarial Training with Data Augmentation Improves Neural
Network Training", CVPR 2021, arXiv:2002.09024) minimises ``E_x[max_i L(x'_i, θ)]`` over ``m`` random
augmentations ``x'_1..x'_m`` of each sample. The gradient of a maximum is the gradient of its arg-max, so one
step is:

1. expand the batch of ``B`` samples to ``m * B`` rows, copy-major (row ``k * B + i`` is copy ``k`` of sample
   ``i``, as ``x.repeat(m, ...)`` lays it out), and augment every row independently;
2. without gradient, compute each row's loss (optionally on a low-resolution view, in chunks) and take, per
   sample, the copy with the largest loss;
3. gather those ``B`` worst copies and run one ordinary forward with gradient on them.

:func:`maxup_step` does exactly that for any per-sample loss function, so plain PyTorch loops and Lightning's
manual optimisation can use it directly; :class:`~lightning_maxup.MaxUpMixin` calls it from ``training_step``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_maxup.random import Generator

__all__ = [
    "MaxUpOutput",
    "SelectionMode",
    "batch_size",
    "downsample_view",
    "expand_copies",
    "gather_rows",
    "maxup_step",
    "select_worst",
    "selection_context",
]

SelectionMode = Literal["eval", "train"]
LossFn = Callable[[Any], Tensor]
Augment = Callable[..., Any]


# --------------------------------------------------------------------------------------------------------------------
# Batches as trees of tensors
# --------------------------------------------------------------------------------------------------------------------
def _map_rows(batch: Any, n: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor leaf whose first dimension has ``n`` rows; keep other leaves as they are."""
    if isinstance(batch, Tensor):
        return fn(batch) if batch.dim() >= 1 and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return type(batch)({k: _map_rows(v, n, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_rows(v, n, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_rows(v, n, fn) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def batch_size(batch: Any) -> int:
    """Rows of a batch: the first dimension of its first tensor (depth-first).

    Example:
        >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(f"Expected a batch holding at least one tensor with a batch dimension, got {type(batch)}")
    return int(t.shape[0])


def expand_copies(batch: Any, m: int) -> Any:
    """Repeat every batch tensor ``m`` times, copy-major: row ``k * B + i`` is copy ``k`` of sample ``i``.

    Example:
        >>> expand_copies(torch.tensor([10, 11, 12]), 2)
        tensor([10, 11, 12, 10, 11, 12])
    """
    n = batch_size(batch)
    return _map_rows(batch, n, lambda t: t.repeat(m, *([1] * (t.dim() - 1))))


def gather_rows(batch: Any, rows: Tensor) -> Any:
    """Select ``rows`` (a 1-D index tensor) of every batch tensor.

    Example:
        >>> gather_rows((torch.arange(6), torch.arange(6) * 10), torch.tensor([4, 1]))
        (tensor([4, 1]), tensor([40, 10]))
    """
    n = batch_size(batch)
    return _map_rows(batch, n, lambda t: t.index_select(0, rows.to(t.device)))


def _slice_rows(batch: Any, start: int, stop: int) -> Any:
    n = batch_size(batch)
    return _map_rows(batch, n, lambda t: t[start:stop])


# --------------------------------------------------------------------------------------------------------------------
# Selection pass
# --------------------------------------------------------------------------------------------------------------------
@contextmanager
def selection_context(model: nn.Module | None, mode: SelectionMode = "eval") -> Iterator[None]:
    """Run the block with ``model`` in the selection pass's mode, and restore it afterwards.

    ``"eval"`` puts the whole model in eval mode: normalisation layers use their running statistics, dropout is
    off, and each row's loss depends on that row alone (so selection is per sample and independent of chunking,
    and SyncBatchNorm makes no collective call). ``"train"`` keeps train mode, so normalisation layers use the
    statistics of the candidate batch, but stops them from updating their running statistics and
    ``num_batches_tracked``.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> with selection_context(bn, "train"), torch.no_grad():
        ...     _ = bn(torch.randn(8, 3))
        >>> int(bn.num_batches_tracked), bn.training
        (0, True)
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"Expected `selection_mode` to be 'eval' or 'train', got {mode!r}")
    if model is None:
        yield
        return
    modules = list(model.modules())
    training = [mod.training for mod in modules]
    untracked: list[_NormBase] = []
    try:
        if mode == "eval":
            model.eval()
        else:
            for mod in modules:
                if isinstance(mod, _NormBase) and mod.training and mod.track_running_stats:
                    mod.track_running_stats = False
                    untracked.append(mod)
        yield
    finally:
        for mod, was_training in zip(modules, training, strict=True):
            mod.training = was_training
        for mod in untracked:
            mod.track_running_stats = True


# Up to this side, two small matrix products beat the direct antialiased kernel on CPU by an order of magnitude
# (docs/benchmarks.md); above it the dense matrices waste too many FLOPs.
_MATMUL_RESIZE_MAX_SIDE = 64


@functools.lru_cache(maxsize=32)
def _resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[n_out, n_in]`` matrix of 1-D antialiased bilinear resizing, read off ``F.interpolate`` of the identity.

    Resizing is linear and separable, so ``A_h @ x @ A_w.T`` equals ``F.interpolate(x, ..., antialias=True)`` up
    to float rounding.
    """
    eye = torch.eye(n_in, dtype=torch.float64, device=device).view(n_in, 1, 1, n_in)
    cols = F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=True, align_corners=False)
    return cols.view(n_in, n_out).t().to(dtype).contiguous()


def _resize_antialiased(x: Tensor, size: int) -> Tensor:
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if max(h, w) > _MATMUL_RESIZE_MAX_SIDE or x.dtype not in (torch.float32, torch.float64):
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    a_h = _resize_matrix(h, size, x.dtype, x.device)
    a_w = a_h if w == h else _resize_matrix(w, size, x.dtype, x.device)
    out = torch.matmul(torch.matmul(a_h, x), a_w.t())
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _images_to(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=memory_format) if t.dim() == 4 and t.is_floating_point() else t


def downsample_view(batch: Any, size: int) -> Any:
    """Return the batch with its images (the first 4-D floating tensor) resized to ``size x size``.

    Antialiased bilinear resizing, as the paper selects on 16 px CIFAR and 96 px ImageNet views.

    Example:
        >>> x, y = downsample_view((torch.rand(2, 3, 32, 32), torch.zeros(2)), 16)
        >>> x.shape
        torch.Size([2, 3, 16, 16])
    """
    done = False

    def visit(b: Any) -> Any:
        nonlocal done
        if isinstance(b, Tensor):
            if not done and b.dim() == 4 and b.is_floating_point():
                done = True
                if b.shape[-2:] == (size, size):
                    return b
                return _resize_antialiased(b, size)
            return b
        if isinstance(b, dict):
            return type(b)({k: visit(v) for k, v in b.items()})
        if isinstance(b, (tuple, list)):
            items = [visit(v) for v in b]
            return type(b)(*items) if hasattr(b, "_fields") else type(b)(items)
        return b

    out = visit(batch)
    if not done:
        raise ValueError(
            "`selection_size` resizes images, but the batch holds no 4-D floating tensor [N, C, H, W];"
            " pass `selection_view` to make the selection view of other data"
        )
    return out


def _check_losses(losses: Any, rows: int, name: str) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"`{name}` must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1 or losses.shape[0] != rows:
        raise ValueError(
            f"`{name}` must return a 1-D tensor with one loss per sample (shape [{rows}]), got shape"
            f" {list(losses.shape)}; use reduction='none'"
        )
    return losses


def _name(loss_fn: LossFn) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


@dataclass
class MaxUpOutput:
    """What one MaxUp step computed.

    Attributes:
        loss: Mean of the ``B`` worst-copy losses, with gradient; back-propagate this.
        losses: The ``B`` per-sample worst-copy losses of the gradient forward.
        selected: For each sample, which of its ``m`` copies was the worst (``[B]``, in ``[0, m)``).
        candidate_losses: Selection-pass losses ``[m, B]`` without gradient (``losses.detach()[None]`` when
            ``m == 1``, where there is no selection pass).
        batch: The worst copies, ``B`` rows, as forwarded with gradient.
        selection_seconds: Host wall-clock seconds spent expanding, augmenting and selecting.
    """

    loss: Tensor
    losses: Tensor
    selected: Tensor
    candidate_losses: Tensor
    batch: Any
    selection_seconds: float

    @property
    def m(self) -> int:
        """Number of copies per sample."""
        return int(self.candidate_losses.shape[0])

    @property
    def worst_candidate_loss(self) -> Tensor:
        """Mean over samples of the selection pass's max over copies."""
        return self.candidate_losses.amax(dim=0).mean()

    @property
    def mean_candidate_loss(self) -> Tensor:
        """Mean loss over all ``m * B`` candidates: what ordinary augmentation averaged over m copies minimises.

        The gap to :attr:`worst_candidate_loss` estimates the gradient-norm penalty of the paper's Theorem 1.
        """
        return self.candidate_losses.mean()


def _validate_m(m: Any) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Expected `m` to be a positive integer, got {m!r}")
    return m


def _validate_optional_positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer or None, got {value!r}")
    return value


def _validate_selection_precision(dtype: Any, memory_format: Any) -> None:
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"Expected `selection_dtype` to be torch.bfloat16, torch.float16, torch.float32 or None, got {dtype!r}"
        )
    if memory_format not in (None, torch.contiguous_format, torch.channels_last):
        raise ValueError(
            "Expected `selection_memory_format` to be torch.channels_last, torch.contiguous_format or None, got"
            f" {memory_format!r}"
        )


def select_worst(candidate_losses: Tensor, batch_rows: int) -> tuple[Tensor, Tensor]:
    """Per-sample arg-max over copies of copy-major losses ``[m * B]``.

    Returns:
        ``(selected, rows)``: each sample's worst copy index in ``[0, m)`` and its row ``selected * B + i``.

    Example:
        >>> select_worst(torch.tensor([1.0, 5.0, 3.0, 2.0]), 2)  # copies (1, 3) of sample 0, (5, 2) of sample 1
        (tensor([1, 0]), tensor([2, 1]))
    """
    per_copy = candidate_losses.view(-1, batch_rows)
    selected = per_copy.argmax(dim=0)
    rows = selected * batch_rows + torch.arange(batch_rows, device=selected.device)
    return selected, rows


def maxup_step(
    loss_fn: LossFn,
    batch: Any,
    augment: Augment | None,
    m: int,
    *,
    generator: Generator | None = None,
    model: nn.Module | None = None,
    selection_mode: SelectionMode = "eval",
    chunk_size: int | None = None,
    selection_size: int | None = None,
    selection_view: Callable[[Any], Any] | None = None,
    check_finite: bool = True,
    num_chunks: int | None = None,
    selection_dtype: torch.dtype | None = None,
    selection_memory_format: torch.memory_format | None = None,
) -> MaxUpOutput:
    """One MaxUp step: augment ``m`` copies per sample, pick each sample's worst, forward it with gradient.

    Args:
        loss_fn: Maps a batch to a 1-D tensor of per-sample losses (``reduction="none"``).
        batch: A tensor or a (nested) tuple/list/dict of tensors whose first dimension is the batch.
        augment: ``augment(batch, generator=...) -> batch``, applied to the ``m * B``-row expanded batch; ``None``
            for no augmentation.
        m: Copies per sample. ``m == 1`` is ordinary augmentation: one augmented forward, no selection pass.
        generator: Source of the augmentation's randomness.
        model: The module ``loss_fn`` runs; given, the selection pass runs it in ``selection_mode`` and restores
            its mode afterwards.
        selection_mode: ``"eval"`` (default: running statistics, per-sample losses, no running-stat updates) or
            ``"train"`` (batch statistics of the candidates, running statistics left untouched).
        chunk_size: Rows per selection forward, to bound memory; ``None`` forwards all ``m * B`` rows at once.
        selection_size: Select on images downsampled to this side; the gradient forward stays at full size.
        selection_view: Custom selection view ``view(batch) -> batch`` (e.g. a point subset); overrides
            ``selection_size``.
        check_finite: Raise if a candidate loss is NaN or infinite (costs one host sync on an accelerator).
        num_chunks: Split the selection pass into exactly this many forwards of near-equal size (trailing ones
            may be empty), whatever ``B`` is. Under SyncBatchNorm with ``selection_mode="train"`` every forward is
            a collective, so all ranks must make the same number of them, even on an uneven last batch;
            overrides ``chunk_size``.
        selection_dtype: Run the selection forward under ``torch.autocast`` with this dtype (``torch.bfloat16``
            or ``torch.float16``); ``None`` (default) keeps full precision. Copies whose losses differ by less than
            the reduced precision may be ranked differently; the gradient forward is unaffected. On CPUs with
            AVX-512 BF16/AMX, ``torch.bfloat16`` makes the selection forward several times faster (see
            ``docs/benchmarks.md``).
        selection_memory_format: Convert the selection view's images (4-D floating tensors) to this memory
            format, e.g. ``torch.channels_last``, which convolutions then run in; ``None`` leaves them as they are.

    Returns:
        A :class:`MaxUpOutput`; back-propagate its ``loss``.

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")
        >>> out = maxup_step(loss_fn, (x, y), GaussianNoise(0.1), m=4, generator=torch.Generator().manual_seed(0))
        >>> out.loss.backward()
        >>> out.candidate_losses.shape, bool(out.loss >= out.mean_candidate_loss - 1e-6)
        (torch.Size([4, 8]), True)
    """
    _validate_m(m)
    chunk_size = _validate_optional_positive_int(chunk_size, "chunk_size")
    num_chunks = _validate_optional_positive_int(num_chunks, "num_chunks")
    selection_size = _validate_optional_positive_int(selection_size, "selection_size")
    _validate_selection_precision(selection_dtype, selection_memory_format)
    name = _name(loss_fn)
    b = batch_size(batch)
    start = time.perf_counter()

    def augmented(source: Any, rows: int) -> Any:
        out = augment(source, generator=generator) if augment is not None else source
        got = batch_size(out)
        if got != rows:
            raise ValueError(
                f"`augment` must keep the number of rows: given {rows} rows ({m} copies x {b} samples), it"
                f" returned {got}"
            )
        return out

    if m == 1:
        candidates = augmented(batch, b)
        losses = _check_losses(loss_fn(candidates), b, name)
        selected = torch.zeros(b, dtype=torch.long, device=losses.device)
        return MaxUpOutput(losses.mean(), losses, selected, losses.detach()[None], candidates, 0.0)

    candidates = augmented(expand_copies(batch, m), m * b)
    view = selection_view
    if view is None and selection_size is not None:
        size = selection_size

        def view(c: Any) -> Any:
            return downsample_view(c, size)

    if selection_memory_format is not None:
        inner, fmt = view, selection_memory_format

        def view(c: Any) -> Any:
            c = inner(c) if inner is not None else c
            return _map_rows(c, batch_size(c), lambda t: _images_to(t, fmt))

    amp_device: str | None = None
    if selection_dtype not in (None, torch.float32):
        first = _first_tensor(candidates)
        amp_device = first.device.type if first is not None else "cpu"

    rows = m * b
    step = rows if chunk_size is None else chunk_size
    if num_chunks is not None:
        step = max(1, -(-rows // num_chunks))
        bounds = [(min(k * step, rows), min((k + 1) * step, rows)) for k in range(num_chunks)]
    else:
        bounds = [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]
    chunks: list[Tensor] = []
    with torch.no_grad(), selection_context(model, selection_mode):
        for lo, hi in bounds:
            chunk = candidates if hi - lo >= rows else _slice_rows(candidates, lo, hi)
            n = hi - lo
            try:
                selection_input = view(chunk) if view is not None else chunk
                if amp_device is not None:
                    with torch.autocast(amp_device, dtype=selection_dtype):
                        chunk_losses = loss_fn(selection_input)
                else:
                    chunk_losses = loss_fn(selection_input)
            except RuntimeError as err:
                if selection_size is not None and selection_view is None:
                    raise ValueError(
                        f"The selection forward failed on images downsampled to `selection_size`={selection_size};"
                        f" the model may not take inputs that small: {err}"
                    ) from err
                raise
            chunks.append(_check_losses(chunk_losses, n, name).float())
    candidate_losses = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    if check_finite and not bool(torch.isfinite(candidate_losses).all()):
        bad = int((~torch.isfinite(candidate_losses)).sum())
        raise FloatingPointError(
            f"{bad} of {rows} candidate losses in the MaxUp selection pass are NaN or infinite; check the model,"
            " the learning rate and the augmentation (or pass check_finite=False)"
        )
    selected, worst_rows = select_worst(candidate_losses, b)
    worst = gather_rows(candidates, worst_rows)
    selection_seconds = time.perf_counter() - start
    losses = _check_losses(loss_fn(worst), b, name)
    return MaxUpOutput(losses.mean(), losses, selected, candidate_losses.view(m, b), worst, selection_seconds)
