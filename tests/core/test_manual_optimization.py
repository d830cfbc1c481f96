"""``functional.maxup_step`` inside a manual-optimisation ``training_step`` (``examples/manual_optimization.py``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import mix_seed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "manual_optimization.py"
spec = importlib.util.spec_from_file_location("manual_optimization_example", EXAMPLE)
assert spec is not None
assert spec.loader is not None
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

SEED, M, LR = 7, 4, 0.2


def _net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)), 8)


def _reference(clip: float | None) -> nn.Module:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(net(b[0]), b[1], reduction="none")

    for step, batch in enumerate(_loader()):
        g = torch.Generator().manual_seed(mix_seed(SEED, 0, step))
        out = maxup_step(loss_fn, batch, augment=GaussianNoise(0.5), m=M, generator=g, model=net)
        opt.zero_grad()
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return net


@pytest.mark.parametrize("clip", [pytest.param(None, id="no-clip"), pytest.param(0.05, id="clip")])
def test_manual_optimization_matches_reference_loop(clip: float | None) -> None:
    model = example.ManualMaxUp(_net(), GaussianNoise(0.5), m=M, lr=LR, clip=clip, seed=SEED)
    assert model.automatic_optimization is False
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=_loader())
    assert trainer.global_step == 3
    reference = _reference(clip)
    pairs = zip(model.backbone.parameters(), reference.parameters(), strict=True)
    errors = [(a - b).abs().max().item() for a, b in pairs]
    assert max(errors) < 1e-6, f"largest parameter error against the reference loop: {max(errors):.3g}"
    assert float(trainer.callback_metrics["train/worst_loss"]) >= float(trainer.callback_metrics["train/mean_loss"])


@pytest.mark.slow
def test_example_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-epochs", "1", "--m", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
