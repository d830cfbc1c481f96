"""One definition of a copy: evaluation and diagnostics take the copies the training pipeline makes in the loader.

Each test compares with a loop over the per-image transform (``reference_views``: seed the three global
generators from ``(seed, epoch, index, copy)`` and call the transform): ``WorstOfKAccuracy`` on a
``MultiView(val_set, transform, k, evaluation=True)`` loader counts exactly the samples whose ``k`` looped copies
are all classified correctly, and replays; ``WorstOfKValidation`` logs that value in a fit; ``SelectionFidelity``
and ``SelectionMonitor`` look at the very copies the loader made for the step they check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_maxup.evaluation.fidelity as fidelity_module
from lightning_maxup import MaxUp, MaxUpMixin, SelectionMonitor
from lightning_maxup.core.batch import Candidates
from lightning_maxup.data.multiview import MultiView
from lightning_maxup.evaluation.fidelity import SelectionFidelity
from lightning_maxup.evaluation.worst_of_k import WorstOfKAccuracy, WorstOfKValidation, worst_of_k_correct_candidates
from tests.data.test_multiview import Indexed, float_pipeline, pipeline, reference_views, trainer

K = 4
FEW_WORKERS = "ignore:.*does not have many workers.*"


class Net(nn.Module):
    """Any image size (a selection view downsamples): pool to 2x2, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.float())


def looped_correct(net: nn.Module, ds: MultiView, k: int) -> dict[int, bool]:
    """Per sample: all ``k`` copies of the looped per-image transform classified correctly."""
    data = Indexed()
    out = {}
    with torch.no_grad():
        for i in range(len(data)):
            x, y, _ = data[i]
            views = reference_views(ds, x, i, epoch=0, views=k)
            out[i] = bool((net(views).argmax(-1) == y).all())
    return out


@pytest.mark.parametrize("workers", [pytest.param(0, id="0-workers"), pytest.param(2, id="2-workers")])
def test_worst_of_k_on_loader_copies_matches_a_loop_over_the_transform_and_replays(workers: int) -> None:
    ds = MultiView(Indexed(), pipeline(8), K, seed=3, evaluation=True)
    net = Net()
    reference = looped_correct(net, ds, K)
    assert 0 < sum(reference.values()) < len(reference), "the reference must be able to tell right from wrong"
    metric = WorstOfKAccuracy(None, k=K)
    per_sample: dict[int, bool] = {}
    for batch in DataLoader(ds, batch_size=5, num_workers=workers):
        assert isinstance(batch, Candidates)
        metric.update(net, batch)
        ok = worst_of_k_correct_candidates(net, batch)
        per_sample.update(zip(batch.batch[2][: batch.num_samples].tolist(), ok.tolist(), strict=True))
    assert per_sample == reference
    expected = sum(reference.values()) / len(reference)
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-7)
    metric.reset()  # an evaluation replays: another batch size, another order, the same copies
    for batch in DataLoader(ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(1)):
        metric.update(net, batch)
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-7)


def test_worst_of_k_refuses_mismatched_or_plain_batches() -> None:
    ds = MultiView(Indexed(), float_pipeline, 3, seed=0, evaluation=True)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    with pytest.raises(ValueError, match=r"Candidates with 3 copies per sample, but the metric's `k` is 4"):
        WorstOfKAccuracy(None, k=4).update(Net(), batch)
    with pytest.raises(ValueError, match=r"got a plain batch but `augment` is None"):
        WorstOfKAccuracy(None, k=3).update(Net(), torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected no `target` with Candidates"):
        WorstOfKAccuracy(None, k=3).update(Net(), batch, torch.zeros(4, dtype=torch.long))


class Lit(MaxUpMixin, pl.LightningModule):
    """A user's own MaxUpMixin module on loader-made copies; validation batches of a MultiView loader are left to
    WorstOfKValidation."""

    def __init__(self, **maxup: Any) -> None:
        super().__init__(m=K, augment=None, seed=0, **maxup)
        self.net = Net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, Candidates):
            x, y, _ = batch
            self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.slow
@pytest.mark.filterwarnings(FEW_WORKERS)
def test_worst_of_k_validation_logs_the_looped_value_of_the_trained_model() -> None:
    train = MultiView(Indexed(), float_pipeline, K, seed=1)
    val = MultiView(Indexed(), float_pipeline, K, seed=2, evaluation=True)
    model = Lit()
    t = trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1), WorstOfKValidation(None, k=K)])
    t.fit(model, DataLoader(train, batch_size=6, shuffle=True), DataLoader(val, batch_size=5, num_workers=2))
    reference = looped_correct(model.net, val, K)
    expected = sum(reference.values()) / len(reference)
    assert float(t.callback_metrics[f"val/worst_of_{K}_acc"]) == pytest.approx(expected, abs=1e-6)


class RecordingMonitor(SelectionMonitor):
    def __init__(self) -> None:
        super().__init__(every_n_steps=2, num_samples=2)
        self.candidates: list[Any] = []

    def log_selection(self, out: Any, drawn: Any, step: int) -> None:
        self.candidates.append(out.candidates)
        super().log_selection(out, drawn, step)


def check_loader_made(candidates: Any, ds: MultiView, epoch: int) -> None:
    """The candidates are the looped transform's copies of their samples, copy-major."""
    x, _, index = candidates
    b = x.shape[0] // K
    data = Indexed()
    for i, idx in enumerate(index[:b].tolist()):
        ref = reference_views(ds, data[idx][0], idx, epoch, views=K)
        got = x.view(K, b, *x.shape[1:])[:, i]
        assert torch.allclose(got, ref, rtol=0, atol=1e-6), (idx, float((got - ref).abs().max()))


@pytest.mark.slow
@pytest.mark.filterwarnings(FEW_WORKERS)
def test_fidelity_and_monitor_check_the_loader_made_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scored: list[Any] = []
    full_input_losses = fidelity_module.full_input_losses

    def recording(loss_fn: Any, candidates: Any, *args: Any, **kwargs: Any) -> Tensor:
        scored.append(candidates)
        return full_input_losses(loss_fn, candidates, *args, **kwargs)

    monkeypatch.setattr(fidelity_module, "full_input_losses", recording)
    ds = MultiView(Indexed(), float_pipeline, K, seed=5)
    monitor, fidelity = RecordingMonitor(), SelectionFidelity(every_n_steps=2, window=1, warn_margin=1e-6)
    t = trainer(max_epochs=1, callbacks=[MaxUp(warmup_epochs=0), fidelity, monitor], default_root_dir=tmp_path)
    t.fit(Lit(selection_size=4), DataLoader(ds, batch_size=4, shuffle=True, num_workers=2))
    assert len(scored) == 3
    assert len(monitor.candidates) == 3
    for candidates in [*scored, *monitor.candidates]:
        check_loader_made(candidates, ds, epoch=0)
    assert 0.0 <= float(t.callback_metrics["maxup/view_agreement"]) <= 1.0
