"""Training recipes: the three LightningCLI configs train, SmoothAdv behaves, and both examples run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import pytorch_lightning as pl
import torch

from lightning_maxup.augment import GaussianNoise
from lightning_maxup.certify import (
    MAXUP_GAUSS_M_GRID,
    SIGMA_GRID,
    SmoothAdvClassifier,
    gaussian_classifier,
    maxup_gauss_classifier,
)
from lightning_maxup.certify.cli import build_from_config
from lightning_maxup.recipes.models import MaxUpClassifier, SmallCNN

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("certify_*.yaml"))


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,  # type: ignore[arg-type]
    )


def test_paper_grids() -> None:
    assert MAXUP_GAUSS_M_GRID == (5, 25, 50, 100, 150)
    assert SIGMA_GRID == (0.12, 0.25, 0.5, 1.0)


def test_gaussian_and_maxup_gauss_reuse_the_maxup_classifier() -> None:
    gauss = gaussian_classifier(SmallCNN(1, 10, width=4), 10, sigma=0.5)
    maxup = maxup_gauss_classifier(SmallCNN(1, 10, width=4), 10, sigma=0.5, m=25)
    for model, m in ((gauss, 1), (maxup, 25)):
        assert isinstance(model, MaxUpClassifier)
        assert model.maxup_m == m
        assert isinstance(model.maxup_augment, GaussianNoise)
        assert model.maxup_augment.sigma == 0.5
    with pytest.raises(ValueError, match="Expected `sigma` to be positive, got 0"):
        gaussian_classifier(SmallCNN(1, 10, width=4), 10, sigma=0)


@pytest.mark.parametrize("config", [pytest.param(c, id=c.stem) for c in CONFIGS])
def test_configs_build_and_train_one_batch(config: Path) -> None:
    assert len(CONFIGS) == 3
    model, data = build_from_config(config)
    _trainer(fast_dev_run=1).fit(model, datamodule=data)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_smoothadv_epsilon_warmup_and_validation() -> None:
    model = SmoothAdvClassifier(SmallCNN(1, 10, width=4), 10, sigma=0.25, epsilon=1.0, warmup_epochs=4)
    assert model.current_epsilon() == 1.0  # no trainer attached: the full radius
    for kwargs, match in [
        ({"sigma": 0.0}, "Expected `sigma` to be positive, got 0.0"),
        ({"epsilon": -0.1}, "Expected `epsilon` to be a non-negative number, got -0.1"),
        ({"steps": 0}, "Expected `steps` to be a positive integer, got 0"),
        ({"num_noise_samples": 0}, "Expected `num_noise_samples` to be a positive integer, got 0"),
        ({"warmup_epochs": -1}, "Expected `warmup_epochs` to be a non-negative integer, got -1"),
        ({"optimizer": "rmsprop"}, "Expected `optimizer` to be 'sgd' or 'adam', got 'rmsprop'"),
    ]:
        with pytest.raises(ValueError, match=match):
            SmoothAdvClassifier(SmallCNN(1, 10, width=4), 10, **kwargs)  # type: ignore[arg-type]


def test_smoothadv_training_step_is_reproducible_and_restores_modes() -> None:
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SmoothAdvClassifier(
            SmallCNN(1, 10, width=4), 10, sigma=0.25, epsilon=0.5, steps=2, num_noise_samples=3, seed=7
        )
        model.train()
        losses.append(model.training_step((x, y), 0))
        assert model.backbone.training
    assert torch.equal(losses[0], losses[1])
    losses[0].backward()


@pytest.mark.slow
def test_certify_digits_example_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _example("certify_digits")
    argv = ["--seeds", "0", "1", "--epochs", "2", "--warmup-epochs", "1", "--n0", "10", "--n", "50"]
    assert example.main([*argv, "--outdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for recipe in ("gaussian", "maxup_gauss", "smoothadv"):
        assert f"| {recipe} |" in out
        assert len(list(tmp_path.glob(f"{recipe}_seed*_sigma_0.50.tsv"))) == 2
    assert (tmp_path / "certified_accuracy_sigma_0.50.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["maxup_gauss"])  # the other recipes share the code path, tested above
def test_certify_cifar10_example_on_fake_data(recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _example("certify_cifar10")
    argv = ["--fake-data", "--recipe", recipe, "--epochs", "1", "--warmup-epochs", "0", "--m", "2"]
    argv += ["--n0", "4", "--n", "16", "--batch-size", "64", "--inputs-per-batch", "4", "--skip", "8"]
    argv += ["--train-batch-size", "4", "--outdir", str(tmp_path)]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "&sigma; = 0.25" in out
    assert "r = 2.75 |" in out
    tsv = tmp_path / f"{recipe}_noise_0.25_sigma_0.25.tsv"
    assert len(tsv.read_text().splitlines()) == 1 + 8
