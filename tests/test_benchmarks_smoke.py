"""Smoke tests of the benchmarks: they run end to end and write what they promise. Nothing is timed here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def step_cost(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("step_cost")


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("_common")


@pytest.mark.slow
def test_step_cost_quick_run_writes_json_plot_and_doc(step_cost: ModuleType, tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text(
        "# x\n<!-- step-cost-table:start -->\nSTALE-TABLE\n<!-- step-cost-table:end -->\n"
        "<!-- step-cost-profile:start -->\n<!-- step-cost-profile:end -->\ntail\n"
    )
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    argv = [
        "--model",
        "small",
        "--size",
        "8",
        "--low-size",
        "4",
        "--batch",
        "4",
        "--ms",
        "1",
        "2",
        "--quick",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--pgd-steps",
        "1",
        "--trick-m",
        "2",
        "--profile",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--doc",
        str(doc),
    ]
    step_cost.main(argv)

    result = json.loads(out.read_text())
    assert {
        "config",
        "environment",
        "timings",
        "median_s",
        "ratio_to_erm",
        "cost_model",
        "trick_speedup",
        "targets",
        "table_markdown",
        "profile",
    } <= set(result)
    expected = {
        "erm",
        "maxup/full/m1",
        "selection/full/m2",
        "selection/low/m2",
        "maxup/full/m2",
        "maxup/low/m2",
        "all_grad/m2",
        "loop/m2",
        "aug_mean/m2",
        "pgd1",
    }
    assert expected <= set(result["timings"])
    assert all(len(t["seconds"]) == 1 for t in result["timings"].values())
    assert {"full/m2", "low/m2"} <= set(result["cost_model"])
    assert result["ratio_to_erm"]["erm"] == pytest.approx(1.0)
    assert {"maxup_m1_vs_erm", "maxup_m2_faster_than_all_grad", "maxup_m2_faster_than_loop"} <= set(result["targets"])
    assert set(result["profile"]) == {"full", "low"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = doc.read_text()
    assert "STALE-TABLE" not in text
    assert result["table_markdown"].strip() in text
    assert "Top operators" in text
    assert text.endswith("tail\n")


def test_parse_args_defaults_and_quick(step_cost: ModuleType) -> None:
    args = step_cost.parse_args([])
    assert (args.model, args.size, args.low_size, args.batch, args.ms) == ("resnet20", 32, 16, 128, [1, 2, 4, 10])
    quick = step_cost.parse_args(["--quick", "--model", "resnet50"])
    assert (quick.size, quick.low_size, quick.ms, quick.repeats) == (224, 96, [1, 2, 4], 3)


def test_resnet20_has_the_paper_size(step_cost: ModuleType) -> None:
    net = step_cost.resnet20()
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(0.27e6, rel=0.02)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_time_interleaved_skips_out_of_memory_cases(common: ModuleType) -> None:
    calls: list[str] = []

    def oom() -> None:
        calls.append("oom")
        raise torch.OutOfMemoryError("CUDA out of memory")

    res = common.time_interleaved({"ok": lambda: calls.append("ok"), "oom": oom}, device="cpu", repeats=3, warmup=1)
    assert len(res["ok"].seconds) == 3
    assert res["ok"].skipped is None
    assert res["oom"].skipped == "out of memory"
    assert res["oom"].seconds == []
    assert calls.count("oom") == 1
    assert calls.count("ok") == 4


def test_time_interleaved_validates_arguments(common: ModuleType) -> None:
    with pytest.raises(ValueError, match="`repeats`"):
        common.time_interleaved({}, device="cpu", repeats=0)
    with pytest.raises(ValueError, match="`warmup`"):
        common.time_interleaved({}, device="cpu", repeats=1, warmup=-1)


def test_replace_between_markers_leaves_unmarked_files_alone(common: ModuleType, tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("no markers\n")
    assert not common.replace_between_markers(doc, "x", "table")
    assert doc.read_text() == "no markers\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        pytest.param("selection_fidelity.py", ["--json", "sf.json", "--plot", "sf.png"], id="selection-fidelity"),
        pytest.param("certify_speed.py", ["--json", "cs.json"], id="certify-speed"),
    ],
)
def test_benchmark_quick_run_prints_a_table_and_writes_json(script: str, outputs: list[str], tmp_path: Path) -> None:
    import subprocess
    import sys

    args = [a if not a.endswith((".json", ".png")) else str(tmp_path / a) for a in outputs]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "|" in proc.stdout, "the benchmark must print its table"
    for a in args:
        if a.endswith(".json"):
            assert json.loads(Path(a).read_text())
        if a.endswith(".png"):
            assert Path(a).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
