"""SelectionMonitor: what it draws is what MaxUp selected, and it never changes training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin, SelectionMonitor, maxup_step
from lightning_maxup.augment import (
    Augmentation,
    Compose,
    CutMix,
    Cutout,
    GaussianNoise,
    Mixup,
    PointGaussianNoise,
    PointJitter,
    RandomCrop,
    RandomHorizontalFlip,
    RandomPointRotation,
    RandomPointScale,
)
from lightning_maxup.augment.randaugment import RandAugment
from lightning_maxup.callbacks.monitor import (
    OTHER_COLOUR,
    SELECTED_COLOUR,
    Drawn,
    RecordingAugment,
    candidate_grid,
    drawn_features,
    selection_rate_maps,
    selection_stats,
)
from lightning_maxup.core.batch import gather_rows

M, B = 4, 6


def _images(n: int = B, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _points(n: int = B, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _first(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, tuple) else batch


AUGMENTATIONS = [
    pytest.param(Cutout(3), _images, ["centre_y", "centre_x"], id="cutout"),
    pytest.param(RandomCrop(8, padding=1), _images, ["offset_y", "offset_x"], id="crop"),
    pytest.param(RandomHorizontalFlip(), _images, ["flip"], id="flip"),
    pytest.param(CutMix(1.0, num_classes=3), _images, ["lam", "centre_y", "centre_x"], id="cutmix"),
    pytest.param(Mixup(0.4, num_classes=3), _images, ["lam"], id="mixup"),
    pytest.param(GaussianNoise(0.25), _images, ["noise_norm"], id="gauss"),
    pytest.param(RandAugment(num_ops=2, random_magnitude=True), _images, ["op_0", "magnitude_0", "op_1"], id="randaug"),
    pytest.param(RandomPointRotation(), _points, ["angle"], id="rotation"),
    pytest.param(RandomPointScale(anisotropic=True), _points, ["scale_x", "scale_y", "scale_z"], id="scale-xyz"),
    pytest.param(RandomPointScale(), _points, ["scale"], id="scale"),
    pytest.param(PointJitter(), _points, ["noise_norm"], id="jitter"),
    pytest.param(PointGaussianNoise(0.1, min_sigma=0.0), _points, ["sigma", "noise_norm"], id="point-gauss"),
]


# ---------------------------------------------------------------------------------------------------------------
# RecordingAugment draws what the augmentation draws
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("augment", "data", "features"), AUGMENTATIONS)
def test_recording_changes_nothing_and_reads_every_parameter(augment, data, features):
    batch = data(M * B)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    recorder = RecordingAugment(augment)
    expected, got = augment(batch, generator=g1), recorder(batch, generator=g2)
    for e, o in zip(expected, got, strict=True):
        assert torch.equal(e, o)
    assert torch.equal(g1.get_state(), g2.get_state()), "the recorder consumed a different number of draws"
    feats = drawn_features(recorder.last)
    name = type(augment).__name__
    assert set(feats) >= {f"{name}/{f}" for f in features}
    assert all(v.shape == (M * B,) and v.dtype == torch.float64 for v in feats.values())


def test_recording_walks_compose_and_calls_other_callables_as_they_are():
    calls = []

    def plain(batch, generator=None):
        calls.append(generator)
        return (batch[0] + torch.rand(batch[0].shape, generator=generator), batch[1])

    augment = Compose([RandomCrop(8, padding=1), Compose([plain, Cutout(3)]), Cutout(2)])
    batch = _images(M * B)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    expected = augment(batch, generator=g1)
    recorder = RecordingAugment(augment)
    got = recorder(batch, generator=g2)
    assert torch.equal(expected[0], got[0])
    assert torch.equal(g1.get_state(), g2.get_state())
    assert [type(d.augmentation).__name__ for d in recorder.last] == ["RandomCrop", "Cutout", "Cutout"]
    assert sorted(drawn_features(recorder.last)) == sorted(
        ["RandomCrop/offset_y", "RandomCrop/offset_x", "Cutout/centre_y", "Cutout/centre_x"]
        + ["Cutout#2/centre_y", "Cutout#2/centre_x"]
    )
    assert len(calls) == 2
    assert calls[1] is g2


# ---------------------------------------------------------------------------------------------------------------
# The histograms: every drawn row, every selected row, the selected rows' own parameters
# ---------------------------------------------------------------------------------------------------------------


def _replay_selected(drawn: list[Drawn], batch: Any, selected: Tensor) -> Any:
    """Apply the selected rows' recorded parameters to the original batch, step by step (the reference)."""
    b = selected.shape[0]
    rows = selected * b + torch.arange(b)
    for d in drawn:
        params = {k: v.index_select(0, rows) if isinstance(v, Tensor) else v for k, v in d.params.items()}
        batch = d.augmentation.apply(batch, params)
    return batch


def _net_loss(net: nn.Module):
    def loss_fn(batch):
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    return loss_fn


def test_selected_parameters_are_those_of_the_selected_rows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 3))
    recorder = RecordingAugment(Compose([RandomCrop(8, padding=1), RandomHorizontalFlip(), Cutout(3)]))
    batch = _images()
    out = maxup_step(_net_loss(net), batch, augment=recorder, m=M, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.selected, out.candidate_losses.argmax(dim=0))
    stats = selection_stats(drawn_features(recorder.last), out.selected)
    assert len(stats) == 5
    for name, (every, chosen) in stats.items():
        assert every.shape == (M * B,), name
        assert chosen.shape == (B,), name
        reference = torch.stack([every[int(out.selected[i]) * B + i] for i in range(B)])  # a loop over samples
        assert torch.equal(chosen, reference), f"{name}: largest error {(chosen - reference).abs().max()}"
    # The recorded parameters of the selected rows rebuild exactly the worst copies MaxUp trained on.
    replayed = _replay_selected(recorder.last, batch, out.selected)
    assert torch.equal(replayed[0], out.batch[0])
    # The same through gather_rows on the candidates: the selected rows are the trained rows.
    assert torch.equal(gather_rows(out.candidates, out.selected * B + torch.arange(B))[0], out.batch[0])


def test_selection_rate_map_counts():
    ys = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # m = 2 copies of B = 4 samples
    xs = torch.zeros(8)
    stats = selection_stats({"Cutout/centre_y": ys, "Cutout/centre_x": xs}, torch.tensor([0, 0, 1, 1]))
    rate = selection_rate_maps(stats)["Cutout"]
    # Selected rows 0, 1, 6, 7 have y = 0, 1, 1, 1: y=0 drawn 3 times, selected once; y=1 drawn 5, selected 3.
    assert torch.allclose(rate[:, 0], torch.tensor([1 / 3 * 2, 3 / 5 * 2], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# The grid: the framed copy is the arg-max of the candidate losses
# ---------------------------------------------------------------------------------------------------------------


def _ring(grid: Tensor, box: list[int], frame: int) -> Tensor:
    """The frame pixels around a box, ``[3, n]``."""
    top, left, h, w = box
    outer = grid[:, top - frame : top + h + frame, left - frame : left + w + frame]
    mask = torch.ones(outer.shape[1:], dtype=torch.bool)
    mask[frame:-frame, frame:-frame] = False
    return outer[:, mask]


@pytest.mark.parametrize("num_samples", [pytest.param(3, id="some"), pytest.param(10, id="more-than-B")])
def test_grid_frames_the_argmax_of_the_candidate_losses(num_samples):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 3))
    x, y = _images()
    out = maxup_step(_net_loss(net), (x, y), augment=Cutout(4), m=M, generator=torch.Generator().manual_seed(2))
    images = out.candidates[0]
    grid, layout = candidate_grid(images, out.selected, num_samples, min_side=16, frame=2)
    k = min(num_samples, B)
    assert layout.boxes.shape == (k, M, 4)
    assert grid.dtype == torch.uint8
    argmax = out.candidate_losses.argmax(dim=0)
    low, high = images.min(), images.max()
    for i in range(k):
        for j in range(M):
            box = layout.boxes[i, j].tolist()
            ring = _ring(grid, box, layout.frame)
            colour = SELECTED_COLOUR if j == int(argmax[i]) else OTHER_COLOUR
            assert (ring == torch.tensor(colour)[:, None]).all(), (i, j)
            # The tile is copy j of sample i (row j * B + i), enlarged by nearest neighbour.
            top, left, h, w = box
            tile = grid[:, top : top + h, left : left + w].float() / 255
            expected = F.interpolate(((images[j * B + i] - low) / (high - low))[None], size=(h, w), mode="nearest")[0]
            assert (tile - expected).abs().max() <= 1 / 255 + 1e-6
    assert int((grid == torch.tensor(SELECTED_COLOUR)[:, None, None]).all(0).sum()) == k * _ring_size(layout)


def _ring_size(layout) -> int:
    _, _, h, w = layout.boxes[0, 0].tolist()
    f = layout.frame
    return (h + 2 * f) * (w + 2 * f) - h * w


# ---------------------------------------------------------------------------------------------------------------
# Inside a Trainer
# ---------------------------------------------------------------------------------------------------------------


class Lit(MaxUpMixin, pl.LightningModule):
    def __init__(self, augment=None, m: int = 3) -> None:
        super().__init__(m=m, augment=augment or Compose([RandomCrop(8, padding=1), Cutout(3)]), seed=0)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
            nn.Linear(4 * 64, 3),
        )  # fmt: skip

    def per_sample_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class PointLit(Lit):
    def __init__(self) -> None:
        super().__init__(augment=Compose([RandomPointRotation(), RandomPointScale()]))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 3, 3))


def _loader(points: bool = False, n: int = 40) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, 3, generator=g) if points else torch.rand(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=8, shuffle=False)


def _fit(model, tmp_path: Path, callbacks: list, logger: Any = False, epochs: int = 2, loader=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=loader or _loader())
    return trainer


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    plain = Lit()
    _fit(plain, tmp_path / "a", [MaxUp(warmup_epochs=1)], epochs=3)
    monitored = Lit()  # re-seeds the global generator, which dropout draws from, as plain's did
    augment = monitored.maxup_config.augment
    monitor = SelectionMonitor(every_n_steps=1)
    _fit(monitored, tmp_path / "b", [MaxUp(warmup_epochs=1), monitor], epochs=3)
    assert len(monitor.gap_history) == 10  # 5 MaxUp steps in each of epochs 1 and 2, every one logged
    for (name, a), (_, b) in zip(plain.state_dict().items(), monitored.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name}: largest difference {(a.float() - b.float()).abs().max()}"
    assert monitored.maxup_config.augment is augment  # the original augmentation is back in place
    assert monitored.maxup_config.replace(augment=None) == plain.maxup_config.replace(augment=None)
    assert monitored.maxup_record is False
    assert monitored.maxup_last_output is None


class Capturing(SelectionMonitor):
    """Keeps what it logged, with the original batch, to check against a reference."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.logged: list[tuple[Any, Any, list[Drawn]]] = []
        self._batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def log_selection(self, out, drawn, step):
        self.logged.append((self._batch, out, list(drawn)))
        super().log_selection(out, drawn, step)


def test_logged_parameters_are_the_trained_steps_not_the_preflight_check(tmp_path):
    monitor = Capturing(every_n_steps=2)
    _fit(Lit(), tmp_path, [monitor], epochs=1)  # MaxUp from the first step, where the pre-flight check runs too
    assert len(monitor.logged) == 2  # steps 2 and 4 of 5
    for batch, out, drawn in monitor.logged:
        stats = selection_stats(drawn_features(drawn), out.selected)
        assert all(a.shape == (3 * 8,) and s.shape == (8,) for a, s in stats.values())
        assert torch.equal(_replay_selected(drawn, batch, out.selected.cpu())[0], out.batch[0])


def _png_ok(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("use_csv", [pytest.param(False, id="no-logger"), pytest.param(True, id="csv")])
def test_png_fallback_writes_valid_images(tmp_path, use_csv):
    logger = CSVLogger(tmp_path / "logs", name="run") if use_csv else False
    _fit(Lit(), tmp_path, [MaxUp(warmup_epochs=1), SelectionMonitor(every_n_steps=3)], logger=logger)
    directory = (Path(logger.log_dir) if use_csv else tmp_path) / "maxup_monitor"
    # Steps 3, 6 and 9 are due; step 3 falls in the warm-up (m = 1), which logs nothing.
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "candidates_step0000006.png", "candidates_step0000009.png", "gap.png",
        "params_step0000006.png", "params_step0000009.png",
    ]  # fmt: skip
    for p in directory.iterdir():
        width, height = _png_ok(p)
        assert width > 100
        assert height > 100


def test_point_clouds_get_parameters_and_no_grid(tmp_path):
    _fit(PointLit(), tmp_path, [SelectionMonitor(every_n_steps=5)], epochs=1, loader=_loader(points=True))
    names = sorted(p.name for p in (tmp_path / "maxup_monitor").iterdir())
    assert names == ["gap.png", "params_step0000005.png"]


def test_tensorboard_gets_images_and_histograms_of_every_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(Lit(), tmp_path, [SelectionMonitor(every_n_steps=5)], logger=logger, epochs=1)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"maxup_monitor/candidates", "maxup_monitor/params"} <= set(tags["images"])
    expected = {f"maxup_monitor/{a}/{p}/{w}" for a, p in [("RandomCrop", "offset_y"), ("RandomCrop", "offset_x"),
                ("Cutout", "centre_y"), ("Cutout", "centre_x")] for w in ("all", "selected")}  # fmt: skip
    assert set(tags["histograms"]) == expected
    for tag in expected:
        (event,) = events.Histograms(tag)
        assert event.step == 5
        assert event.histogram_value.num == (3 * 8 if tag.endswith("/all") else 8), tag
    assert not (Path(logger.log_dir) / "maxup_monitor").exists()  # no PNG fallback next to a logger with images


def test_monitor_restores_the_module_when_the_step_raises(tmp_path):
    class Failing(Lit):
        def per_sample_loss(self, batch):
            if self.global_step == 1 and not torch.is_grad_enabled():
                raise RuntimeError("boom")
            return super().per_sample_loss(batch)

    model = Failing()
    augment = model.maxup_config.augment
    with pytest.raises(RuntimeError, match="boom"):
        _fit(model, tmp_path, [SelectionMonitor(every_n_steps=2)], epochs=1)
    assert model.maxup_config.augment is augment
    assert model.maxup_record is False


def test_state_dict_round_trip_keeps_the_gap_history():
    monitor = SelectionMonitor(every_n_steps=7, num_samples=2)
    monitor.gap_history = [(7, 0.5), (14, 0.25)]
    other = SelectionMonitor(every_n_steps=7, num_samples=2)
    other.load_state_dict(monitor.state_dict())
    assert other.gap_history == monitor.gap_history
    assert math.isclose(other.gap_history[1][1], 0.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"every_n_steps": 0}, "Expected `every_n_steps` to be a positive integer, got 0", id="every"),
        pytest.param({"num_samples": -1}, "Expected `num_samples` to be a positive integer, got -1", id="samples"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionMonitor(**kwargs)


def test_needs_a_maxup_module(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(64, 3)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0].flatten(1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="SelectionMonitor callback needs a LightningModule that subclasses MaxUpMixin"):
        _fit(Plain(), tmp_path, [SelectionMonitor()])


def test_augmentation_base_is_split_as_the_recorder_assumes():
    # The recorder calls sample then apply; that is Augmentation.__call__'s contract. Guard it.
    aug = Cutout(2)
    x = torch.rand(4, 1, 8, 8)
    params = aug.sample(x, torch.Generator().manual_seed(0))
    assert torch.equal(aug.apply(x, params), aug(x, generator=torch.Generator().manual_seed(0)))
    assert type(aug).__call__ is Augmentation.__call__
