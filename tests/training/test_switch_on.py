"""The MaxUp callback's switch-on options: the ramp, clean BatchNorm statistics and the switch-on warning."""

from __future__ import annotations

import copy
import importlib
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.training.callback import SWITCH_STEPS, ramp_schedule
from tests.sync_counter import SyncCounter
from tests.training.test_lightning import Lit, _loader, _params, _trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


class _Schedule(Callback):
    """Records, at every step, the epoch, the step's ``m`` and its ``selection_temperature``."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.current_epoch, pl_module.maxup_active_m, pl_module.maxup_selection_temperature))


def _expected(epoch: int, warmup: int, ramp_epochs: int, m: int, ramp: str, t0: float) -> tuple[int, float | None]:
    """The schedule written out directly: warm-up, then ``ramp_epochs`` eased epochs, then MaxUp."""
    if epoch < warmup:
        return 1, None
    k = epoch - warmup
    if k >= ramp_epochs:
        return m, None
    if ramp == "m":
        return max(1, round(m ** ((k + 1) / (ramp_epochs + 1)))), None
    return m, t0 * (ramp_epochs - k) / ramp_epochs


@pytest.mark.parametrize(
    ("ramp", "ramp_epochs", "m"),
    [
        pytest.param("m", 2, 4, id="m-4-over-2"),
        pytest.param("m", 1, 8, id="m-8-over-1"),
        pytest.param("temperature", 2, 3, id="temperature-over-2"),
    ],
)
def test_ramp_follows_its_schedule_epoch_by_epoch(ramp, ramp_epochs, m):
    warmup, t0 = 1, 0.7
    cb = MaxUp(warmup_epochs=warmup, m=m, ramp_epochs=ramp_epochs, ramp=ramp, ramp_temperature=t0)
    record = _Schedule()
    model = Lit(m=2)
    epochs = warmup + ramp_epochs + 1
    _trainer(max_epochs=epochs, limit_train_batches=2, callbacks=[cb, record]).fit(model, _loader())
    want = [(e, *_expected(e, warmup, ramp_epochs, m, ramp, t0)) for e in range(epochs) for _ in range(2)]
    assert record.seen == want
    assert (model.maxup_m, model.maxup_selection_temperature) == (2, None), "the module's own options come back"


def test_ramp_schedule_examples():
    assert [ramp_schedule(k, 1, 4) for k in range(2)] == [(2, None), (4, None)]
    assert ramp_schedule(0, 3, 2) == (1, None)  # 2 ** (1/4) rounds to 1: an ordinary epoch
    assert ramp_schedule(0, 4, 4, "temperature", 2.0) == (4, 2.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"ramp_epochs": -1}, "Expected `ramp_epochs` to be a non-negative integer, got -1", id="ramp-e"),
        pytest.param({"ramp": "linear"}, "Expected `ramp` to be one of 'm', 'temperature', got 'linear'", id="ramp"),
        pytest.param({"ramp_temperature": 0.0}, "Expected `ramp_temperature` to be a positive", id="temperature"),
        pytest.param({"bn_stats": "copy0"}, "Expected `bn_stats` to be one of 'selected', 'clean'", id="bn"),
        pytest.param({"switch_warning": -2}, "Expected `switch_warning` to be a positive", id="warning"),
    ],
)
def test_switch_options_are_validated_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaxUp(**kwargs)


# The interrupted leg stops inside the ramp; it resumes without its checkpoint callback.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
# The toy CNN collapses to a constant output late in epoch 2; a fit resumed there watches that epoch for identical
# copies (the first MaxUp epoch it sees), and rightly finds them. Not what this test is about.
@pytest.mark.filterwarnings("ignore:In every MaxUp step of epoch:UserWarning")
@pytest.mark.parametrize(
    "stop",
    [pytest.param({"max_epochs": 2}, id="ramp-epoch-boundary"), pytest.param({"max_steps": 15}, id="mid-ramp-epoch")],
)
@pytest.mark.parametrize("ramp", ["m", "temperature"])
def test_resume_mid_ramp_matches_uninterrupted_run(tmp_path, stop, ramp):
    epochs = 4

    def callbacks():
        return [MaxUp(warmup_epochs=1, m=4, ramp_epochs=2, ramp=ramp, bn_stats="clean"), _Schedule()]

    full = Lit(m=4, seed=11)
    full_cbs = callbacks()
    _trainer(max_epochs=epochs, callbacks=full_cbs).fit(full, _loader())

    first = Lit(m=4, seed=11)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = _trainer(
        tmp_path, callbacks=[*callbacks(), ckpt], enable_checkpointing=True, **{"max_epochs": epochs, **stop}
    )
    trainer.fit(first, _loader())

    resumed = Lit(m=4, seed=None)
    resumed_cbs = callbacks()
    _trainer(max_epochs=epochs, callbacks=resumed_cbs).fit(resumed, _loader(), ckpt_path=str(tmp_path / "last.ckpt"))

    steps_done = trainer.global_step
    assert 1 <= full_cbs[1].seen[steps_done][0] <= 2, "the interrupted leg should stop inside the ramp"
    assert resumed_cbs[1].seen == full_cbs[1].seen[steps_done:], "the schedule after resuming differs"
    ref, got = _params(full), _params(resumed)
    for k in ref:
        err = (ref[k].float() - got[k].float()).abs().max()
        assert err == 0, f"{k} differs by {err} after resuming at step {steps_done}"


# ---------------------------------------------------------------------------------------------------------------------
# Clean BatchNorm statistics
# ---------------------------------------------------------------------------------------------------------------------
class _PreStep(Callback):
    """Placed before the MaxUp callback: keeps every step's weights before the step, and its batch."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = {k.removeprefix("net."): p.detach().clone() for k, p in pl_module.named_parameters()}
        self.steps.append((params, batch[0].clone()))


def _norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_clean_bn_stats_equal_a_reference_pass_on_the_clean_batches(mode):
    model = Lit(m=3, selection_mode=mode)
    initial = copy.deepcopy(model.net)
    pre = _PreStep()
    _trainer(max_epochs=2, callbacks=[pre, MaxUp(warmup_epochs=0, bn_stats="clean")]).fit(model, _loader())

    # Reference: a train-mode forward of each step's weights (before the step) on each step's batch as loaded.
    ref = initial.train()
    for params, x in pre.steps:
        ref.load_state_dict(params, strict=False)
        with torch.no_grad():
            ref(x)
    got, want = _norm_buffers(model.net), _norm_buffers(ref)
    assert len(pre.steps) == 12
    assert want
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs by {(got[k].float() - want[k].float()).abs().max()}"


def test_clean_bn_stats_differ_from_the_selected_copies_stats():
    """The option changes what it should: with the selected copies' statistics the buffers differ."""
    clean, worst = Lit(m=3), Lit(m=3)
    _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1, bn_stats="clean")]).fit(clean, _loader())
    _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1)]).fit(worst, _loader())
    a, b = _norm_buffers(clean.net), _norm_buffers(worst.net)
    assert not torch.equal(a["1.running_mean"], b["1.running_mean"])
    assert torch.equal(a["1.num_batches_tracked"], b["1.num_batches_tracked"]), "one update per step, as before"


class _OldSchedule(Callback):
    """The 0.3 callback's schedule written out: MaxUp from epoch ``warmup`` on, nothing else."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.maxup_enabled = trainer.current_epoch >= self.warmup


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"bn_stats": "clean", "ramp_epochs": 0}, id="clean-during-warmup-only"),
    ],
)
def test_defaults_train_bit_exactly_as_before(options):
    """Defaults (and clean statistics while only warm-up steps run) change nothing in what is trained."""
    old, new = Lit(m=3, seed=5), Lit(m=3, seed=5)
    epochs = 2 if not options else 1
    _trainer(max_epochs=epochs, callbacks=[_OldSchedule(1)]).fit(old, _loader())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This fit never runs a MaxUp step")
        _trainer(max_epochs=epochs, callbacks=[MaxUp(warmup_epochs=1, **options)]).fit(new, _loader())
    ref, got = _params(old), _params(new)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs"


def test_state_dict_names_only_the_switch_options_that_differ():
    assert MaxUp(m=4).state_dict() == {"warmup_epochs": 5, "overrides": {"m": 4}}
    assert MaxUp(m=4, bn_stats="clean", ramp_epochs=2).state_dict() == {
        "warmup_epochs": 5,
        "overrides": {"m": 4},
        "ramp_epochs": 2,
        "bn_stats": "clean",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaxUp(m=4).load_state_dict({"warmup_epochs": 5, "overrides": {"m": 4}})  # a 0.3 checkpoint: no warning
    with pytest.warns(UserWarning, match="'bn_stats': 'clean'"):
        MaxUp(m=4).load_state_dict({"warmup_epochs": 5, "overrides": {"m": 4}, "bn_stats": "clean"})


# ---------------------------------------------------------------------------------------------------------------------
# The switch-on warning
# ---------------------------------------------------------------------------------------------------------------------
class _Jump(MaxUpMixin, pl.LightningModule):
    """A linear model whose loss is multiplied by ``jump`` once MaxUp runs with ``m > 1``.

    ``eval_jump`` multiplies the loss of eval-mode forwards (the selection pass) instead, and ``window`` limits the
    jump to the MaxUp steps ``start <= i < stop`` (counted from the first MaxUp step).
    """

    def __init__(self, jump: float = 1.0, eval_jump: float = 1.0, window: tuple[int, int] = (0, 10**9)) -> None:
        super().__init__(m=2, augment=GaussianNoise(0.05), seed=0)
        torch.manual_seed(0)
        self.net = nn.Linear(64, 3)
        self.jump, self.eval_jump, self.window = jump, eval_jump, window
        self.maxup_steps = 0

    def per_sample_loss(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.net(x.flatten(1)), y, reduction="none")
        if self.maxup_active_m == 1 or not self.window[0] <= self.maxup_steps < self.window[1]:
            return loss
        return loss * (self.jump if self.training else self.eval_jump)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.maxup_steps += int(self.maxup_active_m > 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _switch_warnings(model: pl.LightningModule, n: int = 48, **options) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(max_epochs=3, callbacks=[MaxUp(warmup_epochs=1, **options)]).fit(model, _loader(n=n))
    return [str(w.message) for w in caught if "switch-on" in str(w.message)]


def test_switch_warning_fires_once_on_a_jump_and_names_the_options():
    messages = _switch_warnings(_Jump(jump=5.0))
    assert len(messages) == 1
    for name in ("ramp_epochs", "bn_stats='clean'", "learning rate", "`switch_warning`=2.0", "training loss rose"):
        assert name in messages[0]
    assert "selection pass" not in messages[0]


def test_switch_warning_fires_on_the_selection_pass_loss():
    """The measured collapse: the trained loss looks normal, the eval-mode candidates' loss explodes."""
    messages = _switch_warnings(_Jump(eval_jump=50.0))
    assert len(messages) == 1
    assert "the selection pass's loss of the candidates" in messages[0]
    assert "training loss rose" not in messages[0]


@pytest.mark.parametrize(
    ("model", "options"),
    [
        pytest.param(lambda: _Jump(), {}, id="no-jump"),
        pytest.param(lambda: _Jump(jump=1.5), {}, id="below-threshold"),
        pytest.param(lambda: _Jump(eval_jump=8.0), {}, id="selection-below-threshold"),
        pytest.param(lambda: _Jump(jump=5.0), {"switch_warning": None}, id="off"),
        pytest.param(lambda: _Jump(jump=5.0), {"switch_warning": 10.0}, id="higher-threshold"),
        pytest.param(lambda: Lit(m=3), {}, id="real-maxup-run"),
    ],
)
def test_switch_warning_stays_quiet_without_a_jump(model, options):
    assert _switch_warnings(model(), **options) == []


@pytest.mark.parametrize(("window", "warns"), [((0, SWITCH_STEPS), True), ((SWITCH_STEPS, 10**9), False)])
def test_switch_warning_reads_the_first_switch_steps(window, warns):
    """Only the first SWITCH_STEPS MaxUp steps count: a jump in them warns, a jump right after them does not."""
    assert SWITCH_STEPS == 20
    messages = _switch_warnings(_Jump(jump=10.0, window=window), n=8 * (SWITCH_STEPS + 4))
    assert len(messages) == int(warns)


def _fit_syncs(batches: int, **options) -> int:
    model = Lit(m=3, seed=0)
    with SyncCounter() as counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(max_epochs=3, limit_train_batches=batches, callbacks=[MaxUp(warmup_epochs=1, **options)]).fit(
            model, _loader(n=96)
        )
    return len(counter.ops)


def test_switch_warning_and_clean_stats_add_no_per_step_sync():
    """One read per fit (at the end of the first MaxUp epoch), whatever the number of steps; none per step."""
    for batches in (3, 9):
        off = _fit_syncs(batches, switch_warning=None)
        assert _fit_syncs(batches) == off + 1
        assert _fit_syncs(batches, switch_warning=None, bn_stats="clean") == off


def test_switch_warning_changes_nothing_that_is_trained():
    """Watching the first MaxUp steps (maxup_record on for them) trains the same weights, and leaves it off."""
    watched, unwatched = Lit(m=3, seed=5), Lit(m=3, seed=5)
    _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1)]).fit(watched, _loader())
    _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1, switch_warning=None)]).fit(unwatched, _loader())
    ref, got = _params(unwatched), _params(watched)
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs"
    assert watched.maxup_record is False


def test_benchmark_report_pairs_by_seed_with_t_intervals(monkeypatch):
    """benchmarks/switch_on.py: its paired differences and intervals against scipy's, on made-up runs."""
    from pathlib import Path

    from scipy import stats

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    switch_on = importlib.import_module("switch_on")
    acc = {"m1": [0.6, 0.7, 0.8, 0.5], "maxup": [0.3, 0.75, 0.2, 0.45]}
    runs = {(v, s): switch_on.Run(v, s, val_acc=[0.1, a, a]) for v, values in acc.items() for s, a in enumerate(values)}
    diffs = [100 * (b - a) for a, b in zip(acc["m1"], acc["maxup"], strict=True)]
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    mean, half = switch_on.interval(diffs)
    assert mean == pytest.approx((low + high) / 2)
    assert half == pytest.approx((high - low) / 2)
    cell = switch_on._cell(runs, "maxup", "m1", 1, [0, 1, 2, 3])
    assert cell == f"{mean:+.1f} ± {half:.1f} (1/4)"
