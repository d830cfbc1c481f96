"""lightning-maxup demo: what MaxUp buys, on scikit-learn's bundled handwritten digits (no download).

Part 1, clean accuracy. A CNN over-fits 200 of the 1,257 training images (20 per class, 60 epochs). The
same network, seeds and augmentation (RandomCrop with 1 px padding + Cutout 3 px) are trained with ordinary
augmentation and with MaxUp (m = 4 copies per sample, trained on the worst one, after 5 warm-up epochs).

Part 2, certified robustness. An MLP is trained on all training images with Gaussian noise (sigma = 0.5,
Cohen et al. 2019) and with MaxUp + Gauss (the worst of m = 5 noisy copies), then certified on the 270 test
images by randomized smoothing.

The demo prints both tables (mean +- std over 3 seeds), the thread count and the wall and CPU time, and writes
a PNG plot and the tables to --out. It needs about 100 s of CPU time at 1 thread; --quick checks the whole
path in a few seconds of CPU time (1 seed, a few epochs), without a meaningful result.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup._lightning import pl
from lightning_maxup.augment import Compose, Cutout, RandomCrop
from lightning_maxup.callback import MaxUp
from lightning_maxup.certify import Smooth, certified_accuracy
from lightning_maxup.certify.recipes import build_recipe
from lightning_maxup.data import load_digits_split
from lightning_maxup.models import MaxUpClassifier, SmallCNN
from lightning_maxup.timing import EpochTimer

__all__ = [
    "CertifyResult",
    "DemoResult",
    "Settings",
    "format_certify_table",
    "format_table",
    "main",
    "paired_difference",
    "plot",
    "run_certify",
    "run_one",
    "set_threads",
    "stratified_subset",
]

ORDINARY = "ordinary augmentation"
DEFAULT_THREADS = 1
#: Why the default is 1, printed with the thread count (measured for the README on the 2-core CI machine).
THREADS_WHY = (
    "the default: a second thread saved 25 s on a quiet 2-core machine but cost 2 to 10 times the time when"
    " another process held a core; see --help"
)
THREADS_HELP = """threads:
  The demo sets torch's intra-op and inter-op thread counts (--threads, default 1) before any tensor work and
  prints them. Whole demo, wall time, on a 2-core machine shared with other jobs:
    quiet (load average 1 to 2):            1 thread 105 s (CPU 96 s), 2 threads 80 s (CPU 141 s)
    quiet plus a competing busy loop:       1 thread 95 s (CPU 86 s), 2 threads over 240 s
    busy (load average 3 to 4):             1 thread 106 s, 2 threads 171 s
    busy plus a competing busy loop:        1 thread 247 s, 2 threads over 400 s
  Pass --threads 2 only when both cores are free. Training results also depend on the thread count
  (floating-point sums in another order): compare runs made with the same --threads.
"""
RECIPE_LABELS = {"gaussian": "Gaussian", "maxup_gauss": "MaxUp + Gauss"}


@dataclass
class DemoResult:
    """One clean-accuracy training run."""

    method: str
    seed: int
    test_acc: float
    seconds_per_epoch: float
    selection_share: float


@dataclass
class CertifyResult:
    """One certified-robustness run: certified accuracy at each radius of ``radii``."""

    recipe: str
    seed: int
    radii: tuple[float, ...]
    certified: tuple[float, ...]
    seconds_per_epoch: float
    certify_seconds: float


@dataclass(frozen=True)
class Settings:
    """Everything a demo run depends on (the command-line options, validated)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    per_class: int = 20
    width: int = 32
    epochs: int = 60
    warmup: int = 5
    m: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    cert_epochs: int = 20
    cert_warmup: int = 3
    cert_m: int = 5
    sigma: float = 0.5
    hidden: int = 256
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        minimums = (
            ("--train-per-class", self.per_class, 1, ""), ("--width", self.width, 1, ""),
            ("--epochs", self.epochs, 1, ""), ("--batch-size", self.batch_size, 1, ""),
            ("--cert-epochs", self.cert_epochs, 1, ""), ("--n0", self.n0, 1, ""), ("--n", self.n, 1, ""),
            ("--m", self.m, 2, " to compare MaxUp with ordinary augmentation"),
            ("--cert-m", self.cert_m, 2, " to compare MaxUp + Gauss with Gaussian augmentation"),
        )  # fmt: skip
        for name, value, least, why in minimums:
            if value < least:
                raise ValueError(f"`{name}` must be at least {least}{why}, got {value}")
        for name, warmup, epochs in (
            ("--warmup", self.warmup, self.epochs),
            ("--cert-warmup", self.cert_warmup, self.cert_epochs),
        ):
            if not 0 <= warmup < epochs:
                raise ValueError(
                    f"`{name}` must be at least 0 and less than the epochs ({epochs}) so that MaxUp runs, got {warmup}"
                )
        if not self.sigma > 0:
            raise ValueError(f"`--sigma` must be positive, got {self.sigma}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"`--alpha` must be in (0, 1), got {self.alpha}")
        if not self.radii or any(not r >= 0 for r in self.radii):
            raise ValueError(f"`--radii` must be non-negative, got {' '.join(map(str, self.radii))}")
        if not self.seeds:
            raise ValueError("`--seeds` must name at least one seed")

    @property
    def max_radius(self) -> float:
        """The largest radius CERTIFY can give with ``n`` samples: every sample on the top class."""
        return self.sigma * NormalDist().inv_cdf(self.alpha ** (1 / self.n))


# ---------------------------------------------------------------------------------------------------------------
# Threads and quiet Lightning
# ---------------------------------------------------------------------------------------------------------------
def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op and inter-op torch threads in this process; returns ``torch.get_num_threads()``.

    Call it before the first tensor operation: OpenMP sizes its pool at the first parallel region, so no
    ``OMP_NUM_THREADS`` is needed before ``import torch``.

    Example:
        >>> set_threads(1)
        1
    """
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        # The inter-op pool can be sized only once per process, before its first use (a second demo in one process).
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence the Trainer's per-run banners and the warnings that do not apply to in-memory 8x8 digits."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        # The data is a tensor in memory: DataLoader workers would only add start-up time to every run.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # Lightning 2.6 flattens step outputs with torch's deprecated LeafSpec; nothing a user of it can change.
        warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*", category=FutureWarning)
        # Every run trains a fixed number of epochs and is tested once at the end: no validation loop.
        warnings.filterwarnings("ignore", ".*`validation_step` but have no `val_dataloader`.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)  # "GPU available: False ..." twelve times says nothing
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,  # model selection is not part of the demo: every run trains for the same epochs
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=callbacks,
    )


def _loader(x: Tensor, y: Tensor, batch_size: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def stratified_subset(y: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """Indices of the first ``per_class`` samples of each class in a seeded shuffle.

    Example:
        >>> y = torch.tensor([0, 1, 0, 1, 0, 2])
        >>> sorted(y[stratified_subset(y, per_class=2)].tolist())
        [0, 0, 1, 1, 2]
    """
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    picked = [order[y[order] == c][:per_class] for c in torch.unique(y)]
    return torch.cat(picked).sort().values


def _decay_epoch(epochs: int) -> int:
    # The final accuracy of a constant learning rate swings by several points from one epoch to the next here.
    return max(1, int(0.75 * epochs))


def _after_warmup(seconds: list[float], warmup: int) -> float:
    return statistics.median(seconds[warmup:] if len(seconds) > warmup else seconds)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# Part 1: clean accuracy
# ---------------------------------------------------------------------------------------------------------------
def run_one(m: int, seed: int, settings: Settings, data: Any) -> DemoResult:
    """Train one CNN on the training subset and test it on the test split; ``m=1`` is ordinary augmentation."""
    (xtr, ytr), (xte, yte) = data
    pl.seed_everything(seed, verbose=False)  # same initial weights for both methods at this seed
    augment = Compose([RandomCrop(8, padding=1), Cutout(size=3)])
    model = MaxUpClassifier(
        SmallCNN(1, 10, width=settings.width), num_classes=10, m=m, augment=augment, optimizer="adam",
        lr=settings.lr, weight_decay=0.0, milestones=[_decay_epoch(settings.epochs)], seed=seed,
    )  # fmt: skip
    timer = EpochTimer()
    warmup = settings.warmup if m > 1 else 0
    trainer = _trainer(settings.epochs, [MaxUp(warmup_epochs=warmup), timer] if m > 1 else [timer])
    trainer.fit(model, train_dataloaders=_loader(xtr, ytr, settings.batch_size, seed))
    metrics = trainer.callback_metrics
    share = metrics.get("maxup/selection_share_epoch", metrics.get("maxup/selection_share", 0.0))
    return DemoResult(
        f"MaxUp (m={m})" if m > 1 else ORDINARY,
        seed,
        _accuracy(model, xte, yte),
        _after_warmup(timer.seconds, warmup),  # warm-up epochs cost what ordinary augmentation costs
        float(share) if m > 1 else 0.0,
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


def paired_difference(results: list[DemoResult]) -> tuple[float, float, int] | None:
    """MaxUp minus ordinary test accuracy (percentage points) per seed: ``(mean, std, seeds)``."""
    ordinary = {r.seed: r.test_acc for r in results if r.method == ORDINARY}
    diffs = [100 * (r.test_acc - ordinary[r.seed]) for r in results if r.method != ORDINARY and r.seed in ordinary]
    if not diffs:
        return None
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


# ---------------------------------------------------------------------------------------------------------------
# Part 2: certified robustness
# ---------------------------------------------------------------------------------------------------------------
def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def run_certify(recipe: str, seed: int, settings: Settings, data: Any, curve_radii: Sequence[float]) -> CertifyResult:
    """Train one MLP with ``recipe`` on the training split and certify it on the test split."""
    (xtr, ytr), (xte, yte) = data
    pl.seed_everything(seed, verbose=False)
    model, callbacks = build_recipe(
        recipe, _mlp(settings.hidden), 10, sigma=settings.sigma, m=settings.cert_m,  # type: ignore[arg-type]
        warmup_epochs=settings.cert_warmup, seed=seed, optimizer="adam", lr=settings.lr, weight_decay=0.0,
    )  # fmt: skip
    timer = EpochTimer()
    trainer = _trainer(settings.cert_epochs, [*callbacks, timer])
    trainer.fit(model, train_dataloaders=_loader(xtr, ytr, settings.batch_size, seed))
    smooth = Smooth(model, num_classes=10, sigma=settings.sigma, input_shape=(1, 8, 8))
    start = time.perf_counter()
    # Keyed noise: every recipe and seed sees the same noise on the same test image.
    prediction, radius = smooth.certify_batch(
        xte, settings.n0, settings.n, settings.alpha, batch_size=8192, keys=torch.arange(len(xte)), seed=1234
    )
    seconds = time.perf_counter() - start
    values = certified_accuracy(prediction, radius, yte, list(curve_radii))
    warmup = settings.cert_warmup if recipe == "maxup_gauss" else 0
    return CertifyResult(
        recipe, seed, tuple(curve_radii), tuple(float(v) for v in values),
        _after_warmup(timer.seconds, warmup), seconds,
    )  # fmt: skip


def _at(result: CertifyResult, r: float) -> float:
    return result.certified[min(range(len(result.radii)), key=lambda i: abs(result.radii[i] - r))]


def format_certify_table(results: list[CertifyResult], radii: Sequence[float]) -> str:
    """Markdown table: certified accuracy (%) at each radius, mean ± std over seeds, one row per recipe."""
    lines = [
        "| recipe | seeds | s / epoch | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
        "|---|---|---|" + "---|" * len(radii),
    ]
    for recipe in dict.fromkeys(r.recipe for r in results):
        rs = [r for r in results if r.recipe == recipe]
        cells = []
        for radius in radii:
            values = [100 * _at(r, radius) for r in rs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f} %")
        sec = statistics.mean(r.seconds_per_epoch for r in rs)
        lines.append(f"| {RECIPE_LABELS.get(recipe, recipe)} | {len(rs)} | {sec:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------
def plot(results: list[DemoResult], certified: list[CertifyResult], settings: Settings, path: Path) -> Path:
    """Left: clean test accuracy per method (each seed, mean ± std); right: certified accuracy vs radius."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        methods = list(dict.fromkeys(r.method for r in results))
        for i, method in enumerate(methods):
            accs = [100 * r.test_acc for r in results if r.method == method]
            mean = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            left.scatter([i + 0.15] * len(accs), accs, color=f"C{i}", alpha=0.6, s=20)
            left.errorbar([i - 0.15], [mean], yerr=[std], fmt="o", color=f"C{i}", capsize=6, markersize=7)
            left.annotate(f"{mean:.1f} ± {std:.1f} %", (i - 0.15, mean), xytext=(-12, 0), textcoords="offset points",
                          ha="right", va="center", fontsize=9)  # fmt: skip
        left.set_xticks(range(len(methods)), methods)
        left.set_xlim(-0.8, len(methods) - 0.4)
        left.set_ylabel("clean test accuracy (%)")
        seeds = len(settings.seeds)
        spread = f"mean ± std over {seeds} seed{'s' if seeds > 1 else ''}"
        left.set_title(
            f"Clean accuracy: CNN, {10 * settings.per_class} training images, {settings.epochs} epochs\n"
            f"{spread} (dots: each seed)",
            fontsize=10,
        )
        left.grid(axis="y", alpha=0.3)
        for i, recipe in enumerate(dict.fromkeys(r.recipe for r in certified)):
            rs = [r for r in certified if r.recipe == recipe]
            grid = torch.tensor(rs[0].radii)
            curves = 100 * torch.tensor([r.certified for r in rs])
            middle = curves.mean(dim=0)
            band = curves.std(dim=0) if len(rs) > 1 else torch.zeros_like(middle)
            colour = f"C{i + 2}"
            right.plot(grid, middle, color=colour, label=RECIPE_LABELS.get(recipe, recipe), linewidth=1.6)
            right.fill_between(grid, middle - band, middle + band, color=colour, alpha=0.2, linewidth=0)
            at = [min(range(len(grid)), key=lambda j: abs(float(grid[j]) - r)) for r in settings.radii]
            right.errorbar(grid[at], middle[at], yerr=band[at], fmt="o", color=colour, capsize=3, markersize=4)
        right.set_xlabel("ℓ2 radius")
        right.set_ylabel("certified accuracy (%)")
        right.set_ylim(0, 100)
        right.set_xlim(0, max(settings.radii) * 1.1)
        right.set_title(
            f"Certified accuracy: MLP, σ = {settings.sigma}, n = {settings.n}, α = {settings.alpha}\n"
            f"{spread} (points: the table's radii)",
            fontsize=10,
        )
        right.grid(alpha=0.3)
        right.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Both parts
# ---------------------------------------------------------------------------------------------------------------
def _run_all(settings: Settings, progress: bool) -> tuple[list[DemoResult], list[CertifyResult]]:
    train, _, test = load_digits_split(0)
    subset = stratified_subset(train[1], settings.per_class)
    small = ((train[0][subset], train[1][subset]), test)
    clean: list[DemoResult] = []
    for seed in settings.seeds:
        for m in (1, settings.m):
            t = time.perf_counter()
            clean.append(run_one(m, seed, settings, small))
            if progress:
                r = clean[-1]
                seconds = time.perf_counter() - t
                print(f"  clean      {r.method:22s} seed {seed}: test {100 * r.test_acc:5.1f} %  ({seconds:4.1f} s)")
    grid = sorted({*settings.radii, *(i * settings.max_radius / 100 for i in range(101))})
    certified: list[CertifyResult] = []
    for seed in settings.seeds:
        for recipe in RECIPE_LABELS:
            t = time.perf_counter()
            certified.append(run_certify(recipe, seed, settings, (train, test), grid))
            if progress:
                c = certified[-1]
                print(
                    f"  certified  {RECIPE_LABELS[recipe]:22s} seed {seed}: r = 0 {100 * _at(c, 0.0):5.1f} %,"
                    f" r = 0.5 {100 * _at(c, 0.5):5.1f} %  ({time.perf_counter() - t:4.1f} s)"
                )
    return clean, certified


def _report(settings: Settings, clean: list[DemoResult], certified: list[CertifyResult]) -> str:
    s = settings
    seeds = " ".join(map(str, s.seeds))
    lines = [
        f"1. Clean accuracy. SmallCNN (width {s.width}) trained on {10 * s.per_class} of the digits' 1,257 training"
        f" images ({s.per_class} per class) for {s.epochs} epochs (Adam, lr {s.lr:g}, /10 after epoch"
        f" {_decay_epoch(s.epochs)}), augmentation RandomCrop(pad 1) + Cutout(3); MaxUp m = {s.m} after {s.warmup}"
        f" warm-up epochs; tested on the 270 test images; seeds {seeds}.",
        "",
        format_table(clean),
    ]
    diff = paired_difference(clean)
    if diff is not None:
        lines += ["", f"MaxUp - ordinary, paired by seed: {diff[0]:+.2f} ± {diff[1]:.2f} points ({diff[2]} seeds)"]
    lines += [
        "",
        f"2. Certified robustness. MLP (64-{s.hidden}-{s.hidden}-10) trained on all 1,257 training images for"
        f" {s.cert_epochs} epochs with Gaussian noise σ = {s.sigma:g}: one noisy copy (Gaussian) or the worst of"
        f" {s.cert_m} (MaxUp + Gauss, after {s.cert_warmup} warm-up epochs). Certified accuracy (%) on the 270 test"
        f" images by randomized smoothing (n0 = {s.n0}, n = {s.n}, α = {s.alpha:g}; the largest radius n allows is"
        f" {s.max_radius:.2f}); seeds {seeds}.",
        "",
        format_certify_table(certified, s.radii),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
FULL = Settings()
QUICK = Settings(seeds=(0,), epochs=3, warmup=1, cert_epochs=2, cert_warmup=1, n0=20, n=100)


def _parser() -> argparse.ArgumentParser:
    d = FULL
    p = argparse.ArgumentParser(
        prog="lightning-maxup demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=THREADS_HELP,
    )
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads (default {DEFAULT_THREADS})")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    p.add_argument(
        "--out", type=Path, default=Path("maxup_demo"), help="folder for the plot and the tables (default ./maxup_demo)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, 3 epochs, n = 100: checks the whole path; its numbers mean nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="print only the tables, not a line per run")
    clean = p.add_argument_group("part 1, clean accuracy")
    clean.add_argument("--train-per-class", type=int, help=f"training images per class (default {d.per_class})")
    clean.add_argument("--width", type=int, help=f"channels of the CNN's first block (default {d.width})")
    clean.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    clean.add_argument("--warmup", type=int, help=f"epochs of ordinary augmentation before MaxUp (default {d.warmup})")
    clean.add_argument("--m", type=int, help=f"MaxUp copies per sample (default {d.m})")
    clean.add_argument("--batch-size", type=int, help=f"batch size of both parts (default {d.batch_size})")
    cert = p.add_argument_group("part 2, certified robustness")
    cert.add_argument("--cert-epochs", type=int, help=f"training epochs (default {d.cert_epochs})")
    cert.add_argument("--cert-warmup", type=int, help=f"MaxUp + Gauss warm-up epochs (default {d.cert_warmup})")
    cert.add_argument("--cert-m", type=int, help=f"MaxUp + Gauss copies per sample (default {d.cert_m})")
    cert.add_argument("--sigma", type=float, help=f"noise standard deviation (default {d.sigma})")
    cert.add_argument("--n0", type=int, help=f"noise samples that pick the class (default {d.n0})")
    cert.add_argument("--n", type=int, help=f"noise samples that bound its probability (default {d.n})")
    cert.add_argument("--alpha", type=float, help=f"failure probability of a certificate (default {d.alpha})")
    cert.add_argument("--radii", type=float, nargs="+", help="radii of the table (default 0 0.25 0.5 0.75 1)")
    return p


_OPTIONS = {
    "seeds": "seeds", "train_per_class": "per_class", "width": "width", "epochs": "epochs", "warmup": "warmup",
    "m": "m", "batch_size": "batch_size", "cert_epochs": "cert_epochs", "cert_warmup": "cert_warmup",
    "cert_m": "cert_m", "sigma": "sigma", "n0": "n0", "n": "n", "alpha": "alpha", "radii": "radii",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = {field: getattr(args, opt) for opt, field in _OPTIONS.items() if getattr(args, opt) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    try:
        settings = replace(QUICK if args.quick else FULL, **given)
        if args.threads < 1:
            raise ValueError(f"`--threads` must be at least 1, got {args.threads}")
    except ValueError as err:
        parser.error(str(err))
    start, cpu_start = time.perf_counter(), time.process_time()
    threads = set_threads(args.threads)
    why = "set by --threads" if args.threads != DEFAULT_THREADS else THREADS_WHY
    print(f"torch threads: {threads} intra-op, {torch.get_num_interop_threads()} inter-op ({why})")
    with _quiet_lightning():
        clean, certified = _run_all(settings, progress=not args.no_progress)
    report = _report(settings, clean, certified)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(clean, certified, settings, args.out / "maxup_demo.png")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    footer = (
        f"wall time {wall:.0f} s, CPU time {cpu:.0f} s (this process, all threads),"
        f" {threads} torch thread{'s' if threads > 1 else ''}"
    )
    (args.out / "maxup_demo.md").write_text(f"{report}\n\n{footer}\n", encoding="utf-8")
    print(f"\nwrote {png} and {args.out / 'maxup_demo.md'}")
    print(footer)
    return 0
