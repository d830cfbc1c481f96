"""Every recipe in examples/configs runs through ``lightning-maxup fit`` for two MaxUp steps on generated data.

The configs are the full recipes; the test only shrinks the batch, turns the data fake, skips the warm-up (so the
two steps run MaxUp with the configured ``m``, not ordinary augmentation), initialises pretrained backbones at
random with ``--...weights=null`` (any download attempt fails the test) and runs ``fast_dev_run=2``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning.cli
import torch
import yaml

from lightning_maxup import MaxUp
from lightning_maxup.apps.cli import main
from lightning_maxup.recipes.finetune import FreezeNormalization, normalization_layers

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
FAKE = ["--data.init_args.fake_data=true", "--data.init_args.num_workers=0"]


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / name).read_text())


class _RecordingCLI(pytorch_lightning.cli.LightningCLI):
    instances: list[_RecordingCLI] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _RecordingCLI.instances.append(self)


@pytest.fixture
def run_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Run ``lightning-maxup fit`` in-process on a (modified) recipe; return the LightningCLI and the seconds."""

    def forbid_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a config test tried to download weights")

    import torchvision.models._api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbid_download)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", forbid_download)
    # One intra-op thread: tiny batches gain nothing from more, and on a shared CI machine OpenMP threads that
    # compete for busy cores make every op orders of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(pytorch_lightning.cli, "LightningCLI", _RecordingCLI)
    monkeypatch.chdir(tmp_path)

    def run(config: dict[str, Any], *overrides: str) -> tuple[_RecordingCLI, float]:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        _RecordingCLI.instances.clear()
        start = time.perf_counter()
        code = main(["fit", "--config", str(path), "--trainer.fast_dev_run=2", *overrides])
        assert code == 0
        assert len(_RecordingCLI.instances) == 1
        return _RecordingCLI.instances[0], time.perf_counter() - start

    yield run
    torch.set_num_threads(threads)


B4 = [*FAKE, "--data.init_args.batch_size=4"]
B2 = [*FAKE, "--data.init_args.batch_size=2"]
# Each run costs 2-3 s with one thread on a CPU, WRN-28-10 and the ImageNet networks 5-20 s.
RECIPES = [
    pytest.param("digits.yaml", [], 4, id="digits"),
    pytest.param(
        "imagenet_multiview.yaml",
        [*B2, "--model.init_args.backbone.init_args.weights=null"],
        4,
        id="imagenet-multiview",
        marks=pytest.mark.slow,
    ),
    pytest.param("cifar10_resnet110_cutout.yaml", B4, 4, id="cifar10-resnet110"),
    pytest.param("cifar100_resnet110_cutout.yaml", B4, 4, id="cifar100-resnet110"),
    pytest.param("cifar10_maxup_gauss.yaml", B4, 5, id="cifar10-gauss"),
    pytest.param("cifar_wrn28_10_cutout.yaml", B2, 10, id="cifar-wrn28-10", marks=pytest.mark.slow),
    pytest.param(
        "imagenet_resnet50_cutmix_finetune.yaml",
        # The command-line override a user without network access would type (the fixture also forbids downloads).
        [*B2, "--model.init_args.backbone.init_args.weights=null"],
        4,
        id="imagenet-resnet50",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "imagenet_efficientnet_cutmix_finetune.yaml",
        [*B2, "--model.init_args.backbone.init_args.weights=null"],
        4,
        id="imagenet-efficientnet",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("name", "overrides", "m"), RECIPES)
def test_recipe_runs_maxup_steps(run_fit: Any, name: str, overrides: list[str], m: int) -> None:
    # Exactly the README's "try any recipe without data" command: the recipe's own warm-up, which fast_dev_run skips.
    config = _recipe(name)
    assert config["model"]["init_args"]["maxup"]["m"] == m
    cli, seconds = run_fit(config, *overrides)
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 2
    assert model.maxup_enabled
    assert model.maxup_m == m
    assert trainer.callback_metrics["maxup/m"].item() == m
    assert torch.isfinite(trainer.callback_metrics["maxup/worst_loss"])
    assert "val/acc" in trainer.callback_metrics
    if any(isinstance(cb, FreezeNormalization) for cb in trainer.callbacks):
        frozen = list(normalization_layers(model))
        assert frozen
        assert not any(m.training for m in frozen)
        assert not any(p.requires_grad for m in frozen for p in m.parameters(recurse=False))
    print(f"{name}: {seconds:.1f} s")


def test_every_config_is_tested() -> None:
    tested = {p.values[0] for p in RECIPES}
    # lm_*.yaml read text files: tests/recipes/test_awd_lstm.py runs them on a tiny corpus the test writes.
    owned = {p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("certify_", "lm_"))}
    assert owned <= tested, f"configs without a test: {sorted(owned - tested)}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            "cifar10_resnet110_cutout.yaml",
            {"m": 4, "lr": 0.1, "weight_decay": 2.5e-4, "milestones": [100, 150], "epochs": 200, "batch": 256},
            id="cifar10-resnet110",
        ),
        pytest.param(
            "cifar100_resnet110_cutout.yaml",
            {"m": 4, "lr": 0.1, "weight_decay": 2.5e-4, "milestones": [100, 150], "epochs": 200, "batch": 256},
            id="cifar100-resnet110",
        ),
        pytest.param(
            "cifar_wrn28_10_cutout.yaml",
            {"m": 10, "lr": 0.1, "weight_decay": 2.5e-4, "milestones": [60, 120, 180], "epochs": 200, "batch": 256},
            id="cifar-wrn28-10",
        ),
        pytest.param(
            "imagenet_resnet50_cutmix_finetune.yaml",
            {"m": 4, "lr": 1e-5, "weight_decay": 1e-4, "milestones": [], "epochs": 20, "batch": 256},
            id="imagenet-resnet50-finetune",
        ),
        pytest.param(
            "imagenet_efficientnet_cutmix_finetune.yaml",
            {"m": 4, "lr": 1e-4, "weight_decay": 1e-5, "milestones": [], "epochs": 5, "batch": 256},
            id="imagenet-efficientnet-finetune",
        ),
        pytest.param(
            "digits.yaml",
            {"m": 4, "lr": 3e-3, "weight_decay": 0.0, "milestones": [22], "epochs": 30, "batch": 64},
            id="digits",
        ),
    ],
)
def test_recipe_hyperparameters(name: str, expected: dict[str, Any]) -> None:
    config = _recipe(name)
    model = config["model"]["init_args"]
    got = {
        "m": model["maxup"]["m"],
        "lr": model["lr"],
        "weight_decay": model["weight_decay"],
        "milestones": model["milestones"],
        "epochs": config["trainer"]["max_epochs"],
        "batch": config["data"]["init_args"]["batch_size"],
    }
    assert got == expected


def test_gauss_recipe_adds_noise_in_pixel_space() -> None:
    # The certified radius is in pixel units: the data stays in [0, 1] and the network normalises internally.
    config = _recipe("cifar10_maxup_gauss.yaml")
    assert config["data"]["init_args"]["normalize"] is False
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    assert backbone["mean"] is not None
    assert backbone["std"] is not None
    augs = config["model"]["init_args"]["maxup"]["augment"]["init_args"]["augmentations"]
    noise = [a for a in augs if a["class_path"].endswith("GaussianNoise")]
    assert [a["init_args"]["sigma"] for a in noise] == [0.25]


def test_recipe_callbacks_parse() -> None:
    # The MaxUp callback of each recipe is constructible from its init_args, so a typo fails here, cheaply.
    for path in CONFIGS.glob("*.yaml"):
        if path.name.startswith("certify_"):
            continue
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        maxup = [cb for cb in callbacks if cb["class_path"] == "lightning_maxup.MaxUp"]
        assert len(maxup) == 1, path.name
        MaxUp(**maxup[0]["init_args"])


# --------------------------------------------------------------------------------------------------------------------
# The library pieces the recipes name: CIFAR ResNet, WideResNet, input normalisation, data modules
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "params"),
    [pytest.param(20, 0.27, id="resnet20"), pytest.param(56, 0.85, id="resnet56"), pytest.param(110, 1.7, id="110")],
)
def test_cifar_resnet_sizes_match_he_et_al(depth: int, params: float) -> None:
    from lightning_maxup.recipes.models import CIFARResNet

    net = CIFARResNet(depth=depth, num_classes=10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n + 1 convolutions and the linear head
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params, rel=0.02)


def test_cifar_resnet_shortcuts_and_input_normalisation() -> None:
    from lightning_maxup.data.datasets import CIFAR_MEAN_STD
    from lightning_maxup.recipes.models import CIFARResNet, InputNormalization

    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    b = CIFARResNet(depth=20, num_classes=7, shortcut="B").eval()
    assert b(x).shape == (2, 7)
    mean, std = CIFAR_MEAN_STD["cifar10"]
    torch.manual_seed(1)
    inner = CIFARResNet(depth=20, mean=mean, std=std).eval()
    torch.manual_seed(1)
    outer = CIFARResNet(depth=20).eval()
    expected = outer(InputNormalization(mean, std)(x))
    assert torch.allclose(inner(x), expected, atol=1e-6), f"largest error {(inner(x) - expected).abs().max()}"


def test_wide_resnet_28_10_size_matches_zagoruyko_komodakis() -> None:
    from lightning_maxup.recipes.models import WideResNet

    net = WideResNet(depth=28, widen_factor=10, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(36.5, rel=0.01)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 26  # 28 layers: 25 3x3 convolutions plus the head, counted without the 1x1 shortcuts


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param("CIFARResNet(depth=21)", r"Expected `depth` to be 6n \+ 2 .* got 21", id="resnet-depth"),
        pytest.param("CIFARResNet(shortcut='C')", "Expected `shortcut` to be 'A' or 'B', got 'C'", id="shortcut"),
        pytest.param("CIFARResNet(num_classes=0)", "Expected `num_classes` to be a positive integer, got 0", id="nc"),
        pytest.param("CIFARResNet(mean=[0.5])", "Expected `mean` and `std` both set or both None", id="mean-only"),
        pytest.param("WideResNet(depth=27)", r"Expected `depth` to be 6n \+ 4 .* got 27", id="wrn-depth"),
        pytest.param("WideResNet(widen_factor=0)", "Expected `widen_factor` to be a positive integer, got 0", id="k"),
        pytest.param("WideResNet(dropout=1.0)", r"Expected `dropout` in \[0, 1\), got 1.0", id="dropout"),
        pytest.param("InputNormalization([0.5], [0.0])", r"Expected `std` to be positive, got \[0.0\]", id="std"),
        pytest.param(
            "CIFARDataModule(dataset='svhn')", "Expected `dataset` to be 'cifar10' or 'cifar100', got 'svhn'", id="ds"
        ),
        pytest.param("CIFARDataModule(batch_size=0)", "Expected `batch_size` to be a positive integer, got 0", id="bs"),
        pytest.param(
            "ImageNetDataModule(train_crop='five')",
            "Expected `train_crop` to be 'center' or 'random_resized'",
            id="crop",
        ),
        pytest.param("ImageNetDataModule(resize_size=200)", r"Expected `resize_size` >= `image_size`=224", id="resize"),
    ],
)
def test_argument_errors(make: str, match: str) -> None:
    from lightning_maxup.data.datasets import CIFARDataModule, ImageNetDataModule  # noqa: F401
    from lightning_maxup.recipes.models import CIFARResNet, InputNormalization, WideResNet  # noqa: F401

    with pytest.raises(ValueError, match=match):
        eval(make)


def test_missing_data_names_root_and_the_fake_data_flag(tmp_path: Path) -> None:
    from lightning_maxup.data.datasets import CIFARDataModule, ImageNetDataModule

    with pytest.raises(RuntimeError, match=r"cifar10 not found under `root`=.*`fake_data=True`"):
        CIFARDataModule(root=str(tmp_path), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"Expected `root`=.* to hold 'train/'"):
        ImageNetDataModule(root=str(tmp_path), num_workers=0).setup("fit")


@pytest.mark.parametrize(("dataset", "classes"), [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("normalize", [True, False])
def test_cifar_fake_data_matches_the_real_format(dataset: Any, classes: int, normalize: bool) -> None:
    from lightning_maxup.data.datasets import CIFAR_MEAN_STD, CIFARDataModule

    dm = CIFARDataModule(
        dataset=dataset, batch_size=64, num_workers=0, fake_data=True, fake_size=256, normalize=normalize
    )
    dm.setup("fit")
    assert dm.num_classes == classes
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.dtype == torch.long
    assert int(y.min()) >= 0
    assert int(y.max()) < classes
    raw = (
        x * torch.tensor(CIFAR_MEAN_STD[dataset][1]).view(1, 3, 1, 1)
        + torch.tensor(CIFAR_MEAN_STD[dataset][0]).view(1, 3, 1, 1)
        if normalize
        else x
    )
    assert float(raw.min()) >= -1e-5
    assert float(raw.max()) <= 1 + 1e-5
    assert len(dm.train_dataloader()) == 4
    val = next(iter(dm.val_dataloader()))[0]
    assert not torch.equal(val, x), "fake validation images repeat the training images"
