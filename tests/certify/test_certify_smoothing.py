"""The smoothed classifier: known answers for a linear base classifier, batching, abstention and errors."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import Tensor, nn

from lightning_maxup.certify import ABSTAIN, Smooth, clopper_pearson_lower
from lightning_maxup.certify.functional import certify_from_counts, sample_counts


class LinearBinary(nn.Module):
    """Logits ``[0, w.x + b]``: class 1 exactly on the positive side of a hyperplane."""

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: Tensor) -> Tensor:
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _linear_problem() -> tuple[LinearBinary, Tensor, Tensor]:
    w = torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=torch.float64)  # |w| = 5
    b = 0.5
    # Signed distances to the boundary of 0.6, 0.3, 0.1, -0.2, -0.45.
    dist = torch.tensor([0.6, 0.3, 0.1, -0.2, -0.45], dtype=torch.float64)
    x = (dist[:, None] * 5 - b) / 25 * w[None, :]  # w.x + b = 5 * dist
    return LinearBinary(w, b), x, dist


def test_linear_known_answer_counts_and_radius() -> None:
    model, x, dist = _linear_problem()
    sigma, n, alpha = 0.5, 20000, 0.001
    smooth = Smooth(model, num_classes=2, sigma=sigma, input_shape=(4,))
    g = torch.Generator().manual_seed(0)
    counts = smooth.sample_counts(x, n, batch_size=4096, generator=g)
    p_a = norm.cdf(dist.abs().numpy() / sigma)  # closed form: P(side of x) = Φ(|w.x + b| / (σ |w|))
    top = (dist > 0).long()
    n_a = counts[torch.arange(5), top].numpy()
    z = (n_a / n - p_a) / (p_a * (1 - p_a) / n) ** 0.5
    assert abs(z).max() < 5, f"largest deviation {abs(z).max():.2f} standard errors; p_a={p_a}, observed {n_a / n}"

    pred, radius = smooth.certify_batch(x, n0=100, n=n, alpha=alpha, batch_size=4096, generator=g)
    true_radius = dist.abs().numpy()  # σ Φ⁻¹(pA) is the distance to the hyperplane
    for i in range(5):
        if int(pred[i]) == ABSTAIN:
            # Only inputs whose pA is close to 1/2 may abstain.
            assert true_radius[i] < 0.1 + 1e-9
            continue
        assert int(pred[i]) == int(top[i])
        slack = p_a[i] - 6 * (p_a[i] * (1 - p_a[i]) / n) ** 0.5
        assert float(radius[i]) <= true_radius[i] + 1e-9, "the certificate exceeds the true robust radius"
        assert float(radius[i]) >= sigma * norm.ppf(slack) - 1e-9, (
            f"radius {float(radius[i])} far below {true_radius[i]}"
        )


def test_certify_on_a_constant_classifier_reaches_the_maximal_radius() -> None:
    # Every noisy copy is class 2, so nA = n and pA_lower = alpha ** (1 / n).
    model = lambda z: torch.tensor([0.0, 0.0, 1.0]).expand(len(z), 3)  # noqa: E731
    smooth = Smooth(model, num_classes=3, sigma=0.25)
    label, radius = smooth.certify(torch.zeros(3), n0=10, n=1000, alpha=0.001, batch_size=256)
    assert label == 2
    assert radius == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)), abs=1e-9)
    assert smooth.predict(torch.zeros(3), n=100, alpha=0.001, batch_size=64) == 2


def test_abstains_on_the_decision_boundary() -> None:
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    smooth = Smooth(LinearBinary(w, 0.0), num_classes=2, sigma=1.0)
    x = torch.zeros(2, dtype=torch.float64)  # pA = 1/2 exactly
    g = torch.Generator().manual_seed(0)
    assert smooth.certify(x, n0=100, n=2000, alpha=0.001, batch_size=512, generator=g) == (ABSTAIN, 0.0)
    assert smooth.predict(x, n=2000, alpha=0.001, batch_size=512, generator=g) == ABSTAIN


def test_batched_certification_equals_one_input_at_a_time() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(9, 3, 2, 2)
    keys = torch.arange(9)
    smooth = Smooth(net, num_classes=4, sigma=0.5, input_shape=(3, 2, 2))
    pred, radius = smooth.certify_batch(x, n0=20, n=300, alpha=0.01, batch_size=128, keys=keys, seed=3)
    for i in range(9):
        p_i, r_i = smooth.certify_batch(
            x[i : i + 1], n0=20, n=300, alpha=0.01, batch_size=17, keys=keys[i : i + 1], seed=3
        )
        assert int(p_i) == int(pred[i])
        assert float(r_i) == float(radius[i])
    prediction = smooth.predict_batch(x, n=300, alpha=0.01, batch_size=64, keys=keys, seed=3)
    for i in range(9):
        assert int(prediction[i]) == int(smooth.predict_batch(x[i : i + 1], 300, 0.01, 5, keys=keys[i : i + 1], seed=3))


def test_restores_training_mode_and_needs_no_grad() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    smooth = Smooth(net, 3, 0.25)
    running = net[1].running_mean.clone()
    smooth.certify_batch(torch.randn(5, 4), n0=5, n=20, alpha=0.1, batch_size=32)
    assert net.training
    assert net[1].training
    assert torch.equal(net[1].running_mean, running), "certification must run the base classifier in eval mode"


def test_uses_cohen_defaults() -> None:
    import inspect

    sig = inspect.signature(Smooth.certify)
    assert (sig.parameters["n0"].default, sig.parameters["n"].default, sig.parameters["alpha"].default) == (
        100,
        100_000,
        0.001,
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda s, x: s.certify(x, n0=0, n=10), "Expected `n0` to be a positive integer, got 0", id="n0"),
        pytest.param(lambda s, x: s.certify(x, n0=10, n=0), "Expected `n` to be a positive integer, got 0", id="n"),
        pytest.param(lambda s, x: s.predict(x, n=-3), "Expected `n` to be a positive integer, got -3", id="predict-n"),
        pytest.param(lambda s, x: s.certify(x, 10, 10, alpha=0.0), r"Expected `alpha` in \(0, 1\), got 0.0", id="a0"),
        pytest.param(lambda s, x: s.certify(x, 10, 10, alpha=1.5), r"Expected `alpha` in \(0, 1\), got 1.5", id="a1"),
        pytest.param(lambda s, x: s.predict(x, 10, alpha=1.0), r"Expected `alpha` in \(0, 1\), got 1.0", id="pa"),
        pytest.param(
            lambda s, x: s.certify(x, 10, 10, batch_size=0),
            "Expected `batch_size` to be a positive integer, got 0",
            id="batch",
        ),
        pytest.param(
            lambda s, x: s.certify(torch.zeros(5), 10, 10),
            r"Expected `x` of the model's input shape \(4,\) \(one input; use the \*_batch methods.*got \(5,\)",
            id="single-shape",
        ),
        pytest.param(
            lambda s, x: s.certify_batch(torch.zeros(2, 5), 10, 10),
            r"Expected `x` of shape \[B, 4\] to match the model's input shape \(4,\), got \(2, 5\)",
            id="batch-shape",
        ),
    ],
)
def test_errors(call, match: str) -> None:  # noqa: ANN001
    smooth = Smooth(nn.Linear(4, 3), num_classes=3, sigma=0.5, input_shape=(4,))
    with pytest.raises(ValueError, match=match):
        call(smooth, torch.zeros(4))


@pytest.mark.parametrize("sigma", [0, -0.5, math.nan, math.inf])
def test_sigma_must_be_positive(sigma: float) -> None:
    with pytest.raises(ValueError, match="Expected `sigma` to be positive, got"):
        Smooth(nn.Linear(4, 3), num_classes=3, sigma=sigma)


def test_shape_mismatch_without_declared_input_shape_is_reported() -> None:
    smooth = Smooth(nn.Linear(4, 3), num_classes=3, sigma=0.5)
    with pytest.raises(ValueError, match=r"The base classifier cannot take inputs of shape \(6,\)"):
        smooth.certify(torch.zeros(6), n0=5, n=5)
    with pytest.raises(ValueError, match=r"Expected `num_classes` to be an integer >= 2, got 1"):
        Smooth(nn.Linear(4, 3), num_classes=1, sigma=0.5)
    with pytest.raises(TypeError, match="Expected `base_classifier` to be callable, got int"):
        Smooth(3, num_classes=3, sigma=0.5)  # type: ignore[arg-type]


def test_pa_lower_reported_radius_is_consistent() -> None:
    # certify's radius equals σ Φ⁻¹ of the Clopper–Pearson bound of the counts it drew (same generator stream).
    model, x, dist = _linear_problem()
    smooth = Smooth(model, 2, 0.5)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    pred, radius = smooth.certify_batch(x[:1], n0=50, n=500, alpha=0.01, batch_size=10_000, generator=g1)
    smooth.sample_counts(x[:1], 50, 10_000, generator=g2)  # the selection draw
    counts = smooth.sample_counts(x[:1], 500, 10_000, generator=g2)
    p_lower = float(clopper_pearson_lower(counts[0, 1], 500, 0.01))
    assert float(radius[0]) == pytest.approx(0.5 * norm.ppf(p_lower), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Reduced-precision noisy forwards: Smooth(dtype=..., memory_format=...)
# --------------------------------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """A small CNN that records, per forward, its input's memory format and the autocast state it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.calls: list[dict[str, object]] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        self.calls.append(
            {
                "channels_last": x.is_contiguous(memory_format=torch.channels_last),
                "autocast": torch.is_autocast_enabled("cpu"),
                "autocast_dtype": torch.get_autocast_dtype("cpu"),
                "conv_dtype": h.dtype,
            }
        )
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(
            {"dtype": torch.int8},
            r"Expected `dtype` to be torch.bfloat16, torch.float16, torch.float32 or None, got torch.int8",
            id="dtype",
        ),
        pytest.param(
            {"dtype": "bf16"},
            r"Expected `dtype` to be torch.bfloat16, torch.float16, torch.float32 or None, got 'bf16'",
            id="dtype-string",
        ),
        pytest.param(
            {"memory_format": torch.preserve_format},
            r"Expected `memory_format` to be torch.channels_last, torch.contiguous_format or None, got"
            r" torch.preserve_format",
            id="memory-format",
        ),
        pytest.param(
            {"memory_format": "channels_last"},
            r"Expected `memory_format` to be torch.channels_last, torch.contiguous_format or None, got 'channels_last'",
            id="memory-format-string",
        ),
    ],
)
def test_precision_options_are_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Smooth(nn.Linear(4, 3), num_classes=3, sigma=0.5, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "memory_format", "bf16", "channels_last"),
    [
        pytest.param(None, None, False, False, id="default"),
        pytest.param(torch.float32, torch.contiguous_format, False, False, id="explicit-fp32"),
        pytest.param(torch.bfloat16, None, True, False, id="bf16"),
        pytest.param(None, torch.channels_last, False, True, id="channels-last"),
        pytest.param(torch.bfloat16, torch.channels_last, True, True, id="bf16-channels-last"),
    ],
)
def test_noisy_forwards_run_in_the_requested_precision_and_format(
    dtype: torch.dtype | None, memory_format: torch.memory_format | None, bf16: bool, channels_last: bool
) -> None:
    net = Recorder()
    smooth = Smooth(net, num_classes=3, sigma=0.25, dtype=dtype, memory_format=memory_format)
    g = torch.Generator().manual_seed(0)
    pred, radius = smooth.certify_batch(torch.rand(2, 3, 6, 6), n0=8, n=40, alpha=0.1, batch_size=16, generator=g)
    assert pred.dtype == torch.long
    assert radius.dtype == torch.float64
    assert len(net.calls) == 1 + 5  # 16 selection rows in one forward, 80 estimation rows in five
    for call in net.calls:
        assert call["autocast"] is bf16
        assert call["conv_dtype"] == (torch.bfloat16 if bf16 else torch.float32)
        if bf16:
            assert call["autocast_dtype"] == torch.bfloat16
        assert call["channels_last"] is channels_last
    assert not torch.is_autocast_enabled("cpu"), "autocast must not leak out of certification"


def test_memory_format_leaves_inputs_that_are_not_images_alone() -> None:
    model, x, _ = _linear_problem()
    smooth = Smooth(model, num_classes=2, sigma=0.5, input_shape=(4,), memory_format=torch.channels_last)
    counts = smooth.sample_counts(x, 50, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert counts.sum(dim=1).tolist() == [50] * 5


def test_full_precision_default_is_bit_identical_to_the_functional_core() -> None:
    # The options must not touch the default path: same generator seed, same counts and radii as calling
    # sample_counts / certify_from_counts directly on the bare network, with no wrapper in between.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.rand(6, 3, 6, 6)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sel = sample_counts(net, x, 30, 0.5, 5, 64, generator=g, stage=0)
        est = sample_counts(net, x, 300, 0.5, 5, 64, generator=g, stage=1)
    ref_pred, ref_radius, _ = certify_from_counts(sel, est, 0.5, 0.01)
    for kwargs in ({}, {"dtype": None, "memory_format": None}, {"dtype": torch.float32}):
        smooth = Smooth(net, num_classes=5, sigma=0.5, **kwargs)  # type: ignore[arg-type]
        pred, radius = smooth.certify_batch(
            x, n0=30, n=300, alpha=0.01, batch_size=64, generator=torch.Generator().manual_seed(7)
        )
        assert torch.equal(pred, ref_pred), kwargs
        assert torch.equal(radius, ref_radius), (
            f"{kwargs}: largest radius difference {(radius - ref_radius).abs().max()}"
        )


class ChannelMeans(nn.Module):
    """Logits = k x the per-channel means of an image: class c wins where channel c is the brightest."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(10.0 * torch.eye(3).view(3, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_bf16_agrees_with_float32_on_the_same_noise() -> None:
    # Images whose brightest channel leads by margins from 0.02 (hard) to 0.8 (easy): the per-copy decision flips
    # between bf16 and fp32 only where the noisy margin is within bf16 rounding (~2^-8 relative) of zero.
    margins = torch.tensor([0.8, 0.5, 0.3, 0.1, 0.05, 0.02])
    x = torch.full((6, 3, 8, 8), 0.4)
    x[:, 1] += margins[:, None, None]
    n, sigma = 2000, 0.25
    fp32 = Smooth(ChannelMeans(), num_classes=3, sigma=sigma)
    bf16 = Smooth(ChannelMeans(), num_classes=3, sigma=sigma, dtype=torch.bfloat16, memory_format=torch.channels_last)
    counts = [s.sample_counts(x, n, batch_size=1000, generator=torch.Generator().manual_seed(3)) for s in (fp32, bf16)]
    flipped = int((counts[0] - counts[1]).abs().sum()) // 2  # a lower bound on the copies decided differently
    assert flipped <= 0.01 * n * len(x), f"{flipped} of {n * len(x)} noisy copies counted differently"
    (p32, r32), (p16, r16) = (
        s.certify_batch(x, n0=100, n=n, alpha=0.001, batch_size=1000, generator=torch.Generator().manual_seed(4))
        for s in (fp32, bf16)
    )
    easy = margins >= 0.1  # pA >= 0.99 here: far from the abstention threshold
    assert torch.equal(p32[easy], p16[easy])
    # Tolerance: 0.05 σ, about one Monte-Carlo standard deviation of the hard inputs' radii across seeds (0.006-0.013
    # here); the bf16 - fp32 difference on the same noise stayed below 0.007 over eight seeds.
    diff = (r32 - r16).abs().max()
    assert diff <= 0.05 * sigma, f"largest radius difference {float(diff):.4f}"


class InputRecorder(nn.Module):
    """Records every input batch it is given; constant logits."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.clone())
        return torch.zeros(len(x), 2)


@pytest.mark.parametrize(
    ("b", "num", "batch_size"),
    [
        pytest.param(3, 50, 64, id="few-inputs-per-forward"),
        pytest.param(40, 2, 64, id="many-inputs-per-forward"),
        pytest.param(2, 10, 1000, id="one-forward"),
        pytest.param(5, 7, 3, id="chunks-within-an-input"),
    ],
)
def test_noisy_copies_are_bit_identical_to_a_row_by_row_reference(b: int, num: int, batch_size: int) -> None:
    # Reference: each row is its input plus σ times the generator's next normal draws, chunk by chunk, with the
    # plain `input + sigma * noise` arithmetic; the fp32 path must reproduce it bit for bit.
    x, sigma = torch.randn(b, 3, 4, 4), 0.37
    net = InputRecorder()
    Smooth(net, num_classes=2, sigma=sigma).sample_counts(
        x, num, batch_size, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    rows = [(r // num) for r in range(b * num)]
    for k, got in enumerate(net.inputs):
        chunk = rows[k * batch_size : (k + 1) * batch_size]
        noise = torch.randn((len(chunk), 3, 4, 4), generator=g)
        expected = torch.stack([x[i] + sigma * noise[j] for j, i in enumerate(chunk)])
        assert torch.equal(got, expected), f"chunk {k}: largest difference {(got - expected).abs().max():.3g}"
    assert sum(len(t) for t in net.inputs) == b * num
