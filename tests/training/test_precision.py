"""Mixed precision, gradient accumulation and gradient clipping with MaxUp.

The selection pass runs inside ``training_step``, so it runs under the same autocast as the gradient forward;
the tests record the dtype of a layer's activations in both passes. Accumulation and clipping are checked
against a plain loop that calls :func:`lightning_maxup.core.functional.maxup_step` with the mixin's generator stream.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import mix_seed


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


class DtypeLit(MaxUpMixin, pl.LightningModule):
    """Records the dtype of the hidden layer's output in selection (no grad) and gradient forwards."""

    def __init__(self, **maxup: Any) -> None:
        super().__init__(augment=GaussianNoise(0.2), m=3, **maxup)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
        )
        self.dtypes: dict[str, set[torch.dtype]] = {"selection": set(), "gradient": set()}
        self.net[0].register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.dtypes["gradient" if torch.is_grad_enabled() else "selection"].add(output.dtype)

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_dtypes(precision: str, accelerator: str, **maxup: Any) -> DtypeLit:
    model = DtypeLit(**maxup)
    before = copy.deepcopy(model.state_dict())
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=2, logger=False,
        callbacks=[MaxUp(warmup_epochs=1)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "training changed nothing"
    return model


@pytest.mark.parametrize(
    "maxup",
    [pytest.param({}, id="full-res"), pytest.param({"selection_size": 4, "chunk_size": 8}, id="lowres-chunked")],
)
def test_bf16_mixed_cpu_selection_under_same_autocast(maxup: dict[str, Any]) -> None:
    model = _fit_dtypes("bf16-mixed", "cpu", **maxup)
    assert model.dtypes == {"selection": {torch.bfloat16}, "gradient": {torch.bfloat16}}, model.dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay in float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="precision='16-mixed' (float16 + GradScaler) needs CUDA")
def test_16_mixed_gpu_selection_under_same_autocast() -> None:
    model = _fit_dtypes("16-mixed", "gpu")
    assert model.dtypes == {"selection": {torch.float16}, "gradient": {torch.float16}}, model.dtypes


# ---------------------------------------------------------------------------------------------------------------------
# Accumulation and clipping against a plain loop
# ---------------------------------------------------------------------------------------------------------------------
SEED, M, LR, CLIP, ACCUMULATE = 3, 4, 0.5, 0.05, 2


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


class MlpLit(MaxUpMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__(augment=GaussianNoise(0.5), m=M, seed=SEED)
        self.net = _mlp()

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def _reference(accumulate: int, clip: float | None) -> nn.Module:
    """Accumulate ``loss / accumulate`` over batches, clip the gradient norm, step: Lightning's documented loop."""
    net = _mlp()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(net(b[0]), b[1], reduction="none")

    batches = list(DataLoader(_data(), batch_size=8))
    for i, batch in enumerate(batches):
        g = torch.Generator().manual_seed(mix_seed(SEED, 0, i))
        out = maxup_step(loss_fn, batch, augment=GaussianNoise(0.5), m=M, generator=g, model=net)
        (out.loss / accumulate).backward()
        if (i + 1) % accumulate == 0 or i + 1 == len(batches):
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return net


@pytest.mark.parametrize(
    ("accumulate", "clip"),
    [
        pytest.param(1, None, id="plain"),
        pytest.param(ACCUMULATE, None, id="accumulate"),
        pytest.param(1, CLIP, id="clip"),
        pytest.param(ACCUMULATE, CLIP, id="accumulate+clip"),
    ],
)
def test_accumulation_and_clipping_match_reference(accumulate: int, clip: float | None) -> None:
    model = MlpLit()
    pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(model)  # fmt: skip
    reference = _reference(accumulate, clip)
    errors = [(a - b).abs().max().item() for a, b in zip(model.net.parameters(), reference.parameters(), strict=True)]
    moved = max((a - b).abs().max().item() for a, b in zip(model.net.parameters(), _mlp().parameters(), strict=True))
    assert moved > 1e-3
    assert max(errors) < 1e-6, f"largest parameter error against the reference loop: {max(errors):.3g}"
