"""The package's layers: nothing imports upwards, and every 0.3 import path still works with a warning.

This file names the old paths on purpose (relayout: keep -- the re-layout script leaves it as it is).
"""

from __future__ import annotations

import ast
import importlib
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from lightning_maxup._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_maxup"
SHIM_MARK = "# relayout: shim"

#: Bottom to top; a module may import from its own layer and the ones before it. Data sits below the Lightning
#: glue because the glue reads the DataLoader's MultiView; certification sits above the recipes because its
#: training recipes build on their MaxUpClassifier.
LAYERS = ("_private", "core", "augment", "data", "training", "evaluation", "callbacks", "recipes", "certify", "apps")
API = LAYERS.index("apps") - 0.5  # the package's __init__: the public API, re-exported from the layers below
TOP = len(LAYERS)  # the 0.3 shims: nothing in the package imports them


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_modules() -> dict[str, Path]:
    """Every module of the package but the 0.3 shims."""
    return {
        _module_name(p): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in p.parts and SHIM_MARK not in p.read_text()
    }


MODULES = _library_modules()


def layer_of(module: str) -> float:
    """Index in LAYERS of a module of the package; API for the package itself, TOP for the 0.3 paths."""
    parts = module.split(".")
    if len(parts) == 1:
        return API
    if module not in MODULES and not any(m.startswith(module + ".") for m in MODULES):
        return TOP  # an old path (a shim)
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if len(parts) == 2 and parts[1].startswith("_"):
        return 0
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS in tests/guarantees/test_layout.py")


def _layer_name(layer: float) -> str:
    return {API: "the public API", TOP: "an old 0.3 path"}.get(layer) or LAYERS[int(layer)]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the package in ``path``: top-level, in functions, under TYPE_CHECKING."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lightning_maxup"]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "lightning_maxup"
        ):
            for a in node.names:  # `from lightning_maxup.core import random`: the submodule is what is imported
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else node.module or ""))
    return found


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 30
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_upwards() -> None:
    upward = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        for line, target in imported_modules(path):
            theirs = layer_of(target)
            if theirs > mine:
                here = f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({_layer_name(mine)})"
                upward.append(f"{here} imports {target} ({_layer_name(theirs)})")
    assert upward == [], "imports that run upwards:\n" + "\n".join(upward)


def test_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check above can fail: a core module importing the training glue is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from lightning_maxup.training.mixin import MaxUpMixin\n\ndef f():\n    import lightning_maxup.apps.cli\n"
    )
    layers = [layer_of(target) for _, target in imported_modules(bad)]
    assert layers == [LAYERS.index("training"), LAYERS.index("apps")]
    assert all(layer > LAYERS.index("core") for layer in layers)


def test_benchmarks_import_no_app() -> None:
    apps = []
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        apps += [
            f"{path.name}:{line}: {t}" for line, t in imported_modules(path) if t.startswith("lightning_maxup.apps")
        ]
        apps += [
            f"{path.name}:{line}: {t}"
            for line, t in imported_modules(path)
            if t in ("lightning_maxup.demo", "lightning_maxup.cli")
        ]
    assert apps == []


OLD_NAMES = sorted((old, name) for old, names in MOVED.items() for name in names)


def test_old_paths_cover_every_moved_module() -> None:
    for old in (
        "config",
        "functional",
        "mixin",
        "callback",
        "metrics",
        "fidelity",
        "data",
        "monitor",
        "models",
        "demo",
    ):
        assert f"lightning_maxup.{old}" in MOVED
    assert ("lightning_maxup.metrics", "WorstOfKAccuracy") in OLD_NAMES


@pytest.mark.parametrize(("old", "name"), OLD_NAMES, ids=[f"{o}.{n}" for o, n in OLD_NAMES])
def test_old_import_path_works_and_warns(old: str, name: str) -> None:
    new = MOVED[old][name]
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"`{old}.{name}` moved to `{new}.{name}`"):
        obj = getattr(module, name)
    assert obj is getattr(importlib.import_module(new), name)


def test_old_from_import_warns_on_use() -> None:
    with pytest.warns(DeprecationWarning, match="lightning_maxup.training.mixin"):
        from lightning_maxup.mixin import MaxUpMixin  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        importlib.import_module("lightning_maxup.metrics").not_a_name  # noqa: B018


def test_pickle_with_an_old_class_path_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_maxup.core.config import MaxUpConfig

    config = MaxUpConfig(m=3, selection_size=4)
    monkeypatch.setattr(MaxUpConfig, "__module__", "lightning_maxup.config")  # as pickled by 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pickle checks the class at its (old) path
        data = pickle.dumps(config)
    monkeypatch.undo()
    assert b"lightning_maxup.config" in data
    assert b"lightning_maxup.core.config" not in data
    with pytest.warns(DeprecationWarning, match="lightning_maxup.core.config"):
        loaded = pickle.loads(data)
    assert type(loaded) is MaxUpConfig
    assert loaded == config


def test_checkpoint_with_an_old_class_path_loads_weights_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Lightning resumes with ``weights_only=True``: hyper-parameters saved by 0.3 name the old class path."""
    from lightning_maxup.core.config import MaxUpConfig

    config = MaxUpConfig(m=4, selection_size=8)
    monkeypatch.setattr(MaxUpConfig, "__module__", "lightning_maxup.config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.save({"hyper_parameters": {"maxup_config": config}}, tmp_path / "old.ckpt")
    monkeypatch.undo()
    assert b"lightning_maxup.config" in (tmp_path / "old.ckpt").read_bytes()
    loaded = torch.load(tmp_path / "old.ckpt", weights_only=True)  # allowed under its old name: no warning
    assert loaded["hyper_parameters"]["maxup_config"] == config
