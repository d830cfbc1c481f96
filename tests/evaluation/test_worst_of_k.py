"""Worst-of-k evaluation: the functional form against a loop, the Metric's accumulation, replay and reduction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup.augment import Compose, Cutout, GaussianNoise, RandomCrop
from lightning_maxup.core.random import KeyedGenerator
from lightning_maxup.evaluation.worst_of_k import (
    WorstOfKAccuracy,
    WorstOfKValidation,
    copy_keys,
    worst_of_k_accuracy,
    worst_of_k_correct,
    worst_of_k_loss,
    worst_of_k_losses,
)
from tests.sync_counter import SyncCounter

B, C = 24, 3


def identity(batch: Any, generator: Any = None) -> Any:
    return batch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, C)).eval()


def _data(n: int = B, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return x, _net()(x).argmax(1).detach()  # the model's own labels: most samples start correct


def _flip_some(y: Tensor, every: int = 5) -> Tensor:
    y = y.clone()
    y[::every] = (y[::every] + 1) % C
    return y


AUGMENTS = [
    pytest.param(GaussianNoise(0.3), id="noise"),
    pytest.param(Compose([RandomCrop(8, padding=2), Cutout(4)]), id="crop-cutout"),
]


def _reference_correct(net: nn.Module, x: Tensor, y: Tensor, augment: Any, k: int, seed: int) -> Tensor:
    """The k copies built by a loop, each classified on its own; a sample is correct when all its copies are."""
    b = x.shape[0]
    expanded = (torch.cat([x] * k), torch.cat([y] * k))  # row j * B + i is copy j of sample i
    copies = augment(expanded, generator=torch.Generator().manual_seed(seed))[0]
    out = []
    with torch.no_grad():
        for i in range(b):
            out.append(all(int(net(copies[j * b + i][None]).argmax()) == int(y[i]) for j in range(k)))
    return torch.tensor(out)


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("k", [pytest.param(1, id="k1"), pytest.param(4, id="k4"), pytest.param(10, id="k10")])
@pytest.mark.parametrize("chunk_size", [pytest.param(None, id="whole"), pytest.param(7, id="chunks")])
def test_correct_matches_a_loop(augment, k, chunk_size):
    net = _net()
    x, y = _data()
    y = _flip_some(y)
    got = worst_of_k_correct(net, x, y, augment, k, generator=torch.Generator().manual_seed(3), chunk_size=chunk_size)
    ref = _reference_correct(net, x, y, augment, k, seed=3)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {B} samples differ"
    acc = worst_of_k_accuracy(net, x, y, augment, k, generator=torch.Generator().manual_seed(3))
    assert float(acc) == pytest.approx(float(ref.float().mean()))


def test_k1_with_the_identity_is_plain_accuracy():
    net = _net()
    x, y = _data()
    y = _flip_some(y, every=3)
    plain = (net(x).argmax(1) == y).float().mean()
    assert float(worst_of_k_accuracy(net, x, y, identity, 1)) == pytest.approx(float(plain))
    assert float(worst_of_k_accuracy(net, x, y, identity, 7)) == pytest.approx(float(plain))  # identical copies


def _nested(seed: int, b: int, k: int) -> KeyedGenerator:
    return KeyedGenerator(seed, copy_keys(torch.arange(b), k))


def test_monotone_non_increasing_in_k_on_nested_draws():
    net = _net()
    x, y = _data(n=64)
    previous = torch.ones(64, dtype=torch.bool)
    accuracies = []
    for k in range(1, 13):
        ok = worst_of_k_correct(net, x, y, GaussianNoise(0.5), k, generator=_nested(5, 64, k))
        assert not (ok & ~previous).any(), f"k={k}: a sample failed at k-1 but passes at k"
        previous = ok
        accuracies.append(float(ok.float().mean()))
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] < accuracies[0]  # sigma 0.5 on [0, 1] images flips some predictions


def test_worst_of_k_loss_matches_a_loop():
    torch.manual_seed(1)
    net = nn.Linear(5, 1)
    batch = (torch.randn(B, 5), torch.randn(B))

    def loss_fn(b: Any) -> Tensor:
        return (net(b[0]).squeeze(1) - b[1]) ** 2

    k, augment = 6, GaussianNoise(0.2)
    got = worst_of_k_loss(loss_fn, batch, augment, k, generator=torch.Generator().manual_seed(2), chunk_size=10)
    copies = augment((torch.cat([batch[0]] * k), torch.cat([batch[1]] * k)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        worst = [
            max(float(loss_fn((copies[0][j * B + i][None], copies[1][j * B + i][None]))) for j in range(k))
            for i in range(B)
        ]
    ref = sum(worst) / B
    assert float(got) == pytest.approx(ref, rel=1e-5), f"error {abs(float(got) - ref)}"
    losses = worst_of_k_losses(loss_fn, batch, augment, k, generator=torch.Generator().manual_seed(2))
    assert losses.shape == (k, B)
    assert not losses.requires_grad


def _batches(n: int = 3) -> list[tuple[Tensor, Tensor, Tensor]]:
    out, start = [], 0
    for i, size in enumerate([10, 7, 13][:n]):
        x, y = _data(size, seed=10 + i)
        out.append((x, _flip_some(y, every=4), torch.arange(start, start + size)))
        start += size
    return out


def test_metric_accumulates_and_equals_the_functional_on_the_concatenation():
    net, k = _net(), 5
    metric = WorstOfKAccuracy(GaussianNoise(0.4), k=k, seed=9)
    batches = _batches()
    for x, y, index in batches:
        metric.update(net, x, y, index=index)
    x, y, index = (torch.cat(t) for t in zip(*batches, strict=True))
    whole = worst_of_k_accuracy(net, x, y, GaussianNoise(0.4), k, generator=metric.generator(x, index))
    assert float(metric.compute()) == pytest.approx(float(whole))
    assert int(metric.total) == x.shape[0]
    # Without indices the draws are keyed by position, so the value is the mean of the per-batch values.
    metric.reset()
    per_batch = []
    for x, y, _ in batches:
        g = metric.generator(x)
        per_batch.append(worst_of_k_correct(net, x, y, GaussianNoise(0.4), k, generator=g))
        metric.update(net, x, y)
    assert float(metric.compute()) == pytest.approx(float(torch.cat(per_batch).float().mean()))


def test_metric_forward_returns_the_batch_value_and_accumulates_like_update():
    net = _net()
    by_forward, by_update = WorstOfKAccuracy(GaussianNoise(0.4), k=5), WorstOfKAccuracy(GaussianNoise(0.4), k=5)
    for x, y, _ in _batches():
        g = by_update.generator(x)
        batch_value = by_forward(net, x, y)
        assert float(batch_value) == pytest.approx(
            float(worst_of_k_accuracy(net, x, y, GaussianNoise(0.4), 5, generator=g))
        )
        by_update.update(net, x, y)
    assert by_forward.num_updates == by_update.num_updates == 3
    assert int(by_forward.correct) == int(by_update.correct)
    assert int(by_forward.total) == int(by_update.total)


def test_metric_replays_after_reset():
    net = _net()
    metric = WorstOfKAccuracy(Compose([RandomCrop(8, padding=2), GaussianNoise(0.3)]), k=8, seed=1)
    values = []
    for _ in range(2):
        metric.reset()
        torch.manual_seed(len(values))  # the global stream plays no part
        for x, y, _ in _batches():
            metric.update(net, x, y)
        values.append(float(metric.compute()))
    assert values[0] == values[1]
    other = WorstOfKAccuracy(Compose([RandomCrop(8, padding=2), GaussianNoise(0.3)]), k=8, seed=2)
    for x, y, _ in _batches():
        other.update(net, x, y)
    assert 0.0 < values[0] < 1.0
    assert int(other.total) == int(metric.total)


def test_metric_index_makes_draws_independent_of_batching():
    net = _net()
    x, y, index = (torch.cat(t) for t in zip(*_batches(), strict=True))
    split, whole = WorstOfKAccuracy(GaussianNoise(0.4), k=6), WorstOfKAccuracy(GaussianNoise(0.4), k=6)
    for lo, hi in ((0, 4), (4, 21), (21, 30)):
        split.update(net, x[lo:hi], y[lo:hi], index=index[lo:hi])
    whole.update(net, x.flip(0), y.flip(0), index=index.flip(0))
    assert int(split.correct) == int(whole.correct)


def test_metric_reduces_over_ranks_with_a_fake_dist_sync_fn():
    """Two ranks' states summed through torchmetrics' own sync, with a gather that returns both ranks' tensors."""
    net, k = _net(), 4
    batches = _batches()
    other: list[Tensor] = []

    def gather(tensor: Tensor, group: Any = None) -> list[Tensor]:
        return [tensor, other.pop(0)]

    ranks = [
        WorstOfKAccuracy(GaussianNoise(0.4), k=k, dist_sync_fn=gather, distributed_available_fn=lambda: True),
        WorstOfKAccuracy(GaussianNoise(0.4), k=k),
    ]
    ranks[0].update(net, *batches[0][:2], index=batches[0][2])
    for x, y, index in batches[1:]:
        ranks[1].update(net, x, y, index=index)
    x, y, index = (torch.cat(t) for t in zip(*batches, strict=True))
    whole = worst_of_k_correct(net, x, y, GaussianNoise(0.4), k, generator=ranks[0].generator(x, index))
    other.extend([ranks[1].correct.clone(), ranks[1].total.clone()])  # the states in the order add_state made them
    assert float(ranks[0].compute()) == pytest.approx(float(whole.float().mean()))  # compute() syncs, then unsyncs
    assert other == []  # both states went through the gather
    assert int(ranks[0].total) == batches[0][0].shape[0]  # the local state is back
    ranks[0].sync(dist_sync_fn=lambda t, group=None: [t, t], distributed_available=lambda: True)
    assert int(ranks[0].total) == 2 * batches[0][0].shape[0]  # summed, not averaged or concatenated
    ranks[0].unsync()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda: WorstOfKAccuracy(identity, k=0), ValueError, r"`k` to be a positive integer, got 0", id="k0"
        ),
        pytest.param(
            lambda: WorstOfKAccuracy(identity, k=True),
            ValueError,
            r"`k` to be a positive integer, got True",
            id="kbool",
        ),
        pytest.param(
            lambda: WorstOfKAccuracy("crop"), TypeError, r"`augment` to be callable, got 'crop'", id="augment"
        ),
        # augment=None is allowed since 0.4 (loader-made Candidates); a plain batch then raises at update():
        # tests/evaluation/test_loader_copies_evaluation.py::test_worst_of_k_refuses_mismatched_or_plain_batches
        pytest.param(
            lambda: WorstOfKAccuracy(identity, seed=1.5), TypeError, r"`seed` to be an integer, got 1.5", id="seed"
        ),
        pytest.param(
            lambda: WorstOfKAccuracy(identity, chunk_size=0),
            ValueError,
            r"`chunk_size` to be a positive integer or None, got 0",
            id="chunk",
        ),
        pytest.param(
            lambda: worst_of_k_accuracy(_net(), *_data(), identity, k=-1),
            ValueError,
            r"`k` to be a positive integer, got -1",
            id="fn-k",
        ),
        pytest.param(
            lambda: worst_of_k_accuracy(_net(), *_data(), 3, k=2),
            TypeError,
            r"`augment` to be callable, got 3",
            id="fn-augment",
        ),
        pytest.param(
            lambda: worst_of_k_accuracy(_net(), _data()[0], torch.zeros(3), identity, k=2),
            ValueError,
            r"`target` to hold one class per sample \(shape \[24\]\), got shape \[3\]",
            id="target",
        ),
        pytest.param(
            lambda: worst_of_k_loss("f", torch.zeros(2), identity, 2),
            TypeError,
            r"`loss_fn` to be callable, got 'f'",
            id="loss-fn",
        ),
        pytest.param(
            lambda: WorstOfKValidation(identity, predict=5),
            TypeError,
            r"`predict` to be callable as predict\(pl_module, x\) or None, got 5",
            id="predict",
        ),
    ],
)
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("with_index", [pytest.param(False, id="positions"), pytest.param(True, id="index")])
def test_metric_update_makes_no_sync(with_index: bool):
    net, (x, y) = _net(), _data()
    metric = WorstOfKAccuracy(Compose([RandomCrop(8, padding=2), Cutout(3), GaussianNoise(0.1)]), k=4, chunk_size=40)
    index = torch.arange(B) if with_index else None
    with SyncCounter() as counter:
        metric.update(net, x, y, index=index)
        metric.update(net, x, y, index=index)
    assert counter.ops == [], counter.report()


def test_augment_must_keep_the_rows():
    def drop(batch: Any, generator: Any = None) -> Any:
        return batch[0][1:], batch[1][1:]

    with pytest.raises(ValueError, match=r"`augment` must keep the number of rows: given 48 rows"):
        worst_of_k_accuracy(_net(), *_data(), drop, k=2)


# ---------------------------------------------------------------------------------------------------------------
# Logged on the validation loop
# ---------------------------------------------------------------------------------------------------------------


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net().train()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loader(seed: int, n: int = 40) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) * 30).long() % C), batch_size=16)


def test_callback_logs_worst_of_k_on_the_validation_loop(tmp_path: Path):
    model, augment = Lit(), GaussianNoise(0.3)
    callback = WorstOfKValidation(augment, k=5, seed=4)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=_loader(0), val_dataloaders=_loader(1))
    logged = trainer.callback_metrics["val/worst_of_5_acc"]
    # The last validation ran on the final weights: recompute it by hand, batch by batch with the same keys.
    model.eval()
    reference = WorstOfKAccuracy(augment, k=5, seed=4)
    correct = []
    with torch.no_grad():
        for x, y in _loader(1):
            correct.append(worst_of_k_correct(model, x, y, augment, 5, generator=reference.generator(x)))
            reference.num_updates += 1
    assert float(logged) == pytest.approx(float(torch.cat(correct).float().mean()))
    assert float(logged) <= float(trainer.callback_metrics["val/acc"]) + 1e-6  # worst-of-k never beats clean
    # Every validation epoch draws the same copies.
    again = trainer.validate(model, dataloaders=_loader(1), verbose=False)[0]["val/worst_of_5_acc"]
    assert again == pytest.approx(float(logged))


def test_callback_needs_targets(tmp_path: Path):
    model = Lit()
    x = torch.rand(8, 1, 8, 8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[WorstOfKValidation(identity, k=2)],
    )

    class Unlabelled(Lit):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    with pytest.raises(ValueError, match="needs validation batches with targets"):
        trainer.validate(Unlabelled(), dataloaders=DataLoader(TensorDataset(x), batch_size=4), verbose=False)
    del model


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
@pytest.mark.usefixtures("file_system_sharing")
def test_callback_sums_over_ddp_ranks(tmp_path: Path):
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    model, augment, k = Lit(), GaussianNoise(0.3), 4
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        callbacks=[WorstOfKValidation(augment, k=k, seed=4)],
    )  # fmt: skip
    val = _loader(1, n=40)  # DistributedSampler without shuffling: rank r holds samples r, r + 2, ...; 20 each
    trainer.fit(model, train_dataloaders=_loader(0), val_dataloaders=val)
    logged = float(trainer.callback_metrics["val/worst_of_4_acc"])
    x, y = val.dataset.tensors
    model.eval()
    correct = 0
    with torch.no_grad():
        for rank in range(2):  # each rank's batches of 16 and 4, keyed by their position on that rank
            xs, ys = x[rank::2], y[rank::2]
            reference = WorstOfKAccuracy(augment, k=k, seed=4)
            for lo in range(0, 20, 16):
                reference.update(model, xs[lo : lo + 16], ys[lo : lo + 16])
            correct += int(reference.correct)
    assert logged == pytest.approx(correct / 40)
