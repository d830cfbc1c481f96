"""Randomized-smoothing certification as plain tensor functions: no Lightning here.

Randomized smoothing (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019) turns a base classifier ``f`` into ``g(x) = argmax_c P(f(x + ε) = c)``, ``ε ~ N(0, σ² I)``. If the
top class has probability at least ``pA > 1/2``, ``g`` is constant within the ℓ2 ball of radius ``σ Φ⁻¹(pA)``.
Certification estimates ``pA`` from Monte-Carlo counts and replaces it by a one-sided Clopper–Pearson lower
bound, so the radius is valid with probability at least ``1 - alpha``.

The Monte-Carlo sampling (:func:`sample_counts`) is batched across inputs: the ``B * num`` noisy copies of a
batch of ``B`` inputs are laid out input-major and forwarded ``batch_size`` rows at a time, whatever input they
belong to. :func:`smooth_adv_attack` is SmoothAdv's PGD attack on the smoothed soft classifier (Salman et al.,
"Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers", NeurIPS 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup._extras import require
from lightning_maxup.core import random as lr
from lightning_maxup.core.random import KeyedGenerator

__all__ = [
    "ABSTAIN",
    "DEFAULT_ALPHA",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_N",
    "DEFAULT_N0",
    "NoiseOptions",
    "certified_accuracy",
    "certified_counts",
    "certified_radius",
    "certify_from_counts",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "predict_from_counts",
    "sample_counts",
    "smooth_adv_attack",
]

#: The class returned when the smoothed classifier abstains.
ABSTAIN = -1
#: Cohen et al.'s default number of noise samples for choosing the class (CERTIFY's ``n0``).
DEFAULT_N0 = 100
#: Cohen et al.'s default number of noise samples for the estimate (CERTIFY's ``n``).
DEFAULT_N = 100_000
#: Cohen et al.'s default failure probability of a certificate.
DEFAULT_ALPHA = 0.001
#: Noisy copies per forward pass by default.
DEFAULT_BATCH_SIZE = 1000

# Stages of the noise stream, so the selection and estimation draws of one input differ.
_SELECTION, _ESTIMATION, _PREDICTION = 0, 1, 2


class NoiseOptions(TypedDict, total=False):
    """The keyword arguments that choose the noise of :func:`sample_counts`, forwarded as they are by its callers.

    Attributes:
        generator: Noise source (on the input's device) when ``keys`` is not given.
        keys: Optional integer key per input ``[B]`` for noise that depends neither on batching nor on the process.
        seed: Seed of the keyed noise.

    Example:
        >>> noise: NoiseOptions = {"keys": torch.arange(3), "seed": 5}
        >>> sorted(noise)
        ['keys', 'seed']
    """

    generator: torch.Generator | None
    keys: Tensor | None
    seed: int


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------
def check_sigma(sigma: Any) -> float:
    """Return ``sigma`` as a float, or raise if it is not a positive finite number."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"Expected `sigma` to be positive, got {sigma!r}")
    return float(sigma)


def check_count(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive integer, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")
    return int(value)


def check_alpha(alpha: Any) -> float:
    """Return ``alpha`` if it lies in the open interval (0, 1), else raise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"Expected `alpha` in (0, 1), got {alpha!r}")
    return float(alpha)


def check_num_classes(num_classes: Any) -> int:
    """Return ``num_classes`` if it is an integer of at least 2, else raise."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` to be an integer >= 2, got {num_classes!r}")
    return num_classes


# --------------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------------
def clopper_pearson_lower(k: Tensor | int, n: Tensor | int, alpha: float) -> Tensor:
    """One-sided ``(1 - alpha)`` Clopper–Pearson lower bound on a binomial proportion from ``k`` of ``n`` successes.

    It is the ``p`` at which ``P(X >= k | n, p) = alpha``: the ``alpha`` quantile of ``Beta(k, n - k + 1)``, and 0
    when ``k = 0``. Cohen et al. compute the same number as ``proportion_confint(k, n, 2 * alpha, "beta")[0]``.

    Returns:
        float64 tensor of ``k``'s shape (on ``k``'s device when ``k`` is a tensor).

    Example:
        >>> clopper_pearson_lower(torch.tensor([0, 5, 10]), 10, alpha=0.05)
        tensor([0.0000, 0.2224, 0.7411], dtype=torch.float64)
    """
    alpha = check_alpha(alpha)
    device = k.device if isinstance(k, Tensor) else torch.device("cpu")
    k_np = np.asarray(k.detach().cpu() if isinstance(k, Tensor) else k, dtype=np.float64)
    n_np = np.asarray(n.detach().cpu() if isinstance(n, Tensor) else n, dtype=np.float64)
    if np.any(k_np < 0) or np.any(k_np > n_np):
        raise ValueError(f"Expected 0 <= `k` <= `n`, got k={k_np.tolist()} and n={n_np.tolist()}")
    beta = require("scipy.stats", "clopper_pearson_lower", "certify").beta
    with np.errstate(invalid="ignore", divide="ignore"):
        p = beta.ppf(alpha, k_np, n_np - k_np + 1)
    p = np.where(k_np == 0, 0.0, p)
    return torch.as_tensor(np.asarray(p, dtype=np.float64), device=device)


def clopper_pearson_upper(k: Tensor | int, n: Tensor | int, alpha: float) -> Tensor:
    """One-sided ``(1 - alpha)`` Clopper–Pearson upper bound: ``P(X <= k | n, p) = alpha``, and 1 when ``k = n``.

    Example:
        >>> clopper_pearson_upper(torch.tensor([0, 10]), 10, alpha=0.05)
        tensor([0.2589, 1.0000], dtype=torch.float64)
    """
    if isinstance(k, Tensor):
        n_t = n if isinstance(n, Tensor) else torch.full_like(k, int(n))
        return 1.0 - clopper_pearson_lower(n_t - k, n_t, alpha)
    return 1.0 - clopper_pearson_lower(int(n) - int(k), n, alpha)


def certified_radius(p_lower: Tensor, sigma: float) -> Tensor:
    """The ℓ2 radius ``sigma * Φ⁻¹(p_lower)`` within which the smoothed classifier's prediction cannot change.

    Example:
        >>> certified_radius(torch.tensor([0.5, 0.8413447460685429], dtype=torch.float64), sigma=0.5)
        tensor([0.0000, 0.5000], dtype=torch.float64)
    """
    sigma = check_sigma(sigma)
    return sigma * torch.special.ndtri(p_lower.to(torch.float64))


def _top_two(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top class (lowest index on ties), its count and the runner-up's count, per row of ``counts`` ``[B, C]``."""
    top = counts.argmax(dim=1)
    n_top = counts.gather(1, top[:, None]).squeeze(1)
    rest = counts.scatter(1, top[:, None], -1)
    return top, n_top, rest.amax(dim=1)


def predict_from_counts(counts: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """Cohen's PREDICT: the top class, or :data:`ABSTAIN` unless a two-sided binomial test says it beats the runner-up.

    The test is SciPy's exact ``binomtest(n_top, n_top + n_second, p=0.5)``; the prediction is returned when its
    p-value is at most ``alpha``, so a wrong (non-abstaining) answer has probability at most ``alpha``.

    Args:
        counts: ``[B, num_classes]`` class counts of the base classifier under noise.
        alpha: Significance level.

    Returns:
        Long tensor ``[B]``: the predicted class or ``ABSTAIN`` (-1).

    Example:
        >>> predict_from_counts(torch.tensor([[90, 10, 0], [52, 48, 0]]), alpha=0.001)
        tensor([ 0, -1])
    """
    alpha = check_alpha(alpha)
    if counts.dim() != 2:
        raise ValueError(f"Expected `counts` of shape [B, num_classes], got shape {tuple(counts.shape)}")
    top, n_top, n_second = _top_two(counts)
    binomtest = require("scipy.stats", "predict_from_counts", "certify").binomtest
    # One exact test per input on two integers; the expensive part (the model) is already batched.
    p_values = [
        binomtest(int(a), int(a) + int(b), p=0.5).pvalue for a, b in zip(n_top.tolist(), n_second.tolist(), strict=True)
    ]
    significant = torch.tensor([p <= alpha for p in p_values], dtype=torch.bool, device=counts.device)
    return torch.where(significant, top, torch.full_like(top, ABSTAIN))


def certify_from_counts(
    counts_selection: Tensor, counts_estimation: Tensor, sigma: float, alpha: float = DEFAULT_ALPHA
) -> tuple[Tensor, Tensor, Tensor]:
    """Cohen's CERTIFY from its two sets of counts.

    The selection counts pick the top class ``cA``; the estimation counts (``n`` per row) bound its probability
    by the one-sided Clopper–Pearson lower bound ``pA_lower`` at level ``alpha``. The radius is
    ``sigma * Φ⁻¹(pA_lower)``; the certificate abstains (class -1, radius 0) when ``pA_lower < 0.5``.

    Returns:
        ``(prediction [B] long, radius [B] float64, p_lower [B] float64)``.

    Example:
        >>> sel = torch.tensor([[95, 5], [60, 40]])
        >>> est = torch.tensor([[990, 10], [520, 480]])
        >>> pred, radius, p_lower = certify_from_counts(sel, est, sigma=0.25, alpha=0.001)
        >>> pred.tolist(), [round(r, 3) for r in radius.tolist()]
        ([0, -1], [0.495, 0.0])
    """
    sigma = check_sigma(sigma)
    if counts_selection.shape != counts_estimation.shape or counts_selection.dim() != 2:
        raise ValueError(
            "Expected `counts_selection` and `counts_estimation` of the same shape [B, num_classes], got"
            f" {tuple(counts_selection.shape)} and {tuple(counts_estimation.shape)}"
        )
    c_a = counts_selection.argmax(dim=1)
    n_a = counts_estimation.gather(1, c_a[:, None]).squeeze(1)
    n = counts_estimation.sum(dim=1)
    p_lower = clopper_pearson_lower(n_a, n, alpha)
    certified = p_lower >= 0.5
    radius = torch.where(certified, certified_radius(p_lower, sigma), torch.zeros_like(p_lower))
    prediction = torch.where(certified, c_a, torch.full_like(c_a, ABSTAIN))
    return prediction, radius, p_lower


def certified_counts(prediction: Tensor, radius: Tensor, target: Tensor, radii: Sequence[float]) -> Tensor:
    """Number of inputs classified correctly with a certified radius of at least ``r``, for each ``r`` in ``radii``.

    Example:
        >>> certified_counts(torch.tensor([1, 2, -1]), torch.tensor([0.6, 0.3, 0.0]), torch.tensor([1, 0, 2]),
        ...                  radii=[0.0, 0.5, 1.0])
        tensor([1, 1, 0])
    """
    if not (prediction.shape == radius.shape == target.shape) or prediction.dim() != 1:
        raise ValueError(
            "Expected `prediction`, `radius` and `target` of the same shape [N], got"
            f" {tuple(prediction.shape)}, {tuple(radius.shape)} and {tuple(target.shape)}"
        )
    r = torch.as_tensor(list(radii), dtype=torch.float64, device=radius.device)
    hits = (prediction == target)[:, None] & (radius.to(torch.float64)[:, None] >= r[None, :])
    return hits.sum(dim=0)


def certified_accuracy(prediction: Tensor, radius: Tensor, target: Tensor, radii: Sequence[float]) -> Tensor:
    """Share of inputs classified correctly with a certified radius of at least ``r``, for each ``r`` in ``radii``.

    Abstentions (prediction -1) are wrong. With no inputs, every share is 0.

    Example:
        >>> certified_accuracy(torch.tensor([1, 2, -1]), torch.tensor([0.6, 0.3, 0.0]), torch.tensor([1, 0, 2]),
        ...                    radii=[0.0, 0.5, 1.0])
        tensor([0.3333, 0.3333, 0.0000])
    """
    counts = certified_counts(prediction, radius, target, radii)
    return counts.to(torch.float32) / max(len(target), 1)


# --------------------------------------------------------------------------------------------------------------------
# Monte-Carlo sampling
# --------------------------------------------------------------------------------------------------------------------
def _noise(
    shape: tuple[int, ...],
    x: Tensor,
    generator: torch.Generator | None,
    keys: Tensor | None,
    seed: int,
) -> Tensor:
    if keys is not None:
        return lr.normal(shape, generator=KeyedGenerator(seed, keys), device=x.device, dtype=x.dtype)
    return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_generator(generator: torch.Generator | None, x: Tensor) -> None:
    if generator is not None and torch.device(generator.device).type != x.device.type:
        raise ValueError(
            f"Expected `generator` on the input's device ({x.device.type}) so noise is drawn there, got a generator"
            f" on {torch.device(generator.device).type}"
        )


def sample_counts(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    num: int,
    sigma: float,
    num_classes: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    generator: torch.Generator | None = None,
    keys: Tensor | None = None,
    seed: int = 0,
    stage: int = _ESTIMATION,
) -> Tensor:
    """Count the base classifier's predictions on ``num`` noisy copies of each of the ``B`` inputs ``x``.

    The ``B * num`` copies are laid out input-major (row ``r`` is a copy of input ``r // num``) and forwarded
    ``batch_size`` rows at a time, so one forward mixes copies of several inputs when ``num < batch_size``.
    Noise is drawn on ``x``'s device, chunk by chunk, from ``generator``; with ``keys`` (one integer per input,
    e.g. its dataset index) each copy's noise depends only on ``(seed, key, stage, copy index)``, so results do not
    depend on batching or on how inputs are split across processes.

    Args:
        model: Base classifier mapping ``[rows, *input_shape]`` to logits ``[rows, num_classes]``; call it in
            eval mode.
        x: Inputs ``[B, *input_shape]``.
        num: Noisy copies per input.
        sigma: Noise standard deviation.
        num_classes: Number of classes.
        batch_size: Rows per forward.
        generator: Noise source (on ``x``'s device) when ``keys`` is not given.
        keys: Optional integer key per input ``[B]`` for batch-independent noise.
        seed: Seed of the keyed noise.
        stage: Separates the keyed streams of selection, estimation and prediction.

    Returns:
        Long tensor ``[B, num_classes]`` of counts; each row sums to ``num``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> counts = sample_counts(net, torch.zeros(3, 2), num=50, sigma=1.0, num_classes=2, batch_size=64,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> counts.shape, counts.sum(dim=1).tolist()
        (torch.Size([3, 2]), [50, 50, 50])
    """
    sigma = check_sigma(sigma)
    num = check_count(num, "num")
    batch_size = check_count(batch_size, "batch_size")
    num_classes = check_num_classes(num_classes)
    _check_generator(generator, x)
    b = int(x.shape[0])
    if keys is not None and (keys.shape != (b,) or keys.dtype not in (torch.int32, torch.int64)):
        raise ValueError(
            f"Expected `keys` to be an integer tensor of shape [{b}], got {keys.dtype} {tuple(keys.shape)}"
        )
    counts = torch.zeros(b * num_classes, dtype=torch.long, device=x.device)
    total = b * num
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=x.device)
        owner = rows // num
        shape = (len(rows), *x.shape[1:])
        row_keys = None
        if keys is not None:
            row_keys = torch.stack([keys.to(x.device)[owner], torch.full_like(rows, stage), rows % num], dim=1)
        noisy = x.index_select(0, owner) + sigma * _noise(shape, x, generator, row_keys, seed)
        try:
            logits = model(noisy)
        except RuntimeError as err:
            raise ValueError(
                f"The base classifier cannot take inputs of shape {tuple(x.shape[1:])} (`x` has shape"
                f" {tuple(x.shape)}): {err}"
            ) from err
        if not isinstance(logits, Tensor) or logits.shape != (len(rows), num_classes):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"Expected the base classifier to return logits of shape [{len(rows)}, `num_classes`={num_classes}],"
                f" got {got}"
            )
        pred = logits.argmax(dim=1)
        counts.index_add_(0, owner * num_classes + pred, torch.ones_like(pred))
    return counts.view(b, num_classes)


# --------------------------------------------------------------------------------------------------------------------
# SmoothAdv
# --------------------------------------------------------------------------------------------------------------------
def smooth_adv_attack(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    noise: Tensor,
    epsilon: float,
    steps: int,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
) -> Tensor:
    """ℓ2 PGD on the smoothed soft classifier (SmoothAdv, Salman et al. 2019), with fixed noise samples.

    Maximises ``-log((1/m) Σ_i softmax(f(x' + δ_i))_y)`` over ``‖x' - x‖₂ ≤ epsilon`` by ``steps`` normalised
    gradient steps, each projected back onto the ball (and into ``clamp``). The same ``m`` noise samples
    ``δ_i`` are used at every step, as in Salman et al.'s multi-noise training.

    Args:
        model: Base classifier; the caller sets its mode (Salman et al. attack in eval mode).
        x: Clean inputs ``[B, ...]``.
        y: Integer labels ``[B]``.
        noise: Noise samples ``[m, B, ...]`` (already scaled by σ).
        epsilon: ℓ2 radius of the attack; 0 returns ``x``.
        steps: PGD steps.
        step_size: Step length; default ``2 * epsilon / steps`` (Salman et al.).
        clamp: Valid input range, or ``None``.

    Returns:
        Adversarial inputs ``[B, ...]``, detached.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
        >>> adv = smooth_adv_attack(net, x, y, 0.1 * torch.randn(2, 5, 4), epsilon=0.5, steps=3)
        >>> bool(((adv - x).norm(dim=1) <= 0.5 + 1e-5).all())
        True
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"Expected `epsilon` to be a non-negative number, got {epsilon!r}")
    steps = check_count(steps, "steps")
    if noise.dim() != x.dim() + 1 or noise.shape[1:] != x.shape:
        raise ValueError(f"Expected `noise` of shape [m, {', '.join(map(str, x.shape))}], got {tuple(noise.shape)}")
    if epsilon == 0:
        return x.detach()
    step = 2.0 * epsilon / steps if step_size is None else float(step_size)
    m, b = int(noise.shape[0]), int(x.shape[0])
    x = x.detach()
    delta = torch.zeros_like(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        adv = x + delta
        logits = model((adv[None] + noise).reshape(m * b, *x.shape[1:]))
        probs = F.softmax(logits, dim=1).view(m, b, -1).mean(dim=0)
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-20)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta + step * grad / norm.view(view)
            delta = delta.flatten(1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(x)
            if clamp is not None:
                delta = (x + delta).clamp(*clamp) - x
    return (x + delta).detach()
