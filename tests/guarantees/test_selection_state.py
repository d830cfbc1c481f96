"""The selection pass leaves the model exactly as it was, whatever its layers.

Twin test: models A and B are built identically; A runs a whole MaxUp step (selection pass, then the gradient
forward on the worst copies), B runs only the gradient forward on the same worst copies (``out.batch``) from the
same global random state. Afterwards every parameter, buffer, gradient and ``training`` flag of A must equal B's,
tensor by tensor. Any state the selection pass leaked (running statistics, a power-iteration vector, a custom
buffer, a consumed dropout mask, a mode flag) makes them differ.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.functional import MaxUpOutput, maxup_step

B, M, C = 6, 3, 3  # samples, copies, classes


# ----------------------------------------------------------------------------------------------------------------------
# Modules with state of their own
# ----------------------------------------------------------------------------------------------------------------------
class RunningMean(nn.Module):
    """Subtracts a running mean of its input that it updates in ``forward`` while training (in place)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
                self.count += 1
        return x - self.mean


class RunningMeanReassign(RunningMean):
    """Like :class:`RunningMean`, but assigns a new tensor to the buffer instead of updating it in place."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
            self.count = self.count + 1
        return x - self.mean


class FirstBatchScale(nn.Module):
    """Data-dependent initialisation: a buffer empty (``None``) until the first forward fills it from that batch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            self.scale = 1.0 / (x.detach().std(dim=0) + 1.0)
        return x * self.scale


class RegistersOnFirstForward(nn.Module):
    """Like :class:`FirstBatchScale`, but the buffer does not exist until the first forward registers it."""

    def forward(self, x: Tensor) -> Tensor:
        if not hasattr(self, "scale"):
            self.register_buffer("scale", 1.0 / (x.detach().std(dim=0) + 1.0))
        return x * self.scale


class FrozenStem(nn.Module):
    """Overrides ``train()``: the stem (with BatchNorm) stays in eval mode, and the requested mode is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, C))
        self.requested = True

    def train(self, mode: bool = True) -> FrozenStem:
        super().train(mode)
        self.stem.eval()
        self.requested = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stem(x))


class NormalisesOwnWeight(nn.Module):
    """Writes its own parameter in ``forward`` (weight renormalised in place): a change that cannot be undone."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, C)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.linear.weight.div_(self.linear.weight.norm())
        return self.linear(x)


# ----------------------------------------------------------------------------------------------------------------------
# Model factories
# ----------------------------------------------------------------------------------------------------------------------
def _head(width: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Linear(width, C))


def _conv(norm: nn.Module) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(), *_head(4)
    )  # fmt: skip


def _vector(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), norm, *_head(8))


MODELS: list = [
    # Train-mode selection draws dropout masks from the global generator: unless its state is restored, the
    # gradient forward draws other masks than the twin's, and the losses and gradients differ.
    pytest.param(lambda: _vector(nn.Dropout(0.5)), "vector", id="Dropout"),
    pytest.param(lambda: _vector(nn.BatchNorm1d(8)), "vector", id="BatchNorm1d"),
    pytest.param(lambda: _conv(nn.BatchNorm2d(4)), "image", id="BatchNorm2d"),
    # In one process SyncBatchNorm computes as BatchNorm in both modes (no process group, no collective), which is
    # the CPU stand-in: its buffers and flags are what the snapshot must restore.
    pytest.param(lambda: _conv(nn.SyncBatchNorm(4)), "image", id="SyncBatchNorm"),
    pytest.param(
        lambda: _conv(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)), "image", id="InstanceNorm2d"
    ),
    pytest.param(lambda: _conv(nn.LazyBatchNorm2d()), "image", id="LazyBatchNorm2d"),
    pytest.param(lambda: _conv(nn.GroupNorm(2, 4)), "image", id="GroupNorm"),
    pytest.param(lambda: _vector(nn.LayerNorm(8)), "vector", id="LayerNorm"),
    pytest.param(
        lambda: nn.Sequential(parametrizations.spectral_norm(nn.Linear(6, 8)), *_head(8)),
        "vector",
        id="spectral_norm-parametrization",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 8)), *_head(8)), "vector", id="spectral_norm-hook"
    ),
    pytest.param(lambda: nn.Sequential(nn.LazyLinear(8), *_head(8)), "vector", id="LazyLinear"),
    pytest.param(lambda: _vector(RunningMean(8)), "vector", id="custom-buffer-inplace"),
    pytest.param(lambda: _vector(RunningMeanReassign(8)), "vector", id="custom-buffer-reassigned"),
    pytest.param(lambda: _vector(FirstBatchScale()), "vector", id="custom-buffer-filled-in-forward"),
    pytest.param(lambda: _vector(RegistersOnFirstForward()), "vector", id="custom-buffer-registered-in-forward"),
    pytest.param(FrozenStem, "vector", id="custom-train-override"),
]
SELECTION_MODES = [pytest.param("eval", id="eval"), pytest.param("train", id="train")]
# Chunked: several selection forwards, each seeing the state the previous one would have left.
MODES = [
    pytest.param("eval", None, id="eval"),
    pytest.param("train", None, id="train"),
    pytest.param("train", 5, id="train-chunked"),
]


def _twins(make: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """Two models built from the same global random state (lazy modules cannot be deep-copied before a forward)."""
    torch.manual_seed(0)
    a = make().train()
    torch.manual_seed(0)
    b = make().train()
    return a, b


def _batch(kind: str) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (B, 6) if kind == "vector" else (B, 3, 5, 5)
    return torch.randn(shape, generator=g), torch.randint(0, C, (B,), generator=g)


def _loss_fn(model: nn.Module) -> Callable[[tuple[Tensor, Tensor]], Tensor]:
    def per_sample_loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    return per_sample_loss


def _state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter, buffer and gradient, by qualified name (tied tensors under each of their names)."""
    out = {f"param {k}": v for k, v in model.named_parameters(remove_duplicate=False)}
    out |= {f"buffer {k}": v for k, v in model.named_buffers(remove_duplicate=False)}
    out |= {f"grad {k}": v.grad for k, v in model.named_parameters(remove_duplicate=False) if v.grad is not None}
    return out


def _largest_difference(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    return f"largest difference {(a.double() - b.double()).abs().max().item():.3g}"


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    """``torch.equal`` on every parameter, buffer and gradient, equal ``training`` flags; names what differs."""
    sa, sb = _state(a), _state(b)
    assert sorted(sa) == sorted(sb), f"different tensors: {sorted(set(sa) ^ set(sb))}"
    diffs = [f"{name}: {_largest_difference(sa[name], sb[name])}" for name in sa if not torch.equal(sa[name], sb[name])]
    assert not diffs, "selection changed the model:\n" + "\n".join(diffs)
    flags_a = {name: mod.training for name, mod in a.named_modules()}
    flags_b = {name: mod.training for name, mod in b.named_modules()}
    assert flags_a == flags_b, {k: (flags_a[k], flags_b.get(k)) for k in flags_a if flags_a[k] != flags_b.get(k)}


def _run_twins(
    make: Callable[[], nn.Module], kind: str, mode: str, chunk_size: int | None = None
) -> tuple[nn.Module, nn.Module, MaxUpOutput]:
    a, b = _twins(make)
    batch = _batch(kind)
    torch.manual_seed(2)
    out = maxup_step(
        _loss_fn(a),
        batch,
        m=M,
        augment=GaussianNoise(0.5),
        generator=torch.Generator().manual_seed(3),
        model=a,
        selection_mode=mode,
        chunk_size=chunk_size,
    )
    out.loss.backward()
    torch.manual_seed(2)
    losses_b = _loss_fn(b)(out.batch)  # only the gradient forward, on the same worst copies
    losses_b.mean().backward()
    assert torch.equal(out.losses.detach(), losses_b.detach()), "gradient forward differs from the twin's: " + (
        _largest_difference(out.losses, losses_b)
    )
    return a, b, out


@pytest.mark.parametrize(("mode", "chunk_size"), MODES)
@pytest.mark.parametrize(("make", "kind"), MODELS)
def test_selection_leaves_model_as_twin(
    make: Callable[[], nn.Module], kind: str, mode: str, chunk_size: int | None
) -> None:
    a, b = _twins(make)
    if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in a.parameters()):
        assert_same_model(a, b)  # the twins start equal
    a, b, out = _run_twins(make, kind, mode, chunk_size)
    assert out.candidate_losses.shape == (M, B)
    assert_same_model(a, b)


@pytest.mark.parametrize("mode", SELECTION_MODES)
def test_custom_train_override_is_respected(mode: str) -> None:
    a, _, _ = _run_twins(FrozenStem, "vector", mode)
    assert a.training
    assert a.requested, "the module's own train(True) must be what restored its mode"
    assert not a.stem.training, "the frozen stem must stay in eval mode"
    assert not a.stem[1].training
    assert a.head.training


@pytest.mark.parametrize(("mode", "chunk_size"), MODES)
def test_lazy_module_materialised_by_selection(mode: str, chunk_size: int | None) -> None:
    a, _, _ = _run_twins(lambda: _conv(nn.LazyBatchNorm2d()), "image", mode, chunk_size)
    bn = a[1]
    assert type(bn) is nn.BatchNorm2d
    assert bn.weight.shape == (4,)
    assert int(bn.num_batches_tracked) == 1, "only the gradient forward may count as a tracked batch"


@pytest.mark.parametrize("mode", SELECTION_MODES)
def test_global_random_state_as_without_selection(mode: str) -> None:
    """Dropout in train-mode selection draws masks, but the global stream ends where a twin's ends."""
    a, b = _twins(lambda: _vector(nn.Dropout(0.5)))
    batch = _batch("vector")
    torch.manual_seed(5)
    out = maxup_step(
        _loss_fn(a), batch, m=M, augment=GaussianNoise(0.5), generator=torch.Generator().manual_seed(3), model=a,
        selection_mode=mode,
    )  # fmt: skip
    after_step = torch.get_rng_state()
    torch.manual_seed(5)
    _loss_fn(b)(out.batch)
    after_twin = torch.get_rng_state()
    assert torch.equal(after_step, after_twin)


def test_parameter_written_by_selection_is_reported() -> None:
    model = NormalisesOwnWeight()
    with pytest.warns(RuntimeWarning, match=r"changed parameter `weight` of Linear"):
        maxup_step(
            _loss_fn(model), _batch("vector"), m=2, augment=GaussianNoise(0.5),
            generator=torch.Generator().manual_seed(0), model=model,
        )  # fmt: skip
