"""RandAugment: every op against torchvision's functional op on one row at a time, and the statistics of the draws.

The reference (``_reference_op``) is the slow, obviously correct version: a Python loop over rows, calling
``torchvision.transforms.v2.functional`` with the arguments torchvision's own ``v2.RandAugment`` passes, and the
magnitude read from torchvision's own table.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from lightning_maxup.augment import RandAugment
from lightning_maxup.augment.randaugment import OPS, magnitude_table, op_values
from lightning_maxup.core.random import KeyedGenerator

TV_SPACE = v2.RandAugment._AUGMENTATION_SPACE
SIGNED = [name for name, (_, signed) in TV_SPACE.items() if signed]
# Statistical tests reject a correct sampler with probability 1e-6 each.
P_FALSE_ALARM = 1e-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_op(img: torch.Tensor, name: str, mag: float, fill: Any = None, interp: str = "nearest") -> torch.Tensor:
    """One op on one ``[C, H, W]`` image, exactly as torchvision's ``v2.RandAugment`` calls it."""
    affine: dict[str, Any] = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    affine |= {"interpolation": interp, "fill": fill}
    if name == "ShearX":
        return TF.affine(img, **(affine | {"shear": [math.degrees(math.atan(mag)), 0.0], "center": [0, 0]}))
    if name == "ShearY":
        return TF.affine(img, **(affine | {"shear": [0.0, math.degrees(math.atan(mag))], "center": [0, 0]}))
    if name == "TranslateX":
        return TF.affine(img, **(affine | {"translate": [int(mag), 0]}))
    if name == "TranslateY":
        return TF.affine(img, **(affine | {"translate": [0, int(mag)]}))
    if name == "Rotate":
        return TF.rotate(img, angle=mag, interpolation=interp, fill=fill)
    colour = {
        "Identity": lambda: img,
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + mag),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + mag),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + mag),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + mag),
        "Posterize": lambda: TF.posterize(img, int(mag)),
        "Solarize": lambda: TF.solarize(img, 1.0 * mag),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
    }
    return colour[name]()


def _tv_magnitude(name: str, magnitude_bin: int, sign: int, bins: int, h: int, w: int) -> float:
    """The magnitude torchvision's RandAugment applies ``name`` with at an integer bin, from its own table."""
    table_fn, signed = TV_SPACE[name]
    table = table_fn(bins, h, w)
    mag = float(table[magnitude_bin]) if table is not None else 0.0
    return -mag if signed and sign < 0 else mag


def _reference(x: torch.Tensor, params: dict[str, torch.Tensor], bins: int = 31, **kwargs: Any) -> torch.Tensor:
    """Loop over rows, and over each row's ops in order."""
    h, w = x.shape[-2:]
    rows = []
    for r in range(x.shape[0]):
        img = x[r]
        for k in range(params["op"].shape[1]):
            name = OPS[int(params["op"][r, k])]
            mag = _tv_magnitude(name, int(params["magnitude"][r, k]), int(params["sign"][r, k]), bins, h, w)
            img = _reference_op(img, name, mag, **kwargs)
        rows.append(img)
    return torch.stack(rows)


def _images(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random images, plus the edge cases of the histogram ops: a constant image and a two-level one."""
    x = torch.rand(n, channels, h, w, generator=_gen(seed))
    x[0] = 0.5
    x[1] = (x[1] > 0.5).float() * 0.75
    x[2] = (x[2] * 4).floor() / 4
    return x


def _one_op_params(name: str, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Every row gets ``name``, at its own integer magnitude bin in [0, 30] and its own sign."""
    g = _gen(seed)
    return {
        "op": torch.full((n, 1), OPS.index(name)),
        "magnitude": torch.randint(0, 31, (n, 1), generator=g).double(),
        "sign": 1 - 2 * torch.randint(0, 2, (n, 1), generator=g),
    }


def _assert_close(out: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    err = (out - expected).abs().max().item()
    assert err <= atol, f"largest error {err:.3g} > {atol:g}"


# Tolerance per op, against torchvision on float32 images:
# - Identity and the geometric ops: 0. The inverse matrices, the sampling grid (the same bmm) and grid_sample's
#   nearest sampling are computed as torchvision computes them, so the same source pixel is picked everywhere,
#   including at the border (where any rounding difference would move an edge by one pixel).
# - Brightness, Color, Contrast, Sharpness: 1e-6, a few float32 ulps near 1. The blend factor is a per-row tensor
#   where torchvision uses a Python scalar (rounded to float32 separately), the contrast mean sums in another order,
#   and the sharpness blur is a box sum plus 4x the centre instead of conv2d's weighted sum.
# - Posterize, Solarize, AutoContrast: 0, the same elementwise float operations.
# - Equalize: 0. Both quantise to uint8 the same way (x * 255.999, truncated) and apply the same integer table, so
#   the uint8 quantisation of the result is exact on both sides.
OP_TOLERANCE = dict.fromkeys(OPS, 0.0) | {"Brightness": 1e-6, "Color": 1e-6, "Contrast": 1e-6, "Sharpness": 1e-6}


@pytest.mark.parametrize("shape", [pytest.param((3, 32, 32), id="rgb32"), pytest.param((3, 17, 23), id="rgb17x23")])
@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in OPS])
def test_op_matches_torchvision(name: str, shape: tuple[int, int, int]) -> None:
    x = _images(40, *shape)
    params = _one_op_params(name, 40)
    out = RandAugment(num_ops=1)(x, params=params)
    _assert_close(out, _reference(x, params), OP_TOLERANCE[name])


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in OPS])
def test_op_matches_torchvision_on_grey_images(name: str) -> None:
    # One channel: Color leaves the image alone and Contrast blends with the image's own mean (PIL's behaviour).
    x = _images(24, 1, 16, 16)
    params = _one_op_params(name, 24)
    _assert_close(RandAugment(num_ops=1)(x, params=params), _reference(x, params), OP_TOLERANCE[name])


@pytest.mark.parametrize(
    ("fill", "interpolation", "atol"),
    [
        pytest.param((0.5, 0.25, 1.0), "nearest", 0.0, id="fill-nearest"),
        # Bilinear: the same grid and the same grid_sample kernel; 1e-6 allows for the fill blend's rounding.
        pytest.param(0.0, "bilinear", 1e-6, id="bilinear"),
        pytest.param((0.5, 0.25, 1.0), "bilinear", 1e-6, id="fill-bilinear"),
    ],
)
@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_ops_fill_and_interpolation(name: str, fill: Any, interpolation: str, atol: float) -> None:
    x = _images(24, 3, 20, 20)
    params = _one_op_params(name, 24)
    aug = RandAugment(num_ops=1, fill=fill, interpolation=interpolation)  # type: ignore[arg-type]
    tv_fill = list(fill) if isinstance(fill, tuple) else None
    _assert_close(aug(x, params=params), _reference(x, params, fill=tv_fill, interp=interpolation), atol)


def test_drawn_pipeline_matches_torchvision_row_by_row() -> None:
    # Two ops per row, every row its own draw. 1e-6: the colour ops' rounding (above) carried through a second op.
    # A quantising op (posterize, solarize, equalize) after a colour op could in principle move a pixel that sits
    # within an ulp of a level to the next level; that is allowed for at most 1 pixel in 10^4.
    x = torch.rand(600, 3, 16, 16, generator=_gen(3))
    aug = RandAugment(num_ops=2, magnitude=13)
    params = aug.sample(x, _gen(4))
    err = (aug(x, params=params) - _reference(x, params)).abs()
    share = (err > 1e-6).float().mean().item()
    assert share <= 1e-4, f"{share:.2e} of pixels off by more than 1e-6; largest error {err.max().item():.3g}"


def test_magnitude_table_matches_torchvision() -> None:
    assert tuple(TV_SPACE) == OPS
    for bins, (h, w) in [(31, (32, 32)), (11, (24, 40))]:
        table = magnitude_table(bins, h, w)
        for i, (name, (table_fn, _)) in enumerate(TV_SPACE.items()):
            expected = table_fn(bins, h, w)
            expected = torch.zeros(bins) if expected is None else expected
            assert torch.equal(table[i], expected.double()), name


def test_op_values_sign_only_the_signed_ops() -> None:
    op = torch.arange(len(OPS))
    plus = op_values(op, torch.full((len(OPS),), 20.0), torch.ones(len(OPS), dtype=torch.long), 31, 32, 32)
    minus = op_values(op, torch.full((len(OPS),), 20.0), -torch.ones(len(OPS), dtype=torch.long), 31, 32, 32)
    flipped = [OPS[i] for i in range(len(OPS)) if minus[i] != plus[i]]
    assert flipped == SIGNED
    assert torch.equal(minus[op[[OPS.index(n) for n in SIGNED]]], -plus[[OPS.index(n) for n in SIGNED]])


def test_fractional_magnitudes_interpolate_between_bins() -> None:
    op = torch.full((3,), OPS.index("Rotate"))
    values = op_values(op, torch.tensor([0.0, 7.5, 30.0]), torch.ones(3, dtype=torch.long), 31, 32, 32)
    assert values.tolist() == pytest.approx([0.0, 7.5, 30.0])
    bits = op_values(torch.full((3,), OPS.index("Posterize")), torch.tensor([0.0, 7.4, 30.0]), torch.ones(3), 31, 8, 8)
    assert bits.tolist() == [8.0, 7.0, 4.0]  # rounded to whole bits


# --------------------------------------------------------------------------------------------------------------------
# Statistics of the draws
# --------------------------------------------------------------------------------------------------------------------


def _uniformity_p_value(counts: torch.Tensor) -> float:
    """Chi-square goodness of fit of category counts to the uniform distribution."""
    return float(stats.chisquare(counts.double().numpy()).pvalue)


def test_ops_are_drawn_uniformly_in_every_slot() -> None:
    n = 7000
    params = RandAugment(num_ops=3).sample(torch.rand(n, 1, 4, 4), _gen(5))
    for slot in range(3):
        counts = torch.bincount(params["op"][:, slot], minlength=len(OPS))
        p = _uniformity_p_value(counts)
        assert p > P_FALSE_ALARM, f"slot {slot}: op counts {counts.tolist()} (p = {p:.2g})"
    # Slots independent of each other (ops are drawn with replacement): uniform over the 14 x 14 pairs.
    pairs = torch.bincount(params["op"][:, 0] * len(OPS) + params["op"][:, 1], minlength=len(OPS) ** 2)
    assert _uniformity_p_value(pairs) > P_FALSE_ALARM


def test_the_uniformity_check_detects_a_missing_op() -> None:
    # The check above can fail: with one op never drawn (13 of 14 drawn uniformly) it rejects by far.
    ops = torch.randint(0, len(OPS) - 1, (7000,), generator=_gen(6))
    assert _uniformity_p_value(torch.bincount(ops, minlength=len(OPS))) < 1e-100


def test_random_magnitude_is_uniform_on_zero_to_magnitude() -> None:
    params = RandAugment(num_ops=2, magnitude=12, random_magnitude=True).sample(torch.rand(5000, 3, 4, 4), _gen(7))
    m = params["magnitude"].flatten()
    assert m.min().item() >= 0.0
    assert m.max().item() <= 12.0
    p = stats.kstest(m.numpy(), stats.uniform(loc=0, scale=12).cdf).pvalue
    assert p > P_FALSE_ALARM, f"KS p-value {p:.2g}"


def test_fixed_magnitude_is_the_same_everywhere() -> None:
    params = RandAugment(num_ops=2, magnitude=5).sample(torch.rand(64, 3, 4, 4), _gen(8))
    assert bool((params["magnitude"] == 5).all())


def test_signs_are_balanced() -> None:
    n = 200_000  # enough to detect a 1% bias (2000 signs, 9 standard deviations)
    sign = RandAugment(num_ops=2).sample(torch.rand(n // 2, 1, 2, 2), _gen(9))["sign"]
    assert set(sign.unique().tolist()) == {-1, 1}
    negative = int((sign < 0).sum())
    # Binomial(n, 1/2): more than 5 standard deviations from n/2 has probability below 1e-6.
    assert abs(negative - n / 2) <= 5 * math.sqrt(n) / 2, f"{negative} negative signs of {n}"


# --------------------------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------------------------


def test_replayed_params_give_identical_output() -> None:
    x = torch.rand(64, 3, 16, 16, generator=_gen(10))
    aug = RandAugment(num_ops=2, random_magnitude=True)
    params = aug.sample(x, _gen(11))
    out = aug(x, params=params)
    assert torch.equal(aug(x, params=params), out)
    assert torch.equal(aug(x, generator=_gen(11)), out)  # the same generator state draws the same params


def test_every_row_draws_its_own_ops() -> None:
    # 256 copies of one image, as MaxUp's m copies of a sample: the rows must not share one draw (kornia's
    # RandAugment picks the ops once per batch). 196 ordered op pairs: about 143 distinct ones are expected.
    x = torch.rand(1, 3, 16, 16, generator=_gen(12)).expand(256, -1, -1, -1)
    aug = RandAugment(num_ops=2)
    params = aug.sample(x, _gen(13))
    pairs = {tuple(row) for row in params["op"].tolist()}
    assert len(pairs) >= 100, f"only {len(pairs)} distinct op pairs in 256 rows"
    out = aug(x, params=params)
    assert len({tuple(row.flatten().tolist()) for row in out}) >= 100


def test_input_is_not_modified() -> None:
    x = torch.rand(128, 3, 12, 12, generator=_gen(14))
    y = torch.arange(128)
    x_before = x.clone()
    out_x, out_y = RandAugment(num_ops=3, magnitude=20)((x, y), generator=_gen(15))
    assert torch.equal(x, x_before)
    assert out_x.data_ptr() != x.data_ptr()
    assert out_y is y


def test_zero_ops_return_a_copy() -> None:
    x = torch.rand(4, 3, 8, 8)
    out = RandAugment(num_ops=0)(x, generator=_gen())
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()


def test_keyed_generator_rows_do_not_depend_on_the_batch_split() -> None:
    x = torch.rand(32, 3, 12, 12, generator=_gen(16))
    keys = torch.stack([torch.arange(32) // 4, torch.arange(32) % 4], dim=1)  # (sample, copy)
    aug = RandAugment(num_ops=2, random_magnitude=True)
    whole = aug.sample(x, KeyedGenerator(3, keys))
    half = aug.sample(x[16:], KeyedGenerator(3, keys[16:]))
    for key in ("op", "magnitude", "sign"):
        assert torch.equal(whole[key][16:], half[key]), key
    assert torch.equal(aug(x, params=whole)[16:], aug(x[16:], params=half))


@pytest.mark.parametrize(
    ("kwargs", "shape", "dtype"),
    [
        pytest.param({"num_ops": 2}, (3, 16, 16), torch.float32, id="default"),
        pytest.param({"num_ops": 4, "random_magnitude": True}, (3, 17, 23), torch.float32, id="random-17x23"),
        pytest.param({"num_ops": 3, "fill": (0.2, 0.5, 0.9)}, (3, 12, 12), torch.float32, id="fill"),
        pytest.param({"num_ops": 3, "interpolation": "bilinear", "fill": 0.3}, (3, 12, 12), torch.float32, id="bilin"),
        pytest.param({"num_ops": 2, "magnitude": 30}, (1, 16, 16), torch.float32, id="grey"),
        pytest.param({"num_ops": 2, "random_magnitude": True}, (3, 16, 16), torch.float64, id="float64"),
    ],
)
def test_masked_path_matches_the_grouped_path_row_by_row(
    kwargs: dict[str, Any], shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    """The sync-free path (every op on every row, ``torch.where``) against the grouped one, for the same draw."""
    x = _images(96, *shape, seed=21).to(dtype)
    params = RandAugment(**kwargs).sample(x, _gen(22))
    grouped = RandAugment(**kwargs, grouping="sorted")(x, params=params)
    masked = RandAugment(**kwargs, grouping="masked")(x, params=params)
    assert masked.dtype == grouped.dtype == dtype
    err = (masked - grouped).abs().flatten(1).amax(1)
    worst = int(err.argmax())
    assert err.max() <= 1e-6, f"row {worst} (ops {params['op'][worst].tolist()}) differs by {float(err.max()):.3g}"
    assert set(params["op"].flatten().tolist()) == set(range(len(OPS))), "the draw should cover every op"


def test_auto_grouping_is_sorted_on_the_cpu_and_masked_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(RandAugment, "_apply_grouped", lambda self, x, *a: calls.append("sorted") or x.clone())
    monkeypatch.setattr(RandAugment, "_apply_masked", lambda self, x, *a: calls.append("masked") or x.clone())
    x = torch.rand(4, 3, 8, 8)
    for grouping in ("auto", "sorted", "masked"):
        RandAugment(grouping=grouping)(x, generator=_gen())
    assert calls == ["sorted", "sorted", "masked"]


@pytest.mark.parametrize("grouping", ["sorted", "masked"])
def test_channels_last_images_stay_channels_last(grouping: str) -> None:
    x = torch.rand(8, 3, 8, 8, generator=_gen(23))
    params = RandAugment(num_ops=2).sample(x, _gen(24))
    aug = RandAugment(num_ops=2, grouping=grouping)
    out = aug(x.contiguous(memory_format=torch.channels_last), params=params)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, aug(x, params=params))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_device_and_dtype_are_preserved(device: str, dtype: torch.dtype) -> None:
    x = torch.rand(48, 3, 16, 16, generator=_gen(17)).to(device=device, dtype=dtype)
    aug = RandAugment(num_ops=2, magnitude=15, fill=0.5)
    params = aug.sample(x, torch.Generator(device=device).manual_seed(18))
    out = aug(x, params=params)
    assert (out.device, out.dtype, out.shape) == (x.device, dtype, x.shape)
    assert out.min().item() >= 0.0
    assert out.max().item() <= 1.0
    if dtype.itemsize < 4:
        # No comparison for 16-bit floats: with 8 (bfloat16) or 11 (float16) significant bits, a pixel near a
        # posterize, solarize or equalize level lands on either side, and equalisation moves whole histograms.
        return
    # The same draw on float32 CPU data gives the same images, up to float32 rounding.
    cpu_params = {k: v.cpu() for k, v in params.items()}
    _assert_close(out.cpu().float(), aug(x.cpu().float(), params=cpu_params), 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"num_ops": -1}, "Expected `num_ops` to be a non-negative integer, got -1", id="num_ops"),
        pytest.param({"magnitude": -1}, "Expected `magnitude` to be a non-negative integer, got -1", id="mag-neg"),
        pytest.param({"magnitude": 2.5}, "Expected `magnitude` to be a non-negative integer, got 2.5", id="mag-float"),
        pytest.param(
            {"magnitude": 31}, "Expected `magnitude` to be below `num_magnitude_bins`=31, got 31", id="mag-high"
        ),
        pytest.param(
            {"num_magnitude_bins": 1}, "Expected `num_magnitude_bins` to be an integer >= 2, got 1", id="bins"
        ),
        pytest.param(
            {"random_magnitude": "yes"}, "Expected `random_magnitude` to be True or False, got 'yes'", id="random"
        ),
        pytest.param({"fill": "red"}, "Expected `fill` to be a number or a sequence of numbers, got 'red'", id="fill"),
        pytest.param(
            {"interpolation": "bicubic"},
            "Expected `interpolation` to be one of 'nearest', 'bilinear', got 'bicubic'",
            id="interpolation",
        ),
        pytest.param(
            {"grouping": "sort"},
            "Expected `grouping` to be one of 'auto', 'sorted', 'masked', got 'sort'",
            id="grouping",
        ),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RandAugment(**kwargs)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        pytest.param(
            torch.zeros(2, 3, 8), ValueError, r"images of shape \[N, C, H, W\], got shape \(2, 3, 8\)", id="3d"
        ),
        pytest.param(torch.zeros(2, 4, 8, 8), ValueError, "images with 1 or 3 channels, got 4", id="channels"),
        pytest.param(
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "float images in .0, 1., got dtype", id="uint8"
        ),
    ],
)
def test_input_errors(x: torch.Tensor, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RandAugment()(x, generator=_gen())


def test_params_and_fill_must_fit_the_batch() -> None:
    x = torch.rand(4, 3, 8, 8)
    params = RandAugment(num_ops=2).sample(x, _gen())
    with pytest.raises(ValueError, match=r"Expected `params\['op'\]` of shape \(4, 3\), got \(4, 2\)"):
        RandAugment(num_ops=3)(x, params=params)
    with pytest.raises(ValueError, match="Expected `fill` to have 1 or C=3 values, got 2"):
        RandAugment(fill=(0.1, 0.2))(x, params=params)


def test_benchmark_quick_run_prints_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Smoke test of benchmarks/randaugment.py; nothing is timed here.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    threads = torch.get_num_threads()
    try:
        text = importlib.import_module("randaugment").main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    assert "| 3x32x32 | 16 | ours (per row) |" in text
    assert "faster than the torchvision adapter" in text
