"""Smoke tests of the benchmarks: they run end to end and write what they promise. Nothing is timed here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


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
        pytest.param("fidelity_overhead.py", ["--json", "fo.json"], id="fidelity-overhead"),
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


@pytest.mark.slow
def test_selection_fidelity_quick_run_scores_generated_images_and_the_digits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    selection_fidelity = importlib.import_module("selection_fidelity")
    threads = torch.get_num_threads()
    doc = tmp_path / "bench.md"
    doc.write_text("<!-- selection-fidelity-table:start -->\nSTALE\n<!-- selection-fidelity-table:end -->\n")
    argv = ["--quick", "--json", str(tmp_path / "sf.json"), "--plot", str(tmp_path / "sf.png"), "--doc", str(doc)]
    try:
        results = selection_fidelity.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ResNet-8 on generated 32 px images" in out
    assert "Real images: ResNet-8 on the bundled handwritten digits" in out
    for data in (results, results["digits"]):
        for stage in ("early", "late"):
            rows = data["checkpoints"][stage]["rows"]
            assert rows["32px"]["agreement"] == 1.0  # the full pass against itself
            assert rows["32px"]["regret"] == 0.0
            assert all(0.0 <= r["agreement"] <= 1.0 for r in rows.values())
    assert "STALE" not in doc.read_text()
    assert "handwritten digits" in doc.read_text()
    assert json.loads((tmp_path / "sf.json").read_text())["digits"]["samples"] == 528
    assert (tmp_path / "sf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regimes_tiny_grid_prints_gain_maps_and_reads_test_only_for_confirmed_cells(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    regimes = importlib.import_module("regimes")
    threads = torch.get_num_threads()
    markers = ["regimes-run", "regimes-screen-clean", "regimes-screen-wok", "regimes-confirm", "regimes-test"]
    doc = tmp_path / "regimes.md"
    doc.write_text("".join(f"<!-- {m}:start -->\nSTALE\n<!-- {m}:end -->\n" for m in markers))
    argv = [
        "--augments", "crop", "--optimizers", "sgd", "--ms", "2", "--sweep", "1", "--screen-seeds", "2",
        "--confirm-seeds", "2", "--epochs", "2", "--warmup", "1", "--per-class", "2", "--k", "2",
        "--json", str(tmp_path / "r.json"), "--figure", str(tmp_path / "r.png"), "--doc", str(doc),
    ]  # fmt: skip
    try:
        assert regimes.main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "torch threads: 1 intra-op" in out
    assert "| crop, SGD |" in out  # a gain-map row
    assert "m=2 half max" in out  # a gain-map column: the half-resolution view
    assert "| crop, SGD, m=2, τ=1 |" in out  # the temperature sweep was confirmed
    assert "STALE" not in doc.read_text()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((tmp_path / "r.json").read_text())["scores"]
    screen, confirm = [s for s in scores if s["seed"] < 1000], [s for s in scores if s["seed"] >= 1000]
    assert len(screen) == 2 * 5  # (m=1 + m=2 x 2 views x 2 rules) x 2 seeds
    assert all(s["test_acc"] is None for s in screen)  # the test split is read for confirmed cells only
    assert confirm
    assert all(0 <= s["test_acc"] <= 1 for s in confirm)

    redrawn = tmp_path / "redrawn.md"
    redrawn.write_text(doc.read_text())
    assert (
        regimes.main(
            ["--from-json", str(tmp_path / "r.json"), "--figure", str(tmp_path / "r2.png"), "--doc", str(redrawn)]
        )
        == 0
    )
    assert redrawn.read_text() == doc.read_text()  # the saved scores give back the run's tables, without training
    assert (tmp_path / "r2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pipelines_quick_run_prints_the_table_threads_and_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    pipelines = importlib.import_module("pipelines")
    doc = tmp_path / "pipelines.md"
    doc.write_text("# x\n<!-- pipelines-table:start -->\nSTALE\n<!-- pipelines-table:end -->\ntail\n")
    threads = torch.get_num_threads()
    try:
        result = pipelines.main(["--quick", "--json", str(tmp_path / "p.json"), "--doc", str(doc)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "STALE" not in doc.read_text()
    assert result["table_markdown"] in doc.read_text()
    assert doc.read_text().endswith("tail\n")
    assert "torch threads: 1 intra-op in this process, 1 per DataLoader worker" in out
    assert "load average before:" in out
    assert "load average after:" in out
    names = ["multiview/0 workers", "multiview/1 workers", "multiview/2 workers", "adapter (training process)"]
    for name in [*names, "built-in batched RandAugment"]:
        assert f"| {name} |" in out
        assert result["images_per_second"][name] > 0
    assert set(result["targets"]) == {"workers2_vs_workers0", "workers2_vs_adapter"}
    assert json.loads((tmp_path / "p.json").read_text())["candidates_per_pass"] == 4 * 4 * 4  # 4 batches of 4, m=4
