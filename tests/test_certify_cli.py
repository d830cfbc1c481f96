"""``lightning-maxup certify`` end to end on a tiny model trained in the test, and its argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_maxup.certify.cli import build_from_config, certify_main
from lightning_maxup.certify.table import read_certification

CONFIG = """
model:
  class_path: lightning_maxup.models.MaxUpClassifier
  init_args:
    backbone:
      class_path: lightning_maxup.models.SmallCNN
      init_args: {in_channels: 1, num_classes: 10, width: 8}
    num_classes: 10
    m: 1
    augment:
      class_path: lightning_maxup.augment.GaussianNoise
      init_args: {sigma: 0.25}
    optimizer: adam
    lr: 0.01
    weight_decay: 0.0
    seed: 0
data:
  class_path: lightning_maxup.data.DigitsDataModule
  init_args: {batch_size: 64, seed: 0}
trainer:
  max_epochs: 1
ckpt_path: null
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("certify_cli")
    config = root / "config.yaml"
    config.write_text(CONFIG)
    torch.manual_seed(0)
    model, data = build_from_config(config)
    data.setup("fit")
    # A plain loop is enough to make the weights worth certifying, and much cheaper than a Trainer here.
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = data.train_set.tensors
    for _ in range(3):
        for b in torch.randperm(len(x), generator=g).split(64):
            noisy = x[b] + 0.25 * torch.randn(x[b].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(noisy), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": pl.__version__}, ckpt)
    return config, ckpt


def test_certify_writes_tsv_table_and_plot(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, ckpt = trained
    out = tmp_path / "cert.tsv"
    argv = ["--config", str(config), "--ckpt", str(ckpt), "--sigma", "0.25", "--n0", "10", "--n", "200"]
    argv += ["--alpha", "0.01", "--batch-size", "512", "--skip", "3", "--max", "30", "--outfile", str(out)]
    argv += ["--keyed-noise", "--no-progress"]
    assert certify_main(argv) == 0
    printed = capsys.readouterr().out
    assert out.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    cert = read_certification(out)
    assert cert.idx.tolist() == list(range(0, 90, 3))
    assert ((cert.predict == cert.label) == (cert.correct == 1)).all()
    assert ((cert.predict == -1) <= (cert.radius == 0)).all()
    assert cert.accuracy_at([0.0])[0] > 0.3, "the checkpoint's trained weights were not certified"
    assert "| r = 0.25 |r = 0.5 |" in printed
    assert "r = 2.75 |" in printed
    assert "&sigma; = 0.25" in printed
    png = out.with_suffix(".png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Keyed noise: the same inputs certify identically however they are batched.
    out2 = tmp_path / "cert2.tsv"
    argv2 = [a if a != str(out) else str(out2) for a in argv] + [
        "--inputs-per-batch",
        "7",
        "--plot",
        str(tmp_path / "p.png"),
    ]
    assert certify_main(argv2) == 0
    cert2 = read_certification(out2)
    assert cert2.predict.tolist() == cert.predict.tolist()
    assert cert2.radius.tolist() == cert.radius.tolist()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--sigma", "0"], "Expected `sigma` to be positive, got 0.0", id="sigma-0"),
        pytest.param(["--sigma", "-1"], "Expected `sigma` to be positive, got -1.0", id="sigma-negative"),
        pytest.param(["--sigma", "0.25", "--n0", "0"], "Expected `n0` to be a positive integer, got 0", id="n0"),
        pytest.param(["--sigma", "0.25", "--n", "0"], "Expected `n` to be a positive integer, got 0", id="n"),
        pytest.param(["--sigma", "0.25", "--alpha", "1"], r"Expected `alpha` in (0, 1), got 1.0", id="alpha"),
        pytest.param(["--sigma", "x"], "Expected `sigma` to be a float, got 'x'", id="not-a-number"),
    ],
)
def test_certify_argument_errors(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert certify_main(["--config", "unused.yaml", *extra]) == 2
    assert message in capsys.readouterr().err


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Expected `--config` to be a YAML file, got"):
        build_from_config(tmp_path / "missing.yaml")
    only_model = tmp_path / "m.yaml"
    only_model.write_text(CONFIG.split("data:")[0])
    with pytest.raises(ValueError, match=r"to have `model:` and `data:` sections, missing \['data'\]"):
        build_from_config(only_model)


def test_checkpoint_weights_are_loaded(trained: tuple[Path, Path]) -> None:
    from lightning_maxup.certify.cli import _load_checkpoint

    config, ckpt = trained
    model, _ = build_from_config(config)
    _load_checkpoint(model, ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
