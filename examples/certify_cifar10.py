"""The real-data recipe: train on CIFAR-10 with Gaussian augmentation, MaxUp + Gauss or SmoothAdv, then certify.

Follows Cohen et al. (2019) and the MaxUp paper (Gong et al., 2021, Sec. 4.4): train at noise σ, certify every
``--skip``-th test image at the same σ with n0 = 100, n = 100,000, alpha = 0.001, and print the certified accuracy
at radii 0.25, ..., 2.75. ``--fake-data`` replaces CIFAR-10 by generated images of the same shape (no download),
for smoke tests.

    python examples/certify_cifar10.py --recipe maxup_gauss --sigma 0.25 --m 5 --epochs 200 --data-dir data
    python examples/certify_cifar10.py --fake-data --epochs 1 --n 100 --max 8          # smoke test
    lightning-maxup certify-table runs/certify_cifar10/*.tsv                         # best-σ table and envelope
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# With `import lightning.pytorch as pl` instead, set LIGHTNING_MAXUP_NAMESPACE=lightning.pytorch when both are
# installed, so the library's modules are built on it too (docs/namespaces.md).
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_maxup.certify import (
    markdown_table,
    plot_certified_accuracy,
    read_certification,
    table_radii,
    write_certification,
)
from lightning_maxup.certify.recipes import RECIPE_OPTIONS, RECIPES, build_recipe
from lightning_maxup.certify.smoothing import Smooth
from lightning_maxup.certify.table import sigma_label


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 stride-1 first convolution, no max-pool)."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 in [0, 1] (no normalisation: noise is added in pixel space, as in Cohen et al.), or fake data.

    Training images are randomly cropped (padding 4) and flipped, as in Cohen et al.'s training script.
    """

    def __init__(self, data_dir: str = "data", batch_size: int = 256, num_workers: int = 4, fake: bool = False) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.num_workers, self.fake = data_dir, batch_size, num_workers, fake
        self.num_classes = 10

    def prepare_data(self) -> None:
        if not self.fake:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.data_dir, train=True, download=True)
            CIFAR10(self.data_dir, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.fake:
            g = torch.Generator().manual_seed(0)

            def make(n: int) -> TensorDataset:
                return TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

            self.train_set, self.test_set = make(4 * self.batch_size), make(64)
            return
        from torchvision import transforms
        from torchvision.datasets import CIFAR10

        train_tf = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
        self.train_set = CIFAR10(self.data_dir, train=True, transform=train_tf)
        self.test_set = CIFAR10(self.data_dir, train=False, transform=transforms.ToTensor())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size, num_workers=self.num_workers)


def certify_dataset(
    model: nn.Module, dataset: Dataset, args: argparse.Namespace, path: Path, device: torch.device
) -> None:
    """Certify every ``skip``-th image, ``inputs_per_batch`` images per call, appending rows to ``path``."""
    from tqdm.auto import tqdm

    indices = list(range(0, len(dataset), args.skip))[: args.max if args.max >= 0 else None]  # type: ignore[arg-type]
    smooth = Smooth(model.to(device).eval(), num_classes=10, sigma=args.sigma, input_shape=(3, 32, 32))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    write_certification(path, [], [], [], [], [])
    loader = DataLoader(Subset(dataset, indices), batch_size=args.inputs_per_batch)
    done = 0
    with tqdm(total=len(indices), desc="certify", unit="image") as bar:
        for x, y in loader:
            start = time.perf_counter()
            pred, radius = smooth.certify_batch(
                x.to(device), args.n0, args.n, args.alpha, args.batch_size, generator=generator
            )
            seconds = (time.perf_counter() - start) / len(y)
            idx = indices[done : done + len(y)]
            write_certification(path, idx, y.tolist(), pred.tolist(), radius.tolist(), [seconds] * len(y), append=True)
            done += len(y)
            bar.update(len(y))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=RECIPES, default="maxup_gauss")
    p.add_argument("--sigma", type=float, default=0.25, help="one of 0.12, 0.25, 0.5, 1.0 in the paper")
    p.add_argument("--m", type=int, default=5, help="MaxUp copies: 5, 25, 50, 100 or 150 in the paper")
    p.add_argument("--epsilon", type=float, default=0.5, help="SmoothAdv attack radius")
    p.add_argument("--steps", type=int, default=2, help="SmoothAdv PGD steps")
    p.add_argument("--noise-samples", type=int, default=2, help="SmoothAdv noise samples per input")
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 60])
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--fake-data", action="store_true", help="generated images instead of CIFAR-10 (smoke test)")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=1000, help="rows per certification forward")
    p.add_argument("--inputs-per-batch", type=int, default=1)
    p.add_argument("--skip", type=int, default=20, help="certify every skip-th test image (Cohen: 20)")
    p.add_argument("--max", type=int, default=-1)
    p.add_argument("--outdir", type=Path, default=Path("runs/certify_cifar10"))
    args = p.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.fake_data:
        args.num_workers, args.train_batch_size = 0, min(args.train_batch_size, 16)

    pl.seed_everything(args.seed, verbose=False)
    data = CIFAR10DataModule(args.data_dir, args.train_batch_size, args.num_workers, fake=args.fake_data)
    # Cohen et al.: SGD, lr 0.1 divided by 10 every 30 epochs, 90 epochs; the MaxUp paper trains longer.
    options = {name: getattr(args, name) for name in RECIPE_OPTIONS}
    optimizer = {"optimizer": "sgd", "lr": args.lr, "weight_decay": 1e-4, "milestones": args.milestones}
    model, callbacks = build_recipe(args.recipe, cifar_resnet18(), 10, **options, **optimizer)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        default_root_dir=str(args.outdir),
        callbacks=callbacks,
        limit_val_batches=0 if args.fake_data else 1.0,
        logger=not args.fake_data,
        enable_checkpointing=not args.fake_data,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    print(f"trained {args.recipe} for {args.epochs} epochs: {(time.perf_counter() - start) / args.epochs:.1f} s/epoch")

    data.setup("test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = args.outdir / f"{args.recipe}_noise_{args.sigma:.2f}_sigma_{args.sigma:.2f}.tsv"
    certify_dataset(model, data.test_set, args, path, device)
    cert = read_certification(path)
    radii = table_radii()
    print(markdown_table({sigma_label(args.sigma): cert.accuracy_at(radii)}, radii), end="")
    plot = plot_certified_accuracy({sigma_label(args.sigma, html=False): cert}, path.with_suffix(".png"))
    print(f"wrote {path} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
