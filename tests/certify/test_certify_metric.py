"""CertifiedAccuracy: agrees with the functional form, accumulates, and reduces correctly under DDP."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup.certify import CertifiedAccuracy, Smooth, SmoothedCertifier, certified_accuracy


def test_metric_accumulates_batches_like_the_functional_form() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(-1, 4, (90,), generator=g)
    target = torch.randint(0, 4, (90,), generator=g)
    radius = torch.rand(90, generator=g, dtype=torch.float64) * (pred >= 0)
    radii = [0.0, 0.25, 0.5, 0.75]
    metric = CertifiedAccuracy(radii)
    for s in range(0, 90, 25):
        metric.update(pred[s : s + 25], radius[s : s + 25], target[s : s + 25])
    got, expected = metric.compute(), certified_accuracy(pred, radius, target, radii)
    assert torch.allclose(got, expected), f"largest error {float((got - expected).abs().max())}"
    assert list(metric.as_dict(got)) == [
        "certified_acc@0",
        "certified_acc@0.25",
        "certified_acc@0.5",
        "certified_acc@0.75",
    ]


@pytest.mark.parametrize(
    "radii",
    [pytest.param([], id="empty"), pytest.param([-0.25], id="negative"), pytest.param(["a"], id="not-a-number")],
)
def test_metric_rejects_bad_radii(radii: list) -> None:
    with pytest.raises(ValueError, match="Expected `radii` to be a non-empty sequence of non-negative numbers, got"):
        CertifiedAccuracy(radii)


# ----------------------------------------------------------------------------------------------------------------------
# DDP: top-level, picklable pieces
# ----------------------------------------------------------------------------------------------------------------------
RADII = (0.0, 0.1, 0.25, 0.5)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    y = _net()(x).argmax(1).detach()
    y[::5] = (y[::5] + 1) % 3  # some wrong labels
    return DataLoader(TensorDataset(x, y, torch.arange(32)), batch_size=5)


def _certify(devices: int, strategy: str) -> dict[str, float]:
    model = SmoothedCertifier(_net(), num_classes=3, sigma=0.25, n0=10, n=200, alpha=0.01, batch_size=64, radii=RADII)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (result,) = trainer.test(model, dataloaders=_loader(), verbose=False)
    return {k: float(v) for k, v in result.items()}


def _reference() -> list[float]:
    """Plain loop: one input at a time with the same keyed noise."""
    loader = _loader()
    smooth = Smooth(_net(), 3, 0.25)
    preds, radii, targets = [], [], []
    for x, y, idx in loader.dataset:
        p, r = smooth.certify_batch(x[None], 10, 200, 0.01, 64, keys=idx[None], seed=0)
        preds.append(p), radii.append(r), targets.append(y[None])
    return certified_accuracy(torch.cat(preds), torch.cat(radii), torch.cat(targets), RADII).tolist()


def test_certifier_in_test_step_matches_a_loop() -> None:
    single = _certify(1, "auto")
    assert [single[f"certified_acc@{r:g}"] for r in RADII] == pytest.approx(_reference(), abs=1e-6)
    assert single["certified_acc@0"] > 0.3


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
def test_certified_accuracy_under_ddp_equals_one_process() -> None:
    torch.multiprocessing.set_sharing_strategy("file_system")
    single = _certify(1, "auto")
    ddp = _certify(2, "ddp_spawn")
    assert ddp.keys() == single.keys()
    for k in single:
        assert ddp[k] == pytest.approx(single[k], abs=1e-6), f"{k}: ddp {ddp[k]} vs one process {single[k]}"
