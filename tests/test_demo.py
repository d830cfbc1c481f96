"""``lightning-maxup demo``: the whole path in quick mode, the tables, the plot, the threads and the options."""

from __future__ import annotations

import re
import statistics

import pytest
import torch
from PIL import Image

from lightning_maxup import demo
from lightning_maxup.cli import main as cli_main
from lightning_maxup.demo import (
    ORDINARY,
    CertifyResult,
    DemoResult,
    Settings,
    format_certify_table,
    format_table,
    main,
    paired_difference,
    set_threads,
    stratified_subset,
)

CLEAN_HEADER = "| method | seeds | test accuracy | s / epoch | time vs ordinary | selection share of a step |"
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
    for method in (ORDINARY, "MaxUp (m=4)"):
        cells = _row(out, method)
        assert cells[1] == "1"
        assert re.fullmatch(r"\d+\.\d\d ± 0\.00 %", cells[2]), cells
        assert float(cells[3]) > 0
        assert re.fullmatch(r"\d+\.\d\dx", cells[4]), cells
        assert re.fullmatch(r"\d+ %", cells[5]), cells
    assert _row(out, ORDINARY)[4] == "1.00x"
    assert 0 < float(_row(out, "MaxUp (m=4)")[5].rstrip(" %")) < 100  # the selection pass ran and was timed

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
        pytest.param({"m": 1}, "`--m` must be at least 2 to compare MaxUp", id="m"),
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
    ],
)
def test_settings_reject_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        Settings(**options)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--m", "1"], "`--m` must be at least 2", id="m"),
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
    clean = [DemoResult(ORDINARY, 0, 0.9, 0.1, 0.0), DemoResult("MaxUp (m=4)", 0, 0.92, 0.2, 0.5)]
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


def test_format_table_reports_mean_std_and_time_ratio():
    rows = [
        DemoResult(ORDINARY, 0, 0.80, 1.0, 0.0),
        DemoResult(ORDINARY, 1, 0.90, 1.0, 0.0),
        DemoResult("MaxUp (m=4)", 0, 0.95, 2.0, 0.5),
    ]
    table = format_table(rows)
    assert table.splitlines()[0] == CLEAN_HEADER
    assert "| ordinary augmentation | 2 | 85.00 ± 7.07 % | 1.000 | 1.00x | 0 % |" in table
    assert "| MaxUp (m=4) | 1 | 95.00 ± 0.00 % | 2.000 | 2.00x | 50 % |" in table


def test_paired_difference_pairs_by_seed():
    rows = [
        DemoResult(ORDINARY, 0, 0.80, 1.0, 0.0),
        DemoResult(ORDINARY, 1, 0.90, 1.0, 0.0),
        DemoResult("MaxUp (m=4)", 1, 0.93, 2.0, 0.5),
        DemoResult("MaxUp (m=4)", 0, 0.85, 2.0, 0.5),
    ]
    mean, std, seeds = paired_difference(rows)
    assert seeds == 2
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(statistics.stdev([5.0, 3.0]))
    assert paired_difference(rows[:2]) is None


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
