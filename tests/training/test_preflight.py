"""Errors before the warm-up ends: the pre-flight check, non-finite losses during warm-up, runs that never MaxUp."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import GaussianNoise


class Lit(MaxUpMixin, pl.LightningModule):
    """A flatten-then-linear model that can only take 8x8 inputs; records the optimizer steps it made."""

    def __init__(self, lr: float = 0.05, **options: Any) -> None:
        options.setdefault("m", 3)
        options.setdefault("augment", GaussianNoise(0.1))
        super().__init__(**options)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        self.lr = lr
        self.optimizer_steps = 0
        self.ms: list[int] = []

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.maxup_step(batch)
        self.ms.append(out.m)
        return out.loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.optimizer_steps += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)), 8)


def _fit(model: Lit, callback: MaxUp, **trainer: Any) -> pl.Trainer:
    trainer.setdefault("max_epochs", 3)
    t = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **trainer,
    )
    t.fit(model, _loader())
    return t


def test_selection_size_the_network_cannot_take_fails_before_any_optimizer_step() -> None:
    model = Lit()
    with pytest.raises(ValueError, match=r"`selection_size`=4; the model may not take inputs that small"):
        _fit(model, MaxUp(warmup_epochs=1, selection_size=4))
    assert model.optimizer_steps == 0, "the error must come at the first batch, not after the warm-up"


def test_selection_size_larger_than_the_images_is_an_error() -> None:
    model = Lit()
    with pytest.raises(ValueError, match=r"`selection_size`=32 is larger than the images \(8x8\)"):
        _fit(model, MaxUp(warmup_epochs=2, selection_size=32))
    assert model.optimizer_steps == 0


def test_augmentation_dropping_rows_fails_at_the_first_batch_during_warm_up() -> None:
    model = Lit(augment=lambda batch, generator=None: (batch[0][1:], batch[1][1:]))
    with pytest.raises(ValueError, match=r"`augment` must keep the number of rows: given 24 rows \(3 copies x 8"):
        _fit(model, MaxUp(warmup_epochs=2))
    assert model.optimizer_steps == 0


def test_wrong_per_sample_loss_shape_fails_at_the_first_batch() -> None:
    class Mean(Lit):
        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            return super().per_sample_loss(batch).mean()

    model = Mean()
    with pytest.raises(ValueError, match=r"`per_sample_loss` must return a 1-D tensor .* got shape \[\]"):
        _fit(model, MaxUp(warmup_epochs=2))
    assert model.optimizer_steps == 0


class _Diverging(Lit):
    """Its losses turn NaN in epoch 1, as a too-large learning rate makes them."""

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        losses = super().per_sample_loss(batch)
        if self.current_epoch >= 1 and torch.is_grad_enabled():
            losses = losses * torch.tensor([float("nan")] * 3 + [1.0] * (len(losses) - 3))
        return losses


def test_non_finite_losses_raise_during_warm_up() -> None:
    model = _Diverging()
    with pytest.raises(FloatingPointError, match=r"^3 of 8 training losses are NaN or infinite"):
        _fit(model, MaxUp(warmup_epochs=5), max_epochs=6)
    assert model.ms == [1] * 4, "the error must come at the first diverging step (epoch 1 of the warm-up)"


def test_fast_dev_run_skips_the_warm_up_and_runs_maxup_steps() -> None:
    model = Lit()
    _fit(model, MaxUp(warmup_epochs=5), fast_dev_run=2)
    assert model.ms == [3, 3]


@pytest.mark.parametrize(
    ("trainer", "match"),
    [
        pytest.param({"max_epochs": 2}, r"`max_epochs`=2 is not above .* `warmup_epochs`=2", id="max_epochs"),
        pytest.param({"max_epochs": 5, "max_steps": 6}, r"`max_steps`=6 is reached within the 2", id="max_steps"),
    ],
)
def test_a_fit_that_never_runs_maxup_warns_once(trainer: dict[str, Any], match: str) -> None:
    with pytest.warns(UserWarning, match=match) as record:
        _fit(Lit(), MaxUp(warmup_epochs=2), **trainer)
    assert sum("never runs a MaxUp step" in str(w.message) for w in record) == 1


def test_a_fit_that_reaches_maxup_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never runs a MaxUp step.*")
        _fit(Lit(), MaxUp(warmup_epochs=2), max_epochs=3, max_steps=9)
