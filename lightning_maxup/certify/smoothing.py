"""The smoothed classifier of Cohen, Rosenfeld & Kolter (ICML 2019): PREDICT and CERTIFY.

A thin stateful wrapper around :mod:`lightning_maxup.certify.functional`: it holds the base classifier, the
number of classes and σ, runs the base classifier in eval mode without gradient, and validates arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from lightning_maxup._validation import precision
from lightning_maxup.certify.functional import (
    _ESTIMATION,
    _PREDICTION,
    _SELECTION,
    ABSTAIN,
    DEFAULT_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_N,
    DEFAULT_N0,
    NoiseOptions,
    certify_from_counts,
    check_alpha,
    check_count,
    check_num_classes,
    check_sigma,
    predict_from_counts,
    sample_counts,
)

__all__ = ["Smooth"]


@contextmanager
def _inference(model: nn.Module | Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Eval mode and no gradient for the block; the model's modes are restored afterwards."""
    if not isinstance(model, nn.Module):
        with torch.no_grad():
            yield
        return
    modes = [(mod, mod.training) for mod in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for mod, training in modes:
            mod.training = training


class _ReducedPrecision:
    """The base classifier run on ``memory_format`` inputs under ``torch.autocast(dtype)``; logits come back fp32.

    Only 4-D floating inputs (images) change memory format, as in the MaxUp selection pass.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor], Tensor],
        dtype: torch.dtype | None,
        memory_format: torch.memory_format | None,
    ) -> None:
        self.model = model
        self.dtype = None if dtype == torch.float32 else dtype
        self.memory_format = memory_format

    def __call__(self, x: Tensor) -> Tensor:
        if self.memory_format is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            logits = self.model(x)
        # Exact (bf16 and fp16 values are fp32 values): no argmax changes, and callers see fp32 logits as before.
        return logits.float()


class Smooth:
    """A smoothed classifier ``g(x) = argmax_c P(f(x + ε) = c)``, ``ε ~ N(0, σ² I)`` (Cohen et al., 2019).

    :meth:`predict` and :meth:`certify` take one input, as in Cohen et al.'s reference code;
    :meth:`predict_batch` and :meth:`certify_batch` take a batch and share every forward across its inputs.
    Noise is drawn on the input's device from the ``generator`` you pass (seed it for reproducible results),
    or, with ``keys``, from per-input keyed streams that do not depend on batching or on the process.

    ``dtype`` and ``memory_format`` make the noisy forwards cheaper, with the names and meaning of the MaxUp
    selection pass's ``selection_dtype`` and ``selection_memory_format``. The noise, the counts and the statistics
    stay in the input's precision, so the guarantee keeps its form, but it is a guarantee about **the classifier that
    was run**: the smoothed version of the reduced-precision base classifier, whose predictions may differ from the
    float32 network's on some noisy copies. Certify and deploy with the same options. See ``docs/certify.md`` for
    how far bf16 and float32 certificates differ on the same noise.

    Args:
        base_classifier: Maps ``[N, *input_shape]`` to logits ``[N, num_classes]``.
        num_classes: Number of classes.
        sigma: Noise standard deviation σ.
        input_shape: Shape of one input; given, inputs are checked against it before any forward.
        dtype: Run the noisy forwards under ``torch.autocast`` on the input's device in this dtype
            (``torch.bfloat16`` or ``torch.float16``); ``None`` or ``torch.float32`` keeps full precision.
        memory_format: Convert the noisy images (4-D inputs) to this memory format before the forward, e.g.
            ``torch.channels_last``; ``None`` leaves them as they are.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> smooth = Smooth(net, num_classes=3, sigma=0.25, input_shape=(1, 2, 2))
        >>> g = torch.Generator().manual_seed(0)
        >>> label, radius = smooth.certify(torch.zeros(1, 2, 2), n0=10, n=100, alpha=0.01, batch_size=64, generator=g)
        >>> label in (-1, 0, 1, 2) and radius >= 0
        True
        >>> fast = Smooth(net, num_classes=3, sigma=0.25, dtype=torch.bfloat16, memory_format=torch.channels_last)
        >>> fast
        Smooth(num_classes=3, sigma=0.25, input_shape=None, dtype=torch.bfloat16, memory_format=torch.channels_last)
    """

    ABSTAIN = ABSTAIN

    def __init__(
        self,
        base_classifier: nn.Module | Callable[[Tensor], Tensor],
        num_classes: int,
        sigma: float,
        input_shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        if not callable(base_classifier):
            raise TypeError(f"Expected `base_classifier` to be callable, got {type(base_classifier).__name__}")
        self.base_classifier = base_classifier
        self.num_classes = check_num_classes(num_classes)
        self.sigma = check_sigma(sigma)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.dtype, self.memory_format = precision(dtype, memory_format)

    def __repr__(self) -> str:
        options = ""
        if self.dtype is not None or self.memory_format is not None:
            options = f", dtype={self.dtype}, memory_format={self.memory_format}"
        return f"Smooth(num_classes={self.num_classes}, sigma={self.sigma}, input_shape={self.input_shape}{options})"

    def _forward(self) -> nn.Module | Callable[[Tensor], Tensor]:
        """The base classifier as the noisy forwards run it: itself at full precision, else wrapped."""
        if self.dtype in (None, torch.float32) and self.memory_format is None:
            return self.base_classifier
        return _ReducedPrecision(self.base_classifier, self.dtype, self.memory_format)

    # ---------------------------------------------------------------------------------------------------------------
    def _check_batch(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"Expected `x` to be a batch of inputs [B, ...], got {type(x).__name__}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"Expected `x` of shape [B, {', '.join(map(str, self.input_shape))}] to match the model's input"
                f" shape {self.input_shape}, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"Expected `x` to be a floating-point tensor, got dtype {x.dtype}")

    def _single(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"Expected `x` to be a tensor, got {type(x).__name__}")
        if self.input_shape is not None and tuple(x.shape) != self.input_shape:
            raise ValueError(
                f"Expected `x` of the model's input shape {self.input_shape} (one input; use the *_batch methods"
                f" for batches), got {tuple(x.shape)}"
            )
        return x[None]

    def sample_counts(
        self,
        x: Tensor,
        num: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        stage: int = _ESTIMATION,
        **noise: Unpack[NoiseOptions],
    ) -> Tensor:
        """Class counts ``[B, num_classes]`` of the base classifier on ``num`` noisy copies of each input.

        ``noise`` (``generator``, or ``keys`` and ``seed``) and ``stage`` are those of :func:`sample_counts`.
        """
        self._check_batch(x)
        with _inference(self.base_classifier):
            return sample_counts(
                self._forward(), x, num, self.sigma, self.num_classes, batch_size, stage=stage, **noise
            )

    # ---------------------------------------------------------------------------------------------------------------
    def predict_batch(
        self,
        x: Tensor,
        n: int = DEFAULT_N,
        alpha: float = DEFAULT_ALPHA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **noise: Unpack[NoiseOptions],
    ) -> Tensor:
        """Cohen's PREDICT for each input of a batch: the top class, or -1 where the binomial test is not significant.

        Args:
            x: Inputs ``[B, *input_shape]``.
            n: Noisy copies per input.
            alpha: Level of the two-sided binomial test of the top two counts.
            batch_size: Rows per forward of the base classifier.
            noise: ``generator`` (a noise source on ``x``'s device), or ``keys`` (per-input integer keys for
                batch-independent keyed noise) and their ``seed``; see :func:`sample_counts`.

        Returns:
            Long tensor ``[B]``.

        Example:
            >>> smooth = Smooth(nn.Linear(2, 2), num_classes=2, sigma=0.1)
            >>> smooth.predict_batch(torch.randn(4, 2), n=200, alpha=0.01, batch_size=256).shape
            torch.Size([4])
        """
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size, stage=_PREDICTION, **noise)
        return predict_from_counts(counts, alpha)

    def certify_batch(
        self,
        x: Tensor,
        n0: int = DEFAULT_N0,
        n: int = DEFAULT_N,
        alpha: float = DEFAULT_ALPHA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **noise: Unpack[NoiseOptions],
    ) -> tuple[Tensor, Tensor]:
        """Cohen's CERTIFY for each input of a batch.

        ``n0`` noisy copies pick the top class ``cA``; ``n`` more bound ``pA`` from below by the one-sided
        Clopper–Pearson bound at level ``alpha``; the radius is ``σ Φ⁻¹(pA_lower)``, and the input abstains
        (class -1, radius 0) when ``pA_lower < 0.5``. ``noise`` is that of :meth:`predict_batch`.

        Returns:
            ``(prediction [B] long, radius [B] float64)``.

        Example:
            >>> smooth = Smooth(nn.Linear(2, 2), num_classes=2, sigma=0.1)
            >>> pred, radius = smooth.certify_batch(torch.randn(4, 2), n0=10, n=200, alpha=0.01, batch_size=256)
            >>> pred.shape, radius.dtype
            (torch.Size([4]), torch.float64)
        """
        n0 = check_count(n0, "n0")
        n = check_count(n, "n")
        alpha = check_alpha(alpha)
        selection = self.sample_counts(x, n0, batch_size, stage=_SELECTION, **noise)
        estimation = self.sample_counts(x, n, batch_size, stage=_ESTIMATION, **noise)
        prediction, radius, _ = certify_from_counts(selection, estimation, self.sigma, alpha)
        return prediction, radius

    def predict(
        self,
        x: Tensor,
        n: int = DEFAULT_N,
        alpha: float = DEFAULT_ALPHA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        """Cohen's PREDICT for one input ``x`` (no batch dimension): a class, or -1 to abstain.

        Example:
            >>> smooth = Smooth(nn.Linear(2, 2), num_classes=2, sigma=0.1)
            >>> smooth.predict(torch.zeros(2), n=100, alpha=0.01, batch_size=50) in (-1, 0, 1)
            True
        """
        return int(self.predict_batch(self._single(x), n, alpha, batch_size, generator=generator)[0])

    def certify(
        self,
        x: Tensor,
        n0: int = DEFAULT_N0,
        n: int = DEFAULT_N,
        alpha: float = DEFAULT_ALPHA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """Cohen's CERTIFY for one input ``x`` (no batch dimension): ``(class or -1, radius)``.

        Example:
            >>> smooth = Smooth(nn.Linear(2, 2), num_classes=2, sigma=0.1)
            >>> label, radius = smooth.certify(torch.zeros(2), n0=10, n=100, alpha=0.01, batch_size=50)
            >>> radius >= 0.0
            True
        """
        prediction, radius = self.certify_batch(self._single(x), n0, n, alpha, batch_size, generator=generator)
        return int(prediction[0]), float(radius[0])
