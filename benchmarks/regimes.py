"""Where MaxUp helps and where it hurts on the bundled digits: a gain map with paired 95 % intervals (issue 16).

Every cell trains a SmallCNN (width 8) on 200 of the 1,257 training digits (20 per class) for 40 epochs, batch 64,
with a plain PyTorch loop around :func:`lightning_maxup.core.functional.maxup_step` (the step the Lightning mixin
calls; no Trainer, whose per-run start-up would cost more than a run here), via the library's
:func:`lightning_maxup.recipes.regimes.train_regime`, which the demo uses too. MaxUp cells warm up with 5 epochs
of ordinary augmentation. The gain of a cell is MaxUp minus ordinary augmentation (``m = 1``, same augmentation
and optimiser) at the same seed, so with the same initial weights, batch order and warm-up draws: a paired
difference, reported as its mean and 95 % Student-t interval over seeds (:func:`lightning_maxup.evaluation.paired.
paired_difference`, the statistics ``lightning-maxup study`` reports).

Three stages, so that every choice is made on the validation split and the test split is read once:

1. **Screen** (validation): the whole grid, augmentation (crop; crop + Cutout 2 px; crop + Cutout 4 px; Gaussian
   noise) x m (2, 4, 8; and 1, the baseline) x selection view (full 8 px; half resolution, ``selection_size=4``,
   an antialiased 4x4 view of the 8x8 digit) x selection rule (arg-max; ``selection_temperature=τ``) x optimiser
   (SGD + cosine; Adam), on a few seeds.
2. **Confirm** (validation, fresh seeds): per optimiser, the cells with the largest and the smallest screened
   gain, plus a temperature sweep on the overall largest-gain and smallest-gain cells, each next to its
   baseline. Fresh seeds, so the winner's curse of picking the best of many noisy cells does not carry over.
3. **Test**: the confirmed cells' models, already trained, are evaluated once on the test split.

Clean accuracy and worst-of-k accuracy (the share of samples whose k augmented copies, drawn from the cell's own
augmentation with one fixed generator, are all classified correctly; :func:`lightning_maxup.evaluation.worst_of_k.
worst_of_k_accuracy`) are reported for every cell, and for half-view cells the share of samples whose view pick
is also the full input's worst copy (:func:`lightning_maxup.evaluation.fidelity.view_fidelity`).

Run it at one thread (the default), in the background::

    nohup python benchmarks/regimes.py --doc docs/regimes.md > benchmarks/results/regimes.log 2>&1 &

It prints the gain maps as tables and its wall time, writes a heat map (``--figure``), the raw results
(``--json``) and, with ``--doc``, the tables between the ``<!-- regimes-...:start/end -->`` markers of that page.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, replace_between_markers, write_json  # noqa: E402

from lightning_maxup.data.datasets import load_digits_split  # noqa: E402
from lightning_maxup.evaluation.paired import PairedDifference, paired_difference  # noqa: E402  (one place for them)
from lightning_maxup.recipes.regimes import (  # noqa: E402
    AUGMENTS,
    OPTIMIZERS,
    AugmentName,
    OptimizerName,
    Recipe,
    Regime,
    make_augment,
    set_threads,
    stratified_subset,
    train_regime,
    worst_of_k,
)

Split = tuple[Tensor, Tensor]
#: The confirmation stage's seeds start here, apart from the screen's (0, 1, ...).
CONFIRM_SEED0 = 1000


@dataclass
class Score:
    """One trained model's scores; ``test`` fields stay ``None`` until the final read."""

    regime: Regime
    seed: int
    val_acc: float
    val_wok: float
    view_agreement: float | None
    seconds: float
    test_acc: float | None = None
    test_wok: float | None = None


@dataclass
class Study:
    """Everything the study measured, by stage."""

    screen: list[Score] = field(default_factory=list)
    confirm: list[Score] = field(default_factory=list)
    models: dict[tuple[Regime, int], Any] = field(default_factory=dict)


def mean_of(scores: Sequence[Score], regime: Regime, metric: str) -> float:
    """Mean of ``metric`` over the seeds of ``regime``, in percent."""
    return 100 * statistics.mean(getattr(s, metric) for s in scores if s.regime == regime)


# ---------------------------------------------------------------------------------------------------------------
# Training and scoring
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What every stage shares: data, recipe, the worst-of-k k and a progress printer."""

    train: Split
    val: Split
    test: Split
    recipe: Recipe
    k: int
    log: Callable[[str], None]


def _score(setup: Setup, regime: Regime, seed: int, study: Study, keep: bool) -> Score:
    start = time.perf_counter()
    trained = train_regime(regime, seed, *setup.train, setup.recipe)
    seconds = time.perf_counter() - start
    x, y = setup.val
    val_acc = float((trained.model(x).argmax(dim=1) == y).float().mean())
    val_wok = worst_of_k(trained.model, x, y, make_augment(regime.augment), setup.k)
    if keep:
        study.models[(regime, seed)] = trained.model
    agreement = "" if trained.view_agreement is None else f", view agreement {100 * trained.view_agreement:.0f} %"
    setup.log(
        f"  {regime.label:38s} seed {seed:3d}: val {100 * val_acc:5.1f} %, worst-of-{setup.k} {100 * val_wok:5.1f} %"
        f"{agreement} ({seconds:.1f} s)"
    )
    return Score(regime, seed, val_acc, val_wok, trained.view_agreement, seconds)


def screen_cells(
    augments: Sequence[AugmentName],
    optimizers: Sequence[OptimizerName],
    ms: Sequence[int],
    views: Sequence[int | None],
    temperatures: Sequence[float | None],
) -> list[Regime]:
    """The screened grid: each (augmentation, optimiser)'s baseline, then its MaxUp cells."""
    cells = []
    for aug, opt in itertools.product(augments, optimizers):
        cells.append(Regime(aug, 1, opt))
        for m, view, tau in itertools.product([m for m in ms if m > 1], views, temperatures):
            cells.append(Regime(aug, m, opt, selection_size=view, temperature=tau))
    return cells


def run_stage(setup: Setup, cells: Sequence[Regime], seeds: Sequence[int], study: Study, *, keep: bool) -> list[Score]:
    """Train and score every cell on every seed, seeds outermost (a cut-short run still pairs every cell)."""
    scores = []
    start = time.perf_counter()
    for seed in seeds:
        setup.log(f" seed {seed} ({time.perf_counter() - start:.0f} s into the stage)")
        for regime in cells:
            scores.append(_score(setup, regime, seed, study, keep))
    return scores


def choose(screen: Sequence[Score], optimizers: Sequence[OptimizerName], sweep: Sequence[float]) -> list[Regime]:
    """The confirmed cells, chosen on the screen's validation gains (see the module docstring)."""
    maxup = list(dict.fromkeys(s.regime for s in screen if s.regime.m > 1))
    gains = {r: g.mean for r in maxup if (g := paired_difference(screen, r, "val_acc")) is not None}
    chosen: list[Regime] = []
    for opt in optimizers:
        mine = sorted((r for r in gains if r.optimizer == opt), key=gains.__getitem__)
        if mine:
            chosen += [mine[-1], mine[0]]
    if gains:
        ranked = sorted(gains, key=gains.__getitem__)
        for end in (ranked[-1], ranked[0]):
            for tau in (None, *sweep):
                chosen.append(Regime(end.augment, end.m, end.optimizer, end.selection_size, tau))
    chosen = list(dict.fromkeys(chosen))
    return list(dict.fromkeys([r.baseline for r in chosen] + chosen))


def read_test(setup: Setup, study: Study) -> None:
    """The one read of the test split: every kept (confirmed) model."""
    x, y = setup.test
    for score in study.confirm:
        model = study.models[(score.regime, score.seed)]
        score.test_acc = float((model(x).argmax(dim=1) == y).float().mean())
        score.test_wok = worst_of_k(model, x, y, make_augment(score.regime.augment), setup.k)


# ---------------------------------------------------------------------------------------------------------------
# Tables and figure
# ---------------------------------------------------------------------------------------------------------------
def _row(r: Regime) -> str:
    return f"{r.augment}, {'SGD' if r.optimizer == 'sgd' else 'Adam'}"


def _column(r: Regime) -> str:
    view = "half" if r.selection_size is not None else "full"
    rule = "max" if r.temperature is None else f"τ={r.temperature:g}"
    return f"m={r.m} {view} {rule}"


def gain_map(scores: Sequence[Score], metric: str) -> tuple[list[str], list[str], list[list[PairedDifference | None]]]:
    """Rows (augmentation, optimiser), columns (m, view, rule) and the gain of each cell."""
    regimes = list(dict.fromkeys(s.regime for s in scores))
    rows = list(dict.fromkeys(_row(r) for r in regimes))
    columns = list(dict.fromkeys(_column(r) for r in regimes if r.m > 1))
    grid: list[list[PairedDifference | None]] = [[None] * len(columns) for _ in rows]
    for r in regimes:
        if r.m > 1:
            row = rows.index(_row(r))
            grid[row][columns.index(_column(r))] = paired_difference(scores, r, metric)
    return rows, columns, grid


def gain_table(scores: Sequence[Score], metric: str, base_metric: str) -> str:
    """Markdown gain map: one row per (augmentation, optimiser) with its baseline's mean, one column per cell."""
    rows, columns, grid = gain_map(scores, metric)
    baselines = {_row(s.regime): s.regime for s in scores if s.regime.m == 1}
    body = []
    for name, cells in zip(rows, grid, strict=True):
        base = f"{mean_of(scores, baselines[name], base_metric):.1f}" if name in baselines else "—"
        body.append([name, base, *[c.cell() if c else "—" for c in cells]])
    return markdown_table(["augmentation, optimiser", "m=1 (%)", *columns], body)


def confirm_table(scores: Sequence[Score], split: str) -> str:
    """Markdown table of the confirmed cells on ``split`` (``val`` or ``test``): accuracies and both gains."""
    acc, wok = f"{split}_acc", f"{split}_wok"
    body = []
    for r in dict.fromkeys(s.regime for s in scores if s.regime.m > 1):
        g, w = paired_difference(scores, r, acc), paired_difference(scores, r, wok)
        agreement = [s.view_agreement for s in scores if s.regime == r and s.view_agreement is not None]
        body.append([
            r.label, f"{mean_of(scores, r.baseline, acc):.2f}", f"{mean_of(scores, r, acc):.2f}",
            g.cell() if g else "—", w.cell() if w else "—",
            f"{100 * statistics.mean(agreement):.1f} % ({100 / r.m:.1f} %)" if agreement else "—",
        ])  # fmt: skip
    headers = ["cell", "m=1 acc (%)", "MaxUp acc (%)", "gain, clean (pts)", "gain, worst-of-k (pts)"]
    headers.append("view agrees (chance)")
    return markdown_table(headers, body)


def plot(scores: Sequence[Score], path: Path, title: str) -> Path:
    """Heat maps of the screened gain (clean and worst-of-k), each cell annotated with its mean and interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_acc", "clean validation accuracy"), ("val_wok", "worst-of-k validation accuracy")]
    rows, columns, _ = gain_map(scores, "val_acc")
    fig, axes = plt.subplots(2, 1, figsize=(3 + 1.05 * len(columns), 4 + 0.6 * len(rows)), squeeze=False)
    try:
        for ax, (metric, name) in zip(axes[:, 0], panels, strict=True):
            _, _, grid = gain_map(scores, metric)
            values = torch.tensor([[c.mean if c else float("nan") for c in row] for row in grid])
            finite = values[values.isfinite()]
            limit = float(finite.abs().max()) if finite.numel() else 1.0
            image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            for i, row in enumerate(grid):
                for j, c in enumerate(row):
                    if c is not None:
                        half = "" if c.half != c.half else f"\n±{c.half:.1f}"
                        colour = "white" if abs(c.mean) > 0.6 * limit else "black"
                        ax.text(j, i, f"{c.mean:+.1f}{half}", ha="center", va="center", fontsize=7, color=colour)
            ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_title(f"MaxUp - ordinary, {name} (points)", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _views(names: Sequence[str]) -> list[int | None]:
    return [None if v == "full" else 4 for v in names]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--screen-seeds", type=int, default=4, help="seeds of the screen (default 4)")
    p.add_argument("--confirm-seeds", type=int, default=12, help="fresh seeds of the confirmation (default 12)")
    p.add_argument("--augments", nargs="+", default=list(AUGMENTS), choices=AUGMENTS)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--ms", type=int, nargs="+", default=[2, 4, 8], help="MaxUp copies per sample (default 2 4 8)")
    p.add_argument("--views", nargs="+", default=["full", "half"], choices=["full", "half"])
    p.add_argument("--temperature", type=float, default=0.1, help="screened selection temperature (default 0.1)")
    p.add_argument(
        "--sweep", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="temperatures of the confirmed dial"
    )
    p.add_argument("--k", type=int, default=8, help="copies of worst-of-k accuracy (default 8)")
    p.add_argument("--per-class", type=int, default=20, help="training images per class (default 20)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="MaxUp warm-up epochs (default 5)")
    p.add_argument("--width", type=int, default=8, help="SmallCNN width (default 8)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/regimes.json"))
    p.add_argument("--figure", type=Path, default=Path("docs/images/regimes.png"))
    p.add_argument("--doc", type=Path, default=None, help="page whose regimes-... markers receive the tables")
    p.add_argument(
        "--from-json", type=Path, default=None, help="redraw the tables and figure of a saved run (no training)"
    )
    return p


def _setup(args: argparse.Namespace) -> Setup:
    train, val, test = load_digits_split(0)
    subset = stratified_subset(train[1], args.per_class)
    recipe = Recipe(per_class=args.per_class, width=args.width, epochs=args.epochs, warmup=args.warmup)
    return Setup((train[0][subset], train[1][subset]), val, test, recipe, args.k, lambda line: print(line, flush=True))


def load(path: Path) -> Study:
    """The scores of a run saved with ``--json``: seeds from ``CONFIRM_SEED0`` on are the confirmation's."""
    study = Study()
    for raw in json.loads(path.read_text())["scores"]:
        score = Score(**{**raw, "regime": Regime(**raw["regime"])})
        (study.confirm if score.seed >= CONFIRM_SEED0 else study.screen).append(score)
    return study


def _tables(study: Study) -> dict[str, str]:
    return {
        "regimes-screen-clean": gain_table(study.screen, "val_acc", "val_acc"),
        "regimes-screen-wok": gain_table(study.screen, "val_wok", "val_wok"),
        "regimes-confirm": confirm_table(study.confirm, "val"),
        "regimes-test": confirm_table(study.confirm, "test"),
    }


def _redraw(args: argparse.Namespace) -> int:
    study = load(args.from_json)
    tables = _tables(study)
    for name, text in tables.items():
        print(f"\n{name}\n\n{text}")
        if args.doc is not None:
            replace_between_markers(args.doc, name, text)
    seeds = len({s.seed for s in study.screen})
    print(f"\nwrote {plot(study.screen, args.figure, f'Screen on validation, {seeds} seeds ({args.from_json.name})')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the study; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.from_json is not None:
        return _redraw(args)
    start = time.perf_counter()
    threads = set_threads(args.threads)
    env = environment("cpu")
    print(f"torch threads: {threads} intra-op, {torch.get_num_interop_threads()} inter-op; load {os.getloadavg()}")
    setup = _setup(args)
    study, seconds = Study(), {}
    cells = screen_cells(args.augments, args.optimizers, args.ms, _views(args.views), [None, args.temperature])
    print(f"1. screen on validation: {len(cells)} cells x {args.screen_seeds} seeds", flush=True)
    study.screen = run_stage(setup, cells, range(args.screen_seeds), study, keep=False)
    seconds["screen"] = time.perf_counter() - start
    chosen = choose(study.screen, args.optimizers, args.sweep)
    print(f"2. confirm on validation: {len(chosen)} cells chosen on the screen x {args.confirm_seeds} fresh seeds")
    for regime in chosen:
        print(f"   {regime.label}")
    confirm_seeds = range(CONFIRM_SEED0, CONFIRM_SEED0 + args.confirm_seeds)
    study.confirm = run_stage(setup, chosen, confirm_seeds, study, keep=True)
    seconds["confirm"] = time.perf_counter() - start - seconds["screen"]
    read_test(setup, study)  # the only read of the test split, after every choice was made
    wall = time.perf_counter() - start
    rec = setup.recipe
    what = (
        f"SmallCNN width {rec.width}, {10 * rec.per_class} training digits, {rec.epochs} epochs, batch"
        f" {rec.batch_size}, warm-up {rec.warmup}; gain = MaxUp - ordinary (m=1) at the same seed, points,"
        " mean ± 95 % t half-width (seeds where MaxUp won / seeds)"
    )
    tables = _tables(study)
    footer = (
        f"wall time {wall:.0f} s (screen {seconds['screen']:.0f} s, confirmation {seconds['confirm']:.0f} s),"
        f" {threads} torch thread, load average at the end {os.getloadavg()[0]:.1f}, {env['cpu']}"
    )
    tables["regimes-run"] = f"{what}.\n\n{footer}"
    for name, heading in (
        ("regimes-screen-clean", f"Screen, clean validation accuracy gain ({args.screen_seeds} seeds)"),
        ("regimes-screen-wok", f"Screen, worst-of-{args.k} validation accuracy gain ({args.screen_seeds} seeds)"),
        ("regimes-confirm", f"Confirmed cells, validation ({args.confirm_seeds} fresh seeds)"),
        ("regimes-test", f"Confirmed cells, test split read once ({args.confirm_seeds} seeds)"),
    ):
        print(f"\n{heading}\n\n{tables[name]}")
    png = plot(study.screen, args.figure, f"Screen on validation: {what.split(';')[0]}, {args.screen_seeds} seeds")
    scores = [{**asdict(s), "regime": asdict(s.regime)} for s in [*study.screen, *study.confirm]]
    write_json(args.json, {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "scores": scores})
    if args.doc is not None:
        for name, text in tables.items():
            replace_between_markers(args.doc, name, text)
    print(f"\nwrote {png} and {args.json}\n{footer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
