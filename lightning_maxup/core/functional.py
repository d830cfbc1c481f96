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

import ctypes
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_maxup.core import random as lr
from lightning_maxup.core._state import preserved
from lightning_maxup.core.batch import (
    Candidates,
    batch_size,
    expand_copies,
    gather_rows,
    map_rows,
    slice_rows,
    tensor_leaves,
    unwrap_shared,
)
from lightning_maxup.core.config import MaxUpConfig, SelectionMode
from lightning_maxup.core.random import Generator
from lightning_maxup.core.views import Downsample, downsample_view

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
    "check_candidates",
    "check_per_sample",
    "raise_if_nonfinite",
    "select_copies",
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
        selected: For each sample, which of its ``m`` copies was trained (``[B]``, in ``[0, m)``): the worst, or
            the one drawn from ``softmax(L / τ)`` with ``selection_temperature``.
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

    ``∫ z · m φ(z) Φ(z)^(m-1) dz`` on ``[-12, 12]`` by Simpson's rule on 24 001 points in float64 (within 1e-10 of
    SciPy's adaptive quadrature for ``m`` up to 1024; the core needs no SciPy); not the ``sqrt(2 log m)`` asymptote,
    which is 40 % off at ``m = 4``.

    Example:
        >>> round(expected_max_normal(2), 5)  # 1 / sqrt(pi)
        0.56419
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Expected `m` to be a positive integer, got {m!r}")
    if m == 1:
        return 0.0
    # Plain Python floats, not tensors: no tensor is made from Python data in a training step (a host sync on CUDA).
    n, lo, hi = 24_000, -12.0, 12.0
    h = (hi - lo) / n
    total = 0.0
    for i in range(n + 1):
        z = lo + i * h
        weight = 1.0 if i in (0, n) else (4.0 if i % 2 else 2.0)
        cdf = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        total += weight * z * m * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * cdf ** (m - 1)
    return total * h / 3


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
    """Per-sample arg-max over copies of copy-major losses ``[m * B]``; a NaN or infinite loss never wins.

    A non-finite loss would otherwise always win (``argmax`` takes NaN for the largest value) and train the model
    on it; it counts as the lowest instead, so a sample trains on its worst finite copy (on copy 0 if it has none).
    ``check_finite`` still raises on it (:func:`maxup_step`; the mixin a step or two later on accelerators).

    Returns:
        ``(selected, rows)``: each sample's worst copy index in ``[0, m)`` and its row ``selected * B + i``.

    Example:
        >>> select_worst(torch.tensor([1.0, 5.0, 3.0, 2.0]), 2)  # copies (1, 3) of sample 0, (5, 2) of sample 1
        (tensor([1, 0]), tensor([2, 1]))
        >>> select_worst(torch.tensor([1.0, float("nan"), 3.0, 2.0]), 2)[0]  # sample 1: NaN loses to 2.0
        tensor([1, 1])
    """
    lowest = torch.full_like(candidate_losses, -math.inf)
    per_copy = torch.where(torch.isfinite(candidate_losses), candidate_losses, lowest).view(-1, batch_rows)
    selected = per_copy.argmax(dim=0)
    rows = selected * batch_rows + torch.arange(batch_rows, device=selected.device)
    return selected, rows


def select_copies(
    candidate_losses: Tensor, batch_rows: int, temperature: float | None = None, generator: Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample choice of the trained copy: the arg-max, or a draw from ``softmax(L / temperature)``.

    The draw is the Gumbel-max trick, ``argmax_k(L_k / τ + G_k)`` with ``G_k = -log(-log U_k)``, one uniform per
    candidate row from ``generator``: no host sync, and with a keyed generator each row's noise depends on its
    key alone. ``temperature=None`` is :func:`select_worst`.

    Returns:
        ``(selected, rows)`` as :func:`select_worst`.

    Example:
        >>> losses = torch.tensor([1.0, 5.0, 3.0, 2.0])
        >>> select_copies(losses, 2, temperature=1e-6, generator=torch.Generator().manual_seed(0))[0]
        tensor([1, 0])
    """
    if temperature is None:
        return select_worst(candidate_losses, batch_rows)
    u = lr.uniform(
        tuple(candidate_losses.shape), generator=generator, device=candidate_losses.device, dtype=torch.float64
    )
    losses = candidate_losses.double()
    scores = torch.where(torch.isfinite(losses), losses / temperature - torch.log(-torch.log(u)), -math.inf)
    return select_worst(scores, batch_rows)


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


def check_losses(losses: Any, rows: int, name: str, *, m: int = 1, candidates: int | None = None) -> Tensor:
    """Return ``losses`` if it is a 1-D tensor of ``rows`` per-sample losses, else raise naming ``name``.

    The message speaks of the user's batch: with ``m > 1`` (the selection pass), ``rows`` are (a chunk of) the
    ``candidates = m * B`` augmented copies of the user's ``B`` samples, and the message says so; a ``[rows, T]``
    result (a per-token loss) gets the hint to take the mean over tokens.

    Example:
        >>> check_losses(torch.zeros(3), 3, "per_sample_loss").shape
        torch.Size([3])
        >>> check_losses(torch.zeros(8, 5), 8, "per_sample_loss", m=4, candidates=8)
        Traceback (most recent call last):
        ...
        ValueError: `per_sample_loss` must return a 1-D tensor with one loss per row it is given (shape [8]), got shape [8, 5]; in MaxUp's selection pass the rows are the 8 candidates (m=4 copies of each of your 2 samples). That is one loss per token: reduce over the tokens, e.g. F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1) (lightning_maxup.augment.sequence_loss leaves padding out)
    """  # noqa: E501
    if not isinstance(losses, Tensor):
        raise TypeError(f"`{name}` must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1 or losses.shape[0] != rows:
        raise ValueError(
            f"`{name}` must return a 1-D tensor with one loss per row it is given (shape [{rows}]), got shape"
            f" {list(losses.shape)}; {_rows_phrase(rows, m, candidates)}. {_shape_hint(losses, rows)}"
        )
    return losses


def _rows_phrase(rows: int, m: int, candidates: int | None) -> str:
    """The rows a loss function was called on, in the terms of the user's batch."""
    if m <= 1 or candidates is None:
        return f"the rows are your batch of {rows} samples"
    what = f"the {candidates} candidates (m={m} copies of each of your {candidates // m} samples)"
    if rows == candidates:
        return f"in MaxUp's selection pass the rows are {what}"
    return f"in MaxUp's selection pass the rows are a chunk of {rows} of {what}"


def _shape_hint(losses: Tensor, rows: int) -> str:
    if losses.dim() >= 2 and losses.shape[0] == rows:
        return (
            "That is one loss per token: reduce over the tokens, e.g. F.cross_entropy(logits.transpose(1, 2),"
            ' targets, reduction="none").mean(dim=1) (lightning_maxup.augment.sequence_loss leaves padding out)'
        )
    if losses.dim() == 0:
        return "A scalar is the batch's mean: pass reduction='none' to the loss"
    return "Return one value per row (reduction='none', then reduce every dimension but the first)"


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
    selection_seed: int | None = None,
) -> Tensor:
    """Losses ``[m * B]`` of every candidate, without gradient, on the selection view, leaving ``model`` as it was.

    With ``selection_seed``, the global random state the forwards draw from (dropout masks in train-mode
    selection) is seeded with it inside the block and restored after, so the masks are the selection's own and
    the gradient pass draws what it would have drawn without a selection pass. Without it, train-mode selection
    with a ``model`` seeds the block from a hash of the global random states (read on the host, no device
    involved): the masks are still the selection's own, and a run seeded alike replays (not while the model holds
    lazy parameters, which its first forward draws from the global stream as it is).

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
        if model is not None and config.selection_mode == "train" and selection_seed is None and not _lazy(model):
            # A lazy module materialises its weights in its first forward, from the global stream as it is.
            selection_seed = _seed_from_global_rng(candidates)
        if selection_seed is not None and model is not None:
            _seed_global_rng(selection_seed, candidates)
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
            chunks.append(check_losses(losses, hi - lo, name, m=config.m, candidates=rows).float())
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


_SELECTION_STREAM = 0x5E1EC7


def _seed_from_global_rng(batch: Any) -> int:
    """A seed hashed from the global CPU random state and that of the batch's CUDA device, neither consumed.

    Both states live on the host (a CUDA generator's state is its seed and offset), so reading them waits for no
    device; the hash changes whenever either stream has advanced.
    """
    states = [torch.random.default_generator.get_state()]
    for leaf in tensor_leaves(batch)[:1]:
        if leaf.device.type == "cuda":
            states.append(torch.cuda.default_generators[leaf.device.index or 0].get_state())
    # The states are host tensors on every machine: read their bytes directly (an element-wise read would be slow).
    raw = b"".join(ctypes.string_at(s.data_ptr(), s.numel() * s.element_size()) for s in states)
    digest = hashlib.blake2b(raw, digest_size=8).digest()
    return lr.mix_seed(int.from_bytes(digest, "little"), _SELECTION_STREAM)


def _lazy(model: nn.Module) -> bool:
    return any(is_lazy(p) for p in model.parameters())


def _seed_global_rng(seed: int, batch: Any) -> None:
    """Seed the CPU generator and that of the batch's CUDA device (the ones ``preserved`` restores)."""
    torch.random.default_generator.manual_seed(seed)
    for leaf in tensor_leaves(batch)[:1]:
        if leaf.device.type == "cuda":
            torch.cuda.default_generators[leaf.device.index or 0].manual_seed(seed)


def _owner(loss_fn: LossFn) -> nn.Module | None:
    """The module ``loss_fn`` runs, where it says so: a module itself, a module's bound method, or a closure cell."""
    if isinstance(loss_fn, nn.Module):
        return loss_fn
    owner = getattr(loss_fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    cells = [cell.cell_contents for cell in getattr(loss_fn, "__closure__", None) or () if _filled(cell)]
    modules = [c for c in cells if isinstance(c, nn.Module)]
    if len(modules) == 1:
        return modules[0]
    return nn.ModuleList(modules) if modules else None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _legacy_config(config: Any, legacy: tuple[Any, ...]) -> MaxUpConfig | None:
    """``config``, or the 0.1 call ``maxup_step(loss_fn, batch, augment, m)`` turned into a config, with a warning."""
    if isinstance(config, MaxUpConfig) and not legacy:
        return config
    if config is None and not legacy:
        return None
    if isinstance(config, MaxUpConfig) or len(legacy) > 1:
        raise TypeError(
            f"maxup_step takes (loss_fn, batch, config) positionally, got {2 + 1 + len(legacy)} positional arguments;"
            " pass the options as keywords"
        )
    warnings.warn(
        "maxup_step(loss_fn, batch, augment, m) is deprecated since lightning_maxup 0.3 and will be removed in 1.0;"
        " pass keywords, maxup_step(loss_fn, batch, augment=..., m=...), or a MaxUpConfig",
        DeprecationWarning,
        stacklevel=3,
    )
    return MaxUpConfig(augment=config, **({"m": legacy[0]} if legacy else {}))


def _autocast(batch: Any, dtype: torch.dtype | None) -> Any:
    if dtype in (None, torch.float32):
        return nullcontext()
    leaves = tensor_leaves(batch)
    return torch.autocast(leaves[0].device.type if leaves else "cpu", dtype=dtype)


def maxup_step(
    loss_fn: LossFn,
    batch: Any,
    config: MaxUpConfig | None = None,
    *legacy: Any,
    generator: Generator | None = None,
    model: nn.Module | None = None,
    num_chunks: int | None = None,
    selection_seed: int | None = None,
    selection_fn: LossFn | None = None,
    **options: Any,
) -> MaxUpOutput:
    """One MaxUp step: augment ``m`` copies per sample, pick each sample's worst, forward it with gradient.

    Args:
        loss_fn: Maps a batch to a 1-D tensor of per-sample losses (``reduction="none"``).
        batch: A tensor or a (nested) tuple/list/dict of tensors whose first dimension is the batch; wrap
            tensors that are not per-sample in :class:`~lightning_maxup.core.batch.Shared`. A
            :class:`~lightning_maxup.core.batch.Candidates` holds copies made already (by the DataLoader): they are
            scored as they are, without ``augment``; with ``m == 1`` the step trains on copy 0.
        config: The step's options (:class:`~lightning_maxup.MaxUpConfig`); default ``MaxUpConfig()``.
        *legacy: Deprecated: the 0.1 call ``maxup_step(loss_fn, batch, augment, m)`` still works, with a
            ``DeprecationWarning``.
        generator: Source of the augmentation's randomness (and of the draw with ``selection_temperature``).
        model: The module ``loss_fn`` runs: the selection pass runs it in ``config.selection_mode`` and leaves it
            exactly as it was (buffers, parameters, modes and the global random state). When omitted, it is
            ``loss_fn`` itself if a module, the module of a bound method, or the modules ``loss_fn`` closes over;
            if none is found and ``selection_mode`` was asked for, a warning says that it cannot apply.
        num_chunks: Split the selection pass into exactly this many forwards (trailing ones may be empty),
            whatever ``B`` is, so that all ranks make the same number of forwards; overrides ``chunk_size``.
        selection_seed: Seed of the global random state during the selection forwards (train-mode dropout
            draws its own masks from it; the state is restored after); ``None`` leaves the state as it is there.
        selection_fn: The loss function of the selection pass, if not ``loss_fn`` (the mixin passes one that
            flags the call as selection).
        **options: :class:`~lightning_maxup.MaxUpConfig` fields overriding ``config``, e.g. ``m=4``.

    Returns:
        A :class:`MaxUpOutput`; back-propagate its ``loss``.

    Example:
        >>> import torch.nn.functional as F
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")
        >>> g = torch.Generator().manual_seed(0)
        >>> out = maxup_step(loss_fn, (x, y), augment=GaussianNoise(0.1), m=4, generator=g, model=net)
        >>> out.loss.backward()
        >>> out.candidate_losses.shape, bool(out.gap >= 0)
        (torch.Size([4, 8]), True)
    """  # noqa: E501
    config = _legacy_config(config, legacy) or MaxUpConfig()
    config = config.replace(**options) if options else config
    if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1):
        raise ValueError(f"Expected `num_chunks` to be a positive integer or None, got {num_chunks!r}")
    m, name = config.m, _name(loss_fn)
    start = time.perf_counter()
    check_per_sample(batch)
    premade = _premade(batch, config)
    if premade is not None and m == 1:  # warm-up on loader-made copies: train on copy 0
        batch = slice_rows(premade.batch, 0, premade.num_samples)
    b = premade.num_samples if premade is not None else batch_size(batch)
    if m == 1:
        worst = batch if premade is not None else augment_rows(config.augment, batch, b, generator, 1)
        losses = check_losses(loss_fn(unwrap_shared(worst)), b, name)
        if config.check_finite:
            check_finite(losses.detach(), "losses")
        selected = torch.zeros(b, dtype=torch.long, device=losses.device)
        return MaxUpOutput(losses.mean(), losses, selected, losses.detach()[None], worst, 0.0)
    if model is None:
        model = _owner(loss_fn)
        if model is None and ("selection_mode" in options or config.selection_mode == "train"):
            warnings.warn(
                f"maxup_step got `selection_mode`={config.selection_mode!r} but no `model`, and found no module in"
                " `loss_fn`, so the mode cannot apply and the model is not restored (BatchNorm would absorb the"
                " candidates' statistics); pass model=the module loss_fn runs",
                UserWarning,
                stacklevel=2,
            )
    if premade is not None:
        candidates = premade.batch
    else:
        candidates = augment_rows(config.augment, expand_copies(batch, m), m * b, generator, m)
    candidate_losses = selection_losses(
        selection_fn or loss_fn, candidates, config, model=model, num_chunks=num_chunks, selection_seed=selection_seed
    )
    if config.check_finite:
        check_finite(candidate_losses, "candidate losses in the MaxUp selection pass")
    selected, worst_rows = select_copies(candidate_losses, b, config.selection_temperature, generator)
    worst = gather_rows(candidates, worst_rows)
    selection_seconds = time.perf_counter() - start
    losses = check_losses(loss_fn(unwrap_shared(worst)), b, name)
    return MaxUpOutput(
        losses.mean(), losses, selected, candidate_losses.view(m, b), worst, selection_seconds, candidates
    )


def check_per_sample(batch: Any) -> None:
    """Raise unless every tensor leaf of ``batch`` is per-sample (``B`` rows), a scalar, or wrapped in ``Shared``.

    MaxUp expands, augments and gathers every leaf with ``B`` rows. A tensor shared by all samples that does not
    have ``B`` rows would be passed on unchanged, and one that happens to have ``B`` rows would be treated as
    per-sample until the epoch's shorter last batch: both are refused here, naming
    :class:`~lightning_maxup.core.batch.Shared`.

    Example:
        >>> check_per_sample((torch.zeros(4, 2), torch.zeros(4)))
        >>> check_per_sample((torch.zeros(4, 2), torch.zeros(10)))
        Traceback (most recent call last):
        ...
        ValueError: The batch holds a tensor of shape [10] whose first dimension is not the batch size 4: MaxUp expands and gathers per-sample tensors, so wrap a tensor shared by all samples in lightning_maxup.Shared(...)
    """  # noqa: E501
    rows = batch.num_samples * batch.m if isinstance(batch, Candidates) else batch_size(batch)
    leaves = tensor_leaves(batch.batch if isinstance(batch, Candidates) else batch)
    for leaf in leaves:
        if leaf.dim() > 0 and leaf.shape[0] != rows:
            raise ValueError(
                f"The batch holds a tensor of shape {list(leaf.shape)} whose first dimension is not the batch size"
                f" {rows}: MaxUp expands and gathers per-sample tensors, so wrap a tensor shared by all samples in"
                " lightning_maxup.Shared(...)"
            )


def _premade(batch: Any, config: MaxUpConfig) -> Candidates | None:
    """``batch`` if it holds copies made already, checked against ``config``; else ``None``."""
    if not isinstance(batch, Candidates):
        return None
    check_candidates(batch, config.augment, config.m, warmup=config.m == 1)
    return batch


def check_candidates(batch: Candidates, augment: Any, m: int, *, warmup: bool = False) -> None:
    """Raise unless premade ``batch`` fits a step with ``augment`` and ``m`` copies (any count when ``warmup``).

    ``warmup=True`` also accepts one copy per sample: a loader that makes no extra views while MaxUp is off.

    Example:
        >>> check_candidates(Candidates(torch.zeros(6, 2), m=3), None, m=2)
        Traceback (most recent call last):
        ...
        ValueError: The batch holds Candidates with 3 copies per sample, but the step runs `m`=2; make the loader's copies and `m` agree (MultiView(..., m=2))
    """  # noqa: E501
    if augment is not None:
        raise ValueError(
            f"The batch holds Candidates made by the loader, but `augment` is {augment!r}: premade copies"
            " are scored as they are, so set `augment`=None (the loader's transform is the augmentation)"
        )
    if batch.m != m and not (warmup and (m == 1 or batch.m == 1)):
        raise ValueError(
            f"The batch holds Candidates with {batch.m} copies per sample, but the step runs `m`={m}; make"
            f" the loader's copies and `m` agree (MultiView(..., m={m}))"
        )
