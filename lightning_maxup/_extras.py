"""Optional dependencies, imported where they are used, with an error that names the extra to install.

The base install is torch, torchvision, Lightning, torchmetrics, jsonargparse and typing_extensions. SciPy,
scikit-learn and matplotlib come with extras (``pyproject.toml``): ``demo`` (all three), ``certify`` (SciPy),
``study`` (SciPy and matplotlib) and ``plots`` (matplotlib). No module of the package imports them at import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["PACKAGES", "require"]

#: The pip name of each optional top-level module.
PACKAGES = {"scipy": "scipy", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def require(module: str, what: str, extra: str) -> ModuleType:
    """Import ``module``; when its package is missing, say in one line which extra of lightning_maxup installs it.

    Args:
        module: Dotted module name, e.g. ``"scipy.stats"``.
        what: What needs it, for the message (``"lightning-maxup demo"``, ``"paired_interval"``).
        extra: The extra of ``lightning_maxup`` that installs it.

    Raises:
        ModuleNotFoundError: ``module``'s package is not installed; the message names ``extra``.

    Example:
        >>> require("math", "this example", "demo").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        root = module.partition(".")[0]
        if err.name is None or err.name.partition(".")[0] != root:
            raise  # the package is there, but something it imports is not: its own error says what
        package = PACKAGES.get(root, root)
        raise ModuleNotFoundError(
            f'{what} needs {package}: pip install "lightning_maxup[{extra}]"', name=err.name
        ) from None
