"""Certification files and tables: Cohen et al.'s published CIFAR-10 table is reproduced exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_maxup.certify.cli import certify_table_main
from lightning_maxup.certify.table import (
    envelope,
    markdown_table,
    read_certification,
    sigma_from_path,
    table_radii,
    write_certification,
)

COHEN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cohen2019-cifar10"
SIGMAS = ("0.12", "0.25", "0.50", "1.00")


def _cohen_files() -> list[str]:
    if not COHEN.is_dir():
        pytest.skip(f"Cohen et al.'s certification files are not available at {COHEN} (../shared beside the repo)")
    return [str(COHEN / f"noise_{s}_sigma_{s}.tsv") for s in SIGMAS]


def test_certify_table_reproduces_the_published_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _cohen_files()
    out, plot = tmp_path / "table.md", tmp_path / "plot.png"
    code = certify_table_main([*files, "--radius-stop", "1.5", "--output", str(out), "--plot", str(plot)])
    assert code == 0
    published = (COHEN / "published_table.md").read_text()
    assert out.read_text() == published
    assert capsys.readouterr().out == published
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cohen_files_reference_computation() -> None:
    """Each published number is the share of rows with correct == 1 and radius >= r, computed line by line."""
    files = _cohen_files()
    for file in files:
        cert = read_certification(file)
        assert len(cert) == 500
        for r in table_radii(0.25, 1.5):
            rows = [line.split("\t") for line in Path(file).read_text().splitlines()[1:]]
            expected = sum(int(row[4]) == 1 and float(row[3]) >= r for row in rows) / len(rows)
            assert cert.accuracy_at([r])[0] == expected


def test_default_table_has_the_table6_radii(capsys: pytest.CaptureFixture[str]) -> None:
    files = _cohen_files()
    assert certify_table_main([files[2], "--no-plot"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "|  | " + "".join(f"r = {r:.3} |" for r in [0.25 * i for i in range(1, 12)])


def test_write_read_round_trip_in_cohens_format(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    write_certification(path, [0, 20], [3, 7], [3, -1], [0.07342, 0.0], [13.5, 0.25])
    lines = path.read_text().splitlines()
    assert lines == [
        "idx\tlabel\tpredict\tradius\tcorrect\ttime",
        "0\t3\t3\t0.0734\t1\t0:00:13.500000",
        "20\t7\t-1\t0.0\t0\t0:00:00.250000",
    ]
    write_certification(path, [40], [1], [1], [1.5], [1.0], append=True)
    cert = read_certification(path)
    assert cert.idx.tolist() == [0, 20, 40]
    assert cert.correct.tolist() == [1, 0, 1]
    assert cert.accuracy_at([0.0, 0.05, 1.0, 2.0]).tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0.0])


def test_read_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="to start with the header 'idx"):
        read_certification(bad)
    bad.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\t2\t3\n")
    with pytest.raises(ValueError, match="bad.tsv` line 2: Expected 6 tab-separated columns, got 3"):
        read_certification(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match="to start with the header .*, got an empty file"):
        read_certification(bad)


def test_best_marks_go_to_the_first_maximum_and_envelope_is_the_pointwise_max() -> None:
    table = markdown_table({"a": [0.5, 0.0], "b": [0.5, 0.1]}, [0.25, 0.5])
    assert table.splitlines()[2:] == ["<b> a </b>| 0.50<b>*</b> |0.00 |", "<b> b </b>| 0.50 |0.10<b>*</b> |"]
    assert envelope({"a": np.array([0.5, 0.0]), "b": np.array([0.4, 0.1])}).tolist() == [0.5, 0.1]
    with pytest.raises(ValueError, match="Expected 2 accuracies per row"):
        markdown_table({"a": [0.5]}, [0.25, 0.5])


@pytest.mark.parametrize(
    ("name", "sigma"),
    [
        pytest.param("noise_0.12_sigma_0.12.tsv", 0.12, id="cohen"),
        pytest.param("certify_sigma_0.50.tsv", 0.5, id="ours"),
        pytest.param("results.tsv", None, id="none"),
    ],
)
def test_sigma_from_path(name: str, sigma: float | None) -> None:
    assert sigma_from_path(name) == sigma


def test_certify_table_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.tsv"
    write_certification(path, [0], [1], [1], [0.3], [0.1])
    assert certify_table_main([str(path), "--labels", "a", "b", "--no-plot"]) == 2
    assert "expected one `--labels` entry per file (1), got 2" in capsys.readouterr().err
    assert certify_table_main([str(path), "--radius-step", "0", "--no-plot"]) == 2
    assert "Expected `step` to be positive, got 0.0" in capsys.readouterr().err
    assert certify_table_main([str(path), str(path), "--no-plot"]) == 2
    assert "two files have the row label 'x'" in capsys.readouterr().err
    assert certify_table_main([str(path), "--labels", "mine", "--no-plot"]) == 0
    assert "<b> mine </b>| 1.00<b>*</b> |" in capsys.readouterr().out


HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
GOOD = "0\t3\t3\t0.5\t1\t0:00:01.500000\n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        pytest.param("1\t3\t3\t0.5\t7\t0:00:01", "Expected `correct` to be 0 or 1, got '7'", id="correct-7"),
        pytest.param("1\t3\t3\t-3.0\t1\t0:00:01", "finite number >= 0, got '-3.0'", id="radius-neg"),
        pytest.param("1\t3\t3\tnan\t1\t0:00:01", "finite number >= 0, got 'nan'", id="radius-nan"),
        pytest.param("1\t3\t3\tinf\t1\t0:00:01", "finite number >= 0, got 'inf'", id="radius-inf"),
        pytest.param("1\t3\t3\tabc\t1\t0:00:01", "finite number >= 0, got 'abc'", id="radius-abc"),
        pytest.param(
            "1\t3\t-2\t0.0\t0\t0:00:01", "Expected `predict` to be an integer >= -1, got '-2'", id="predict-2"
        ),
        pytest.param(
            "1\t3\t1.5\t0.0\t0\t0:00:01", "Expected `predict` to be an integer >= -1, got '1.5'", id="predict-float"
        ),
        pytest.param("1\tcat\t3\t0.0\t0\t0:00:01", "Expected `label` to be an integer >= 0, got 'cat'", id="label"),
        pytest.param("x\t3\t3\t0.5\t1\t0:00:01", "Expected `idx` to be an integer >= 0, got 'x'", id="idx"),
        pytest.param("1\t3\t3\t0.5\t1\t-1 day, 23:59:59", "Expected `time` to be a duration >= 0", id="time-negative"),
        pytest.param("1\t3\t3\t0.5\t1\t-0.5", "Expected `time` to be a duration >= 0", id="time-negative-seconds"),
        pytest.param("1\t3\t3\t0.5\t1\tsoon", "(H:MM:SS.ffffff or seconds), got 'soon'", id="time-text"),
        pytest.param(
            "1\t3\t4\t0.5\t1\t0:00:01",
            "to be 1 exactly where `predict` == `label`, got '1' with predict=4",
            id="correct-inconsistent",
        ),
        pytest.param("1\t3\t3\t0.5\t1", "Expected 6 tab-separated columns, got 5", id="columns"),
        pytest.param(
            "0\t3\t3\t0.5\t1\t0:00:01", "Expected each `idx` once, got 0 again (first on line 2)", id="duplicate-idx"
        ),
    ],
)
def test_certify_table_rejects_invalid_rows(
    row: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cert_sigma_0.25.tsv"
    path.write_text(HEADER + GOOD + "\n" + row + "\n" + GOOD.replace("0\t", "2\t", 1))
    assert certify_table_main([str(path), "--no-plot"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith(f"lightning-maxup certify-table: error: `{path}` line 4: ")  # the blank line counts
    assert message in err[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(HEADER, "to hold at least one row, got only the header", id="header-only"),
        pytest.param("", "to start with the header 'idx\\tlabel", id="empty"),
        pytest.param(GOOD, "to start with the header 'idx\\tlabel", id="no-header"),
    ],
)
def test_certify_table_rejects_files_without_rows(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.tsv"
    path.write_text(content)
    assert certify_table_main([str(path), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path}" in err
    assert message in err


def test_certify_table_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope_sigma_0.50.tsv"
    assert certify_table_main([str(missing), "--no-plot"]) == 2
    assert capsys.readouterr().err == f"lightning-maxup certify-table: error: no such file: {str(missing)!r}\n"


def test_certify_table_prints_row_counts_and_warns_when_they_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full, part = tmp_path / "a_sigma_0.25.tsv", tmp_path / "b_sigma_0.50.tsv"
    write_certification(full, [0, 1, 2], [1, 1, 1], [1, 1, -1], [0.3, 0.6, 0.0], [0.1] * 3)
    write_certification(part, [0], [1], [1], [0.9], [0.1])
    assert certify_table_main([str(full), "--no-plot"]) == 0
    assert capsys.readouterr().err == f"{full}: 3 rows\n"
    assert certify_table_main([str(full), str(part), "--no-plot"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"{full}: 3 rows", f"{part}: 1 rows"]
    assert (
        err[2]
        == f"warning: the files differ in row count ({full}: 3, {part}: 1); their columns certify different inputs"
    )
