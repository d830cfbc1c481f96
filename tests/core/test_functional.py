"""The MaxUp step against a slow per-sample, per-copy loop reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core._state import preserved
from lightning_maxup.core.batch import expand_copies, gather_rows
from lightning_maxup.core.functional import maxup_step, select_worst
from lightning_maxup.core.views import downsample_view


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _batch(b: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 4, 4, generator=g), torch.randint(0, 3, (b,), generator=g)


def _loss_fn(net: nn.Module):
    def per_sample_loss(batch):
        x, y = batch
        return F.cross_entropy(net(x), y, reduction="none")

    return per_sample_loss


def _reference(net: nn.Module, batch, sigma: float, m: int, seed: int):
    """Slow reference: candidates drawn as the step draws them, each row's loss forwarded alone, python argmax."""
    x, y = batch
    b = x.shape[0]
    cand_x, cand_y = GaussianNoise(sigma)(expand_copies(batch, m), generator=torch.Generator().manual_seed(seed))
    losses = torch.empty(m, b)
    net.eval()
    with torch.no_grad():
        for k in range(m):
            for i in range(b):
                r = k * b + i
                losses[k, i] = F.cross_entropy(net(cand_x[r : r + 1]), cand_y[r : r + 1])
    net.train()
    selected = [max(range(m), key=lambda k, i=i: float(losses[k, i])) for i in range(b)]
    worst_x = torch.stack([cand_x[selected[i] * b + i] for i in range(b)])
    worst_y = torch.stack([cand_y[selected[i] * b + i] for i in range(b)])
    return losses, torch.tensor(selected), worst_x, worst_y


def test_expand_copies_is_copy_major_for_nested_batches():
    b, m = 3, 4
    batch = {"x": torch.arange(b * 2).view(b, 2), "meta": [torch.arange(b)], "name": "keep"}
    out = expand_copies(batch, m)
    assert out["name"] == "keep"
    for k in range(m):
        for i in range(b):
            assert torch.equal(out["x"][k * b + i], batch["x"][i])
            assert int(out["meta"][0][k * b + i]) == i
    assert torch.equal(out["x"], batch["x"].repeat(m, 1))


@pytest.mark.parametrize(
    ("m", "chunk_size"),
    [
        pytest.param(2, None, id="m2"),
        pytest.param(4, None, id="m4"),
        pytest.param(4, 3, id="m4-chunk3"),
        pytest.param(5, 7, id="m5-chunk7"),
        pytest.param(3, 100, id="m3-chunk-larger-than-batch"),
    ],
)
def test_step_matches_loop_reference(m, chunk_size):
    net = _mlp()
    ref_net = copy.deepcopy(net)
    batch = _batch()
    out = maxup_step(_loss_fn(net), batch, augment=GaussianNoise(0.8), m=m,
        generator=torch.Generator().manual_seed(3), model=net, chunk_size=chunk_size,
    )  # fmt: skip
    losses, selected, worst_x, worst_y = _reference(ref_net, batch, 0.8, m, seed=3)

    err = (out.candidate_losses - losses).abs().max()
    assert err < 1e-5, f"candidate losses differ by {err}"
    assert torch.equal(out.selected, selected), f"selected {out.selected.tolist()} != reference {selected.tolist()}"
    assert torch.equal(out.batch[0], worst_x)
    assert torch.equal(out.batch[1], worst_y)

    ref_loss = F.cross_entropy(ref_net(worst_x), worst_y)
    assert torch.allclose(out.loss, ref_loss, atol=1e-6), f"loss error {(out.loss - ref_loss).abs()}"
    out.loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters(), strict=True):
        gerr = (p.grad - q.grad).abs().max()
        assert gerr < 1e-6, f"gradient of {name} differs by {gerr}"


def test_selection_is_per_sample_not_batch_max():
    # Sample 0's copies: (1, 3); sample 1's: (5, 2). A batch-wide max would pick row 2 (loss 5) for both.
    selected, rows = select_worst(torch.tensor([1.0, 5.0, 3.0, 2.0]), 2)
    assert selected.tolist() == [1, 0]
    assert rows.tolist() == [2, 1]


def test_gather_rows_gathers_every_tensor():
    batch = (torch.arange(6) * 10, {"mask": torch.arange(6)[:, None].expand(6, 3)})
    out = gather_rows(batch, torch.tensor([5, 0]))
    assert out[0].tolist() == [50, 0]
    assert out[1]["mask"].tolist() == [[5, 5, 5], [0, 0, 0]]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_selection_leaves_batchnorm_statistics_untouched(mode):
    net = _bn_net()
    twin = copy.deepcopy(net)
    batch = _batch(6)
    out = maxup_step(_loss_fn(net), batch, augment=GaussianNoise(0.5), m=4,
        generator=torch.Generator().manual_seed(0), model=net, selection_mode=mode,
    )  # fmt: skip
    # The twin sees only the gradient forward on the same worst copies: statistics must match exactly.
    twin(out.batch[0])
    bn, bn_twin = net[1], twin[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_twin.running_mean)
    assert torch.equal(bn.running_var, bn_twin.running_var)
    assert net.training
    assert all(mod.training for mod in net.modules())
    assert bn.track_running_stats


def test_selection_keeps_no_graph():
    net = _mlp()
    out = maxup_step(_loss_fn(net), _batch(), augment=GaussianNoise(0.5), m=3, model=net)
    assert not out.candidate_losses.requires_grad
    assert out.candidate_losses.grad_fn is None
    assert out.loss.requires_grad


def test_selection_modes_differ_and_restore_model_mode():
    net = _bn_net()
    batch = _batch(6)
    # Drift the running statistics away from the batch statistics so the two modes give different losses.
    net[1].running_mean.fill_(3.0)
    kwargs = {"generator": None, "model": net}
    evals = maxup_step(_loss_fn(net), batch, augment=None, m=2, selection_mode="eval", **kwargs).candidate_losses
    net[1].running_mean.fill_(3.0)
    trains = maxup_step(_loss_fn(net), batch, augment=None, m=2, selection_mode="train", **kwargs).candidate_losses
    assert not torch.allclose(evals, trains)
    net.eval()
    maxup_step(_loss_fn(net), batch, augment=None, m=2, model=net, selection_mode="train")
    assert not any(mod.training for mod in net.modules())


def test_eval_mode_selection_is_independent_of_chunking():
    net = _bn_net()
    batch = _batch(6)
    whole = maxup_step(
        _loss_fn(net), batch, augment=GaussianNoise(0.5), m=4, generator=torch.Generator().manual_seed(2), model=net
    )
    net2 = _bn_net()
    chunked = maxup_step(_loss_fn(net2), batch, augment=GaussianNoise(0.5), m=4,
        generator=torch.Generator().manual_seed(2), model=net2, chunk_size=5,
    )  # fmt: skip
    assert torch.allclose(whole.candidate_losses, chunked.candidate_losses, atol=1e-6)
    assert torch.equal(whole.selected, chunked.selected)


class _Counting:
    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def __call__(self, batch):
        x, y = batch
        self.calls.append((tuple(x.shape), torch.is_grad_enabled()))
        return F.cross_entropy(self.net(x), y, reduction="none")


def test_m1_is_exactly_ordinary_augmentation():
    net = _mlp()
    batch = _batch()
    counter = _Counting(net)
    out = maxup_step(
        counter, batch, augment=GaussianNoise(0.3), m=1, generator=torch.Generator().manual_seed(9), model=net
    )
    assert counter.calls == [((5, 1, 4, 4), True)], "m=1 must run one forward with gradient and no selection"
    x_aug, y_aug = GaussianNoise(0.3)(batch, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out.batch[0], x_aug)
    assert torch.allclose(out.loss, F.cross_entropy(net(x_aug), y_aug))
    assert out.selection_seconds == 0.0


def test_chunks_bound_the_selection_forward():
    net = _mlp()
    counter = _Counting(net)
    maxup_step(counter, _batch(5), augment=GaussianNoise(0.3), m=4, model=net, chunk_size=6)
    selection = [shape[0] for shape, grad in counter.calls if not grad]
    assert selection == [6, 6, 6, 2]
    assert [shape[0] for shape, grad in counter.calls if grad] == [5]


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_low_resolution_selection_uses_small_view_and_full_gradient_pass():
    torch.manual_seed(0)
    net = _ConvNet()
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g))
    counter = _Counting(net)
    out = maxup_step(
        counter,
        batch,
        augment=GaussianNoise(0.5),
        m=3,
        generator=torch.Generator().manual_seed(4),
        model=net,
        selection_size=16,
    )
    assert counter.calls == [((12, 3, 16, 16), False), ((4, 3, 32, 32), True)]
    # Reference: select on the antialiased 16 px view of the same candidates.
    cand = GaussianNoise(0.5)(expand_copies(batch, 3), generator=torch.Generator().manual_seed(4))
    small = downsample_view(cand, 16)
    net.eval()
    with torch.no_grad():
        ref = F.cross_entropy(net(small[0]), small[1], reduction="none").view(3, 4)
    net.train()
    assert torch.equal(out.selected, ref.argmax(0))
    assert torch.equal(out.batch[0], cand[0][out.selected * 4 + torch.arange(4)])


def test_low_resolution_error_names_selection_size():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    batch = (torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`selection_size`=16"):
        maxup_step(_loss_fn(net), batch, augment=GaussianNoise(0.1), m=2, model=net, selection_size=16)


def test_selection_size_without_images_is_an_error():
    net = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="`selection_size`=2 resizes images"):
        maxup_step(_loss_fn(net), (torch.rand(2, 4), torch.tensor([0, 1])), m=2, selection_size=2)


def test_custom_selection_view_is_used_for_selection_only():
    net = _ConvNet()
    counter = _Counting(net)
    batch = (torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    maxup_step(counter, batch, augment=GaussianNoise(0.1), m=2, selection_view=lambda b: (b[0][:, :, :4, :4], b[1]))
    assert counter.calls == [((4, 3, 4, 4), False), ((2, 3, 8, 8), True)]


@pytest.mark.parametrize("m", [0, -1, 1.5, True, "4", None])
def test_bad_m(m):
    with pytest.raises(ValueError, match=r"Expected `m` to be a positive integer, got"):
        maxup_step(_loss_fn(_mlp()), _batch(), m=m)


@pytest.mark.parametrize(
    ("name", "value"),
    [pytest.param("chunk_size", 0, id="chunk0"), pytest.param("selection_size", -2, id="size-neg")],
)
def test_bad_optional_sizes(name, value):
    with pytest.raises(ValueError, match=rf"Expected `{name}` to be a positive integer or None, got {value}"):
        maxup_step(_loss_fn(_mlp()), _batch(), m=2, **{name: value})


def test_bad_selection_mode():
    with pytest.raises(ValueError, match="Expected `selection_mode` to be one of 'eval', 'train', got 'test'"):
        maxup_step(_loss_fn(_mlp()), _batch(), m=2, model=_mlp(), selection_mode="test")


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        pytest.param(lambda b: b[0].sum(), r"shape \[10\]\), got shape \[\]", id="scalar"),
        pytest.param(lambda b: b[0].flatten(1), r"got shape \[10, 16\]", id="2d"),
        pytest.param(lambda b: b[0][:3].sum((1, 2, 3)), r"got shape \[3\]", id="too-short"),
        pytest.param(lambda b: [1.0], "must return a tensor", id="not-a-tensor"),
    ],
)
def test_loss_shape_errors(loss_fn, match):
    with pytest.raises((ValueError, TypeError), match=match):
        maxup_step(loss_fn, _batch(), augment=None, m=2)


def test_loss_shape_error_names_the_hook():
    def per_sample_loss(batch):
        return batch[0].mean()

    with pytest.raises(ValueError, match="`per_sample_loss` must return a 1-D tensor"):
        maxup_step(per_sample_loss, _batch(), augment=None, m=2)


def test_augmentation_changing_batch_size_is_an_error():
    def drop_one(batch, generator=None):
        return batch[0][1:], batch[1][1:]

    with pytest.raises(ValueError, match=r"`augment` must keep the number of rows: given 10 rows \(2 copies x 5"):
        maxup_step(_loss_fn(_mlp()), _batch(), augment=drop_one, m=2)


def test_non_finite_candidates_are_counted():
    def loss_fn(batch):
        x, _ = batch
        out = x.flatten(1).sum(1).clone()
        out[:2] = float("nan")
        out[2] = float("inf")
        return out

    with pytest.raises(FloatingPointError, match="3 of 10 candidate losses"):
        maxup_step(loss_fn, _batch(), augment=None, m=2)


def test_selection_context_restores_mixed_modes():
    net = _bn_net()
    net[1].eval()
    with preserved(net, "eval"):
        assert not any(mod.training for mod in net.modules())
    assert net.training
    assert not net[1].training
    assert net[0].training


def test_bf16_channels_last_selection_picks_nearly_the_same_copies():
    torch.manual_seed(0)
    net = _ConvNet()
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    seen = []
    net.conv.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    dtypes = []
    net.conv.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    full = maxup_step(
        _loss_fn(net), batch, augment=GaussianNoise(1.0), m=4, generator=torch.Generator().manual_seed(1), model=net
    )
    fast = maxup_step(
        _loss_fn(net), batch, augment=GaussianNoise(1.0), m=4, generator=torch.Generator().manual_seed(1), model=net,
        selection_dtype=torch.bfloat16, selection_memory_format=torch.channels_last,
    )  # fmt: skip
    assert dtypes == [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    assert seen[2], "the selection view must be channels_last"
    assert not seen[3], "channels_last applies to the selection view only"
    # bf16 keeps ~3 significant digits: losses agree to 2% and nearly every sample keeps its worst copy.
    rel = ((fast.candidate_losses - full.candidate_losses).abs() / full.candidate_losses.abs().clamp_min(1e-3)).max()
    assert rel < 0.02, f"bf16 selection losses differ by {rel:.3%}"
    assert (fast.selected == full.selected).float().mean() > 0.9
    assert fast.loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"selection_dtype": torch.int8}, "Expected `selection_dtype` to be torch.bfloat16", id="dtype"),
        pytest.param({"selection_memory_format": torch.preserve_format}, "`selection_memory_format`", id="format"),
    ],
)
def test_bad_selection_precision(kwargs, match):
    with pytest.raises(ValueError, match=match):
        maxup_step(_loss_fn(_mlp()), _batch(), m=2, **kwargs)
