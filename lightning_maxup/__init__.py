"""MaxUp training for PyTorch Lightning.

MaxUp (Gong, Ren, Ye & Liu, CVPR 2021, arXiv:2002.09024) minimises, for each training sample, the worst loss over
``m`` random augmentations. Subclass your LightningModule with :class:`MaxUpMixin`, implement
``per_sample_loss``, and add the :class:`MaxUp` callback to the Trainer for the warm-up schedule;
:func:`maxup_step` is the same step as a plain function, and :class:`MaxUpConfig` holds every option.
"""

from lightning_maxup.batch import Candidates, Shared
from lightning_maxup.callback import MaxUp
from lightning_maxup.config import MaxUpConfig
from lightning_maxup.fidelity import SelectionFidelity, WorstOfKValidation
from lightning_maxup.functional import MaxUpOutput, maxup_step
from lightning_maxup.metrics import WorstOfKAccuracy, worst_of_k_accuracy
from lightning_maxup.mixin import MaxUpMixin
from lightning_maxup.monitor import SelectionMonitor
from lightning_maxup.views import Downsample, PointSubset

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
