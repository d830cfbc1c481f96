"""Frozen normalisation layers for MaxUp fine-tuning, and torchvision backbones from local weights."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp
from lightning_maxup.augment import Compose, Cutout, GaussianNoise
from lightning_maxup.recipes.finetune import (
    FreezeNormalization,
    freeze_normalization,
    normalization_layers,
    torchvision_model,
)
from lightning_maxup.recipes.models import MaxUpClassifier, SmallCNN

# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _loaders(n: int = 48, batch: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(TensorDataset(x[:16], y[:16]), 8)


def _model(selection_mode: str = "eval", optimizer: str = "sgd") -> MaxUpClassifier:
    torch.manual_seed(0)
    backbone = SmallCNN(1, 4, width=4)
    model = MaxUpClassifier(
        backbone, num_classes=4, m=3, augment=Compose([GaussianNoise(0.3), Cutout(3)]), optimizer=optimizer,
        lr=0.1, weight_decay=1e-2, selection_mode=selection_mode, seed=0,
    )  # fmt: skip
    # Pretend the network was pretrained: running statistics away from their initial 0 / 1.
    with torch.no_grad():
        for i, bn in enumerate(normalization_layers(model)):
            assert isinstance(bn, _NormBase)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(100 + i)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def _norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for i, mod in enumerate(normalization_layers(model)):
        out.update({f"{i}.{k}": v.detach().clone() for k, v in mod.state_dict().items()})
    return out


def _other_params(model: nn.Module) -> dict[str, torch.Tensor]:
    norm_ids = {id(p) for mod in normalization_layers(model) for p in mod.parameters(recurse=False)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in norm_ids}


class _NormModeProbe(pl.Callback):
    """Records, at every training step, whether any normalisation layer was in train mode."""

    def __init__(self) -> None:
        self.any_norm_training: list[bool] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.any_norm_training.append(any(m.training for m in normalization_layers(pl_module)))


def _fit(model: MaxUpClassifier, callbacks: list[pl.Callback], tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    train, val = _loaders()
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, val_check_interval=2, accelerator="cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, **kwargs,
    )  # fmt: skip
    trainer.fit(model, train, val)
    return trainer


# --------------------------------------------------------------------------------------------------------------------
# FreezeNormalization through a MaxUp fit
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selection_mode", "optimizer"),
    [pytest.param("eval", "sgd", id="eval-selection-sgd"), pytest.param("train", "adam", id="train-selection-adam")],
)
def test_freeze_normalization_keeps_norm_layers_bit_identical(
    tmp_path: Path, selection_mode: str, optimizer: str
) -> None:
    model = _model(selection_mode, optimizer)
    norms_before, others_before = _norm_state(model), _other_params(model)
    probe = _NormModeProbe()
    # Two epochs with validation mid-epoch: Lightning calls model.train() after each, the callback re-freezes.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(model, [MaxUp(warmup_epochs=0), FreezeNormalization(), probe], tmp_path)
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]
    assert trainer.global_step == 6
    assert probe.any_norm_training == [False] * 6

    norms_after = _norm_state(model)
    assert norms_after.keys() == norms_before.keys()
    assert any(k.endswith("running_var") for k in norms_after)
    changed = [k for k in norms_before if not torch.equal(norms_before[k], norms_after[k])]
    assert changed == [], f"normalisation state changed: {changed}"

    others_after = _other_params(model)
    moved = {k: (others_after[k] - v).abs().max().item() for k, v in others_before.items()}
    assert all(d > 0 for d in moved.values()), f"parameters that did not train: {moved}"

    # No gradient, so the optimizer keeps no state (momentum, Adam moments) for the frozen parameters.
    opt = trainer.optimizers[0]
    for mod in normalization_layers(model):
        for p in mod.parameters(recurse=False):
            assert not p.requires_grad
            assert p.grad is None
            assert not opt.state.get(p)
    assert all(opt.state.get(p) for p in model.parameters() if p.requires_grad)


def test_without_the_callback_norm_layers_train(tmp_path: Path) -> None:
    # Control for the test above: the same fit without FreezeNormalization moves every part of the norm state.
    model = _model()
    before = _norm_state(model)
    _fit(model, [MaxUp(warmup_epochs=0)], tmp_path)
    after = _norm_state(model)
    for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        keys = [k for k in before if k.endswith(suffix)]
        assert keys
        assert all(not torch.equal(before[k], after[k]) for k in keys), suffix


def test_freeze_normalization_survives_resume(tmp_path: Path) -> None:
    model = _model()
    before = _norm_state(model)
    ckpt = tmp_path / "mid.ckpt"
    trainer = _fit(model, [MaxUp(warmup_epochs=0), FreezeNormalization()], tmp_path, max_steps=2)
    trainer.save_checkpoint(ckpt)
    resumed = _model()
    train, val = _loaders()
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[MaxUp(warmup_epochs=0), FreezeNormalization()],
    )  # fmt: skip
    trainer.fit(resumed, train, val, ckpt_path=ckpt)
    assert trainer.global_step > 2
    after = _norm_state(resumed)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------------------------------
# The plain function and the callback's arguments
# --------------------------------------------------------------------------------------------------------------------


def _mixed_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True,
        track_running_stats=True), nn.Flatten(), nn.LayerNorm(4 * 6 * 6), nn.Linear(4 * 6 * 6, 2),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("layers", "frozen_types"),
    [
        pytest.param("running_stats", {nn.BatchNorm2d, nn.InstanceNorm2d}, id="running-stats"),
        pytest.param("all", {nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm}, id="all"),
    ],
)
def test_freeze_normalization_function(layers: Any, frozen_types: set[type]) -> None:
    net = _mixed_net()
    frozen = freeze_normalization(net, layers)
    assert {type(m) for m in frozen} == frozen_types
    for mod in net:
        is_frozen = type(mod) in frozen_types
        assert mod.training is not is_frozen or type(mod) in (nn.Flatten,)
        for p in mod.parameters(recurse=False):
            assert p.requires_grad is not is_frozen
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    assert int(net[1].num_batches_tracked) == 0
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert net[0].weight.grad is not None
    assert net[1].weight.grad is None


def test_freeze_normalization_is_undone_by_train() -> None:
    # Documented: train() restores train mode (the callback re-applies it); parameters stay frozen.
    net = _mixed_net()
    freeze_normalization(net)
    net.train()
    assert net[1].training
    assert not net[1].weight.requires_grad


@pytest.mark.parametrize("bad", ["batchnorm", "", None])
def test_bad_layers_raise(bad: Any) -> None:
    with pytest.raises(ValueError, match="Expected `layers` to be 'running_stats' or 'all', got"):
        FreezeNormalization(layers=bad)
    with pytest.raises(ValueError, match="Expected `layers` to be 'running_stats' or 'all', got"):
        freeze_normalization(nn.BatchNorm1d(2), layers=bad)


def test_warns_when_nothing_to_freeze(tmp_path: Path) -> None:
    model = MaxUpClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), num_classes=4, m=2, augment=GaussianNoise(0.1), seed=0
    )
    with pytest.warns(UserWarning, match="found no normalisation layer"):
        _fit(model, [FreezeNormalization()], tmp_path, max_steps=1)


def test_state_dict_roundtrip_and_mismatch_warning() -> None:
    cb = FreezeNormalization("all")
    assert cb.state_dict() == {"layers": "all"}
    FreezeNormalization("all").load_state_dict(cb.state_dict())
    with pytest.warns(UserWarning, match="saved with layers='all' and resumes with layers='running_stats'"):
        FreezeNormalization().load_state_dict(cb.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# torchvision backbones
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [pytest.param(None, id="state-dict"), pytest.param("state_dict", id="wrapped")])
def test_torchvision_model_loads_local_checkpoint_and_replaces_head(tmp_path: Path, wrap: str | None) -> None:
    torch.manual_seed(0)
    pretrained = torchvision_model("resnet18")
    path = tmp_path / "resnet18.pth"
    state = pretrained.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)

    same = torchvision_model("resnet18", num_classes=1000, checkpoint=str(path))
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in state.items())

    new_head = torchvision_model("resnet18", num_classes=10, checkpoint=str(path))
    assert new_head.fc.out_features == 10
    body = {k: v for k, v in new_head.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(v, state[k]) for k, v in body.items())


def test_torchvision_model_loads_checkpoint_with_other_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "r18_10.pth"
    torch.save(torchvision_model("resnet18", num_classes=10).state_dict(), path)
    assert torchvision_model("resnet18", num_classes=10, checkpoint=str(path)).fc.out_features == 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"name": "resnet5000"}, "Expected `name` to be a torchvision classification model", id="name"),
        pytest.param(
            {"name": "resnet18", "weights": "IMAGENET1K_V1", "checkpoint": "x.pth"},
            "Expected only one of `weights` and `checkpoint`", id="both",
        ),
        pytest.param({"name": "resnet18", "weights": "IMAGENET9K"}, "Expected `weights` to be one of", id="weights"),
        pytest.param({"name": "resnet18", "num_classes": 0}, "Expected `num_classes` to be a positive", id="classes"),
    ],
)  # fmt: skip
def test_torchvision_model_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        torchvision_model(**kwargs)
