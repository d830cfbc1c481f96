"""The ``lightning-maxup`` command: usage, the demo and LightningCLI training from YAML."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

import lightning_maxup
from lightning_maxup.apps.cli import main

CONFIG = textwrap.dedent(
    """
    seed_everything: 0
    trainer:
      max_epochs: 2
      limit_train_batches: 3
      limit_val_batches: 1
      accelerator: cpu
      logger: false
      enable_progress_bar: false
      enable_checkpointing: false
      callbacks:
        - class_path: lightning_maxup.MaxUp
          init_args: {warmup_epochs: 1, m: 3, selection_size: 4}
        - class_path: tests.apps.test_cli.RecordM
    model:
      class_path: lightning_maxup.recipes.models.MaxUpClassifier
      init_args:
        backbone:
          class_path: lightning_maxup.recipes.models.SmallCNN
          init_args: {in_channels: 1, num_classes: 10, width: 4}
        num_classes: 10
        maxup:
          m: 2
          augment:
            class_path: lightning_maxup.augment.Compose
            init_args:
              augmentations:
                - class_path: lightning_maxup.augment.RandomCrop
                  init_args: {size: 8, padding: 1}
                - class_path: lightning_maxup.augment.Cutout
                  init_args: {size: 3}
        optimizer: adam
        lr: 0.003
    data:
      class_path: lightning_maxup.recipes.datamodules.DigitsDataModule
      init_args: {batch_size: 16}
    """
)

RECORDED: list[tuple[int, int, int | None]] = []


class RecordM(Callback):
    """Records the module's MaxUp settings at every batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RECORDED.append((trainer.current_epoch, pl_module.maxup_active_m, pl_module.maxup_selection_size))


def test_usage(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main([]) == 2


def test_unknown_command(capsys):
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


# Lightning 2.6's LightningCLI calls methods jsonargparse 4.49+ deprecates (`add_instantiator`, `instantiate_classes`):
# DeprecationWarnings raised at pytorch_lightning/cli.py, which Python's default filters hide from users.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli")
# jsonargparse 4.51+ deprecates instantiating a class_path given for a parameter typed to accept any value; the
# augmentation parameters' types are the core package's to change (reported), not this test's.
@pytest.mark.filterwarnings("ignore:(?s).*Instantiating a subclass spec given as value for a type that accepts any")
def test_fit_from_yaml_sets_m_augmentation_warmup_and_selection_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    RECORDED.clear()
    assert main(["fit", "--config", str(path)]) == 0
    assert RECORDED == [(0, 1, 4)] * 3 + [(1, 3, 4)] * 3


@pytest.mark.slow
def test_demo_runs_from_the_console_script(tmp_path):
    exe = Path(sys.executable).with_name("lightning-maxup")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_maxup.apps.cli"]
    proc = subprocess.run(
        [*cmd, "demo", "--quick", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| best: " in proc.stdout  # the demo's two regimes, 2 seeds each in quick mode
    assert "| worst: " in proc.stdout


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--k", "0"])
    assert "`--k` must be at least 1, got 0" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lightning-maxup {lightning_maxup.__version__}\n"


def test_fit_help_emits_no_warning(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The console script's situation: `main()` reads sys.argv, which holds the arguments LightningCLI is given.
    monkeypatch.setattr(sys, "argv", ["lightning-maxup", "fit", "--help-all"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            main()
    assert exit_info.value.code == 0
    assert [str(w.message) for w in caught] == []
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: lightning-maxup [options] fit")
    assert captured.err == ""


@pytest.mark.slow
def test_console_script_fit_help_prints_nothing_on_stderr() -> None:
    exe = Path(sys.executable).with_name("lightning-maxup")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_maxup.apps.cli"]
    proc = subprocess.run([*cmd, "fit", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert "--trainer.max_epochs" in proc.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            "trainer:\n  max_epochs: [1\nmodel: 2\n",
            'Problems parsing config: while parsing a flow sequence in "<unicode string>", line 2, column 15',
            id="malformed-yaml",
        ),
        pytest.param(
            "trainer:\n  max_epochz: 1\n",
            "Subcommand 'fit' does not accept option 'trainer.max_epochz'",
            id="unknown-key",
        ),
    ],
)
def test_fit_config_errors_show_the_message_then_a_pointer_to_help(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    assert main(["fit", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("lightning-maxup fit: error: ")
    assert message in " ".join(" ".join(lines).split())
    assert lines[-1] == "Run 'lightning-maxup fit --help' for the accepted options."
    assert "usage:" not in captured.err
    assert len(lines) <= 6, captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--help"], id="top-level"),
        pytest.param(["fit", "--help"], id="fit"),
        pytest.param(["certify", "--help"], id="certify"),
        pytest.param(["certify-table", "--help"], id="certify-table"),
    ],
)
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-maxup")
    for markup in ("``", ":class:", ":func:", ":meth:", "`"):
        assert markup not in out, f"{markup!r} in the help text"


def test_fit_refuses_a_truncated_checkpoint_in_one_line(tmp_path, capsys):
    config = Path(__file__).resolve().parents[2] / "examples" / "configs" / "digits.yaml"
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:2000])
    code = main(["fit", "--config", str(config), "--ckpt_path", str(truncated), "--trainer.max_epochs=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a readable checkpoint (truncated or corrupted?)" in err
    assert "truncated.ckpt" in err
    assert "Traceback" not in err


# ---- The CLI shows the library: its classes on `fit --help`, by short name, and one summary after `fit` ----


def _library_classes_by_kind() -> dict[str, set[str]]:
    """Every public LightningModule, LightningDataModule and Callback the package defines, found by importing it."""
    import importlib
    import inspect
    import pkgutil

    from lightning_maxup._lightning import Callback as LibraryCallback
    from lightning_maxup._lightning import pl

    found: dict[str, set[str]] = {"model": set(), "data": set(), "callback": set()}
    kinds = {"model": pl.LightningModule, "data": pl.LightningDataModule, "callback": LibraryCallback}
    for info in pkgutil.walk_packages(lightning_maxup.__path__, "lightning_maxup."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            for kind, base in kinds.items():
                if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__.startswith("lightning_maxup."):
                    found[kind].add(f"{obj.__module__}.{obj.__qualname__}")
    return found


def test_library_classes_list_every_model_data_module_and_callback() -> None:
    import importlib
    import inspect

    from lightning_maxup.apps._cli_help import LIBRARY_CLASSES, _plain, summary

    listed: dict[str, set[str]] = {"model": set(), "data": set(), "callback": set(), "network": set()}
    for entry in LIBRARY_CLASSES:
        module, _, name = entry.path.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        assert obj.__module__ == entry.module, entry
        doc = inspect.getdoc(obj) or ""
        assert summary(entry) == _plain(" ".join(doc.split("\n\n")[0].split())), entry
        listed[entry.kind].add(f"{obj.__module__}.{obj.__qualname__}")
    expected = _library_classes_by_kind()
    expected["model"].discard("lightning_maxup.recipes.models.classifier.Classifier")  # a base class: it does not train
    for kind, classes in expected.items():
        assert listed[kind] == classes, f"{kind}: missing {classes - listed[kind]}, extra {listed[kind] - classes}"


def test_fit_help_names_the_library_classes_without_importing_torch() -> None:
    from lightning_maxup.apps._cli_help import LIBRARY_CLASSES

    script = (
        "import sys; from lightning_maxup.apps.cli import main; code = main(['fit', '--help']); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytorch_lightning', 'lightning')); "
        "print('exit', code, 'heavy', heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stderr == ""
    assert proc.stdout.rstrip().endswith("exit 0 heavy []"), proc.stdout[-500:]
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.strip()}
    missing = {entry.name for entry in LIBRARY_CLASSES} - listed
    assert not missing, f"not on `fit --help`: {sorted(missing)}"
    assert "  Cutout" in proc.stdout or "Cutout," in proc.stdout  # the augmentations' line


@pytest.mark.slow
def test_fit_help_all_is_lightning_cli_help_with_the_library_classes_and_the_common_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lightning_maxup.apps._cli_help import COMMON_OPTIONS, LIBRARY_CLASSES

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help-all"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    out = out.replace(" ", "")  # jsonargparse wraps long class paths mid-name
    unknown = [e.path for e in LIBRARY_CLASSES if e.kind != "network" and e.path.replace(" ", "") not in out]
    assert not unknown, f"not among LightningCLI's known subclasses: {unknown}"
    for option, _ in COMMON_OPTIONS:
        flag = option.split()[-2] if option.startswith("-c") else option.split()[0]
        assert flag in out, f"{flag} (listed on `fit --help`) is not a LightningCLI option"


@pytest.mark.slow
def test_short_names_resolve_in_a_fresh_process() -> None:
    # A fresh process: the library's modules are imported by the CLI itself, not by an earlier test.
    argv = ["--model", "MaxUpClassifier", "--model.backbone", "SmallCNN", "--model.num_classes", "10"]
    argv += ["--data", "DigitsDataModule", "--trainer.callbacks+", "MaxUp", "--trainer.callbacks+", "EpochTimer"]
    script = (
        f"import sys; from lightning_maxup.apps.cli import main; sys.exit(main(['fit', *{argv!r}, '--print_config']))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = {line.split("class_path: ")[1] for line in proc.stdout.splitlines() if "class_path: " in line}
    expected = {"lightning_maxup.recipes.models.MaxUpClassifier", "lightning_maxup.recipes.models.SmallCNN"}
    expected |= {
        "lightning_maxup.recipes.datamodules.DigitsDataModule",
        "lightning_maxup.MaxUp",
        "lightning_maxup.callbacks.timing.EpochTimer",
    }
    assert expected <= resolved, proc.stdout


SHORT_NAMES = textwrap.dedent(
    """
    seed_everything: 0
    trainer:
      max_epochs: 2
      limit_train_batches: 3
      limit_val_batches: 2
      accelerator: cpu
      enable_progress_bar: false
      enable_model_summary: false
      callbacks:
        - class_path: MaxUp
          init_args: {warmup_epochs: 1}
        - class_path: WorstOfKValidation
          init_args:
            k: 2
            augment: {class_path: lightning_maxup.augment.RandomCrop, init_args: {size: 8, padding: 1}}
    model:
      class_path: MaxUpClassifier
      init_args:
        backbone: {class_path: SmallCNN, init_args: {in_channels: 1, num_classes: 10, width: 4}}
        num_classes: 10
        maxup:
          m: 2
          augment: {class_path: lightning_maxup.augment.RandomCrop, init_args: {size: 8, padding: 1}}
    data:
      class_path: DigitsDataModule
      init_args: {batch_size: 16}
    """
)


def _summary_values(out: str) -> dict[str, str]:
    line = next(line for line in out.splitlines() if line.startswith("  validation: "))
    items = line.removeprefix("  validation: ").split(", ")
    return dict(item.split(" ") for item in items)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli")
@pytest.mark.filterwarnings("ignore:(?s).*Instantiating a subclass spec given as value for a type that accepts any")
def test_fit_by_short_names_logs_to_csv_without_warning_and_prints_one_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    import lightning_fabric.loggers.tensorboard as fabric_tb
    import pytorch_lightning.trainer.connectors.logger_connector.logger_connector as connector

    import lightning_maxup.apps.cli as cli

    # A machine without tensorboard: Lightning's default would warn and fall back to CSV; the CLI picks CSV itself.
    monkeypatch.setattr(cli, "_tensorboard_available", lambda: False, raising=False)
    for module in (connector, fabric_tb):
        monkeypatch.setattr(module, "_TENSORBOARD_AVAILABLE", False)
        monkeypatch.setattr(module, "_TENSORBOARDX_AVAILABLE", False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(SHORT_NAMES)
    assert main(["fit", "--config", "config.yaml"]) == 0  # any warning is an error (pyproject's filterwarnings)
    out = capsys.readouterr().out
    summary = out[out.index("lightning-maxup fit finished: ") :].splitlines()
    assert summary[0] == "lightning-maxup fit finished: epochs 2, steps 6"
    printed = _summary_values(out)
    assert set(printed) == {"val/acc", "val/loss", "val/worst_of_2_acc"}
    log_dir = Path(summary[-1].removeprefix("  logs: "))
    with (log_dir / "metrics.csv").open() as file:
        last = [row for row in csv.DictReader(file) if row.get("val/acc")][-1]  # what the CSV logger wrote
    assert printed == {name: f"{float(last[name]):.4g}" for name in printed}
    checkpoint = Path(summary[2].rpartition(": ")[2])
    assert checkpoint.is_file()
    assert checkpoint.parent == log_dir / "checkpoints"
    assert not list(log_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli")
@pytest.mark.filterwarnings("ignore:(?s).*Instantiating a subclass spec given as value for a type that accepts any")
def test_fit_logs_to_tensorboard_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the dev and tensorboard extras)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(SHORT_NAMES)
    assert main(["fit", "--config", "config.yaml", "--trainer.limit_train_batches=1"]) == 0
    log_dir = Path(capsys.readouterr().out.splitlines()[-1].removeprefix("  logs: "))
    assert list(log_dir.glob("events.out.tfevents.*")), sorted(p.name for p in log_dir.iterdir())


@pytest.mark.parametrize("tensorboard", [False, True], ids=["csv", "tensorboard"])
def test_default_logger_belongs_to_the_cli_namespace(
    tensorboard: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_maxup.apps.cli as cli
    from lightning_maxup._lightning import installed

    monkeypatch.setattr(cli, "_tensorboard_available", lambda: tensorboard)
    for module in installed().values():
        logger = cli._default_logger(module, str(tmp_path))
        expected = module.loggers.TensorBoardLogger if tensorboard else module.loggers.CSVLogger
        assert type(logger) is expected
        assert Path(logger.save_dir) == tmp_path
