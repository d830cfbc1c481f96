"""MaxUp with Lightning's manual optimisation: call the functional step yourself.

:func:`lightning_maxup.core.functional.maxup_step` is a plain function, so a ``training_step`` with
``automatic_optimization = False`` can run it, back-propagate its loss with ``manual_backward`` and step the
optimiser however it likes (here: optional gradient clipping, then SGD). Run it on the bundled digits::

    python examples/manual_optimization.py --max-epochs 2 --m 4
"""

from __future__ import annotations

import argparse
from typing import Any

# With `import lightning.pytorch as pl` instead, set LIGHTNING_MAXUP_NAMESPACE=lightning.pytorch when both are
# installed, so the library's modules are built on it too (docs/namespaces.md).
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.augment import Augmentation, Cutout
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import mix_seed


class ManualMaxUp(pl.LightningModule):
    """A classifier trained with MaxUp under manual optimisation.

    Args:
        backbone: Network mapping images to logits.
        augment: The MaxUp augmentation, ``augment(batch, generator=...)``.
        m: Copies per sample.
        lr: SGD learning rate.
        clip: Gradient-norm clipping threshold, or ``None``.
        seed: Base seed of the augmentation stream (each step reseeds from ``(seed, rank, step)``).
    """

    def __init__(
        self, backbone: nn.Module, augment: Augmentation | None, m: int = 4, lr: float = 0.05,
        clip: float | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        self.augment = augment
        self.m = m
        self.lr = lr
        self.clip = clip
        self.seed = seed
        self.generator: torch.Generator | None = None

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.backbone(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        if self.generator is None:
            self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(mix_seed(self.seed, self.global_rank, self.global_step))
        out = maxup_step(
            self.per_sample_loss, batch, augment=self.augment, m=self.m, generator=self.generator, model=self
        )
        opt.zero_grad()
        self.manual_backward(out.loss)
        if self.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        self.log("train/worst_loss", out.loss.detach(), prog_bar=True, batch_size=len(out.losses))
        self.log("train/mean_loss", out.mean_candidate_loss, batch_size=len(out.losses))
        return out.loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        acc = (self.backbone(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    from lightning_maxup.recipes.datamodules import DigitsDataModule
    from lightning_maxup.recipes.models import SmallCNN

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--clip", type=float, default=1.0)
    args = parser.parse_args()
    pl.seed_everything(0)
    model = ManualMaxUp(SmallCNN(1, 10, width=16), Cutout(size=3), m=args.m, clip=args.clip)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.max_epochs, logger=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))


if __name__ == "__main__":
    main()
