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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_maxup._state import preserved
from lightning_maxup.batch import (
    batch_size,
    expand_copies,
    gather_rows,
    map_rows,
    slice_rows,
    tensor_leaves,
    unwrap_shared,
)
from lightning_maxup.config import MaxUpConfig, SelectionMode
from lightning_maxup.random import Generator
from lightning_maxup.views import Downsample, downsample_view

__all__ = [
    "MaxUpOutput",
    "SelectionMode",
    "batch_size",
    "chunk_bounds",
    "downsample_view",
    "expand_copies",
    "expected_max_normal",
    "gather_rows",
    "gradient_norm_estimate",
    "maxup_step",
    "raise_if_nonfinite",
    "select_worst",
]

LossFn = Callable[[Any], Tensor]
Augment = Callable[..., Any]

# Messages of errors that mean "this input shape does not fit the network" (convolution/pooling kernels larger
# than the input, mismatched flattened sizes): only these are relabelled as a `selection_size` problem.
_SHAPE_ERROR_MARKERS = (
    "size",
    "shape",
    "kernel",
    "too small",
    "mat1 and mat2",
    "dimension",
)


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
        candidates: The ``m * B`` augmented candidates, copy-major (``None`` when ``m == 1``).
    """

    loss: Tensor
    losses: Tensor
    selected: Tensor
    candidate_losses: Tensor
    batch: Any
    selection_seconds: float
    candidates: Any = None

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
        """Mean selection-pass loss over all ``m * B`` candidates, what averaging over m copies minimises."""
        return self.candidate_losses.mean()

    @property
    def gap(self) -> Tensor:
        """``worst_candidate_loss - mean_candidate_loss``, both from the selection pass, so never negative.

        With Gaussian noise of scale σ this estimates Theorem 1's penalty ``σ · E[max of m normals] · ‖∇ₓL‖``;
        see :func:`gradient_norm_estimate`.
        """
        return (self.candidate_losses.amax(dim=0) - self.candidate_losses.mean(dim=0)).mean()


@functools.lru_cache(maxsize=256)
def expected_max_normal(m: int) -> float:
    """``E[max(Z_1, ..., Z_m)]`` for ``m`` independent standard normals, by numerical integration.

    ``∫ z · m φ(z) Φ(z)^(m-1) dz``, evaluated with adaptive quadrature (absolute error below 1e-10); not the
    ``sqrt(2 log m)`` asymptote, which is 40 % off at ``m = 4``.

    Example:
        >>> round(expected_max_normal(2), 5)  # 1 / sqrt(pi)
        0.56419
    """
    from scipy import integrate, stats

    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Expected `m` to be a positive integer, got {m!r}")
    if m == 1:
        return 0.0
    value, _ = integrate.quad(
        lambda z: z * m * stats.norm.pdf(z) * stats.norm.cdf(z) ** (m - 1), -12.0, 12.0, epsabs=1e-11, limit=200
    )
    return float(value)


def gradient_norm_estimate(candidate_losses: Tensor, sigma: float) -> Tensor:
    """Theorem 1's estimate of the input-gradient norm from Gaussian-noise MaxUp's selection losses ``[m, B]``.

    For ``x' = x + σ z``, ``max_i L(x'_i) - mean_i L(x'_i) ≈ σ ‖∇ₓL‖ (max_i u·z_i - mean_i u·z_i)`` to first
    order, whose expectation is ``σ ‖∇ₓL‖ E[max of m normals]``; so the mean gap divided by
    ``σ · expected_max_normal(m)`` estimates the mean ``‖∇ₓL‖``.

    Example:
        >>> losses = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # m = 2 copies of B = 2 samples
        >>> round(float(gradient_norm_estimate(losses, sigma=0.5)), 4)  # mean gap 0.5 / (0.5 * 0.5642)
        1.7725
    """
    m = int(candidate_losses.shape[0])
    gap = (candidate_losses.amax(dim=0) - candidate_losses.mean(dim=0)).mean()
    return gap / (float(sigma) * expected_max_normal(m))


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


def chunk_bounds(rows: int, chunk_size: int | None = None, num_chunks: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of the selection forwards: one, ``chunk_size`` rows each, or exactly ``num_chunks`` of them.

    ``num_chunks`` wins, and trailing ranges may be empty: under FSDP, DeepSpeed ZeRO-3 or train-mode
    SyncBatchNorm every forward is a collective, so all ranks must make the same number, uneven batch or not.

    Example:
        >>> chunk_bounds(10, chunk_size=4)
        [(0, 4), (4, 8), (8, 10)]
        >>> chunk_bounds(4, num_chunks=3)
        [(0, 2), (2, 4), (4, 4)]
    """
    if num_chunks is not None:
        step = max(1, -(-rows // num_chunks))
        return [(min(k * step, rows), min((k + 1) * step, rows)) for k in range(num_chunks)]
    step = rows if chunk_size is None else chunk_size
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def check_losses(losses: Any, rows: int, name: str) -> Tensor:
    """Return ``losses`` if it is a 1-D tensor of ``rows`` per-sample losses, else raise naming ``name``.

    Example:
        >>> check_losses(torch.zeros(3), 3, "per_sample_loss").shape
        torch.Size([3])
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"`{name}` must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1 or losses.shape[0] != rows:
        raise ValueError(
            f"`{name}` must return a 1-D tensor with one loss per sample (shape [{rows}]), got shape"
            f" {list(losses.shape)}; use reduction='none'"
        )
    return losses


def check_finite(losses: Tensor, what: str) -> None:
    """Raise ``FloatingPointError`` with the count when ``losses`` has NaN or infinite values (one host sync).

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]), "candidate losses")
        Traceback (most recent call last):
        ...
        FloatingPointError: 1 of 2 candidate losses are NaN or infinite; check the model, the learning rate and the augmentation (or pass check_finite=False)
    """  # noqa: E501
    raise_if_nonfinite(int((~torch.isfinite(losses)).sum()), losses.numel(), what)


def raise_if_nonfinite(bad: int, total: int, what: str) -> None:
    """Raise ``FloatingPointError`` naming how many of ``total`` ``what`` are NaN or infinite, if ``bad > 0``.

    Example:
        >>> raise_if_nonfinite(0, 8, "training losses")
    """
    if bad:
        raise FloatingPointError(
            f"{bad} of {total} {what} are NaN or infinite; check the model, the learning rate and the"
            " augmentation (or pass check_finite=False)"
        )


def _name(loss_fn: LossFn) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def augment_rows(augment: Augment | None, batch: Any, rows: int, generator: Generator | None, m: int) -> Any:
    """Apply ``augment`` and check it kept the ``rows`` rows of the expanded batch."""
    out = augment(batch, generator=generator) if augment is not None else batch
    got = batch_size(out)
    if got != rows:
        raise ValueError(
            f"`augment` must keep the number of rows: given {rows} rows ({m} copies x {rows // m} samples), it"
            f" returned {got}"
        )
    return out


def _selection_view(config: MaxUpConfig) -> Callable[[Any], Any]:
    view, fmt = config.view, config.memory_format

    def selection_input(chunk: Any) -> Any:
        out = view(chunk) if view is not None else chunk
        if fmt is not None:
            out = map_rows(out, lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else t)
        return unwrap_shared(out)

    return selection_input


def _relabel_shape_error(err: RuntimeError, view: Any) -> Exception | None:
    if not isinstance(view, Downsample) or isinstance(err, torch.OutOfMemoryError):
        return None
    message = str(err).lower()
    if not any(marker in message for marker in _SHAPE_ERROR_MARKERS):
        return None
    return ValueError(
        f"The selection forward failed on images downsampled to `selection_size`={view.size}; the model may not"
        f" take inputs that small: {err}"
    )


def selection_losses(
    loss_fn: LossFn,
    candidates: Any,
    config: MaxUpConfig,
    *,
    model: nn.Module | None = None,
    num_chunks: int | None = None,
) -> Tensor:
    """Losses ``[m * B]`` of every candidate, without gradient, on the selection view, leaving ``model`` as it was.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> selection_losses(lambda b: net(b).squeeze(1), torch.zeros(6, 2), MaxUpConfig(m=3)).shape
        torch.Size([6])
    """
    rows = batch_size(candidates)
    view = _selection_view(config)
    amp = _autocast(candidates, config.dtype)
    name = _name(loss_fn)
    chunks: list[Tensor] = []
    with torch.no_grad(), preserved(model, config.selection_mode):
        for lo, hi in chunk_bounds(rows, config.chunk_size, num_chunks):
            chunk = candidates if hi - lo >= rows else slice_rows(candidates, lo, hi)
            try:
                with amp:
                    losses = loss_fn(view(chunk))
            except RuntimeError as err:
                relabelled = _relabel_shape_error(err, config.view)
                if relabelled is None:
                    raise
                raise relabelled from err
            chunks.append(check_losses(losses, hi - lo, name).float())
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _autocast(batch: Any, dtype: torch.dtype | None) -> Any:
    if dtype in (None, torch.float32):
        return nullcontext()
    leaves = tensor_leaves(batch)
    return torch.autocast(leaves[0].device.type if leaves else "cpu", dtype=dtype)


def maxup_step(
    loss_fn: LossFn,
    batch: Any,
    config: MaxUpConfig | None = None,
    *,
    generator: Generator | None = None,
    model: nn.Module | None = None,
    num_chunks: int | None = None,
    **options: Any,
) -> MaxUpOutput:
    """One MaxUp step: augment ``m`` copies per sample, pick each sample's worst, forward it with gradient.

    Args:
        loss_fn: Maps a batch to a 1-D tensor of per-sample losses (``reduction="none"``).
        batch: A tensor or a (nested) tuple/list/dict of tensors whose first dimension is the batch; wrap
            tensors that are not per-sample in :class:`~lightning_maxup.batch.Shared`.
        config: The step's options (:class:`~lightning_maxup.MaxUpConfig`); default ``MaxUpConfig()``.
        generator: Source of the augmentation's randomness.
        model: The module ``loss_fn`` runs; given, the selection pass runs it in ``config.selection_mode`` and
            leaves it exactly as it was (buffers, parameters, modes and the global random state).
        num_chunks: Split the selection pass into exactly this many forwards (trailing ones may be empty),
            whatever ``B`` is, so that all ranks make the same number of forwards; overrides ``chunk_size``.
        **options: :class:`~lightning_maxup.MaxUpConfig` fields overriding ``config``, e.g. ``m=4``.

    Returns:
        A :class:`MaxUpOutput`; back-propagate its ``loss``.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")
        >>> out = maxup_step(loss_fn, (x, y), augment=GaussianNoise(0.1), m=4, generator=torch.Generator().manual_seed(0))
        >>> out.loss.backward()
        >>> out.candidate_losses.shape, bool(out.gap >= 0)
        (torch.Size([4, 8]), True)
    """  # noqa: E501
    config = (config or MaxUpConfig()).replace(**options) if options else (config or MaxUpConfig())
    if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"Expected `num_chunks` to be a positive integer or None, got {num_chunks!r}")
    m, b, name = config.m, batch_size(batch), _name(loss_fn)
    start = time.perf_counter()
    if m == 1:
        worst = augment_rows(config.augment, batch, b, generator, 1)
        losses = check_losses(loss_fn(unwrap_shared(worst)), b, name)
        if config.check_finite:
            check_finite(losses.detach(), "losses")
        selected = torch.zeros(b, dtype=torch.long, device=losses.device)
        return MaxUpOutput(losses.mean(), losses, selected, losses.detach()[None], worst, 0.0)
    candidates = augment_rows(config.augment, expand_copies(batch, m), m * b, generator, m)
    candidate_losses = selection_losses(loss_fn, candidates, config, model=model, num_chunks=num_chunks)
    if config.check_finite:
        check_finite(candidate_losses, "candidate losses in the MaxUp selection pass")
    selected, worst_rows = select_worst(candidate_losses, b)
    worst = gather_rows(candidates, worst_rows)
    selection_seconds = time.perf_counter() - start
    losses = check_losses(loss_fn(unwrap_shared(worst)), b, name)
    return MaxUpOutput(
        losses.mean(), losses, selected, candidate_losses.view(m, b), worst, selection_seconds, candidates
    )
