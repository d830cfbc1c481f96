"""Guarantees where the device is: copies that do not block, deferred reads, selections that a non-finite loss
cannot win, seeds of 64 bits, and what the user's code sees outside the step. The copies' flags are recorded with
the ``meta`` device as the target, where a copy's flags are visible on a CPU-only machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUpConfig, MaxUpMixin, Shared
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core import random as lr
from lightning_maxup.core.batch import Candidates
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.evaluation.fidelity import SelectionFidelity
from lightning_maxup.evaluation.worst_of_k import WorstOfKAccuracy, worst_of_k_correct
from lightning_maxup.training._deferred import FiniteGuard
from tests.sync_counter import SyncCounter
from tests.trainer_options import quiet_trainer_options


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


class Net(MaxUpMixin, pl.LightningModule):
    """A small CNN trained with MaxUp on 8x8 one-channel images."""

    def __init__(self, m: int = 3, batches: int = 3, **kwargs: Any) -> None:
        kwargs.setdefault("augment", GaussianNoise(0.1))
        super().__init__(m=m, **kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
        )
        self.batches = batches

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(8 * self.batches), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _trainer(tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(**quiet_trainer_options(tmp_path, **kwargs))


# ----------------------------------------------------------------------------------------------------------------------
# Loader-made batches reach the device as Lightning moves plain tensors
# ----------------------------------------------------------------------------------------------------------------------
def _moved(batch: Any, device: str) -> tuple[list[tuple[str, str, bool]], list[str], Any]:
    """The copies (source, target, non_blocking) and syncs of Lightning's own batch transfer of ``batch``."""
    with SyncCounter() as counter:
        moved = pl.LightningModule().transfer_batch_to_device(batch, torch.device(device), 0)
    return counter.copies, counter.ops, moved


def _batches() -> list[Any]:
    x, y, w = torch.zeros(4, 3), torch.arange(4), torch.ones(5)
    return [
        pytest.param(Candidates((x, y), m=2), 2, id="candidates"),
        pytest.param((x, y, Shared(w)), 3, id="shared"),
        pytest.param(Candidates({"x": x, "y": y, "w": Shared(w)}, m=2), 3, id="candidates-holding-shared"),
        pytest.param([Candidates(x, m=4), Shared(w)], 2, id="list"),
    ]


@pytest.mark.parametrize(("batch", "leaves"), _batches())
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_wrappers_move_with_lightnings_flags_for_plain_tensors(batch: Any, leaves: int, device: str) -> None:
    plain, _, _ = _moved((torch.zeros(4, 3), torch.arange(4)), device)
    copies, ops, moved = _moved(batch, device)
    assert len(copies) == (leaves if device == "meta" else 0)
    # Lightning's choice for a plain tensor (non_blocking=True everywhere but the CPU and MPS), for every leaf.
    assert all(flag == plain[0][2] for _, _, flag in copies), (copies, plain)
    assert ops == [], "a wrapper's leaf was copied blocking"
    assert type(moved) is type(batch)


def test_an_explicit_non_blocking_flag_is_kept() -> None:
    with SyncCounter() as counter:
        Candidates((torch.zeros(4, 3), Shared(torch.ones(2))), m=2).to("meta", non_blocking=False)
        Shared(torch.ones(2)).to(torch.device("meta"), torch.float16, False)
    assert [flag for *_, flag in counter.copies] == [False, False, False]
    assert counter.ops == ["blocking_copy"] * 3, "the counter records blocking copies to a device"


# ----------------------------------------------------------------------------------------------------------------------
# A CPU generator with device data
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda g: lr.uniform((4, 3), generator=g, device="meta"), id="uniform"),
        pytest.param(lambda g: lr.normal((4, 3), generator=g, device="meta"), id="normal"),
        pytest.param(lambda g: lr.randint(0, 5, (4,), generator=g, device="meta"), id="randint"),
        pytest.param(lambda g: lr.randint(0, (3, 5), (4, 2), generator=g, device="meta"), id="randint-columns"),
        pytest.param(lambda g: lr.beta(0.4, 4, generator=g, device="meta"), id="beta"),
    ],
)
@pytest.mark.parametrize("keyed", [False, True], ids=["generator", "keyed"])
def test_host_draws_reach_the_device_without_blocking(draw: Any, keyed: bool) -> None:
    g: Any = lr.KeyedGenerator(0, torch.arange(4)) if keyed else torch.Generator().manual_seed(0)
    with SyncCounter() as counter:
        out = draw(g)
    assert out.device.type == "meta"
    assert counter.copies, "nothing was drawn on the host"
    assert all(flag for *_, flag in counter.copies), counter.copies
    assert counter.ops == [], counter.report()


# ----------------------------------------------------------------------------------------------------------------------
# The progress bar
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bar", [False, True], ids=["bar-off", "bar-on"])
def test_maxup_loss_joins_the_progress_bar_only_when_asked(bar: bool) -> None:
    model = Net()
    trainer = _trainer(max_epochs=1, enable_progress_bar=bar)
    trainer.fit(model)
    assert "maxup/loss" in trainer.callback_metrics
    assert "maxup/loss" not in trainer.progress_bar_metrics, "Lightning reads progress-bar values every step"
    model = Net()
    model.maxup_progress_bar = True
    trainer = _trainer(max_epochs=1, enable_progress_bar=bar)
    trainer.fit(model)
    assert "maxup/loss" in trainer.progress_bar_metrics


# ----------------------------------------------------------------------------------------------------------------------
# SelectionFidelity scores candidates with `maxup_selecting` set
# ----------------------------------------------------------------------------------------------------------------------
class Gated(Net):
    """Counts the rows ``per_sample_loss`` sees outside selection: the trained rows, the documented way."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trained_rows = 0

    def per_sample_loss(self, batch: Any) -> Tensor:
        if not self.maxup_selecting:
            self.trained_rows += int(batch[0].shape[0])
        return super().per_sample_loss(batch)


def test_selection_fidelity_scores_candidates_as_selection() -> None:
    model = Gated(m=4, batches=2, selection_size=4)
    fidelity = SelectionFidelity(every_n_steps=1)
    _trainer(max_epochs=1, callbacks=[fidelity]).fit(model)
    assert fidelity.last is not None, "the check ran"
    assert model.trained_rows == 16, f"counted {model.trained_rows} rows; 2 steps train 8 rows each"


# ----------------------------------------------------------------------------------------------------------------------
# Seeds of 64 bits
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**63 + 5, 2**64 - 1, 2**63 - 1, -(2**63), -3, 0])
def test_a_seed_of_64_bits_survives_the_state_dict(seed: int) -> None:
    model = Net(seed=seed)
    model._maxup_draws = 7
    copy = Net()
    copy.load_state_dict(model.state_dict())
    assert copy.maxup_seed == seed
    assert copy._maxup_draws == 7


def test_a_run_after_manual_seed_of_64_bits_checkpoints_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # the seed is torch's, not seed_everything's
    model = Net()  # seeds torch with 0 to make its weights
    torch.manual_seed(2**64 - 1)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model)
    assert model.maxup_seed == 2**64 - 1
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = Net.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.maxup_seed == 2**64 - 1


def test_a_seed_outside_torchs_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Expected `seed` to be an integer in \[-2\*\*63, 2\*\*64\) or None, got"):
        MaxUpConfig(seed=2**64)


# ----------------------------------------------------------------------------------------------------------------------
# A non-finite candidate never wins silently
# ----------------------------------------------------------------------------------------------------------------------
def test_a_nan_candidate_never_wins_the_selection() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def loss_fn(batch: Any) -> Tensor:
        losses = F.cross_entropy(net(batch[0]), batch[1], reduction="none")
        if batch[0].shape[0] == 18:  # the selection pass: copy 1 of every sample, and all copies of sample 5
            bad = torch.zeros(18, dtype=torch.bool)
            bad[6:12] = True
            bad[5::6] = True
            losses = torch.where(bad, torch.full_like(losses, float("nan")), losses)
        return losses

    for temperature in (None, 0.5):
        out = maxup_step(
            loss_fn, (x, y), m=3, augment=GaussianNoise(0.5), generator=torch.Generator().manual_seed(1),
            check_finite=False, selection_temperature=temperature,
        )  # fmt: skip
        assert (out.selected[:5] != 1).all(), f"a NaN copy won: {out.selected.tolist()}"
        assert int(out.selected[5]) == 0, "a sample without a finite copy trains on copy 0"
        assert torch.isfinite(out.loss)


class _Event:
    """Stands in for ``torch.cuda.Event``; ``synchronize()`` counts a stall unless the device passed the event."""

    now = 0
    done = 0
    stalls = 0

    def __init__(self) -> None:
        self.at: int | None = None

    def record(self) -> None:
        self.at = _Event.now

    def synchronize(self) -> None:
        assert self.at is not None
        _Event.stalls += self.at > _Event.done

    @staticmethod
    def reset() -> None:
        _Event.now = _Event.done = _Event.stalls = 0


def test_deferred_guard_reads_each_count_lag_calls_later_without_waiting() -> None:
    guard = FiniteGuard(read_at_once=(), event=_Event)
    _Event.reset()
    for step in range(1 + FiniteGuard.lag):
        _Event.now, _Event.done = step, step - 1  # the device runs a step behind the host
        guard(torch.tensor([1.0, float("nan") if step == 1 else 2.0]), "candidate losses")
    _Event.now, _Event.done = 3, 2
    with pytest.raises(FloatingPointError, match="1 of 2 candidate losses are NaN or infinite"):
        guard(torch.tensor([1.0, 2.0]), "candidate losses")  # step 1 + lag reads step 1's count
    assert _Event.stalls == 0, "a deferred read waited for the device"
    guard = FiniteGuard(read_at_once=(), event=_Event)
    guard(torch.tensor([float("inf")]), "training losses")
    assert guard.pending == 1
    _Event.done = _Event.now
    with pytest.raises(FloatingPointError, match="1 of 1 training losses"):
        guard.flush()
    assert guard.pending == 0


class Exploding(Net):
    """Copy 1's selection losses are NaN at step ``bad_step``; the guard runs its accelerator branch."""

    def __init__(self, bad_step: int, **kwargs: Any) -> None:
        super().__init__(m=2, batches=6, **kwargs)
        self.bad_step = bad_step
        self.steps_run = 0

    def on_fit_start(self) -> None:  # no super(): nothing MaxUp needs lives here
        self._maxup_finite = FiniteGuard(read_at_once=(), event=_Event)
        _Event.reset()

    def on_train_end(self) -> None:  # no super() either: the check must not depend on this hook
        pass

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps_run += 1
        _Event.now += 1
        _Event.done = _Event.now - 1

    def per_sample_loss(self, batch: Any) -> Tensor:
        losses = super().per_sample_loss(batch)
        if self.maxup_selecting and self.trainer.global_step == self.bad_step and losses.shape[0] == 16:
            losses = torch.cat([losses[:8], torch.full_like(losses[8:], float("nan"))])
        return losses


@pytest.mark.parametrize(
    ("bad_step", "raised_in", "stalls"),
    [
        pytest.param(1, 3, 0, id="two-steps-later"),
        pytest.param(4, 5, 0, id="at-the-epochs-last-batch"),
        pytest.param(5, 5, 1, id="at-the-last-batch-itself"),
    ],
)
def test_the_deferred_check_raises_at_the_documented_step(bad_step: int, raised_in: int, stalls: int) -> None:
    model = Exploding(bad_step)
    with pytest.raises(FloatingPointError, match="8 of 16 candidate losses in the MaxUp selection pass"):
        _trainer(max_epochs=1, check_val_every_n_epoch=None).fit(model)
    # Steps before `raised_in` completed (backward and optimizer step); the raising step did not.
    assert model.steps_run == raised_in, model.steps_run
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN copies were trained on"
    # Only the read at the epoch's last batch may wait, for that batch's own count.
    assert _Event.stalls == stalls


def test_no_checkpoint_is_written_after_a_step_with_non_finite_losses(tmp_path: Path) -> None:
    model = Exploding(bad_step=1)
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(FloatingPointError, match="candidate losses"):
        _trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[every_step]).fit(model)
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == ["epoch=0-step=1.ckpt"], saved  # after step 0; taking step 1's state raised
    assert model.steps_run == 1
    assert _Event.stalls == 1, "the checkpoint read the count of the step it saves"


# ----------------------------------------------------------------------------------------------------------------------
# The plain function's train-mode selection draws dropout masks of its own
# ----------------------------------------------------------------------------------------------------------------------
def _masks_of_one_step(seed: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 256, bias=False), nn.Dropout(0.5))
    nn.init.ones_(net[0].weight)
    masks: list[Tensor] = []

    def loss_fn(batch: Any) -> Tensor:
        out = net(torch.ones(batch[0].shape[0], 1))
        masks.append((out != 0).clone())
        return out.mean(1)

    batch = (torch.zeros(8, 1), torch.zeros(8))
    g = torch.Generator().manual_seed(0)
    maxup_step(loss_fn, batch, m=2, augment=GaussianNoise(1e-3), generator=g, selection_mode="train", model=net)
    selection, gradient = masks
    return selection[:8], gradient


def test_plain_train_mode_selection_draws_masks_of_its_own_and_replays() -> None:
    selection, gradient = _masks_of_one_step(5)
    assert not torch.equal(selection, gradient), "selection copy 0 reused the gradient pass's dropout masks"
    agree = float((selection == gradient).float().mean())
    assert abs(agree - 0.5) < 0.05, f"masks should agree like independent draws (~50 %), got {agree:.3f}"
    again = _masks_of_one_step(5)
    assert torch.equal(again[0], selection), "a run seeded alike must replay"
    assert torch.equal(again[1], gradient), "a run seeded alike must replay"
    # The gradient pass draws what it would without a selection pass: the global stream's next masks.
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(1, 256, bias=False), nn.Dropout(0.5))
    nn.init.ones_(net[0].weight)
    assert torch.equal(net(torch.ones(8, 1)) != 0, gradient)


# ----------------------------------------------------------------------------------------------------------------------
# WorstOfKAccuracy refuses targets that are not [B]
# ----------------------------------------------------------------------------------------------------------------------
def test_worst_of_k_refuses_column_targets_by_name() -> None:
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8, 1))
    match = r"Expected `target` to hold one class per sample \(shape \[8\]\), got shape \[8, 1\]"
    with pytest.raises(ValueError, match=match):
        worst_of_k_correct(net, x, y, GaussianNoise(0.1), k=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        WorstOfKAccuracy(GaussianNoise(0.1), k=2, seed=0).update(net, x, y)


# ----------------------------------------------------------------------------------------------------------------------
# FSDP2 recognition across torch versions
# ----------------------------------------------------------------------------------------------------------------------
class _FakeFSDPParam:
    def __init__(self, name: str) -> None:
        self.name = name


class _FakeGroup:
    def __init__(self, *names: str) -> None:
        self.fsdp_params = [_FakeFSDPParam(n) for n in names]


class _StateOfNewTorch:
    def __init__(self) -> None:
        self._fsdp_param_groups = [_FakeGroup("a", "b"), _FakeGroup("c")]


class _StateOfOldTorch:
    """Older torch releases keep one optional group, ``_fsdp_param_group``."""

    def __init__(self, empty: bool = False) -> None:
        self._fsdp_param_group = None if empty else _FakeGroup("a")


@pytest.mark.parametrize(
    ("state", "names"),
    [
        pytest.param(_StateOfNewTorch(), ["a", "b", "c"], id="groups"),
        pytest.param(_StateOfOldTorch(), ["a"], id="one-group"),
        pytest.param(_StateOfOldTorch(empty=True), [], id="no-group"),
    ],
)
def test_fsdp2_parameters_are_found_in_either_state_layout(
    state: Any, names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed.fsdp as fsdp

    from lightning_maxup.core._state import _fsdp_params

    class Sharded(nn.Module):
        def _get_fsdp_state(self) -> Any:
            return state

    monkeypatch.setattr(fsdp, "FSDPModule", Sharded)
    assert [p.name for p in _fsdp_params([nn.Linear(1, 1), Sharded()])] == names
