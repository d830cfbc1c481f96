"""Training recipes for certified robustness, and a LightningModule that certifies in ``test_step``.

The three recipes of the MaxUp paper's certified-robustness experiment (Gong et al., 2021, Sec. 4.4):

* **Gaussian augmentation** (Cohen et al., 2019): :class:`~lightning_maxup.recipes.models.MaxUpClassifier` with
  ``augment=GaussianNoise(σ)`` and ``m=1`` -- :func:`gaussian_classifier`.
* **MaxUp + Gauss**: the same classifier with ``m > 1`` noisy copies per sample, minimising the worst one --
  :func:`maxup_gauss_classifier`; the paper searches ``m`` in :data:`MAXUP_GAUSS_M_GRID` and ``σ`` in
  :data:`SIGMA_GRID`.
* **SmoothAdv** (Salman et al., NeurIPS 2019): :class:`SmoothAdvClassifier`, PGD against the smoothed soft
  classifier with a number of noise samples per input.

:class:`SmoothedCertifier` wraps any trained classifier and certifies each test batch with
:class:`~lightning_maxup.certify.Smooth`, accumulating :class:`~lightning_maxup.certify.CertifiedAccuracy`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup._lightning import pl
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.certify.functional import (
    DEFAULT_ALPHA,
    DEFAULT_BATCH_SIZE,
    DEFAULT_N,
    DEFAULT_N0,
    check_alpha,
    check_count,
    check_sigma,
    smooth_adv_attack,
)
from lightning_maxup.certify.metric import TABLE_RADII, CertifiedAccuracy
from lightning_maxup.certify.smoothing import Smooth
from lightning_maxup.core import random as lr
from lightning_maxup.core._state import modes_restored
from lightning_maxup.core.random import mix_seed, resolve_seed
from lightning_maxup.recipes.models import MaxUpClassifier
from lightning_maxup.recipes.models.classifier import Classifier
from lightning_maxup.training.callback import MaxUp

__all__ = [
    "MAXUP_GAUSS_M_GRID",
    "RECIPES",
    "RECIPE_OPTIONS",
    "SIGMA_GRID",
    "Recipe",
    "SmoothAdvClassifier",
    "SmoothedCertifier",
    "build_recipe",
    "gaussian_classifier",
    "maxup_gauss_classifier",
]

_CHECKPOINT_KEY = "lightning_maxup_smoothadv"

#: σ values of Cohen et al.'s and the MaxUp paper's CIFAR-10 experiments.
SIGMA_GRID: tuple[float, ...] = (0.12, 0.25, 0.5, 1.0)
#: Numbers of copies the MaxUp paper searches for MaxUp + Gauss.
MAXUP_GAUSS_M_GRID: tuple[int, ...] = (5, 25, 50, 100, 150)

#: The names of the recipes :func:`build_recipe` builds.
Recipe = Literal["gaussian", "maxup_gauss", "smoothadv"]
#: The name of every recipe.
RECIPES: tuple[Recipe, ...] = ("gaussian", "maxup_gauss", "smoothadv")
#: The keyword arguments of :func:`build_recipe` that set the recipe (the others configure the optimizer).
RECIPE_OPTIONS: tuple[str, ...] = ("sigma", "m", "epsilon", "steps", "noise_samples", "warmup_epochs", "seed")


def gaussian_classifier(backbone: nn.Module, num_classes: int, sigma: float, **kwargs: Any) -> MaxUpClassifier:
    """Cohen et al.'s recipe: train on one Gaussian-noised copy per sample (``m = 1``).

    Args:
        backbone: Network mapping inputs to logits.
        num_classes: Number of classes.
        sigma: Noise standard deviation, the σ the model will be certified at.
        kwargs: Other :class:`~lightning_maxup.recipes.models.MaxUpClassifier` arguments (optimizer, lr, seed, ...).

    Example:
        >>> from lightning_maxup.recipes.models import SmallCNN
        >>> gaussian_classifier(SmallCNN(1, 10, width=4), 10, sigma=0.25).maxup_m
        1
    """
    return MaxUpClassifier(backbone, num_classes, m=1, augment=GaussianNoise(check_sigma(sigma)), **kwargs)


def maxup_gauss_classifier(
    backbone: nn.Module, num_classes: int, sigma: float, m: int = 5, **kwargs: Any
) -> MaxUpClassifier:
    """MaxUp + Gauss: minimise the worst loss over ``m`` Gaussian-noised copies per sample (Gong et al., 2021).

    Example:
        >>> from lightning_maxup.recipes.models import SmallCNN
        >>> maxup_gauss_classifier(SmallCNN(1, 10, width=4), 10, sigma=0.25, m=25).maxup_m
        25
    """
    return MaxUpClassifier(backbone, num_classes, m=m, augment=GaussianNoise(check_sigma(sigma)), **kwargs)


class SmoothAdvClassifier(Classifier):
    """SmoothAdv (Salman et al., NeurIPS 2019): train on PGD attacks against the smoothed soft classifier.

    Each step draws ``num_noise_samples`` Gaussian noise samples per input, runs ``steps`` of ℓ2 PGD of radius
    ``epsilon`` against the average softmax over those noisy copies (model in eval mode), and minimises the
    cross-entropy of every noisy copy of the adversarial input. ``epsilon`` ramps up linearly over the first
    ``warmup_epochs`` epochs, as in Salman et al.'s code. Validation and test log ``val/acc`` and ``test/acc``
    on clean inputs, like :class:`~lightning_maxup.recipes.models.MaxUpClassifier`.

    Args:
        backbone: Network mapping inputs to ``num_classes`` logits.
        num_classes: Number of classes.
        sigma: Noise standard deviation.
        epsilon: ℓ2 radius of the attack (0 trains on Gaussian noise only).
        steps: PGD steps per training step.
        num_noise_samples: Noise samples per input, shared by the attack and the loss.
        warmup_epochs: Epochs over which ``epsilon`` grows linearly from ``epsilon / warmup_epochs``.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adam"``.
        lr: Learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        milestones: Epochs at which the learning rate is multiplied by ``gamma``.
        gamma: Learning-rate decay factor.
        seed: Base seed of the noise stream (default: the global seed).

    Example:
        >>> from lightning_maxup.recipes.models import SmallCNN
        >>> model = SmoothAdvClassifier(SmallCNN(1, 10, width=4), 10, sigma=0.25, epsilon=0.5, steps=2)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        sigma: float = 0.25,
        epsilon: float = 0.5,
        steps: int = 1,
        num_noise_samples: int = 1,
        warmup_epochs: int = 0,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        seed: int | None = None,
    ) -> None:
        check_sigma(sigma)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise ValueError(f"Expected `epsilon` to be a non-negative number, got {epsilon!r}")
        check_count(steps, "steps")
        check_count(num_noise_samples, "num_noise_samples")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"Expected `warmup_epochs` to be a non-negative integer, got {warmup_epochs!r}")
        super().__init__(backbone, num_classes, optimizer=optimizer, lr=lr)
        self.save_hyperparameters(ignore=["backbone"])
        self._generator: torch.Generator | None = None
        self._seed: int | None = None
        self._draws = 0
        self._seeded_for: Any = None  # a weak reference to the Trainer whose first step broadcast rank 0's seed

    def current_epsilon(self) -> float:
        """The attack radius of the current epoch (linear warm-up over ``warmup_epochs``)."""
        hp: Any = self.hparams
        eps, warm = float(hp.epsilon), int(hp.warmup_epochs)
        if warm == 0 or self._trainer is None:
            return eps
        return eps * min(1.0, (self.trainer.current_epoch + 1) / warm)

    def _noise_generator(self) -> torch.Generator:
        hp: Any = self.hparams
        trainer = self._trainer
        seeded = self._seeded_for() if self._seeded_for is not None else None
        if trainer is not None and seeded is not trainer:  # the first step of a fit: every rank takes rank 0's seed
            seed = resolve_seed(self._seed if self._seed is not None else hp.seed)
            self._seed = int(trainer.strategy.broadcast(seed, src=0)) if trainer.world_size > 1 else seed
            self._seeded_for = weakref.ref(trainer)
        if self._seed is None:
            self._seed = resolve_seed(hp.seed)
        if self._generator is None or self._generator.device.type != self.device.type:
            self._generator = torch.Generator(device=self.device)
        rank = trainer.global_rank if trainer is not None else 0
        # Keyed by a counter of training steps (micro-batches, not optimizer steps), saved in the state_dict:
        # every micro-batch draws fresh noise under gradient accumulation, and a resumed run draws what the
        # uninterrupted run drew, whatever hooks a subclass overrides.
        self._generator.manual_seed(mix_seed(self._seed, rank, self._draws))
        self._draws += 1
        return self._generator

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the weak reference to the fit's Trainer (a copy takes rank 0's seed again)."""
        return {**super().__getstate__(), "_seeded_for": None}

    def get_extra_state(self) -> Tensor:
        """The noise stream's seed (if resolved) and position: ``[resolved, seed, draws]`` as int64."""
        return torch.tensor([int(self._seed is not None), self._seed or 0, self._draws], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (``None``: a checkpoint written before 0.3)."""
        if isinstance(state, Tensor):
            resolved, seed, draws = (int(v) for v in state.tolist())
            self._seed, self._draws = (seed if resolved else self._seed), draws

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the noise stream of a checkpoint written before 0.3."""
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            self._seed, self._draws = state["seed"], int(state["draws"])
            checkpoint.get("state_dict", {}).setdefault("_extra_state", None)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Attack the smoothed classifier, then minimise the cross-entropy of every noisy adversarial copy."""
        hp: Any = self.hparams
        x, y = batch[0], batch[1]
        m, b = int(hp.num_noise_samples), int(x.shape[0])
        noise = float(hp.sigma) * lr.normal(
            (m, *x.shape), generator=self._noise_generator(), device=x.device, dtype=x.dtype
        )
        eps = self.current_epsilon()
        if eps > 0:
            with modes_restored(self.backbone, "eval"), torch.enable_grad():
                x = smooth_adv_attack(self.backbone, x, y, noise, eps, int(hp.steps))
        logits = self((x[None] + noise).reshape(m * b, *x.shape[1:]))
        loss = F.cross_entropy(logits, y.repeat(m))
        if self._trainer is not None:  # called from a plain loop: nothing to log to
            self.log("train/loss", loss, prog_bar=True, batch_size=b)
            self.log("smoothadv/epsilon", eps, batch_size=b)
        return loss


def build_recipe(
    recipe: Recipe,
    backbone: nn.Module,
    num_classes: int,
    *,
    sigma: float,
    m: int = 5,
    epsilon: float = 0.5,
    steps: int = 1,
    noise_samples: int = 1,
    warmup_epochs: int = 0,
    seed: int | None = None,
    **optimizer_kwargs: Any,
) -> tuple[pl.LightningModule, list[pl.Callback]]:
    """Build one of :data:`RECIPES`: the module to train and the callbacks it needs.

    ``"gaussian"`` is :func:`gaussian_classifier`; ``"maxup_gauss"`` is :func:`maxup_gauss_classifier` with the
    :class:`~lightning_maxup.MaxUp` callback (warm-up over ``warmup_epochs``); ``"smoothadv"`` is
    :class:`SmoothAdvClassifier` (``epsilon`` ramped over ``warmup_epochs``). Arguments a recipe does not use are
    ignored, so one set of options serves every recipe of a comparison.

    Args:
        recipe: Which recipe.
        backbone: Network mapping inputs to ``num_classes`` logits.
        num_classes: Number of classes.
        sigma: Noise standard deviation.
        m: MaxUp copies per sample (``"maxup_gauss"``).
        epsilon: ℓ2 attack radius (``"smoothadv"``).
        steps: PGD steps (``"smoothadv"``).
        noise_samples: Noise samples per input (``"smoothadv"``).
        warmup_epochs: MaxUp warm-up, or the epochs over which SmoothAdv's ``epsilon`` ramps up.
        seed: Base seed of the noise stream.
        optimizer_kwargs: Optimizer arguments (``optimizer``, ``lr``, ``momentum``, ``weight_decay``,
            ``milestones``, ``gamma``).

    Returns:
        ``(module, callbacks)``.

    Example:
        >>> from lightning_maxup.recipes.models import SmallCNN
        >>> model, callbacks = build_recipe("maxup_gauss", SmallCNN(1, 10, width=4), 10, sigma=0.25, m=3, lr=1e-3)
        >>> model.maxup_m, [type(c).__name__ for c in callbacks]
        (3, ['MaxUp'])
    """
    if recipe == "gaussian":
        return gaussian_classifier(backbone, num_classes, sigma, seed=seed, **optimizer_kwargs), []
    if recipe == "maxup_gauss":
        model = maxup_gauss_classifier(backbone, num_classes, sigma, m=m, seed=seed, **optimizer_kwargs)
        return model, [MaxUp(warmup_epochs=warmup_epochs)]
    if recipe == "smoothadv":
        smooth_adv = SmoothAdvClassifier(
            backbone,
            num_classes,
            sigma=sigma,
            epsilon=epsilon,
            steps=steps,
            num_noise_samples=noise_samples,
            warmup_epochs=warmup_epochs,
            seed=seed,
            **optimizer_kwargs,
        )
        return smooth_adv, []
    raise ValueError(f"Expected `recipe` to be one of {RECIPES}, got {recipe!r}")


class SmoothedCertifier(pl.LightningModule):
    """Certify a trained classifier in ``test_step``: Cohen et al.'s CERTIFY on each batch, then certified accuracy.

    ``trainer.test(SmoothedCertifier(model, ...), dataloader)`` logs ``certified_acc@<r>`` for every radius; under
    DDP the :class:`~lightning_maxup.certify.CertifiedAccuracy` states are summed across processes. Batches
    ``(x, y)`` use a generator seeded from ``(seed, rank, batch index)``; batches ``(x, y, index)`` use keyed
    noise per dataset index, so every input gets the same noise however the data is split across processes.

    Args:
        model: The base classifier (any module returning logits).
        num_classes: Number of classes.
        sigma: Noise standard deviation.
        n0: Noisy samples that select the top class.
        n: Noisy samples that bound its probability.
        alpha: Failure probability of the certificate.
        batch_size: Rows per forward of the base classifier.
        radii: Radii at which certified accuracy is logged.
        seed: Seed of the certification noise.
        dtype: Reduced precision of the noisy forwards (``torch.bfloat16``), as in
            :class:`~lightning_maxup.certify.Smooth`; the certificate then holds for that classifier.
        memory_format: Memory format of the noisy copies (``torch.channels_last``).

    Example:
        >>> cert = SmoothedCertifier(nn.Linear(4, 3), num_classes=3, sigma=0.25, n0=10, n=100, radii=[0.0, 0.25])
        >>> cert.certified_acc.radii
        (0.0, 0.25)
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        n0: int = DEFAULT_N0,
        n: int = DEFAULT_N,
        alpha: float = DEFAULT_ALPHA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        radii: Sequence[float] = TABLE_RADII,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.smooth = Smooth(model, num_classes, sigma, dtype=dtype, memory_format=memory_format)
        self.n0 = check_count(n0, "n0")
        self.n = check_count(n, "n")
        self.alpha = check_alpha(alpha)
        self.certify_batch_size = check_count(batch_size, "batch_size")
        self.seed = int(seed)
        self.certified_acc = CertifiedAccuracy(radii)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the base classifier."""
        return self.model(x)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Certify the batch and update the certified accuracy."""
        x, y = batch[0], batch[1]
        keys = batch[2] if len(batch) > 2 else None
        generator = None
        if keys is None:
            generator = torch.Generator(device=x.device).manual_seed(mix_seed(self.seed, self.global_rank, batch_idx))
        prediction, radius = self.smooth.certify_batch(
            x, self.n0, self.n, self.alpha, self.certify_batch_size, generator=generator, keys=keys, seed=self.seed
        )
        self.certified_acc.update(prediction, radius, y)

    def on_test_epoch_end(self) -> None:
        """Log the certified accuracy at every radius (already reduced across processes)."""
        self.log_dict(self.certified_acc.as_dict(), sync_dist=True)
        self.certified_acc.reset()
