"""Fine-tune a pretrained network with MaxUp + CutMix, its BatchNorm layers frozen (the paper's EfficientNet recipe).

    python examples/finetune.py                                # random init, fake data: a smoke run on a CPU
    python examples/finetune.py --weights IMAGENET1K_V1 --root /data/imagenet --epochs 5

The YAML form of the same recipe is examples/configs/imagenet_efficientnet_cutmix_finetune.yaml.
"""

from __future__ import annotations

import argparse

# With `import lightning.pytorch as pl` instead, set LIGHTNING_MAXUP_NAMESPACE=lightning.pytorch when both are
# installed, so the library's modules are built on it too (docs/namespaces.md).
import pytorch_lightning as pl

from lightning_maxup import MaxUp
from lightning_maxup.augment import Compose, CutMix, RandomHorizontalFlip
from lightning_maxup.data.datasets import ImageNetDataModule
from lightning_maxup.recipes.finetune import FreezeNormalization, torchvision_model
from lightning_maxup.recipes.models import MaxUpClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="efficientnet_b0", help="torchvision model name")
    parser.add_argument("--weights", default=None, help="torchvision weights, e.g. IMAGENET1K_V1 (downloads)")
    parser.add_argument("--checkpoint", default=None, help="local state dict instead of --weights")
    parser.add_argument("--root", default=None, help="ImageFolder root with train/ and val/; fake data if omitted")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--fast-dev-run", type=int, default=0)
    args = parser.parse_args()

    fake = args.root is None
    data = ImageNetDataModule(
        root=args.root or "unused",
        batch_size=2 if fake else args.batch_size,
        num_workers=0 if fake else 8,
        train_crop="random_resized",
        fake_data=fake,
    )
    backbone = torchvision_model(args.name, num_classes=1000, weights=args.weights, checkpoint=args.checkpoint)
    model = MaxUpClassifier(
        backbone,
        num_classes=1000,
        m=args.m,
        augment=Compose([RandomHorizontalFlip(), CutMix(alpha=1.0, num_classes=1000)]),
        lr=1e-4,
        weight_decay=1e-5,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        fast_dev_run=args.fast_dev_run or (2 if fake else 0),
        callbacks=[MaxUp(warmup_epochs=0, selection_size=96), FreezeNormalization()],
    )
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
