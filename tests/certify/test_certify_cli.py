"""``lightning-maxup certify`` end to end on a tiny model trained in the test: the file it writes, resuming a killed
run, and its errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_maxup.certify import smoothing
from lightning_maxup.certify.cli import build_from_config, certify_main
from lightning_maxup.certify.table import read_certification

CONFIG = """
model:
  class_path: lightning_maxup.recipes.models.MaxUpClassifier
  init_args:
    backbone:
      class_path: lightning_maxup.recipes.models.SmallCNN
      init_args: {in_channels: 1, num_classes: 10, width: 8}
    num_classes: 10
    maxup:
      m: 1
      augment:
        class_path: lightning_maxup.augment.GaussianNoise
        init_args: {sigma: 0.25}
      seed: 0
    optimizer: adam
    lr: 0.01
    weight_decay: 0.0
data:
  class_path: lightning_maxup.recipes.datamodules.DigitsDataModule
  init_args: {batch_size: 64, seed: 0}
trainer:
  max_epochs: 1
ckpt_path: null
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("certify_cli")
    config = root / "config.yaml"
    config.write_text(CONFIG)
    torch.manual_seed(0)
    model, data = build_from_config(config)
    data.setup("fit")
    # A plain loop is enough to make the weights worth certifying, and much cheaper than a Trainer here.
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = data.train_set.tensors
    for _ in range(3):
        for b in torch.randperm(len(x), generator=g).split(64):
            noisy = x[b] + 0.25 * torch.randn(x[b].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(noisy), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": pl.__version__}, ckpt)
    return config, ckpt


def test_certify_writes_tsv_table_and_plot(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    argv = ["--config", str(config), "--ckpt", str(ckpt), "--sigma", "0.25", "--n0", "10", "--n", "200"]
    argv += ["--alpha", "0.01", "--batch-size", "512", "--skip", "3", "--max", "30", "--outfile", str(out)]
    argv += ["--no-progress"]
    assert certify_main(argv) == 0
    printed = capsys.readouterr().out
    assert out.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    cert = read_certification(out)
    assert cert.idx.tolist() == list(range(0, 90, 3))
    assert ((cert.predict == cert.label) == (cert.correct == 1)).all()
    assert ((cert.predict == -1) <= (cert.radius == 0)).all()
    assert cert.accuracy_at([0.0])[0] > 0.3, "the checkpoint's trained weights were not certified"
    assert "| r = 0.25 |r = 0.5 |" in printed
    assert "r = 2.75 |" in printed
    assert "&sigma; = 0.25" in printed
    png = out.with_suffix(".png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.png", "cert.tsv"], "partial files left behind"
    # Keyed noise: the same inputs certify identically however they are batched.
    out2 = tmp_path / "cert2.tsv"
    argv2 = [a if a != str(out) else str(out2) for a in argv] + [
        "--inputs-per-batch",
        "7",
        "--plot",
        str(tmp_path / "p.png"),
    ]
    assert certify_main(argv2) == 0
    cert2 = read_certification(out2)
    assert cert2.predict.tolist() == cert.predict.tolist()
    assert cert2.radius.tolist() == cert.radius.tolist()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--sigma", "0"], "Expected `sigma` to be positive, got 0.0", id="sigma-0"),
        pytest.param(["--sigma", "-1"], "Expected `sigma` to be positive, got -1.0", id="sigma-negative"),
        pytest.param(["--sigma", "0.25", "--n0", "0"], "Expected `n0` to be a positive integer, got 0", id="n0"),
        pytest.param(["--sigma", "0.25", "--n", "0"], "Expected `n` to be a positive integer, got 0", id="n"),
        pytest.param(["--sigma", "0.25", "--alpha", "1"], r"Expected `alpha` in (0, 1), got 1.0", id="alpha"),
        pytest.param(["--sigma", "x"], "Expected `sigma` to be a float, got 'x'", id="not-a-number"),
    ],
)
def test_certify_argument_errors(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert certify_main(["--config", "unused.yaml", *extra]) == 2
    assert message in capsys.readouterr().err


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Expected `--config` to be a YAML file, got"):
        build_from_config(tmp_path / "missing.yaml")
    only_model = tmp_path / "m.yaml"
    only_model.write_text(CONFIG.split("data:")[0])
    with pytest.raises(ValueError, match=r"to have `model:` and `data:` sections, missing \['data'\]"):
        build_from_config(only_model)


def test_checkpoint_weights_are_loaded(trained: tuple[Path, Path]) -> None:
    from lightning_maxup.certify.cli import _load_checkpoint

    config, ckpt = trained
    model, _ = build_from_config(config)
    _load_checkpoint(model, ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def _argv(config: Path, ckpt: Path | None, out: Path, *extra: str) -> list[str]:
    argv = ["--config", str(config), *([] if ckpt is None else ["--ckpt", str(ckpt)]), "--sigma", "0.25"]
    argv += ["--n0", "10", "--n", "100", "--alpha", "0.01", "--batch-size", "400", "--max", "24"]
    argv += ["--inputs-per-batch", "4", "--outfile", str(out), "--plot", str(out.with_suffix(".png")), "--no-progress"]
    return [*argv, *extra]


def _rows_but_time(path: Path) -> list[str]:
    """The file's lines without the measured `time` column: what a resumed run must reproduce exactly."""
    return _rows_but_time_of(path.read_text())


def _count_batches(monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> list[int]:
    """Record the size of each batch `certify` certifies; raise KeyboardInterrupt (a Ctrl-C) after `stop_after`."""
    original = smoothing.Smooth.certify_batch
    sizes: list[int] = []

    def certify_batch(self: smoothing.Smooth, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        if len(sizes) == stop_after:
            raise KeyboardInterrupt
        sizes.append(len(x))
        return original(self, x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(smoothing.Smooth, "certify_batch", certify_batch)
    return sizes


@pytest.fixture(scope="module")
def reference(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file of an uninterrupted run with `_argv`'s settings."""
    config, ckpt = trained
    out = tmp_path_factory.mktemp("reference") / "cert.tsv"
    assert certify_main(_argv(config, ckpt, out)) == 0
    assert len(read_certification(out)) == 24
    return out


def _interrupted(config: Path, ckpt: Path, out: Path, batches: int) -> Path:
    """Run certify until `batches` batches are written, then interrupt it; returns the partial file."""
    partial = out.with_name(out.name + ".partial")
    with pytest.MonkeyPatch.context() as mp:
        _count_batches(mp, stop_after=batches)
        assert certify_main(_argv(config, ckpt, out)) == 130
    assert not out.exists(), "an interrupted run left a file under the final name"
    return partial


def test_interrupted_run_resumes_to_the_file_of_an_uninterrupted_run(
    trained: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    partial = _interrupted(config, ckpt, out, batches=2)
    assert capsys.readouterr().err.endswith(
        f"lightning-maxup certify: interrupted after 8 of 24 inputs; rerun the same command to resume from"
        f" {str(partial)!r}\n"
    )
    expected = _rows_but_time(reference)
    assert _rows_but_time(partial) == expected[: 1 + 8]
    assert out.with_name("cert.tsv.partial.json").is_file()
    # As if killed while writing the third batch: one whole row of it, then a torn one.
    lines = reference.read_text().splitlines(keepends=True)
    with partial.open("a") as f:
        f.write(lines[9] + lines[10][:7])
    kept = partial.read_text().splitlines()[1:9]
    capsys.readouterr()
    sizes = _count_batches(monkeypatch)
    assert certify_main(_argv(config, ckpt, out)) == 0
    assert sizes == [4, 4, 4, 4], "the resumed run redid finished batches or split batches differently"
    assert "resuming" in capsys.readouterr().err
    assert _rows_but_time(out) == expected
    assert out.read_text().splitlines()[1:9] == kept, "rows certified before the interruption were rewritten"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.png", "cert.tsv"]


def test_resuming_a_finished_partial_file_certifies_nothing(
    trained: tuple[Path, Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    partial = _interrupted(config, ckpt, out, batches=5)
    # As if killed between writing the last row and renaming the file.
    with partial.open("a") as f:
        f.write("".join(reference.read_text().splitlines(keepends=True)[21:]))
    sizes = _count_batches(monkeypatch)
    assert certify_main(_argv(config, ckpt, out)) == 0
    assert sizes == []
    assert _rows_but_time(out) == _rows_but_time(reference)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--sigma", "0.5"], "(sigma 0.25 there, 0.5 now)", id="sigma"),
        pytest.param(["--n", "200"], "(n 100 there, 200 now)", id="n"),
        pytest.param(["--seed", "3"], "(seed 0 there, 3 now)", id="seed"),
        pytest.param(["--max", "20"], "(max 24 there, 20 now; inputs 24 there, 20 now)", id="max"),
        pytest.param(["--inputs-per-batch", "8"], "(inputs_per_batch 4 there, 8 now)", id="inputs-per-batch"),
    ],
)
def test_resuming_refuses_a_partial_file_of_other_settings(
    extra: list[str], message: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    partial = _interrupted(config, ckpt, out, batches=1)
    before = partial.read_bytes()
    capsys.readouterr()
    assert certify_main([*_argv(config, ckpt, out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the partial file {str(partial)!r} belongs to a run with other settings {message}" in err
    assert "to resume it, or delete" in err
    assert partial.read_bytes() == before
    assert not out.exists()


def test_resuming_refuses_another_checkpoint(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    _interrupted(config, ckpt, out, batches=1)
    other = tmp_path / "other.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, other)
    assert certify_main(_argv(config, other, out)) == 2
    assert "belongs to a run with other settings (ckpt_sha256 '" in capsys.readouterr().err


def test_resuming_refuses_a_partial_file_it_cannot_place(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    partial = _interrupted(config, ckpt, out, batches=1)
    meta = out.with_name("cert.tsv.partial.json")
    header, *rows = partial.read_text().splitlines(keepends=True)
    partial.write_text(header + "".join(rows[1:]))
    assert certify_main(_argv(config, ckpt, out)) == 2
    assert f"the partial file {str(partial)!r} does not hold the first inputs of this run" in capsys.readouterr().err
    meta.unlink()
    assert certify_main(_argv(config, ckpt, out)) == 2
    assert f"but not its settings {str(meta)!r}, so it cannot be resumed" in capsys.readouterr().err
    assert not out.exists()


BAD_YAML = (
    "model:\n  class_path: lightning_maxup.recipes.models.MaxUpClassifier\n  init_args: {num_classes: 10\ndata: 1\n"
)


def _error_case(name: str, tmp_path: Path, config: Path, ckpt: Path) -> list[str]:
    out = tmp_path / "cert.tsv"
    if name == "missing-config":
        return _argv(tmp_path / "missing.yaml", ckpt, out)
    if name == "malformed-yaml":
        (tmp_path / "bad.yaml").write_text(BAD_YAML)
        return _argv(tmp_path / "bad.yaml", ckpt, out)
    if name == "unknown-key":
        (tmp_path / "typo.yaml").write_text(config.read_text().replace("width: 8", "widht: 8"))
        return _argv(tmp_path / "typo.yaml", ckpt, out)
    if name == "missing-ckpt":
        return _argv(config, tmp_path / "missing.ckpt", out)
    if name == "mismatched-ckpt":
        (tmp_path / "narrow.yaml").write_text(config.read_text().replace("width: 8", "width: 4"))
        return _argv(tmp_path / "narrow.yaml", ckpt, out)
    if name == "not-a-ckpt":
        (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
        return _argv(config, tmp_path / "notes.ckpt", out)
    if name == "no-ckpt":
        return _argv(config, None, out)
    assert name == "no-inputs"
    return _argv(config, ckpt, out, "--max", "0")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param("missing-config", "Expected `--config` to be a YAML file, got '", id="missing-config"),
        pytest.param(
            "malformed-yaml", "bad.yaml', line 4, column 5: expected ',' or '}', but got ':'", id="malformed-yaml"
        ),
        pytest.param(
            "unknown-key",
            'typo.yaml\': Parser key "model":'
            " Problem with given class_path 'lightning_maxup.recipes.models.MaxUpClassifier':"
            " Parser key \"backbone\": Problem with given class_path 'lightning_maxup.recipes.models.SmallCNN':"
            " Option 'widht' is not accepted",
            id="unknown-key",
        ),
        pytest.param("missing-ckpt", "Expected `--ckpt` to be a checkpoint file, got '", id="missing-ckpt"),
        pytest.param(
            "mismatched-ckpt",
            "to hold the weights of the config's MaxUpClassifier, got 16 shape mismatches (backbone.features.0.weight"
            " (8, 1, 3, 3) in the checkpoint, (4, 1, 3, 3) in the model,",
            id="mismatched-ckpt",
        ),
        pytest.param("not-a-ckpt", "Could not read `--ckpt` '", id="not-a-ckpt"),
        pytest.param(
            "no-ckpt",
            "no `--ckpt` given: pass the checkpoint to certify, or `--allow-untrained` to certify untrained weights",
            id="no-ckpt",
        ),
        pytest.param("no-inputs", "no inputs to certify: the test split has", id="no-inputs"),
    ],
)
def test_certify_errors_are_one_line_with_status_2(
    case: str, message: str, trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = trained
    assert certify_main(_error_case(case, tmp_path, config, ckpt)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("lightning-maxup certify: error: ")
    assert message in captured.err
    assert not (tmp_path / "cert.tsv").exists()


def test_certify_untrained_weights_only_when_asked(trained: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = trained
    out = tmp_path / "cert.tsv"
    assert certify_main(_argv(config, None, out, "--max", "4", "--allow-untrained")) == 0
    assert len(read_certification(out)) == 4


@pytest.mark.slow
def test_killed_certify_leaves_a_prefix_and_resumes_to_the_uninterrupted_file(
    trained: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    """SIGKILL a `certify` process once its partial file has rows: nothing under the final name, the partial file
    a prefix of the uninterrupted run's, and rerunning the command completes it to that file (but `time`)."""
    config, ckpt = trained
    expected = _rows_but_time(reference)
    out = tmp_path / "cert.tsv"
    partial = out.with_name("cert.tsv.partial")
    argv = [*_argv(config, ckpt, out), "--inputs-per-batch", "1"]
    # The script pauses 50 ms per batch (one input here), so the kill lands mid-run however fast the machine is.
    script = Path(__file__).resolve().parents[1] / "scripts" / "certify_slowly.py"
    paths = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]  # this checkout first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.Popen([sys.executable, str(script), *argv], stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (partial.is_file() and partial.read_bytes().count(b"\n") >= 1 + 3):
            assert proc.poll() is None, f"certify ended before it could be killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "certify wrote no rows in 300 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run left a file under the final name"
    text = partial.read_text()
    complete, torn = text[: text.rfind("\n") + 1], text[text.rfind("\n") + 1 :]
    done = _rows_but_time_of(complete)
    assert 1 + 3 <= len(done) < len(expected), "the kill did not land mid-run"
    assert done == expected[: len(done)]
    assert torn[: len(expected[len(done)])] == expected[len(done)][: len(torn)], "the torn line is not a prefix"
    assert certify_main(argv) == 0
    assert _rows_but_time(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.png", "cert.tsv"]


def _rows_but_time_of(text: str) -> list[str]:
    return [line.rsplit("\t", 1)[0] for line in text.splitlines()]
