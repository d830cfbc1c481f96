"""A generic image classifier trained with MaxUp, configurable from LightningCLI YAML."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_maxup._lightning import pl
from lightning_maxup.core.config import MaxUpConfig, option_names
from lightning_maxup.training.mixin import MaxUpMixin

__all__ = ["Classifier", "MaxUpClassifier"]


class Classifier(pl.LightningModule):
    """Shared parts of the cross-entropy classifiers: backbone, clean evaluation and the optimizer.

    ``forward`` returns the backbone's logits; validation and test steps log ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc`` on clean inputs. :meth:`configure_optimizers` reads the ``optimizer``, ``lr``,
    ``momentum``, ``weight_decay``, ``milestones`` and ``gamma`` hyperparameters, so a subclass calls
    ``save_hyperparameters`` with those arguments. Further positional and keyword arguments go on along the MRO
    (to :class:`~lightning_maxup.MaxUpMixin` when it comes first).

    Args:
        backbone: Network mapping inputs to ``num_classes`` logits.
        num_classes: Number of classes.
        args: Passed on to the next ``__init__`` of the MRO.
        optimizer: ``"sgd"`` (Nesterov momentum, as the paper's recipes) or ``"adam"``.
        lr: Learning rate.
        kwargs: Passed on to the next ``__init__`` of the MRO.

    Example:
        >>> model = Classifier(nn.Linear(4, 3), num_classes=3, optimizer="adam", lr=1e-3)
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *args: Any,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"Expected `optimizer` to be 'sgd' or 'adam', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"Expected `lr` to be positive, got {lr!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits."""
        return self.backbone(x)

    def _evaluate(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val", batch_size=len(y))
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val", batch_size=len(y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log validation loss and accuracy."""
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Log test loss and accuracy."""
        self._evaluate(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        """SGD with Nesterov momentum (or Adam) and a multi-step learning-rate schedule."""
        hp: Any = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
                nesterov=hp.momentum > 0,
            )
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class MaxUpClassifier(MaxUpMixin, Classifier):
    """Cross-entropy classifier around any backbone, trained with MaxUp.

    ``per_sample_loss`` is ``F.cross_entropy(..., reduction="none")``, which takes integer labels and the soft
    targets of :class:`~lightning_maxup.augment.CutMix` and :class:`~lightning_maxup.augment.Mixup` alike.
    Validation and test steps log ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``.

    In LightningCLI YAML every MaxUp option sits under ``model.init_args.maxup`` (``m``, ``augment``,
    ``selection_size``, ...); from Python, pass ``maxup=MaxUpConfig(...)`` or its fields as keyword arguments.

    Args:
        backbone: Network mapping inputs to ``num_classes`` logits.
        num_classes: Number of classes.
        maxup: The MaxUp options (:class:`~lightning_maxup.MaxUpConfig`).
        optimizer: ``"sgd"`` (Nesterov momentum, as the paper's recipes) or ``"adam"``.
        lr: Learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        milestones: Epochs at which the learning rate is multiplied by ``gamma``.
        gamma: Learning-rate decay factor.
        **options: :class:`~lightning_maxup.MaxUpConfig` fields overriding ``maxup`` (``m=4, augment=...``).

    Example:
        >>> from lightning_maxup.recipes.models import SmallCNN
        >>> model = MaxUpClassifier(SmallCNN(1, 10, width=8), num_classes=10, maxup=MaxUpConfig(m=2))
        >>> model(torch.zeros(3, 1, 8, 8)).shape, model.maxup_config.m
        (torch.Size([3, 10]), 2)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        maxup: MaxUpConfig | None = None,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"Unknown MaxUpClassifier argument(s) {unknown}; MaxUp options are {option_names()}")
        super().__init__(backbone, num_classes, optimizer=optimizer, lr=lr, maxup=maxup, **options)
        self.save_hyperparameters(ignore=["backbone", "maxup", *options])

    def per_sample_loss(self, batch: Any) -> Tensor:
        """Per-sample cross-entropy on integer labels or soft targets."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y, reduction="none")
