"""The AWD-LSTM recipe: MaxUp with the carried hidden state, resume, NT-ASGD, and the text data module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_maxup import MaxUp
from lightning_maxup.recipes.models.awd_lstm import AWDLSTMLanguageModel
from lightning_maxup.recipes.textdata import WindowSampler, WordLanguageData
from tests.trainer_options import quiet_trainer_options

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ate", "my", "hat", "while", "a", "bird", "sang"]


def _write_corpus(root: Path, lines: int = 60, seed: int = 0) -> WordLanguageData:
    g = torch.Generator().manual_seed(seed)
    for name, n in (("train.txt", lines), ("valid.txt", lines // 4), ("test.txt", lines // 4)):
        rows = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (9,), generator=g)) for _ in range(n)]
        (root / name).write_text("\n".join(rows) + "\n")
    return WordLanguageData(
        root / "train.txt", root / "valid.txt", root / "test.txt", batch_size=4, eval_batch_size=2, bptt=8
    )


SMALL: dict[str, Any] = {"emb_size": 8, "hidden_size": 12, "layers": 2, "lr": 1.0, "bptt": 8, "m": 2, "seed": 3}
NO_DROPOUT: dict[str, Any] = {"dropout": 0.0, "dropout_hidden": 0.0, "dropout_input": 0.0, "weight_drop": 0.0}


class _Spy(AWDLSTMLanguageModel):
    """Records, per training step, each per_sample_loss call's (selecting, incoming layer-0 h) and the carried h."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[list[tuple[bool, Tensor]]] = []
        self.carried_after_step: list[Tensor] = []

    def per_sample_loss(self, batch: Any) -> Tensor:
        self.steps[-1].append((self.maxup_selecting, batch["state"][0][0].detach().clone()))
        return super().per_sample_loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps.append([])
        loss = super().training_step(batch, batch_idx)
        assert self.carried_state is not None
        self.carried_after_step.append(self.carried_state[0][0].clone())
        return loss


def test_maxup_copies_share_the_incoming_state_and_only_the_trained_copy_carries_on(tmp_path: Path) -> None:
    data = _write_corpus(tmp_path)
    model = _Spy(data.vocab_size, **SMALL, **NO_DROPOUT)
    trainer = pl.Trainer(**quiet_trainer_options(max_epochs=1, limit_train_batches=4, limit_val_batches=0))
    trainer.fit(model, datamodule=data)
    b = data.batch_size
    assert len(model.steps) == 4
    previous = torch.zeros(b, 12)
    for k, calls in enumerate(model.steps):
        selection = [h for selecting, h in calls if selecting]  # the pre-flight (step 0) and the selection pass
        gradient = [h for selecting, h in calls if not selecting]
        assert len(gradient) == 1
        assert len(selection) == (2 if k == 0 else 1)
        for incoming in selection:  # m * B rows, copy-major: every copy of row i starts from row i's state
            assert torch.equal(incoming, previous.repeat(2, 1)), f"step {k}"
        assert torch.equal(gradient[0], previous)
        carried = model.carried_after_step[k]
        assert carried.shape == (b, 12)  # the B trained rows only, never the m * B candidates
        assert not torch.equal(carried, previous)
        previous = carried


class _Recorder(AWDLSTMLanguageModel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.carried: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        assert self.carried_state is not None
        self.carried.append(torch.cat([torch.cat(pair, dim=1) for pair in self.carried_state], dim=1).clone())
        return loss


def test_a_resumed_fit_restores_the_carried_state_exactly(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    data = _write_corpus(tmp_path)
    opts = quiet_trainer_options(tmp_path, max_epochs=2, limit_val_batches=2, enable_checkpointing=True)
    pl.seed_everything(0, verbose=False)
    whole = _Recorder(data.vocab_size, **SMALL, **NO_DROPOUT)
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    pl.Trainer(**opts, callbacks=[save, MaxUp(warmup_epochs=1)]).fit(whole, datamodule=data)
    per_epoch = len(whole.carried) // 2
    assert per_epoch > 3  # the checkpoint at step 3 is mid-epoch

    ckpt = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)
    assert torch.equal(torch.cat([torch.cat(p, 1) for p in ckpt["awd_lstm"]["carried_state"]], 1), whole.carried[2])

    import shutil

    shutil.move(tmp_path / "ckpt" / "step=3.ckpt", tmp_path / "step=3.ckpt")
    shutil.rmtree(tmp_path / "ckpt")
    pl.seed_everything(0, verbose=False)
    resumed = _Recorder(data.vocab_size, **SMALL, **NO_DROPOUT)
    again = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    pl.Trainer(**opts, callbacks=[again, MaxUp(warmup_epochs=1)]).fit(
        resumed, datamodule=data, ckpt_path=tmp_path / "step=3.ckpt"
    )
    assert len(resumed.carried) == len(whole.carried) - 3
    for k, (a, b) in enumerate(zip(resumed.carried, whole.carried[3:], strict=True)):
        assert torch.equal(a, b), f"step {k + 3}: largest difference {(a - b).abs().max()}"
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_lm_config_runs_through_the_cli_with_vocab_size_linked(tmp_path: Path, monkeypatch: Any) -> None:
    """examples/configs/lm_awd_lstm.yaml on a tiny corpus: only the files, the sizes and the length are overridden."""
    import pytorch_lightning.cli

    from lightning_maxup.apps.cli import main

    _write_corpus(tmp_path)
    built: list[Any] = []

    class Recording(pytorch_lightning.cli.LightningCLI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(pytorch_lightning.cli, "LightningCLI", Recording)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "examples" / "configs" / "lm_awd_lstm.yaml"
    code = main(
        [
            "fit", "--config", str(config),
            f"--data.init_args.train_file={tmp_path / 'train.txt'}",
            f"--data.init_args.val_file={tmp_path / 'valid.txt'}",
            f"--data.init_args.test_file={tmp_path / 'test.txt'}",
            "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=2", "--data.init_args.bptt=8",
            "--model.init_args.emb_size=8", "--model.init_args.hidden_size=8", "--model.init_args.bptt=8",
            "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        ]
    )  # fmt: skip
    assert code == 0
    cli = built[0]
    model, data = cli.model, cli.datamodule
    assert model.hparams.vocab_size == data.vocab_size == len(data.vocabulary.itos)
    assert model.maxup_augment.vocab_size == data.vocab_size  # the augmentation got it too, typed nowhere
    assert model.maxup_m == 2
    assert model.net.embedding.num_embeddings == data.vocab_size
    assert cli.trainer.global_step == 6
    assert cli.trainer.current_epoch == 2  # the warm-up epoch and one MaxUp epoch ran


def test_window_lengths_follow_awd_lstm() -> None:
    sampler = WindowSampler(200_000, bptt=70, variable=True, seed=1)
    windows = sampler.windows(0)
    starts = [s for s, _ in windows]
    lengths = [n for _, n in windows]
    assert starts == [0, *list(torch.tensor(lengths[:-1]).cumsum(0).tolist())]  # contiguous, no gap
    assert starts[-1] + lengths[-1] == 200_000 - 1  # the last target is the stream's last token
    body = torch.tensor(lengths[:-1], dtype=torch.float64)
    short = body < 52.5  # halfway between the modes bptt / 2 = 35 and bptt = 70 (each with sd 5)
    n = len(body)
    assert abs(float(short.double().mean()) - 0.05) < 4 * (0.05 * 0.95 / n) ** 0.5
    long = body[~short]
    assert abs(float(long.mean()) - 69.5) < 4 * 5 / len(long) ** 0.5  # int() truncation lowers the mean by ~0.5
    assert abs(float(long.std()) - 5.0) < 0.3
    assert sampler.windows(0) == windows  # an epoch replays
    assert sampler.windows(1) != windows


def test_nt_asgd_averages_the_iterates_once_triggered() -> None:
    model = AWDLSTMLanguageModel(10, **SMALL)
    model.averaging = True
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append([p.detach().clone() for p in model.parameters()])
        model._fold_average()
    assert model._average is not None
    for avg, *iterates in zip(model._average, *snapshots, strict=True):
        expected = torch.stack(iterates).mean(0)
        assert torch.allclose(avg, expected, atol=1e-6), (avg - expected).abs().max()
    last = [p.detach().clone() for p in model.parameters()]
    model._swap_in_average()  # validation sees the average ...
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), model._average, strict=True))
    model._swap_out_average()  # ... and training goes on from the last iterate
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), last, strict=True))


def test_benchmark_corpus_preparation_splits_files_and_caps_the_vocabulary(tmp_path: Path, monkeypatch: Any) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "lm_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "language_model.py"
    )
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lm_benchmark", bench)  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    for i in range(20):  # files 8 and 18 validate, 9 and 19 test, the rest train
        (source / f"f{i:02d}.txt").write_text(f"x{chr(97 + i)} common, common.\n\nrare{chr(97 + i)}\n")
    stats = bench.prepare_corpus(source, out, train_tokens=10_000, eval_tokens=10_000, vocab=5, min_count=2)
    train = (out / "train.txt").read_text().split()
    assert stats["files"] == 20
    assert "xi" not in (out / "train.txt").read_text()  # no validation text in training: the word of file 8
    assert "<unk>" in train
    assert set(train) == {"common", ",", ".", "<unk>"}  # the 3 most frequent seen twice or more, the rest <unk>
    assert (out / "valid.txt").read_text().split() == ["<unk>", "common", ",", "common", ".", "<unk>"] * 2
    assert stats["train_tokens"] == 16 * 8  # 5 + 1 and 1 + 1 tokens per file, <eos> counted
