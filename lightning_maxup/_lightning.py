"""The Lightning namespace: ``pytorch_lightning`` or ``lightning.pytorch``, the same code under two names.

Lightning ships as ``pytorch-lightning`` (``import pytorch_lightning``) and inside ``lightning``
(``import lightning.pytorch``). Their classes are distinct: a ``pytorch_lightning`` Trainer refuses a
``lightning.pytorch`` LightningModule. The library meets both this way:

* :class:`~lightning_maxup.MaxUpMixin` and :func:`~lightning_maxup.maxup_step` use no Lightning class, so
  ``class M(MaxUpMixin, L.LightningModule)`` works in either namespace.
* Callbacks derive from :class:`Callback`, a subclass of every installed namespace's ``Callback`` (plain
  classes with the same hooks), so ``MaxUp()`` is an instance of both and either Trainer or LightningCLI takes it.
* A LightningModule or DataModule cannot belong to both (each namespace's Trainer, strategies and checkpoint code
  assume their own hierarchy throughout), so the library's own -- ``MaxUpClassifier``, the certification recipes,
  the data modules -- derive from :data:`pl`, one namespace per process, fixed on first use:

  1. the environment variable ``LIGHTNING_MAXUP_NAMESPACE`` (``pytorch_lightning`` or ``lightning.pytorch``);
  2. otherwise the one namespace installed;
  3. otherwise (both installed) ``pytorch_lightning``, the package's declared dependency.

* ``lightning-maxup fit`` takes the namespace of the config's own model and data classes (:func:`cli_namespace`).

Warnings go through ``lightning_utilities``' ``rank_zero_warn``/``rank_zero_info``: both namespaces re-export these
very functions, and share the ``rank_zero_only.rank`` their Trainers set.

Example:
    >>> from lightning_maxup._lightning import pl
    >>> pl.__name__ in NAMESPACES
    True
    >>> all(issubclass(Callback, module.Callback) for module in installed().values())
    True
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "ENV_VAR",
    "NAMESPACES",
    "Callback",
    "cli_namespace",
    "installed",
    "namespace",
    "pl",
    "rank_zero_info",
    "rank_zero_warn",
]

Namespace = Literal["pytorch_lightning", "lightning.pytorch"]
#: The two names of Lightning's trainer package, the default first.
NAMESPACES: tuple[Namespace, ...] = ("pytorch_lightning", "lightning.pytorch")
#: Environment variable that picks the namespace of the library's LightningModules when both are installed.
ENV_VAR = "LIGHTNING_MAXUP_NAMESPACE"
_LIBRARY_PREFIX = "lightning_maxup."
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _is_class_path(value: Any) -> bool:
    return isinstance(value, str) and bool(_DOTTED.fullmatch(value)) and not value.endswith(_CONFIG_SUFFIXES)


def _import(name: Namespace) -> ModuleType | None:
    top = name.partition(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != top:  # installed but broken: say so rather than pretend it is absent
            raise
        return None


def _import_installed() -> dict[Namespace, ModuleType]:
    modules = {name: module for name in NAMESPACES if (module := _import(name)) is not None}
    if not modules:
        raise ModuleNotFoundError(
            "lightning_maxup needs Lightning: `pip install pytorch-lightning` or `pip install lightning`"
        )
    return modules


_INSTALLED = _import_installed()
_chosen: Namespace | None = None


def installed() -> dict[Namespace, ModuleType]:
    """The installed namespaces, by name, in the order of :data:`NAMESPACES`."""
    return dict(_INSTALLED)


if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning import Callback
else:

    class Callback(*(module.Callback for module in _INSTALLED.values())):
        """Base of the library's callbacks: an instance of every installed namespace's ``Callback``."""


def _env_choice() -> Namespace | None:
    value = os.environ.get(ENV_VAR)
    if value is None or value == "":
        return None
    if value not in NAMESPACES:
        allowed = ", ".join(repr(n) for n in NAMESPACES)
        raise ValueError(f"Expected `{ENV_VAR}` to be one of {allowed}, got {value!r}")
    if value not in _INSTALLED:
        raise ModuleNotFoundError(f"`{ENV_VAR}` is {value!r}, which is not installed")
    return cast(Namespace, value)


def namespace() -> Namespace:
    """The namespace the library's LightningModules and DataModules derive from, fixed on the first call."""
    global _chosen
    if _chosen is not None:
        return _chosen
    env = _env_choice()
    chosen = env if env is not None else next(iter(_INSTALLED))
    _chosen = chosen
    return chosen


def _pin(name: Namespace, reason: str) -> None:
    """Fix the namespace to ``name`` for this process and, through the environment, the processes it starts."""
    global _chosen
    current = _chosen or _env_choice()
    if current is not None and current != name:
        how = f"`{ENV_VAR}` is {current!r}" if _chosen is None else f"they were built on {current!r} already"
        raise argparse.ArgumentError(
            None, f"{reason}, but lightning_maxup's LightningModules cannot follow: {how}. Set `{ENV_VAR}={name}`."
        )
    _chosen = name
    os.environ[ENV_VAR] = name  # ddp_spawn children and launched ranks must build the same classes


def __getattr__(name: str) -> Any:
    if name == "pl":
        return _INSTALLED[namespace()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _yaml(value: str) -> Any:
    """A YAML file's content, or ``value`` itself read as YAML (jsonargparse takes both); ``None`` if unreadable."""
    import yaml

    try:
        text = Path(value).read_text()
    except (OSError, ValueError):
        text = value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # LightningCLI reports an unreadable config in its own words


def _class_path(value: Any) -> str | None:
    """The ``class_path`` of a config entry: a dotted name, or a mapping or YAML file with one."""
    if isinstance(value, str) and not _is_class_path(value):
        value = _yaml(value)
    if isinstance(value, dict):
        value = value.get("class_path")
    return value if _is_class_path(value) else None


def _cli_class_paths(argv: Sequence[str]) -> list[str]:
    """The model and data ``class_path`` values that ``argv`` names; a later argument overrides an earlier one."""
    found: dict[str, str] = {}
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if key in ("--config", "-c") and isinstance(config := _yaml(value), dict):
            entries = {name: config.get(name) for name in ("model", "data")}
        elif key in ("--model", "--data", "--model.class_path", "--data.class_path"):
            entries = {key[2:].partition(".")[0]: value}
        else:
            continue
        found.update({name: path for name, entry in entries.items() if (path := _class_path(entry)) is not None})
    return list(found.values())


def _namespace_of(path: str) -> Namespace | None:
    """The namespace of the LightningModule or DataModule at ``path``; ``None`` if it cannot be imported."""
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception:  # LightningCLI imports it again and reports the error in its own words
        return None
    for name, module in _INSTALLED.items():
        if isinstance(obj, type) and issubclass(obj, (module.LightningModule, module.LightningDataModule)):
            return name
    return None


def cli_namespace(argv: Sequence[str]) -> ModuleType:
    """The namespace module a LightningCLI run over ``argv`` needs: that of the config's model and data classes.

    The user's classes decide (``class M(MaxUpMixin, L.LightningModule)`` gives ``lightning.pytorch``). When the
    config also names one of the library's classes
    (``lightning_maxup.recipes.datamodules.DigitsDataModule``), those are built on the same namespace, which is then
    fixed for the process; without user classes, :func:`namespace` decides.

    Args:
        argv: The subcommand's arguments (``--config`` files, ``--model``/``--data`` class paths).

    Raises:
        argparse.ArgumentError: If the classes come from both namespaces, or the library's classes cannot follow.

    Example:
        >>> cli_namespace(["--model", "lightning_maxup.recipes.models.MaxUpClassifier"]).__name__ == namespace()
        True
    """
    paths = _cli_class_paths(argv)
    user = {path: ns for path in paths if not path.startswith(_LIBRARY_PREFIX) and (ns := _namespace_of(path))}
    found = set(user.values())
    if len(found) > 1:
        named = ", ".join(f"`{path}` ({ns})" for path, ns in user.items())
        raise argparse.ArgumentError(None, f"The model and data classes come from both Lightning namespaces: {named}")
    if not found:
        return _INSTALLED[namespace()]
    (name,) = found
    if any(path.startswith(_LIBRARY_PREFIX) for path in paths):
        _pin(name, f"The config's classes are {name} classes")
    return _INSTALLED[name]
