import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_maxup.augment import (
    Compose,
    PointGaussianNoise,
    PointJitter,
    PointSubset,
    RandomPointRotation,
    RandomPointScale,
)
from lightning_maxup.augment.pointcloud import farthest_point_sample, rotation_matrices
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import KeyedGenerator


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape, (a.shape, b.shape)
    assert err <= atol, f"largest error {err}"


# ---------------------------------------------------------------------------------------------------------------
# Slow, obviously correct per-cloud, per-point references
# ---------------------------------------------------------------------------------------------------------------
def _reference_jitter(x, noise, sigma, clip):
    out = x.clone()
    for i in range(x.shape[0]):
        for p in range(x.shape[1]):
            for c in range(3):
                out[i, p, c] = x[i, p, c] + min(max(sigma * float(noise[i, p, c]), -clip), clip)
    return out


def _reference_noise(x, sigma, noise):
    return torch.stack([x[i] + float(sigma[i]) * noise[i] for i in range(x.shape[0])])


def _reference_scale(x, scale):
    out = x.clone()
    for i in range(x.shape[0]):
        for c in range(3):
            s = float(scale[i, c if scale.shape[1] == 3 else 0])
            out[i, :, c] = x[i, :, c] * s
    return out


def _reference_rotation(x, angle, axis):
    out = x.clone()
    a, b = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]  # right-handed: rotates a towards b
    for i in range(x.shape[0]):
        c, s = math.cos(float(angle[i])), math.sin(float(angle[i]))
        for p in range(x.shape[1]):
            u, v = float(x[i, p, a]), float(x[i, p, b])
            out[i, p, a] = c * u - s * v
            out[i, p, b] = s * u + c * v
    return out


def _reference_fps(cloud, k):
    chosen = [0]
    for _ in range(1, k):
        best, best_d = -1, -1.0
        for p in range(cloud.shape[0]):
            d = min(float(((cloud[p] - cloud[q]) ** 2).sum()) for q in chosen)
            if d > best_d:
                best, best_d = p, d
        chosen.append(best)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------------------------------------------
def test_jitter_matches_reference():
    x = torch.randn(3, 7, 3)
    aug = PointJitter(sigma=0.05, clip=0.06)
    params = aug.sample(x, _gen())
    _close(aug.apply(x, params), _reference_jitter(x, params["noise"], 0.05, 0.06))
    assert (aug.apply(x, params) - x).abs().max() <= 0.06 + 1e-6


def test_gaussian_noise_matches_reference_and_draws_sigma_per_cloud():
    x = torch.randn(5, 6, 3)
    aug = PointGaussianNoise(sigma=0.3, min_sigma=0.1)
    params = aug.sample(x, _gen())
    _close(aug.apply(x, params), _reference_noise(x, params["sigma"], params["noise"]))
    assert ((params["sigma"] >= 0.1) & (params["sigma"] <= 0.3)).all()
    assert params["sigma"].unique().numel() == 5


@pytest.mark.parametrize("anisotropic", [pytest.param(False, id="isotropic"), pytest.param(True, id="anisotropic")])
def test_scale_matches_reference(anisotropic):
    x = torch.randn(4, 5, 3)
    aug = RandomPointScale(0.5, 2.0, anisotropic=anisotropic)
    params = aug.sample(x, _gen())
    assert params["scale"].shape == (4, 3 if anisotropic else 1)
    _close(aug.apply(x, params), _reference_scale(x, params["scale"]))


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_rotation_matches_reference(axis):
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    aug = RandomPointRotation(axis=axis)
    params = aug.sample(x, _gen())
    out = aug.apply(x, params)
    _close(out, _reference_rotation(x, params["angle"], axis), atol=1e-10)
    _close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-10)


def test_rotation_matrices_are_orthonormal_with_unit_determinant():
    r = rotation_matrices(torch.linspace(-3, 3, 7, dtype=torch.float64), "y")
    _close(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(7, 3, 3), atol=1e-12)
    _close(torch.linalg.det(r), torch.ones(7, dtype=torch.float64), atol=1e-12)


def test_rotation_respects_max_angle_and_covers_range():
    x = torch.randn(4000, 1, 3)
    angle = RandomPointRotation(max_angle=0.3).sample(x, _gen())["angle"]
    assert angle.abs().max() <= 0.3
    assert angle.min() < -0.28
    assert angle.max() > 0.28
    assert abs(float(angle.mean())) < 0.02  # uniform on [-0.3, 0.3]: std of the mean ~ 0.003


# ---------------------------------------------------------------------------------------------------------------
# Protocol properties shared by all point augmentations
# ---------------------------------------------------------------------------------------------------------------
AUGS = [
    pytest.param(PointJitter(), id="jitter"),
    pytest.param(PointGaussianNoise(0.02), id="noise"),
    pytest.param(RandomPointScale(anisotropic=True), id="scale"),
    pytest.param(RandomPointRotation(), id="rotation"),
]


@pytest.mark.parametrize("aug", AUGS)
def test_keeps_labels_never_mutates_and_replays(aug):
    x, y = torch.randn(6, 32, 3), torch.arange(6)
    x0 = x.clone()
    params = aug.sample((x, y), _gen(1))
    out_x, out_y = aug((x, y), params=params)
    assert torch.equal(x, x0)
    assert out_y is y
    assert torch.equal(aug((x, y), generator=_gen(1))[0], out_x)
    assert not torch.equal(aug((x, y), generator=_gen(2))[0], out_x)


@pytest.mark.parametrize("aug", AUGS)
def test_draws_are_independent_per_row(aug):
    """Eight copies of one cloud must come out eight different ways."""
    x = torch.randn(1, 32, 3).expand(8, 32, 3).contiguous()
    out = aug(x, generator=_gen())
    assert len({tuple(row.flatten().tolist()) for row in out}) == 8


@pytest.mark.parametrize("aug", AUGS)
def test_keyed_draws_do_not_depend_on_the_batch_split(aug):
    x = torch.randn(6, 16, 3)
    keys = torch.stack([torch.arange(6), torch.zeros(6, dtype=torch.long)], 1)
    whole = aug(x, generator=KeyedGenerator(3, keys))
    parts = torch.cat(
        [aug(x[:2], generator=KeyedGenerator(3, keys[:2])), aug(x[2:], generator=KeyedGenerator(3, keys[2:]))]
    )
    _close(whole, parts, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda: PointJitter(sigma=0), r"`sigma` to be a positive number, got 0", id="sigma"),
        pytest.param(lambda: PointJitter(clip=-1.0), r"`clip` to be a positive number, got -1.0", id="clip"),
        pytest.param(lambda: PointGaussianNoise(0.1, min_sigma=0.2), r"`min_sigma` .* got 0.2", id="min_sigma"),
        pytest.param(lambda: RandomPointScale(2.0, 1.0), r"`high` to be at least `low`=2.0, got 1.0", id="high"),
        pytest.param(lambda: RandomPointRotation(axis="w"), r"`axis` .* got 'w'", id="axis"),
        pytest.param(lambda: RandomPointRotation(max_angle=0), r"`max_angle` .* got 0", id="max_angle"),
        pytest.param(lambda: PointSubset(0), r"`k` to be a positive integer, got 0", id="k"),
        pytest.param(lambda: PointSubset(4, method="grid"), r"`method` .* got 'grid'", id="method"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"shape \[N, P, 3\], got shape \(2, 8, 6\)"):
        PointJitter()(torch.zeros(2, 8, 6), generator=_gen())
    with pytest.raises(TypeError, match="floating-point coordinates, got dtype torch.int64"):
        RandomPointRotation()(torch.zeros(2, 8, 3, dtype=torch.long), generator=_gen())


# ---------------------------------------------------------------------------------------------------------------
# PointSubset
# ---------------------------------------------------------------------------------------------------------------
def test_point_subset_keeps_k_distinct_points_of_each_cloud_in_order():
    x, y = torch.randn(5, 64, 3), torch.arange(5)
    view = PointSubset(16, seed=4)
    idx = view.indices(x)
    sub, sub_y = view((x, y))
    assert sub_y is y
    for i in range(5):
        rows = idx[i].tolist()
        assert rows == sorted(set(rows))
        assert len(rows) == 16
        _close(sub[i], torch.stack([x[i, r] for r in rows]), atol=0)


def test_point_subset_is_deterministic_per_cloud_content_and_split_invariant():
    x = torch.randn(6, 64, 3)
    view = PointSubset(8)
    whole = view.indices(x)
    assert torch.equal(torch.cat([view.indices(x[:1]), view.indices(x[1:])]), whole)
    # Copies of one cloud jittered differently get different subsets; identical copies get the same one.
    copies = PointJitter(0.01)(x[:1].expand(4, 64, 3), generator=_gen())
    assert len({tuple(r) for r in view.indices(copies).tolist()}) == 4
    assert torch.equal(view.indices(x[:1].expand(2, 64, 3))[0], view.indices(x[:1].expand(2, 64, 3))[1])
    assert not torch.equal(PointSubset(8, seed=1).indices(x), whole)


def test_point_subset_is_roughly_uniform():
    x = torch.randn(1, 32, 3)
    jitter = PointJitter(1e-3)
    counts = torch.zeros(32)
    for s in range(200):
        counts += torch.bincount(PointSubset(8).indices(jitter(x, generator=_gen(s)))[0], minlength=32)
    # Each point is kept with probability 1/4: 50 of 200 expected, std ~ 6.1.
    assert counts.min() > 25, counts
    assert counts.max() < 75, counts


def test_farthest_point_sample_matches_reference():
    x = torch.randn(3, 20, 3, dtype=torch.float64)
    got = farthest_point_sample(x, 6)
    for i in range(3):
        assert got[i].tolist() == _reference_fps(x[i], 6)
    assert PointSubset(6, method="fps").indices(x).tolist() == got.sort(dim=1).values.tolist()


def test_point_subset_returns_small_clouds_unchanged():
    x = torch.randn(2, 8, 3)
    assert PointSubset(8)(x) is x


class _PointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x).amax(dim=1))


def test_maxup_step_selects_on_subset_and_backpropagates_full_clouds():
    torch.manual_seed(0)
    net = _PointNet()
    seen: list[int] = []

    def loss_fn(batch):
        seen.append(batch[0].shape[1])
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    x, y = torch.randn(4, 128, 3), torch.randint(0, 3, (4,))
    augment = Compose([RandomPointRotation(), RandomPointScale(), PointJitter()])
    out = maxup_step(loss_fn, (x, y), augment=augment, m=3, generator=_gen(), model=net, selection_view=PointSubset(32))
    assert seen == [32, 128]
    assert out.batch[0].shape == (4, 128, 3)
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())
