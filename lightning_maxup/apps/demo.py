"""lightning-maxup demo: where MaxUp helps and where it hurts, on scikit-learn's bundled digits (no download).

Part 1, clean accuracy. A small CNN is trained on 200 of the 1,257 training digits (20 per class, 40 epochs)
in two regimes that the regimes study (benchmarks/regimes.py, docs/regimes.md) chose on the validation split:
the cell where MaxUp gained most and the cell where it lost most. Each regime is trained with ordinary
augmentation (m = 1) and with MaxUp at the same seeds (same initial weights and batch order), and the demo prints
MaxUp minus ordinary test accuracy, paired by seed, with its 95 % t-interval, and the same for worst-of-k
accuracy (all k augmented copies of a test image classified correctly). Its default seeds are the study's
confirmation seeds, so at one thread it retrains exactly the study's models.

Part 2, certified robustness. An MLP is trained on all training images with Gaussian noise (sigma = 0.5,
Cohen et al. 2019) and with MaxUp + Gauss (the worst of m = 5 noisy copies), then certified on the 270 test
images by randomized smoothing (mean +- std over 3 seeds).

The demo prints both tables, the thread count and the wall and CPU time, and writes a PNG plot and the tables
to --out. --quick checks the whole path in a few seconds of CPU time (2 seeds, a few epochs), without a
meaningful result.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup._extras import require
from lightning_maxup._lightning import pl
from lightning_maxup.callbacks.timing import EpochTimer
from lightning_maxup.certify import Smooth, certified_accuracy
from lightning_maxup.certify.recipes import build_recipe
from lightning_maxup.data.datasets import load_digits_split
from lightning_maxup.evaluation.paired import PairedDifference, paired_difference, paired_interval
from lightning_maxup.recipes.regimes import (  # noqa: F401  (the harness is in the library; 0.3 names re-exported)
    AUGMENTS,
    NOISE_SIGMA,
    OPTIMIZERS,
    AugmentName,
    OptimizerName,
    Recipe,
    Regime,
    Trained,
    _decay_epoch,
    _optimizer,
    _view_agreement,
    make_augment,
    set_threads,
    stratified_subset,
    train_regime,
    worst_of_k,
)
from lightning_maxup.recipes.regimes import quiet_lightning as _quiet_lightning

__all__ = [
    "AUGMENTS",
    "OPTIMIZERS",
    "REGIMES",
    "STUDY_SEEDS",
    "CertifyResult",
    "DemoResult",
    "PairedDifference",
    "Recipe",
    "Regime",
    "Settings",
    "Trained",
    "format_certify_table",
    "format_table",
    "main",
    "make_augment",
    "paired_difference",
    "paired_interval",
    "plot",
    "run_certify",
    "run_one",
    "set_threads",
    "stratified_subset",
    "train_regime",
    "worst_of_k",
]

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


#: The seeds of the regimes study's confirmation stage (``benchmarks/regimes.py``): part 1 retrains its cells.
STUDY_SEEDS: tuple[int, ...] = tuple(range(1000, 1012))
#: Part 1's two regimes, as the regimes study (docs/regimes.md) chose them on the validation split. It found no
#: cell where MaxUp raises clean accuracy beyond noise: "best" is its best plain-MaxUp cell, which ties on clean
#: accuracy and gains worst-of-8 accuracy; "worst" is the cell where MaxUp lost most.
REGIMES: tuple[tuple[str, Regime], ...] = (
    ("best", Regime("crop", m=2, optimizer="sgd")),
    ("worst", Regime("crop+cutout4", m=8, optimizer="sgd")),
)
#: What the study measured in each regime (validation, 12 seeds), printed under the table.
REGIME_NOTES = {
    "best": (
        "crop only, SGD: no regime of the study raised clean accuracy beyond noise (the best screened cell,"
        " +1.85 points, confirmed at +0.65 ± 0.85 on fresh seeds); MaxUp ties on clean accuracy and raises"
        " worst-of-8 accuracy (validation: -0.03 ± 1.36 and +2.01 ± 1.55 points)."
    ),
    "worst": (
        "Cutout of half the digit's side, m = 8: the worst copy is often an unreadable digit, and training on it"
        " costs about 24 points of clean accuracy (validation: -24.38 ± 3.47, worse on 12 of 12 seeds) while"
        " worst-of-8 accuracy rises (+9.60 ± 1.91). Selecting on a 4x4 view is no better: its pick matches the"
        " full input's worst copy at chance rate (24.8 % at m = 4, chance 25 %)."
    ),
}


@dataclass
class DemoResult:
    """One clean-accuracy training run: test accuracy, worst-of-k test accuracy and training seconds."""

    regime: Regime
    seed: int
    test_acc: float
    test_wok: float
    seconds: float
    view_agreement: float | None = None


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

    seeds: tuple[int, ...] = STUDY_SEEDS
    per_class: int = 20
    width: int = 8
    epochs: int = 40
    warmup: int = 5
    batch_size: int = 64
    k: int = 8
    cert_seeds: tuple[int, ...] = (0, 1, 2)
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
            ("--k", self.k, 1, ""),
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
        for name, seeds in (("--seeds", self.seeds), ("--cert-seeds", self.cert_seeds)):
            if not seeds:
                raise ValueError(f"`{name}` must name at least one seed")

    @property
    def recipe(self) -> Recipe:
        """How part 1 trains every network."""
        return Recipe(self.per_class, self.width, self.epochs, self.warmup, self.batch_size)

    @property
    def max_radius(self) -> float:
        """The largest radius CERTIFY can give with ``n`` samples: every sample on the top class."""
        return self.sigma * NormalDist().inv_cdf(self.alpha ** (1 / self.n))


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


def _after_warmup(seconds: list[float], warmup: int) -> float:
    return statistics.median(seconds[warmup:] if len(seconds) > warmup else seconds)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# Part 1: where MaxUp helps and where it hurts
# ---------------------------------------------------------------------------------------------------------------
def run_one(regime: Regime, seed: int, settings: Settings, data: Any) -> DemoResult:
    """Train one CNN in ``regime`` (:func:`train_regime`) and score it on the test split."""
    (xtr, ytr), (xte, yte) = data
    start = time.perf_counter()
    trained = train_regime(regime, seed, xtr, ytr, settings.recipe)
    seconds = time.perf_counter() - start
    wok = worst_of_k(trained.model, xte, yte, make_augment(regime.augment), settings.k)
    return DemoResult(regime, seed, _accuracy(trained.model, xte, yte), wok, seconds, trained.view_agreement)


def format_table(results: list[DemoResult], k: int = 8, roles: dict[Regime, str] | None = None) -> str:
    """Markdown table: one row per MaxUp regime (prefixed by its role, if given), paired by seed with m = 1."""
    lines = [
        f"| regime | seeds | ordinary | MaxUp | MaxUp - ordinary (95 % CI) | MaxUp better on | verdict"
        f" | worst-of-{k}: MaxUp - ordinary | s / run (ordinary, MaxUp) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in dict.fromkeys(r.regime for r in results if r.regime.m > 1):
        diff, wok = paired_difference(results, regime), paired_difference(results, regime, "test_wok")
        if diff is None or wok is None:
            continue
        runs = {m: [r for r in results if r.regime == (regime if m > 1 else regime.baseline)] for m in (1, regime.m)}
        acc = {m: statistics.mean(100 * r.test_acc for r in rs) for m, rs in runs.items()}
        sec = {m: statistics.mean(r.seconds for r in rs) for m, rs in runs.items()}
        role = f"{roles[regime]}: " if roles and regime in roles else ""
        lines.append(
            f"| {role}{regime.label} | {diff.seeds} | {acc[1]:.2f} % | {acc[regime.m]:.2f} % | {diff} | {diff.wins} of"
            f" {diff.seeds} | {diff.verdict} | {wok} | {sec[1]:.1f}, {sec[regime.m]:.1f} |"
        )
    return "\n".join(lines)


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
def _plot_gains(ax: Any, results: list[DemoResult], settings: Settings) -> None:
    roles = {regime: role for role, regime in REGIMES}
    regimes = list(dict.fromkeys(r.regime for r in results if r.regime.m > 1))
    for i, regime in enumerate(regimes):
        base = {r.seed: r.test_acc for r in results if r.regime == regime.baseline}
        diffs = [100 * (r.test_acc - base[r.seed]) for r in results if r.regime == regime and r.seed in base]
        diff, wok = paired_difference(results, regime), paired_difference(results, regime, "test_wok")
        if diff is None or wok is None:
            continue
        ax.scatter([i + 0.15] * len(diffs), diffs, color=f"C{i}", alpha=0.6, s=20)
        for x, d, marker in ((i - 0.15, diff, "o"), (i + 0.4, wok, "^")):
            half = 0.0 if d.half != d.half else d.half
            ax.errorbar([x], [d.mean], yerr=[half], fmt=marker, color=f"C{i}", capsize=6, markersize=7,
                        mfc="white" if marker == "^" else None)  # fmt: skip
        ax.annotate(f"{diff}\n{diff.verdict}", (i - 0.15, diff.mean), xytext=(-12, 0), textcoords="offset points",
                    ha="right", va="center", fontsize=8)  # fmt: skip
        ax.annotate(f"worst-of-{settings.k}\n{wok}", (i + 0.4, wok.mean), xytext=(10, 0), textcoords="offset points",
                    ha="left", va="center", fontsize=8)  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=0.8)
    labels = [f"{roles.get(r, '')}\n{r.label.replace(', m=', chr(10) + 'm=')}".strip() for r in regimes]
    ax.set_xticks(range(len(regimes)), labels, fontsize=8)
    ax.set_xlim(-1.0, len(regimes) + 0.2)
    ax.set_ylabel("MaxUp - ordinary, test accuracy (points)")
    ax.set_title(
        f"CNN, {10 * settings.per_class} training digits, {settings.epochs} epochs, paired by seed: mean and 95 %"
        f" interval\nover {len(settings.seeds)} seeds; clean (dots: each seed) and worst-of-{settings.k} (triangles)",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)


def plot(results: list[DemoResult], certified: list[CertifyResult], settings: Settings, path: Path) -> Path:
    """Left: MaxUp minus ordinary per regime (each seed, mean and 95 % interval); right: certified accuracy."""
    matplotlib = require("matplotlib", "lightning-maxup demo", "demo")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        _plot_gains(left, results, settings)
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
            f"mean ± std over {len(settings.cert_seeds)} seeds (points: the table's radii)",
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
def _run_clean(settings: Settings, data: Any, progress: bool) -> list[DemoResult]:
    clean: list[DemoResult] = []
    for seed in settings.seeds:
        for _, regime in REGIMES:
            for cell in (regime.baseline, regime):
                if cell == regime.baseline and any(r.regime == cell and r.seed == seed for r in clean):
                    continue  # two regimes may share their baseline
                clean.append(run_one(cell, seed, settings, data))
                if progress:
                    r = clean[-1]
                    print(
                        f"  clean      {cell.label:34s} seed {seed}: test {100 * r.test_acc:5.1f} %"
                        f"  ({r.seconds:4.1f} s)"
                    )
    return clean


def _run_all(settings: Settings, progress: bool) -> tuple[list[DemoResult], list[CertifyResult]]:
    train, _, test = load_digits_split(0)
    subset = stratified_subset(train[1], settings.per_class)
    clean = _run_clean(settings, ((train[0][subset], train[1][subset]), test), progress)
    grid = sorted({*settings.radii, *(i * settings.max_radius / 100 for i in range(101))})
    certified: list[CertifyResult] = []
    for seed in settings.cert_seeds:
        for recipe in RECIPE_LABELS:
            t = time.perf_counter()
            certified.append(run_certify(recipe, seed, settings, (train, test), grid))
            if progress:
                c = certified[-1]
                print(
                    f"  certified  {RECIPE_LABELS[recipe]:34s} seed {seed}: r = 0 {100 * _at(c, 0.0):5.1f} %,"
                    f" r = 0.5 {100 * _at(c, 0.5):5.1f} %  ({time.perf_counter() - t:4.1f} s)"
                )
    return clean, certified


def _seeds(seeds: Sequence[int]) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return " ".join(map(str, seeds))


def _report(settings: Settings, clean: list[DemoResult], certified: list[CertifyResult]) -> str:
    s = settings
    lines = [
        f"1. MaxUp's best and worst regime on the digits. SmallCNN (width {s.width}) trained on"
        f" {10 * s.per_class} of the digits' 1,257 training images ({s.per_class} per class) for {s.epochs} epochs,"
        f" batch {s.batch_size}, SGD (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4, cosine) or Adam (lr"
        f" 3e-3, /10 after epoch {_decay_epoch(s.epochs)}); MaxUp after {s.warmup} warm-up epochs; ordinary"
        f" augmentation (m = 1) and MaxUp at the same seed share initial weights and batch order. Augmentations:"
        f" crop = RandomCrop(8, padding 1), cutoutN = Cutout(N px), noise = Gaussian σ {NOISE_SIGMA:g}; half view ="
        f" selection on a 4x4 downsampled copy. The two regimes are the best plain-MaxUp cell and the worst cell of"
        f" the regimes study (benchmarks/regimes.py, docs/regimes.md), chosen on the validation split; tested on"
        f" the 270 test images; worst-of-{s.k}: all {s.k} augmented copies of a test image right; seeds"
        f" {_seeds(s.seeds)}.",
        "",
        format_table(clean, s.k, {regime: role for role, regime in REGIMES}),
    ]
    lines += [f"   {role}: {REGIME_NOTES[role]}" for role, _ in REGIMES]
    lines += [
        "",
        f"2. Certified robustness. MLP (64-{s.hidden}-{s.hidden}-10) trained on all 1,257 training images for"
        f" {s.cert_epochs} epochs with Gaussian noise σ = {s.sigma:g}: one noisy copy (Gaussian) or the worst of"
        f" {s.cert_m} (MaxUp + Gauss, after {s.cert_warmup} warm-up epochs). Certified accuracy (%) on the 270 test"
        f" images by randomized smoothing (n0 = {s.n0}, n = {s.n}, α = {s.alpha:g}; the largest radius n allows is"
        f" {s.max_radius:.2f}); seeds {_seeds(s.cert_seeds)}.",
        "",
        format_certify_table(certified, s.radii),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
FULL = Settings()
QUICK = Settings(seeds=(1000, 1001), epochs=3, warmup=1, cert_seeds=(0,), cert_epochs=2, cert_warmup=1, n0=20, n=100)


def _parser() -> argparse.ArgumentParser:
    d = FULL
    p = argparse.ArgumentParser(
        prog="lightning-maxup demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=THREADS_HELP,
    )
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads (default {DEFAULT_THREADS})")
    p.add_argument("--seeds", type=int, nargs="+", help=f"part 1 seeds (default {_seeds(d.seeds)}, the study's)")
    p.add_argument("--cert-seeds", type=int, nargs="+", help="part 2 seeds (default 0 1 2)")
    p.add_argument(
        "--out", type=Path, default=Path("maxup_demo"), help="folder for the plot and the tables (default ./maxup_demo)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, 3 epochs, n = 100: checks the whole path; its numbers mean nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="print only the tables, not a line per run")
    clean = p.add_argument_group("part 1, where MaxUp helps and where it hurts")
    clean.add_argument("--train-per-class", type=int, help=f"training images per class (default {d.per_class})")
    clean.add_argument("--width", type=int, help=f"channels of the CNN's first block (default {d.width})")
    clean.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    clean.add_argument("--warmup", type=int, help=f"epochs of ordinary augmentation before MaxUp (default {d.warmup})")
    clean.add_argument("--k", type=int, help=f"copies of worst-of-k test accuracy (default {d.k})")
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
    "seeds": "seeds", "cert_seeds": "cert_seeds", "train_per_class": "per_class", "width": "width",
    "epochs": "epochs", "warmup": "warmup", "k": "k", "batch_size": "batch_size", "cert_epochs": "cert_epochs",
    "cert_warmup": "cert_warmup",
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
    for module in ("sklearn", "scipy", "matplotlib"):  # before minutes of training, not at the plot
        try:
            require(module, "lightning-maxup demo", "demo")
        except ModuleNotFoundError as err:
            raise SystemExit(f"error: {err}") from None
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
