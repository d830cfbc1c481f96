"""The whole-fit sync audit: what MaxUp adds, per training step, to the syncing ops of a complete ``Trainer.fit``.

The no-sync tests of ``tests/guarantees/test_no_syncs.py`` wrap ``maxup_step``; what Lightning does around it (logging,
the progress bar, the batch transfer, the callbacks) is only seen in a whole fit. Here complete fits run under the
:class:`~tests.sync_counter.SyncCounter`, with a logger, the progress bar off and on, a DataLoader with two worker
processes, ``SelectionFidelity`` and ``WorstOfKValidation``, once with MaxUp and once for the same module trained
without it (its ``training_step`` augments once and takes the mean loss). Each sync is attributed to the training step
in whose window it ran (from one ``on_train_batch_start`` to the next).

What is compared, and what is not:

- **every step but the last of each epoch: equal counts** (0 in both), the first step (pre-flight check) and the
  ``SelectionFidelity`` checks included, leaving out Lightning's result object for each logged key, made the
  first time the key is logged in a fit (two ``lift_fresh`` each; never in the second epoch). The last step's
  window holds the epoch end (validation, epoch values): Lightning reads each epoch value once there, a per-epoch
  cost, equal in both epochs.
- **the steps the logger writes** (``log_every_n_steps``): Lightning reads every per-step logged value on the host
  there, one ``.item()`` each; MaxUp's per-step values add exactly one each, and none with
  ``maxup_log_steps = False``.
- ``check_finite`` is off: on the CPU the guard reads its count at once (``tests/guarantees/test_guarantees.py``); its
  accelerator branch reads two steps later without waiting (``tests/guarantees/test_device_guarantees.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.evaluation.fidelity import SelectionFidelity
from lightning_maxup.evaluation.worst_of_k import WorstOfKValidation
from tests.sync_counter import SyncCounter

STEPS_PER_EPOCH = 6


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


class Net(MaxUpMixin, pl.LightningModule):
    """A BatchNorm CNN trained with MaxUp; logs its own training and validation loss, as users do."""

    def __init__(self, log_steps: bool = True) -> None:
        super().__init__(m=3, augment=GaussianNoise(0.1), selection_size=4, check_finite=False)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 3),
        )  # fmt: skip
        self.maxup_log_steps = log_steps

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(8 * STEPS_PER_EPOCH), batch_size=8, num_workers=2, persistent_workers=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(16), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class WithoutMaxUp(Net):
    """The same module trained without MaxUp: one augmented copy, the mean loss."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        noisy = GaussianNoise(0.1)((x, y), generator=None)[0]
        loss = self.per_sample_loss((noisy, y)).mean()
        self.log("train_loss", loss)
        return loss


class StepWindows(Callback):
    """Where each training step's window starts in the counter's record."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter
        self.starts: list[int] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(len(self.counter.syncs))


def _audit(model: Net, tmp_path: Path, bar: bool, every: int, callbacks: list[Callback]) -> list[list[str]]:
    """The syncing ops of each training step's window in a 2-epoch fit."""
    with SyncCounter() as counter:
        windows = StepWindows(counter)
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), log_every_n_steps=every,
            enable_checkpointing=False, enable_progress_bar=bar, enable_model_summary=False,
            callbacks=[windows, *callbacks], default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model)
    bounds = [*windows.starts, len(counter.syncs)]
    return [[_name(s) for s in counter.syncs[a:b]] for a, b in zip(bounds, bounds[1:], strict=False)]


def _name(sync: Any) -> str:
    """The op, marked when it is Lightning's one-time result object for a key logged for the first time in a fit."""
    first_log = sync.where.startswith("result.py") and " __init__ " in sync.where
    return f"{sync.op} (first log of a key)" if first_log else sync.op


def _maxup_callbacks() -> list[Callback]:
    return [MaxUp(warmup_epochs=0), SelectionFidelity(every_n_steps=4), WorstOfKValidation(GaussianNoise(0.1), k=2)]


def _steady(step: int) -> bool:
    """Not an epoch's last step, whose window holds the epoch end (validation, epoch values)."""
    return (step + 1) % STEPS_PER_EPOCH != 0


def _per_step(ops: list[str]) -> list[str]:
    """The ops that recur: without Lightning's one-time result objects."""
    return [op for op in ops if "first log" not in op]


@pytest.mark.slow
@pytest.mark.parametrize("bar", [False, True], ids=["bar-off", "bar-on"])
def test_maxup_adds_no_syncing_op_to_a_step_of_a_whole_fit(bar: bool, tmp_path: Path) -> None:
    with_maxup = _audit(Net(), tmp_path / "maxup", bar, every=50, callbacks=_maxup_callbacks())
    without = _audit(WithoutMaxUp(), tmp_path / "plain", bar, every=50, callbacks=[])
    assert len(with_maxup) == len(without) == 2 * STEPS_PER_EPOCH
    steady = [k for k in range(len(without)) if _steady(k)]
    assert {0, 3, 7} <= set(steady), "the pre-flight step and the SelectionFidelity checks are compared"
    added = {k: len(_per_step(with_maxup[k])) - len(_per_step(without[k])) for k in steady}
    assert added == dict.fromkeys(steady, 0), {k: with_maxup[k] for k in steady if added[k]}
    assert all(_per_step(without[k]) == [] for k in steady), "the module's own steps sync: nothing is compared"
    # Lightning's result object for a key comes once per fit: never in the second epoch.
    assert all("first log" not in op for k in steady if k >= STEPS_PER_EPOCH for op in with_maxup[k])
    # The epoch ends: Lightning reads each epoch value once; MaxUp's add one read each, per epoch, not per step.
    ends = [k for k in range(len(without)) if not _steady(k)]
    epoch_reads = [len(with_maxup[k]) - len(without[k]) for k in ends]
    # The identical-copies check reads its flag once, at the end of the first MaxUp epoch only.
    assert epoch_reads[0] == epoch_reads[1] + 1, epoch_reads


@pytest.mark.slow
def test_on_the_loggers_steps_each_maxup_step_value_is_read_once(tmp_path: Path) -> None:
    every = 3  # steps 2 and 8 are written (and 5 and 11, the epochs' last)
    logged = _audit(Net(), tmp_path / "maxup", bar=False, every=every, callbacks=[MaxUp(warmup_epochs=0)])
    epochs_only = _audit(
        Net(log_steps=False), tmp_path / "epochs", bar=False, every=every, callbacks=[MaxUp(warmup_epochs=0)]
    )
    without = _audit(WithoutMaxUp(), tmp_path / "plain", bar=False, every=every, callbacks=[])
    steady = [k for k in range(len(without)) if _steady(k)]
    writes = [k for k in steady if (k + 1) % every == 0]
    assert writes == [2, 8]
    # loss, m, selection_share, worst_loss, mean_loss, gap, grad_norm (GaussianNoise): one read each.
    reads = {k: len(_per_step(logged[k])) - len(_per_step(without[k])) for k in steady}
    assert reads == {k: 7 if k in writes else 0 for k in steady}, reads
    added = {k: len(_per_step(epochs_only[k])) - len(_per_step(without[k])) for k in steady}
    assert added == dict.fromkeys(steady, 0), "maxup_log_steps=False still adds reads"
