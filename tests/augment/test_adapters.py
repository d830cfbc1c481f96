import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from lightning_maxup.augment import KorniaAdapter, TorchvisionAdapter
from lightning_maxup.augment.adapters import seeded_rng
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import KeyedGenerator

K = pytest.importorskip("kornia.augmentation")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_per_row(transform, x, seeds):
    """Obviously correct: for each row, seed the global RNG with its seed and call the transform on that row alone."""
    state = torch.get_rng_state()
    rows = []
    for i in range(x.shape[0]):
        torch.manual_seed(int(seeds[i]))
        rows.append(transform(x[i].clone()))
    torch.set_rng_state(state)
    return torch.stack(rows)


TORCHVISION = [
    pytest.param(lambda: v2.RandAugment(), id="RandAugment"),
    pytest.param(lambda: v2.TrivialAugmentWide(), id="TrivialAugmentWide"),
    pytest.param(lambda: v2.RandomErasing(p=1.0), id="RandomErasing"),
    pytest.param(lambda: v2.Compose([v2.RandomCrop(16, padding=2), v2.RandomHorizontalFlip()]), id="Compose-crop-flip"),
]


@pytest.mark.parametrize("make", TORCHVISION)
def test_torchvision_matches_per_row_reference(make):
    transform = make()
    x = torch.rand(6, 3, 16, 16)
    aug = TorchvisionAdapter(transform)
    params = aug.sample(x, _gen())
    out = aug.apply(x, params)
    expected = _reference_per_row(transform, x, params["seeds"])
    assert torch.equal(out, expected), f"largest error {(out - expected).abs().max()}"


@pytest.mark.parametrize("make", TORCHVISION)
def test_torchvision_rows_are_independent_and_replayable(make):
    aug = TorchvisionAdapter(make())
    x = torch.rand(1, 3, 16, 16).expand(12, 3, 16, 16).contiguous()
    x0 = x.clone()
    out, _ = aug((x, torch.zeros(12)), generator=_gen(3))
    assert torch.equal(x, x0)
    assert len({tuple(r.flatten().tolist()) for r in out}) > 6  # RandAugment may draw identity ops for a few rows
    assert torch.equal(aug(x, generator=_gen(3)), out)


def test_adapters_leave_the_global_rng_untouched():
    x = torch.rand(4, 3, 8, 8)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    TorchvisionAdapter(v2.RandomErasing(p=1.0))(x, generator=_gen())
    KorniaAdapter(K.RandomErasing(p=1.0))(x, generator=_gen())
    KorniaAdapter(K.RandomErasing(p=1.0), per_row=True)(x, generator=_gen())
    assert torch.equal(torch.rand(3), expected)


def test_inplace_torchvision_transform_does_not_touch_the_callers_batch():
    x = torch.rand(3, 3, 8, 8)
    x0 = x.clone()
    TorchvisionAdapter(v2.RandomErasing(p=1.0, inplace=True))(x, generator=_gen())
    assert torch.equal(x, x0)


def test_keyed_seeds_do_not_depend_on_the_batch_split():
    x = torch.rand(6, 3, 8, 8)
    keys = torch.arange(6)
    for aug in (TorchvisionAdapter(v2.TrivialAugmentWide()), KorniaAdapter(K.RandomErasing(p=0.7))):
        whole = aug(x, generator=KeyedGenerator(2, keys))
        first = aug(x[:2], generator=KeyedGenerator(2, keys[:2]))
        rest = aug(x[2:], generator=KeyedGenerator(2, keys[2:]))
        assert torch.equal(whole, torch.cat([first, rest])), type(aug).__name__


def test_kornia_batched_matches_seeded_call_and_draws_per_row():
    aug = K.AugmentationSequential(K.RandomHorizontalFlip(), K.RandomErasing(p=1.0))
    adapter = KorniaAdapter(aug)
    x = torch.rand(1, 3, 16, 16).expand(10, 3, 16, 16).contiguous()
    params = adapter.sample(x, _gen())
    assert params["per_row"] is False
    out = adapter.apply(x, params)
    state = torch.get_rng_state()
    torch.manual_seed(int(params["seeds"][0]))
    expected = aug(x)
    torch.set_rng_state(state)
    assert torch.equal(out, expected)
    assert len({tuple(r.flatten().tolist()) for r in out}) == 10


def test_kornia_per_row_matches_reference():
    aug = K.RandomErasing(p=1.0)
    adapter = KorniaAdapter(aug, per_row=True)
    x = torch.rand(5, 3, 8, 8)
    params = adapter.sample(x, _gen())
    expected = _reference_per_row(lambda row: aug(row[None])[0], x, params["seeds"])
    assert torch.equal(adapter.apply(x, params), expected)


def _draw_then_fail():
    with seeded_rng() as seed:
        seed(1)
        torch.rand(5)
        raise RuntimeError("boom")


def test_seeded_rng_restores_state_on_error():
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        _draw_then_fail()
    assert torch.equal(torch.get_rng_state(), state)


def test_errors():
    with pytest.raises(TypeError, match="Expected `transform` to be a callable torchvision transform, got 3"):
        TorchvisionAdapter(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected `augmentation` to be a kornia augmentation"):
        KorniaAdapter(v2.RandomErasing())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same_on_batch=True"):
        KorniaAdapter(K.RandomErasing(same_on_batch=True))
    with pytest.raises(ValueError, match="`per_row` to be True, False or None, got 'yes'"):
        KorniaAdapter(K.RandomErasing(), per_row="yes")  # type: ignore[arg-type]
    ragged = TorchvisionAdapter(v2.RandomChoice([v2.Resize(8), v2.Resize(6)]))
    with pytest.raises(ValueError, match=r"the same output shape to re-form the batch, got shapes \["):
        ragged(torch.rand(16, 3, 12, 12), generator=_gen())
    with pytest.raises(ValueError, match=r"Expected one seed per row \(2\), got 3"):
        TorchvisionAdapter(v2.RandomErasing())(torch.rand(2, 3, 8, 8), params={"seeds": torch.zeros(3)})


def test_missing_kornia_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)
    with pytest.raises(ImportError, match=r"KorniaAdapter needs kornia, an optional extra: pip install"):
        KorniaAdapter(object())  # type: ignore[arg-type]


@pytest.mark.slow
def test_importing_the_package_does_not_import_kornia():
    import subprocess

    code = "import sys, lightning_maxup.augment; print('kornia' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_maxup_step_with_randaugment_on_uint8_images():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def loss_fn(batch):
        x, y = batch
        return F.cross_entropy(net(x.float() / 255), y, reduction="none")

    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 4, (5,))
    out = maxup_step(loss_fn, (x, y), augment=TorchvisionAdapter(v2.RandAugment()), m=3, generator=_gen(), model=net)
    assert out.batch[0].dtype == torch.uint8
    out.loss.backward()
    assert out.candidate_losses.shape == (3, 5)
