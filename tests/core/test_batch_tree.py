"""Which batch tensors are per-sample is explicit, and any batch tree works.

- A tensor wrapped in :class:`~lightning_maxup.core.batch.Shared` is never expanded, sliced, gathered, augmented or
  resized, even when it has ``B`` rows, and ``per_sample_loss`` receives the bare tensor.
- Without ``Shared``, every tensor leaf whose first dimension is ``B`` is per-sample (the default).
- Namedtuple, dict, dataclass and nested batches go through every built-in augmentation, every selection view and
  ``maxup_step`` with the same result as the tuple batch for the same generator seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn
from torchvision.transforms import v2

from lightning_maxup.augment import (
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
    TorchvisionAdapter,
)
from lightning_maxup.augment.randaugment import RandAugment
from lightning_maxup.core.batch import Shared, expand_copies
from lightning_maxup.core.functional import MaxUpOutput, maxup_step
from lightning_maxup.core.views import Downsample, PointSubset

B, C, M = 3, 3, 4  # B == C: a class-weight vector has B rows


# ----------------------------------------------------------------------------------------------------------------------
# Batch structures, each with a getter of (x, y)
# ----------------------------------------------------------------------------------------------------------------------
class Sample(NamedTuple):
    x: Tensor
    y: Tensor


@dataclasses.dataclass
class DataSample:
    x: Tensor
    y: Tensor


STRUCTURES: list = [
    pytest.param(lambda x, y: (x, y), lambda b: (b[0], b[1]), id="tuple"),
    pytest.param(lambda x, y: [x, y], lambda b: (b[0], b[1]), id="list"),
    pytest.param(Sample, lambda b: (b.x, b.y), id="namedtuple"),
    pytest.param(lambda x, y: {"image": x, "label": y}, lambda b: (b["image"], b["label"]), id="dict"),
    pytest.param(DataSample, lambda b: (b.x, b.y), id="dataclass"),
    pytest.param(
        lambda x, y: {"inputs": (x,), "target": {"label": y}},
        lambda b: (b["inputs"][0], b["target"]["label"]),
        id="nested",
    ),
]


def _images(n: int = B) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g)


def _points(n: int = B) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 32, 3, generator=g), torch.randint(0, C, (n,), generator=g)


AUGMENTATIONS: list = [
    pytest.param(GaussianNoise(0.1), _images, id="GaussianNoise"),
    pytest.param(Cutout(3), _images, id="Cutout"),
    pytest.param(CutMix(1.0, C), _images, id="CutMix"),
    pytest.param(Mixup(0.4, C), _images, id="Mixup"),
    pytest.param(RandomCrop(8, padding=2), _images, id="RandomCrop"),
    pytest.param(RandomHorizontalFlip(), _images, id="RandomHorizontalFlip"),
    pytest.param(RandAugment(num_ops=2, magnitude=9), _images, id="RandAugment"),
    pytest.param(Compose([RandomHorizontalFlip(), Cutout(2)]), _images, id="Compose"),
    pytest.param(TorchvisionAdapter(v2.RandomHorizontalFlip()), _images, id="TorchvisionAdapter"),
    pytest.param(PointJitter(), _points, id="PointJitter"),
    pytest.param(PointGaussianNoise(0.05, min_sigma=0.01), _points, id="PointGaussianNoise"),
    pytest.param(RandomPointScale(anisotropic=True), _points, id="RandomPointScale"),
    pytest.param(RandomPointRotation(), _points, id="RandomPointRotation"),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_pairs_equal(actual: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor]) -> None:
    for name, a, e in zip(("x", "y"), actual, expected, strict=True):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert torch.equal(a, e), f"{name}: largest difference {(a.double() - e.double()).abs().max().item():.3g}"


# ----------------------------------------------------------------------------------------------------------------------
# Structures through augmentations, views and the step
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "get"), STRUCTURES)
@pytest.mark.parametrize(("augment", "data"), AUGMENTATIONS)
def test_augmentation_keeps_structure_and_result(augment: Any, data: Callable, build: Callable, get: Callable) -> None:
    x, y = expand_copies(data(), M)
    x_before = x.clone()
    expected = augment((x, y), generator=_gen())
    out = augment(build(x, y), generator=_gen())
    assert type(out) is type(build(x, y))
    _assert_pairs_equal(get(out), expected)
    assert torch.equal(x, x_before), "the caller's batch was modified in place"


VIEWS: list = [
    pytest.param(Downsample(4), _images, id="Downsample"),
    pytest.param(PointSubset(8), _points, id="PointSubset-random"),
    pytest.param(PointSubset(8, method="fps"), _points, id="PointSubset-fps"),
]


@pytest.mark.parametrize(("build", "get"), STRUCTURES)
@pytest.mark.parametrize(("view", "data"), VIEWS)
def test_view_keeps_structure_and_result(view: Any, data: Callable, build: Callable, get: Callable) -> None:
    x, y = data()
    expected = view((x, y))
    out = view(build(x, y))
    assert type(out) is type(build(x, y))
    _assert_pairs_equal(get(out), expected)


class _Net(nn.Module):
    """Classifies images or point clouds (pooled), so one net serves both kinds of data and any resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.points = nn.Linear(3, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).mean(dim=(2, 3)) if x.dim() == 4 else self.points(x).amax(dim=1)
        return self.head(torch.relu(h))


STEP_SETTINGS: list = [
    pytest.param(
        {"augment": Compose([RandomCrop(8, padding=1), GaussianNoise(0.1)]), "selection_size": 4, "chunk_size": 5},
        _images,
        id="images-low-resolution-chunked",
    ),
    pytest.param({"augment": CutMix(1.0, C)}, _images, id="images-CutMix"),
    pytest.param(
        {"augment": PointJitter(0.05, 0.1), "selection_view": PointSubset(8)}, _points, id="points-PointSubset"
    ),
]


def _step(batch: Any, get: Callable, options: dict[str, Any]) -> MaxUpOutput:
    torch.manual_seed(0)
    net = _Net()

    def per_sample_loss(b: Any) -> Tensor:
        x, y = get(b)
        return F.cross_entropy(net(x), y, reduction="none")

    return maxup_step(per_sample_loss, batch, m=M, generator=_gen(), model=net, **options)


@pytest.mark.parametrize(("build", "get"), STRUCTURES)
@pytest.mark.parametrize(("options", "data"), STEP_SETTINGS)
def test_step_keeps_structure_and_result(
    options: dict[str, Any], data: Callable, build: Callable, get: Callable
) -> None:
    x, y = data(6)
    expected = _step((x, y), lambda b: (b[0], b[1]), options)
    out = _step(build(x, y), get, options)
    assert type(out.batch) is type(build(x, y))
    _assert_pairs_equal(get(out.batch), (expected.batch[0], expected.batch[1]))
    assert torch.equal(out.candidate_losses, expected.candidate_losses)
    assert torch.equal(out.selected, expected.selected)
    assert torch.equal(out.loss, expected.loss)


# ----------------------------------------------------------------------------------------------------------------------
# Shared tensors
# ----------------------------------------------------------------------------------------------------------------------
def _trap(x: Tensor) -> Tensor:
    """A shared tensor shaped exactly like the per-sample inputs: only the marker tells them apart."""
    return torch.full_like(x, 7.0)


@pytest.mark.parametrize(("augment", "data"), AUGMENTATIONS)
def test_augmentation_leaves_shared_tensors(augment: Any, data: Callable) -> None:
    x, y = data()
    weights, trap = Shared(torch.tensor([1.0, 2.0, 3.0])), Shared(_trap(x))
    # First in the tree, where the inputs are looked for, and last, where extra per-sample tensors go.
    batch = expand_copies((trap, x, y, weights), M)
    assert batch[0] is trap, "expanding copies must not touch shared tensors"
    assert batch[3] is weights
    expected = augment((batch[1], batch[2]), generator=_gen())
    out = augment(batch, generator=_gen())
    assert isinstance(out[0], Shared)
    assert torch.equal(out[0].value, trap.value)
    assert isinstance(out[3], Shared)
    assert torch.equal(out[3].value, weights.value)
    _assert_pairs_equal((out[1], out[2]), expected)


@pytest.mark.parametrize(("view", "data"), VIEWS)
def test_view_leaves_shared_tensors(view: Any, data: Callable) -> None:
    x, y = data()
    weights, trap = Shared(torch.tensor([1.0, 2.0, 3.0])), Shared(_trap(x))
    expected = view((x, y))
    out = view((trap, x, y, weights))
    assert out[0] is trap
    assert out[3] is weights
    assert torch.equal(trap.value, _trap(x)), "the shared tensor was modified"
    _assert_pairs_equal((out[1], out[2]), expected)


def test_step_passes_shared_class_weights_unexpanded() -> None:
    """A ``[3]`` class-weight tensor in a batch of 3 reaches the loss as the bare ``[3]`` tensor, in every forward."""
    x, y = _images()
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.manual_seed(0)
    net = _Net()
    received: list[Any] = []

    def per_sample_loss(batch: Any) -> Tensor:
        images, labels, weight = batch
        received.append(weight)
        return F.cross_entropy(net(images), labels, weight=weight, reduction="none")

    out = maxup_step(
        per_sample_loss, (x, y, Shared(w)), m=M, augment=Cutout(3), generator=_gen(), model=net,
        selection_size=4, chunk_size=5,
    )  # fmt: skip
    assert len(received) == 4, "three selection chunks (12 rows, 5 per chunk) and one gradient forward"
    for weight in received:
        assert type(weight) is Tensor
        assert weight.shape == (3,)
        assert torch.equal(weight, w)
    assert isinstance(out.candidates[2], Shared)
    assert out.candidates[2].value.shape == (3,)
    assert isinstance(out.batch[2], Shared)
    assert out.batch[2].value.shape == (3,)
    assert out.candidates[0].shape[0] == M * B
    assert out.batch[0].shape[0] == B
    expected = F.cross_entropy(net(out.batch[0]), out.batch[1], weight=w, reduction="none")
    assert torch.equal(out.losses, expected)


def test_unmarked_tensor_with_batch_rows_is_per_sample() -> None:
    """The default: every tensor leaf whose first dimension is B is expanded with the batch."""
    x, y = _images()
    shapes: list[tuple[int, ...]] = []

    def per_sample_loss(batch: Any) -> Tensor:
        shapes.append(tuple(batch[2].shape))
        return batch[0].flatten(1).mean(1)

    maxup_step(
        per_sample_loss, (x, y, torch.tensor([1.0, 2.0, 3.0])), m=M, augment=GaussianNoise(0.1), generator=_gen()
    )
    assert shapes == [(M * B,), (B,)]


def test_shared_moves_with_lightning_batch_transfer() -> None:
    x, y = _images()
    w = Shared(torch.tensor([1.0, 2.0, 3.0]))
    # The meta device stands in for an accelerator: every tensor must end up there, the shared one included.
    moved = move_data_to_device({"batch": (x, y), "weights": w}, torch.device("meta"))
    assert moved["batch"][0].device.type == "meta"
    assert isinstance(moved["weights"], Shared)
    assert moved["weights"].value.device.type == "meta"
    assert moved["weights"].value.shape == (3,)
    assert w.value.device.type == "cpu", "the original batch is left where it was"


def test_shared_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match=r"Expected `value` of Shared to be a tensor, got list"):
        Shared([1.0, 2.0, 3.0])  # type: ignore[arg-type]


# Mixing augmentations need class labels as the second leaf.
@pytest.mark.parametrize(("augment", "data"), [p for p in AUGMENTATIONS if p.id not in ("CutMix", "Mixup")])
def test_augmentation_changes_only_the_input_of_an_autoencoder_batch(augment: Any, data: Callable) -> None:
    """In ``(x, x)`` the two leaves are one tensor object; the target must stay the clean input."""
    x, _ = data()
    x_input, x_target = augment((x, x), generator=_gen())
    assert torch.equal(x_target, x)
    assert torch.equal(x_input, augment(x, generator=_gen()))


@pytest.mark.parametrize(("augment", "data"), AUGMENTATIONS)
def test_augmentation_skips_scalar_leaves(augment: Any, data: Callable) -> None:
    """A 0-dimensional leaf (a temperature, a step) before the inputs is not per-sample: the inputs come after it."""
    x, y = data()
    temperature = torch.tensor(0.5)
    expected = augment((x, y), generator=_gen())
    out = augment((temperature, x, y), generator=_gen())
    assert out[0] is temperature
    _assert_pairs_equal((out[1], out[2]), expected)


@pytest.mark.parametrize(("view", "data"), VIEWS)
def test_view_applies_to_every_occurrence_of_the_inputs(view: Any, data: Callable) -> None:
    """A view is a cheaper version of the same samples: in ``(x, x)`` input and target are viewed alike."""
    x, y = data()
    expected, _ = view((x, y))
    x_input, x_target = view((x, x))
    assert torch.equal(x_input, expected)
    assert torch.equal(x_target, expected)
