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

COHEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cohen2019-cifar10"
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
    with pytest.raises(ValueError, match="Expected 6 tab-separated columns on line 2"):
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
