"""``lightning-maxup study``: pairing, kill-safety, shards, the report's numbers against a direct computation, errors.

The fits are a width-4 CNN on the bundled digits for 2 epochs (1 of warm-up): a few seconds each at one thread.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader

from lightning_maxup._lightning import pl
from lightning_maxup.apps.cli import main as cli_main
from lightning_maxup.apps.study import (
    RESULTS,
    TEST_RESULTS,
    Cell,
    Plan,
    append_record,
    make_cells,
    quiet_lightning,
    read_records,
    run_fit,
    run_study,
)
from lightning_maxup.recipes.datamodules import DigitsDataModule

# The MaxUp callback overrides m to 8: the study's cell (m = 2) must win over it.
CONFIG = """\
seed_everything: 0
model:
  class_path: lightning_maxup.recipes.models.MaxUpClassifier
  init_args:
    backbone:
      class_path: lightning_maxup.recipes.models.SmallCNN
      init_args: {in_channels: 1, num_classes: 10, width: 4}
    num_classes: 10
    maxup:
      m: 4
      augment:
        class_path: lightning_maxup.augment.RandomCrop
        init_args: {size: 8, padding: 1}
    optimizer: adam
    lr: 0.01
data:
  class_path: lightning_maxup.recipes.datamodules.DigitsDataModule
  init_args: {batch_size: 128, seed: 0}
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  callbacks:
    - class_path: lightning_maxup.MaxUp
      init_args: {warmup_epochs: 1, m: 8}
"""
STUDY: dict[str, Any] = {"m": [1, 2], "seeds": [0, 1], "metric": "val/acc", "worst_of_k": 4, "progress": None}


def _config(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _key(record: dict[str, Any]) -> tuple[str, int]:
    return Cell.from_json(record["cell"]).key, int(record["seed"])


# ---------------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------------
class _Snapshots(pl.Callback):
    """Every parameter and buffer at the end of each training epoch, and the ``m`` the epoch trained with."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.m: list[int] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        state = pl_module.state_dict()
        self.states.append({k: v.detach().clone() for k, v in state.items() if not k.endswith("_extra_state")})
        self.m.append(pl_module.maxup_active_m)


def _fit(plan: Plan, cell: Cell, seed: int) -> _Snapshots:
    snapshots = _Snapshots()
    with quiet_lightning():
        run_fit(plan, cell, seed, [snapshots])
    return snapshots


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class GlobalShuffleDigits(DigitsDataModule):
    """The digits shuffled from the global generator, as a ``DataLoader(shuffle=True)`` without a generator does."""

    def __init__(self, batch_size: int = 128) -> None:
        super().__init__(batch_size=batch_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True)


GLOBAL_SHUFFLE = CONFIG.replace(  # a DataModule without a `seed` argument
    "lightning_maxup.recipes.datamodules.DigitsDataModule\n  init_args: {batch_size: 128, seed: 0}",
    "tests.apps.test_study.GlobalShuffleDigits\n  init_args: {batch_size: 128}",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "data_seed"),
    [pytest.param(CONFIG, True, id="seeded-loader"), pytest.param(GLOBAL_SHUFFLE, False, id="global-shuffle")],
)
def test_maxup_and_baseline_fits_are_identical_through_the_warmup_then_differ(tmp_path, config, data_seed):
    plan = Plan(_config(tmp_path, config), tmp_path / "out", worst_of_k=0, data_seed=data_seed)
    base, maxup, other = _fit(plan, Cell(1), 5), _fit(plan, Cell(2), 5), _fit(plan, Cell(1), 6)
    assert (base.m, maxup.m) == ([1, 1], [1, 2])  # the cell's m = 2, not the callback's override (8)
    assert _same(base.states[0], maxup.states[0]), "the warm-up epoch differs between MaxUp and its baseline"
    assert not _same(base.states[1], maxup.states[1]), "MaxUp's epoch changed nothing"
    assert not _same(base.states[0], other.states[0]), "another seed gave the same run"


def test_the_seed_sets_the_datamodules_shuffle_seed(tmp_path):
    plan = Plan(_config(tmp_path), tmp_path / "out", data_seed=True)
    with quiet_lightning():
        cli = plan.build(Cell(2), 7)
    assert (cli.datamodule.seed, cli.model.maxup_config.seed, cli.model.maxup_config.m) == (7, 7, 2)


# ---------------------------------------------------------------------------------------------------------------
# Kill-safety, shards, --test: one study run three ways
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A study killed after 3 fits (its last line cut short) and resumed with --test; the same study in 2 shards."""
    tmp = tmp_path_factory.mktemp("study")
    config = _config(tmp)
    killed = tmp / "killed"
    first = run_study(config, out=killed, max_fits=3, **STUDY)
    results = killed / RESULTS
    text = results.read_bytes()
    results.write_bytes(text[: len(text) - 40])  # the third line cut short, as by a kill mid-write
    second = run_study(config, out=killed, test=True, **STUDY)
    tested = (killed / TEST_RESULTS).read_text()
    third = run_study(config, out=killed, test=True, **STUDY)  # nothing left to fit or to test
    sharded = tmp / "sharded"
    shards = [run_study(config, out=sharded, shard=(i, 2), **STUDY) for i in (1, 0)]
    return {
        "config": config, "killed": killed, "runs": (first, second, third), "tested": tested,
        "sharded": sharded, "shards": shards,
    }  # fmt: skip


@pytest.mark.slow
def test_a_killed_study_resumes_without_repeating_or_losing_a_fit(studies):
    first, second, third = studies["runs"]
    planned = [(c.key, s) for s in STUDY["seeds"] for c in make_cells(STUDY["m"])]
    ran = [(c.key, s) for run in (first, second, third) for c, s in run.ran]
    assert [(c.key, s) for c, s in first.ran] == planned[:3]
    # The cut third fit runs again, the fourth once; nothing runs twice otherwise.
    assert [(c.key, s) for c, s in second.ran] == planned[2:]
    assert third.ran == []
    assert sorted(ran) == sorted([*planned, planned[2]])
    records, bad = read_records(studies["killed"] / RESULTS)
    assert bad == 1
    assert sorted(_key(r) for r in records) == sorted(planned)
    assert second.complete
    assert third.complete


@pytest.mark.slow
def test_test_split_is_scored_once_for_the_cells_chosen_on_validation(studies):
    _, second, third = studies["runs"]
    assert [c.m for c, _ in second.chosen] == [2]
    assert "largest mean validation gain" in second.chosen[0][1]
    tested, bad = read_records(studies["killed"] / TEST_RESULTS)
    assert bad == 0
    assert sorted(_key(r) for r in tested) == sorted((c.key, s) for c in make_cells([1, 2]) for s in (0, 1))
    assert (studies["killed"] / TEST_RESULTS).read_text() == studies["tested"]  # the rerun scored nothing again
    assert "## Test split: validation chose, test confirms" in third.report
    assert "test/acc" in third.report


def _without_costs(report: str) -> str:
    return re.sub(r"\d+\.\d s, \d+\.\d s", "", report)


@pytest.mark.slow
def test_merged_shards_report_what_one_run_reports(studies):
    one = studies["runs"][1]
    late, early = studies["shards"]  # shard 1/2 ran first: it wrote no report
    assert not late.complete
    assert early.complete
    sharded, _ = read_records(studies["sharded"] / RESULTS)
    resumed, _ = read_records(studies["killed"] / RESULTS)
    assert {_key(r): r["metrics"] for r in sharded} == {_key(r): r["metrics"] for r in resumed}
    report = (studies["sharded"] / "report.md").read_text()
    assert _without_costs(report) == _without_costs(run_study(studies["config"], out=studies["killed"], **STUDY).report)
    assert _without_costs(early.report) == _without_costs(one.report.split("\n## Test split")[0].rstrip() + "\n")
    assert (studies["sharded"] / "gain.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# The report's numbers against a direct computation from results.jsonl
# ---------------------------------------------------------------------------------------------------------------
def _reference(results: Path, maxup: str, metric: str, scale: float, higher: bool) -> dict[str, Any]:
    """Paired difference, t-interval (scipy's paired t-test), wins and Wilson interval, seed by seed, by hand."""
    values: dict[str, dict[int, float]] = {}
    for line in results.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = "m=1" if r["cell"]["m"] == 1 else ",".join(f"{k}={v}" for k, v in r["cell"].items())
        values.setdefault(key, {}).setdefault(r["seed"], r["metrics"][metric])
    seeds = sorted(set(values["m=1"]) & set(values[maxup]))
    a = [scale * values[maxup][s] for s in seeds]
    b = [scale * values["m=1"][s] for s in seeds]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    wins = sum((x > y) if higher else (x < y) for x, y in zip(a, b, strict=True))
    ties = sum(x == y for x, y in zip(a, b, strict=True))
    wilson = stats.binomtest(wins, len(seeds)).proportion_ci(0.95, method="wilson") if not ties else None
    return {
        "mean": statistics.mean(a) - statistics.mean(b), "half": (ci.high - ci.low) / 2, "wins": wins, "ties": ties,
        "seeds": len(seeds), "base": statistics.mean(b), "maxup": statistics.mean(a), "wilson": wilson,
    }  # fmt: skip


def _row(report: str, label: str, metric: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == label and cells[1] == metric:
            return cells
    raise AssertionError(f"no row {label!r} / {metric!r} in\n{report}")


def _check_row(cells: list[str], ref: dict[str, Any], digits: int) -> None:
    tol = 0.6 * 10**-digits
    numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cells[5])]
    assert int(cells[2]) == ref["seeds"]
    assert abs(float(cells[3]) - ref["base"]) < tol
    assert abs(float(cells[4]) - ref["maxup"]) < tol
    assert abs(numbers[0] - ref["mean"]) < tol, (numbers, ref)
    assert abs(numbers[1] - ref["half"]) < tol, (numbers, ref)
    ties = f" ({ref['ties']} tie{'s' if ref['ties'] > 1 else ''})" if ref["ties"] else ""
    assert cells[6] == f"{ref['wins']} of {ref['seeds']}{ties}"
    p, low, high = (float(x) for x in re.findall(r"\d\.\d\d", cells[7]))
    assert abs(p - (ref["wins"] + ref["ties"] / 2) / ref["seeds"]) < 0.006  # a tie counts half
    if ref["wilson"] is not None:
        assert abs(low - ref["wilson"].low) < 0.006
        assert abs(high - ref["wilson"].high) < 0.006
    verdict = "no difference shown"
    if abs(ref["mean"]) > ref["half"]:
        verdict = "MaxUp better" if (ref["mean"] > 0) == ref["higher"] else "MaxUp worse"
    assert cells[8] == verdict


@pytest.mark.parametrize(
    ("metric", "scale", "higher", "digits"),
    [pytest.param("val/acc", 100.0, True, 2, id="accuracy"), pytest.param("val/loss", 1.0, False, 4, id="loss")],
)
def test_report_numbers_match_a_direct_computation_from_results_jsonl(tmp_path, metric, scale, higher, digits):
    config = _config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    plan = Plan(config, out, worst_of_k=4)
    g = torch.Generator().manual_seed(0)
    cells = make_cells([1, 2, 4], temperature=[None, 0.5])
    gains = dict(zip([c.key for c in cells], [0.0, -0.03, 0.0, 0.03, 0.05], strict=True))  # worse, tie, better
    for seed in range(6):
        base = 0.8 + 0.05 * float(torch.rand((), generator=g))
        for c in cells:
            noise = 0.01 * float(torch.randn((), generator=g))
            acc = base + (gains[c.key] + noise if c.m > 1 else 0.0)
            record = {"cell": c.to_json(), "seed": seed, "study": plan.fingerprint, "wall_s": 1.0,
                      "metrics": {"val/acc": acc, "val/loss": 2 - acc, "worst-of-4": acc - 0.1}}  # fmt: skip
            append_record(out / RESULTS, record)
    report = run_study(config, m=[1, 2, 4], temperature=[None, 0.5], seeds=list(range(6)), metric=metric,
                       worst_of_k=4, out=out, report_only=True, progress=None).report  # fmt: skip
    verdicts = set()
    for c in cells[1:]:
        ref = _reference(out / RESULTS, c.key, metric, scale, higher) | {"higher": higher}
        cells_ = _row(report, c.label, metric)
        _check_row(cells_, ref, digits)
        verdicts.add(cells_[8])
        _check_row(
            _row(report, c.label, "worst-of-4"),
            _reference(out / RESULTS, c.key, "worst-of-4", 100.0, True) | {"higher": True},
            2,
        )
    assert verdicts == {"MaxUp better", "MaxUp worse", "no difference shown"}
    assert (out / "report.md").read_text() == report
    assert (out / "gain.png").exists()


@pytest.mark.slow
def test_report_of_real_fits_matches_a_direct_computation(studies):
    report = studies["runs"][2].report
    for metric, scale in (("val/acc", 100.0), ("worst-of-4", 100.0)):
        ref = _reference(studies["killed"] / RESULTS, "m=2", metric, scale, True) | {"higher": True}
        _check_row(_row(report, "m=2", metric), ref, 2)


# ---------------------------------------------------------------------------------------------------------------
# results.jsonl: appends from concurrent writers stay whole lines
# ---------------------------------------------------------------------------------------------------------------
def _append_many(path: str, writer: int) -> None:
    for i in range(200):
        append_record(Path(path), {"writer": writer, "i": i, "pad": "x" * 300})


def test_concurrent_shards_append_whole_lines(tmp_path):
    path = tmp_path / RESULTS
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    records, bad = read_records(path)
    assert bad == 0
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(200)]


# ---------------------------------------------------------------------------------------------------------------
# Named errors, before any fit
# ---------------------------------------------------------------------------------------------------------------
NOT_MAXUP = """\
model:
  class_path: lightning_maxup.recipes.models.classifier.Classifier
  init_args:
    backbone: {class_path: lightning_maxup.recipes.models.SmallCNN, init_args: {width: 4}}
    num_classes: 10
data: {class_path: lightning_maxup.recipes.datamodules.DigitsDataModule}
trainer: {max_epochs: 1, logger: false, enable_checkpointing: false}
"""


@pytest.mark.parametrize(
    ("config", "options", "error", "match"),
    [
        pytest.param(NOT_MAXUP, {}, TypeError, r"is Classifier, not a MaxUpMixin module", id="not-maxup"),
        pytest.param(CONFIG, {"m": [2, 4]}, ValueError, r"Expected `m` to include 1.*got \[2, 4\]", id="no-baseline"),
        pytest.param(CONFIG, {"seeds": [0]}, ValueError, r"at least 2 distinct seeds.*got \[0\]", id="one-seed"),
        pytest.param(CONFIG, {"out": "file/study"}, ValueError, r"`out` to be a writable folder", id="unwritable"),
        pytest.param(CONFIG, {"metric": None}, ValueError, r"monitors no metric.*--metric", id="no-metric"),
    ],
)
def test_named_errors_come_before_any_fit(tmp_path, config, options, error, match):
    (tmp_path / "file").write_text("a file, not a folder")
    options = {**STUDY, "out": tmp_path / "out", **options}
    if options["out"] == "file/study":
        options["out"] = tmp_path / "file" / "study"
    with quiet_lightning(), pytest.raises(error, match=match):
        run_study(_config(tmp_path, config), **options)
    assert not (tmp_path / "out" / RESULTS).exists()
    assert not (tmp_path / "out" / "fits").exists()


@pytest.mark.slow
def test_a_metric_the_fit_does_not_log_stops_after_one_fit_which_is_kept(tmp_path):
    config, out = _config(tmp_path), tmp_path / "out"
    with pytest.raises(ValueError, match=r"logged no validation metric `val/nope`.*'val/acc', 'val/loss'"):
        run_study(config, out=out, **{**STUDY, "metric": "val/nope"})
    assert [_key(r) for r in read_records(out / RESULTS)[0]] == [("m=1", 0)]
    again = run_study(config, out=out, max_fits=1, **STUDY)
    assert [(c.key, s) for c, s in again.ran] == [("m=2", 0)]


def test_the_command_prints_the_error_and_exits_2(tmp_path, capsys):
    argv = ["study", "--config", str(_config(tmp_path)), "--m", "2,4", "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    assert "lightning-maxup study: error: Expected `m` to include 1" in capsys.readouterr().err


def test_wilson_interval_matches_scipy():
    from lightning_maxup.apps.study import wilson_interval

    for k, n in [(0, 4), (3, 4), (4, 4), (7, 12)]:
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        low, high = wilson_interval(k, n)
        assert math.isclose(low, ci.low, abs_tol=1e-9)
        assert math.isclose(high, ci.high, abs_tol=1e-9)
