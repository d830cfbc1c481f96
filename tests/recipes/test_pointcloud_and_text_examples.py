"""Smoke runs of the point-cloud and language-model examples and the adapter benchmark, with tiny settings."""

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(relative: str):
    path = ROOT / relative
    name = f"_example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pointcloud():
    return _load("examples/pointcloud.py")


@pytest.fixture(scope="module")
def language_model():
    return _load("examples/language_model.py")


@pytest.mark.slow
def test_pointcloud_example_runs(pointcloud, capsys):
    results = pointcloud.main(["--epochs", "2", "--warmup", "1", "--quick"])
    assert len(results) == 3
    assert all(0.0 <= r.accuracy <= 1.0 and r.seconds_per_epoch > 0 for r in results)
    out = capsys.readouterr().out
    assert "| MaxUp m=4, select on 8 pts" in out
    assert "test accuracy" in out


def test_generated_shapes_are_normalised_and_balanced(pointcloud):
    x, y = pointcloud.make_shapes(5, 64, seed=0)
    assert x.shape == (20, 64, 3)
    assert torch.bincount(y).tolist() == [5, 5, 5, 5]
    assert torch.allclose(x.norm(dim=-1).amax(dim=1), torch.ones(20))
    x2, _ = pointcloud.make_shapes(5, 64, seed=0)
    assert torch.equal(x, x2)


class _FakeH5File:
    """Stands in for ``h5py.File`` (h5py is optional): reads a ``torch.save``d dict of numpy arrays."""

    def __init__(self, path, mode="r"):
        self.data = torch.load(path, weights_only=False)

    def __enter__(self):
        return self.data

    def __exit__(self, *exc):
        return False


def test_modelnet40_loader(pointcloud, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", types.SimpleNamespace(File=_FakeH5File))
    for split, n in (("train", 3), ("test", 2)):
        for part in range(2):
            data = {"data": torch.rand(n, 2048, 3).numpy(), "label": torch.arange(n).view(n, 1).numpy().astype("uint8")}
            torch.save(data, tmp_path / f"ply_data_{split}{part}.h5")
    (x, y), (xt, yt) = pointcloud.load_modelnet40(tmp_path, points=128)
    assert x.shape == (6, 128, 3)
    assert x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 0, 1, 2]
    assert xt.shape == (4, 128, 3)
    with pytest.raises(FileNotFoundError, match="No ply_data_train"):
        pointcloud.load_modelnet40(tmp_path / "empty")


def test_modelnet40_loader_errors(pointcloud, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="needs h5py"):
        pointcloud.load_modelnet40(tmp_path)


@pytest.mark.slow
def test_language_model_example_runs(language_model, capsys):
    results = language_model.main(["--epochs", "2", "--warmup", "1", "--quick"])
    assert len(results) == 3
    assert all(math.isfinite(r.valid_ppl) and r.valid_ppl > 1 for r in results)
    out = capsys.readouterr().out
    assert "| MaxUp m=2, embedding dropout p=0.1" in out
    assert "valid perplexity" in out


def test_language_model_corpora(language_model, tmp_path):
    train, valid, name = language_model.load_pydoc_corpus()
    assert len(train) > 50_000
    assert len(valid) > 5_000
    assert "pydoc" in name
    (tmp_path / "ptb.train.txt").write_text(" the cat sat \n the dog \n")
    (tmp_path / "ptb.valid.txt").write_text(" the cat \n")
    train, valid, name = language_model.load_text_dataset(tmp_path)
    assert name == "Penn Treebank"
    assert train == ["the", "cat", "sat", "<eos>", "the", "dog", "<eos>"]
    vocab = language_model.Vocabulary(train)
    assert vocab.encode(["the", "zebra"]).tolist() == [vocab.stoi["the"], vocab.stoi["<unk>"]]
    x, y = language_model.windows(torch.arange(11), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    with pytest.raises(FileNotFoundError, match="No ptb"):
        language_model.load_text_dataset(tmp_path / "missing")


@pytest.mark.slow
def test_adapter_benchmark_runs(capsys):
    bench = _load("benchmarks/adapters.py")
    results = bench.main(["--rows", "8", "--size", "16", "--repeats", "1"])
    assert len(results) >= 8
    assert "TorchvisionAdapter: RandAugment (uint8)" in capsys.readouterr().out
