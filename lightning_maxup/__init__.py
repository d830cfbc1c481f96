"""MaxUp training for PyTorch Lightning.

MaxUp (Gong, Ren, Ye & Liu, CVPR 2021, arXiv:2002.09024) minimises, for each training sample, the worst loss over
``m`` random augmentations. Subclass your LightningModule with :class:`MaxUpMixin`, implement
``per_sample_loss``, and add the :class:`MaxUp` callback to the Trainer for the warm-up schedule;
:func:`maxup_step` is the same step as a plain function, and :class:`MaxUpConfig` holds every option.

The names below load on first use, so ``import lightning_maxup`` alone (and the ``lightning-maxup`` command's
short help) does not import torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_maxup.callbacks.monitor import SelectionMonitor
    from lightning_maxup.core.batch import Candidates, Shared
    from lightning_maxup.core.config import MaxUpConfig
    from lightning_maxup.core.functional import MaxUpOutput, maxup_step
    from lightning_maxup.core.views import Downsample, PointSubset
    from lightning_maxup.evaluation.fidelity import SelectionFidelity
    from lightning_maxup.evaluation.worst_of_k import WorstOfKAccuracy, WorstOfKValidation, worst_of_k_accuracy
    from lightning_maxup.training.callback import MaxUp
    from lightning_maxup.training.mixin import MaxUpMixin

__all__ = [
    "Candidates",
    "Downsample",
    "MaxUp",
    "MaxUpConfig",
    "MaxUpMixin",
    "MaxUpOutput",
    "PointSubset",
    "SelectionFidelity",
    "SelectionMonitor",
    "Shared",
    "WorstOfKAccuracy",
    "WorstOfKValidation",
    "maxup_step",
    "worst_of_k_accuracy",
]
__version__ = "0.3.0"

# The module defining each public name (the imports above, for type checkers and the API docs).
_DEFINED_IN = {
    "Candidates": "core.batch",
    "Downsample": "core.views",
    "MaxUp": "training.callback",
    "MaxUpConfig": "core.config",
    "MaxUpMixin": "training.mixin",
    "MaxUpOutput": "core.functional",
    "PointSubset": "core.views",
    "SelectionFidelity": "evaluation.fidelity",
    "SelectionMonitor": "callbacks.monitor",
    "Shared": "core.batch",
    "WorstOfKAccuracy": "evaluation.worst_of_k",
    "WorstOfKValidation": "evaluation.worst_of_k",
    "maxup_step": "core.functional",
    "worst_of_k_accuracy": "evaluation.worst_of_k",
}


def __getattr__(name: str) -> Any:
    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a submodule, as `lightning_maxup.core.functional` after a bare import
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
