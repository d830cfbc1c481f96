"""The ``lightning-maxup`` command: usage, the demo and LightningCLI training from YAML."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import Callback

from lightning_maxup.cli import main
from lightning_maxup.demo import DemoResult, format_table

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
        - class_path: tests.test_cli.RecordM
    model:
      class_path: lightning_maxup.models.MaxUpClassifier
      init_args:
        backbone:
          class_path: lightning_maxup.models.SmallCNN
          init_args: {in_channels: 1, num_classes: 10, width: 4}
        num_classes: 10
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
      class_path: lightning_maxup.data.DigitsDataModule
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


def test_fit_from_yaml_sets_m_augmentation_warmup_and_selection_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    RECORDED.clear()
    assert main(["fit", "--config", str(path)]) == 0
    assert RECORDED == [(0, 1, 4)] * 3 + [(1, 3, 4)] * 3


def test_format_table():
    rows = [
        DemoResult("ordinary augmentation", 0, 0.9, 1.0, 0.0),
        DemoResult("ordinary augmentation", 1, 0.8, 1.0, 0.0),
        DemoResult("MaxUp (m=4)", 0, 0.95, 2.0, 0.5),
    ]
    table = format_table(rows)
    assert "| ordinary augmentation | 2 | 85.00 ± 7.07 % | 1.000 | 1.00x | 0 % |" in table
    assert "| MaxUp (m=4) | 1 | 95.00 ± 0.00 % | 2.000 | 2.00x | 50 % |" in table


@pytest.mark.slow
def test_demo_runs_from_the_console_script():
    exe = Path(sys.executable).with_name("lightning-maxup")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_maxup.cli"]
    proc = subprocess.run(
        [*cmd, "demo", "--epochs", "2", "--warmup", "1", "--seeds", "0", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| ordinary augmentation | 1 |" in proc.stdout
    assert "| MaxUp (m=4) | 1 |" in proc.stdout


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--m", "1"])
    assert "`--m` must be at least 2" in capsys.readouterr().err
