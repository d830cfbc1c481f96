"""Built-in augmentations against per-row Python-loop references, plus statistics of their draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_maxup.augment import (
    Compose,
    CutMix,
    Cutout,
    GaussianNoise,
    Mixup,
    RandomCrop,
    RandomHorizontalFlip,
    soft_targets,
)
from lightning_maxup.core.random import KeyedGenerator, beta, normal, randint, uniform

ALL = [
    pytest.param(GaussianNoise(0.5), id="noise"),
    pytest.param(Cutout(3), id="cutout"),
    pytest.param(CutMix(1.0, 5), id="cutmix"),
    pytest.param(Mixup(0.4, 5), id="mixup"),
    pytest.param(RandomCrop(8, padding=2), id="crop"),
    pytest.param(RandomCrop(8, padding=2, padding_mode="reflect"), id="crop-reflect"),
    pytest.param(RandomHorizontalFlip(), id="flip"),
    pytest.param(Compose([RandomCrop(8, padding=1), RandomHorizontalFlip(), Cutout(2)]), id="compose"),
]


def _batch(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("aug", ALL)
def test_never_modifies_the_callers_batch(aug):
    x, y = _batch()
    x0, y0 = x.clone(), y.clone()
    out = aug((x, y), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x0)
    assert torch.equal(y, y0)
    assert out[0] is not x
    assert out[0].shape == x.shape


@pytest.mark.parametrize("aug", ALL)
def test_same_seed_same_output_different_seed_different_output(aug):
    batch = _batch()
    a = aug(batch, generator=torch.Generator().manual_seed(1))
    b = aug(batch, generator=torch.Generator().manual_seed(1))
    c = aug(batch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("aug", [p.values[0] for p in ALL if p.id != "compose"])
def test_params_replay(aug):
    batch = _batch()
    params = aug.sample(batch, torch.Generator().manual_seed(5))
    direct = aug(batch, generator=torch.Generator().manual_seed(5))
    replay = aug(batch, params=params)
    assert torch.equal(direct[0], replay[0])
    assert torch.equal(direct[1], replay[1])


def test_rows_draw_independently():
    # Identical rows must come out different: every row has its own draw.
    x = torch.rand(1, 3, 8, 8).expand(64, 3, 8, 8)
    y = torch.zeros(64, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    # Outcomes: continuous noise; 64 Cutout centres (about 40 distinct expected); 25 crop offsets (about 23).
    for aug, least in ((GaussianNoise(0.1), 64), (Cutout(3), 25), (RandomCrop(8, padding=2), 15)):
        out = aug((x, y), generator=g)[0]
        distinct = len({tuple(r.flatten().tolist()) for r in out})
        assert distinct >= least, f"{aug}: only {distinct} distinct rows out of 64"


def test_cutout_matches_loop_reference():
    x, y = _batch()
    aug = Cutout(size=4, fill=-1.0)
    params = aug.sample((x, y), torch.Generator().manual_seed(3))
    out = aug((x, y), params=params)[0]
    ref = x.clone()
    for i in range(len(x)):
        cy, cx = int(params["cy"][i]), int(params["cx"][i])
        ref[i, :, max(cy - 2, 0) : max(cy + 2, 0), max(cx - 2, 0) : max(cx + 2, 0)] = -1.0
    assert torch.equal(out, ref), f"max error {(out - ref).abs().max()}"


def test_cutout_centres_are_uniform():
    n = 8000
    params = Cutout(2).sample(torch.zeros(n, 1, 4, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(params["cy"] * 4 + params["cx"], minlength=16).float()
    # Each of 16 cells expects n/16 = 500 (sd ~ 21.7); 5 sd is a bound a correct sampler breaks once in ~3e6 runs.
    assert (counts - n / 16).abs().max() < 5 * math.sqrt(n / 16 * (15 / 16))


def test_cutmix_matches_loop_reference_and_mixes_labels_by_pasted_area():
    n = 32
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, 8, 8).clone()  # row i is filled with i
    y = torch.arange(n) % 5
    aug = CutMix(alpha=1.0, num_classes=5)
    params = aug.sample((x, y), torch.Generator().manual_seed(7))
    out_x, out_y = aug((x, y), params=params)
    for i in range(n):
        j = int(params["partner"][i])
        assert j != i
        lam = float(params["lam"][i])
        cut_h, cut_w = int(8 * math.sqrt(1 - lam)), int(8 * math.sqrt(1 - lam))
        cy, cx = int(params["cy"][i]), int(params["cx"][i])
        t, b = min(max(cy - cut_h // 2, 0), 8), min(max(cy + cut_h // 2, 0), 8)
        le, r = min(max(cx - cut_w // 2, 0), 8), min(max(cx + cut_w // 2, 0), 8)
        ref = x[i].clone()
        ref[:, t:b, le:r] = x[j, :, t:b, le:r]
        assert torch.equal(out_x[i], ref), f"row {i}"
        pasted = float((out_x[i, 0] == j).float().mean())  # share of pixels that came from the partner
        expected = (1 - pasted) * F.one_hot(y[i], 5).float() + pasted * F.one_hot(y[j], 5).float()
        assert torch.allclose(out_y[i], expected, atol=1e-6), f"row {i}: {out_y[i]} != {expected}"


def test_mixup_matches_loop_reference():
    x, y = _batch()
    aug = Mixup(alpha=0.4, num_classes=5)
    params = aug.sample((x, y), torch.Generator().manual_seed(2))
    out_x, out_y = aug((x, y), params=params)
    for i in range(len(x)):
        j, lam = int(params["partner"][i]), float(params["lam"][i])
        assert torch.allclose(out_x[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)
        ref_y = lam * F.one_hot(y[i], 5).float() + (1 - lam) * F.one_hot(y[j], 5).float()
        assert torch.allclose(out_y[i], ref_y, atol=1e-6)


def test_mixing_accepts_soft_targets_and_cross_entropy_uses_them():
    x, y = _batch()
    soft = Mixup(1.0, 5)((x, y), generator=torch.Generator().manual_seed(0))[1]
    twice = CutMix(1.0, 5)((x, soft), generator=torch.Generator().manual_seed(1))[1]
    assert torch.allclose(twice.sum(1), torch.ones(len(x)))
    logits = torch.randn(len(x), 5)
    ce = F.cross_entropy(logits, twice, reduction="none")
    ref = -(twice * logits.log_softmax(1)).sum(1)
    assert torch.allclose(ce, ref, atol=1e-6)


def test_random_crop_matches_loop_reference():
    x, y = _batch()
    aug = RandomCrop(6, padding=2, padding_mode="reflect")
    params = aug.sample((x, y), torch.Generator().manual_seed(3))
    out = aug((x, y), params=params)[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        t, le = int(params["top"][i]), int(params["left"][i])
        assert torch.equal(out[i], padded[i, :, t : t + 6, le : le + 6])
    assert params["top"].min() >= 0
    assert params["top"].max() <= 6


def test_flip_matches_loop_reference_and_rate():
    x, y = _batch(4000)
    aug = RandomHorizontalFlip(p=0.3)
    params = aug.sample((x, y), torch.Generator().manual_seed(0))
    out = aug((x, y), params=params)[0]
    for i in range(20):
        assert torch.equal(out[i], x[i].flip(-1) if params["flip"][i] else x[i])
    rate = float(params["flip"].float().mean())
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 4000)


def test_gaussian_noise_statistics():
    x = torch.zeros(200, 3, 8, 8)
    noise = GaussianNoise(0.25)(x, generator=torch.Generator().manual_seed(0)) - x
    # 38,400 draws: the sample sd is within 2% of sigma with overwhelming probability.
    assert abs(float(noise.std()) - 0.25) < 0.005
    assert abs(float(noise.mean())) < 0.01


def test_beta_statistics():
    for alpha in (0.2, 1.0, 2.0):
        lam = beta(alpha, 40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        var = 1 / (4 * (2 * alpha + 1))
        assert abs(float(lam.mean()) - 0.5) < 5 * math.sqrt(var / 40000)
        assert abs(float(lam.var()) - var) < 0.05 * var
        assert float(lam.min()) >= 0
        assert float(lam.max()) <= 1


def test_keyed_draws_depend_only_on_the_row_key():
    keys = torch.stack([torch.arange(10), torch.arange(10) % 3], 1)
    whole = KeyedGenerator(5, keys)
    parts = [KeyedGenerator(5, keys[:4]), KeyedGenerator(5, keys[4:])]
    for draw in (
        lambda g, n: uniform((n, 3), generator=g),
        lambda g, n: normal((n, 2), generator=g),
        lambda g, n: randint(0, 7, (n,), generator=g),
        lambda g, n: beta(1.0, n, generator=g),
    ):
        full = draw(whole, 10)
        split = torch.cat([draw(parts[0], 4), draw(parts[1], 6)])
        assert torch.equal(full, split)
    assert not torch.equal(
        uniform((10,), generator=KeyedGenerator(5, keys)), uniform((10,), generator=KeyedGenerator(6, keys))
    )


def test_keyed_uniform_statistics():
    u = uniform((20000, 4), generator=KeyedGenerator(0, torch.arange(20000)))
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # Neighbouring rows and columns are uncorrelated.
    assert abs(float(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.03


def test_augmentations_accept_keyed_generators():
    x, y = _batch(6)
    g = KeyedGenerator(0, torch.arange(6))
    for aug in (GaussianNoise(0.1), Cutout(2), CutMix(1.0, 5), RandomCrop(8, padding=1), RandomHorizontalFlip()):
        out = aug((x, y), generator=g)
        assert out[0].shape == x.shape


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        pytest.param(lambda: GaussianNoise(0), r"Expected `sigma` to be a positive number, got 0", id="sigma0"),
        pytest.param(lambda: GaussianNoise(-1.0), r"`sigma`.*got -1.0", id="sigma-neg"),
        pytest.param(lambda: Cutout(0), r"Expected `size` to be a positive integer, got 0", id="cutout0"),
        pytest.param(lambda: Cutout(2.5), r"`size`.*got 2.5", id="cutout-float"),
        pytest.param(lambda: CutMix(0, 10), r"Expected `alpha` to be a positive number, got 0", id="alpha0"),
        pytest.param(lambda: Mixup(1.0, 0), r"Expected `num_classes` to be a positive integer, got 0", id="classes0"),
        pytest.param(lambda: RandomCrop(8, padding=-1), r"`padding`.*got -1", id="pad-neg"),
        pytest.param(lambda: RandomCrop(8, padding_mode="wrap"), r"`padding_mode`.*got 'wrap'", id="pad-mode"),
        pytest.param(
            lambda: RandomHorizontalFlip(1.5), r"Expected `p` to be a probability in \[0, 1\], got 1.5", id="p"
        ),
        pytest.param(lambda: Compose([1]), r"Expected `augmentations\[0\]` to be callable", id="compose"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"Cutout expects images of shape \[N, C, H, W\], got shape \(4, 8\)"):
        Cutout(2)(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"labels in \[0, `num_classes`=3\), got values in \[0, 4\]"):
        CutMix(1.0, 3)((torch.zeros(5, 1, 4, 4), torch.arange(5)))
    with pytest.raises(ValueError, match="CutMix mixes labels"):
        CutMix(1.0, 3)(torch.zeros(5, 1, 4, 4))
    with pytest.raises(ValueError, match=r"soft targets of shape \[N, 3\], got shape \(5, 4\)"):
        soft_targets(torch.rand(5, 4), 3)
    with pytest.raises(ValueError, match="larger than the padded image"):
        RandomCrop(10)(torch.zeros(2, 1, 8, 8))


def test_randint_with_per_column_python_bounds_matches_tensor_bounds():
    """``high=(h, w)`` (no tensor from Python data) draws what ``high=torch.tensor([h, w])`` draws."""
    for make in (lambda: torch.Generator().manual_seed(3), lambda: KeyedGenerator(3, torch.arange(500))):
        by_tuple = randint(2, (9, 40), (500, 2), generator=make())
        by_tensor = randint(2, torch.tensor([9, 40]), (500, 2), generator=make())
        assert torch.equal(by_tuple, by_tensor)
        assert by_tuple.amin(0).tolist() == [2, 2]
        assert by_tuple.amax(0).tolist() == [8, 39]
    with pytest.raises(ValueError, match=r"one `high` per element of the last dimension of \(4, 2\), got \(3, 4, 5\)"):
        randint(0, (3, 4, 5), (4, 2), generator=torch.Generator())


def test_host_hash_matches_the_tensor_hash():
    from lightning_maxup.core.random import hash32, hash32_int

    values = [0, 1, 2, 0x85EBCA6B, 7 * 0x85EBCA6B, 2**32 - 1, 2**40 + 5]
    expected = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [hash32_int(v) for v in values] == expected


def test_label_range_is_checked_on_the_first_call_and_later_gives_nan_targets():
    x, y = _batch(8)
    for aug in (CutMix(1.0, 5), Mixup(0.4, 5)):
        aug((x, y), generator=torch.Generator().manual_seed(0))  # the first call checks, and passes
        bad = y.clone()
        bad[3] = 5
        _, soft = aug((x, bad), generator=torch.Generator().manual_seed(0))  # no host read: no error
        assert soft.isnan().any(dim=1).tolist() == [
            bool(i == 3 or p == 3)
            for i, p in enumerate(aug.sample((x, bad), torch.Generator().manual_seed(0))["partner"])
        ]
        with pytest.raises(ValueError, match=r"labels in \[0, `num_classes`=5\), got values in \[0, 5\]"):
            aug.check((x, bad))


def test_out_of_range_labels_after_the_first_call_fail_the_step_finiteness_check():
    from lightning_maxup.core.functional import maxup_step

    x, y = _batch(8)
    net = torch.nn.Linear(8 * 8 * 3, 5)
    aug = CutMix(1.0, 5)

    def loss_fn(b):
        return F.cross_entropy(net(b[0].flatten(1)), b[1], reduction="none")

    maxup_step(loss_fn, (x, y), augment=aug, m=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="candidate losses"):
        maxup_step(loss_fn, (x, torch.full_like(y, 9)), augment=aug, m=2, generator=torch.Generator().manual_seed(0))


def test_word_dropout_token_range_is_checked_on_the_first_call_and_later_counted_on_the_device():
    from lightning_maxup.augment import WordEmbeddingDropout

    aug = WordEmbeddingDropout(0.3, vocab_size=6)
    tokens = torch.tensor([[0, 5, 2], [1, 1, 3]])
    aug((tokens, tokens), generator=torch.Generator().manual_seed(0))
    aug.check_deferred()  # nothing out of range yet
    bad = torch.tensor([[0, 6, 2], [1, -1, 3]])
    scale = aug((bad, bad), generator=torch.Generator().manual_seed(0)).embedding_scale
    assert not scale.isnan().any()  # never a NaN loss: the ids are named by check_deferred instead
    assert scale[:, 1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"2 token id\(s\) outside \[0, `vocab_size`=6\).*from -1 to 6"):
        aug.check_deferred()
    aug.check_deferred()  # read and reset
    with pytest.raises(ValueError, match=r"token ids in \[0, `vocab_size`=6\), got values in \[-1, 6\]"):
        aug.check((bad, bad))


def test_cutout_fill_keeps_the_image_dtype():
    x = torch.full((4, 1, 6, 6), 200, dtype=torch.uint8)
    out = Cutout(3, fill=7)(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) == {7, 200}
    half = Cutout(3, fill=0.25)(x.to(torch.bfloat16), generator=torch.Generator().manual_seed(0))
    assert half.dtype == torch.bfloat16
    assert set(half.unique().tolist()) == {0.25, 200.0}
