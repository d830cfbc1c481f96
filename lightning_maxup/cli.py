"""Deprecated since 0.4.0: the old path of what is now in ``lightning_maxup.apps.cli``.

``lightning_maxup.cli`` moved to ``lightning_maxup.apps.cli``. The old path keeps working (imports, ``class_path``
in configs, pickles and checkpoints) with a :class:`DeprecationWarning` naming the new one.
"""

# relayout: shim (written by the re-layout script of issue 23; see lightning_maxup/_moved.py)

from __future__ import annotations

from typing import Any

from lightning_maxup._moved import MOVED, moved_attribute


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name)


def __dir__() -> list[str]:
    return sorted(MOVED.get(__name__, {}))


if __name__ == "__main__":
    import runpy
    import warnings

    warnings.warn(
        "`python -m lightning_maxup.cli` is deprecated since 0.4.0: use `python -m lightning_maxup.apps.cli`.",
        DeprecationWarning,
        stacklevel=1,
    )
    runpy.run_module("lightning_maxup.apps.cli", run_name="__main__", alter_sys=True)
