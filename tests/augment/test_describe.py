"""Diagnostics ask the augmentation: ``describe`` for the monitor, ``input_noise_std`` for Theorem 1's grad_norm.

- every built-in's description is checked against a direct computation from its input and output, row by row;
- an augmentation the library does not know (written here) gets the monitor's histograms from its ``describe``;
- ``maxup/grad_norm`` is logged exactly when the augmentation gives an ``input_noise_std``;
- the example in ``docs/augmentations.md`` runs and describes itself.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUpMixin, SelectionMonitor
from lightning_maxup.augment import (
    Augmentation,
    Compose,
    CutMix,
    Cutout,
    DescribedAugmentation,
    GaussianNoise,
    Mixup,
    PointGaussianNoise,
    PointJitter,
    RandomCrop,
    RandomHorizontalFlip,
    RandomPointRotation,
    RandomPointScale,
    TorchvisionAdapter,
    WordEmbeddingDropout,
)
from lightning_maxup.augment.randaugment import OPS, RandAugment
from lightning_maxup.callbacks.monitor import Drawn, RecordingAugment, drawn_features
from lightning_maxup.core.functional import gradient_norm_estimate
from tests.trainer_options import quiet_trainer_options

ROOT = Path(__file__).resolve().parents[2]
N = 12


def _images(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 3, 8, 8, generator=g) + 0.5, torch.randint(0, 3, (N,), generator=g)  # no zero pixels


def _points(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 16, 3, generator=g), torch.randint(0, 3, (N,), generator=g)


def _tokens(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (N, 7), generator=g), torch.randint(0, 10, (N, 7), generator=g)


# ---------------------------------------------------------------------------------------------------------------
# References: what each described number must be, read off the input and output of one row at a time
# ---------------------------------------------------------------------------------------------------------------


def _ref_noise_norm(aug: Any, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    return {"noise_norm": float((out[i].double() - x[i].double()).norm())}


def _ref_point_noise(aug: Any, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    return {"noise_norm": float((out[i].double() - x[i].double()).norm()), "sigma": float(params["sigma"][i])}


def _cut_box(x: Tensor, out: Tensor, i: int) -> tuple[int, int, int, int]:
    """Rows and columns (first, last) where row ``i`` of ``out`` differs from ``x``."""
    changed = (out[i] != x[i]).any(0)
    ys = [j for j in range(changed.shape[0]) if changed[j].any()]
    xs = [j for j in range(changed.shape[1]) if changed[:, j].any()]
    return ys[0], ys[-1], xs[0], xs[-1]


def _ref_cutout(aug: Cutout, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    top, bottom, left, right = _cut_box(x, out, i)
    half, h, w = aug.size // 2, x.shape[2], x.shape[3]
    # Unclipped box [c - half, c - half + size); a clipped side gives the centre from the other side.
    cy = top + half if top > 0 or bottom == h - 1 and bottom - top + 1 == aug.size else bottom - aug.size + 1 + half
    cx = left + half if left > 0 or right == w - 1 and right - left + 1 == aug.size else right - aug.size + 1 + half
    return {"centre_y": cy, "centre_x": cx}


def _ref_crop(aug: RandomCrop, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    p = aug.padding
    padded = F.pad(x[i], (p, p, p, p))
    h, w = out.shape[2], out.shape[3]
    offsets = [
        (t, left)
        for t in range(padded.shape[1] - h + 1)
        for left in range(padded.shape[2] - w + 1)
        if torch.equal(padded[:, t : t + h, left : left + w], out[i])
    ]
    assert len(offsets) == 1, offsets  # random inputs: exactly one window matches
    return {"offset_y": offsets[0][0], "offset_x": offsets[0][1]}


def _ref_flip(aug: Any, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    assert torch.equal(out[i], x[i]) != torch.equal(out[i], x[i].flip(-1))
    return {"flip": float(torch.equal(out[i], x[i].flip(-1)))}


def _ref_mixup(aug: Any, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    j = int(params["partner"][i])
    a, b = x[i].double().flatten(), x[j].double().flatten()
    lam = float((out[i].double().flatten() - b) @ (a - b) / ((a - b) @ (a - b)))  # least squares of lam*a+(1-lam)*b
    return {"lam": lam}


def _ref_cutmix(aug: Any, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    # The pasted box is centred on the drawn centre; its side is floor(side * sqrt(1 - lam)), clipped at the border.
    lam, cy, cx = float(params["lam"][i]), int(params["cy"][i]), int(params["cx"][i])
    h, w = x.shape[2], x.shape[3]
    ch, cw = math.floor(h * math.sqrt(1 - lam)), math.floor(w * math.sqrt(1 - lam))
    expected = x[i].clone()
    top, bottom = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    left, right = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    expected[:, top:bottom, left:right] = x[int(params["partner"][i])][:, top:bottom, left:right]
    assert torch.equal(out[i], expected)
    return {"lam": lam, "centre_y": cy, "centre_x": cx}


def _ref_rotation(aug: Any, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    # About y (right-handed): x' = x cos a + z sin a, z' = -x sin a + z cos a; least squares for (cos a, sin a).
    p, q = x[i].double(), out[i].double()
    design = torch.cat([torch.stack([p[:, 0], p[:, 2]], 1), torch.stack([p[:, 2], -p[:, 0]], 1)])
    target = torch.cat([q[:, 0], q[:, 2]])
    c, s = torch.linalg.lstsq(design, target[:, None]).solution[:, 0].tolist()
    return {"angle": math.atan2(s, c)}


def _ref_scale(aug: RandomPointScale, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    ratio = (out[i].double() * x[i].double()).sum(0) / (x[i].double() ** 2).sum(0)  # per axis
    if aug.anisotropic:
        return {"scale_x": float(ratio[0]), "scale_y": float(ratio[1]), "scale_z": float(ratio[2])}
    return {"scale": float(ratio.mean())}


def _ref_word_dropout(aug: Any, x: Tensor, out: Any, params: dict[str, Any], i: int) -> dict[str, float]:
    keep = params["keep"][i].tolist()
    entries = [v for v in range(aug.vocab_size) if v != aug.pad_id]
    return {"kept_fraction": sum(keep[v] for v in entries) / len(entries)}


def _ref_randaugment(aug: RandAugment, x: Tensor, out: Tensor, params: dict[str, Any], i: int) -> dict[str, float]:
    # The row is reproduced by its described ops and magnitudes alone (with its sign, which is not described).
    desc = aug.describe(params)
    op = torch.tensor([[int(desc[f"op_{s}"][i]) for s in range(aug.num_ops)]])
    magnitude = torch.tensor([[float(desc[f"magnitude_{s}"][i]) for s in range(aug.num_ops)]], dtype=torch.float64)
    replay = aug.apply(x[i : i + 1], {"op": op, "magnitude": magnitude, "sign": params["sign"][i : i + 1]})
    assert torch.allclose(replay[0], out[i], atol=1e-5), f"row {i}: largest error {(replay[0] - out[i]).abs().max()}"
    assert all(0 <= int(o) < len(OPS) for o in op[0])
    return {f"{k}_{s}": float(desc[f"{k}_{s}"][i]) for s in range(aug.num_ops) for k in ("op", "magnitude")}


BUILT_INS = [
    pytest.param(GaussianNoise(0.3), _images, _ref_noise_norm, id="gaussian-noise"),
    pytest.param(Cutout(3), _images, _ref_cutout, id="cutout-odd"),
    pytest.param(Cutout(4), _images, _ref_cutout, id="cutout-even"),
    pytest.param(RandomCrop(8, padding=2), _images, _ref_crop, id="crop"),
    pytest.param(RandomHorizontalFlip(), _images, _ref_flip, id="flip"),
    pytest.param(Mixup(0.4, num_classes=3), _images, _ref_mixup, id="mixup"),
    pytest.param(CutMix(1.0, num_classes=3), _images, _ref_cutmix, id="cutmix"),
    pytest.param(RandAugment(num_ops=2, random_magnitude=True), _images, _ref_randaugment, id="randaugment"),
    pytest.param(PointJitter(), _points, _ref_noise_norm, id="point-jitter"),
    pytest.param(PointGaussianNoise(0.1, min_sigma=0.01), _points, _ref_point_noise, id="point-gaussian-noise"),
    pytest.param(RandomPointRotation(), _points, _ref_rotation, id="point-rotation"),
    pytest.param(RandomPointScale(), _points, _ref_scale, id="point-scale"),
    pytest.param(RandomPointScale(anisotropic=True), _points, _ref_scale, id="point-scale-xyz"),
    pytest.param(WordEmbeddingDropout(0.4, vocab_size=10, pad_id=0), _tokens, _ref_word_dropout, id="word-dropout"),
]


@pytest.mark.parametrize(("aug", "data", "reference"), BUILT_INS)
def test_built_in_description_matches_a_direct_computation(aug: Any, data: Any, reference: Any) -> None:
    batch = data()
    params = aug.sample(batch, torch.Generator().manual_seed(4))
    out = aug.apply(batch, params)
    x, xo = batch[0], out[0]
    description = aug.describe(params)
    expected = [reference(aug, x, xo, params, i) for i in range(N)]  # a loop over rows
    assert set(description) == set(expected[0])
    for name, values in description.items():
        assert values.shape == (N,), name
        want = torch.tensor([e[name] for e in expected], dtype=torch.float64)
        got = values.double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"{name}: largest error {(got - want).abs().max()}"


def test_adapters_describe_nothing_and_unknown_parameters_are_read_by_default() -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    adapter = TorchvisionAdapter(v2.RandomHorizontalFlip())
    x = torch.rand(N, 3, 8, 8)
    assert adapter.describe(adapter.sample(x, torch.Generator().manual_seed(0))) == {}

    class Draws(Augmentation):
        def sample(self, batch: Any, generator: Any = None) -> dict[str, Any]:
            return {"a": torch.arange(N), "wide": torch.ones(N, 2), "image": torch.ones(N, 3, 8, 8), "k": 3}

        def apply(self, batch: Any, params: dict[str, Any]) -> Any:
            return batch

    assert sorted(Draws().describe(Draws().sample(x))) == ["a", "wide_0", "wide_1"]


def test_only_pure_gaussian_noise_gives_an_input_noise_std() -> None:
    assert GaussianNoise(0.25).input_noise_std == 0.25
    others = [Cutout(2), Compose([GaussianNoise(0.25)]), PointGaussianNoise(0.1), PointJitter(), Mixup(1.0, 3)]
    assert [a.input_noise_std for a in others] == [None] * len(others)


# ---------------------------------------------------------------------------------------------------------------
# A user's own augmentation: the library does not know its class
# ---------------------------------------------------------------------------------------------------------------


class Brightness:
    """Adds a per-row brightness shift; not an ``Augmentation`` subclass, only the three methods."""

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self.described: list[dict[str, Any]] = []

    def sample(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, Any]:
        x = batch[0]
        return {"shift": torch.rand(x.shape[0], generator=generator) - 0.5}

    def apply(self, batch: Any, params: dict[str, Any]) -> Any:
        self.applied.append(params)
        return (batch[0] + params["shift"][:, None, None, None], *batch[1:])

    def describe(self, params: dict[str, Any]) -> dict[str, Tensor]:
        self.described.append(params)
        return {"abs_shift": params["shift"].abs()}  # a number the parameters do not hold as they are

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> Any:
        return self.apply(batch, self.sample(batch, generator))


class BrightnessSubclass(Augmentation):
    """The same as a subclass of ``Augmentation``."""

    def __init__(self) -> None:
        self._inner = Brightness()

    def sample(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, Any]:
        return self._inner.sample(batch, generator)

    def apply(self, batch: Any, params: dict[str, Any]) -> Any:
        return self._inner.apply(batch, params)

    def describe(self, params: dict[str, Any]) -> dict[str, Tensor]:
        return self._inner.describe(params)


class Lit(MaxUpMixin, pl.LightningModule):
    def __init__(self, augment: Any, m: int = 3, linear: bool = False) -> None:
        super().__init__(m=m, augment=augment, seed=0)
        torch.manual_seed(0)
        self.linear = linear
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 1 if linear else 3))

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        if self.linear:
            return self.net(x).squeeze(1)
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 40) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=8)


@pytest.mark.parametrize(
    "make", [pytest.param(Brightness, id="duck-typed"), pytest.param(BrightnessSubclass, id="subclass")]
)
def test_a_user_augmentation_gets_histograms(make: Any, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    augment = make()
    user = augment if isinstance(augment, Brightness) else augment._inner
    assert isinstance(augment, DescribedAugmentation)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(**quiet_trainer_options(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1))
    trainer.callbacks.append(SelectionMonitor(every_n_steps=5))
    trainer.fit(Lit(augment), train_dataloaders=_loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    name = type(augment).__name__
    tags = {f"maxup_monitor/{name}/abs_shift/all", f"maxup_monitor/{name}/abs_shift/selected"}
    assert set(events.Tags()["histograms"]) == tags
    (described,) = user.described  # one logging step, at step 5
    assert any(described is p for p in user.applied), "described parameters other than those applied"
    (all_draws,) = events.Histograms(f"maxup_monitor/{name}/abs_shift/all")
    assert all_draws.step == 5
    assert all_draws.histogram_value.num == 3 * 8
    assert all_draws.histogram_value.sum == pytest.approx(float(described["shift"].abs().sum()), rel=1e-6)


def test_describe_must_give_one_number_per_row() -> None:
    class Bad(Brightness):
        def describe(self, params: dict[str, Any]) -> dict[str, Tensor]:
            return {"shift": params["shift"][:, None]}

    aug = Bad()
    x = (torch.rand(4, 1, 8, 8), torch.zeros(4))
    with pytest.raises(ValueError, match=r"Expected `Bad.describe` to give one number per row for `shift`"):
        drawn_features([Drawn(aug, aug.sample(x))])


def test_recorder_calls_a_user_augmentation_as_it_calls_itself() -> None:
    batch = (torch.rand(N, 1, 8, 8), torch.zeros(N))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    expected = Compose([Cutout(2), Brightness()])(batch, generator=g1)
    recorder = RecordingAugment(Compose([Cutout(2), Brightness()]))
    got = recorder(batch, generator=g2)
    assert torch.equal(expected[0], got[0])
    assert torch.equal(g1.get_state(), g2.get_state())
    assert [type(d.augmentation).__name__ for d in recorder.last] == ["Cutout", "Brightness"]


# ---------------------------------------------------------------------------------------------------------------
# Theorem 1's grad_norm: logged when the augmentation says it is Gaussian input noise
# ---------------------------------------------------------------------------------------------------------------


class PlainNoise:
    """``x + sigma * z``, written by a user, saying so through ``input_noise_std``."""

    def __init__(self, sigma: float, say: bool = True) -> None:
        self.sigma = sigma
        if say:
            self.input_noise_std = sigma

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> Any:
        x = batch[0]
        return (x + self.sigma * torch.randn(x.shape, generator=generator), *batch[1:])


class KeepLast(pl.Callback):
    def __init__(self) -> None:
        self.outputs: list[Any] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.outputs.append(pl_module.maxup_last_output)


@pytest.mark.parametrize(
    ("augment", "logged"),
    [
        pytest.param(PlainNoise(0.5), True, id="user-noise-saying-so"),
        pytest.param(GaussianNoise(0.5), True, id="gaussian-noise"),
        pytest.param(PlainNoise(0.5, say=False), False, id="user-noise-silent"),
        pytest.param(Compose([GaussianNoise(0.5), Cutout(2)]), False, id="compose"),
        pytest.param(Cutout(2), False, id="cutout"),
    ],
)
def test_grad_norm_is_logged_when_the_augmentation_gives_its_noise_std(augment: Any, logged: bool) -> None:
    model = Lit(augment, m=4, linear=True)
    model.maxup_record = True
    keep = KeepLast()
    trainer = pl.Trainer(**quiet_trainer_options(max_epochs=1, limit_train_batches=2, callbacks=[keep]))
    trainer.fit(model, train_dataloaders=_loader())
    assert ("maxup/grad_norm" in trainer.callback_metrics) is logged
    if logged:
        expected = gradient_norm_estimate(keep.outputs[-1].candidate_losses, 0.5)
        assert torch.allclose(trainer.callback_metrics["maxup/grad_norm"], expected)


# ---------------------------------------------------------------------------------------------------------------
# The documented example
# ---------------------------------------------------------------------------------------------------------------


def test_docs_example_of_a_self_describing_augmentation_runs() -> None:
    text = (ROOT / "docs" / "augmentations.md").read_text()
    (code,) = re.findall(r"<!-- describe-example -->\s*```python\n(.*?)```", text, flags=re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/augmentations.md", "exec"), namespace)
    aug = namespace["Brightness"](0.2)
    batch = (torch.rand(N, 3, 8, 8), torch.zeros(N))
    recorder = RecordingAugment(aug)
    out = recorder(batch, generator=torch.Generator().manual_seed(0))
    feats = drawn_features(recorder.last)
    assert sorted(feats) == ["Brightness/shift"]
    shift = (out[0] - batch[0]).mean(dim=(1, 2, 3)).double()
    assert torch.allclose(feats["Brightness/shift"], shift, atol=1e-6)
