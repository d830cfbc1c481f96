"""Let the library's option objects load from checkpoints under ``torch.load(weights_only=True)``.

Lightning resumes with ``weights_only=True`` by default (torch >= 2.6). A module that calls
``save_hyperparameters()`` stores its ``MaxUpConfig`` and augmentation in the checkpoint, and the restricted
unpickler refuses any class it was not told about. These classes hold plain attributes and define no custom
unpickling code, so allowing them keeps the guarantee ``weights_only`` gives: loading runs no code of the file's.
A class that moved in 0.4.0 is allowed under its old dotted path too, so checkpoints saved before still load.
"""

from __future__ import annotations

import torch

from lightning_maxup._moved import legacy_names

__all__ = ["allow_in_checkpoints"]


def allow_in_checkpoints(*classes: type) -> None:
    """Allow ``classes`` in ``torch.load(weights_only=True)`` (a no-op on torch without ``add_safe_globals``).

    Each class is allowed under its path and under the paths it had before 0.4.0 (``lightning_maxup._moved``).

    Example:
        >>> class Options:
        ...     pass
        >>> allow_in_checkpoints(Options)
    """
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([*classes, *((cls, old) for cls in classes for old in legacy_names(cls))])
