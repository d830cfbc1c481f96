"""What keeps MaxUp's switch-on stable: ramps, clean BatchNorm statistics, a smaller learning rate (issue 21).

A torchvision ResNet-18 with a 1-channel stem trains on the bundled digits, upsampled to 32 px (bilinear), with
ordinary augmentation (RandomCrop 32, padding 4) for ``--warmup`` epochs, then MaxUp with ``m = 4``, through the
Lightning path (:class:`~lightning_maxup.MaxUpMixin` + the :class:`~lightning_maxup.MaxUp` callback), so the
callback options measured are the ones shipped. SGD (momentum 0.9, weight decay 5e-4) at a constant learning rate,
batch 64, on the digits' training split; validation accuracy on the validation split after every epoch.

Every variant of a seed starts from the same initial weights, batch order and augmentation stream, so a MaxUp
variant and the ``m = 1`` baseline are identical through the warm-up and differ only after it: paired differences
by seed, reported as the mean and its 95 % Student-t interval (``scipy.stats.t``) over seeds, at the first MaxUp
epoch and at the last epoch.

Variants (``--variants``): ``m1`` (ordinary augmentation), ``maxup`` (the hard switch to ``m = 4``),
``bn_clean`` (``bn_stats="clean"``), ``ramp_m`` (``ramp_epochs=1, ramp="m"``: ``m = 2`` for one epoch, then 4),
``ramp_t`` (``ramp_epochs=1, ramp="temperature"``: ``selection_temperature=1`` for one epoch, then the arg-max),
``maxup_low`` (at ``--low-lr``), and on request ``m1_low``.

With ``--json FILE`` every finished run is appended to ``FILE`` and a rerun reuses the runs already there (with the
same learning rates and at least as many epochs, truncated: the learning rate is constant, so the first epochs of a
longer run are those of a shorter one).

Run it at one thread (the default), in the background::

    nohup python benchmarks/switch_on.py --seeds 0,1,2,3 > benchmarks/results/switch_on.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

from lightning_maxup import MaxUp, MaxUpMixin  # noqa: E402
from lightning_maxup._lightning import pl  # noqa: E402
from lightning_maxup.augment import RandomCrop  # noqa: E402
from lightning_maxup.data.datasets import load_digits_split  # noqa: E402
from lightning_maxup.recipes.regimes import quiet_lightning, set_threads  # noqa: E402

SIDE = 32
#: Callback options and learning rate of each variant (``None`` lr: ``--lr``; ``m`` 1 is the baseline).
VARIANTS: dict[str, dict[str, Any]] = {
    "m1": {"m": 1},
    "maxup": {},
    "bn_clean": {"bn_stats": "clean"},
    "ramp_m": {"ramp_epochs": 1, "ramp": "m"},
    "maxup_low": {"low": True},
    "ramp_t": {"ramp_epochs": 1, "ramp": "temperature"},
    "m1_low": {"m": 1, "low": True},
}
#: The variants run by default (``m1_low`` on request).
DEFAULT_VARIANTS = ("m1", "maxup", "bn_clean", "ramp_m", "maxup_low", "ramp_t")


def resnet18(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with an ``in_channels`` stem."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


class Lit(MaxUpMixin, pl.LightningModule):
    """A ResNet-18 classifier trained with MaxUp's per-sample worst-copy loss."""

    def __init__(self, lr: float, m: int) -> None:
        super().__init__(m=m, augment=RandomCrop(SIDE, padding=4))
        self.net = resnet18()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


@dataclass
class Run:
    """One (variant, seed) fit: validation accuracy and loss after every epoch, training loss per epoch."""

    variant: str
    seed: int
    val_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    switch_ratio: float = float("nan")  # mean loss of the first 20 MaxUp steps / warm-up's last epoch
    eval_ratio: float = float("nan")  # first 20 MaxUp steps: selection pass's (eval-mode) mean loss / trained loss
    warned: bool = False
    seconds: float = 0.0


class _Record(pl.Callback):
    """Validation after every epoch (eval mode, no gradient) and the training loss of every step."""

    def __init__(self, run: Run, val: tuple[Tensor, Tensor]) -> None:
        self.run, self.val = run, val
        self.steps: list[list[float]] = []
        self.selection: list[list[float]] = []  # the selection pass's mean candidate loss (eval mode) per step

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.steps.append([])
        self.selection.append([])
        pl_module.maxup_record = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps[-1].append(float(outputs["loss"]))
        out = pl_module.maxup_last_output
        if out is not None and out.m > 1:
            self.selection[-1].append(float(out.mean_candidate_loss))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        x, y = self.val
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = torch.cat([pl_module(x[i : i + 256]) for i in range(0, len(x), 256)])
        pl_module.train(was)
        self.run.val_acc.append(float((logits.argmax(1) == y).float().mean()))
        self.run.val_loss.append(float(F.cross_entropy(logits, y)))
        self.run.train_loss.append(statistics.fmean(self.steps[-1]))


def upsample(x: Tensor) -> Tensor:
    """8x8 digits to ``SIDE`` px, bilinear."""
    return F.interpolate(x, size=SIDE, mode="bilinear", align_corners=False)


def fit(variant: str, seed: int, args: argparse.Namespace, data: Any) -> Run:
    """Train one variant at one seed; the seed fixes the weights, the batch order and the augmentation stream."""
    spec = dict(VARIANTS[variant])
    lr = args.low_lr if spec.pop("low", False) else args.lr
    m = spec.pop("m", args.m)
    (xtr, ytr), val = data
    run = Run(variant, seed)
    pl.seed_everything(seed, verbose=False)
    module = Lit(lr=lr, m=m)
    module.maxup_config = module.maxup_config.replace(seed=seed)
    loader = DataLoader(
        TensorDataset(xtr, ytr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    record = _Record(run, val)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[MaxUp(warmup_epochs=args.warmup, **spec), record],
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    run.seconds = time.perf_counter() - start
    run.warned = any("MaxUp's switch-on" in str(w.message) for w in caught)
    if len(record.steps) > args.warmup:
        before = statistics.fmean(record.steps[args.warmup - 1])
        after = statistics.fmean(record.steps[args.warmup][:20])
        run.switch_ratio = after / before
        if record.selection[args.warmup]:
            run.eval_ratio = statistics.fmean(record.selection[args.warmup][:20]) / after
    return run


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t interval of paired differences."""
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, half


def baseline(variant: str) -> str:
    """The ``m = 1`` run at the variant's learning rate."""
    return "m1_low" if VARIANTS[variant].get("low") else "m1"


def _cell(runs: dict[tuple[str, int], Run], a: str, b: str, epoch: int, seeds: list[int]) -> str:
    if a == b:
        return "—"
    pairs = [(runs[a, s], runs[b, s]) for s in seeds if (a, s) in runs and (b, s) in runs]
    if not pairs:
        return "—"
    diffs = [100 * (x.val_acc[epoch] - y.val_acc[epoch]) for x, y in pairs]
    mean, half = interval(diffs)
    wins = sum(d > 0 for d in diffs)
    return f"{mean:+.1f} ± {half:.1f} ({wins}/{len(diffs)})"


def report(runs: dict[tuple[str, int], Run], variants: list[str], seeds: list[int], args: argparse.Namespace) -> str:
    """Per variant: accuracies, paired differences against ``m = 1`` at its lr and against ``maxup``, at two epochs."""
    first, last = args.warmup, args.epochs - 1
    rows = []
    for v in variants:
        mine = [runs[v, s] for s in seeds if (v, s) in runs]
        if not mine:
            continue
        acc = lambda e, rs=mine: " / ".join(f"{r.val_acc[e]:.3f}" for r in rs)  # noqa: E731
        ratio = " / ".join(f"{r.switch_ratio:.2f}" for r in mine)
        eval_ratio = " / ".join(f"{r.eval_ratio:.1f}" for r in mine)
        rows.append(
            [
                v,
                acc(first),
                acc(last),
                _cell(runs, v, baseline(v), first, seeds),
                _cell(runs, v, baseline(v), last, seeds),
                _cell(runs, v, "maxup", first, seeds),
                _cell(runs, v, "maxup", last, seeds),
                ratio,
                eval_ratio,
                sum(r.warned for r in mine),
            ]
        )
    headers = [
        "variant",
        f"val acc, epoch {first + 1} (first MaxUp)",
        f"val acc, epoch {last + 1}",
        f"− m = 1 (same lr), epoch {first + 1}",
        f"− m = 1 (same lr), epoch {last + 1}",
        f"− maxup, epoch {first + 1}",
        f"− maxup, epoch {last + 1}",
        "switch loss ratio",
        "eval/train loss",
        "warned",
    ]
    return markdown_table(headers, rows)


def _finished(args: argparse.Namespace) -> dict[tuple[str, int], Run]:
    """Runs already in ``--json`` with these learning rates and at least ``--epochs`` epochs, truncated to them."""
    runs: dict[tuple[str, int], Run] = {}
    if args.json is None or not args.json.exists():
        return runs
    for line in args.json.read_text().splitlines():
        row = json.loads(line)
        lr, low = row.pop("lr"), row.pop("low_lr")
        run = Run(**row)
        if (lr, low) != (args.lr, args.low_lr) or len(run.val_acc) < args.epochs:
            continue
        for name in ("val_acc", "val_loss", "train_loss"):
            setattr(run, name, getattr(run, name)[: args.epochs])
        runs[run.variant, run.seed] = run
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the variants over the seeds, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--low-lr", type=float, default=0.01)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="append every finished run here (JSON lines)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    (xtr, ytr), (xva, yva), _ = load_digits_split()
    data = ((upsample(xtr), ytr), (upsample(xva), yva))
    runs = _finished(args)
    start = time.perf_counter()
    with quiet_lightning():
        for seed in seeds:
            for v in variants:
                if (v, seed) in runs:
                    continue
                run = fit(v, seed, args, data)
                runs[v, seed] = run
                accs = " ".join(f"{a:.3f}" for a in run.val_acc)
                print(
                    f"{v:>10} seed {seed}: val acc {accs}  val loss {' '.join(f'{x:.2f}' for x in run.val_loss)}"
                    f"  ratio {run.switch_ratio:.2f}  eval/train {run.eval_ratio:.1f}  {run.seconds:.0f} s",
                    flush=True,
                )
                if args.json is not None:
                    with args.json.open("a") as f:
                        f.write(json.dumps({**asdict(run), "lr": args.lr, "low_lr": args.low_lr}) + "\n")
    print()
    print(
        f"ResNet-18 on digits at {SIDE} px, {len(xtr)} training / {len(xva)} validation images, SGD lr {args.lr}"
        f" (low {args.low_lr}), m = {args.m} after {args.warmup} warm-up epoch(s), {args.epochs} epochs, seeds"
        f" {seeds}, {torch.get_num_threads()} thread(s). Paired differences in accuracy points: mean ± 95 %"
        " t-interval (seeds where the variant is higher)."
    )
    print()
    print(report(runs, variants, seeds, args))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
