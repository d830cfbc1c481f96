"""Deprecated since 0.4.0: the old path of what is now in several modules.

``lightning_maxup.metrics`` moved to ``lightning_maxup.evaluation.fidelity``,
``lightning_maxup.evaluation.worst_of_k``. The old path keeps working (imports, ``class_path`` in configs, pickles
and checkpoints) with a :class:`DeprecationWarning` naming the new one.
"""

# relayout: shim (written by the re-layout script of issue 23; see lightning_maxup/_moved.py)

from __future__ import annotations

from typing import Any

from lightning_maxup._moved import MOVED, moved_attribute


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name)


def __dir__() -> list[str]:
    return sorted(MOVED.get(__name__, {}))
