"""Certified ℓ2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

:class:`Smooth` is the smoothed classifier (PREDICT and CERTIFY, batched across inputs);
:class:`CertifiedAccuracy` is the torchmetrics metric for ``test_step``; :mod:`~lightning_maxup.certify.table`
reads and writes certification files in Cohen et al.'s format and builds their tables and plots;
:mod:`~lightning_maxup.certify.recipes` holds the training recipes (Gaussian augmentation, MaxUp + Gauss,
SmoothAdv) and :class:`SmoothedCertifier`. The command line is ``lightning-maxup certify`` and
``lightning-maxup certify-table``.
"""

from lightning_maxup.certify.functional import (
    ABSTAIN,
    certified_accuracy,
    certified_radius,
    certify_from_counts,
    clopper_pearson_lower,
    clopper_pearson_upper,
    predict_from_counts,
    sample_counts,
    smooth_adv_attack,
)
from lightning_maxup.certify.metric import TABLE_RADII, CertifiedAccuracy
from lightning_maxup.certify.recipes import (
    MAXUP_GAUSS_M_GRID,
    SIGMA_GRID,
    SmoothAdvClassifier,
    SmoothedCertifier,
    gaussian_classifier,
    maxup_gauss_classifier,
)
from lightning_maxup.certify.smoothing import Smooth
from lightning_maxup.certify.table import (
    Certification,
    markdown_table,
    plot_certified_accuracy,
    read_certification,
    table_radii,
    write_certification,
)

__all__ = [
    "ABSTAIN",
    "MAXUP_GAUSS_M_GRID",
    "SIGMA_GRID",
    "TABLE_RADII",
    "Certification",
    "CertifiedAccuracy",
    "Smooth",
    "SmoothAdvClassifier",
    "SmoothedCertifier",
    "certified_accuracy",
    "certified_radius",
    "certify_from_counts",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "gaussian_classifier",
    "markdown_table",
    "maxup_gauss_classifier",
    "plot_certified_accuracy",
    "predict_from_counts",
    "read_certification",
    "sample_counts",
    "smooth_adv_attack",
    "table_radii",
    "write_certification",
]
