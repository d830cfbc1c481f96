"""MaxUp on ImageNet with the m copies made in the DataLoader workers (RandomResizedCrop + RandAugment per copy).

    python examples/imagenet_multiview.py --root /data/imagenet --weights IMAGENET1K_V1 --workers 16
    python examples/imagenet_multiview.py --fake        # generated images, tiny settings: a smoke run on a CPU

Each training image is decoded once, in a worker, and turned into m views: a random-resized crop of the original
image, a flip and RandAugment (torchvision v2), each drawn from (seed, epoch, index, copy). The batches arrive as
``Candidates`` of m x B rows; the module scores them as they are (its ``augment`` is None) and trains on each
sample's worst. The ``MaxUp`` callback keeps the loader's epoch and view count in step with its warm-up.
The YAML form of the same recipe is examples/configs/imagenet_multiview.yaml; docs/pipelines.md compares this with
augmenting on the device.
"""

from __future__ import annotations

import argparse

# With `import lightning.pytorch as pl` instead, set LIGHTNING_MAXUP_NAMESPACE=lightning.pytorch when both are
# installed, so the library's modules are built on it too (docs/namespaces.md).
import pytorch_lightning as pl

from lightning_maxup import MaxUp, MaxUpConfig
from lightning_maxup.recipes.datamodules import ImageNetMultiViewDataModule
from lightning_maxup.recipes.finetune import torchvision_model
from lightning_maxup.recipes.models import MaxUpClassifier


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/imagenet", help="ImageFolder root with train/ and val/")
    parser.add_argument("--fake", action="store_true", help="generated images, tiny network and batch")
    parser.add_argument("--name", default="resnet50", help="torchvision model name")
    parser.add_argument("--weights", default=None, help="torchvision weights, e.g. IMAGENET1K_V1 (downloads)")
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args(argv)

    fake = args.fake
    data = ImageNetMultiViewDataModule(
        root=args.root,
        batch_size=2 if fake else args.batch_size,
        num_workers=min(args.workers, 2) if fake else args.workers,
        image_size=32 if fake else 224,
        resize_size=32 if fake else 256,
        m=args.m,
        fake_data=fake,
        fake_size=8,
        num_classes=10 if fake else 1000,
    )
    classes = 10 if fake else 1000
    backbone = torchvision_model("resnet18" if fake else args.name, num_classes=classes, weights=args.weights)
    model = MaxUpClassifier(backbone, num_classes=classes, maxup=MaxUpConfig(m=args.m, augment=None), lr=args.lr)
    trainer = pl.Trainer(
        max_epochs=2 if fake else args.epochs,
        accelerator="cpu" if fake else "auto",
        limit_train_batches=2 if fake else 1.0,
        limit_val_batches=1 if fake else 1.0,
        logger=not fake,
        enable_checkpointing=not fake,
        callbacks=[MaxUp(warmup_epochs=1 if fake else args.warmup_epochs)],
    )
    trainer.fit(model, data)
    return trainer


if __name__ == "__main__":
    main()
