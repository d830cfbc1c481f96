"""``lightning-maxup demo``: the whole path in quick mode, the tables, the plot, the threads and the options."""

from __future__ import annotations

import re
import statistics

import pytest
import torch
from PIL import Image
from scipy import stats

from lightning_maxup.apps import demo
from lightning_maxup.apps.cli import main as cli_main
from lightning_maxup.apps.demo import (
    REGIMES,
    CertifyResult,
    DemoResult,
    Recipe,
    Regime,
    Settings,
    format_certify_table,
    format_table,
    main,
    set_threads,
    stratified_subset,
    train_regime,
)
from lightning_maxup.apps.study import paired_difference, paired_interval

CLEAN_HEADER = (
    "| regime | seeds | ordinary | MaxUp | MaxUp - ordinary (95 % CI) | MaxUp better on | verdict"
    " | worst-of-8: MaxUp - ordinary | s / run (ordinary, MaxUp) |"
)
VERDICTS = ("MaxUp better", "MaxUp worse", "no difference shown")
CERT_HEADER = "| recipe | seeds | s / epoch | r = 0 | r = 0.25 | r = 0.5 | r = 0.75 | r = 1 |"
THREADS_LINE = re.compile(r"torch threads: (\d+) intra-op, (\d+) inter-op \((.+)\)")


@pytest.fixture
def restore_threads():
    """The demo sets this process's thread count; give the rest of the suite back the one it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _row(table: str, name: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, table
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys, restore_threads):
    torch.set_num_threads(2)  # the demo must set its own count, whatever the process had
    assert cli_main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out

    match = THREADS_LINE.search(out)
    assert match, out
    assert int(match.group(1)) == torch.get_num_threads() == 1
    assert match.group(3).startswith("the default: ")

    assert CLEAN_HEADER in out
    for role, regime in REGIMES:  # where the study found MaxUp helps and where it hurts, side by side
        cells = _row(out, f"{role}: {regime.label}")
        assert cells[1] == "2"
        assert re.fullmatch(r"\d+\.\d\d %", cells[2]), cells
        assert re.fullmatch(r"\d+\.\d\d %", cells[3]), cells
        assert re.fullmatch(r"[+-]\d+\.\d\d ± \d+\.\d\d", cells[4]), cells  # two seeds: an interval
        assert re.fullmatch(r"[012] of 2", cells[5]), cells
        assert cells[6] in VERDICTS
        assert re.fullmatch(r"[+-]\d+\.\d\d ± \d+\.\d\d", cells[7]), cells
        assert re.fullmatch(r"\d+\.\d, \d+\.\d", cells[8]), cells

    assert CERT_HEADER in out
    for recipe in ("Gaussian", "MaxUp + Gauss"):
        cells = _row(out, recipe)
        accuracies = [float(c.split(" ± ")[0]) for c in cells[3:]]
        assert all(0 <= a <= 100 for a in accuracies)
        assert accuracies == sorted(accuracies, reverse=True), cells  # certified accuracy never grows with r

    assert re.search(r"wall time \d+ s, CPU time \d+ s \(this process, all threads\), \d+ torch threads?", out)
    png = tmp_path / "out" / "maxup_demo.png"
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.width >= 1000
        assert image.height >= 400
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None
        assert len(colours) > 100  # two drawn panels, not a blank canvas
    tables = (tmp_path / "out" / "maxup_demo.md").read_text(encoding="utf-8")
    assert CLEAN_HEADER in tables
    assert CERT_HEADER in tables


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: lightning-maxup demo")
    for markup in ("`", ":class:", ":func:", ":meth:"):
        assert markup not in text, f"{markup!r} in the help text"
    for option in ("--threads", "--quick", "--out"):
        assert option in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"k": 0}, "`--k` must be at least 1, got 0", id="k"),
        pytest.param({"cert_m": 1}, "`--cert-m` must be at least 2", id="cert-m"),
        pytest.param(
            {"epochs": 5, "warmup": 5}, r"`--warmup` must be at least 0 and less than the epochs \(5\)", id="warmup"
        ),
        pytest.param({"cert_warmup": -1}, "`--cert-warmup` must be at least 0", id="cert-warmup"),
        pytest.param({"per_class": 0}, "`--train-per-class` must be at least 1, got 0", id="per-class"),
        pytest.param({"n": 0}, "`--n` must be at least 1, got 0", id="n"),
        pytest.param({"sigma": 0.0}, "`--sigma` must be positive, got 0.0", id="sigma"),
        pytest.param({"alpha": 1.0}, r"`--alpha` must be in \(0, 1\), got 1.0", id="alpha"),
        pytest.param({"radii": (0.5, -1.0)}, "`--radii` must be non-negative, got 0.5 -1.0", id="radii"),
        pytest.param({"seeds": ()}, "`--seeds` must name at least one seed", id="seeds"),
        pytest.param({"cert_seeds": ()}, "`--cert-seeds` must name at least one seed", id="cert-seeds"),
    ],
)
def test_settings_reject_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        Settings(**options)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--k", "0"], "`--k` must be at least 1, got 0", id="k"),
        pytest.param(["--threads", "0"], "`--threads` must be at least 1, got 0", id="threads"),
    ],
)
def test_bad_options_exit_with_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _canned_runs(settings, progress):
    radii = tuple(settings.radii)
    regime = REGIMES[0][1]
    clean = [DemoResult(regime.baseline, 0, 0.9, 0.8, 0.1), DemoResult(regime, 0, 0.92, 0.81, 0.2)]
    certified = [
        CertifyResult("gaussian", 0, radii, tuple(0.8 - 0.1 * i for i in range(len(radii))), 0.1, 1.0),
        CertifyResult("maxup_gauss", 0, radii, tuple(0.7 - 0.05 * i for i in range(len(radii))), 0.2, 1.0),
    ]
    return clean, certified


def test_threads_option_is_set_as_printed(tmp_path, capsys, monkeypatch, restore_threads):
    monkeypatch.setattr(demo, "_run_all", _canned_runs)  # the threads, the tables and the plot, without training
    assert main(["--threads", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    match = THREADS_LINE.search(out)
    assert match, out
    assert int(match.group(1)) == torch.get_num_threads() == 2
    assert match.group(3) == "set by --threads"
    assert "| MaxUp + Gauss | 1 |" in out
    assert (tmp_path / "maxup_demo.png").stat().st_size > 0


def test_set_threads_sets_intra_op_threads(restore_threads):
    assert set_threads(2) == torch.get_num_threads() == 2
    assert set_threads(1) == torch.get_num_threads() == 1


def test_stratified_subset_takes_per_class_samples_of_every_class():
    y = torch.arange(10).repeat_interleave(torch.arange(3, 13))  # class c has c + 3 samples
    idx = stratified_subset(y, per_class=5, seed=3)
    assert len(set(idx.tolist())) == len(idx)
    counts = torch.bincount(y[idx], minlength=10)
    assert counts.tolist() == [min(5, c + 3) for c in range(10)]
    assert torch.equal(idx, stratified_subset(y, per_class=5, seed=3))
    assert not torch.equal(idx, stratified_subset(y, per_class=5, seed=4))


CROP4 = Regime("crop", m=4, optimizer="sgd")


def _runs(pairs):
    """DemoResults of CROP4 and its baseline from ``(seed, ordinary accuracy, MaxUp accuracy)``."""
    rows = []
    for seed, ordinary, maxup in pairs:
        rows += [
            DemoResult(CROP4.baseline, seed, ordinary, ordinary - 0.1, 1.0),
            DemoResult(CROP4, seed, maxup, maxup, 2.0),
        ]
    return rows


def test_format_table_pairs_by_seed_with_an_interval():
    rows = _runs([(0, 0.80, 0.85), (1, 0.90, 0.93), (2, 0.85, 0.90)])  # MaxUp + 5, + 3, + 5 points
    table = format_table(rows, k=8, roles={CROP4: "helps"})
    assert table.splitlines()[0] == CLEAN_HEADER
    cells = _row(table, "helps: crop, SGD, m=4")
    half = stats.t.ppf(0.975, 2) * statistics.stdev([5.0, 3.0, 5.0]) / 3**0.5
    assert cells[1:7] == ["3", "85.00 %", "89.33 %", f"+4.33 ± {half:.2f}", "3 of 3", "MaxUp better"]
    assert cells[8] == "1.0, 2.0"


@pytest.mark.parametrize(
    ("pairs", "verdict"),
    [
        pytest.param([(0, 0.8, 0.85), (1, 0.8, 0.86), (2, 0.8, 0.84)], "MaxUp better", id="better"),
        pytest.param([(0, 0.8, 0.75), (1, 0.8, 0.74), (2, 0.8, 0.76)], "MaxUp worse", id="worse"),
        pytest.param([(0, 0.8, 0.85), (1, 0.8, 0.75), (2, 0.8, 0.81)], "no difference shown", id="tie"),
        pytest.param([(0, 0.8, 0.85)], "one seed: no interval", id="one-seed"),
    ],
)
def test_paired_difference_verdict_reads_the_interval(pairs, verdict):
    diff = paired_difference(_runs(pairs), CROP4)
    assert diff is not None
    assert diff.verdict == verdict


def test_paired_difference_pairs_by_seed_not_by_order():
    rows = _runs([(1, 0.90, 0.93), (0, 0.80, 0.85)])
    rows = rows[::-1]  # MaxUp's seed 0 row now comes before baseline's seed 1 row
    diff = paired_difference(rows, CROP4)
    assert diff is not None
    assert (diff.seeds, diff.wins) == (2, 2)
    assert diff.mean == pytest.approx(4.0)
    wok = paired_difference(rows, CROP4, "test_wok")  # worst-of-k: baseline 0.1 below its clean accuracy here
    assert wok is not None
    assert wok.mean == pytest.approx(14.0)
    assert paired_difference([r for r in rows if r.regime.m == 1], CROP4) is None


@pytest.mark.parametrize("diffs", [[1.0, 2.0, 3.0], [0.5, -1.5, 2.0, 0.25, 4.0], [-3.0, -2.5]])
def test_paired_interval_matches_scipy_paired_t_test(diffs):
    mean, half = paired_interval(diffs)
    low, high = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx((low + high) / 2)
    assert half == pytest.approx((high - low) / 2), f"largest error {abs(half - (high - low) / 2)}"


def test_paired_interval_of_one_value_has_no_width():
    mean, half = paired_interval([2.0])
    assert mean == 2.0
    assert half != half  # NaN


def _data(n_per_class=3):
    torch.manual_seed(0)
    x = torch.rand(10 * n_per_class, 1, 8, 8)
    return x, torch.arange(10).repeat(n_per_class)


def test_maxup_during_warmup_trains_exactly_the_ordinary_twin():
    x, y = _data()
    recipe = Recipe(epochs=1, warmup=1, batch_size=8)  # every epoch is warm-up: MaxUp must not differ yet
    ordinary = train_regime(CROP4.baseline, 3, x, y, recipe).model
    maxup = train_regime(CROP4, 3, x, y, recipe).model
    for (name, a), b in zip(ordinary.state_dict().items(), maxup.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_train_regime_is_reproducible_and_reports_view_agreement():
    x, y = _data()
    recipe = Recipe(epochs=2, warmup=1, batch_size=8)
    half = Regime("crop", m=4, selection_size=4)
    first, second = train_regime(half, 0, x, y, recipe), train_regime(half, 0, x, y, recipe)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.view_agreement is not None
    assert 0.0 <= first.view_agreement <= 1.0
    assert train_regime(CROP4, 0, x, y, recipe).view_agreement is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"augment": "rotate"}, "Expected `augment` to be one of", id="augment"),
        pytest.param({"optimizer": "lbfgs"}, "Expected `optimizer` to be one of", id="optimizer"),
        pytest.param({"m": 0}, "Expected `m` to be a positive integer, got 0", id="m"),
        pytest.param({"m": 1, "temperature": 0.1}, "`m`=1 trains on the one copy", id="m1-temperature"),
    ],
)
def test_regime_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        Regime(**options)


def test_format_certify_table_reads_each_radius():
    radii = (0.0, 0.5, 1.0)
    rows = [
        CertifyResult("gaussian", 0, radii, (0.8, 0.4, 0.0), 0.1, 1.0),
        CertifyResult("gaussian", 1, radii, (0.9, 0.5, 0.1), 0.1, 1.0),
        CertifyResult("maxup_gauss", 0, radii, (0.7, 0.5, 0.2), 0.2, 1.0),
    ]
    table = format_certify_table(rows, [0.0, 0.5, 1.0])
    assert table.splitlines()[0] == "| recipe | seeds | s / epoch | r = 0 | r = 0.5 | r = 1 |"
    assert "| Gaussian | 2 | 0.100 | 85.0 ± 7.1 % | 45.0 ± 7.1 % | 5.0 ± 7.1 % |" in table
    assert "| MaxUp + Gauss | 1 | 0.200 | 70.0 ± 0.0 % | 50.0 ± 0.0 % | 20.0 ± 0.0 % |" in table
