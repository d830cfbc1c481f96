"""MaxUp copies made in the DataLoader workers: ``MultiView``, ``multiview_collate`` and ``MultiViewSchedule``.

What the tests pin down: a view is a function of ``(seed, epoch, sample index, copy)`` alone (bit-exact replay and
resume with 0 and 2 workers, the same draws under a 2-rank ``DistributedSampler``), copies are independent draws,
the collate's copy-major layout matches a loop, every misuse fails at the first batch with a named message, and in a
Lightning fit the warm-up makes one view and the first MaxUp epoch's first batch ``m`` (persistent workers).
"""

from __future__ import annotations

import ast
import json
import random
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import pytorch_lightning.cli as pl_cli
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision.transforms import v2

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.core.batch import Candidates
from lightning_maxup.core.random import mix_seed
from lightning_maxup.data.multiview import MultiView, multiview_collate
from lightning_maxup.training.schedule import MultiViewSchedule, training_epoch

ROOT = Path(__file__).resolve().parents[2]
N, SIDE, M = 24, 8, 4
# These tests pin down the explicit wiring of 0.3 (collate_fn, MultiViewSchedule, set_epoch), which keeps working;
# tests/data/test_wired_once.py covers the MaxUp callback alone and the deprecation itself.
pytestmark = pytest.mark.filterwarnings("ignore:MultiViewSchedule is deprecated:DeprecationWarning")


class Indexed(Dataset):
    """``(uint8 image [3, SIDE, SIDE], label, index)`` items, made from the index."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.x[i], int(self.y[i]), i


def noisy(x: Tensor) -> Tensor:
    """A transform drawing from all three global generators: torch, ``random`` and numpy."""
    shift = torch.rand(()) + random.random() + float(np.random.rand())
    return x.float() / 255 + shift


def pipeline(size: int = 6) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )


def views_by_index(loader: DataLoader) -> dict[int, Tensor]:
    """``index -> [m, ...]`` views, read back from copy-major Candidates batches."""
    out: dict[int, Tensor] = {}
    for batch in loader:
        assert isinstance(batch, Candidates)
        x, _, index = batch.batch
        b = batch.num_samples
        for i, idx in enumerate(index[:b].tolist()):
            out[idx] = x.view(batch.m, b, *x.shape[1:])[:, i].clone()
    return out


def loader(ds: MultiView, workers: int = 0, **kwargs: Any) -> DataLoader:
    kwargs.setdefault("batch_size", 5)
    return DataLoader(ds, num_workers=workers, collate_fn=ds.collate_fn, **kwargs)


def reference_views(ds: MultiView, x: Any, index: int, epoch: int, views: int = M) -> Tensor:
    """A loop that seeds the three global generators as documented, then calls the transform."""
    out = []
    for k in range(views):
        s = mix_seed(ds.seed, epoch, index, k)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        out.append(ds.transform(x.clone() if isinstance(x, Tensor) else x))
    return torch.stack(out)


def max_diff(a: dict[int, Tensor], b: dict[int, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[i].float() - b[i].float()).abs().max()) for i in a)


# ---------------------------------------------------------------------------------------------------------------
# Draws: a function of (seed, epoch, index, copy)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [pytest.param(0, id="0-workers"), pytest.param(2, id="2-workers")])
def test_views_match_the_seeded_loop_and_replay_bit_exact(workers: int) -> None:
    ds = MultiView(Indexed(), pipeline(), M, seed=3)
    ds.set_epoch(2)
    first = views_by_index(loader(ds, workers))
    # a fresh dataset, the other worker count: nothing but (seed, epoch, index, copy) decides a view
    fresh = MultiView(Indexed(), pipeline(), M, seed=3)
    fresh.set_epoch(2)
    again = views_by_index(loader(fresh, 2 - workers))
    assert max_diff(first, again) == 0.0, f"replay differs by up to {max_diff(first, again)}"
    data = Indexed()
    reference = {i: reference_views(ds, data[i][0], i, epoch=2) for i in range(N)}
    assert max_diff(first, reference) == 0.0, f"views differ from the seeded loop by up to {max_diff(first, reference)}"
    other_epoch = {i: reference_views(ds, data[i][0], i, epoch=3) for i in range(N)}
    assert all(not torch.equal(first[i], other_epoch[i]) for i in range(N)), "epochs 2 and 3 drew the same views"


def test_resume_mid_epoch_gives_the_same_views() -> None:
    full = MultiView(Indexed(), noisy, M, seed=1)
    full.set_epoch(5)
    uninterrupted = views_by_index(loader(full, 2, sampler=list(range(N))))
    resumed = MultiView(Indexed(), noisy, M, seed=1)  # a new process: fresh dataset, epoch set on resume
    resumed.set_epoch(5)
    rest = views_by_index(loader(resumed, 2, sampler=list(range(10, N))))
    assert max_diff({i: uninterrupted[i] for i in rest}, rest) == 0.0


def test_draws_do_not_depend_on_world_size_or_sampler_order() -> None:
    ds = MultiView(Indexed(), noisy, M, seed=7)
    ds.set_epoch(1)
    single = views_by_index(loader(ds, 0, shuffle=True, generator=torch.Generator().manual_seed(0)))
    ranks: dict[int, Tensor] = {}
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=11)
        sampler.set_epoch(1)
        part = views_by_index(loader(ds, 2, sampler=sampler, batch_size=3))
        assert not set(part) & set(ranks)
        ranks.update(part)
    assert max_diff(single, ranks) == 0.0, f"2 ranks drew other views than 1 process (up to {max_diff(single, ranks)})"


def test_copies_are_independent_draws() -> None:
    """Each copy's shift sums three uniforms (torch, random, numpy): mean 1.5, variance 3/12 = 0.25.

    Over n = 600 samples, a copy's mean is off by more than 4 standard errors (4 * sqrt(0.25 / n) = 0.082) and the
    correlation of two copies (or of a generator's draws between copies) exceeds 4 / sqrt(n) = 0.163 with
    probability below 1e-4 each, if the copies are independent.
    """
    n = 600
    ds = MultiView(TensorDataset(torch.zeros(n, 1, dtype=torch.uint8)), noisy, M, seed=0)
    shifts = torch.stack([ds[i][0].flatten() for i in range(n)]).double()  # [n, m]
    assert len({tuple(row.tolist()) for row in shifts}) == n
    assert all(len(set(row.tolist())) == M for row in shifts), "two copies of a sample are equal"
    means = shifts.mean(0)
    assert float((means - 1.5).abs().max()) < 4 * (0.25 / n) ** 0.5, means
    corr = torch.corrcoef(shifts.T)
    off_diagonal = corr[~torch.eye(M, dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < 4 / n**0.5, corr


def test_copy_zero_does_not_depend_on_the_view_count() -> None:
    ds = MultiView(Indexed(), pipeline(), M, seed=2)
    x = Indexed()[3][0]
    assert torch.equal(ds.make_views(x, 3, views=1)[0], ds.make_views(x, 3)[0])


def test_main_process_leaves_the_global_generators_as_they_were() -> None:
    ds = MultiView(Indexed(), noisy, M, seed=0)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    ds[0]
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    assert torch.equal(after[0], torch.rand(3))
    assert after[1] == random.random()
    assert after[2] == np.random.rand()


def test_transform_sees_the_original_input_every_time() -> None:
    def in_place(x: Tensor) -> Tensor:
        return x.add_(1)  # a transform that writes into its input

    data = TensorDataset(torch.zeros(2, 3))
    views = MultiView(data, in_place, 3, seed=0)[0][0]
    assert torch.equal(views, torch.ones(3, 3)), views
    assert torch.equal(data.tensors[0], torch.zeros(2, 3)), "the dataset was modified"


def test_torchvision_pipeline_on_pil_images_of_mixed_sizes() -> None:
    sizes = [(64, 96), (160, 120), (100, 100)]
    images = [Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)) for i, (h, w) in enumerate(sizes)]
    transform = v2.Compose([v2.ToImage(), pipeline(16)])
    ds = MultiView([(img, i) for i, img in enumerate(images)], transform, M, seed=0)
    batch = next(iter(loader(ds, batch_size=3)))
    assert batch.batch[0].shape == (M * 3, 3, 16, 16)
    assert batch.batch[1].tolist() == [0, 1, 2] * M
    for i, img in enumerate(images):
        ref = reference_views(ds, img, i, epoch=0)
        rows = batch.batch[0][i::3]
        assert torch.equal(rows, ref), f"sample {i}: off by {(rows - ref).abs().max()}"


# ---------------------------------------------------------------------------------------------------------------
# The collate: copy-major rows against a loop
# ---------------------------------------------------------------------------------------------------------------
Item = namedtuple("Item", ["label", "image"])


@pytest.mark.parametrize(
    ("make", "key"),
    [
        pytest.param(lambda x, i: (x, i, torch.tensor([i, -i])), 0, id="tuple"),
        pytest.param(lambda x, i: {"label": i, "image": x, "pair": torch.tensor([i, -i])}, "image", id="dict"),
        pytest.param(lambda x, i: Item(i, x), 1, id="namedtuple"),
        pytest.param(lambda x, i: x, 0, id="bare-input"),
    ],
)
def test_collate_layout_matches_a_loop(make: Any, key: Any) -> None:
    b, views = 5, 3
    xs = [torch.randn(views, 2, 4, generator=torch.Generator().manual_seed(i)) for i in range(b)]
    items = [make(x, i) for i, x in enumerate(xs)]
    out = multiview_collate(items, key)
    assert isinstance(out, Candidates)
    assert out.m == views
    assert out.num_samples == b
    batch = out.batch
    x = batch if isinstance(batch, Tensor) else batch[key]
    worst = 0.0
    for k in range(views):
        for i in range(b):
            worst = max(worst, float((x[k * b + i] - xs[i][k]).abs().max()))
            if not isinstance(batch, Tensor):
                others = [f for f in (batch.keys() if isinstance(batch, dict) else range(len(batch))) if f != key]
                for f in others:
                    expected = torch.as_tensor(items[i][f])
                    assert torch.equal(batch[f][k * b + i], expected), (f, k, i)
    assert worst == 0.0, f"rows differ from the loop by up to {worst}"
    if not isinstance(batch, Tensor):
        assert type(batch) is type(items[0]) if not isinstance(items[0], dict) else isinstance(batch, dict)


def test_collate_keeps_the_smallest_view_count() -> None:
    """Items made while the schedule switched the count: copy k is the same whatever the count, so truncate."""
    items = [(torch.arange(4.0)[:, None], 0), (torch.arange(1.0)[:, None], 1)]
    out = multiview_collate(items)
    assert out.m == 1
    assert out.batch[0].flatten().tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# Errors, each at the first batch and named
# ---------------------------------------------------------------------------------------------------------------
def crop_of_index_size(x: Tensor) -> Tensor:
    side = int(torch.randint(3, SIDE + 1, ()))
    return x[:, :side, :side]


def test_views_of_different_shapes_raise_at_the_first_batch_from_a_worker() -> None:
    ds = MultiView(Indexed(), crop_of_index_size, M, seed=0)
    with pytest.raises(ValueError, match=r"`transform` returned views of different shapes for sample \d+"):
        next(iter(loader(ds, 2)))


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        pytest.param([(torch.zeros(2, 3), 0), (torch.zeros(2, 4), 1)], ValueError, "different shapes", id="shapes"),
        pytest.param([(torch.zeros(3), 0), (7, 1)], TypeError, "got int.*MultiView", id="not-views"),
        pytest.param([], ValueError, "at least one item", id="empty"),
    ],
)
def test_collate_errors(items: list[Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        multiview_collate(items)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"m": 0}, ValueError, r"Expected `m` to be a positive integer, got 0", id="m"),
        pytest.param({"transform": 3}, TypeError, r"Expected `transform` to be callable, got 3", id="transform"),
        pytest.param({"dataset": 5}, TypeError, r"Expected `dataset` to be a map-style dataset", id="dataset"),
        pytest.param({"input_key": 1.5}, TypeError, r"Expected `input_key` to be an int .* got 1.5", id="key"),
        pytest.param({"seed": "a"}, ValueError, r"Expected `seed` to be an integer or None, got 'a'", id="seed"),
        pytest.param({"reseed": 1}, TypeError, r"Expected `reseed` to be callable or None, got 1", id="reseed"),
    ],
)
def test_constructor_validates(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"dataset": Indexed(), "transform": noisy, "m": 2} | kwargs
    with pytest.raises(error, match=match):
        MultiView(args.pop("dataset"), args.pop("transform"), args.pop("m"), **args)


def test_setters_validate_and_input_key_errors_name_the_fields() -> None:
    ds = MultiView(Indexed(), noisy, 4, seed=0)
    with pytest.raises(ValueError, match=r"Expected `views` to be 1 or `m`=4, got 2"):
        ds.set_views(2)
    with pytest.raises(ValueError, match=r"Expected `epoch` to be a non-negative integer, got -1"):
        ds.set_epoch(-1)
    with pytest.raises(KeyError, match=r"`input_key`='image' names no field of the dataset's dict item"):
        MultiView([{"img": torch.zeros(2)}], noisy, 2, input_key="image", seed=0)[0]


def test_reseed_hook_gets_each_copys_seed() -> None:
    seen: list[int] = []
    ds = MultiView(Indexed(), noisy, 3, seed=5, reseed=seen.append)
    ds.set_epoch(1)
    ds[4]
    assert seen == [mix_seed(5, 1, 4, k) for k in range(3)]


def test_multiview_module_imports_no_lightning() -> None:
    tree = ast.parse((ROOT / "lightning_maxup" / "multiview.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if "lightning" in n and not n.startswith(("lightning_maxup", "lightning_utilities"))}
    assert "lightning_maxup._lightning" not in names
    assert "lightning_maxup.training.callback" not in names


# ---------------------------------------------------------------------------------------------------------------
# Lightning: the schedule
# ---------------------------------------------------------------------------------------------------------------
class RecordViews(pl.LightningModule):
    """Trains a linear model on copy 0 of premade candidates and records each batch's view count and indices."""

    def __init__(self, out: str | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(3 * SIDE * SIDE, 3)
        self.out = out
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: Candidates, batch_idx: int) -> Tensor:
        x, y, index = batch.batch
        b = batch.num_samples
        self.seen.append(
            {
                "epoch": self.current_epoch,
                "m": batch.m,
                "index": index[:b].tolist(),
                "views": x.view(batch.m, b, -1).sum(-1).T.tolist(),
            }
        )
        return F.cross_entropy(self.net(x[:b].flatten(1)), y[:b])

    def on_train_end(self) -> None:
        if self.out is not None:
            Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kwargs: Any) -> pl.Trainer:
    for key, value in {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False}.items():
        kwargs.setdefault(key, value)
    return pl.Trainer(enable_progress_bar=False, enable_model_summary=False, **kwargs)


def float_pipeline(x: Tensor) -> Tensor:
    return noisy(x)


@pytest.mark.slow
def test_first_maxup_epoch_has_m_views_from_its_first_batch_with_persistent_workers() -> None:
    """Lightning makes epoch 0's iterator (and the workers' prefetch) before any callback hook, and each later
    epoch's after ``on_train_epoch_start``. The warm-up epoch therefore starts with up to prefetch_factor x workers
    = 4 batches of m views (copy 0 is the same either way) and then makes one view; the first MaxUp epoch makes m
    views from its first batch."""
    ds = MultiView(Indexed(40), float_pipeline, M, seed=0)
    dl = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=ds.collate_fn)
    model = RecordViews()
    trainer(max_epochs=3, callbacks=[MultiViewSchedule(warmup_epochs=1)]).fit(model, dl)
    by_epoch = [[s["m"] for s in model.seen if s["epoch"] == e] for e in range(3)]
    assert all(m in (1, M) for m in by_epoch[0]), by_epoch[0]
    assert by_epoch[0][4:] == [1] * 6, by_epoch[0]
    assert by_epoch[1:] == [[M] * 10, [M] * 10], by_epoch
    # the epoch is in the key: the same sample's views differ between epochs 1 and 2
    first = {i: v for s in model.seen if s["epoch"] == 1 for i, v in zip(s["index"], s["views"], strict=True)}
    second = {i: v for s in model.seen if s["epoch"] == 2 for i, v in zip(s["index"], s["views"], strict=True)}
    assert all(first[i] != second[i] for i in first)


class MultiViewData(pl.LightningDataModule):
    """What a data module does for bit-exact resumes: set the dataset's epoch in ``train_dataloader()``."""

    def __init__(self, set_epoch: bool = True) -> None:
        super().__init__()
        self.set_epoch = set_epoch

    def setup(self, stage: str) -> None:
        self.train_set = MultiView(Indexed(16), float_pipeline, M, seed=9)

    def train_dataloader(self) -> DataLoader:
        if self.set_epoch:
            self.train_set.set_epoch(training_epoch(self.trainer))  # restored by now, before the loader is iterated
        return DataLoader(
            self.train_set, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=self.train_set.collate_fn
        )


def views_of_epoch(model: RecordViews, epoch: int) -> dict[int, list[float]]:
    return {i: v for s in model.seen if s["epoch"] == epoch for i, v in zip(s["index"], s["views"], strict=True)}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")  # resuming there
def test_resumed_fit_makes_the_uninterrupted_views(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    whole = RecordViews()
    trainer(max_epochs=3, callbacks=[MultiViewSchedule(warmup_epochs=1)]).fit(whole, datamodule=MultiViewData())
    first = RecordViews()
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[MultiViewSchedule(warmup_epochs=1), save], enable_checkpointing=True).fit(
        first, datamodule=MultiViewData()
    )
    resumed = RecordViews()
    again = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=3, callbacks=[MultiViewSchedule(warmup_epochs=1), again], enable_checkpointing=True).fit(
        resumed, datamodule=MultiViewData(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert [s["epoch"] for s in resumed.seen] == [2] * 4
    assert views_of_epoch(resumed, 2) == views_of_epoch(whole, 2)
    assert views_of_epoch(resumed, 2) != views_of_epoch(whole, 1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")  # resuming there
def test_resume_without_setting_the_epoch_warns(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    save = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[MultiViewSchedule(), save], enable_checkpointing=True).fit(
        RecordViews(), datamodule=MultiViewData(set_epoch=False)
    )
    with pytest.warns(UserWarning, match=r"first batches were made at epoch 0, not the trainer's 1"):
        trainer(max_epochs=2, callbacks=[MultiViewSchedule(), save], enable_checkpointing=True).fit(
            RecordViews(), datamodule=MultiViewData(set_epoch=False), ckpt_path=str(tmp_path / "last.ckpt")
        )


@pytest.mark.parametrize(
    ("make_loader", "match"),
    [
        pytest.param(
            lambda ds: DataLoader(Indexed(), batch_size=4), "found no MultiView in the training DataLoader", id="none"
        ),
    ],
)
def test_schedule_refuses_a_loader_without_the_wrapper(make_loader: Any, match: str) -> None:
    model = RecordViews()
    ds = MultiView(Indexed(), float_pipeline, M, seed=0)
    with pytest.raises(ValueError, match=match):
        trainer(max_epochs=1, callbacks=[MultiViewSchedule()]).fit(model, make_loader(ds))
    assert model.seen == [], "the error must come before the first step"


def test_schedule_views_follow_the_maxup_callback() -> None:
    schedule = MultiViewSchedule()
    maxup = MaxUp(warmup_epochs=2)
    assert [schedule.views(e, 4, maxup) for e in range(4)] == [1, 1, 4, 4]
    assert [schedule.views(e, 4, maxup, fast_dev_run=True) for e in range(2)] == [4, 4]
    assert schedule.views(0, 4, None) == 4
    with pytest.raises(ValueError, match="Expected `warmup_epochs` to be a non-negative integer"):
        MultiViewSchedule(warmup_epochs=-1)


# ---------------------------------------------------------------------------------------------------------------
# Lightning: MaxUp on premade candidates (the core side: lightning_maxup.core.functional / mixin)
# ---------------------------------------------------------------------------------------------------------------
class LitMaxUp(MaxUpMixin, pl.LightningModule):
    def __init__(self, m: int = M) -> None:
        super().__init__(m=m, augment=None, seed=0)
        self.net = nn.Linear(3 * SIDE * SIDE, 3)
        self.steps: list[tuple[int, int]] = []

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.net(x.flatten(1)), y, reduction="none")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.steps.append((self.current_epoch, self.maxup_active_m))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_fit_with_warmup_trains_maxup_on_worker_made_copies() -> None:
    ds = MultiView(Indexed(), float_pipeline, M, seed=0)
    dl = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=ds.collate_fn)
    model = LitMaxUp()
    t = trainer(max_epochs=2, callbacks=[MaxUp(warmup_epochs=1), MultiViewSchedule()])
    t.fit(model, dl)
    assert [m for _, m in model.steps] == [1] * 6 + [M] * 6
    assert t.callback_metrics["maxup/m"].item() == M
    assert t.callback_metrics["maxup/worst_loss"] >= t.callback_metrics["maxup/mean_loss"]


def test_loader_m_different_from_the_module_m_raises_before_the_first_step() -> None:
    ds = MultiView(Indexed(), float_pipeline, 3, seed=0)
    model = LitMaxUp(m=M)
    with pytest.raises(ValueError, match=r"MultiView makes `m`=3 views per sample, but the module's MaxUp `m` is 4"):
        trainer(max_epochs=1, callbacks=[MultiViewSchedule()]).fit(model, loader(ds, batch_size=4))
    assert model.steps == []


def test_wrong_m_without_the_schedule_raises_at_the_first_batch() -> None:
    ds = MultiView(Indexed(), float_pipeline, 3, seed=0)
    with pytest.raises(ValueError, match=r"Candidates with 3 copies per sample, but the step runs `m`=4"):
        trainer(max_epochs=1).fit(LitMaxUp(m=M), loader(ds, batch_size=4))


def test_candidates_with_an_augment_set_raise_at_the_first_batch() -> None:
    from lightning_maxup.augment import GaussianNoise

    class WithAugment(LitMaxUp):
        def __init__(self) -> None:
            super().__init__()
            self.maxup_config = self.maxup_config.replace(augment=GaussianNoise(0.1))

    ds = MultiView(Indexed(), float_pipeline, M, seed=0)
    with pytest.raises(ValueError, match=r"Candidates made by the loader, but `augment` is"):
        trainer(max_epochs=1).fit(WithAugment(), loader(ds, batch_size=4))


# ---------------------------------------------------------------------------------------------------------------
# DDP: 2 CPU ranks
# ---------------------------------------------------------------------------------------------------------------


class LitMaxUpRecord(LitMaxUp):
    """MaxUp on premade candidates, recording what each batch held; writes ``rank<r>.json`` at the end."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        x, _, index = batch.batch
        b = batch.num_samples
        views = x.view(batch.m, b, -1).sum(-1).T.tolist()
        self.seen.append({"epoch": self.current_epoch, "m": batch.m, "index": index[:b].tolist(), "views": views})
        return super().on_train_batch_start(batch, batch_idx)

    def on_train_end(self) -> None:
        params = [p.detach().flatten().tolist() for p in self.parameters()]
        record = {"seen": self.seen, "steps": self.steps, "params": params}
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(record))


# The 2-rank ddp_spawn test runs the wired-once setup:
# tests/data/test_wired_once.py::test_maxup_callback_alone_on_two_ddp_spawn_ranks


# ---------------------------------------------------------------------------------------------------------------
# The recipe and the example
# ---------------------------------------------------------------------------------------------------------------
def write_image_folder(root: Path, classes: int = 2, per_class: int = 3) -> None:
    """Small PNG and JPEG files of mixed sizes in ImageFolder layout (train/ and val/)."""
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in g.integers(24, 72, size=2))
                image = Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


class _RecordingCLI(pl_cli.LightningCLI):
    instances: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _RecordingCLI.instances.append(self)


@pytest.mark.slow
def test_imagenet_multiview_recipe_fits_on_image_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lightning-maxup fit --config examples/configs/imagenet_multiview.yaml --trainer.fast_dev_run=true`` on a
    generated ImageFolder tree, with 2 persistent workers decoding and making the views; shrunk to run on a CPU."""
    import yaml

    from lightning_maxup.apps.cli import main

    write_image_folder(tmp_path / "images")
    config = yaml.safe_load((ROOT / "examples" / "configs" / "imagenet_multiview.yaml").read_text())
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    backbone.update(name="resnet18", weights=None, num_classes=2)
    config["model"]["init_args"]["num_classes"] = 2
    data = config["data"]["init_args"]
    data.update(root=str(tmp_path / "images"), batch_size=2, num_workers=2, image_size=32, resize_size=36)
    config["trainer"]["callbacks"][0]["init_args"]["selection_size"] = 16
    config["trainer"]["accelerator"] = "cpu"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(pl_cli, "LightningCLI", _RecordingCLI)
    monkeypatch.chdir(tmp_path)
    _RecordingCLI.instances.clear()
    assert main(["fit", "--config", str(path), "--trainer.fast_dev_run=true"]) == 0
    trainer = _RecordingCLI.instances[0].trainer
    assert trainer.global_step == 1
    assert trainer.callback_metrics["maxup/m"].item() == 4
    assert torch.isfinite(trainer.callback_metrics["maxup/worst_loss"])
    assert "val/acc" in trainer.callback_metrics


@pytest.mark.slow
def test_imagenet_multiview_example_runs_warmup_then_maxup() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_example_imagenet_multiview", ROOT / "examples/imagenet_multiview.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.main(["--fake"])
    assert trainer.current_epoch == 2
    assert trainer.callback_metrics["maxup/m"].item() == 4


def test_candidates_without_the_schedule_warn_once() -> None:
    ds = MultiView(Indexed(), float_pipeline, M, seed=0)
    with pytest.warns(UserWarning, match="no MaxUp callback") as record:
        trainer(max_epochs=2).fit(LitMaxUp(m=M), loader(ds, batch_size=4))
    assert sum("no MaxUp callback" in str(w.message) for w in record) == 1
