"""The regimes harness: one plain-PyTorch MaxUp training run on the digits per regime (issue 16's study).

A :class:`Regime` names an augmentation, ``m``, a selection view or rule and an optimiser; :func:`train_regime`
trains a :class:`~lightning_maxup.recipes.models.SmallCNN` in it with a plain loop around
:func:`~lightning_maxup.core.functional.maxup_step`, seeded so that ``MaxUp - ordinary`` at one seed is a paired
difference (:mod:`lightning_maxup.evaluation.paired`). The demo (``lightning-maxup demo``) and
``benchmarks/regimes.py`` both train through it.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.augment import Compose, Cutout, GaussianNoise, RandomCrop
from lightning_maxup.core.config import MaxUpConfig
from lightning_maxup.core.functional import MaxUpOutput, maxup_step
from lightning_maxup.evaluation.fidelity import view_fidelity
from lightning_maxup.evaluation.worst_of_k import worst_of_k_accuracy
from lightning_maxup.recipes.models import SmallCNN

__all__ = [
    "AUGMENTS",
    "NOISE_SIGMA",
    "OPTIMIZERS",
    "Recipe",
    "Regime",
    "Trained",
    "make_augment",
    "quiet_lightning",
    "set_threads",
    "stratified_subset",
    "train_regime",
    "worst_of_k",
]


# ---------------------------------------------------------------------------------------------------------------
# Regimes: one plain-PyTorch training run per (augmentation, m, selection view, selection rule, optimiser)
# ---------------------------------------------------------------------------------------------------------------
AugmentName = Literal["crop", "crop+cutout2", "crop+cutout4", "noise"]
OptimizerName = Literal["sgd", "adam"]
#: The augmentations of the regimes study (see :func:`make_augment`).
AUGMENTS: tuple[AugmentName, ...] = ("crop", "crop+cutout2", "crop+cutout4", "noise")
#: The optimisers of the regimes study (see :class:`Regime`).
OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "adam")
#: Standard deviation of the "noise" augmentation, on pixels in [0, 1].
NOISE_SIGMA = 0.3


def make_augment(name: AugmentName) -> Compose:
    """The named augmentation on 8x8 digits: RandomCrop (1 px padding), plus Cutout of 2 or 4 px, or noise.

    Example:
        >>> make_augment("crop+cutout2")(torch.zeros(3, 1, 8, 8), generator=torch.Generator()).shape
        torch.Size([3, 1, 8, 8])
    """
    steps: list[Any] = [RandomCrop(8, padding=1)]
    if name.startswith("crop+cutout"):
        steps.append(Cutout(size=int(name.removeprefix("crop+cutout"))))
    elif name == "noise":
        steps = [GaussianNoise(NOISE_SIGMA)]
    elif name != "crop":
        raise ValueError(f"Expected `augment` to be one of {list(AUGMENTS)}, got {name!r}")
    return Compose(steps)


@dataclass(frozen=True)
class Regime:
    """One cell of the regimes study: what is trained, and how MaxUp picks the trained copy.

    Args:
        augment: The augmentation (see :func:`make_augment`).
        m: Copies per sample; 1 is ordinary augmentation.
        optimizer: ``"sgd"`` (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4, cosine annealing: the setup of
            issue 16) or ``"adam"`` (lr 3e-3, /10 after 75 % of the epochs: the demo's).
        selection_size: Select on a ``selection_size`` px view (4: half resolution of the 8 px digits).
        temperature: ``MaxUpConfig.selection_temperature``; ``None`` is MaxUp's arg-max.

    Example:
        >>> Regime("crop+cutout4", m=4, optimizer="sgd", selection_size=4).label
        'crop+cutout4, SGD, m=4, half view'
        >>> Regime("crop", m=4, temperature=0.1).baseline.label
        'crop, SGD, m=1'
    """

    augment: AugmentName = "crop"
    m: int = 4
    optimizer: OptimizerName = "sgd"
    selection_size: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        make_augment(self.augment)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected `optimizer` to be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.m < 1:
            raise ValueError(f"Expected `m` to be a positive integer, got {self.m}")
        if self.m == 1 and (self.selection_size is not None or self.temperature is not None):
            raise ValueError("`m`=1 trains on the one copy: it takes no `selection_size` or `temperature`")

    @property
    def baseline(self) -> Regime:
        """The same augmentation and optimiser with ``m = 1`` (ordinary augmentation)."""
        return Regime(self.augment, 1, self.optimizer)

    @property
    def label(self) -> str:
        """Short description, e.g. ``'crop, SGD, m=4, half view, τ=0.1'``."""
        parts = [self.augment, self.optimizer.upper() if self.optimizer == "sgd" else "Adam", f"m={self.m}"]
        if self.selection_size is not None:
            parts.append("half view" if self.selection_size == 4 else f"{self.selection_size} px view")
        if self.temperature is not None:
            parts.append(f"τ={self.temperature:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Recipe:
    """How every regime is trained: data, network and schedule (shared by the study and the demo)."""

    per_class: int = 20
    width: int = 8
    epochs: int = 40
    warmup: int = 5
    batch_size: int = 64


@dataclass
class Trained:
    """A trained network and what its selection did.

    Attributes:
        model: The network, in eval mode.
        view_agreement: With a ``selection_size`` view, the share of samples whose copy picked on the view is
            also the worst at full resolution (:func:`~lightning_maxup.evaluation.fidelity.view_fidelity`, on the first
            batch of every epoch after the warm-up); ``None`` otherwise.
    """

    model: nn.Module
    view_agreement: float | None


def _optimizer(regime: Regime, model: nn.Module, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    if regime.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[_decay_epoch(epochs)])


def _view_agreement(loss_fn: Callable[[Any], Tensor], out: MaxUpOutput, model: nn.Module) -> float:
    # Not `full_input_losses`: it restores the parameters in place, which would break the pending backward.
    # An eval-mode forward without gradient changes nothing, as in the selection pass.
    model.eval()
    with torch.no_grad():
        full = loss_fn(out.candidates).view(out.m, -1)
    model.train()
    return float(view_fidelity(out.candidate_losses, full).agreement)


def train_regime(regime: Regime, seed: int, x: Tensor, y: Tensor, recipe: Recipe = Recipe()) -> Trained:
    """Train a SmallCNN on ``(x, y)`` in ``regime`` with a plain loop around :func:`maxup_step`.

    The same seed gives the same initial weights, the same batch order and, for ``m = 1`` and the warm-up
    epochs, the same augmentation draws, so ``MaxUp - ordinary`` at one seed is a paired difference.
    ``recipe.warmup`` epochs of ordinary augmentation come first when ``m > 1`` (as in the paper).
    """
    torch.manual_seed(seed)
    model = SmallCNN(1, 10, width=recipe.width)
    opt, schedule = _optimizer(regime, model, recipe.epochs)
    order, draws = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 10_000)
    config = MaxUpConfig(
        m=regime.m, augment=make_augment(regime.augment), selection_size=regime.selection_size,
        selection_temperature=regime.temperature,
    )  # fmt: skip
    warm = config.replace(m=1, selection_size=None, selection_temperature=None)

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    agreement: list[float] = []
    for epoch in range(recipe.epochs):
        model.train()
        step_config = config if epoch >= recipe.warmup else warm
        for i, rows in enumerate(torch.randperm(len(y), generator=order).split(recipe.batch_size)):
            out = maxup_step(loss_fn, (x[rows], y[rows]), step_config, generator=draws, model=model)
            if i == 0 and step_config.selection_size is not None:
                agreement.append(_view_agreement(loss_fn, out, model))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        schedule.step()
    model.eval()
    return Trained(model, statistics.mean(agreement) if agreement else None)


def worst_of_k(model: nn.Module, x: Tensor, y: Tensor, augment: Any, k: int, seed: int = 1234) -> float:
    """Share of samples whose ``k`` augmented copies are all classified correctly, in eval mode.

    :func:`~lightning_maxup.evaluation.worst_of_k.worst_of_k_accuracy` with a generator seeded by ``seed``, so
    that every model sees the same ``k`` copies of each sample.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)
        >>> 0.0 <= worst_of_k(net, x, y, make_augment("crop"), k=4) <= 1
        True
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    return float(worst_of_k_accuracy(model, x, y, augment, k, generator=g))


def stratified_subset(y: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """Indices of the first ``per_class`` samples of each class in a seeded shuffle.

    Example:
        >>> y = torch.tensor([0, 1, 0, 1, 0, 2])
        >>> sorted(y[stratified_subset(y, per_class=2)].tolist())
        [0, 0, 1, 1, 2]
    """
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    picked = [order[y[order] == c][:per_class] for c in torch.unique(y)]
    return torch.cat(picked).sort().values


def _decay_epoch(epochs: int) -> int:
    # The final accuracy of a constant learning rate swings by several points from one epoch to the next here.
    return max(1, int(0.75 * epochs))


# ---------------------------------------------------------------------------------------------------------------
# Threads and quiet Lightning
# ---------------------------------------------------------------------------------------------------------------
def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op and inter-op torch threads in this process; returns ``torch.get_num_threads()``.

    Call it before the first tensor operation: OpenMP sizes its pool at the first parallel region, so no
    ``OMP_NUM_THREADS`` is needed before ``import torch``.

    Example:
        >>> set_threads(1)
        1
    """
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        # The inter-op pool can be sized only once per process, before its first use (a second demo in one process).
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the Trainer's per-run banners and the warnings that do not apply to in-memory 8x8 digits.

    Example:
        >>> with quiet_lightning():
        ...     pass
    """
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        # The data is a tensor in memory: DataLoader workers would only add start-up time to every run.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6 flattens step outputs with torch's deprecated LeafSpec; nothing a user of it can change.
        warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*", category=FutureWarning)
        # Every run trains a fixed number of epochs and is tested once at the end: no validation loop.
        warnings.filterwarnings("ignore", ".*`validation_step` but have no `val_dataloader`.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)  # "GPU available: False ..." twelve times says nothing
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
