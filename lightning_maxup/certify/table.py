"""Certification files, certified-accuracy tables and plots, in the formats of Cohen et al.'s reference code.

A certification file is a TSV with the columns ``idx label predict radius correct time`` (one row per certified
input; ``predict`` is -1 where the smoothed classifier abstained). The certified accuracy at radius ``r`` is the
share of rows with ``correct == 1`` and ``radius >= r``. :func:`markdown_table` writes the table exactly as
Cohen et al.'s ``analysis.py`` (``markdown_table_certified_accuracy``) does, ``*`` marking the best σ at each
radius; :func:`plot_certified_accuracy` draws the curves and their upper envelope over σ, as Salman et al. (2019)
report the best over σ at each radius.
"""

from __future__ import annotations

import csv
import datetime
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_maxup._extras import require
from lightning_maxup.certify.functional import ABSTAIN

__all__ = [
    "COLUMNS",
    "Certification",
    "envelope",
    "format_row",
    "parse_seconds",
    "markdown_table",
    "plot_certified_accuracy",
    "read_certification",
    "sigma_from_path",
    "sigma_label",
    "table_radii",
    "write_certification",
]

#: The tab-separated columns of a certification file, as Cohen et al. write them.
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
_HEADER = "\t".join(COLUMNS)


@dataclass
class Certification:
    """The rows of one certification file, column by column.

    Attributes:
        idx: Dataset index of each input.
        label: True label.
        predict: Certified prediction, -1 where it abstained.
        radius: Certified ℓ2 radius (0 where it abstained).
        correct: 1 where ``predict == label``.
        time: Time column as written (Cohen's files hold ``H:MM:SS.ffffff`` or seconds).
    """

    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    time: list[str]

    def __len__(self) -> int:
        return len(self.idx)

    def accuracy_at(self, radii: Sequence[float] | np.ndarray) -> np.ndarray:
        """Certified accuracy at each radius: the share of rows with ``correct == 1`` and ``radius >= r``.

        Example:
            >>> c = Certification(np.arange(3), np.zeros(3), np.array([0, -1, 0]), np.array([0.5, 0.0, 0.2]),
            ...                   np.array([1, 0, 1]), ["0", "0", "0"])
            >>> c.accuracy_at([0.0, 0.25, 0.5]).round(3).tolist()
            [0.667, 0.333, 0.333]
        """
        r = np.asarray(radii, dtype=np.float64)
        if len(self) == 0:
            return np.zeros(len(r))
        hits = (self.correct[:, None] == 1) & (self.radius[:, None] >= r[None, :])
        return hits.mean(axis=0)


def format_row(idx: int, label: int, predict: int, radius: float, correct: int, seconds: float) -> str:
    r"""One TSV line as Cohen et al.'s ``certify.py`` writes it (radius to 3 significant digits).

    Example:
        >>> format_row(20, 7, 7, 0.07342, 1, 13.7).split("\t")
        ['20', '7', '7', '0.0734', '1', '0:00:13.700000']
    """
    elapsed = str(datetime.timedelta(seconds=float(seconds)))
    return f"{int(idx)}\t{int(label)}\t{int(predict)}\t{float(radius):.3}\t{int(correct)}\t{elapsed}"


def write_certification(
    path: str | Path,
    idx: Sequence[int],
    label: Sequence[int],
    predict: Sequence[int],
    radius: Sequence[float],
    seconds: Sequence[float],
    append: bool = False,
) -> None:
    """Write (or append) rows to a certification TSV; ``correct`` is derived from ``predict == label``.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "cert.tsv")
        >>> write_certification(path, [0, 1], [3, 5], [3, -1], [0.5, 0.0], [0.1, 0.1])
        >>> read_certification(path).correct.tolist()
        [1, 0]
    """
    lengths = {len(idx), len(label), len(predict), len(radius), len(seconds)}
    if len(lengths) != 1:
        raise ValueError(f"Expected columns of equal length, got lengths {sorted(lengths)}")
    path = Path(path)
    new = not append or not path.exists() or path.stat().st_size == 0
    with path.open("a" if append else "w") as f:
        if new:
            f.write("\t".join(COLUMNS) + "\n")
        for i, y, p, r, s in zip(idx, label, predict, radius, seconds, strict=True):
            f.write(format_row(i, y, p, r, int(int(p) == int(y)), s) + "\n")


def _int_cell(text: str, name: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, got {text!r}")
    return value


_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


def parse_seconds(text: str) -> float:
    """Seconds in a ``time`` cell: ``H:MM:SS.ffffff`` (as ``str(timedelta)`` writes it) or a plain number.

    Example:
        >>> parse_seconds("0:00:13.700000"), parse_seconds("1 day, 0:00:01"), parse_seconds("2.5")
        (13.7, 86401.0, 2.5)
    """
    found = _TIMEDELTA.match(text.strip())
    if found:
        days, hours, minutes, seconds = found.groups()
        return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)
    return float(text)


def _parse_row(row: list[str]) -> tuple[int, int, int, float, int, str]:
    """One validated row; a ValueError names the column and the value."""
    if len(row) != len(COLUMNS):
        raise ValueError(f"Expected {len(COLUMNS)} tab-separated columns, got {len(row)}: {row!r}")
    idx = _int_cell(row[0], "idx", 0)
    label = _int_cell(row[1], "label", 0)
    predict = _int_cell(row[2], "predict", ABSTAIN)
    try:
        radius = float(row[3])
    except ValueError:
        radius = math.nan
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"Expected `radius` to be a finite number >= 0, got {row[3]!r}")
    if row[4] not in ("0", "1"):
        raise ValueError(f"Expected `correct` to be 0 or 1, got {row[4]!r}")
    correct = int(row[4])
    if correct != int(predict == label):
        raise ValueError(
            f"Expected `correct` to be 1 exactly where `predict` == `label`, got {row[4]!r} with "
            f"predict={predict} and label={label}"
        )
    try:
        seconds = parse_seconds(row[5])
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"Expected `time` to be a duration >= 0 (H:MM:SS.ffffff or seconds), got {row[5]!r}")
    return idx, label, predict, radius, correct, row[5]


def read_certification(path: str | Path) -> Certification:
    r"""Read and validate a certification TSV (Cohen et al.'s or this package's).

    Every row is checked: integer ``idx`` (each once) and ``label`` >= 0, integer ``predict`` >= -1, finite
    ``radius`` >= 0, ``correct`` 1 exactly where ``predict == label``, ``time`` >= 0. Blank lines are skipped.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the header is not ``idx label predict radius correct time``, the file has no rows, or a
            row is invalid; the message names the file, the line and the value.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "cert.tsv")
        >>> write_certification(path, [0], [3], [3], [0.25], [1.0])
        >>> read_certification(path).radius.tolist()
        [0.25]
        >>> with open(path, "a") as f:
        ...     _ = f.write("1\t3\t3\tnan\t1\t0:00:01\n")
        >>> read_certification(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `...cert.tsv` line 3: Expected `radius` to be a finite number >= 0, got 'nan'
    """
    path = Path(path)
    rows: list[tuple[int, int, int, float, int, str]] = []
    first_line: dict[int, int] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            got = "an empty file" if header is None else repr("\t".join(header))
            raise ValueError(f"Expected `{path}` to start with the header {_HEADER!r}, got {got}")
        for row in reader:
            if not row:
                continue
            try:
                parsed = _parse_row(row)
            except ValueError as err:
                raise ValueError(f"`{path}` line {reader.line_num}: {err}") from None
            if parsed[0] in first_line:
                raise ValueError(
                    f"`{path}` line {reader.line_num}: Expected each `idx` once, got {parsed[0]} again"
                    f" (first on line {first_line[parsed[0]]})"
                )
            first_line[parsed[0]] = reader.line_num
            rows.append(parsed)
    if not rows:
        raise ValueError(f"Expected `{path}` to hold at least one row, got only the header")
    cols = list(zip(*rows, strict=True))
    return Certification(
        idx=np.asarray(cols[0], dtype=np.int64),
        label=np.asarray(cols[1], dtype=np.int64),
        predict=np.asarray(cols[2], dtype=np.int64),
        radius=np.asarray(cols[3], dtype=np.float64),
        correct=np.asarray(cols[4], dtype=np.int64),
        time=list(cols[5]),
    )


def table_radii(start: float = 0.25, stop: float = 2.75, step: float = 0.25) -> list[float]:
    """Radii ``start, start + step, ..., stop`` (inclusive), as in Cohen et al.'s tables.

    Example:
        >>> table_radii(0.25, 1.5)
        [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    """
    if not step > 0:
        raise ValueError(f"Expected `step` to be positive, got {step!r}")
    if not 0 <= start <= stop:
        raise ValueError(f"Expected 0 <= `start` <= `stop`, got start={start!r} and stop={stop!r}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [float(start + i * step) for i in range(count)]


def sigma_from_path(path: str | Path) -> float | None:
    """σ read from a file name such as ``noise_0.25_sigma_0.25.tsv`` (the last ``sigma_<number>``), else ``None``.

    Example:
        >>> sigma_from_path("data/noise_0.50_sigma_0.50.tsv")
        0.5
    """
    found = re.findall(r"sigma[_=-]?(\d+(?:\.\d+)?)", Path(path).name)
    return float(found[-1]) if found else None


def sigma_label(sigma: float, html: bool = True) -> str:
    """Row label of a σ, as in Cohen et al.'s published tables.

    Example:
        >>> sigma_label(0.5), sigma_label(0.5, html=False)
        ('&sigma; = 0.50', 'σ = 0.50')
    """
    return f"{'&sigma;' if html else 'σ'} = {sigma:.2f}"


def markdown_table(rows: Mapping[str, Sequence[float] | np.ndarray], radii: Sequence[float]) -> str:
    """Certified accuracies as a markdown table, byte for byte as Cohen et al.'s ``analysis.py`` writes it.

    ``*`` marks, at each radius, the row with the highest accuracy (the first one on ties).

    Args:
        rows: Row label -> certified accuracy at each radius.
        radii: The radii of the columns.

    Example:
        >>> print(markdown_table({"a": [0.5, 0.2], "b": [0.4, 0.3]}, [0.25, 0.5]), end="")
        |  | r = 0.25 |r = 0.5 |
        | --- |  --- | --- |
        <b> a </b>| 0.50<b>*</b> |0.20 |
        <b> b </b>| 0.40 |0.30<b>*</b> |
    """
    if not rows:
        raise ValueError("Expected at least one row in `rows`, got none")
    acc = np.asarray([np.asarray(v, dtype=np.float64) for v in rows.values()])
    if acc.shape[1] != len(radii):
        raise ValueError(f"Expected {len(radii)} accuracies per row (one per radius), got {acc.shape[1]}")
    lines = ["|  | " + "".join(f"r = {float(r):.3} |" for r in radii)]
    lines.append("| --- | " + " --- |" * len(radii))
    best = acc.argmax(axis=0)
    for i, label in enumerate(rows):
        cells = "".join(
            f"{acc[i, j]:.2f}<b>*</b> |" if best[j] == i else f"{acc[i, j]:.2f} |" for j in range(len(radii))
        )
        lines.append(f"<b> {label} </b>| {cells}")
    return "\n".join(lines) + "\n"


def envelope(curves: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
    """Pointwise maximum of certified-accuracy curves on a common radius grid (the best σ at each radius).

    Example:
        >>> envelope([np.array([0.6, 0.2, 0.0]), np.array([0.5, 0.4, 0.1])]).tolist()
        [0.6, 0.4, 0.1]
    """
    values = list(curves.values()) if isinstance(curves, Mapping) else list(curves)
    if not values:
        raise ValueError("Expected at least one curve, got none")
    return np.max(np.stack([np.asarray(v, dtype=np.float64) for v in values]), axis=0)


def plot_certified_accuracy(
    results: Mapping[str, Certification],
    path: str | Path,
    max_radius: float | None = None,
    draw_envelope: bool = True,
    title: str | None = None,
) -> Path:
    """Save a PNG of certified accuracy against radius, one curve per result, plus their upper envelope.

    Args:
        results: Curve label -> certification rows.
        path: Output image.
        max_radius: Right end of the radius axis; default just beyond the largest certified radius.
        draw_envelope: Draw the upper envelope over the curves (when there are at least two).
        title: Plot title.

    Returns:
        The written path.

    Example:
        >>> import tempfile, os
        >>> c = Certification(np.arange(2), np.zeros(2), np.zeros(2), np.array([0.3, 0.8]), np.ones(2), ["0"] * 2)
        >>> plot_certified_accuracy({"σ = 0.25": c}, os.path.join(tempfile.mkdtemp(), "c.png")).suffix
        '.png'
    """
    matplotlib = require("matplotlib", "plot_certified_accuracy", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("Expected at least one certification in `results`, got none")
    if max_radius is None:
        largest = max((float(c.radius.max()) if len(c) else 0.0) for c in results.values())
        max_radius = max(0.25, 1.05 * largest)
    grid = np.linspace(0.0, max_radius, 512)
    curves = {label: c.accuracy_at(grid) for label, c in results.items()}
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for label, curve in curves.items():
            ax.plot(grid, curve, label=label, linewidth=1.5)
        if draw_envelope and len(curves) > 1:
            ax.plot(grid, envelope(curves), "k--", label="upper envelope", linewidth=1.2)
        ax.set_xlabel("ℓ2 radius")
        ax.set_ylabel("certified accuracy")
        ax.set_xlim(0.0, max_radius)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
