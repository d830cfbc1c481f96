"""Wired once: ``MultiView`` + a plain ``DataLoader(shuffle=True, num_workers=...)`` + ``MaxUp`` and nothing else.

What the tests pin down: ``default_collate`` makes the same ``Candidates`` as ``multiview_collate`` for every item
kind; a fit with only the ``MaxUp`` callback makes one view per sample during the warm-up and ``m`` fresh ones
(the seeded loop's) in every MaxUp epoch, from each epoch's first batch, with persistent workers and on 2
``ddp_spawn`` ranks; resuming (after the warm-up with the plain loader, mid-epoch with a resumable one, in or after
the warm-up) ends on the uninterrupted run's parameters bit for bit, whatever the global generator's state at
resume; a plain loop that never advances the epoch is warned; the 0.3 wiring still works, and its deprecated
callback can no longer disagree with ``MaxUp``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_maxup import MaxUp
from lightning_maxup.core.batch import Candidates
from lightning_maxup.data.multiview import MultiView
from lightning_maxup.training.schedule import MultiViewSchedule
from tests.data.test_multiview import Indexed, LitMaxUp, LitMaxUpRecord, M, N, float_pipeline, reference_views, trainer

RESUMING = "ignore:Checkpoint directory .* exists and is not empty:UserWarning"
STOPS_EARLY = "ignore:This fit never runs a MaxUp step:UserWarning"
FEW_WORKERS = "ignore:.*does not have many workers.*"

Pair = namedtuple("Pair", ["image", "label"])


def as_tuple(i: int, x: Tensor) -> Any:
    return (x, i)


def as_list(i: int, x: Tensor) -> Any:
    return [x, i]


def as_dict(i: int, x: Tensor) -> Any:
    return {"label": i, "image": x}


def as_namedtuple(i: int, x: Tensor) -> Any:
    return Pair(x, i)


def as_bare(i: int, x: Tensor) -> Any:
    return x


class Items(torch.utils.data.Dataset):
    def __init__(self, make: Any) -> None:
        self.make = make

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> Any:
        return self.make(i, torch.full((3,), float(i)))


def jitter(x: Tensor) -> Tensor:
    return x + torch.rand(3)


def flatten(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [batch[k] for k in sorted(batch)]
    return list(batch)


# ---------------------------------------------------------------------------------------------------------------
# default_collate makes Candidates
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "key"),
    [
        pytest.param(as_tuple, 0, id="tuple"),
        pytest.param(as_list, 0, id="list"),
        pytest.param(as_dict, "image", id="dict"),
        pytest.param(as_namedtuple, 0, id="namedtuple"),
        pytest.param(as_bare, 0, id="bare"),
    ],
)
@pytest.mark.parametrize("workers", [pytest.param(0, id="0-workers"), pytest.param(2, id="2-workers")])
def test_default_collate_makes_the_collate_fn_batches(make: Any, key: Any, workers: int) -> None:
    ds = MultiView(Items(make), jitter, 3, input_key=key, seed=1)
    plain = list(DataLoader(ds, batch_size=4, num_workers=workers))
    explicit = list(DataLoader(ds, batch_size=4, collate_fn=ds.collate_fn))
    assert [type(b) for b in plain] == [Candidates] * 3, [type(b).__name__ for b in plain]
    for a, b in zip(plain, explicit, strict=True):
        assert a.m == b.m == 3
        assert type(a.batch) is type(b.batch) is type(make(0, torch.zeros(3)))  # the user's item type, not a marker
        assert all(type(t) is Tensor for t in flatten(a.batch)), [type(t) for t in flatten(a.batch)]
        assert all(torch.equal(s, t) for s, t in zip(flatten(a.batch), flatten(b.batch), strict=True))
    item = ds[2]
    if make is as_bare:
        assert item.shape == (3, 3)
    else:
        x, y = (item["image"], item["label"]) if make is as_dict else item  # items unpack and index as before
        assert x.shape == (3, 3)
        assert y == 2


# ---------------------------------------------------------------------------------------------------------------
# A fit with the MaxUp callback alone
# ---------------------------------------------------------------------------------------------------------------
class Record(LitMaxUp):
    """MaxUp on loader-made candidates, recording each batch: epoch, copies, indices and every view's sum."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        assert isinstance(batch, Candidates), type(batch)
        x, _, index = batch.batch
        b = batch.num_samples
        views = x.view(batch.m, b, -1).sum(-1).T.tolist()
        self.seen.append({"epoch": self.current_epoch, "m": batch.m, "index": index[:b].tolist(), "views": views})
        return super().on_train_batch_start(batch, batch_idx)


def plain_loader(ds: MultiView, **kwargs: Any) -> DataLoader:
    return DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True, **kwargs)


def check_views(seen: list[dict[str, Any]], ds: MultiView, epochs: int, warmup: int) -> None:
    """Every epoch covers the data once, with 1 view in the warm-up and m after, each the seeded loop's view."""
    data = Indexed()
    for epoch in range(epochs):
        steps = [s for s in seen if s["epoch"] == epoch]
        assert sorted(i for s in steps for i in s["index"]) == list(range(N)), f"epoch {epoch} covers the data once"
        assert {s["m"] for s in steps} == {1 if epoch < warmup else M}, (epoch, [s["m"] for s in steps])
        for s in steps:
            for i, sums in zip(s["index"], s["views"], strict=True):
                ref = reference_views(ds, data[i][0], i, epoch, views=s["m"]).flatten(1).sum(-1)
                assert torch.allclose(torch.tensor(sums), ref, rtol=0, atol=1e-4), (epoch, i, sums, ref.tolist())


@pytest.mark.slow
@pytest.mark.filterwarnings(FEW_WORKERS)
def test_maxup_callback_alone_makes_one_view_in_the_warmup_and_m_fresh_ones_after() -> None:
    ds = MultiView(Indexed(), float_pipeline, M, seed=4)
    model = Record()
    trainer(max_epochs=3, callbacks=[MaxUp(warmup_epochs=1)]).fit(model, plain_loader(ds))
    check_views(model.seen, ds, epochs=3, warmup=1)
    first = {i: v for s in model.seen if s["epoch"] == 1 for i, v in zip(s["index"], s["views"], strict=True)}
    second = {i: v for s in model.seen if s["epoch"] == 2 for i, v in zip(s["index"], s["views"], strict=True)}
    assert all(first[i] != second[i] for i in first), "epochs 1 and 2 made the same views"


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch (``state_dict``/``load_state_dict``): it skips what it gave."""

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


def fit(
    tmp: Path,
    loader_type: type,
    stop: dict[str, int] | None = None,
    ckpt: str | None = None,
    seed: int = 0,
    workers: int = 2,
) -> Record:
    """3 epochs, warm-up 1 (6 steps an epoch); ``stop`` ends it early, ``ckpt`` resumes. Every step is saved."""
    torch.manual_seed(seed)  # the global generator at the start of a fit: a resumed fit must not depend on it
    ds = MultiView(Indexed(), float_pipeline, M, seed=4)
    loader = loader_type(ds, batch_size=4, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    model = Record()
    save = ModelCheckpoint(dirpath=tmp, save_last=True, every_n_train_steps=1)
    limits = stop or {"max_epochs": 3}
    t = trainer(callbacks=[MaxUp(warmup_epochs=1), save], enable_checkpointing=True, **limits)
    t.fit(model, loader, ckpt_path=ckpt)
    return model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Record:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        return fit(tmp_path_factory.mktemp("whole"), DataLoader, seed=123)


@pytest.mark.slow
@pytest.mark.filterwarnings(RESUMING, STOPS_EARLY, FEW_WORKERS)
@pytest.mark.parametrize(
    ("loader_type", "stop", "workers"),
    [
        pytest.param(DataLoader, {"max_epochs": 2}, 2, id="plain-loader-after-the-warmup"),
        pytest.param(DataLoader, {"max_epochs": 1}, 0, id="plain-loader-0-workers-at-the-warmups-end"),
        pytest.param(ResumableLoader, {"max_steps": 3}, 2, id="resumable-mid-epoch-in-the-warmup"),
        pytest.param(ResumableLoader, {"max_steps": 9}, 2, id="resumable-mid-epoch-after-the-warmup"),
    ],
)
def test_resume_ends_on_the_uninterrupted_parameters(
    tmp_path: Path, uninterrupted: Record, loader_type: type, stop: dict[str, int], workers: int
) -> None:
    """The uninterrupted run has 2 workers; the order and the views do not depend on the number of workers."""
    fit(tmp_path, loader_type, stop=stop, seed=7, workers=workers)
    resumed = fit(tmp_path, loader_type, ckpt=str(tmp_path / "last.ckpt"), seed=999, workers=workers)
    done = len(uninterrupted.seen) - len(resumed.seen)
    assert resumed.seen == uninterrupted.seen[done:], "the resumed fit made other batches (order, views or copies)"
    assert resumed.seen[0]["m"] == (M if done >= 6 else 1)
    for (name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {float((p - q).abs().max())}"


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
@pytest.mark.usefixtures("file_system_sharing")
@pytest.mark.filterwarnings(FEW_WORKERS)
def test_maxup_callback_alone_on_two_ddp_spawn_ranks(tmp_path: Path) -> None:
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    ds = MultiView(Indexed(), float_pipeline, M, seed=4)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=1, persistent_workers=True)
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    t = trainer(max_epochs=2, devices=2, strategy=strategy, callbacks=[MaxUp(warmup_epochs=1)])
    t.fit(LitMaxUpRecord(str(tmp_path)), loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["params"] == ranks[1]["params"], "parameters differ across ranks"
    assert [m for _, m in ranks[0]["steps"]] == [1] * 4 + [M] * 4
    check_views([s for r in ranks for s in r["seen"]], ds, epochs=2, warmup=1)


# ---------------------------------------------------------------------------------------------------------------
# Resuming with the same dataset object, and the deprecated schedule
# ---------------------------------------------------------------------------------------------------------------
class Pause(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        time.sleep(2.0)


@pytest.mark.slow
@pytest.mark.filterwarnings(RESUMING, STOPS_EARLY, FEW_WORKERS, "ignore:MultiViewSchedule is deprecated")
@pytest.mark.parametrize("legacy", [pytest.param(True, id="0.3-wiring"), pytest.param(False, id="maxup-alone")])
def test_resume_from_the_warmup_with_the_same_dataset_makes_m_views_at_once(tmp_path: Path, legacy: bool) -> None:
    ds = MultiView(Indexed(), float_pipeline, M, seed=0)
    kwargs: dict[str, Any] = {"collate_fn": ds.collate_fn} if legacy else {}
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, **kwargs)

    def callbacks() -> list[Any]:
        extra = [MultiViewSchedule()] if legacy else []
        return [MaxUp(warmup_epochs=1), ModelCheckpoint(dirpath=tmp_path, save_last=True), *extra]

    trainer(max_epochs=1, callbacks=callbacks(), enable_checkpointing=True).fit(Record(), loader)
    resumed = Record()
    # The workers start prefetching when Lightning makes the iterator, before any callback's on_train_start; hold
    # the training process there, so that they make their first items before a callback could still set them.
    trainer(max_epochs=2, callbacks=[Pause(), *callbacks()], enable_checkpointing=True).fit(
        resumed, loader, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert [s["m"] for s in resumed.seen] == [M] * 6


def test_schedule_beside_maxup_with_another_warmup_raises_before_training() -> None:
    ds = MultiView(Indexed(), float_pipeline, M, seed=0)
    model = Record()
    with pytest.warns(DeprecationWarning, match=r"MultiViewSchedule is deprecated .* use Trainer\(callbacks=\[MaxUp"):
        schedule = MultiViewSchedule(warmup_epochs=2)
    with pytest.raises(ValueError, match=r"MultiViewSchedule's `warmup_epochs`=2 differs from the MaxUp callback's"):
        trainer(max_epochs=3, callbacks=[MaxUp(warmup_epochs=1), schedule]).fit(model, plain_loader(ds))
    assert model.seen == []


# ---------------------------------------------------------------------------------------------------------------
# Plain loops and bad input
# ---------------------------------------------------------------------------------------------------------------
def test_a_plain_loop_that_never_sets_the_epoch_is_warned() -> None:
    ds = MultiView(Indexed(100), float_pipeline, 2, seed=0)
    loader = DataLoader(ds, batch_size=10, shuffle=True)
    list(loader)  # epoch 0
    with pytest.warns(UserWarning, match=r"made 165 items at epoch 0 for a dataset of 100 samples.*set_epoch"):
        list(loader)  # "epoch 1", without set_epoch: the same views again
    for epoch in range(3):  # with set_epoch, no warning (every warning is an error here)
        ds.set_epoch(epoch)
        list(loader)


def test_evaluation_copies_are_fixed_and_never_warn() -> None:
    ds = MultiView(Indexed(), float_pipeline, M, seed=0, evaluation=True)
    first = [b.batch[0] for b in DataLoader(ds, batch_size=8)]
    for _ in range(7):
        again = [b.batch[0] for b in DataLoader(ds, batch_size=8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match=r"Expected `epoch`=0 for an evaluation MultiView .* got 3"):
        ds.set_epoch(3)


class Stream(IterableDataset):
    def __iter__(self) -> Any:
        yield from ((torch.zeros(3), 0) for _ in range(4))

    def __len__(self) -> int:
        return 4


def test_an_iterable_dataset_with_len_is_refused_by_the_constructor() -> None:
    with pytest.raises(TypeError, match=r"Expected `dataset` to be a map-style dataset .* got an IterableDataset"):
        MultiView(Stream(), jitter, 2)


def test_seed_mismatch_across_ranks_raises_as_documented() -> None:
    """The docs promised that rank 0's seed is set on every rank; the code raises, and now the docs say so."""
    import inspect

    docs = " ".join(inspect.getdoc(o) or "" for o in (MultiView, MultiView.set_seed, MultiViewSchedule))
    assert "rank 0's" in docs
    assert "raises" in docs
    assert "gives every rank rank 0's" not in docs
    assert "sets rank 0's on every rank" not in docs

    from lightning_maxup.training._wiring import check_same_seed

    class Strategy:
        def broadcast(self, value: int, src: int = 0) -> int:
            return 11

    class Trainer:
        world_size = 2
        strategy = Strategy()

    ds = MultiView(TensorDataset(torch.zeros(4, 3)), jitter, 2, seed=5)
    with pytest.raises(ValueError, match=r"MultiView's seed differs across ranks \(5 here, 11 on rank 0\)"):
        check_same_seed(Trainer(), ds)


# ---------------------------------------------------------------------------------------------------------------
# The docs' per-image snippets
# ---------------------------------------------------------------------------------------------------------------
def snippet(page: str, name: str) -> str:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / page).read_text(encoding="utf-8")
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", text, re.S)
    assert found is not None, f"docs/{page} lost its {name} snippet"
    return found[1]


@pytest.mark.slow
def test_the_per_image_snippets_of_the_docs_run(tmp_path: Path) -> None:
    """docs/pipelines.md (a user's own MaxUpMixin module, wired once) and docs/fidelity.md (worst-of-k on the same
    pipeline's copies, selection fidelity), run as one script, as a user would paste them; the library warns nothing."""
    import subprocess
    import sys

    script = snippet("pipelines.md", "per-image") + snippet("fidelity.md", "per-image-evaluation")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lightning_maxup" not in result.stderr, result.stderr[-4000:]  # no warning from the library
    assert "'val/worst_of_10_acc'" in result.stdout, result.stdout[-2000:]
    assert "'maxup/view_agreement'" in result.stdout, result.stdout[-2000:]
