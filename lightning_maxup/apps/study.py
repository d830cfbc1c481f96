"""Is MaxUp worth it on my data? A paired-by-seed study of any LightningCLI config (``lightning-maxup study``).

``lightning-maxup study --config my.yaml --m 1,2,4 --seeds 0,1,2,3 --out DIR`` trains the config's own
:class:`~lightning_maxup.MaxUpMixin` model once per *cell* (a combination of the swept options: ``m``, and
optionally ``selection_temperature`` and ``selection_size``) and seed. ``m = 1`` is ordinary augmentation, the
baseline of every cell.

**Paired by seed.** A fit at seed ``s`` sets ``seed_everything(s)`` (the initial weights), the MaxUp augmentation
stream's ``seed`` to ``s``, and, when the DataModule takes a ``seed`` argument (as
:class:`~lightning_maxup.recipes.datamodules.DigitsDataModule` does for its shuffle), that too (the batch order). A
loader that
shuffles from the global generator draws its order after ``seed_everything`` and the selection pass restores the
global random state, so a MaxUp fit and its baseline at one seed are identical through the warm-up and differ only
in MaxUp after it. The paired differences ``MaxUp - baseline`` then cancel what the seed does to both.

**What is measured**, after the last epoch: the config's validation metric (the one a ``ModelCheckpoint`` or
``EarlyStopping`` monitors, or ``metric=``), from ``trainer.validate``, and worst-of-k accuracy
(:class:`~lightning_maxup.evaluation.worst_of_k.WorstOfKAccuracy`: all ``k`` copies of a validation sample, made with
the
training augmentation from a fixed seed, classified correctly; the same copies for every fit).

**Kill-safe and shardable.** Every finished fit appends one JSON line to ``DIR/results.jsonl``; a rerun skips the
fits already there, and an unreadable line (a write cut short) is ignored with a warning, so its fit runs again.
``shard=(i, n)`` runs every ``n``-th fit from ``i``: a job array runs one study on many machines into one shared
``DIR``. Each line is appended with a single ``write`` on a file opened with ``O_APPEND``: on a local POSIX
filesystem (ext4, xfs, tmpfs) the kernel then places every line whole at the end of the file, so concurrent shards
never interleave; network filesystems (NFS) do not promise ``O_APPEND`` across machines, so there give each shard
its own ``DIR`` and concatenate the ``results.jsonl`` files before reporting.

**Report.** ``DIR/report.md`` (also printed) has, per cell and metric, the paired difference with its 95 %
Student-t interval, the seeds on which MaxUp won, the estimated probability that MaxUp beats the baseline on a new
seed with a 95 % Wilson score interval (Bouthillier et al., "Accounting for Variance in Machine Learning
Benchmarks", MLSys 2021, recommend this probability of outperforming over a single mean; they bootstrap its
interval, the Wilson interval here is deterministic, so a report is a function of the results alone) and a verdict
in words; ``DIR/gain.png`` is a heat map of the paired differences. The report depends on the set of results only,
so shards merged in any order report what one unsharded run reports.

**Validation chooses, test confirms.** ``test=True`` picks the cells with the largest validation gain (in the
metric and in worst-of-k accuracy), scores their finished models and the baseline's, for every seed, once on the
test split (``DIR/test.jsonl``; a rerun reads them back rather than scoring again), and adds the paired test
differences to the report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_maxup._extras import require
from lightning_maxup.evaluation.paired import (  # the statistics live in the library; re-exported here (0.3 names)
    PairedDifference,
    compare_by_seed,
    paired_difference,
    paired_interval,
    wilson_interval,
)
from lightning_maxup.evaluation.worst_of_k import WorstOfKAccuracy
from lightning_maxup.training.callback import MaxUp
from lightning_maxup.training.mixin import MaxUpMixin

__all__ = [
    "GAIN_PLOT",
    "REPORT",
    "RESULTS",
    "SWEPT",
    "TEST_RESULTS",
    "Cell",
    "PairedDifference",
    "Plan",
    "Row",
    "StudyResult",
    "append_record",
    "build_cli",
    "check_writable",
    "choose_cells",
    "compare_by_seed",
    "fit_args",
    "format_report",
    "format_rows",
    "higher_is_better",
    "main",
    "make_cells",
    "monitored_metrics",
    "paired_difference",
    "paired_interval",
    "plan_fits",
    "plot_gains",
    "quiet_lightning",
    "read_records",
    "report_rows",
    "require_maxup_model",
    "run_fit",
    "run_study",
    "wilson_interval",
    "worst_of_k_score",
]

#: One JSON line per finished fit, in the study's folder.
RESULTS = "results.jsonl"
#: One JSON line per model scored on the test split (``--test``).
TEST_RESULTS = "test.jsonl"
#: The report, in markdown.
REPORT = "report.md"
#: The heat map of the paired differences.
GAIN_PLOT = "gain.png"
#: The MaxUp options a study sweeps besides ``m``, in the order of a cell's key, with their labels.
SWEPT = ("selection_temperature", "selection_size")


# ---------------------------------------------------------------------------------------------------------------
# Cells and the plan of fits
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One combination of the swept MaxUp options; ``m = 1`` is the baseline (ordinary augmentation).

    Args:
        m: Copies per sample.
        options: The other swept options as ``(name, value)`` pairs, in the order of :data:`SWEPT`; options not
            swept keep the config's value.

    Example:
        >>> cell = Cell(4, (("selection_temperature", 0.5), ("selection_size", None)))
        >>> cell.key, cell.label
        ('m=4,selection_temperature=0.5,selection_size=None', 'm=4, τ=0.5, full view')
        >>> cell.baseline.label, Cell.from_json(cell.to_json()) == cell
        ('m=1 (baseline)', True)
    """

    m: int
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def baseline(self) -> Cell:
        """The baseline of every cell: ``m = 1``."""
        return Cell(1)

    @property
    def key(self) -> str:
        """A stable text key, e.g. ``'m=4,selection_size=16'``."""
        return ",".join([f"m={self.m}", *(f"{k}={v}" for k, v in self.options)])

    @property
    def label(self) -> str:
        """Short description, e.g. ``'m=4, τ=0.5, 16 px view'``."""
        if self.m == 1:
            return "m=1 (baseline)"
        return ", ".join([f"m={self.m}", *(_option_label(k, v) for k, v in self.options)])

    @property
    def variant(self) -> str:
        """The label without ``m`` (a row of the heat map)."""
        return ", ".join(_option_label(k, v) for k, v in self.options) or "MaxUp"

    def overrides(self) -> dict[str, Any]:
        """The :class:`~lightning_maxup.MaxUpConfig` fields this cell sets."""
        return {"m": self.m, **dict(self.options)}

    def to_json(self) -> dict[str, Any]:
        """The cell as a JSON object (``{"m": 4, "selection_size": 16}``)."""
        return self.overrides()

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Cell:
        """The cell :meth:`to_json` wrote."""
        return cls(int(value["m"]), tuple((k, value[k]) for k in SWEPT if k in value))


def _option_label(name: str, value: Any) -> str:
    if name == "selection_temperature":
        return "arg-max" if value is None else f"τ={value:g}"
    return "full view" if value is None else f"{value} px view"


def make_cells(
    m: Sequence[int],
    temperature: Sequence[float | None] | None = None,
    selection_size: Sequence[int | None] | None = None,
) -> list[Cell]:
    """The baseline (``m = 1``) and every combination of the swept values with ``m > 1``.

    ``None`` for ``temperature`` or ``selection_size`` leaves that option as the config sets it.

    Example:
        >>> [c.label for c in make_cells([1, 2, 4], temperature=[None, 0.5])]
        ['m=1 (baseline)', 'm=2, arg-max', 'm=2, τ=0.5', 'm=4, arg-max', 'm=4, τ=0.5']
    """
    swept = zip(SWEPT, (temperature, selection_size), strict=True)
    axes = [[(name, v) for v in values] for name, values in swept if values is not None]
    cells = [Cell(1)]
    for mm in sorted(set(m) - {1}):
        cells += [Cell(mm, tuple(combo)) for combo in itertools.product(*axes)]
    return cells


def plan_fits(
    cells: Sequence[Cell], seeds: Sequence[int], shard: tuple[int, int] | None = None
) -> list[tuple[Cell, int]]:
    """The fits of a study, seed by seed (each seed's baseline first), or every ``n``-th from ``i`` of them.

    Seed-major order means a study stopped early has whole pairs for its first seeds.

    Example:
        >>> fits = plan_fits(make_cells([1, 4]), [0, 1])
        >>> [(c.m, s) for c, s in fits], [(c.m, s) for c, s in plan_fits(make_cells([1, 4]), [0, 1], (1, 2))]
        ([(1, 0), (4, 0), (1, 1), (4, 1)], [(4, 0), (4, 1)])
    """
    fits = [(cell, seed) for seed in seeds for cell in cells]
    if shard is None:
        return fits
    i, n = shard
    return fits[i::n]


# ---------------------------------------------------------------------------------------------------------------
# results.jsonl: one line per finished fit, appended whole
# ---------------------------------------------------------------------------------------------------------------
def append_record(path: Path, record: Mapping[str, Any]) -> None:
    r"""Append ``record`` as one JSON line with a single ``write`` (``O_APPEND``), then ``fsync``.

    If the file ends in a line cut short (a writer killed mid-write, a full disk), the new line starts on a line
    of its own, so only the cut line is lost.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> append_record(path, {"seed": 0}); append_record(path, {"seed": 1})
        >>> path.read_text()
        '{"seed": 0}\n{"seed": 1}\n'
    """
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size > 0 and not _ends_with_newline(path):
            line = b"\n" + line
        written = os.write(fd, line)
        while written < len(line):  # a regular file takes the whole line at once; only a full disk stops short
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    r"""The records of a ``results.jsonl`` and the number of unreadable lines (cut short), which are skipped.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> _ = path.write_text('{"seed": 0}\n{"seed": 1, "met')
        >>> read_records(path)
        ([{'seed': 0}], 1)
    """
    if not path.exists():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _by_fit(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """One record per (cell key, seed): the first written (a fit two shards both ran counts once)."""
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in records:
        out.setdefault((Cell.from_json(r["cell"]).key, int(r["seed"])), r)
    return out


# ---------------------------------------------------------------------------------------------------------------
# One fit
# ---------------------------------------------------------------------------------------------------------------
def _cli_class(namespace: Any) -> type:
    lightning_cli: Any = namespace.cli.LightningCLI

    class _StudyCLI(lightning_cli):
        """LightningCLI parsing the ``args`` it is given, without comparing them with ``sys.argv``."""

        def parse_arguments(self, parser: Any, args: Any) -> None:
            self.config = parser.parse_args(args)

    return _StudyCLI


def build_cli(args: Sequence[str]) -> Any:
    """A LightningCLI over ``args`` (``--config`` files and overrides), built and instantiated without running.

    Its ``model``, ``datamodule`` and ``trainer`` are what ``lightning-maxup fit`` would train with these ``args``.

    Raises:
        jsonargparse.ArgumentError: On a malformed or invalid configuration.

    Example:
        >>> with quiet_lightning():
        ...     cli = build_cli(["--config", "examples/configs/digits.yaml", "--trainer.logger=false"])
        >>> type(cli.model).__name__, cli.trainer.max_epochs
        ('MaxUpClassifier', 30)
    """
    import importlib

    from lightning_maxup._lightning import cli_namespace

    args = list(args)
    pl = cli_namespace(args)
    importlib.import_module(f"{pl.__name__}.cli")
    return _cli_class(pl)(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "prog": "lightning-maxup study"},
    )


def _takes_seed(datamodule: Any) -> bool:
    import inspect

    if datamodule is None:
        return False
    try:
        return "seed" in inspect.signature(type(datamodule)).parameters
    except (TypeError, ValueError):
        return False


def monitored_metrics(trainer: Any) -> dict[str, str]:
    """``{metric: "min" or "max"}`` of the trainer's ``ModelCheckpoint`` and ``EarlyStopping`` callbacks.

    Example:
        >>> from types import SimpleNamespace
        >>> monitored_metrics(SimpleNamespace(callbacks=[SimpleNamespace(monitor="val/acc", mode="max")]))
        {'val/acc': 'max'}
    """
    out: dict[str, str] = {}
    for cb in trainer.callbacks:
        monitor, mode = getattr(cb, "monitor", None), getattr(cb, "mode", None)
        if isinstance(monitor, str) and mode in ("min", "max"):
            out.setdefault(monitor, mode)
    return out


def higher_is_better(metric: str, monitors: Mapping[str, str]) -> bool:
    """The monitoring callback's ``mode`` for ``metric``; otherwise lower is better for names with ``loss``/``err``.

    Example:
        >>> higher_is_better("val/acc", {}), higher_is_better("val_loss", {})
        (True, False)
        >>> higher_is_better("val/x", {"val/x": "min"})
        False
    """
    if metric in monitors:
        return monitors[metric] == "max"
    return not any(word in metric.lower() for word in ("loss", "err"))


def require_maxup_model(model: Any, config: Any) -> MaxUpMixin:
    """``model`` if it is a :class:`~lightning_maxup.MaxUpMixin` module, else a ``TypeError`` naming the config.

    Example:
        >>> require_maxup_model(torch.nn.Linear(2, 2), "my.yaml")
        Traceback (most recent call last):
        ...
        TypeError: The model of `--config` my.yaml is Linear, not a MaxUpMixin module: a study compares MaxUp ...
    """
    if not isinstance(model, MaxUpMixin):
        raise TypeError(
            f"The model of `--config` {config} is {type(model).__name__}, not a MaxUpMixin module: a study compares"
            " MaxUp with ordinary augmentation on the config's own model, so its class must subclass"
            " lightning_maxup.MaxUpMixin (for example lightning_maxup.recipes.models.MaxUpClassifier)"
        )
    return model


def _apply_cell(cli: Any, cell: Cell, seed: int) -> MaxUpMixin:
    """Set the cell's options and the seed's augmentation stream on the model; the MaxUp callback keeps the rest."""
    model: Any = cli.model
    swept = {**cell.overrides(), "seed": seed}
    model.maxup_config = model.maxup_config.replace(**swept)
    for cb in cli.trainer.callbacks:
        if isinstance(cb, MaxUp):  # its overrides would replace the cell's at setup
            cb.overrides = {k: v for k, v in cb.overrides.items() if k not in swept}
    return model  # type: ignore[no-any-return]


def fit_args(config: str | Path, overrides: Sequence[str], seed: int, root: Path, data_seed: bool) -> list[str]:
    """The LightningCLI arguments of one fit: the config and overrides, the seed, a quiet trainer writing in ``root``.

    Example:
        >>> fit_args("my.yaml", [], 3, Path("out"), data_seed=True)[:3]
        ['--config', 'my.yaml', '--seed_everything=3']
    """
    args = ["--config", str(config), f"--seed_everything={seed}", *overrides]
    args += [
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if data_seed:
        args.append(f"--data.init_args.seed={seed}")
    return args


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the Trainer's per-fit banners and the warnings that say nothing about the study.

    Example:
        >>> with quiet_lightning():
        ...     logging.getLogger("pytorch_lightning").level == logging.WARNING
        True
    """
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


@torch.no_grad()
def worst_of_k_score(model: Any, loader: Any, augment: Any, k: int, seed: int = 0) -> float:
    """Worst-of-``k`` accuracy of ``model`` over ``loader``'s ``(inputs, target, ...)`` batches, in eval mode.

    :class:`~lightning_maxup.evaluation.worst_of_k.WorstOfKAccuracy` seeded with ``seed``: every model scored over the
    same
    loader sees the same ``k`` copies of each sample.

    Example:
        >>> from lightning_maxup.augment import GaussianNoise
        >>> net = torch.nn.Linear(4, 3)
        >>> net.device = torch.device("cpu")
        >>> loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> 0.0 <= worst_of_k_score(net, loader, GaussianNoise(0.1), k=4) <= 1.0
        True
    """
    metric = WorstOfKAccuracy(augment, k=k, seed=seed).to(model.device)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            metric.update(model, batch[0].to(model.device), batch[1].to(model.device))
    finally:
        model.train(was_training)
    return float(metric.compute())


def _score(trainer: Any, model: Any, datamodule: Any, k: int, stage: str) -> dict[str, float]:
    """Every metric ``trainer.validate`` (or ``test``) logs, and worst-of-k on the same split."""
    run = trainer.validate if stage == "validate" else trainer.test
    logged = run(model, datamodule=datamodule, verbose=False)
    values = {name: float(v) for name, v in (logged[0] if logged else {}).items()}
    augment = model.maxup_config.augment
    loader = _first_loader(trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders)
    if k > 0 and augment is not None and loader is not None:
        values[f"worst-of-{k}"] = worst_of_k_score(model, loader, augment, k)
    return values


def _versions() -> dict[str, str]:
    import lightning_maxup
    from lightning_maxup._lightning import pl

    return {"lightning_maxup": lightning_maxup.__version__, "torch": torch.__version__, pl.__name__: pl.__version__}


@dataclass(frozen=True)
class Plan:
    """What every fit of a study shares: the config, its overrides, ``k`` and the output folder.

    Args:
        config: The LightningCLI YAML.
        out: The study's folder.
        overrides: Further LightningCLI arguments (``--trainer.max_epochs=10``) applied to every fit.
        worst_of_k: Copies of worst-of-k accuracy (0: not measured).
        data_seed: Set the DataModule's ``seed`` argument to each fit's seed (its batch order).
    """

    config: Path
    out: Path
    overrides: tuple[str, ...] = ()
    worst_of_k: int = 8
    data_seed: bool = False

    @property
    def fingerprint(self) -> str:
        """A digest of what makes two studies' fits comparable: the config's text, the overrides and ``k``."""
        text = json.dumps([self.config.read_text(encoding="utf-8"), list(self.overrides), self.worst_of_k])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fit_dir(self, cell: Cell, seed: int) -> Path:
        """Where the fit of ``cell`` at ``seed`` writes its logs and final weights."""
        slug = cell.key.replace("=", "").replace(",", "_")
        return self.out / "fits" / slug / f"seed-{seed}"

    def build(self, cell: Cell, seed: int) -> Any:
        """The LightningCLI of one fit, its model set to ``cell`` and ``seed`` (see the module docstring)."""
        cli = build_cli(fit_args(self.config, self.overrides, seed, self.fit_dir(cell, seed), self.data_seed))
        require_maxup_model(cli.model, self.config)
        _apply_cell(cli, cell, seed)
        return cli


def run_fit(plan: Plan, cell: Cell, seed: int, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Fit ``cell`` at ``seed``, score it on the validation split, keep its final weights; return its record.

    ``callbacks`` are added to the trainer's (a test watches the warm-up this way).

    Example:
        >>> plan = Plan(Path("examples/configs/digits.yaml"), Path("study"), ("--trainer.max_epochs=1",))
        >>> plan.fit_dir(Cell(4), 0).as_posix()  # run_fit(plan, Cell(4), 0) trains here and returns its record
        'study/fits/m4/seed-0'
    """
    start = time.perf_counter()
    cli = plan.build(cell, seed)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = _score(cli.trainer, cli.model, cli.datamodule, plan.worst_of_k, "validate")
    weights = plan.fit_dir(cell, seed) / "model.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cli.model.state_dict(), weights)
    return {
        "cell": cell.to_json(),
        "seed": seed,
        "metrics": metrics,
        "monitors": monitored_metrics(cli.trainer),
        "wall_s": round(time.perf_counter() - start, 3),
        "weights": str(weights.relative_to(plan.out)),
        "study": plan.fingerprint,
        "versions": _versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _test_fit(plan: Plan, cell: Cell, seed: int, weights: Path) -> dict[str, Any]:
    cli = plan.build(cell, seed)
    cli.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    try:
        metrics = _score(cli.trainer, cli.model, cli.datamodule, plan.worst_of_k, "test")
    except Exception as err:  # Lightning raises its MisconfigurationException without a test split
        if "test_dataloader" in str(err) or "test_step" in str(err):
            raise ValueError(f"`--test`: the data of `--config` {plan.config} has no test split: {err}") from err
        raise
    return {"cell": cell.to_json(), "seed": seed, "metrics": metrics, "study": plan.fingerprint}


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One line of the report: a cell's paired difference in one metric."""

    cell: Cell
    metric: str
    scale: float
    baseline: float
    maxup: float
    difference: PairedDifference
    seconds: tuple[float, float] = (float("nan"), float("nan"))


def _scale(metric: str) -> float:
    """Accuracies (names with ``acc`` and worst-of-k) are reported in points, other metrics as logged."""
    return 100.0 if "acc" in metric.lower() or metric.startswith("worst-of-") else 1.0


def _values(fits: Mapping[tuple[str, int], Mapping[str, Any]], cell: Cell, metric: str) -> dict[int, float]:
    return {
        seed: float(r["metrics"][metric])
        for (key, seed), r in fits.items()
        if key == cell.key and metric in r["metrics"]
    }


def report_rows(
    records: Sequence[Mapping[str, Any]], cells: Sequence[Cell], metrics: Sequence[str], monitors: Mapping[str, str]
) -> list[Row]:
    """Per MaxUp cell and metric, the paired difference with the baseline over the seeds both have.

    Example:
        >>> cells = make_cells([1, 2])
        >>> records = [
        ...     {"cell": c.to_json(), "seed": s, "metrics": {"val/acc": 0.9 + 0.01 * s * (c.m - 1)}}
        ...     for c in cells for s in range(3)
        ... ]
        >>> row = report_rows(records, cells, ["val/acc"], {})[0]
        >>> row.cell.label, str(row.difference), row.difference.wins, row.difference.ties
        ('m=2', '+1.00 ± 2.48', 2, 1)
        >>> format_rows([row], cost=False).splitlines()[-1].split(" | ")[5:]
        ['+1.00 ± 2.48 points', '2 of 3 (1 tie)', '0.83 [0.31, 0.98]', 'no difference shown |']
        >>> choose_cells(records, cells, "val/acc", worst_of_k=0)
        [(Cell(m=2, options=()), 'largest mean validation gain in val/acc (+1.00 points, no difference shown)')]
        >>> "| m=2 | val/acc | 3 |" in format_report(records, cells, [0, 1, 2], "val/acc", worst_of_k=0)
        True
    """
    fits = _by_fit(records)
    rows = []
    for cell in (c for c in cells if c.m > 1):
        for metric in metrics:
            treated, base = _values(fits, cell, metric), _values(fits, cell.baseline, metric)
            scale = _scale(metric)
            diff = compare_by_seed(treated, base, scale, higher_is_better(metric, monitors))
            if diff is None:
                continue
            shared = [s for s in treated if s in base]
            seconds = tuple(
                statistics.mean(float(fits[(c.key, s)].get("wall_s", float("nan"))) for s in shared)
                for c in (cell.baseline, cell)
            )
            rows.append(
                Row(
                    cell, metric, scale, statistics.mean(scale * base[s] for s in shared),
                    statistics.mean(scale * treated[s] for s in shared), diff, seconds,  # type: ignore[arg-type]
                )
            )  # fmt: skip
    return rows


def _num(value: float, scale: float, sign: bool = False) -> str:
    digits = 2 if scale != 1.0 else 4
    return f"{value:{'+' if sign else ''}.{digits}f}"


def format_rows(rows: Sequence[Row], cost: bool = True) -> str:
    """The report's markdown table (``cost``: a column of mean seconds per fit, baseline and MaxUp).

    Example:
        >>> format_rows([]).splitlines()[1]
        '|---|---|---|---|---|---|---|---|---|---|'
    """
    head = (
        "| cell | metric | seeds | baseline | MaxUp | MaxUp − baseline (95 % t-interval) | MaxUp better on"
        " | P(MaxUp better on a new seed) (95 % Wilson) | verdict |"
    )
    lines = [head + (" s / fit (baseline, MaxUp) |" if cost else ""), "|---" * (9 + cost) + "|"]
    for r in rows:
        d = r.difference
        half = "n/a" if d.half != d.half else _num(d.half, r.scale)
        low, high = d.probability_interval
        unit = " points" if r.scale != 1.0 else ""
        line = (
            f"| {r.cell.label} | {r.metric} | {d.seeds} | {_num(r.baseline, r.scale)} | {_num(r.maxup, r.scale)}"
            f" | {_num(d.mean, r.scale, sign=True)} ± {half}{unit} | {d.wins} of {d.seeds}{_ties(d)}"
            f" | {d.probability:.2f} [{low:.2f}, {high:.2f}] | {d.verdict} |"
        )
        if cost:
            line += f" {r.seconds[0]:.1f} s, {r.seconds[1]:.1f} s |"
        lines.append(line)
    return "\n".join(lines)


def _ties(d: PairedDifference) -> str:
    return f" ({d.ties} tie{'s' if d.ties > 1 else ''})" if d.ties else ""


def _missing(cells: Sequence[Cell], seeds: Sequence[int], fits: Mapping[tuple[str, int], Any]) -> list[str]:
    return [f"{c.label} seed {s}" for c, s in plan_fits(cells, seeds) if (c.key, s) not in fits]


def format_report(
    records: Sequence[Mapping[str, Any]],
    cells: Sequence[Cell],
    seeds: Sequence[int],
    metric: str,
    worst_of_k: int,
    title: str = "MaxUp study",
    test_records: Sequence[Mapping[str, Any]] = (),
    chosen: Sequence[tuple[Cell, str]] = (),
) -> str:
    """The markdown report: a function of the records alone, so merged shards report what one run reports.

    Example:
        >>> format_report([], make_cells([1, 2]), [0, 1], "val/acc", 8).splitlines()[0]
        '# MaxUp study'
    """
    fits = _by_fit(records)
    monitors: dict[str, str] = {}
    for r in records:
        monitors.update(r.get("monitors") or {})
    metrics = [metric] + ([f"worst-of-{worst_of_k}"] if worst_of_k > 0 else [])
    better = "higher" if higher_is_better(metric, monitors) else "lower"
    lines = [
        f"# {title}",
        "",
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); MaxUp − baseline (m = 1) paired by seed, on the"
        f" validation split after the last epoch: `{metric}` ({better} is better) and worst-of-{worst_of_k}"
        f" accuracy (all {worst_of_k} copies made with the training augmentation classified correctly);"
        " accuracies in points. Interval: 95 % Student t over the seeds. P(better): share of seeds MaxUp won"
        " (ties count half), with a 95 % Wilson score interval (Bouthillier et al., MLSys 2021).",
        "",
        format_rows(report_rows(records, cells, metrics, monitors)),
    ]
    missing = _missing(cells, seeds, fits)
    if missing:
        lines += ["", f"Not finished yet ({len(missing)} fits): {', '.join(missing)}."]
    if chosen:
        lines += ["", *_test_section(test_records, cells, metric, worst_of_k, monitors, chosen)]
    return "\n".join(lines) + "\n"


def _test_metric(metric: str) -> str:
    return metric.replace("val", "test", 1) if "val" in metric else metric


def _test_section(
    test_records: Sequence[Mapping[str, Any]],
    cells: Sequence[Cell],
    metric: str,
    worst_of_k: int,
    monitors: Mapping[str, str],
    chosen: Sequence[tuple[Cell, str]],
) -> list[str]:
    test_monitors = {_test_metric(k): v for k, v in monitors.items()}
    metrics = [_test_metric(metric)] + ([f"worst-of-{worst_of_k}"] if worst_of_k > 0 else [])
    rows = report_rows(test_records, [c for c, _ in chosen], metrics, test_monitors)
    return [
        "## Test split: validation chose, test confirms",
        "",
        *(f"- {cell.label}: {why}." for cell, why in chosen),
        "",
        "Their final models and the baseline's, every seed scored once on the test split:",
        "",
        format_rows(rows, cost=False),
    ]


def choose_cells(
    records: Sequence[Mapping[str, Any]], cells: Sequence[Cell], metric: str, worst_of_k: int
) -> list[tuple[Cell, str]]:
    """The cells with the largest validation gain in ``metric`` and in worst-of-k accuracy, with the reason.

    Example:
        >>> choose_cells([], make_cells([1, 2]), "val/acc", 8)
        []
    """
    monitors: dict[str, str] = {}
    for r in records:
        monitors.update(r.get("monitors") or {})
    metrics = [metric] + ([f"worst-of-{worst_of_k}"] if worst_of_k > 0 else [])
    chosen: dict[Cell, list[str]] = {}
    for name in metrics:
        rows = report_rows(records, cells, [name], monitors)
        if not rows:
            continue
        sign = 1.0 if higher_is_better(name, monitors) else -1.0
        best = max(rows, key=lambda r: sign * r.difference.mean)
        chosen.setdefault(best.cell, []).append(
            f"largest mean validation gain in {name} ({_num(best.difference.mean, best.scale, sign=True)}"
            f"{' points' if best.scale != 1.0 else ''}, {best.difference.verdict})"
        )
    return [(cell, "; ".join(why)) for cell, why in chosen.items()]


def plot_gains(
    records: Sequence[Mapping[str, Any]], cells: Sequence[Cell], metric: str, worst_of_k: int, path: Path
) -> Path | None:
    """Heat map of the paired differences (rows: the swept options, columns: ``m``), one panel per metric.

    Returns ``None`` (and draws nothing) when there is no MaxUp cell.

    Example:
        >>> plot_gains([], [Cell(1)], "val/acc", 8, Path("gain.png")) is None
        True
    """
    matplotlib = require("matplotlib", "plot_gains", "study")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitors: dict[str, str] = {}
    for r in records:
        monitors.update(r.get("monitors") or {})
    metrics = [metric] + ([f"worst-of-{worst_of_k}"] if worst_of_k > 0 else [])
    variants = list(dict.fromkeys(c.variant for c in cells if c.m > 1))
    ms = sorted({c.m for c in cells if c.m > 1})
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.2 + 2.2 * len(ms) * len(metrics), 1.4 + 0.9 * len(variants)))
    try:
        for ax, name in zip(list(axes) if len(metrics) > 1 else [axes], metrics, strict=True):
            _heat_panel(ax, report_rows(records, cells, [name], monitors), name, variants, ms, monitors)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _heat_panel(
    ax: Any, rows: Sequence[Row], metric: str, variants: list[str], ms: list[int], monitors: Mapping[str, str]
) -> None:
    import numpy as np

    sign = 1.0 if higher_is_better(metric, monitors) else -1.0
    gain = np.full((len(variants), len(ms)), np.nan)
    limit = 0.0  # the colour scale spans the widest interval, so a gain well inside the noise stays pale
    for r in rows:
        d = r.difference
        i, j = variants.index(r.cell.variant), ms.index(r.cell.m)
        gain[i, j] = sign * d.mean
        limit = max(limit, abs(d.mean) + (0.0 if d.half != d.half else d.half))
        half = "n/a" if d.half != d.half else _num(d.half, r.scale)
        text = f"{_num(d.mean, r.scale, sign=True)} ± {half}\nwon {d.wins}/{d.seeds}\n{d.verdict}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    image = ax.imshow(gain, cmap="RdYlGn", vmin=-(limit or 1.0), vmax=limit or 1.0, aspect="auto")
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="green: MaxUp better")
    ax.set_xticks(range(len(ms)), [f"m={m}" for m in ms])
    ax.set_yticks(range(len(variants)), variants)
    unit = " (points)" if _scale(metric) != 1.0 else ""
    ax.set_title(f"{metric}: MaxUp − baseline{unit}\nmean ± 95 % t half-width over seeds", fontsize=9)


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """What :func:`run_study` did and found.

    Attributes:
        records: Every fit's record in ``results.jsonl`` (this study's), one per fit.
        report: The report's markdown (also in ``out/report.md`` when written).
        ran: The fits this call ran, as ``(cell, seed)``.
        complete: Whether every fit of the study is in ``records``.
        chosen: The cells ``test`` chose on validation, with the reason.
    """

    records: list[dict[str, Any]]
    report: str
    ran: list[tuple[Cell, int]] = field(default_factory=list)
    complete: bool = False
    chosen: list[tuple[Cell, str]] = field(default_factory=list)


def _check_options(m: Sequence[int], seeds: Sequence[int], worst_of_k: int, shard: tuple[int, int] | None) -> None:
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in m):
        raise ValueError(f"Expected `m` to hold positive integers, got {list(m)}")
    if 1 not in m:
        raise ValueError(
            f"Expected `m` to include 1, the baseline every MaxUp cell is compared with (ordinary augmentation), got"
            f" {list(m)}"
        )
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"Expected `seeds` to hold at least 2 distinct seeds (an interval needs 2 paired differences), got"
            f" {list(seeds)}"
        )
    if isinstance(worst_of_k, bool) or not isinstance(worst_of_k, int) or worst_of_k < 0:
        raise ValueError(f"Expected `worst_of_k` to be a non-negative integer, got {worst_of_k!r}")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"Expected `shard` to be (i, n) with 0 <= i < n, got {shard!r}")


def check_writable(out: Path) -> None:
    """Create ``out`` and check a file can be written in it; raise ``ValueError`` naming it otherwise.

    Example:
        >>> import tempfile
        >>> check_writable(Path(tempfile.mkdtemp()) / "study")
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"Expected `out` to be a writable folder, got {str(out)!r}: {err}") from err


def _resolve_metric(cli: Any, metric: str | None, config: Path) -> str:
    if metric is not None:
        return metric
    monitors = monitored_metrics(cli.trainer)
    if not monitors:
        raise ValueError(
            f"`--config` {config} monitors no metric (no ModelCheckpoint or EarlyStopping with `monitor`): pass the"
            " validation metric to compare with `--metric NAME` (e.g. `--metric val/acc`)"
        )
    return next(iter(monitors))


def _write_report(plan: Plan, result: StudyResult, cells: Sequence[Cell], metric: str, progress: Any) -> None:
    report_path = plan.out / REPORT
    tmp = report_path.with_suffix(f".{os.getpid()}.tmp")  # shards finishing together each replace it whole
    tmp.write_text(result.report, encoding="utf-8")
    os.replace(tmp, report_path)
    png_path = plan.out / GAIN_PLOT
    png = plot_gains(result.records, cells, metric, plan.worst_of_k, png_path.with_suffix(f".{os.getpid()}.png"))
    if png is not None:
        os.replace(png, png_path)
    progress(f"wrote {report_path}" + (f" and {png_path}" if png is not None else ""))


def _load(plan: Plan, progress: Any) -> list[dict[str, Any]]:
    records, bad = read_records(plan.out / RESULTS)
    if bad:
        progress(f"{plan.out / RESULTS}: ignored {bad} unreadable line(s) (a write cut short); those fits run again")
    other = {r.get("study") for r in records} - {plan.fingerprint}
    if other:
        raise ValueError(
            f"`out` {str(plan.out)!r} holds fits of another study (another config text, overrides or worst-of-k):"
            " use another folder, or the same config and options"
        )
    return records


def _eta(done: list[float], left: int) -> str:
    seconds = statistics.mean(done) * left
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _format_fit(cell: Cell, seed: int, record: Mapping[str, Any], metrics: Sequence[str]) -> str:
    shown = ", ".join(f"{name} {record['metrics'][name]:.4f}" for name in metrics if name in record["metrics"])
    return f"{cell.label:24s} seed {seed}: {shown} ({record['wall_s']:.1f} s)"


def _run_fits(
    plan: Plan, todo: Sequence[tuple[Cell, int]], metrics: Sequence[str], max_fits: int | None, progress: Any
) -> list[tuple[Cell, int]]:
    ran: list[tuple[Cell, int]] = []
    seconds: list[float] = []
    todo = list(todo)[: max_fits if max_fits is not None else None]
    for i, (cell, seed) in enumerate(todo):
        with quiet_lightning():
            record = run_fit(plan, cell, seed)
        append_record(plan.out / RESULTS, record)
        ran.append((cell, seed))
        if metrics[0] not in record["metrics"]:  # the fit is kept: every logged metric is in its record
            raise ValueError(
                f"The fit logged no validation metric `{metrics[0]}` (`--metric`); it logged"
                f" {sorted(set(record['metrics']) - set(metrics))}: rerun naming one of those (finished fits are kept)"
            )
        seconds.append(float(record["wall_s"]))
        progress(
            f"[{i + 1}/{len(todo)}] {_format_fit(cell, seed, record, metrics)}  ETA {_eta(seconds, len(todo) - i - 1)}"
        )
    return ran


def _run_tests(
    plan: Plan, chosen: Sequence[tuple[Cell, str]], seeds: Sequence[int], records: Any, progress: Any
) -> list[dict[str, Any]]:
    path = plan.out / TEST_RESULTS
    tested, _ = read_records(path)
    done = _by_fit(tested)
    fits = _by_fit(records)
    for cell, seed in plan_fits([Cell(1), *(c for c, _ in chosen)], seeds):
        if (cell.key, seed) in done:
            continue  # scored once: a rerun reads the score back
        with quiet_lightning():
            record = _test_fit(plan, cell, seed, plan.out / fits[(cell.key, seed)]["weights"])
        append_record(path, record)
        tested.append(record)
        progress(
            f"test  {cell.label:24s} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
        )
    return tested


def run_study(
    config: str | Path,
    m: Sequence[int] = (1, 2, 4),
    seeds: Sequence[int] = (0, 1, 2, 3),
    temperature: Sequence[float | None] | None = None,
    selection_size: Sequence[int | None] | None = None,
    worst_of_k: int = 8,
    shard: tuple[int, int] | None = None,
    test: bool = False,
    out: str | Path = "maxup_study",
    metric: str | None = None,
    report_only: bool = False,
    overrides: Sequence[str] = (),
    max_fits: int | None = None,
    progress: Callable[[str], None] | None = print,
) -> StudyResult:
    """Run (or resume, or report) a MaxUp study of a LightningCLI config; see the module docstring.

    Args:
        config: LightningCLI YAML whose model is a :class:`~lightning_maxup.MaxUpMixin` module.
        m: Copies per sample to compare; must include 1 (the baseline).
        seeds: At least two seeds; each seeds a baseline fit and every MaxUp cell's fit (paired).
        temperature: ``selection_temperature`` values to sweep (``None`` in the list: arg-max); ``None``: the
            config's.
        selection_size: ``selection_size`` values to sweep (``None`` in the list: full view); ``None``: the config's.
        worst_of_k: Copies of worst-of-k validation accuracy (0: not measured).
        shard: ``(i, n)``: run every ``n``-th fit from ``i``; the report is written when every fit is in.
        test: Score the cells chosen on validation, and the baseline, once on the test split.
        out: The study's folder (``results.jsonl``, ``report.md``, ``gain.png``, the fits' logs and weights).
        metric: The validation metric; default: the one the config's ``ModelCheckpoint``/``EarlyStopping`` monitors.
        report_only: Run no fit; report what ``out/results.jsonl`` holds.
        overrides: Further LightningCLI arguments for every fit (``["--trainer.max_epochs=10"]``).
        max_fits: Run at most this many fits in this call (a time-boxed job; a rerun goes on).
        progress: Called with one line per finished fit and per step of the study; ``None`` is silent.

    Raises:
        ValueError: Before any fit, on an ``m`` without 1, fewer than 2 seeds, an unwritable ``out``, or an
            ``out`` holding another study's fits.
        TypeError: Before any fit, if the config's model is not a :class:`~lightning_maxup.MaxUpMixin` module.

    Example:
        >>> run_study("my.yaml", m=[2, 4])
        Traceback (most recent call last):
        ...
        ValueError: Expected `m` to include 1, the baseline every MaxUp cell is compared with (ordinary ...
    """
    say: Any = progress or (lambda line: None)
    _check_options(m, seeds, worst_of_k, shard)
    plan = Plan(Path(config), Path(out), tuple(overrides), worst_of_k)
    check_writable(plan.out)
    cells = make_cells(m, temperature, selection_size)
    if not report_only:
        # The config's errors, and a model that is not a MaxUp module, before any fit.
        with quiet_lightning():
            first = build_cli(fit_args(plan.config, plan.overrides, seeds[0], plan.out / "fits", data_seed=False))
        require_maxup_model(first.model, plan.config)
        metric = _resolve_metric(first, metric, plan.config)
        plan = dataclasses.replace(plan, data_seed=_takes_seed(first.datamodule))
    elif metric is None:
        raise ValueError("`report_only` needs the `metric` to report (`--metric NAME`)")
    records = _load(plan, say)
    done = _by_fit(records)
    todo = [(c, s) for c, s in plan_fits(cells, seeds, shard) if (c.key, s) not in done]
    metrics = [metric] + ([f"worst-of-{worst_of_k}"] if worst_of_k > 0 else [])
    ran: list[tuple[Cell, int]] = []
    if not report_only:
        say(f"{len(todo)} fits to run{f' (shard {shard[0]}/{shard[1]})' if shard else ''}, {len(done)} done before")
        ran = _run_fits(plan, todo, metrics, max_fits, say)
        records = _load(plan, say)
    keys = {c.key for c in cells}
    records = [r for r in records if int(r["seed"]) in seeds and Cell.from_json(r["cell"]).key in keys]
    complete = not _missing(cells, seeds, _by_fit(records))
    chosen: list[tuple[Cell, str]] = []
    tested: list[dict[str, Any]] = []
    if test and complete and shard is None:
        chosen = choose_cells(records, cells, metric, worst_of_k)
        tested = _run_tests(plan, chosen, seeds, records, say)
    title = f"MaxUp study of {plan.config.name}" + (f" ({' '.join(plan.overrides)})" if plan.overrides else "")
    report = format_report(records, cells, seeds, metric, worst_of_k, title, tested, chosen)
    result = StudyResult(records, report, ran, complete, chosen)
    if shard is None or complete:
        say("")
        say(report)
        _write_report(plan, result, cells, metric, say)
    else:
        say(f"shard {shard[0]}/{shard[1]} done; the report is written once every fit is in (or with --report-only)")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-3"`` as a list of integers."""
    values: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if dash and low:
            values += range(int(low), int(high) + 1)
        else:
            values.append(int(part))
    return values


def _optional(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [None if v.strip().lower() == "none" else kind(v) for v in text.split(",")]

    return parse


def _shard(text: str) -> tuple[int, int]:
    i, slash, n = text.partition("/")
    if not slash:
        raise argparse.ArgumentTypeError(f"expected I/N, got {text!r}")
    return int(i), int(n)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-maxup study",
        description="Is MaxUp worth it on my data? Fits a LightningCLI config with ordinary augmentation (m = 1)"
        " and with MaxUp at the same seeds, and reports each paired difference with its 95 % interval, the seeds"
        " MaxUp won and a verdict (DIR/report.md, DIR/gain.png). Finished fits are kept in DIR/results.jsonl: a"
        " rerun goes on where a killed one stopped.",
        epilog="Further arguments (--trainer.max_epochs=10, --data.init_args.batch_size=32) go to every fit's"
        " LightningCLI. See docs/study.md.",
    )
    p.add_argument("--config", required=True, type=Path, help="LightningCLI YAML whose model is a MaxUpMixin module")
    p.add_argument("--m", type=_ints, default=[1, 2, 4], help="copies per sample, with 1 (the baseline); default 1,2,4")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3], help="at least 2 seeds, e.g. 0,1,2,3 or 0-3")
    p.add_argument("--temperature", type=_optional(float), help="selection temperatures to sweep, e.g. none,0.5")
    p.add_argument("--selection-size", type=_optional(int), help="selection view sizes to sweep, e.g. none,16")
    p.add_argument("--worst-of-k", type=int, default=8, help="copies of worst-of-k validation accuracy (default 8)")
    p.add_argument("--metric", help="validation metric (default: the one the config's callbacks monitor)")
    p.add_argument("--shard", type=_shard, help="I/N: run every N-th fit from I (a job array into one --out)")
    p.add_argument("--max-fits", type=int, help="run at most this many fits now (a rerun goes on)")
    p.add_argument("--test", action="store_true", help="score the cells chosen on validation once on the test split")
    p.add_argument("--report-only", action="store_true", help="run no fit; report --out's results")
    p.add_argument("--out", type=Path, default=Path("maxup_study"), help="the study's folder (default ./maxup_study)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``lightning-maxup study``: returns the exit status.

    Example:
        >>> main(["--config", "my.yaml", "--m", "2,4"])
        2
    """
    from jsonargparse import ArgumentError

    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") and not a.startswith(("--trainer.", "--model.", "--data."))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    start = time.perf_counter()
    try:
        run_study(
            args.config, args.m, args.seeds, args.temperature, args.selection_size, args.worst_of_k, args.shard,
            args.test, args.out, args.metric, args.report_only, rest, args.max_fits,
        )  # fmt: skip
    except (ValueError, TypeError, ArgumentError) as err:
        print(f"lightning-maxup study: error: {err}", file=sys.stderr)
        return 2
    print(f"study wall time {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} torch thread(s)")
    return 0
