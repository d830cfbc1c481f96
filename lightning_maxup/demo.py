"""``lightning-maxup demo``: ordinary augmentation vs MaxUp on scikit-learn's bundled handwritten digits.

Both runs use the same network, augmentation, seeds and schedule; the MaxUp runs switch MaxUp on after the
warm-up (the :class:`~lightning_maxup.MaxUp` callback). The table reports test accuracy (mean ± std over seeds),
seconds per epoch and the share of a MaxUp step spent in the selection pass.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass

import pytorch_lightning as pl

from lightning_maxup.augment import Compose, Cutout, RandomCrop
from lightning_maxup.callback import MaxUp
from lightning_maxup.data import DigitsDataModule
from lightning_maxup.models import MaxUpClassifier, SmallCNN
from lightning_maxup.timing import EpochTimer

__all__ = ["DemoResult", "main", "run_one"]


@dataclass
class DemoResult:
    """One training run of the demo."""

    method: str
    seed: int
    test_acc: float
    seconds_per_epoch: float
    selection_share: float


def run_one(
    m: int, seed: int, epochs: int, warmup: int, batch_size: int = 64, width: int = 32, progress: bool = True
) -> DemoResult:
    """Train and test one model on the digits; ``m=1`` is ordinary augmentation."""
    pl.seed_everything(seed, verbose=False)
    augment = Compose([RandomCrop(8, padding=1), Cutout(size=3)])
    model = MaxUpClassifier(
        SmallCNN(1, 10, width=width), num_classes=10, m=m, augment=augment, optimizer="adam", lr=3e-3,
        weight_decay=0.0, milestones=[int(epochs * 0.75)], seed=seed,
    )  # fmt: skip
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[MaxUp(warmup_epochs=warmup if m > 1 else 0), timer],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        deterministic=True,
        accelerator="cpu",
        devices=1,
    )
    data = DigitsDataModule(batch_size=batch_size, seed=seed)
    trainer.fit(model, datamodule=data)
    share = float(trainer.callback_metrics.get("maxup/selection_share_epoch", 0.0))
    test = trainer.test(model, datamodule=data, verbose=False)[0]
    # The last epochs run MaxUp; earlier ones are warm-up and cost what ERM costs.
    return DemoResult(
        f"MaxUp (m={m})" if m > 1 else "ordinary augmentation",
        seed,
        float(test["test/acc"]),
        statistics.median(timer.seconds[warmup:] if m > 1 and len(timer.seconds) > warmup else timer.seconds),
        share,
    )


def format_table(results: list[DemoResult]) -> str:
    """Markdown table: one row per method, mean ± std over seeds."""
    lines = [
        "| method | seeds | test accuracy | s / epoch | time vs ordinary | selection share of a step |",
        "|---|---|---|---|---|---|",
    ]
    methods = list(dict.fromkeys(r.method for r in results))
    base = None
    for method in methods:
        rs = [r for r in results if r.method == method]
        accs = [r.test_acc * 100 for r in rs]
        sec = statistics.mean(r.seconds_per_epoch for r in rs)
        base = sec if base is None else base
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        share = statistics.mean(r.selection_share for r in rs)
        lines.append(
            f"| {method} | {len(rs)} | {statistics.mean(accs):.2f} ± {std:.2f} % | {sec:.3f} | {sec / base:.2f}x"
            f" | {share * 100:.0f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="lightning-maxup demo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="epochs of ordinary augmentation first (default 5)")
    parser.add_argument("--m", type=int, default=4, help="MaxUp copies per sample (default 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.m < 2:
        parser.error(f"`--m` must be at least 2 to compare MaxUp with ordinary augmentation, got {args.m}")
    if args.epochs < 1 or not 0 <= args.warmup < args.epochs:
        parser.error(f"need `--epochs` >= 1 and 0 <= `--warmup` < epochs, got {args.epochs} and {args.warmup}")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        for m in (1, args.m):
            results.append(run_one(m, seed, args.epochs, args.warmup, args.batch_size, progress=not args.no_progress))
    print()
    print(
        f"Digits (1,797 real 8x8 images; train 1,257 / val 270 / test 270), {args.epochs} epochs, "
        f"MaxUp after {args.warmup} warm-up epochs, augmentation RandomCrop(pad 1) + Cutout(3)"
    )
    print(format_table(results))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
