"""The pure certification math: Clopper–Pearson, PREDICT/CERTIFY from counts, batched Monte-Carlo counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm
from torch import Tensor, nn

from lightning_maxup.certify.functional import (
    ABSTAIN,
    certified_accuracy,
    certified_counts,
    certified_radius,
    certify_from_counts,
    clopper_pearson_lower,
    clopper_pearson_upper,
    predict_from_counts,
    sample_counts,
    smooth_adv_attack,
)


# ----------------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------------
def _upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed term by term with exact binomial coefficients."""
    return math.fsum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


def _lower_tail(k: int, n: int, p: float) -> float:
    return math.fsum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(0, k + 1))


class IdentityClass(nn.Module):
    """Predicts the class written in the first pixel (rounded), whatever small noise is added."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        c = x.flatten(1)[:, 0].round().long().clamp(0, self.num_classes - 1)
        return torch.nn.functional.one_hot(c, self.num_classes).float()


# ----------------------------------------------------------------------------------------------------------------------
# Clopper–Pearson
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "alpha"),
    [
        pytest.param(1, 10, 0.05, id="k1-n10"),
        pytest.param(5, 10, 0.05, id="half"),
        pytest.param(10, 10, 0.05, id="all"),
        pytest.param(37, 50, 0.001, id="alpha-0.001"),
        pytest.param(99, 100, 0.01, id="n100"),
        pytest.param(200, 200, 0.001, id="all-n200"),
    ],
)
def test_clopper_pearson_lower_is_the_exact_binomial_tail_quantile(k: int, n: int, alpha: float) -> None:
    p = float(clopper_pearson_lower(k, n, alpha))
    tail = _upper_tail(k, n, p)
    assert abs(tail - alpha) < 1e-9, f"P(X >= {k} | n={n}, p={p}) = {tail}, expected {alpha}"
    # And it is the smallest such p: slightly below, the upper tail is smaller than alpha.
    assert _upper_tail(k, n, p * (1 - 1e-6)) < alpha


def test_clopper_pearson_lower_closed_forms() -> None:
    n, alpha = 1000, 0.001
    assert float(clopper_pearson_lower(0, n, alpha)) == 0.0
    # k = n: P(X >= n) = p^n = alpha.
    assert float(clopper_pearson_lower(n, n, alpha)) == pytest.approx(alpha ** (1 / n), rel=1e-12)


@pytest.mark.parametrize(("k", "n"), [pytest.param(0, 10, id="none"), pytest.param(3, 10, id="some")])
def test_clopper_pearson_upper_is_the_exact_lower_tail_quantile(k: int, n: int) -> None:
    p = float(clopper_pearson_upper(k, n, 0.05))
    assert abs(_lower_tail(k, n, p) - 0.05) < 1e-9
    assert float(clopper_pearson_upper(n, n, 0.05)) == 1.0


def test_clopper_pearson_is_vectorised_and_keeps_device() -> None:
    k = torch.tensor([0, 3, 10])
    out = clopper_pearson_lower(k, 10, 0.05)
    assert out.dtype == torch.float64
    assert out.device == k.device
    expected = [float(clopper_pearson_lower(int(v), 10, 0.05)) for v in k]
    assert out.tolist() == pytest.approx(expected, abs=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"k": 1, "n": 10, "alpha": 0.0}, r"Expected `alpha` in \(0, 1\), got 0.0", id="alpha-0"),
        pytest.param({"k": 1, "n": 10, "alpha": 1.0}, r"Expected `alpha` in \(0, 1\), got 1.0", id="alpha-1"),
        pytest.param({"k": 11, "n": 10, "alpha": 0.1}, r"Expected 0 <= `k` <= `n`, got k=11", id="k>n"),
        pytest.param({"k": -1, "n": 10, "alpha": 0.1}, r"Expected 0 <= `k` <= `n`, got k=-1", id="k<0"),
    ],
)
def test_clopper_pearson_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        clopper_pearson_lower(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Radius, PREDICT and CERTIFY from counts
# ----------------------------------------------------------------------------------------------------------------------
def test_certified_radius_closed_form() -> None:
    p = torch.tensor([0.5, 0.6, 0.9, 0.999], dtype=torch.float64)
    r = certified_radius(p, sigma=0.5)
    assert r.tolist() == pytest.approx([0.5 * norm.ppf(v) for v in p.tolist()], abs=1e-12)
    with pytest.raises(ValueError, match="Expected `sigma` to be positive, got 0"):
        certified_radius(p, sigma=0)


def _reference_predict(counts: Tensor, alpha: float) -> list[int]:
    out = []
    for row in counts.tolist():
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        a, b = row[order[0]], row[order[1]]
        out.append(order[0] if binomtest(a, a + b, 0.5).pvalue <= alpha else ABSTAIN)
    return out


def test_predict_from_counts_matches_a_loop_over_binomtest() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 60, (200, 4), generator=g)
    counts[::7, 1] += 100  # some clear winners
    counts[0] = torch.tensor([30, 30, 0, 0])  # an exact tie
    got = predict_from_counts(counts, alpha=0.01).tolist()
    assert got == _reference_predict(counts, 0.01)
    assert got[0] == ABSTAIN
    assert any(v != ABSTAIN for v in got)
    assert any(v == ABSTAIN for v in got)


@pytest.mark.parametrize(
    ("counts", "alpha", "expected"),
    [
        pytest.param([[100, 0]], 0.001, 0, id="unanimous"),
        pytest.param([[0, 55, 45]], 0.05, ABSTAIN, id="close-call-abstains"),
        pytest.param([[10, 0, 0]], 0.001, ABSTAIN, id="too-few-samples"),
        pytest.param([[1, 2, 900]], 0.001, 2, id="runner-up-small"),
    ],
)
def test_predict_from_counts_abstention(counts: list, alpha: float, expected: int) -> None:
    assert predict_from_counts(torch.tensor(counts), alpha).tolist() == [expected]


def test_certify_from_counts_matches_the_formula_and_abstains() -> None:
    sigma, alpha = 0.25, 0.001
    sel = torch.tensor([[90, 10, 0], [10, 90, 0], [40, 35, 25], [100, 0, 0]])
    est = torch.tensor([[9000, 1000, 0], [5000, 5000, 0], [4000, 3500, 2500], [10000, 0, 0]])
    pred, radius, p_lower = certify_from_counts(sel, est, sigma, alpha)
    for i in range(len(sel)):
        c_a = int(sel[i].argmax())
        n_a, n = int(est[i, c_a]), int(est[i].sum())
        pl = float(clopper_pearson_lower(n_a, n, alpha))
        assert float(p_lower[i]) == pytest.approx(pl, abs=1e-15)
        if pl < 0.5:
            assert int(pred[i]) == ABSTAIN
            assert float(radius[i]) == 0.0
        else:
            assert int(pred[i]) == c_a
            assert float(radius[i]) == pytest.approx(sigma * norm.ppf(pl), abs=1e-12)
    # Row 1: selection picks class 1 with exactly half the estimation mass -> pA_lower < 0.5 -> abstain.
    # Row 2: top class has 40% -> abstain.
    assert pred.tolist() == [0, ABSTAIN, ABSTAIN, 0]
    assert float(radius[3]) == pytest.approx(sigma * norm.ppf(alpha ** (1 / 10000)), abs=1e-9)


def test_certified_accuracy_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(-1, 3, (50,), generator=g)
    target = torch.randint(0, 3, (50,), generator=g)
    radius = torch.where(
        pred >= 0, torch.rand(50, generator=g, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    )
    radii = [0.0, 0.25, 0.5, 0.75]
    expected = [
        sum(int(p == t and r >= rr) for p, t, r in zip(pred.tolist(), target.tolist(), radius.tolist(), strict=True))
        for rr in radii
    ]
    assert certified_counts(pred, radius, target, radii).tolist() == expected
    assert certified_accuracy(pred, radius, target, radii).tolist() == pytest.approx([e / 50 for e in expected])
    with pytest.raises(ValueError, match=r"Expected `prediction`, `radius` and `target` of the same shape \[N\]"):
        certified_accuracy(pred, radius[:3], target, radii)


# ----------------------------------------------------------------------------------------------------------------------
# Monte-Carlo counts, batched across inputs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 7, 30, 1000])
def test_sample_counts_assigns_every_row_to_its_input(batch_size: int) -> None:
    classes = torch.tensor([3, 0, 4, 4, 1])
    x = classes.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    counts = sample_counts(IdentityClass(5), x, num=13, sigma=1e-4, num_classes=5, batch_size=batch_size, generator=g)
    expected = torch.zeros(5, 5, dtype=torch.long)
    expected[torch.arange(5), classes] = 13
    assert torch.equal(counts, expected), f"largest error {int((counts - expected).abs().max())}"


def test_keyed_noise_does_not_depend_on_batching_or_batch_composition() -> None:
    torch.manual_seed(0)
    net = nn.Linear(6, 3)
    x = torch.randn(8, 6)
    keys = torch.arange(100, 108)
    whole = sample_counts(net, x, 50, 1.0, 3, batch_size=64, keys=keys, seed=5)
    part = sample_counts(net, x[3:5], 50, 1.0, 3, batch_size=7, keys=keys[3:5], seed=5)
    assert torch.equal(whole[3:5], part)
    other_seed = sample_counts(net, x, 50, 1.0, 3, batch_size=64, keys=keys, seed=6)
    assert not torch.equal(whole, other_seed)


def test_sample_counts_reproducible_with_a_seeded_generator() -> None:
    net = nn.Linear(4, 3)
    x = torch.randn(3, 4)
    a = sample_counts(net, x, 100, 0.5, 3, 32, generator=torch.Generator().manual_seed(1))
    b = sample_counts(net, x, 100, 0.5, 3, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.sum(dim=1).tolist() == [100, 100, 100]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"sigma": 0.0}, "Expected `sigma` to be positive, got 0.0", id="sigma-0"),
        pytest.param({"sigma": -1.0}, "Expected `sigma` to be positive, got -1.0", id="sigma-negative"),
        pytest.param({"num": 0}, "Expected `num` to be a positive integer, got 0", id="num-0"),
        pytest.param({"batch_size": 0}, "Expected `batch_size` to be a positive integer, got 0", id="batch-0"),
        pytest.param({"num_classes": 1}, "Expected `num_classes` to be an integer >= 2, got 1", id="classes-1"),
        pytest.param({"num_classes": 4}, r"logits of shape \[10, `num_classes`=4\], got \(10, 3\)", id="logits"),
    ],
)
def test_sample_counts_errors(kwargs: dict, match: str) -> None:
    args = {"num": 5, "sigma": 0.5, "num_classes": 3, "batch_size": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_counts(nn.Linear(4, 3), torch.zeros(2, 4), **args)


def test_sample_counts_input_shape_mismatch_names_the_shape() -> None:
    with pytest.raises(ValueError, match=r"cannot take inputs of shape \(5,\) \(`x` has shape \(2, 5\)\)"):
        sample_counts(nn.Linear(4, 3), torch.zeros(2, 5), 5, 0.5, 3, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to have a generator on another device")
def test_sample_counts_rejects_a_generator_on_another_device() -> None:
    with pytest.raises(ValueError, match="Expected `generator` on the input's device"):
        sample_counts(nn.Linear(4, 3).cuda(), torch.zeros(2, 4, device="cuda"), 5, 0.5, 3, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------------------------------
# SmoothAdv's attack
# ----------------------------------------------------------------------------------------------------------------------
def _reference_one_step(net: nn.Module, x: Tensor, y: Tensor, noise: Tensor, eps: float) -> Tensor:
    """One PGD step of length 2 eps, projected to the eps ball: x + eps * g / |g|, one sample at a time."""
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        probs = torch.stack([torch.softmax(net(xi + noise[k, i : i + 1]), dim=1) for k in range(len(noise))]).mean(0)
        loss = -torch.log(probs[0, y[i]])
        (g,) = torch.autograd.grad(loss, xi)
        out.append((x[i : i + 1] + eps * g / g.norm()).detach())
    return torch.cat(out)


def test_smooth_adv_attack_matches_a_per_sample_reference() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.rand(6, 5) * 0.5 + 0.25, torch.randint(0, 3, (6,))
    noise = 0.1 * torch.randn(3, 6, 5)
    got = smooth_adv_attack(net, x, y, noise, epsilon=0.1, steps=1, clamp=None)
    ref = _reference_one_step(net, x, y, noise, 0.1)
    err = float((got - ref).abs().max())
    assert err < 1e-5, f"largest error {err}"


def test_smooth_adv_attack_stays_in_the_ball_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    net = nn.Linear(10, 4)
    x, y = torch.rand(32, 10), torch.randint(0, 4, (32,))
    noise = 0.25 * torch.randn(4, 32, 10)
    adv = smooth_adv_attack(net, x, y, noise, epsilon=0.5, steps=5)
    assert float((adv - x).norm(dim=1).max()) <= 0.5 + 1e-5
    assert float(adv.min()) >= 0.0
    assert float(adv.max()) <= 1.0

    @torch.no_grad()
    def smoothed_loss(inp: Tensor) -> float:
        probs = torch.softmax(net(inp[None] + noise), dim=2).mean(0)
        return float(torch.nn.functional.nll_loss(torch.log(probs), y))

    assert smoothed_loss(adv) > smoothed_loss(x)
    assert torch.equal(smooth_adv_attack(net, x, y, noise, epsilon=0.0, steps=3), x)
    with pytest.raises(ValueError, match="Expected `epsilon` to be a non-negative number, got -1"):
        smooth_adv_attack(net, x, y, noise, epsilon=-1, steps=1)
    with pytest.raises(ValueError, match=r"Expected `noise` of shape \[m, 32, 10\]"):
        smooth_adv_attack(net, x, y, noise[:, :3], epsilon=0.5, steps=1)


def test_numpy_integers_are_accepted_as_counts() -> None:
    assert float(clopper_pearson_lower(np.int64(5), np.int64(10), 0.05)) == pytest.approx(
        float(clopper_pearson_lower(5, 10, 0.05))
    )
