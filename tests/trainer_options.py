"""The quiet, CPU-only Trainer options the Lightning tests share (no logger, checkpoints, bars or summaries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quiet_trainer_options(tmp_path: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a ``Trainer`` that trains 2 epochs on the CPU and writes nothing unless asked to."""
    options: dict[str, Any] = {
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    return {**options, **overrides}
