"""A MaxUp step makes no host-device sync: no ``.item()``, no data-dependent shapes, no tensors from Python data.

Every step runs under :class:`tests.sync_counter.SyncCounter` on the CPU, which records the ops that would make the
host wait on an accelerator. Generators and batches are built before the counter starts; each augmentation is
called once before (as the mixin's pre-flight check does), since its first call may check label or token ranges on
the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.augment import (
    Compose,
    CutMix,
    Cutout,
    GaussianNoise,
    Mixup,
    PointGaussianNoise,
    PointJitter,
    PointSubset,
    RandAugment,
    RandomCrop,
    RandomHorizontalFlip,
    RandomPointRotation,
    RandomPointScale,
    WordEmbeddingDropout,
    embedding_scale,
)
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import KeyedGenerator
from tests.sync_counter import SyncCounter

M, B, CLASSES = 4, 6, 5


class _ImageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


class _PointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.point = nn.Linear(3, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.point(x).relu().amax(dim=1))


class _TokenNet(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, tokens: Tensor, scale: Tensor | None) -> Tensor:
        emb = self.embed(tokens)
        if scale is not None:
            emb = emb * scale[..., None]
        return self.head(emb)


def _image_case() -> tuple[nn.Module, Callable[[Any], Tensor], Any]:
    net = _ImageNet()
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(B, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (B,), generator=g))
    return net, lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none"), batch


def _point_case() -> tuple[nn.Module, Callable[[Any], Tensor], Any]:
    net = _PointNet()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(B, 64, 3, generator=g), torch.randint(0, CLASSES, (B,), generator=g))
    return net, lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none"), batch


def _text_case() -> tuple[nn.Module, Callable[[Any], Tensor], Any]:
    vocab = 11
    net = _TokenNet(vocab)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (B, 7), generator=g)

    def loss_fn(b: Any) -> Tensor:
        logits = net(b[0], embedding_scale(b))
        return F.cross_entropy(logits.transpose(1, 2), b[1], reduction="none").mean(1)

    return net, loss_fn, (tokens, tokens.roll(1, dims=1))


def _generator(kind: str) -> Any:
    if kind == "torch":
        return torch.Generator().manual_seed(0)
    return KeyedGenerator(3, torch.stack([torch.arange(M * B) % B, torch.arange(M * B) // B], dim=1))


def _count(case: Callable[[], Any], augment: Any, kind: str, **options: Any) -> SyncCounter:
    net, loss_fn, batch = case()
    # The pre-flight: the augmentation's first call may check its labels on the host.
    maxup_step(loss_fn, batch, augment=augment, m=M, check_finite=False, model=net, generator=_generator(kind))
    generator = _generator(kind)
    with SyncCounter() as counter:
        out = maxup_step(
            loss_fn, batch, augment=augment, m=M, check_finite=False, model=net, generator=generator, **options
        )
    assert out.candidate_losses.shape == (M, B)
    return counter


def _assert_no_syncs(counter: SyncCounter) -> None:
    assert not counter.syncs, f"{len(counter.syncs)} syncing op(s) in a MaxUp step:\n{counter.report()}"


AUGMENTATIONS = [
    pytest.param(_image_case, lambda: RandomCrop(16, padding=2), id="RandomCrop"),
    pytest.param(_image_case, lambda: RandomCrop(16, padding=2, padding_mode="reflect"), id="RandomCrop-reflect"),
    pytest.param(_image_case, RandomHorizontalFlip, id="RandomHorizontalFlip"),
    pytest.param(_image_case, lambda: Cutout(4), id="Cutout"),
    pytest.param(_image_case, lambda: Cutout(4, fill=0.5), id="Cutout-fill"),
    pytest.param(_image_case, lambda: CutMix(1.0, CLASSES), id="CutMix"),
    pytest.param(_image_case, lambda: Mixup(0.4, CLASSES), id="Mixup"),
    pytest.param(_image_case, lambda: GaussianNoise(0.1), id="GaussianNoise"),
    pytest.param(_image_case, lambda: RandAugment(num_ops=2, magnitude=9, grouping="masked"), id="RandAugment"),
    pytest.param(
        _image_case,
        lambda: RandAugment(3, 9, random_magnitude=True, fill=(0.1, 0.2, 0.3), grouping="masked"),
        id="RandAugment-fill",
    ),
    pytest.param(
        _image_case,
        lambda: Compose([RandomCrop(16, padding=2), RandomHorizontalFlip(), Cutout(4), CutMix(1.0, CLASSES)]),
        id="Compose",
    ),
    pytest.param(_point_case, PointJitter, id="PointJitter"),
    pytest.param(_point_case, lambda: PointGaussianNoise(0.1, min_sigma=0.0), id="PointGaussianNoise"),
    pytest.param(_point_case, lambda: RandomPointScale(anisotropic=True), id="RandomPointScale"),
    pytest.param(_point_case, RandomPointRotation, id="RandomPointRotation"),
    pytest.param(
        _point_case, lambda: Compose([RandomPointRotation(), RandomPointScale(), PointJitter()]), id="Compose-points"
    ),
    pytest.param(_text_case, lambda: WordEmbeddingDropout(0.3, vocab_size=11), id="WordEmbeddingDropout"),
]


@pytest.mark.parametrize("kind", ["torch", "keyed"])
@pytest.mark.parametrize(("case", "factory"), AUGMENTATIONS)
def test_step_makes_no_sync(case: Callable[[], Any], factory: Callable[[], Any], kind: str) -> None:
    _assert_no_syncs(_count(case, factory(), kind))


SELECTION = [
    pytest.param({"chunk_size": 5}, id="chunk_size"),
    pytest.param({"selection_mode": "train"}, id="train"),
    pytest.param({"selection_mode": "eval"}, id="eval"),
    pytest.param({"selection_dtype": "bfloat16"}, id="bfloat16"),
    pytest.param({"selection_memory_format": "channels_last"}, id="channels_last"),
    pytest.param({"selection_size": 8}, id="selection_size"),
    pytest.param({"selection_size": 8, "chunk_size": 7, "selection_dtype": "bfloat16"}, id="combined"),
]


@pytest.mark.parametrize("kind", ["torch", "keyed"])
@pytest.mark.parametrize("options", SELECTION)
def test_selection_settings_make_no_sync(options: dict[str, Any], kind: str) -> None:
    augment = Compose([RandomCrop(16, padding=2), RandomHorizontalFlip(), Cutout(4)])
    _assert_no_syncs(_count(_image_case, augment, kind, **options))


@pytest.mark.parametrize(
    "view", [pytest.param(PointSubset(16), id="random"), pytest.param(PointSubset(16, method="fps"), id="fps")]
)
def test_point_subset_view_makes_no_sync(view: PointSubset) -> None:
    _assert_no_syncs(_count(_point_case, PointJitter(), "keyed", selection_view=view))


def test_randaugment_auto_groups_on_the_cpu() -> None:
    """On the CPU the default reads the group sizes (no device queue to wait for); "masked" is the sync-free path."""
    x = torch.rand(8, 3, 8, 8)
    params = RandAugment().sample(x, torch.Generator().manual_seed(0))
    with SyncCounter() as counter:
        RandAugment()(x, params=params)
    assert counter.ops == ["tolist"], counter.report()
    assert "_apply_grouped" in counter.report()


def _syncing_examples() -> list[Any]:
    x = torch.arange(6.0)
    return [
        pytest.param(lambda: x.sum().item(), "_local_scalar_dense", id="item"),
        pytest.param(lambda: int(x.max()), "_local_scalar_dense", id="int"),
        pytest.param(lambda: bool((x > 2).any()), "_local_scalar_dense", id="bool"),
        pytest.param(lambda: x.tolist(), "tolist", id="tolist"),
        pytest.param(lambda: x.numpy(), "numpy", id="numpy"),
        pytest.param(lambda: x[x > 2], "index", id="boolean-index"),
        pytest.param(lambda: x.nonzero(), "nonzero", id="nonzero"),
        pytest.param(lambda: x.masked_select(x > 2), "masked_select", id="masked_select"),
        pytest.param(lambda: x.unique(), "unique", id="unique"),
        pytest.param(lambda: torch.tensor([3, 4]), "lift_fresh", id="tensor-from-list"),
        pytest.param(lambda: torch.as_tensor(2.0), "lift_fresh", id="as_tensor-of-number"),
    ]


@pytest.mark.parametrize(("fn", "op"), _syncing_examples())
def test_counter_sees_syncing_ops(fn: Callable[[], Any], op: str) -> None:
    with SyncCounter() as counter:
        fn()
    assert any(op in name for name in counter.ops), f"expected {op}, got {counter.ops}"
    assert "test_no_syncs.py" in counter.report()


def test_counter_ignores_device_side_work() -> None:
    x = torch.rand(4, 3)
    with SyncCounter() as counter:
        y = torch.where(x > 0.5, x, 0.0).sum(0) + torch.full((3,), 2.0) + torch.arange(3)
        y.argmax().view(1)
    assert counter.ops == []


def test_counter_catches_the_old_cutout() -> None:
    """The pre-fix Cutout built its bounds with ``torch.tensor([h, w])`` and its fill with ``torch.as_tensor``."""
    x = torch.rand(4, 1, 8, 8)

    def old_cutout() -> Tensor:
        bounds = torch.tensor([8, 8])
        centre = (torch.rand(4, 2) * bounds).long()
        mask = (torch.arange(8)[None, :] == centre[:, :1]).view(4, 1, 8, 1)
        return torch.where(mask, torch.as_tensor(0.0), x)

    with SyncCounter() as counter:
        old_cutout()
    assert counter.ops.count("lift_fresh") == 2, counter.report()
