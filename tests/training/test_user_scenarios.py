"""The library used the way a demanding Lightning user would: each test is one scenario that worked in review.

Every resume test compares every parameter and buffer with an uninterrupted twin (``torch.equal``), with a
resumable DataLoader so that Lightning restarts a mid-epoch checkpoint at the right batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.callbacks import EMAWeightAveraging, StochasticWeightAveraging
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import Compose, Cutout, GaussianNoise, RandomCrop
from lightning_maxup.core.batch import Candidates
from lightning_maxup.core.functional import maxup_step
from tests.trainer_options import quiet_trainer_options

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")

RESUME_WARNING = "ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"
# The interrupted half of a resume test stops early on purpose, sometimes within the warm-up.
STOPS_EARLY = "ignore:This fit never runs a MaxUp step:UserWarning"


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch (``state_dict``/``load_state_dict``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._seen = skip
        for i, b in enumerate(super().__iter__()):
            if i >= skip:
                self._seen += 1
                yield b

    def state_dict(self) -> dict[str, int]:
        return {"seen": self._seen % len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["seen"]


def _loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return ResumableLoader(ds, batch_size=batch_size, shuffle=False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))


class Lit(MaxUpMixin, pl.LightningModule):
    """A BatchNorm CNN on 8x8 images, MaxUp with crop and Cutout, a fixed seed."""

    def __init__(self, m: int = 3, momentum: float = 0.9, **kwargs: Any) -> None:
        kwargs.setdefault("seed", 1)
        super().__init__(m=m, augment=Compose([RandomCrop(8, padding=1), Cutout(3)]), **kwargs)
        self.net = _net()
        self.momentum = momentum

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


def _trainer_kwargs(**kwargs: Any) -> dict[str, Any]:
    return quiet_trainer_options(**{"max_epochs": 3, **kwargs})


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(**_trainer_kwargs(**kwargs))


def _assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diffs = {k: (sa[k].double() - sb[k].double()).abs().max().item() for k in sa if not torch.equal(sa[k], sb[k])}
    assert not diffs, f"largest differences: {diffs}"


def _checkpointed_run(tmp_path: Path, lightning: Any, module: Any, callbacks: list, **kw: Any) -> Path:
    """Fit ``module`` with a checkpoint after every optimizer step; ``lightning`` is the Trainer's namespace."""
    ckpt = lightning.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    lightning.Trainer(**_trainer_kwargs(enable_checkpointing=True, callbacks=[*callbacks, ckpt], **kw)).fit(
        module, _loader()
    )
    return tmp_path / "last.ckpt"


# ---------------------------------------------------------------------------------------------------------------
# 1 and 6. The `lightning.pytorch` namespace: fit, checkpoint, resume, load_from_checkpoint, weights_only
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings(RESUME_WARNING, STOPS_EARLY)
def test_lightning_pytorch_namespace_resumes_mid_warmup_exactly_and_loads_weights_only(tmp_path: Path) -> None:
    lightning_pytorch = pytest.importorskip("lightning.pytorch")

    class LitL(MaxUpMixin, lightning_pytorch.LightningModule):
        def __init__(self) -> None:
            super().__init__(m=3, augment=Compose([RandomCrop(8, padding=1), Cutout(3)]), seed=1)
            self.net = _net()

        def per_sample_loss(self, batch: Any) -> Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    trainer_cls = lightning_pytorch.Trainer
    full = LitL()
    trainer_cls(**_trainer_kwargs(callbacks=[MaxUp(warmup_epochs=2)])).fit(full, _loader())
    # Stop at step 9: mid-epoch, inside the warm-up (epoch 1 of 2).
    ckpt = _checkpointed_run(tmp_path, lightning_pytorch, LitL(), [MaxUp(warmup_epochs=2)], max_steps=9)

    raw = torch.load(ckpt, weights_only=True)  # the default in recent torch
    extra = raw["state_dict"]["_maxup_state._extra_state"]
    assert extra.dtype == torch.int64
    assert extra.tolist()[1:4] == [1, 1, 9]  # seed resolved, seed 1, nine draws made

    resumed = LitL()
    trainer_cls(**_trainer_kwargs(callbacks=[MaxUp(warmup_epochs=2)])).fit(resumed, _loader(), ckpt_path=str(ckpt))
    _assert_same_tensors(full, resumed)
    assert resumed._maxup_draws == full._maxup_draws == 18

    loaded = LitL.load_from_checkpoint(ckpt, weights_only=True)
    assert (loaded.maxup_config.seed, loaded._maxup_draws) == (1, 9)
    assert torch.equal(loaded.net[0].weight, raw["state_dict"]["net.0.weight"])


# ---------------------------------------------------------------------------------------------------------------
# 2. Gradient accumulation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings(RESUME_WARNING, STOPS_EARLY)
@pytest.mark.parametrize("stop", [pytest.param(3, id="mid-epoch-after-odd-step"), pytest.param(4, id="mid-epoch")])
def test_gradient_accumulation_advances_the_stream_per_micro_batch_and_resumes_exactly(
    tmp_path: Path, stop: int
) -> None:
    full = Lit()
    _trainer(accumulate_grad_batches=2, callbacks=[MaxUp(warmup_epochs=1)]).fit(full, _loader())
    assert full.global_step == 9  # 18 micro-batches, 9 optimizer steps
    assert full._maxup_draws == 18  # one draw per micro-batch

    ckpt = _checkpointed_run(tmp_path, pl, Lit(), [MaxUp(warmup_epochs=1)], accumulate_grad_batches=2,
                             max_steps=stop)  # fmt: skip
    assert torch.load(ckpt, weights_only=True)["state_dict"]["_maxup_state._extra_state"].tolist()[3] == 2 * stop

    resumed = Lit()
    _trainer(accumulate_grad_batches=2, callbacks=[MaxUp(warmup_epochs=1)]).fit(resumed, _loader(), ckpt_path=ckpt)
    _assert_same_tensors(full, resumed)


# ---------------------------------------------------------------------------------------------------------------
# 3. Weight averaging
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings(RESUME_WARNING)
def test_ema_weight_averaging_with_maxup_resumes_exactly_and_its_checkpoint_loads(tmp_path: Path) -> None:
    full = Lit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1), EMAWeightAveraging(decay=0.9)]).fit(full, _loader())

    ckpt = _checkpointed_run(tmp_path, pl, Lit(), [MaxUp(warmup_epochs=1), EMAWeightAveraging(decay=0.9)],
                             max_steps=9)  # fmt: skip
    raw = torch.load(ckpt, weights_only=True)
    # The averaged model's state_dict (with its own `_extra_state`) is the checkpoint's; the trained one rides along.
    assert raw["state_dict"].keys() == raw["current_model_state"].keys()
    assert raw["current_model_state"]["_maxup_state._extra_state"].tolist()[3] == 9

    resumed = Lit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1), EMAWeightAveraging(decay=0.9)]).fit(resumed, _loader(), ckpt_path=ckpt)
    _assert_same_tensors(full, resumed)

    averaged = Lit.load_from_checkpoint(ckpt, weights_only=True)
    assert torch.equal(averaged.net[4].weight, raw["state_dict"]["net.4.weight"])


def test_stochastic_weight_averaging_with_maxup_saves_and_loads(tmp_path: Path) -> None:
    model = Lit()
    trainer = _trainer(callbacks=[MaxUp(warmup_epochs=1), StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)])
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "swa.ckpt")
    loaded = Lit.load_from_checkpoint(tmp_path / "swa.ckpt", weights_only=True)
    _assert_same_tensors(model, loaded)  # the averaged weights, BatchNorm moments and the stream position


# ---------------------------------------------------------------------------------------------------------------
# 4. kill -9 mid-run
# ---------------------------------------------------------------------------------------------------------------
_CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
os.environ["OMP_NUM_THREADS"] = "1"
import torch
torch.set_num_threads(1)
import warnings
warnings.filterwarnings("ignore")
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from tests.training.test_user_scenarios import Lit, _loader, _trainer_kwargs
from lightning_maxup import MaxUp

out = {out!r}

class Stall(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == {kill_at}:  # the checkpoint of step {kill_at} is on disk
            open(os.path.join(out, "stalled"), "w").close()
            time.sleep(120)

ckpt = ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0, every_n_train_steps=1)
pl.Trainer(**_trainer_kwargs(enable_checkpointing=True, callbacks=[MaxUp(warmup_epochs=1), Stall(), ckpt])).fit(
    Lit(), _loader()
)
"""


@pytest.mark.slow
@pytest.mark.filterwarnings(RESUME_WARNING)
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD.format(root=root, out=str(tmp_path), kill_at=8)))
    errors = tmp_path / "child.err"
    with errors.open("wb") as err:
        child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "stalled").exists():
                assert child.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, "the child never reached the kill point"
                time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == -signal.SIGKILL

    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert raw["global_step"] == 8  # mid-epoch (epoch 1 of 3), MaxUp on
    full = Lit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1)]).fit(full, _loader())
    resumed = Lit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1)]).fit(resumed, _loader(), ckpt_path=tmp_path / "last.ckpt")
    _assert_same_tensors(full, resumed)


# ---------------------------------------------------------------------------------------------------------------
# 5. Manual optimisation
# ---------------------------------------------------------------------------------------------------------------
class ManualLit(Lit):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        out = self.maxup_step(batch)
        self.manual_backward(out.loss)
        opt.step()
        return out.loss.detach()


def test_manual_optimization_with_maxup_step_matches_automatic_optimization() -> None:
    automatic, manual = Lit(), ManualLit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1)]).fit(automatic, _loader())
    _trainer(callbacks=[MaxUp(warmup_epochs=1)]).fit(manual, _loader())
    assert manual.global_step == automatic.global_step == 18
    _assert_same_tensors(automatic, manual)


# ---------------------------------------------------------------------------------------------------------------
# 7. User code inside per_sample_loss: a metric, and self.log
# ---------------------------------------------------------------------------------------------------------------
class MetricLit(Lit):
    def __init__(self) -> None:
        super().__init__()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        self.counted: list[Tensor] = []
        self.gradient_pass_means: list[Tensor] = []

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        if not self.maxup_selecting:
            self.accuracy.update(logits, y)
            self.counted.append(y)
            self.gradient_pass_means.append(losses.mean().detach())
        self.log("per_sample_mean", losses.mean(), on_step=True, on_epoch=False)
        return losses


def test_metric_guarded_by_maxup_selecting_counts_trained_rows_and_self_log_warns_once() -> None:
    model = MetricLit()
    trainer = _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1)])
    dropped = r"self.log\('per_sample_mean'\) was called while MaxUp's selection pass"
    with pytest.warns(UserWarning, match=dropped) as rec:
        trainer.fit(model, _loader())
    assert sum("selection pass" in str(w.message) for w in rec) == 1
    # 2 epochs x 48 samples trained, nothing from the 3x candidate rows or the pre-flight
    assert int(model.accuracy.tp + model.accuracy.fn) == 96 == sum(len(y) for y in model.counted)
    # the value logged is the gradient pass's, not a candidate's
    assert torch.equal(trainer.callback_metrics["per_sample_mean"], model.gradient_pass_means[-1])


# ---------------------------------------------------------------------------------------------------------------
# 8. Trainer modes: fast_dev_run, max_steps within the warm-up, validate before fit, two fits
# ---------------------------------------------------------------------------------------------------------------
def test_fast_dev_run_runs_a_maxup_step_and_restores_the_options() -> None:
    model = Lit(m=3)
    model.maxup_record = True
    pl.Trainer(fast_dev_run=True, accelerator="cpu", devices=1, callbacks=[MaxUp(warmup_epochs=2, m=4)]).fit(
        model, _loader()
    )
    assert model.maxup_last_output is not None
    assert model.maxup_last_output.m == 4  # a MaxUp step, not the warm-up
    assert model.maxup_m == 3
    assert model.maxup_enabled


def test_max_steps_within_the_warmup_warns() -> None:
    with pytest.warns(UserWarning, match=r"`max_steps`=5 is reached within the 1 warm-up epochs \(6 optimizer steps\)"):
        _trainer(max_epochs=5, max_steps=5, callbacks=[MaxUp(warmup_epochs=1)]).fit(Lit(), _loader())


class ValidatedLit(Lit):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.per_sample_loss(batch).mean())


def test_validate_before_fit_leaves_the_options_alone_and_fit_restores_them() -> None:
    model = ValidatedLit()
    config = model.maxup_config
    trainer = _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1, m=5, chunk_size=7)])
    trainer.validate(model, _loader(), verbose=False)
    assert model.maxup_config is config
    assert model._maxup_draws == 0
    model.maxup_record = True
    trainer.fit(model, _loader(), _loader())
    assert model.maxup_last_output is not None
    assert model.maxup_last_output.m == 5
    assert model.maxup_config == config


def test_two_fits_with_different_trainers_continue_the_stream() -> None:
    """Two 1-epoch fits (plain SGD, so no optimizer state is lost between them) equal one 2-epoch fit."""
    once = Lit(momentum=0.0)
    _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=0)]).fit(once, _loader())
    twice = Lit(momentum=0.0)
    preflights = []
    original = twice.maxup_preflight
    twice.maxup_preflight = lambda batch: (preflights.append(1), original(batch))[1]  # type: ignore[method-assign]
    for _ in range(2):
        _trainer(max_epochs=1, callbacks=[MaxUp(warmup_epochs=0)]).fit(twice, _loader())
    assert len(preflights) == 2  # each Trainer checks its first batch
    assert twice._maxup_draws == once._maxup_draws == 12
    _assert_same_tensors(once, twice)


# ---------------------------------------------------------------------------------------------------------------
# 9. The functional step: premade Candidates, selection_temperature; torch.compile of the whole module
# ---------------------------------------------------------------------------------------------------------------
def test_functional_step_on_premade_candidates_matches_a_loop_over_copies() -> None:
    m, b = 3, 5
    net = nn.Linear(3, 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(m * b, 3, generator=g), torch.randn(m * b)

    def loss_fn(batch: Any) -> Tensor:
        return (net(batch[0]).squeeze(1) - batch[1]) ** 2

    out = maxup_step(loss_fn, Candidates((x, y), m), m=m, model=net)
    with torch.no_grad():
        for i in range(b):  # reference: sample i's copies are rows k * b + i
            per_copy = [float(loss_fn((x[k * b + i : k * b + i + 1], y[k * b + i : k * b + i + 1]))) for k in range(m)]
            worst = max(range(m), key=per_copy.__getitem__)
            assert int(out.selected[i]) == worst, (i, per_copy)
            assert torch.equal(out.batch[0][i], x[worst * b + i])
            assert abs(float(out.losses[i]) - per_copy[worst]) < 1e-6
    out.loss.backward()
    assert net.weight.grad is not None
    warm = maxup_step(loss_fn, Candidates((x, y), m), m=1, model=net)  # warm-up: copy 0
    assert torch.equal(warm.batch[0], x[:b])


@pytest.mark.parametrize("tau", [pytest.param(0.5, id="tau=0.5"), pytest.param(2.0, id="tau=2")])
def test_selection_temperature_draws_copies_with_softmax_frequencies(tau: float) -> None:
    n, levels = 20_000, torch.tensor([0.0, 1.0, 2.0])
    rows = levels.repeat_interleave(n)[:, None]  # copy k of every sample has loss levels[k]
    out = maxup_step(
        lambda batch: batch[0][:, 0],
        Candidates((rows, torch.zeros(3 * n)), 3),
        m=3,
        selection_temperature=tau,
        generator=torch.Generator().manual_seed(0),
    )
    freq = torch.bincount(out.selected, minlength=3).double() / n
    p = torch.softmax(levels.double() / tau, 0)
    tolerance = 5 * (p * (1 - p) / n).sqrt()  # five standard errors per copy
    assert bool(((freq - p).abs() < tolerance).all()), (freq.tolist(), p.tolist())


class CompiledLit(MaxUpMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__(m=3, augment=GaussianNoise(0.1), seed=1)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_fit_of_a_compiled_module_matches_eager_and_continues_the_stream() -> None:
    # Inductor compiled this in ~40 s on a 2-core CPU and matched eager to 1.5e-8; "eager" keeps the test fast.
    torch._dynamo.reset()
    eager = CompiledLit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1)]).fit(eager, _loader())
    model = CompiledLit()
    _trainer(callbacks=[MaxUp(warmup_epochs=1)]).fit(torch.compile(model, backend="eager"), _loader())
    assert model._maxup_draws == eager._maxup_draws == 18
    for name, p in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=1e-6)
