"""MaxUpMixin and the MaxUp callback inside a real Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import Compose, Cutout, GaussianNoise, RandomCrop
from lightning_maxup.core.random import mix_seed
from tests.trainer_options import quiet_trainer_options

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


class Lit(MaxUpMixin, pl.LightningModule):
    """A small BatchNorm CNN that records, for every step, how many rows each forward saw."""

    def __init__(self, m: int = 3, augment=None, **kwargs) -> None:
        augment = augment if augment is not None else Compose([RandomCrop(8, padding=1), Cutout(3)])
        super().__init__(m=m, augment=augment, **kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
        )
        self.forwards: list[tuple[int, int, bool]] = []  # (epoch, rows, grad)

    def per_sample_loss(self, batch):
        x, y = batch
        self.forwards.append((self.current_epoch, x.shape[0], torch.is_grad_enabled()))
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch (it implements ``state_dict``/``load_state_dict``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._seen = skip
        for i, b in enumerate(super().__iter__()):
            if i >= skip:
                self._seen += 1
                yield b

    def state_dict(self):
        return {"seen": self._seen % len(self)}

    def load_state_dict(self, state):
        self._skip = state["seen"]


def _loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return ResumableLoader(ds, batch_size=batch_size, shuffle=False)


def _trainer(tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    return pl.Trainer(**quiet_trainer_options(tmp_path, **kwargs))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_mixin_without_callback_runs_maxup_from_the_first_step():
    model = Lit(m=3)
    _trainer(max_epochs=1).fit(model, _loader())
    preflight, first_step = model.forwards[:1], model.forwards[1:3]
    assert preflight == [(0, 24, False)]  # the first batch's 3 x 8 candidates through the selection pass
    assert first_step == [(0, 24, False), (0, 8, True)]
    assert sum(1 for f in model.forwards[1:] if not f[2]) == 6  # one selection forward per step


def test_callback_warms_up_then_runs_maxup_with_its_m():
    model = Lit(m=3)
    _trainer(max_epochs=3, callbacks=[MaxUp(warmup_epochs=2, m=5)]).fit(model, _loader())
    assert model.forwards[:1] == [(0, 40, False)], "the pre-flight check runs during warm-up, with the MaxUp m"
    for epoch in range(3):
        rows = [(r, g) for e, r, g in model.forwards[1:] if e == epoch]
        if epoch < 2:
            assert rows == [(8, True)] * 6, f"epoch {epoch} must be ordinary augmentation"
        else:
            assert rows == [(40, False), (8, True)] * 6, f"epoch {epoch} must run MaxUp with m=5"


def test_callback_sets_selection_size():
    model = Lit(m=2)
    model.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    shapes = []
    model.net.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape[-2:])))
    _trainer(max_epochs=1, limit_train_batches=1, callbacks=[MaxUp(warmup_epochs=0, selection_size=4)]).fit(
        model, _loader()
    )
    assert shapes == [(4, 4), (4, 4), (8, 8)]  # pre-flight through the 4 px view, then the step


def test_logs_worst_loss_mean_loss_and_selection_share():
    model = Lit(m=4)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, _loader())
    metrics = trainer.callback_metrics
    for key in ("maxup/worst_loss", "maxup/mean_loss", "maxup/gap", "maxup/selection_share", "maxup/m"):
        assert key in metrics, f"{key} not logged; got {sorted(metrics)}"
        if key != "maxup/m":
            assert f"{key}_epoch" in metrics, f"{key}_epoch not logged; got {sorted(metrics)}"
    share = float(metrics["maxup/selection_share"])
    assert 0.0 < share < 1.0
    assert float(metrics["maxup/m"]) == 4.0


def test_same_seed_same_run_different_seed_different_run():
    def run(seed: int) -> dict[str, torch.Tensor]:
        pl.seed_everything(seed, verbose=False)
        model = Lit(m=3, augment=GaussianNoise(0.5))
        _trainer(max_epochs=1).fit(model, _loader())
        return _params(model)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_generator_is_seeded_per_rank_and_per_step():
    model = Lit(m=2, seed=7)
    g0 = model.maxup_generator(torch.device("cpu")).initial_seed()
    g1 = model.maxup_generator(torch.device("cpu")).initial_seed()
    model._maxup_rank = lambda: 1  # type: ignore[method-assign]
    model._maxup_draws = 0
    g0_rank1 = model.maxup_generator(torch.device("cpu")).initial_seed()
    assert g0 == mix_seed(7, 0, 0)
    assert g1 == mix_seed(7, 0, 1)
    assert g0_rank1 == mix_seed(7, 1, 0)
    assert len({g0, g1, g0_rank1}) == 3


class _Recorder(Callback):
    def __init__(self) -> None:
        self.m: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.m.append((trainer.current_epoch, pl_module.maxup_active_m))


# The interrupted leg stops inside the warm-up on purpose, and resumes without its checkpoint callback.
@pytest.mark.filterwarnings("ignore:This fit never runs a MaxUp step")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.parametrize(
    "stop",
    [
        pytest.param({"max_epochs": 1}, id="mid-warmup-epoch-boundary"),
        pytest.param({"max_steps": 9}, id="mid-warmup-mid-epoch"),
        pytest.param({"max_steps": 15}, id="after-warmup-mid-epoch"),
    ],
)
def test_resume_matches_uninterrupted_run(tmp_path, stop):
    epochs = 4

    def callbacks():
        return [MaxUp(warmup_epochs=2, m=3), _Recorder()]

    pl.seed_everything(0, verbose=False)
    full = Lit(m=3, seed=11)
    full_cbs = callbacks()
    _trainer(max_epochs=epochs, callbacks=full_cbs).fit(full, _loader())

    pl.seed_everything(0, verbose=False)
    first = Lit(m=3, seed=11)
    # Saving after every step makes last.ckpt a mid-epoch checkpoint when training stops mid-epoch.
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = _trainer(
        tmp_path, callbacks=[*callbacks(), ckpt], enable_checkpointing=True, **{"max_epochs": epochs, **stop}
    )
    trainer.fit(first, _loader())

    pl.seed_everything(123, verbose=False)  # a different global seed must not matter: the stream is in the checkpoint
    resumed = Lit(m=3, seed=None)
    resumed_cbs = callbacks()
    _trainer(max_epochs=epochs, callbacks=resumed_cbs).fit(resumed, _loader(), ckpt_path=str(tmp_path / "last.ckpt"))

    steps_done = trainer.global_step
    assert resumed_cbs[1].m == full_cbs[1].m[steps_done:], "the schedule after resuming differs"
    ref, got = _params(full), _params(resumed)
    for k in ref:
        err = (ref[k].float() - got[k].float()).abs().max()
        assert err == 0, f"{k} differs by {err} after resuming at step {steps_done}"


def test_m_is_validated_at_construction():
    with pytest.raises(ValueError, match="Expected `m` to be a positive integer, got 0"):
        Lit(m=0)
    with pytest.raises(ValueError, match="Expected `m` to be a positive integer, got 2.0"):
        Lit(m=2.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"augment": 3}, TypeError, "Expected `augment` to be callable", id="augment"),
        pytest.param({"selection_mode": "fast"}, ValueError, "`selection_mode`.*got 'fast'", id="mode"),
        pytest.param({"chunk_size": 0}, ValueError, "`chunk_size`.*got 0", id="chunk"),
        pytest.param({"selection_size": 1.5}, ValueError, "`selection_size`.*got 1.5", id="size"),
        pytest.param({"seed": "x"}, ValueError, "`seed`.*got 'x'", id="seed"),
        pytest.param({"selection_view": 1}, TypeError, "`selection_view`", id="view"),
    ],
)
def test_mixin_arguments_are_validated_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Lit(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"warmup_epochs": -1}, "Expected `warmup_epochs` to be a non-negative integer, got -1", id="warm"),
        pytest.param({"m": 0}, "Expected `m` to be a positive integer, got 0", id="m"),
        pytest.param({"selection_size": 0}, "Expected `selection_size` to be a positive integer or None", id="size"),
    ],
)
def test_callback_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaxUp(**kwargs)


class Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 3)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_needs_the_mixin_before_training():
    model = Plain()
    with pytest.raises(TypeError, match="subclasses MaxUpMixin, got Plain"):
        _trainer(callbacks=[MaxUp()]).fit(model, _loader())


class NoLoss(MaxUpMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__(m=2)
        self.net = nn.Linear(64, 3)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_missing_per_sample_loss_fails_before_the_first_step():
    with pytest.raises(NotImplementedError, match="NoLoss must implement `per_sample_loss"):
        _trainer().fit(NoLoss(), _loader())


class MeanLoss(Lit):
    def per_sample_loss(self, batch):
        return super().per_sample_loss(batch).mean()


def test_scalar_per_sample_loss_names_the_hook():
    with pytest.raises(ValueError, match=r"`per_sample_loss` must return a 1-D tensor .*got shape \[\]"):
        _trainer().fit(MeanLoss(m=2), _loader())


class Shrink:
    def __call__(self, batch, generator=None):
        return batch[0][:-1], batch[1][:-1]


def test_augmentation_that_changes_the_batch_size_fails_on_the_first_step():
    model = Lit(m=2, augment=Shrink())
    with pytest.raises(ValueError, match="`augment` must keep the number of rows"):
        _trainer().fit(model, _loader())
    assert model.global_step == 0


def test_checkpoint_holds_the_augmentation_stream(tmp_path):
    model = Lit(m=2, seed=5)
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, _loader())
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    version, resolved, seed, draws, _ = ckpt["state_dict"]["_maxup_state._extra_state"].tolist()
    assert (version, resolved, seed, draws) == (2, 1, 5, 6)


class NoAugment(Lit):
    def __init__(self) -> None:
        super().__init__(m=2)
        self.maxup_config = self.maxup_config.replace(augment=None)


def test_maxup_without_augmentation_warns_once():
    with pytest.warns(UserWarning, match="`m`=2 but `augment` is None") as record:
        _trainer(max_epochs=1).fit(NoAugment(), _loader())
    assert sum("augment` is None" in str(w.message) for w in record) == 1
