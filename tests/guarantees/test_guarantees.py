"""Guarantees that hold where users train: what the selection pass shows the user's code, state that survives
hook overrides without ``super()``, and the Lightning features users combine with MaxUp (compile, the LR finder,
evaluation-only Trainers, barebones, reduced precision, dict batches)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.tuner import Tuner
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpConfig, MaxUpMixin, Shared
from lightning_maxup.augment import Compose, Cutout, GaussianNoise, RandomCrop
from lightning_maxup.certify import SmoothAdvClassifier
from lightning_maxup.core.batch import Candidates, expand_copies
from lightning_maxup.core.config import option_names
from lightning_maxup.core.functional import check_per_sample, maxup_step
from lightning_maxup.training._options import _Option
from lightning_maxup.training._stream_state import repeat_counts as _repeat_counts
from tests.trainer_options import quiet_trainer_options


def _data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _trainer(tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(**quiet_trainer_options(tmp_path, **kwargs))


class Net(MaxUpMixin, pl.LightningModule):
    """A small BatchNorm/Dropout CNN; records what ``per_sample_loss`` saw and when."""

    def __init__(self, m: int = 3, **kwargs: Any) -> None:
        kwargs.setdefault("augment", Compose([RandomCrop(8, padding=1), Cutout(3)]))
        super().__init__(m=m, **kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 3),
        )  # fmt: skip
        self.calls: list[tuple[bool, int]] = []  # (maxup_selecting, rows)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        self.calls.append((self.maxup_selecting, int(x.shape[0])))
        return F.cross_entropy(self(x), y, reduction="none")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# What the user's code sees during selection
# ----------------------------------------------------------------------------------------------------------------------
class Counting(Net):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        self.logged_during_selection = 0

    def per_sample_loss(self, batch: Any) -> Tensor:
        logits = self(batch[0])
        if not self.maxup_selecting:  # the documented way to count only the trained rows
            self.acc.update(logits, batch[1])
        self.log("inside_loss", logits.mean())  # dropped (with one warning) during selection
        return F.cross_entropy(logits, batch[1], reduction="none")


def test_per_sample_loss_can_tell_candidates_from_trained_rows() -> None:
    model = Counting(m=4)
    with pytest.warns(UserWarning, match="self.log\\('inside_loss'\\) was called while MaxUp's selection") as rec:
        _trainer(max_epochs=1, limit_train_batches=2).fit(model)
    assert sum("inside_loss" in str(w.message) for w in rec) == 1, "the warning comes once"
    assert int(model.acc.total if hasattr(model.acc, "total") else model.acc.tp + model.acc.fn) == 16
    assert "inside_loss" in _trainer_metrics(model), "calls outside selection are logged as usual"


def _trainer_metrics(model: pl.LightningModule) -> dict[str, Any]:
    return dict(model.trainer.callback_metrics)


def test_selecting_flag_marks_every_selection_and_preflight_call() -> None:
    model = Net(m=3)
    _trainer(max_epochs=1, limit_train_batches=2).fit(model)
    # pre-flight (24 candidate rows), then per step: selection (24 rows) and the gradient forward (8 rows).
    assert model.calls == [(True, 24), (True, 24), (False, 8), (True, 24), (False, 8)]
    assert model.maxup_selecting is False


class DropoutProbe(MaxUpMixin, pl.LightningModule):
    """Dropout on constant inputs: each row's output is its dropout mask."""

    def __init__(self) -> None:
        super().__init__(m=2, augment=GaussianNoise(1e-6), selection_mode="train", seed=3)
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.ones(()))
        self.masks: list[tuple[bool, Tensor]] = []

    def per_sample_loss(self, batch: Any) -> Tensor:
        out = self.drop(torch.ones(batch[0].shape[0], 256)) * self.w
        self.masks.append((self.maxup_selecting, (out != 0).clone()))
        return out.mean(1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(8), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_train_mode_selection_draws_dropout_masks_of_its_own_and_replays() -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        model = DropoutProbe()
        _trainer(max_epochs=1).fit(model)
        runs.append(model.masks)
    selection = [m for s, m in runs[0] if s][1]  # [0] is the pre-flight; [1] the step's selection pass
    gradient = [m for s, m in runs[0] if not s][0]
    # Before 0.3 the selection's copy 0 drew exactly the gradient pass's masks (the RNG was rewound).
    assert not torch.equal(selection[:8], gradient), "selection copy 0 reused the gradient pass's dropout masks"
    agree = (selection[:8] == gradient).float().mean()
    assert abs(float(agree) - 0.5) < 0.05, f"masks should agree like independent draws (~50 %), got {agree:.3f}"
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs[0], runs[1], strict=True)), "a run must replay"


# ----------------------------------------------------------------------------------------------------------------------
# State that survives hook overrides without super()
# ----------------------------------------------------------------------------------------------------------------------
class NoSuper(Net):
    """Every hook the mixin used to need, overridden as Lightning's docs write them: no super()."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seeds: list[int] = []

    def on_fit_start(self) -> None:
        pass

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mine"] = 1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert checkpoint["mine"] == 1

    def maxup_generator(self, device: torch.device) -> torch.Generator:
        g = super().maxup_generator(device)
        self.seeds.append(g.initial_seed())
        return g


def test_resume_is_exact_when_hooks_do_not_call_super(tmp_path: Path) -> None:
    full = NoSuper(m=3, seed=4)
    _trainer(max_epochs=4, callbacks=[MaxUp(warmup_epochs=1)]).fit(full)

    first = NoSuper(m=3, seed=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[MaxUp(warmup_epochs=1), ckpt]).fit(first)
    resumed = NoSuper(m=3)  # no seed: it must come from the checkpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[MaxUp(warmup_epochs=1), ckpt])
    trainer.fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))

    assert first.seeds + resumed.seeds == full.seeds, "the augmentation stream must go on where it stopped"
    after, expected = _params(resumed), _params(full)
    worst = max(float((after[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert worst == 0.0, f"resumed parameters differ by {worst}"


def test_checkpoint_from_before_0_3_restores_the_stream() -> None:
    model = Net(m=2)
    state = _params(model)
    del state["_maxup_state._extra_state"]
    checkpoint = {"state_dict": state, "lightning_maxup": {"seed": 9, "draws": 5, "nominal_rows": 8}}
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    assert (model.maxup_seed, model._maxup_draws, model._maxup_agreed_rows) == (9, 5, 8)
    bare = Net(m=2)
    bare.load_state_dict(
        {k: v for k, v in _params(model).items() if not k.endswith("_extra_state")}
    )  # strict: no error


class OwnExtraState(NoSuper):
    """A module saving a non-tensor counter of its own through ``get_extra_state``/``set_extra_state``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs_seen = 0

    def on_train_epoch_end(self) -> None:
        self.epochs_seen += 1

    def get_extra_state(self) -> Any:
        return {"epochs_seen": self.epochs_seen}

    def set_extra_state(self, state: Any) -> None:
        self.epochs_seen = state["epochs_seen"]


def test_resume_is_exact_when_the_module_defines_its_own_extra_state(tmp_path: Path) -> None:
    full = OwnExtraState(m=3, seed=4)
    _trainer(max_epochs=4, callbacks=[MaxUp(warmup_epochs=1)]).fit(full)

    first = OwnExtraState(m=3, seed=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[MaxUp(warmup_epochs=1), ckpt]).fit(first)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["_extra_state"] == {"epochs_seen": 2}
    resumed = OwnExtraState(m=3)  # no seed: it must come from the checkpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[MaxUp(warmup_epochs=1), ckpt])
    trainer.fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))

    assert resumed.epochs_seen == full.epochs_seen == 4, "the module's own extra state must come back"
    assert first.seeds + resumed.seeds == full.seeds, "the augmentation stream must go on where it stopped"
    after, expected = resumed.state_dict(), full.state_dict()
    assert after.pop("_extra_state") == expected.pop("_extra_state")
    assert after.keys() == expected.keys()
    worst = max(float((after[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert worst == 0.0, f"resumed parameters differ by {worst}"


def test_a_0_3_state_dict_and_pickle_load_into_the_child() -> None:
    model = Net(m=2)
    state = {k: v for k, v in _params(model).items() if not k.endswith("_extra_state")}
    state["_extra_state"] = torch.tensor([2, 1, 9, 5, 8])  # 0.3: the stream at the module's root
    model.load_state_dict(state)  # strict: the root key is taken, not unexpected
    assert (model.maxup_seed, model._maxup_draws, model._maxup_agreed_rows) == (9, 5, 8)
    assert "_extra_state" not in model.state_dict()
    assert model.state_dict()["_maxup_state._extra_state"].tolist() == [2, 1, 9, 5, 8]

    pickled = model.__getstate__()  # as 0.3 pickled it: the stream in plain attributes, no child
    pickled["_modules"] = {k: v for k, v in pickled["_modules"].items() if k != "_maxup_state"}
    pickled.update(_maxup_draws=6, _maxup_agreed_rows=4)
    old = Net.__new__(Net)
    old.__setstate__(pickled)
    assert (old.maxup_seed, old._maxup_draws, old._maxup_agreed_rows) == (9, 6, 4)
    assert old._maxup_state.owner is old


def test_every_option_is_an_explicit_typed_property() -> None:
    for name in option_names():
        attr = MaxUpMixin.__dict__.get(f"maxup_{name}")
        assert isinstance(attr, _Option), f"maxup_{name} must be written out in the class body"
        assert attr.name == name
    model = Net(m=2)
    with pytest.warns(DeprecationWarning, match=r"maxup_config.replace\(m=\.\.\.\)"):
        model.maxup_m = 5
    assert model.maxup_config.m == 5
    with pytest.warns(DeprecationWarning, match="maxup_m"), pytest.raises(ValueError, match="`m`.*0"):
        model.maxup_m = 0


# ----------------------------------------------------------------------------------------------------------------------
# Lightning features
# ----------------------------------------------------------------------------------------------------------------------
COMPILES: list[int] = []


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    COMPILES.append(len(example_inputs))
    return gm.forward


class CountPerEpoch(Callback):
    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.per_epoch.append(len(COMPILES))


def test_fit_of_a_compiled_module_settles_after_the_first_maxup_epoch() -> None:
    torch._dynamo.reset()
    COMPILES.clear()
    model = Net(m=3, augment=GaussianNoise(0.1))
    model.train_dataloader = lambda: DataLoader(_data(30), batch_size=8)  # type: ignore[method-assign]
    counter = CountPerEpoch()
    _trainer(max_epochs=4, callbacks=[MaxUp(warmup_epochs=1), counter]).fit(
        torch.compile(model, backend=_counting_backend)
    )
    assert counter.per_epoch[0] > 0, "forward was not compiled"
    # Epoch 0 is the warm-up, epoch 1 the first MaxUp epoch (new shapes and modes); after it, nothing compiles.
    assert counter.per_epoch[1] == counter.per_epoch[2] == counter.per_epoch[3], counter.per_epoch


def test_hugging_face_dict_batch_with_labels_first() -> None:
    class DictNet(Net):
        def per_sample_loss(self, batch: Any) -> Tensor:
            return F.cross_entropy(self(batch["pixel_values"]), batch["labels"], reduction="none")

        def train_dataloader(self) -> DataLoader:
            data = _data()
            items = [{"labels": y, "pixel_values": x} for x, y in data]
            return DataLoader(items, batch_size=8)

    model = DictNet(m=3, selection_size=4)
    _trainer(max_epochs=1).fit(model)
    assert model.global_step == 3


def test_evaluation_only_trainer_leaves_the_options_and_fit_undoes_its_overrides() -> None:
    model = Net(m=3)
    model.validation_step = lambda batch, batch_idx: None  # type: ignore[method-assign]
    loader = DataLoader(_data(), batch_size=8)
    for run in ("validate", "test", "predict"):
        trainer = _trainer(callbacks=[MaxUp(m=8, selection_size=4, warmup_epochs=2)])
        if run == "predict":
            model.predict_step = lambda batch, batch_idx: model(batch[0])  # type: ignore[method-assign]
            trainer.predict(model, loader)
        else:
            setattr(model, f"{run}_step", lambda batch, batch_idx: None)
            getattr(trainer, run)(model, loader)
        assert model.maxup_config == MaxUpConfig(m=3, augment=model.maxup_augment), run
    trainer = _trainer(max_epochs=1, callbacks=[MaxUp(m=2, warmup_epochs=0)])
    seen: list[int] = []
    model.maxup_preflight = lambda batch: None  # type: ignore[method-assign]
    original = model.per_sample_loss
    model.per_sample_loss = lambda b: (seen.append(model.maxup_active_m), original(b))[1]  # type: ignore[method-assign]
    trainer.fit(model, loader)
    assert set(seen) == {2}, "the fit runs with the callback's m"
    assert model.maxup_m == 3, "after the fit the module's own options are back"
    assert model.maxup_enabled


def test_lr_find_tunes_the_regime_the_fit_starts_with(tmp_path: Path) -> None:
    model = Net(m=3)
    model.lr = 0.05
    seen: list[int] = []
    original = model.per_sample_loss
    model.per_sample_loss = lambda b: (seen.append(model.maxup_active_m), original(b))[1]  # type: ignore[method-assign]
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[MaxUp(warmup_epochs=2)])
    Tuner(trainer).lr_find(model, num_training=5, early_stop_threshold=None)
    assert seen
    assert set(seen) == {1}, f"lr_find ran MaxUp steps (m per call: {sorted(set(seen))})"


def test_barebones_trainer_runs_without_warnings() -> None:
    model = Net(m=3)
    _trainer(max_epochs=1, barebones=True, logger=None, enable_checkpointing=None, enable_progress_bar=None,
             enable_model_summary=None).fit(model)  # fmt: skip
    assert model.global_step == 3


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_with_a_selection_view(precision: str) -> None:
    model = Net(m=3, selection_size=4)
    _trainer(max_epochs=1, precision=precision).fit(model)
    assert model.global_step == 3
    assert next(model.parameters()).dtype == {"bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]


def test_tensor_that_is_not_per_sample_is_refused_at_the_first_batch() -> None:
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"shape \[3\] whose first dimension is not the batch size 8.*Shared"):
        check_per_sample((x, y, torch.ones(3)))
    check_per_sample((x, y, Shared(torch.ones(3)), torch.tensor(2.0)))  # marked, or a scalar: fine

    class Weighted(Net):
        def per_sample_loss(self, batch: Any) -> Tensor:
            x, y, w = batch
            return F.cross_entropy(self(x), y, weight=w, reduction="none")

    weights = torch.ones(3)
    model = Weighted(m=2)
    # A class-weight vector of length 3 next to batches of 8: refused before any step.
    items = DataLoader(_data(), batch_size=8, collate_fn=lambda b: (*torch.utils.data.default_collate(b), weights))
    with pytest.raises(ValueError, match=r"shape \[3\].*lightning_maxup.Shared"):
        _trainer(max_epochs=1).fit(model, items)
    assert model.global_step == 0

    class Scaled(Net):
        def per_sample_loss(self, batch: Any) -> Tensor:
            x, y, scale = batch
            return F.cross_entropy(self(x), y, reduction="none") * scale.mean()

    # A shared tensor that happens to have B rows passes full batches, then the short last batch names the fix.
    scale = torch.ones(8)
    items = DataLoader(_data(20), batch_size=8, collate_fn=lambda b: (*torch.utils.data.default_collate(b), scale))
    with pytest.raises(ValueError, match=r"shape \[8\] whose first dimension is not the batch size 4.*Shared"):
        _trainer(max_epochs=1).fit(Scaled(m=2), items)


def test_preflight_runs_once_without_a_trainer() -> None:
    model = Net(m=3)
    batch = next(iter(DataLoader(_data(), batch_size=8)))
    for _ in range(3):
        model.maxup_step(batch)
    # the pre-flight (24 rows, selecting) once, then per step: selection (24) and the gradient forward (8)
    assert model.calls == [(True, 24)] + [(True, 24), (False, 8)] * 3


def test_plain_maxup_step_finds_the_model_or_warns() -> None:
    import copy

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    twin = copy.deepcopy(net)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss_fn(batch: Any) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    out = maxup_step(loss_fn, (x, y), augment=GaussianNoise(0.5), m=4, generator=torch.Generator().manual_seed(0))
    # Found in the closure: the selection pass ran in eval mode and left the statistics alone; only the gradient
    # forward (train mode, the 8 trained rows) moved them, exactly as that forward alone moves the twin's.
    with torch.no_grad():
        twin(out.batch[0])
    assert torch.equal(net[1].running_mean, twin[1].running_mean)
    assert torch.equal(net[1].running_var, twin[1].running_var)

    def opaque(batch: Any) -> Tensor:  # reaches the module through a global: nothing to find
        return F.cross_entropy(globals()["_OPAQUE"](batch[0]), batch[1], reduction="none")

    globals()["_OPAQUE"] = net
    with pytest.warns(UserWarning, match="`selection_mode`='train' but no `model`"):
        maxup_step(opaque, (x, y), augment=GaussianNoise(0.5), m=2, selection_mode="train")


def test_old_positional_call_works_with_a_deprecation_warning() -> None:
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(net(b[0]), b[1], reduction="none")

    new = maxup_step(loss_fn, (x, y), augment=GaussianNoise(0.3), m=4, generator=torch.Generator().manual_seed(1))
    with pytest.warns(DeprecationWarning, match=r"maxup_step\(loss_fn, batch, augment, m\) is deprecated"):
        old = maxup_step(loss_fn, (x, y), GaussianNoise(0.3), 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(old.loss, new.loss)
    assert torch.equal(old.selected, new.selected)
    with pytest.warns(DeprecationWarning, match="deprecated since lightning_maxup 0.3"):
        bare = maxup_step(loss_fn, (x, y), GaussianNoise(0.3), generator=torch.Generator().manual_seed(1))
    assert bare.m == 4, "a bare augmentation in third place keeps the default m"
    with pytest.raises(TypeError, match="positionally"):
        maxup_step(loss_fn, (x, y), MaxUpConfig(), 4)


# ----------------------------------------------------------------------------------------------------------------------
# randomness="sample" with repeated indices
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [[3, 5, 3, 3, 7, 5], [1, 2, 3], [4, 4, 4, 4], []])
def test_repeat_counts_against_a_loop(index: list[int]) -> None:
    expected = [index[:i].count(v) for i, v in enumerate(index)]
    assert _repeat_counts(torch.tensor(index, dtype=torch.int64)).tolist() == expected


class Indexed(Net):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(randomness="sample", augment=GaussianNoise(0.5), **kwargs)

    def maxup_sample_index(self, batch: Any) -> Tensor:
        return batch[2]


def test_a_repeated_index_draws_copies_of_its_own() -> None:
    model = Indexed(m=2, seed=1)
    x = torch.zeros(4, 1, 8, 8)
    batch = (x, torch.zeros(4, dtype=torch.long), torch.tensor([6, 6, 2, 6]))
    g = model._maxup_next_generator(batch, 2)
    noisy = GaussianNoise(0.5)(expand_copies(batch, 2), generator=g)[0]
    rows = noisy.flatten(1)
    distinct = {tuple(r.tolist()) for r in rows}
    assert len(distinct) == 8, "every (sample, copy) row, repeated index or not, must draw its own noise"


# ----------------------------------------------------------------------------------------------------------------------
# Premade candidates (copies made by the loader)
# ----------------------------------------------------------------------------------------------------------------------
def _linear_loss(net: nn.Module) -> Any:
    return lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")


def test_premade_candidates_are_scored_as_made() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    aug = GaussianNoise(0.7)
    made = aug(expand_copies((x, y), 3), generator=torch.Generator().manual_seed(2))
    direct = maxup_step(_linear_loss(net), (x, y), augment=aug, m=3, generator=torch.Generator().manual_seed(2))
    premade = maxup_step(_linear_loss(net), Candidates(made, 3), m=3)
    assert torch.equal(direct.selected, premade.selected)
    assert torch.equal(direct.loss, premade.loss)
    warm = maxup_step(_linear_loss(net), Candidates(made, 3), m=1)
    assert torch.equal(warm.batch[0], made[0][:5]), "with m=1 the step trains on copy 0"
    with pytest.raises(ValueError, match=r"Candidates with 3 copies per sample, but the step runs `m`=4"):
        maxup_step(_linear_loss(net), Candidates(made, 3), m=4)
    with pytest.raises(ValueError, match=r"`augment` is GaussianNoise"):
        maxup_step(_linear_loss(net), Candidates(made, 3), m=3, augment=aug)


# ----------------------------------------------------------------------------------------------------------------------
# The dial: selection_temperature
# ----------------------------------------------------------------------------------------------------------------------
def _draws(losses: Tensor, tau: float | None, n: int, seed: int = 0) -> Tensor:
    """``n`` independent draws of the selected copy for one sample with copy losses ``losses [m]``."""
    from lightning_maxup.core.functional import select_copies

    m = losses.shape[0]
    tiled = losses[:, None].expand(m, n).reshape(-1)  # copy-major: n samples with the same m losses
    selected, _ = select_copies(tiled, n, tau, torch.Generator().manual_seed(seed))
    return selected


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_temperature_draws_follow_the_softmax(tau: float) -> None:
    from scipy import stats

    losses = torch.tensor([0.2, 1.0, 1.5, 0.7])
    n = 40_000
    counts = torch.bincount(_draws(losses, tau, n), minlength=4).double()
    expected = torch.softmax(losses.double() / tau, 0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    p = 1 - stats.chi2.cdf(chi2, df=3)
    assert p > 1e-3, f"chi2={chi2:.1f} (p={p:.2g}): counts {counts.tolist()} vs softmax {expected.tolist()}"


def test_temperature_limits() -> None:
    losses = torch.tensor([0.2, 1.0, 1.5, 0.7])
    assert (_draws(losses, 1e-4, 2000) == 2).all(), "tau -> 0 is the arg-max"
    assert torch.equal(_draws(losses, None, 10), torch.full((10,), 2))
    counts = torch.bincount(_draws(losses, 1e6, 40_000), minlength=4).double() / 40_000
    assert (counts - 0.25).abs().max() < 0.01, f"tau -> inf is uniform: {counts.tolist()}"


def test_temperature_gradient_estimates_the_tilted_loss() -> None:
    # L_k(w) = w . z_k: the expected gradient of the drawn copy is sum_k softmax(L/tau)_k z_k, the gradient of
    # tau * log mean_k exp(L_k / tau) (Li et al., TERM, ICLR 2021).
    torch.manual_seed(0)
    m, d, tau, n = 4, 3, 0.5, 20_000
    z = torch.randn(m, d, dtype=torch.float64)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True)
    tilted = tau * torch.logsumexp((z @ w) / tau - math.log(m), 0)
    (exact,) = torch.autograd.grad(tilted, w)
    selected = _draws((z @ w).detach(), tau, n)
    estimate = z[selected].mean(0)  # gradient of w . z_selected, averaged over n draws
    spread = z[selected].std(0) / math.sqrt(n)
    assert ((estimate - exact).abs() < 5 * spread + 1e-9).all(), (estimate, exact, spread)


def test_temperature_through_the_step_replays_and_reports_the_draw() -> None:
    net = nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def run() -> Any:
        return maxup_step(
            _linear_loss(net), (x, y), augment=GaussianNoise(1.0), m=4, selection_temperature=0.5,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip

    a, b = run(), run()
    assert torch.equal(a.selected, b.selected)
    argmax = a.candidate_losses.argmax(0)
    assert (a.selected != argmax).any(), "at tau=0.5 some draws differ from the arg-max"
    chosen = a.candidate_losses.gather(0, a.selected[None])[0]
    assert torch.allclose(chosen, a.losses.detach(), atol=1e-5), "the trained loss is the drawn copy's"


# ----------------------------------------------------------------------------------------------------------------------
# The mixin's per-step bookkeeping makes no host sync
# ----------------------------------------------------------------------------------------------------------------------
class Counted(Net):
    """Counts the syncing ops inside every ``maxup_step`` after the first (which holds the pre-flight check)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.syncs: list[list[str]] = []
        self.reports: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        from tests.sync_counter import SyncCounter

        if self._maxup_prepared_for is None:  # the first step prepares the fit (pre-flight, seed, agreed rows)
            return self.maxup_step(batch).loss
        with SyncCounter() as counter:
            loss = self.maxup_step(batch).loss
        # Lightning builds a result object (two small tensors) the first time a key is logged in a fit: its own
        # one-time cost, not the step's.
        syncs = [x for x in counter.syncs if not x.where.startswith("result.py") or " __init__ " not in x.where]
        self.syncs.append([x.op for x in syncs])
        self.reports.append("\n".join(f"{x.op}: {x.where}" for x in syncs))
        return loss


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="crop-cutout"),
        pytest.param({"selection_size": 4, "chunk_size": 8}, id="view-chunks"),
        pytest.param({"selection_mode": "train", "selection_temperature": 0.5}, id="train-temperature"),
        pytest.param({"augment": GaussianNoise(0.1), "randomness": "sample"}, id="keyed"),
    ],
)
def test_mixin_step_makes_no_host_sync(options: dict[str, Any]) -> None:
    class Model(Counted):
        def maxup_sample_index(self, batch: Any) -> Tensor:
            return batch[2]

        def train_dataloader(self) -> DataLoader:
            data = _data()
            return DataLoader(TensorDataset(*data.tensors, torch.arange(24)), batch_size=8)

    model = Model(m=3, check_finite=False, **options)
    _trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1)]).fit(model)
    assert len(model.syncs) >= 5
    assert all(ops == [] for ops in model.syncs), "\n".join(model.reports)


def test_finiteness_check_is_the_one_documented_sync_on_the_cpu() -> None:
    model = Counted(m=3)
    _trainer(max_epochs=1).fit(model)
    # On the CPU the deferred guard reads its count at once: one `_local_scalar_dense` per step, nothing else.
    assert all(ops == ["_local_scalar_dense"] for ops in model.syncs), model.syncs


def test_readme_lists_the_public_api() -> None:
    import re

    import lightning_maxup

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- public-api:start -->(.*?)<!-- public-api:end -->", text, re.S)
    assert block is not None, "README.md lost its public-API list"
    listed = set(re.findall(r"`(\w+)`", block.group(1)))
    assert listed == set(lightning_maxup.__all__), (
        f"README lists {sorted(listed - set(lightning_maxup.__all__))} that are not exported and misses"
        f" {sorted(set(lightning_maxup.__all__) - listed)}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Review findings, each with the test that failed before its mend
# ----------------------------------------------------------------------------------------------------------------------
def test_state_dict_before_seed_everything_leaves_the_seed_to_it() -> None:
    model = Net(m=2)
    model.state_dict()  # e.g. saving the initial weights
    pl.seed_everything(123, verbose=False)
    try:
        assert model.maxup_resolved_seed() == 123
    finally:
        import os

        os.environ.pop("PL_GLOBAL_SEED", None)


def test_extra_state_of_another_version_is_refused_by_name() -> None:
    model = Net(m=2)
    with pytest.raises(ValueError, match=r"MaxUp `_extra_state` to be \[version 2.*got \[99, 1, 5, 7, 8\]"):
        model._maxup_state.set_extra_state(torch.tensor([99, 1, 5, 7, 8]))
    with pytest.raises(ValueError, match=r"MaxUp `_extra_state`.*got \[2, 5, 7, 8\]"):
        model._maxup_state.set_extra_state(torch.tensor([2, 5, 7, 8]))


def test_an_exception_during_fit_restores_the_module_options() -> None:
    class Failing(Net):
        def per_sample_loss(self, batch: Any) -> Tensor:
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().per_sample_loss(batch)

    model = Failing(m=3)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(max_epochs=3, callbacks=[MaxUp(warmup_epochs=2, m=5, chunk_size=4)]).fit(model)
    assert (model.maxup_m, model.maxup_chunk_size, model.maxup_enabled) == (3, None, True)


def test_sample_index_of_the_wrong_length_names_the_hook() -> None:
    class Short(Indexed):
        def maxup_sample_index(self, batch: Any) -> Tensor:
            return batch[2][:3]

    model = Short(m=2)
    loader = DataLoader(TensorDataset(*_data().tensors, torch.arange(24)), batch_size=8)
    with pytest.raises(ValueError, match=r"`maxup_sample_index\(batch\)` to return one dataset index per sample"):
        _trainer(max_epochs=1).fit(model, loader)


def _my_view(batch: Any) -> Any:
    return batch


def test_function_overrides_resume_without_a_settings_warning(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    callbacks = [MaxUp(warmup_epochs=0, selection_view=_my_view), ckpt]
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=callbacks).fit(Net(m=2))
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("MaxUp"))
    assert saved["overrides"]["selection_view"] == f"{__name__}._my_view", saved
    callbacks = [MaxUp(warmup_epochs=0, selection_view=_my_view), ModelCheckpoint(dirpath=tmp_path, save_top_k=0)]
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=callbacks)
    trainer.fit(Net(m=2), ckpt_path=str(tmp_path / "last.ckpt"))  # a warning would fail the test


class WithHyperparameters(Net):
    def __init__(self, maxup: MaxUpConfig) -> None:
        super().__init__(maxup=maxup)
        self.save_hyperparameters()  # stores the MaxUpConfig and its augmentation in every checkpoint


def _options() -> MaxUpConfig:
    return MaxUpConfig(m=3, augment=Compose([RandomCrop(8, padding=1), Cutout(3)]), selection_size=4)


def test_saved_hyperparameters_resume_under_weights_only(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(WithHyperparameters(_options()))
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)  # Lightning's default when it resumes
    assert isinstance(loaded["hyper_parameters"]["maxup"], MaxUpConfig)
    model = WithHyperparameters.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert model.maxup_m == 3
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(WithHyperparameters(_options()), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 6


def test_a_trained_module_pickles_and_its_copy_trains_on() -> None:
    import copy
    import io

    model = Net(m=2)
    _trainer(max_epochs=1).fit(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module, as some users save it
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._maxup_draws == model._maxup_draws == 3, "the stream's position travels with the module"
    twin = copy.deepcopy(model)
    _trainer(max_epochs=1).fit(loaded)  # prepares itself again for the new Trainer
    assert loaded.global_step == 3
    assert twin._maxup_prepared_for is None


class NoSuperSmoothAdv(SmoothAdvClassifier):
    """SmoothAdv with the hooks overridden as Lightning's docs write them: no super()."""

    def on_fit_start(self) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_smoothadv_noise_stream_resumes_when_hooks_do_not_call_super(tmp_path: Path) -> None:
    def model() -> Any:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        return NoSuperSmoothAdv(net, 3, sigma=0.5, epsilon=0.0, num_noise_samples=2, optimizer="adam", lr=1e-3)

    loader = DataLoader(_data(), batch_size=8)
    full = model()
    _trainer(max_epochs=2).fit(full, loader)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(model(), loader)
    resumed = model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(resumed, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed._draws == full._draws == 6
    after, expected = _params(resumed), _params(full)
    worst = max(float((after[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert worst == 0.0, f"resumed SmoothAdv parameters differ by {worst}"


def test_plain_maxup_step_refuses_a_tensor_that_is_not_per_sample() -> None:
    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss_fn(batch: Any) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1], weight=batch[2], reduction="none")

    with pytest.raises(ValueError, match=r"shape \[3\] whose first dimension is not the batch size 8.*Shared"):
        maxup_step(loss_fn, (x, y, torch.ones(3)), augment=GaussianNoise(0.1), m=2, model=net)
    out = maxup_step(loss_fn, (x, y, Shared(torch.ones(3))), augment=GaussianNoise(0.1), m=2, model=net)
    assert out.losses.shape == (8,)
