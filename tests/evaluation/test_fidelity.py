"""SelectionFidelity: the view's pick against the full input's, checked against a loop, and no effect on training."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpConfig, MaxUpMixin, SelectionMonitor
from lightning_maxup.augment import Compose, Cutout, RandomCrop
from lightning_maxup.core.functional import selection_losses
from lightning_maxup.evaluation.fidelity import SelectionFidelity, full_input_losses, has_shortcut, view_fidelity

M, B = 4, 8


def _reference_fidelity(view_losses: Tensor, full_losses: Tensor) -> tuple[float, float]:
    """Per sample: the view's arg-max, the full input's max; agreement and regret by a loop."""
    m, b = view_losses.shape
    agree, regret = 0, 0.0
    for i in range(b):
        pick = max(range(m), key=lambda j: (float(view_losses[j, i]), -j))  # first of the largest
        worst = max(float(full_losses[j, i]) for j in range(m))
        agree += float(full_losses[pick, i]) == worst
        regret += worst - float(full_losses[pick, i])
    return agree / b, regret / b


@pytest.mark.parametrize("m", [pytest.param(2, id="m2"), pytest.param(4, id="m4"), pytest.param(7, id="m7")])
def test_view_fidelity_matches_a_loop(m):
    g = torch.Generator().manual_seed(m)
    view, full = torch.randn(m, 50, generator=g), torch.randn(m, 50, generator=g)
    view[:, :5] = 0.0  # ties in the view go to the lowest copy, as select_worst breaks them
    fid = view_fidelity(view, full)
    agree, regret = _reference_fidelity(view, full)
    assert float(fid.agreement) == pytest.approx(agree, abs=1e-6)
    assert float(fid.regret) == pytest.approx(regret, abs=1e-5), f"largest error {abs(float(fid.regret) - regret)}"
    assert fid.chance == pytest.approx(1 / m)
    assert float(fid.regret) >= 0


def test_view_fidelity_without_a_view_is_perfect():
    losses = torch.randn(M, B)
    fid = view_fidelity(losses, losses.clone())
    assert float(fid.agreement) == 1.0
    assert float(fid.regret) == 0.0


def test_view_fidelity_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape \[m, B\], got \[4, 8\] and \[4, 7\]"):
        view_fidelity(torch.zeros(4, 8), torch.zeros(4, 7))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(16, 3),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(MaxUpConfig(m=M, selection_size=4), id="downsample"),
        pytest.param(MaxUpConfig(m=M, selection_dtype="bfloat16", selection_mode="train"), id="bf16-train"),
        pytest.param(MaxUpConfig(m=M, selection_size=4, chunk_size=5), id="chunked"),
    ],
)
def test_full_input_losses_match_a_loop_and_leave_the_model_untouched(config):
    net = Net()
    g = torch.Generator().manual_seed(1)
    candidates = (torch.rand(M * B, 1, 8, 8, generator=g), torch.randint(0, 3, (M * B,), generator=g))
    before = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()

    def loss_fn(batch: Any) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    got = full_input_losses(loss_fn, candidates, config, model=net)
    assert got.dtype == torch.float32
    assert net.training  # the mode is back
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    if config.selection_mode == "eval":  # a loop over rows, one forward each, in eval mode and float32
        net.eval()
        with torch.no_grad():
            ref = torch.stack([loss_fn((candidates[0][r : r + 1], candidates[1][r : r + 1]))[0] for r in range(M * B)])
        net.train()
        assert torch.allclose(got, ref, atol=1e-5), f"largest error {(got - ref).abs().max()}"
    # Without the view and in full precision, the selection pass scores exactly this.
    plain = config.replace(selection_size=None, selection_view=None, selection_dtype=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        same = selection_losses(loss_fn, candidates, plain, model=net)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        again = full_input_losses(loss_fn, candidates, config, model=net)
    assert torch.equal(same, again)
    assert float(view_fidelity(same.view(M, B), again.view(M, B)).agreement) == 1.0


def test_has_shortcut():
    assert not has_shortcut(MaxUpConfig(m=2))
    assert not has_shortcut(MaxUpConfig(m=2, selection_memory_format="channels_last"))
    assert has_shortcut(MaxUpConfig(m=2, selection_size=4))
    assert has_shortcut(MaxUpConfig(m=2, selection_dtype="float16"))
    assert has_shortcut(MaxUpConfig(m=2), "16-mixed")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"every_n_steps": 0}, r"`every_n_steps` to be a positive integer, got 0", id="every"),
        pytest.param({"warn_margin": -0.1}, r"`warn_margin` to be a positive finite number, got -0.1", id="margin"),
        pytest.param({"window": 1.5}, r"`window` to be a positive integer, got 1.5", id="window"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionFidelity(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Inside a Trainer
# ---------------------------------------------------------------------------------------------------------------


def _noise_view(batch: Any) -> Any:
    """A view that keeps nothing of the image: its pick is independent of the full input's."""
    x, y = batch
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(int(x.sum() * 1000) % 2**31)), y


def _identity_view(batch: Any) -> Any:
    return batch


class Lit(MaxUpMixin, pl.LightningModule):
    def __init__(self, **options: Any) -> None:
        options.setdefault("selection_size", 4)
        super().__init__(m=M, augment=Compose([RandomCrop(8, padding=1), Cutout(3)]), seed=0, **options)
        self.net = Net()

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader(n: int = 48, batch: int = B) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=batch, shuffle=False)


def _fit(model: pl.LightningModule, tmp_path: Path, callbacks: list, epochs: int = 2, loader=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader or _loader())
    return trainer


class Capturing(SelectionFidelity):
    """Keeps each check's candidates, view losses, the parameters the selection saw and the logged values."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[Any, Tensor, dict[str, Tensor], float, float]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.state = copy.deepcopy(pl_module.state_dict())  # what the selection pass will see
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        checking, out, state = self._checking, pl_module.maxup_last_output, self.state
        super().on_after_backward(trainer, pl_module)
        if checking and out is not None:
            assert self.last is not None
            self.seen.append(
                (out.candidates, out.candidate_losses, state, float(self.last.agreement), float(self.last.regret))
            )


def test_logged_agreement_and_regret_match_a_loop_in_training(tmp_path):
    model = Lit()
    fidelity = Capturing(every_n_steps=2)
    trainer = _fit(model, tmp_path, [fidelity])
    assert len(fidelity.seen) == 6  # 12 steps, every 2nd checked
    assert {"maxup/view_agreement", "maxup/view_regret", "maxup/view_chance"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["maxup/view_chance"]) == pytest.approx(1 / M)
    reference = Lit()
    for candidates, view_losses, state, agreement, regret in fidelity.seen:
        reference.load_state_dict(state)
        reference.eval()
        with torch.no_grad():  # one row at a time, full resolution, float32
            full = torch.stack(
                [
                    reference.per_sample_loss((candidates[0][r : r + 1], candidates[1][r : r + 1]))[0]
                    for r in range(M * B)
                ]
            ).view(M, B)
        ref_agreement, ref_regret = _reference_fidelity(view_losses, full)
        assert agreement == pytest.approx(ref_agreement, abs=1e-6)
        assert regret == pytest.approx(ref_regret, abs=1e-5), f"largest error {abs(regret - ref_regret)}"


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain = Lit()
    _fit(plain, tmp_path / "a", [MaxUp(warmup_epochs=1)], epochs=3)
    checked = Lit()
    fidelity = SelectionFidelity(every_n_steps=1)
    _fit(checked, tmp_path / "b", [MaxUp(warmup_epochs=1), fidelity], epochs=3)
    assert fidelity.last is not None
    for (name, a), (_, b) in zip(plain.state_dict().items(), checked.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name}: largest difference {(a.float() - b.float()).abs().max()}"
    assert checked.maxup_record is False


def test_nothing_happens_without_a_shortcut(tmp_path):
    model = Lit(selection_size=None)
    fidelity = Capturing(every_n_steps=1)
    trainer = _fit(model, tmp_path, [fidelity], epochs=1)
    assert fidelity.seen == []
    assert fidelity.last is None
    assert "maxup/view_agreement" not in trainer.callback_metrics
    assert model.maxup_record is False


def _fit_warnings(model: Lit, tmp_path: Path, fidelity: SelectionFidelity) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, tmp_path, [fidelity], epochs=1, loader=_loader(n=320, batch=32))
    return [str(w.message) for w in caught if "selection view agrees" in str(w.message)]


def test_warns_once_on_a_view_of_pure_noise(tmp_path):
    # 10 checks of 32 samples: agreement is Binomial(32, 1/4) / 32 per check, so the mean over a window of 5
    # (160 samples) has standard deviation 0.034; the threshold 1/4 + 0.15 is 4.4 of them above chance.
    fidelity = SelectionFidelity(every_n_steps=1, warn_margin=0.15, window=5)
    caught = _fit_warnings(Lit(selection_size=None, selection_view=_noise_view), tmp_path, fidelity)
    assert len(caught) == 1, caught
    assert fidelity.warned


def test_does_not_warn_on_a_faithful_view(tmp_path):
    fidelity = SelectionFidelity(every_n_steps=1, warn_margin=0.15, window=5)
    caught = _fit_warnings(Lit(selection_size=None, selection_view=_identity_view), tmp_path, fidelity)
    assert caught == []
    assert fidelity.last is not None
    assert float(fidelity.last.agreement) == 1.0
    assert float(fidelity.last.regret) == 0.0


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-first", "fidelity-first"])
def test_with_the_selection_monitor_in_either_order(tmp_path, monitor_first):
    model = Lit()
    fidelity = Capturing(every_n_steps=2)
    monitor = SelectionMonitor(every_n_steps=3)
    _fit(model, tmp_path, [monitor, fidelity] if monitor_first else [fidelity, monitor])
    assert len(fidelity.seen) == 6
    assert len(monitor.gap_history) == 4
    assert model.maxup_record is False


def test_state_dict_round_trip():
    fidelity = SelectionFidelity(window=3)
    for a in (0.3, 0.25, 0.9, 0.5):
        fidelity._observe(a, 0.25, 4)
    restored = SelectionFidelity(window=3)
    restored.load_state_dict(fidelity.state_dict())
    assert list(restored.history) == list(fidelity.history) == [(0.25, 0.25), (0.9, 0.25), (0.5, 0.25)]
    assert restored.warned is fidelity.warned is False


def test_needs_a_maxup_module(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(64, 3)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="needs a LightningModule that subclasses MaxUpMixin, got Plain"):
        _fit(Plain(), tmp_path, [SelectionFidelity()], epochs=1)
