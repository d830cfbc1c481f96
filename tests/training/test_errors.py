"""Errors that stay true: what is relabelled, what passes through, timing that cannot crash, fresh noise."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup.augment import GaussianNoise
from lightning_maxup.certify.recipes import SmoothAdvClassifier
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.training._deferred import StepClock


class _Failing(nn.Module):
    """Raises ``error`` on the selection forward (no gradient), works with gradient."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.lin = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            raise self.error
        return self.lin(x.flatten(1))


def _run(net: nn.Module, **options: Any) -> Any:
    batch = (torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    return maxup_step(
        lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none"),
        batch,
        augment=GaussianNoise(0.1),
        m=2,
        model=net,
        **options,
    )


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), id="oom"),
        pytest.param(RuntimeError("CUDA error: an illegal memory access was encountered"), id="cuda-error"),
        pytest.param(RuntimeError("Expected all tensors to be on the same device"), id="device"),
    ],
)
def test_only_shape_errors_of_the_low_resolution_forward_are_relabelled(error: Exception) -> None:
    with pytest.raises(type(error)) as info:
        _run(_Failing(error), selection_size=4)
    assert info.value is error, "the original error must pass through unchanged"


def test_a_shape_error_of_the_low_resolution_forward_names_selection_size() -> None:
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x48 and 192x2)")
    with pytest.raises(ValueError, match=r"`selection_size`=4; the model may not take inputs that small") as info:
        _run(_Failing(error), selection_size=4)
    assert info.value.__cause__ is error


def test_a_shape_error_without_selection_size_passes_through() -> None:
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
        _run(_Failing(error))
    assert info.value is error


class _FakeEvent:
    """Stands in for ``torch.cuda.Event``: records a shared clock; ``synchronize()`` fails the test unless the
    device has passed the event (``_FakeEvent.done``), since the clock must never stall on work in flight."""

    clock = 0.0
    done = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.time: float | None = None

    def record(self) -> None:
        self.time = _FakeEvent.clock

    def synchronize(self) -> None:
        assert self.time is not None
        assert self.time <= _FakeEvent.done, "the step clock waited for the device"

    def elapsed_time(self, end: _FakeEvent) -> float:
        if self.time is None or end.time is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return end.time - self.time


def test_cuda_step_clock_reports_at_a_fixed_lag_without_stalling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    _FakeEvent.clock = _FakeEvent.done = 0.0
    clock, cuda = StepClock(), torch.device("cuda")
    shares = []
    # Each step: 1 time unit selecting, 3 for the rest; the device runs one step (4 units) behind the host.
    for step in range(6):
        _FakeEvent.done = _FakeEvent.clock - 4.0
        shares.append(clock.tick(cuda))
        if step != 1:  # step 1 runs no selection (a step that skips MaxUp): no share for it
            _FakeEvent.clock += 1.0
            clock.selection_done(0.1)
        _FakeEvent.clock += 3.0
    # A step's share arrives once two later selecting steps have finished, on every rank alike: step 0's at
    # tick 4 (steps 2 and 3 finished), step 2's at tick 5.
    assert shares == [None, None, None, None, 0.25, 0.25], shares


def test_cpu_step_clock_shares_the_interval_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("lightning_maxup.training._deferred.time.perf_counter", lambda: now[0])
    clock, cpu = StepClock(), torch.device("cpu")
    shares = []
    for selects in (True, False, True):
        shares.append(clock.tick(cpu))
        if selects:
            clock.selection_done(1.0)
        now[0] += 4.0
    shares.append(clock.tick(cpu))
    assert shares == [None, 0.25, None, 0.25], shares


# The classifier defines a validation_step; this test needs only training batches.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_smoothadv_draws_fresh_noise_for_every_micro_batch() -> None:
    """With ``accumulate_grad_batches=2`` the two micro-batches of an optimizer step must not share noise."""
    torch.manual_seed(0)
    model = SmoothAdvClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), 3, sigma=0.5, epsilon=0.0, seed=3, optimizer="adam", lr=1e-3
    )
    fingerprints: list[list[float]] = []
    original = model._noise_generator

    def recording() -> torch.Generator:
        g = original()
        state = g.get_state()
        fingerprints.append(torch.randn(4, generator=g).tolist())
        g.set_state(state)
        return g

    model._noise_generator = recording  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, DataLoader(data, batch_size=8))
    assert len(fingerprints) == 4
    assert len({tuple(f) for f in fingerprints}) == 4, "micro-batches of one optimizer step reused the same noise"
