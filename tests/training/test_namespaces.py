"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning as L``).

User modules of either namespace train with the library's mixin and callbacks in this process: fit, the warm-up
schedule, resume, ``ddp_spawn`` and the CLI, parametrised over the namespace. The library's own LightningModules
and DataModules are built on one namespace per process (``lightning_maxup._lightning``), so they are checked in a
fresh interpreter per namespace, where the CLI also picks the namespace from a user model's base class.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_maxup
from lightning_maxup import MaxUp, MaxUpMixin, _lightning
from lightning_maxup._moved import MOVED
from lightning_maxup.apps.cli import main
from lightning_maxup.augment import GaussianNoise

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


class _Body(MaxUpMixin):
    """A tiny MLP that records ``(epoch, active m)`` at every training batch."""

    def __init__(self, m: int = 3, seed: int = 11) -> None:
        super().__init__(m=m, augment=GaussianNoise(0.3), seed=seed)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.schedule: list[tuple[int, int]] = []

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.schedule.append((self.current_epoch, self.maxup_active_m))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
        return DataLoader(data, batch_size=8)


class PLModel(_Body, pytorch_lightning.LightningModule):
    """A user module written against ``pytorch_lightning``."""


class LModel(_Body, lightning.pytorch.LightningModule):
    """A user module written against ``lightning.pytorch`` (``class M(MaxUpMixin, L.LightningModule)``)."""


MODELS = {"pytorch_lightning": PLModel, "lightning.pytorch": LModel}


class RankRecorder(pytorch_lightning.Callback, lightning.pytorch.Callback):
    """Saves every rank's parameters and m schedule at the end of training (ddp_spawn ships nothing else back)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        state = {"params": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}}
        torch.save({**state, "schedule": pl_module.schedule}, Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.fixture(params=NAMESPACES)
def namespace(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


def _trainer(ns: ModuleType, **kwargs: Any) -> Any:
    defaults = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return ns.Trainer(**{**defaults, **kwargs})


def _library_callback_classes() -> list[type]:
    """Every callback class the package defines, found by importing each of its modules."""
    bases = tuple(module.Callback for module in _lightning.installed().values())
    found = set()
    for info in pkgutil.walk_packages(lightning_maxup.__path__, "lightning_maxup."):
        if info.name in MOVED:
            continue  # a 0.3 path: its names warn, and they are found where they live now
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == info.name and issubclass(obj, bases) and obj is not _lightning.Callback:
                found.add(obj)
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def test_every_library_callback_is_a_callback_of_both_namespaces():
    classes = _library_callback_classes()
    assert {cls.__name__ for cls in classes} >= {"MaxUp", "FreezeNormalization", "EpochTimer"}
    missing = [
        f"{cls.__module__}.{cls.__qualname__} is no {ns}.Callback"
        for cls in classes
        for ns in NAMESPACES
        if not issubclass(cls, importlib.import_module(ns).Callback)
    ]
    assert not missing, "derive from lightning_maxup._lightning.Callback: " + "; ".join(missing)
    assert isinstance(MaxUp(), lightning.pytorch.Callback)
    assert isinstance(MaxUp(), pytorch_lightning.Callback)


def test_namespace_is_the_default_or_the_environment_variable():
    expected = os.environ.get(_lightning.ENV_VAR) or "pytorch_lightning"
    assert _lightning.namespace() == expected
    from lightning_maxup.recipes.models import MaxUpClassifier

    assert issubclass(MaxUpClassifier, importlib.import_module(expected).LightningModule)


def test_lightning_install_list_matches_the_dependencies():
    """docs/namespaces.md's requirements for a `lightning` environment: every dependency but pytorch-lightning."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    doc = (ROOT / "docs" / "namespaces.md").read_text()
    block = doc.split("# requirements-lightning.txt", 1)[1].split("```", 1)[0]
    listed = [line for line in block.splitlines()[1:] if line.strip()]
    assert listed == [d for d in dependencies if not d.startswith("pytorch-lightning")]


def test_unknown_namespace_in_the_environment_raises(monkeypatch):
    monkeypatch.setattr(_lightning, "_chosen", None)
    monkeypatch.setenv(_lightning.ENV_VAR, "lightning")
    with pytest.raises(ValueError, match="Expected `LIGHTNING_MAXUP_NAMESPACE` to be one of .*, got 'lightning'"):
        _lightning.namespace()


def test_fit_runs_the_warmup_schedule(namespace):
    model = MODELS[namespace.__name__]()
    trainer = _trainer(namespace, max_epochs=3, callbacks=[MaxUp(warmup_epochs=2, m=4)])
    trainer.fit(model)
    assert model.schedule == [(0, 1)] * 4 + [(1, 1)] * 4 + [(2, 4)] * 4
    assert {"maxup/worst_loss", "maxup/mean_loss", "maxup/gap"} <= set(trainer.callback_metrics)


def test_resume_mid_warmup_matches_an_uninterrupted_run(namespace, tmp_path):
    cls = MODELS[namespace.__name__]
    namespace.seed_everything(0, verbose=False)
    full = cls()
    _trainer(namespace, max_epochs=3, callbacks=[MaxUp(warmup_epochs=2)]).fit(full)

    namespace.seed_everything(0, verbose=False)
    first = cls()

    def callbacks() -> list[Any]:
        return [MaxUp(warmup_epochs=2), namespace.callbacks.ModelCheckpoint(tmp_path, save_last=True, save_top_k=0)]

    stop = _trainer(namespace, max_epochs=1, callbacks=callbacks(), enable_checkpointing=True)
    with pytest.warns(UserWarning, match="This fit never runs a MaxUp step"):  # it stops within the warm-up
        stop.fit(first)

    namespace.seed_everything(0, verbose=False)
    resumed = cls()
    resume = _trainer(namespace, max_epochs=3, callbacks=callbacks(), enable_checkpointing=True)
    resume.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert first.schedule + resumed.schedule == full.schedule
    for key, value in full.state_dict().items():
        diff = (value - resumed.state_dict()[key]).abs().max().item()
        assert torch.equal(value, resumed.state_dict()[key]), f"{key} differs by up to {diff:.3g} after the resume"


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
@pytest.mark.usefixtures("file_system_sharing")
def test_ddp_spawn(namespace, tmp_path):
    model = MODELS[namespace.__name__]()
    callbacks = [MaxUp(warmup_epochs=1, m=3), RankRecorder(str(tmp_path))]
    _trainer(namespace, devices=2, strategy="ddp_spawn", callbacks=callbacks).fit(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["schedule"] == [(0, 1)] * 2 + [(1, 3)] * 2  # 32 samples, batch 8, 2 ranks: 2 steps per epoch
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), f"{key} differs across ranks"


USER_MODULE = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import {namespace} as L
from lightning_maxup import MaxUpMixin
from lightning_maxup.augment import GaussianNoise

SCHEDULE = []


class M(MaxUpMixin, L.LightningModule):
    def __init__(self, in_features: int = 4, num_classes: int = 3, m: int = 2) -> None:
        super().__init__(m=m, augment=GaussianNoise(0.1))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    def per_sample_loss(self, batch):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.net(x), y, reduction="none")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        SCHEDULE.append((self.current_epoch, self.maxup_active_m))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class D(L.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)),
                          batch_size=8)
"""

CLI_CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 2
  limit_train_batches: 3
  limit_val_batches: 0
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_maxup.MaxUp
      init_args: {{warmup_epochs: 1, m: 3}}
model:
  class_path: {module}.M
  init_args: {{in_features: {in_features}, num_classes: {num_classes}}}
data:
  class_path: {data}
"""


def _write_user_module(directory: Path, namespace: str, **config: Any) -> Path:
    """Write a user module ``class M(MaxUpMixin, L.LightningModule)`` and a config training it; the config path."""
    module = "usermod_" + namespace.replace(".", "_")
    (directory / f"{module}.py").write_text(textwrap.dedent(USER_MODULE.format(namespace=namespace)))
    options = {"in_features": 4, "num_classes": 3, "data": f"{module}.D", **config}
    path = directory / f"{module}.yaml"
    path.write_text(CLI_CONFIG.format(module=module, **options))
    sys.modules.pop(module, None)  # a fresh import from `directory`, with an empty SCHEDULE
    importlib.invalidate_caches()
    return path


# LightningCLI 2.6 calls jsonargparse methods that jsonargparse 4.49+ deprecates (test_cli.py has the details).
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_cli_fits_a_user_module_of_either_namespace(namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _write_user_module(tmp_path, namespace.__name__)
    assert _lightning.cli_namespace(["--config", str(config)]) is namespace
    assert main(["fit", "--config", str(config)]) == 0
    user = importlib.import_module(config.stem)
    assert user.SCHEDULE == [(0, 1)] * 3 + [(1, 3)] * 3


def test_cli_namespace_follows_overrides_and_rejects_mixed_classes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _write_user_module(tmp_path, "pytorch_lightning")
    _write_user_module(tmp_path, "lightning.pytorch")
    overrides = ["--model", "usermod_lightning_pytorch.M", "--data.class_path=usermod_lightning_pytorch.D"]
    assert _lightning.cli_namespace(["--config", str(config), *overrides]) is lightning.pytorch  # the last word wins
    argv = ["--config", str(config), "--data", "usermod_lightning_pytorch.D"]
    with pytest.raises(
        argparse.ArgumentError, match=r"both Lightning namespaces: `usermod_pytorch_lightning.M` \(pytorch_lightning"
    ):
        _lightning.cli_namespace(argv)


def _fresh_process_checks(namespace: str, directory: str) -> None:
    """Run in a fresh interpreter: the CLI pins the namespace from a user model, then every library module trains.

    Invoked by :func:`test_library_modules_follow_the_namespace`; imports the library's LightningModules only after
    the CLI has fixed the namespace.
    """
    ns = importlib.import_module(namespace)
    os.chdir(directory)  # LightningCLI saves the config it ran with into the working directory
    config = _write_user_module(Path(directory), namespace, in_features=64, num_classes=10,
                                data="lightning_maxup.recipes.datamodules.DigitsDataModule")  # fmt: skip
    sys.path.insert(0, directory)
    assert main(["fit", "--config", str(config)]) == 0
    assert importlib.import_module(config.stem).SCHEDULE == [(0, 1)] * 3 + [(1, 3)] * 3
    assert _lightning.namespace() == namespace == os.environ[_lightning.ENV_VAR]

    from lightning_maxup.callbacks.timing import EpochTimer
    from lightning_maxup.certify.recipes import RECIPES, SmoothedCertifier, build_recipe
    from lightning_maxup.data.datasets import CIFARDataModule, ImageNetDataModule
    from lightning_maxup.recipes.datamodules import DigitsDataModule
    from lightning_maxup.recipes.finetune import FreezeNormalization
    from lightning_maxup.recipes.models import MaxUpClassifier, SmallCNN

    assert issubclass(MaxUpClassifier, ns.LightningModule)
    for data in (DigitsDataModule, CIFARDataModule, ImageNetDataModule):
        assert issubclass(data, ns.LightningDataModule), data
    fit = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1}
    for recipe in RECIPES:
        model, callbacks = build_recipe(recipe, SmallCNN(1, 10, width=4), 10, sigma=0.25, m=2, lr=1e-3)
        timer = EpochTimer()
        _trainer(ns, callbacks=[*callbacks, FreezeNormalization(), timer], **fit).fit(model, DigitsDataModule())
        assert len(timer.seconds) == 1, recipe
    certifier = SmoothedCertifier(model, 10, sigma=0.25, n0=4, n=8, batch_size=8)
    result = _trainer(ns, limit_test_batches=1).test(certifier, DigitsDataModule(batch_size=4), verbose=False)
    assert "certified_acc@0.25" in result[0]


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_library_modules_follow_the_namespace(namespace, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != _lightning.ENV_VAR}
    code = f"import tests.training.test_namespaces as t; t._fresh_process_checks({namespace!r}, {str(tmp_path)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


LIGHTNING_ONLY = """
import sys

sys.modules["pytorch_lightning"] = sys.modules["lightning_fabric"] = None  # as if only `lightning` were installed

import lightning as L
from lightning_maxup import MaxUp, _lightning
from lightning_maxup.recipes.datamodules import DigitsDataModule
from lightning_maxup.recipes.models import MaxUpClassifier, SmallCNN

assert list(_lightning.installed()) == ["lightning.pytorch"], _lightning.installed()
assert _lightning.namespace() == "lightning.pytorch"
model = MaxUpClassifier(SmallCNN(1, 10, width=4), 10, m=2)
trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, callbacks=[MaxUp(warmup_epochs=0)])
trainer.fit(model, DigitsDataModule())
assert trainer.global_step == 2
"""


@pytest.mark.slow
def test_lightning_only_install_needs_no_configuration(tmp_path):
    """`pip install lightning` + `pip install --no-deps lightning_maxup` (docs/namespaces.md): no pytorch_lightning."""
    env = {k: v for k, v in os.environ.items() if k != _lightning.ENV_VAR}
    proc = subprocess.run(
        [sys.executable, "-c", LIGHTNING_ONLY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
