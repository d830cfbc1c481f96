"""What each selection mode does with dropout.

``selection_mode="eval"`` scores the copies with dropout off; ``selection_mode="train"`` keeps dropout on, with
masks of its own: the global generator is seeded, inside the selection pass, from a hash of its state as the step
found it, and restored afterwards, so the gradient pass draws the masks it would have drawn without a selection
pass, independent of the selection's. Either way the model's ``training`` flags are as they were.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.functional import MaxUpOutput, _seed_from_global_rng, maxup_step

B, M, C = 8, 4, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, C)).train()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 6, generator=g), torch.randint(0, C, (B,), generator=g)


def _loss_fn(model: nn.Module):
    def per_sample_loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    return per_sample_loss


def _step(model: nn.Module, mode: str, global_seed: int) -> MaxUpOutput:
    torch.manual_seed(global_seed)
    return maxup_step(
        _loss_fn(model), _batch(), m=M, augment=GaussianNoise(0.3), generator=torch.Generator().manual_seed(2),
        model=model, selection_mode=mode,
    )  # fmt: skip


def _reference_losses(model: nn.Module, batch: tuple[Tensor, Tensor], training: bool, seed: int) -> Tensor:
    """Slow reference: every row forwarded alone (eval) or the whole batch from a known global state (train)."""
    was = model.training
    model.train(training)
    torch.manual_seed(seed)
    with torch.no_grad():
        if training:  # the masks depend on how the rows are batched: the selection pass forwards all at once
            losses = _loss_fn(model)(batch)
        else:
            x, y = batch
            losses = torch.stack([_loss_fn(model)((x[i : i + 1], y[i : i + 1]))[0] for i in range(x.shape[0])])
    model.train(was)
    return losses


def _assert_equal(actual: Tensor, expected: Tensor, what: str) -> None:
    err = (actual.double() - expected.double()).abs().max().item()
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-6), f"{what}: largest difference {err:.3g}"


def test_eval_mode_scores_copies_with_dropout_off() -> None:
    model = _model()
    out = _step(model, "eval", global_seed=3)
    expected = _reference_losses(model, out.candidates, training=False, seed=0).view(M, B)
    _assert_equal(out.candidate_losses, expected, "eval-mode candidate losses vs. a dropout-off reference")
    # Dropout off: the scores do not depend on the global random state.
    assert torch.equal(_step(_model(), "eval", global_seed=4).candidate_losses, out.candidate_losses)


def test_train_mode_scores_copies_with_dropout_on() -> None:
    model = _model()
    out = _step(model, "train", global_seed=3)
    # Masks come from the global generator seeded from its state as the step found it (not that state itself,
    # which the gradient pass draws from).
    torch.manual_seed(3)
    expected = _reference_losses(model, out.candidates, training=True, seed=_seed_from_global_rng(())).view(M, B)
    _assert_equal(out.candidate_losses, expected, "train-mode candidate losses vs. a dropout-on reference")
    eval_scores = _reference_losses(model, out.candidates, training=False, seed=0).view(M, B)
    differ = ~torch.isclose(out.candidate_losses, eval_scores, rtol=1e-4, atol=1e-6)
    # With p = 0.5 on 32 units every row gets a different mask; allow a few coincidences.
    assert differ.float().mean() > 0.9, f"only {int(differ.sum())} of {M * B} scores differ from dropout off"


def test_train_mode_masks_follow_the_global_generator() -> None:
    first = _step(_model(), "train", global_seed=3)
    same = _step(_model(), "train", global_seed=3)
    other = _step(_model(), "train", global_seed=4)
    assert torch.equal(first.candidates[0], other.candidates[0]), "the same candidates are scored"
    assert torch.equal(first.candidate_losses, same.candidate_losses)
    assert not torch.isclose(first.candidate_losses, other.candidate_losses, rtol=1e-4, atol=1e-6).all()


@pytest.mark.parametrize("mode", [pytest.param("eval", id="eval"), pytest.param("train", id="train")])
def test_gradient_pass_draws_the_masks_it_would_draw_without_selection(mode: str) -> None:
    model = _model()
    out = _step(model, mode, global_seed=3)
    torch.manual_seed(3)
    expected = _loss_fn(model)(out.batch).detach()
    _assert_equal(out.losses.detach(), expected, "gradient-pass losses vs. a forward from the step's global state")


@pytest.mark.parametrize("mode", [pytest.param("eval", id="eval"), pytest.param("train", id="train")])
@pytest.mark.parametrize("training", [pytest.param(True, id="model-train"), pytest.param(False, id="model-eval")])
def test_training_flags_restored(mode: str, training: bool) -> None:
    model = _model().train(training)
    model[2].train(not training)  # a module whose flag differs from its parent's stays so
    _step(model, mode, global_seed=3)
    assert model.training is training
    assert model[2].training is (not training)
    assert all(mod.training is training for i, mod in enumerate(model) if i != 2)
