"""MaxUp for point-cloud classification: ordinary augmentation vs MaxUp, with and without point-subset selection.

By default it trains a compact PointNet (Qi et al., CVPR 2017) on a shapes dataset this script generates: spheres,
cubes, cylinders and cones, each stretched per axis, turned about the up axis and perturbed with noise, so the
four classes overlap a little. Every method trains the same network from the same seed with the same point
augmentations (rotation about the up axis, anisotropic scaling, clipped jitter) for the same epochs:

* ``ordinary``: one augmented copy per sample (``m = 1``);
* ``MaxUp m=4``: four copies, the worst one per sample is back-propagated (after a warm-up of ordinary epochs);
* ``MaxUp m=4, select on k pts``: the same, but the no-gradient selection pass scores each copy on only ``k`` of its
  points (:class:`~lightning_maxup.augment.PointSubset`), the point-cloud version of the paper's low-resolution
  selection; the gradient pass uses every point.

It prints test accuracy (mean ± std over seeds) and seconds per MaxUp-phase epoch.

With the standard ``modelnet40_ply_hdf5_2048`` files (``ply_data_train*.h5`` / ``ply_data_test*.h5``, y-up, 2048
points per shape) and ``h5py`` installed, ``--modelnet40 DIR`` trains on ModelNet40 instead.

    python examples/pointcloud.py                      # generated shapes, ~1 minute on 2 idle CPU cores
    python examples/pointcloud.py --epochs 1 --quick   # smoke test
    python examples/pointcloud.py --modelnet40 data/modelnet40_ply_hdf5_2048 --points 1024 --epochs 100
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl  # or `import lightning.pytorch as pl`: either works (docs/namespaces.md)
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import Compose, PointJitter, PointSubset, RandomPointRotation, RandomPointScale
from lightning_maxup.augment.pointcloud import rotation_matrices
from lightning_maxup.callbacks.timing import EpochTimer

CLASSES = ("sphere", "cube", "cylinder", "cone")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def _surface(kind: int, n: int, points: int, g: torch.Generator) -> Tensor:
    """``n`` unit shapes of one kind with ``points`` points sampled uniformly on the surface, y-up."""
    u = torch.rand(n, points, 3, generator=g)
    if kind == 0:  # sphere
        v = torch.randn(n, points, 3, generator=g)
        return v / v.norm(dim=-1, keepdim=True)
    if kind == 1:  # cube: a uniform face, a uniform point on it
        face = torch.randint(0, 6, (n, points), generator=g)
        axis, sign = face // 2, (face % 2).float() * 2 - 1
        p = u * 2 - 1
        return torch.where(F.one_hot(axis, 3).bool(), sign[..., None], p)
    theta = 2 * math.pi * u[..., 0]
    if kind == 2:  # cylinder, radius 1, height 2: side area 4 pi, caps 2 pi
        side = u[..., 2] < 2 / 3
        r = torch.where(side, torch.ones_like(theta), u[..., 1].sqrt())
        y = torch.where(side, u[..., 1] * 2 - 1, torch.sign(u[..., 2] - 5 / 6))
        return torch.stack([r * theta.cos(), y, r * theta.sin()], -1)
    # cone, apex at y = 1, base radius 1 at y = -1: lateral area pi * sqrt(5), base pi
    side = u[..., 2] < math.sqrt(5) / (1 + math.sqrt(5))
    t = u[..., 1].sqrt()
    r = t
    y = torch.where(side, 1 - 2 * t, -torch.ones_like(t))
    return torch.stack([r * theta.cos(), y, r * theta.sin()], -1)


def _normalise(x: Tensor) -> Tensor:
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=-1).amax(dim=1)[:, None, None]


def make_shapes(per_class: int, points: int, seed: int, noise: float = 0.05) -> tuple[Tensor, Tensor]:
    """Generated shapes: stretched per axis (0.5-1.5), turned about y, with Gaussian noise; unit-sphere normalised."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for kind in range(len(CLASSES)):
        x = _surface(kind, per_class, points, g)
        x = x * (0.5 + torch.rand(per_class, 1, 3, generator=g))
        angle = (torch.rand(per_class, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        x = x @ rotation_matrices(angle, "y").float().transpose(1, 2)
        x = x + noise * torch.randn(x.shape, generator=g)
        xs.append(_normalise(x))
        ys.append(torch.full((per_class,), kind))
    return torch.cat(xs), torch.cat(ys)


def load_modelnet40(root: str | Path, points: int = 1024) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Load ``modelnet40_ply_hdf5_2048`` (the PointNet release): ``((x_train, y_train), (x_test, y_test))``.

    Keeps the first ``points`` of the 2048 points of each shape (the files store them in random order).
    """
    try:
        import h5py
    except ImportError as err:
        raise ImportError("Reading ModelNet40's .h5 files needs h5py: pip install h5py") from err
    root = Path(root)

    def read(split: str) -> tuple[Tensor, Tensor]:
        files = sorted(root.glob(f"ply_data_{split}*.h5"))
        if not files:
            raise FileNotFoundError(f"No ply_data_{split}*.h5 files in `modelnet40`={str(root)!r}")
        xs, ys = [], []
        for f in files:
            with h5py.File(f, "r") as h:
                xs.append(torch.from_numpy(h["data"][:, :points, :].astype("float32")))
                ys.append(torch.from_numpy(h["label"][:].reshape(-1).astype("int64")))
        return torch.cat(xs), torch.cat(ys)

    return read("train"), read("test")


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------
class PointNet(nn.Module):
    """A compact PointNet: a shared per-point MLP, a max-pool over points, and an MLP classifier.

    The shared MLP is ``nn.Linear`` on ``[B, P, C]`` (much faster on CPU than the usual 1x1 ``Conv1d``), with
    batch normalisation over all points of the batch, as the convolutional form has.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        dims = [3, w, w, 2 * w, 4 * w]
        self.linears = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in zip(dims[:-1], dims[1:], strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm1d(o) for o in dims[1:])
        self.head = nn.Sequential(
            nn.Linear(4 * w, 2 * w, bias=False), nn.BatchNorm1d(2 * w), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(2 * w, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        b, p, _ = x.shape
        h = x.reshape(b * p, 3)
        for linear, norm in zip(self.linears, self.norms, strict=True):
            h = F.relu(norm(linear(h)))
        return self.head(h.view(b, p, -1).amax(dim=1))


class LitPointNet(MaxUpMixin, pl.LightningModule):
    def __init__(self, num_classes: int, m: int, selection_view: PointSubset | None, lr: float, epochs: int) -> None:
        augment = Compose([RandomPointRotation(axis="y"), RandomPointScale(0.8, 1.25, anisotropic=True), PointJitter()])
        super().__init__(m=m, augment=augment, selection_view=selection_view)
        self.net = PointNet(num_classes)
        self.lr, self.epochs = lr, epochs

    def per_sample_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self) -> dict:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)}


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    net.eval()
    correct = sum(
        int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


@dataclass
class Result:
    method: str
    seed: int
    accuracy: float
    seconds_per_epoch: float


def run_one(
    method: str, m: int, k: int | None, seed: int, data: tuple[Tensor, Tensor, Tensor, Tensor], args: argparse.Namespace
) -> Result:
    x_train, y_train, x_test, y_test = data
    pl.seed_everything(seed, verbose=False)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    model = LitPointNet(num_classes, m=m, selection_view=PointSubset(k) if k else None, lr=args.lr, epochs=args.epochs)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True, drop_last=True)
    timer = EpochTimer()
    warmup = min(args.warmup, args.epochs - 1)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[MaxUp(warmup_epochs=warmup), timer],
    )  # fmt: skip
    trainer.fit(model, loader)
    timed = timer.seconds[warmup:] or timer.seconds
    return Result(method, seed, accuracy(model.net, x_test, y_test), statistics.mean(timed))


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=6, help="ordinary epochs before MaxUp starts")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=80, help="generated training shapes per class")
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--subset", type=int, default=64, help="points per cloud in the selection pass")
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--modelnet40", type=str, default=None, help="directory of modelnet40_ply_hdf5_2048")
    parser.add_argument("--quick", action="store_true", help="tiny data and one seed, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.per_class, args.points, args.subset = 1, 8, 32, 8
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")

    if args.modelnet40:
        (x_train, y_train), (x_test, y_test) = load_modelnet40(args.modelnet40, args.points)
        source = f"ModelNet40 ({len(x_train)} train / {len(x_test)} test, {args.points} points)"
    else:
        x_train, y_train = make_shapes(args.per_class, args.points, seed=1000)
        x_test, y_test = make_shapes(8 if args.quick else 100, args.points, seed=2000)
        source = f"generated shapes ({len(x_train)} train / {len(x_test)} test, {args.points} points)"
    data = (x_train, y_train, x_test, y_test)

    methods = [("ordinary (m=1)", 1, None), (f"MaxUp m={args.m}", args.m, None)]
    methods.append((f"MaxUp m={args.m}, select on {args.subset} pts", args.m, args.subset))
    start = time.perf_counter()
    results = [run_one(name, m, k, seed, data, args) for name, m, k in methods for seed in range(args.seeds)]
    total = time.perf_counter() - start

    print(f"\nPointNet on {source}; {args.epochs} epochs ({args.warmup} warm-up), {args.seeds} seed(s)")
    print(f"| {'method':<34} | {'test accuracy':>15} | {'s / epoch (MaxUp phase)':>23} |")
    print(f"|{'-' * 36}|{'-' * 17}|{'-' * 25}|")
    for name, _, _ in methods:
        rs = [r for r in results if r.method == name]
        accs = [100 * r.accuracy for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        acc = f"{statistics.mean(accs):.1f} ± {std:.1f} %"
        print(f"| {name:<34} | {acc:>15} | {statistics.mean(r.seconds_per_epoch for r in rs):>23.2f} |")
    print(f"total {total:.0f} s")
    return results


if __name__ == "__main__":
    main()
