"""``randomness="sample"``: augmentation draws keyed by (seed, epoch, sample index, copy index).

With it, and a model without batch statistics, 2 ranks with batches of B/2 make the same parameter update as
1 process with batches of B: a ``DistributedSampler(shuffle=False)`` (the test module's own; Lightning's default
one shuffles) deals item ``2j + r`` to rank ``r``, so the two ranks' batches together are the single process's
batch, each sample gets the same copies, the same worst copy and the same gradient, and DDP's gradient average
equals the big batch's mean. Every sample appears twice, and its two items land on different ranks: a repeat is
keyed by its occurrence in the global batch, so it draws copies of its own in both runs.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from ddp_common import CollectiveRecorder, LitDDP, max_param_diff, read_ranks  # noqa: E402

from lightning_maxup import MaxUpMixin  # noqa: E402
from lightning_maxup.augment import (  # noqa: E402
    Compose,
    CutMix,
    Cutout,
    GaussianNoise,
    Mixup,
    PointGaussianNoise,
    PointJitter,
    RandAugment,
    RandomCrop,
    RandomHorizontalFlip,
    RandomPointRotation,
    RandomPointScale,
    WordEmbeddingDropout,
)
from lightning_maxup.core.random import KeyedGenerator  # noqa: E402
from lightning_maxup.core.views import PointSubset  # noqa: E402
from lightning_maxup.data.datasets import IndexedDataset  # noqa: E402


class _Lit(MaxUpMixin, pl.LightningModule):
    def __init__(self, **maxup: Any) -> None:
        super().__init__(**maxup)
        self.net = nn.Linear(4, 3)

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")


def test_indexed_dataset_appends_index() -> None:
    ds = IndexedDataset(TensorDataset(torch.arange(5.0), torch.arange(5) * 10))
    assert len(ds) == 5
    x, y, i = ds[3]
    assert (float(x), int(y), i) == (3.0, 30, 3)
    assert IndexedDataset([7, 8])[1] == (8, 1)
    with pytest.raises(TypeError, match="Expected `dataset` to be a map-style dataset"):
        IndexedDataset(3)


def test_sample_randomness_needs_sample_index() -> None:
    model = _Lit(m=2, augment=GaussianNoise(0.1), randomness="sample")
    with pytest.raises(NotImplementedError, match="must implement `maxup_sample_index"):
        model.maxup_step((torch.randn(4, 4), torch.zeros(4, dtype=torch.long)))


def test_randomness_validated() -> None:
    with pytest.raises(ValueError, match="Expected `randomness` to be one of 'rank', 'sample', got 'step'"):
        _Lit(randomness="step")


def test_keyed_draws_follow_the_sample_not_the_batch() -> None:
    """A sample's m copies get the same noise whichever batch, position or batch size it comes in."""
    model = _Lit(m=3, seed=5, randomness="sample")
    model.maxup_sample_index = lambda batch: batch[-1]  # type: ignore[method-assign]
    noise = GaussianNoise(1.0)
    x = torch.zeros(6, 4)

    def draws(index: list[int]) -> Tensor:
        # Both batches as the same step: the keys include the step count, which each generator advances.
        model._maxup_draws = 0
        idx = torch.tensor(index)
        g = model.maxup_keyed_generator((x[: len(index)], idx), 3, torch.device("cpu"))
        return noise.sample(x[: len(index)].repeat(3, 1), g)["noise"].view(3, len(index), 4)

    whole = draws([0, 1, 2, 3, 4, 5])
    part = draws([4, 1])
    torch.testing.assert_close(part[:, 0], whole[:, 4], rtol=0, atol=0)
    torch.testing.assert_close(part[:, 1], whole[:, 1], rtol=0, atol=0)
    assert not torch.equal(whole[0, 1], whole[1, 1]), "copies of a sample must differ"


# --------------------------------------------------------------------------------------------------------------------
# Which built-in augmentations are world-size invariant: two ranks with half the rows each draw and output exactly
# what one process with all the rows does (docs/augmentations.md has the table).
# --------------------------------------------------------------------------------------------------------------------
_N = 16


def _data(kind: str) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 5, (_N,), generator=g)
    if kind == "images":
        return torch.rand(_N, 3, 12, 12, generator=g), labels
    if kind == "points":
        return torch.randn(_N, 40, 3, generator=g), labels
    tokens = torch.randint(0, 9, (_N, 6), generator=g)
    return tokens, tokens.roll(1, dims=1)


def _keys() -> Tensor:
    # (sample index, copy index) of m = 4 copies of 4 samples, copy-major, as the mixin keys the rows.
    return torch.stack([torch.arange(_N) % 4 + 100, torch.arange(_N) // 4], dim=1)


def _split_matches_whole(augment: Any, kind: str, ranks: int = 2) -> bool:
    batch = _data(kind)
    whole = augment(batch, generator=KeyedGenerator(9, _keys()))
    for rank in range(ranks):
        rows = torch.arange(rank, _N, ranks)  # a DistributedSampler(shuffle=False) deal
        part = augment(tuple(t[rows] for t in batch), generator=KeyedGenerator(9, _keys()[rows]))
        if len(part) != len(whole) or not all(torch.equal(w[rows], p) for w, p in zip(whole, part, strict=True)):
            return False
    return True


INVARIANT = [
    pytest.param(lambda: RandomCrop(12, padding=3), "images", id="RandomCrop"),
    pytest.param(RandomHorizontalFlip, "images", id="RandomHorizontalFlip"),
    pytest.param(lambda: Cutout(5), "images", id="Cutout"),
    pytest.param(lambda: GaussianNoise(0.2), "images", id="GaussianNoise"),
    pytest.param(lambda: RandAugment(3, 9, random_magnitude=True, grouping="sorted"), "images", id="RandAugment"),
    pytest.param(lambda: RandAugment(3, 9, grouping="masked"), "images", id="RandAugment-masked"),
    pytest.param(
        lambda: Compose([RandomCrop(12, padding=3), RandomHorizontalFlip(), Cutout(5)]), "images", id="Compose"
    ),
    pytest.param(PointJitter, "points", id="PointJitter"),
    pytest.param(lambda: PointGaussianNoise(0.1, min_sigma=0.0), "points", id="PointGaussianNoise"),
    pytest.param(lambda: RandomPointScale(anisotropic=True), "points", id="RandomPointScale"),
    pytest.param(RandomPointRotation, "points", id="RandomPointRotation"),
    pytest.param(lambda: WordEmbeddingDropout(0.3, vocab_size=9), "tokens", id="WordEmbeddingDropout"),
]


@pytest.mark.parametrize(("augment", "kind"), INVARIANT)
def test_augmentation_is_world_size_invariant(augment: Any, kind: str) -> None:
    assert _split_matches_whole(augment(), kind, ranks=2)
    assert _split_matches_whole(augment(), kind, ranks=4)


@pytest.mark.parametrize("augment", [lambda: CutMix(1.0, 5), lambda: Mixup(1.0, 5)], ids=["CutMix", "Mixup"])
def test_mixing_partners_come_from_the_local_batch(augment: Any) -> None:
    """CutMix and Mixup are not invariant: a row's partner is another row of the batch the rank holds."""
    aug = augment()
    x, y = _data("images")
    rows = torch.arange(0, _N, 2)
    whole = aug.sample((x, y), KeyedGenerator(9, _keys()))
    part = aug.sample((x[rows], y[rows]), KeyedGenerator(9, _keys()[rows]))
    # The weight (and CutMix's box) is keyed by the row and so the same on any rank ...
    assert torch.equal(whole["lam"][rows], part["lam"])
    # ... but the partner is a position in the local batch: a different sample once the batch is split.
    assert not torch.equal(rows[part["partner"]], whole["partner"][rows])
    assert not _split_matches_whole(aug, "images")


def test_point_subset_view_is_world_size_invariant() -> None:
    x, y = _data("points")
    view = PointSubset(16)
    whole, _ = view((x, y))
    for rows in (torch.arange(0, _N, 2), torch.arange(1, _N, 2)):
        assert torch.equal(view((x[rows], y[rows]))[0], whole[rows])


def _fit(out: Path, devices: int, batch_size: int, repeats: int) -> dict[str, Any]:
    model = LitDDP(
        norm="none", n=32, batch_size=batch_size, indexed=True, repeats=repeats, m=4, seed=11, randomness="sample",
        lr=0.2,
    )  # fmt: skip
    strategy: Any = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        callbacks=[CollectiveRecorder(str(out))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model)
    ranks = read_ranks(out, devices)
    for r in ranks[1:]:
        assert max_param_diff(ranks[0], r) == 0.0
    return ranks[0]


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
@pytest.mark.usefixtures("file_system_sharing")
def test_two_ranks_half_batch_match_one_process_full_batch(tmp_path: Path) -> None:
    # Each sample twice in a row: one process sees [0, 0, 1, 1, ...]; the sampler deals the repeats to ranks 0 and
    # 1, as DeiT's RASampler does. Keyed by their occurrence in the global batch, both runs draw the same copies.
    single = _fit(tmp_path / "single", devices=1, batch_size=8, repeats=2)
    double = _fit(tmp_path / "ddp", devices=2, batch_size=4, repeats=2)
    assert single["steps"][0]["index"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert double["steps"][0]["index"] == [0, 1, 2, 3], "rank 0 holds the first of each pair"
    assert len(single["steps"]) == len(double["steps"]) == 2 * 32 // 8
    assert all(s["m"] == 4 for s in single["steps"])
    initial = {"params": [p.detach().double().flatten().tolist() for p in LitDDP(norm="none").parameters()]}
    moved = max_param_diff(single, initial)
    assert moved > 1e-3, "training should move the parameters"
    diff = max_param_diff(single, double)
    assert diff < 1e-5, f"1 process x B=8 and 2 ranks x B=4 differ by up to {diff:.3g} (training moved {moved:.3g})"
