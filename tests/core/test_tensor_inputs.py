"""Inputs beyond contiguous float32 tuples: channels-last, uint8 images, 16-bit floats, labels-first dicts.

Each built-in is compared with a reference: the same draw on the float32 (or contiguous, or tuple) version of the
same data.
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
    RandAugment,
    RandomCrop,
    RandomHorizontalFlip,
)
from lightning_maxup.core.batch import expand_copies, gather_rows, memory_format_of
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.views import Downsample, resize_antialiased

B, CLASSES = 6, 4
CL = torch.channels_last


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = B, size: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


IMAGE_AUGMENTATIONS = [
    pytest.param(lambda: RandomCrop(12, padding=3), id="RandomCrop"),
    pytest.param(lambda: RandomCrop(12, padding=3, padding_mode="reflect"), id="RandomCrop-reflect"),
    pytest.param(lambda: RandomHorizontalFlip(), id="RandomHorizontalFlip"),
    pytest.param(lambda: Cutout(5), id="Cutout"),
    pytest.param(lambda: Cutout(5, fill=7), id="Cutout-integer-fill"),
    pytest.param(lambda: Cutout(5, fill=0.5), id="Cutout-fill"),
    pytest.param(lambda: CutMix(1.0, CLASSES), id="CutMix"),
    pytest.param(lambda: Mixup(0.4, CLASSES), id="Mixup"),
    pytest.param(lambda: GaussianNoise(0.1), id="GaussianNoise"),
    pytest.param(lambda: RandAugment(num_ops=2), id="RandAugment"),
    pytest.param(lambda: RandAugment(num_ops=2, grouping="masked"), id="RandAugment-masked"),
]


# --------------------------------------------------------------------------------------------------------------------
# channels_last
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        pytest.param((2, 3, 4, 5), torch.channels_last, id="4d"),
        pytest.param((2, 3, 2, 4, 5), torch.channels_last_3d, id="5d"),
        pytest.param((2, 3, 4, 5), torch.contiguous_format, id="contiguous"),
    ],
)
def test_expand_copies_and_gather_rows_keep_the_memory_format(shape: tuple[int, ...], fmt: torch.memory_format) -> None:
    x = torch.rand(shape).contiguous(memory_format=fmt)
    expanded = expand_copies(x, 3)
    assert expanded.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(expanded, x.repeat(3, *([1] * (x.dim() - 1))), rtol=0, atol=0)
    rows = torch.tensor([5, 0, 3])
    gathered = gather_rows(expanded, rows)
    assert gathered.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(gathered, expanded.contiguous()[rows], rtol=0, atol=0)
    assert memory_format_of(x) == fmt


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("augment", [pytest.param(lambda: None, id="none"), *IMAGE_AUGMENTATIONS])
def test_channels_last_batch_stays_channels_last_through_the_step(augment: Callable[[], Any]) -> None:
    torch.manual_seed(0)
    net = _Net()
    x, y = _images()

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(net(b[0]), b[1], reduction="none")

    outs = [
        maxup_step(loss_fn, (images, y), augment=augment(), m=4, generator=_gen(1))
        for images in (x.contiguous(memory_format=CL), x)
    ]
    assert outs[0].candidates[0].is_contiguous(memory_format=CL), "candidates"
    assert outs[0].batch[0].is_contiguous(memory_format=CL), "gradient batch"
    # The layout changes nothing else.
    torch.testing.assert_close(outs[0].candidates[0], outs[1].candidates[0], rtol=0, atol=1e-6)
    assert torch.equal(outs[0].selected, outs[1].selected)


# --------------------------------------------------------------------------------------------------------------------
# uint8 images
# --------------------------------------------------------------------------------------------------------------------
# Exact on uint8: every output pixel is an input pixel or the fill. Mixup blends in float32 and rounds.
UINT8_TOLERANCE = {"Mixup": 0.5}
UINT8_REFUSED = {
    "GaussianNoise": (TypeError, r"GaussianNoise expects floating-point inputs, got dtype torch.uint8.*x.float\(\)"),
    "RandAugment": (TypeError, r"RandAugment expects float images in \[0, 1\], got dtype torch.uint8; convert with"),
    "Cutout-fill": (ValueError, r"Cutout's `fill`=0.5 is not a value of integer images \(dtype torch.uint8\)"),
    "RandAugment-masked": (TypeError, r"RandAugment expects float images"),
}


@pytest.mark.parametrize("augment", IMAGE_AUGMENTATIONS)
def test_uint8_images_match_the_float_reference_or_are_refused(augment: Callable[[], Any], request: Any) -> None:
    aug = augment()
    name = type(aug).__name__
    x, y = _images(16, seed=3)
    x8 = (x * 255).round().to(torch.uint8)
    refused = UINT8_REFUSED.get(request.node.callspec.id) or UINT8_REFUSED.get(name)
    if refused is not None:
        error, match = refused
        with pytest.raises(error, match=match):
            aug((x8, y), generator=_gen())
        return
    params = aug.sample((x8, y), _gen(4))
    out8, y8 = aug((x8, y), params=params)
    reference, y_ref = aug((x8.float(), y), params=params)
    assert out8.dtype == torch.uint8
    err = (out8.float() - reference).abs().max().item()
    assert err <= UINT8_TOLERANCE.get(name, 0.0), f"largest error {err:.3g} against the float reference"
    torch.testing.assert_close(y8, y_ref)
    if name == "Mixup":  # the old cast of the weight to uint8 made every image its partner (or itself)
        partner = params["partner"]
        assert not torch.equal(out8, x8[partner])
        assert not torch.equal(out8, x8)


def test_uint8_mixup_reference_loop() -> None:
    x, y = _images(8, seed=5)
    x8 = (x * 255).round().to(torch.uint8)
    aug = Mixup(1.0, CLASSES)
    params = aug.sample((x8, y), _gen(6))
    out, _ = aug((x8, y), params=params)
    for i in range(8):
        lam = float(params["lam"][i])
        expected = (lam * x8[i].double() + (1 - lam) * x8[int(params["partner"][i])].double()).round()
        err = (out[i].double() - expected).abs().max().item()
        assert err <= 1, f"row {i}: largest error {err}"


# --------------------------------------------------------------------------------------------------------------------
# bfloat16 / float16 selection views
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("size", "target"), [pytest.param(32, 16, id="matmul"), pytest.param(80, 24, id="kernel")])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["contiguous", "channels_last"])
def test_downsample_takes_16_bit_floats(dtype: torch.dtype, size: int, target: int, fmt: torch.memory_format) -> None:
    x = torch.rand(4, 3, size, size, generator=_gen(7)).to(dtype).contiguous(memory_format=fmt)
    out, y = Downsample(target)((x, torch.arange(4)))
    reference = resize_antialiased(x.float(), target)
    assert out.dtype == dtype
    assert out.shape == (4, 3, target, target)
    assert out.is_contiguous(memory_format=fmt)
    # One rounding to the dtype: half an ulp near 1.
    tolerance = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    err = (out.float() - reference).abs().max().item()
    assert err <= tolerance, f"largest error {err:.3g} > {tolerance:g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_with_a_selection_view_on_16_bit_images(dtype: torch.dtype) -> None:
    net = _Net().to(dtype)
    x, y = _images(size=16)

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(net(b[0]).float(), b[1], reduction="none")

    out = maxup_step(loss_fn, (x.to(dtype), y), augment=RandomHorizontalFlip(), m=3, selection_size=8, generator=_gen())
    assert out.candidate_losses.shape == (3, B)
    assert out.batch[0].dtype == dtype


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face-style dicts whose first key is the labels
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("augment", IMAGE_AUGMENTATIONS)
def test_labels_first_dict_matches_the_tuple_batch(augment: Callable[[], Any]) -> None:
    aug = augment()
    x, y = _images(seed=8)
    params = aug.sample((x, y), _gen(9))
    out = aug({"labels": y, "pixel_values": x}, params=params)
    expected_x, expected_y = aug((x, y), params=params)
    assert list(out) == ["labels", "pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected_x, rtol=0, atol=0)
    torch.testing.assert_close(out["labels"], expected_y, rtol=0, atol=0)
    if isinstance(aug, (CutMix, Mixup)):
        assert out["labels"].shape == (B, CLASSES)
        torch.testing.assert_close(out["labels"].sum(1), torch.ones(B))


def test_labels_first_dict_through_the_step_with_a_selection_view() -> None:
    net = _Net()
    x, y = _images(size=16, seed=10)

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(net(b["pixel_values"]), b["labels"], reduction="none")

    augment = Compose([RandomCrop(16, padding=2), RandomHorizontalFlip(), CutMix(1.0, CLASSES)])
    out = maxup_step(
        loss_fn, {"labels": y, "pixel_values": x}, augment=augment, m=3, selection_size=8, generator=_gen()
    )
    reference = maxup_step(
        lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none"),
        (x, y),
        augment=augment,
        m=3,
        selection_size=8,
        generator=_gen(),
    )
    assert out.batch["labels"].shape == (B, CLASSES)
    torch.testing.assert_close(out.candidate_losses, reference.candidate_losses)
    torch.testing.assert_close(out.batch["pixel_values"], reference.batch[0], rtol=0, atol=0)
