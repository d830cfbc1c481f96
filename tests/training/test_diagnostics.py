"""The logged diagnostics mean what their names say.

- ``maxup/loss`` is the trained loss (the gradient pass);
- ``maxup/worst_loss`` and ``maxup/mean_loss`` both come from the selection pass, so ``worst >= mean`` on every
  step, whatever the model (dropout, BatchNorm), the selection mode, view or precision;
- ``maxup/grad_norm`` is Theorem 1's estimate of ``‖∇ₓL‖``: on a linear loss ``L(x) = w·x`` it must equal ``‖w‖``;
- at ``m = 1`` (warm-up) no selection metric is logged.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger
from scipy import integrate, stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.functional import expected_max_normal, gradient_norm_estimate, maxup_step

pytestmark = [
    # Lightning's advice for real runs; these loaders hold 32 in-memory samples.
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    # Lightning 2.6's own pytree helper uses `LeafSpec`, which torch 2.14 deprecates; nothing this library calls.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

SELECTION_METRICS = ("worst_loss", "mean_loss", "gap", "grad_norm", "selection_share")


# ----------------------------------------------------------------------------------------------------------------------
# Slow references for E[max of m normals] and the spread of Theorem 1's per-sample estimator
# ----------------------------------------------------------------------------------------------------------------------
def _max_moment(m: int, power: int) -> float:
    """``E[max(Z_1..Z_m)^power]`` by direct quadrature of the density of the maximum, ``m φ(z) Φ(z)^(m-1)``."""
    value, _ = integrate.quad(lambda z: z**power * m * stats.norm.pdf(z) * stats.norm.cdf(z) ** (m - 1), -15, 15)
    return value


def _per_sample_std(m: int) -> float:
    """Standard deviation of ``(max_k Z_k - mean_k Z_k) / E[max]`` for ``m`` i.i.d. standard normals.

    ``max - mean`` is location-invariant and the mean is a complete sufficient statistic of the location, so by
    Basu's theorem they are independent: ``Cov(max, mean) = Var(mean) = 1/m`` and
    ``Var(max - mean) = Var(max) + 1/m - 2/m = Var(max) - 1/m``.
    """
    e1 = _max_moment(m, 1)
    var = _max_moment(m, 2) - e1**2 - 1.0 / m
    return math.sqrt(var) / e1


# ----------------------------------------------------------------------------------------------------------------------
# Functional: E[max of m normals] and Theorem 1 on a linear loss
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("m", "expected"),
    [
        pytest.param(1, 0.0, id="m=1"),
        pytest.param(2, 1 / math.sqrt(math.pi), id="m=2"),
        pytest.param(3, 3 / (2 * math.sqrt(math.pi)), id="m=3"),
        pytest.param(4, 1.0293753730039641, id="m=4"),  # tables of normal order statistics (Harter, 1961)
        pytest.param(5, 1.1629644736405196, id="m=5"),
    ],
)
def test_expected_max_normal_known_values(m: int, expected: float) -> None:
    assert expected_max_normal(m) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_expected_max_normal_monte_carlo(m: int) -> None:
    n = 200_000
    z = torch.randn(n, m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    maxima = z.amax(dim=1)
    tolerance = 5 * float(maxima.std()) / math.sqrt(n)  # 5 standard errors of the Monte-Carlo mean
    assert abs(float(maxima.mean()) - expected_max_normal(m)) < tolerance
    assert expected_max_normal(m) == pytest.approx(_max_moment(m, 1), abs=1e-8)


@pytest.mark.parametrize("m", [0, -1, 2.0, True])
def test_expected_max_normal_rejects_bad_m(m: Any) -> None:
    with pytest.raises(ValueError, match=rf"Expected `m` to be a positive integer, got {m!r}"):
        expected_max_normal(m)


@pytest.mark.parametrize("m", [2, 4, 8])
@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_gradient_norm_estimate_on_linear_loss(m: int, sigma: float) -> None:
    """For ``L(x) = w·x`` the gap is exactly ``σ ‖w‖ (max_k u_k - mean_k u_k)``, ``u_k`` standard normal."""
    n, d = 50_000, 5
    w = torch.tensor([3.0, -4.0, 0.0, 12.0, 0.5])
    norm = float(w.norm())
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    out = maxup_step(
        lambda batch: batch @ w, x, m=m, augment=GaussianNoise(sigma), generator=torch.Generator().manual_seed(1)
    )
    estimate = float(gradient_norm_estimate(out.candidate_losses, sigma))
    std = _per_sample_std(m) * norm  # of one sample's estimate; the step averages n of them
    tolerance = 5 * std / math.sqrt(n)
    assert abs(estimate - norm) < tolerance, f"estimate {estimate:.4f} vs ‖w‖ = {norm:.4f} (5σ = {tolerance:.4f})"
    # The derivation of the tolerance holds: the per-sample estimates spread as derived (within 5 %).
    c = out.candidate_losses.double()
    per_sample = (c.amax(dim=0) - c.mean(dim=0)) / (sigma * expected_max_normal(m))
    assert float(per_sample.std()) == pytest.approx(std, rel=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# In a Trainer
# ----------------------------------------------------------------------------------------------------------------------
class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def step_rows(self) -> list[dict[str, float]]:
        """Rows of per-step metrics (those holding ``maxup/loss``)."""
        return [r for r in self.rows if "maxup/loss" in r]

    def epoch_rows(self) -> list[dict[str, float]]:
        """Rows of per-epoch aggregates."""
        return [r for r in self.rows if "maxup/loss_epoch" in r]


class RecordTrainedLoss(Callback):
    """Keeps the loss each training step returned, which Lightning back-propagated."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


class Lit(MaxUpMixin, pl.LightningModule):
    """A classifier or a linear loss ``w·x`` around ``net``."""

    def __init__(self, net: nn.Module, lr: float = 0.1, linear: bool = False, **maxup: Any) -> None:
        super().__init__(**maxup)
        self.net, self.lr, self.linear = net, lr, linear

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        if self.linear:
            return self.net(x).squeeze(1)
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 3),
    )  # fmt: skip


def _fit(model: Lit, *callbacks: Callback, epochs: int = 2, samples: int = 32, batch: int = 8, tmp_path: Any = None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (samples,), generator=g)
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, log_every_n_steps=1,
        callbacks=list(callbacks), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=batch))
    return trainer, logger


# Both from the selection pass, computed from the same [m, B] losses: worst >= mean holds exactly in real arithmetic;
# the relative slack only absorbs float32 rounding of two differently ordered means.
_SLACK = 1e-6


def _assert_worst_at_least_mean(rows: list[dict[str, float]], suffix: str) -> None:
    assert rows, "nothing logged"
    for i, r in enumerate(rows):
        worst, mean, gap = r[f"maxup/worst_loss{suffix}"], r[f"maxup/mean_loss{suffix}"], r[f"maxup/gap{suffix}"]
        assert worst >= mean - _SLACK * abs(mean), f"row {i}: worst {worst} < mean {mean}"
        assert gap >= 0, f"row {i}: gap {gap}"
        assert gap == pytest.approx(worst - mean, abs=1e-5), f"row {i}: gap {gap} vs {worst - mean}"


@pytest.mark.parametrize(
    ("make", "options"),
    [
        pytest.param(_dropout_mlp, {}, id="dropout-eval"),
        pytest.param(_dropout_mlp, {"selection_mode": "train"}, id="dropout-train"),
        pytest.param(_bn_cnn, {}, id="batchnorm-eval"),
        pytest.param(_bn_cnn, {"selection_mode": "train", "chunk_size": 5}, id="batchnorm-train-chunked"),
        pytest.param(_bn_cnn, {"selection_size": 2}, id="batchnorm-low-resolution"),
        pytest.param(_bn_cnn, {"selection_dtype": "bfloat16"}, id="batchnorm-bfloat16"),
    ],
)
def test_worst_loss_at_least_mean_loss_every_step(make: Any, options: dict[str, Any], tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Lit(make(), m=4, augment=GaussianNoise(0.3), **options)
    _, logger = _fit(model, tmp_path=tmp_path)
    steps = logger.step_rows()
    assert len(steps) == 8
    _assert_worst_at_least_mean(steps, "")
    _assert_worst_at_least_mean(logger.epoch_rows(), "_epoch")


def test_logged_grad_norm_on_linear_loss(tmp_path: Any) -> None:
    w = torch.tensor([[3.0, -4.0, 12.0] + [0.0] * 45])
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 1, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(w)
    m, sigma, samples = 4, 0.5, 256
    model = Lit(net, lr=0.0, linear=True, m=m, augment=GaussianNoise(sigma))  # lr 0 keeps w fixed
    _, logger = _fit(model, epochs=1, samples=samples, batch=64, tmp_path=tmp_path)
    norm = float(w.norm())
    tolerance = 5 * _per_sample_std(m) * norm / math.sqrt(samples)  # equal batches: the epoch value averages all
    (epoch,) = logger.epoch_rows()
    assert abs(epoch["maxup/grad_norm_epoch"] - norm) < tolerance, (epoch["maxup/grad_norm_epoch"], norm, tolerance)
    for r in logger.step_rows():
        assert r["maxup/grad_norm"] > 0


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory: Any) -> tuple[pl.Trainer, RecordingLogger, RecordTrainedLoss]:
    """One epoch of warm-up (m = 1), then one of MaxUp (m = 3), on a dropout model."""
    torch.manual_seed(0)
    model = Lit(_dropout_mlp(), m=2, augment=GaussianNoise(0.3))
    losses = RecordTrainedLoss()
    trainer, logger = _fit(model, MaxUp(warmup_epochs=1, m=3), losses, tmp_path=tmp_path_factory.mktemp("warmup"))
    return trainer, logger, losses


def _maxup_keys(row: dict[str, float]) -> set[str]:
    return {k for k in row if k.startswith("maxup/")}


def test_no_selection_metrics_during_warmup(warmup_run: Any) -> None:
    _, logger, _ = warmup_run
    steps = logger.step_rows()
    warmup = [r for r in steps if r["epoch"] == 0]
    maxup = [r for r in steps if r["epoch"] == 1]
    assert len(warmup) == len(maxup) == 4
    for r in warmup:
        assert _maxup_keys(r) == {"maxup/loss", "maxup/m"}, sorted(_maxup_keys(r))
        assert r["maxup/m"] == 1
    first_epoch, second_epoch = logger.epoch_rows()
    assert _maxup_keys(first_epoch) == {"maxup/loss_epoch"}, sorted(_maxup_keys(first_epoch))
    for r in maxup:
        assert {f"maxup/{name}" for name in SELECTION_METRICS} <= _maxup_keys(r), sorted(_maxup_keys(r))
        assert r["maxup/m"] == 3
    assert {f"maxup/{name}_epoch" for name in SELECTION_METRICS} <= _maxup_keys(second_epoch)


def test_logged_loss_is_the_trained_loss(warmup_run: Any) -> None:
    trainer, logger, recorded = warmup_run
    logged = [r["maxup/loss"] for r in logger.step_rows()]
    assert logged == recorded.losses, "maxup/loss must be the loss each step back-propagated"
    for epoch, row in enumerate(logger.epoch_rows()):  # equal batch sizes: the epoch value is the mean of steps
        assert row["maxup/loss_epoch"] == pytest.approx(sum(recorded.losses[4 * epoch : 4 * epoch + 4]) / 4, rel=1e-6)
    assert "maxup/loss" not in trainer.progress_bar_metrics  # off the bar by default (a read per step)


def test_functional_loss_is_the_gradient_pass() -> None:
    """``MaxUpOutput.loss`` is the mean of the gradient forward's losses on the worst copies, not a selection score."""
    torch.manual_seed(0)
    net = _dropout_mlp().train()
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))

    def loss_fn(batch: Any) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(0)
    out = maxup_step(loss_fn, (x, y), m=3, augment=GaussianNoise(0.3), generator=gen, model=net)
    torch.manual_seed(1)
    assert torch.equal(out.loss, loss_fn(out.batch).mean())
    assert out.loss.requires_grad
