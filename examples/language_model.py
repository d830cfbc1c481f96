"""MaxUp for word-level language modelling, with embedding dropout as the augmentation.

An LSTM language model is trained from the same seed, for the same epochs, with

* ``no embedding dropout`` (skipped with ``--no-baseline``): no augmentation at all;
* ``ordinary embedding dropout``: one word-level embedding dropout mask per sequence (Merity et al., ICLR 2018), as
  in AWD-LSTM but drawn per sequence;
* ``MaxUp m=2``: two masks per sequence; the sequence's loss under its worse mask is back-propagated. The mask is
  data in the batch (a per-token scale added by :class:`~lightning_maxup.augment.WordEmbeddingDropout`), so the
  gradient pass reuses exactly the mask the selection pass found worst.

It prints validation perplexity (mean ± std over seeds) and seconds per epoch.

By default it needs no download: the corpus is the text of Python's own help topics, ``pydoc_data.topics``, which
ships with every CPython (about 120k tokens of English prose and code from the Python Language Reference), lower-cased
and split into words and punctuation; each non-empty line ends with ``<eos>``. The first 90% of the token stream
trains (``--train-tokens N`` keeps only its first ``N`` tokens), the rest validates. ``--data DIR`` trains on
Penn Treebank (``ptb.{train,valid}.txt``) or WikiText-2 (``wiki.{train,valid}.tokens``) instead, tokenised by
whitespace as in the usual setup.

Sequences are independent windows of ``--bptt`` tokens (no hidden state is carried between batches), to keep the
example short. The paper's setting, a stateful AWD-LSTM whose carried hidden state MaxUp handles (the ``m`` copies
start from the same state, the trained copy's final state carries on), is the recipe
``examples/configs/lm_awd_lstm.yaml`` (:mod:`lightning_maxup.recipes.models.awd_lstm`), measured by
``benchmarks/language_model.py``.

The table prints every seed's perplexity next to the mean and standard deviation, so a spread can be checked; wall
times depend on the load of the machine (the same default run took 111 s and 207 s on shared 2-core machines).

    python examples/language_model.py                 # 2-4 minutes on 2 CPU cores, depending on their load
    python examples/language_model.py --epochs 1 --quick
    python examples/language_model.py --data data/wikitext-2 --epochs 40 --hidden 650 --emb 650
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl  # or `import lightning.pytorch as pl`: either works (docs/namespaces.md)
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import WordEmbeddingDropout, embedding_scale
from lightning_maxup.callbacks.timing import EpochTimer

UNK, EOS = "<unk>", "<eos>"


# --------------------------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------------------------
class Vocabulary:
    def __init__(self, tokens: list[str], min_count: int = 1) -> None:
        counts = Counter(tokens)
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in (UNK, EOS)), key=lambda w: (-counts[w], w)
        )
        self.itos = [EOS, UNK, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> Tensor:
        unk = self.stoi[UNK]
        return torch.tensor([self.stoi.get(t, unk) for t in tokens], dtype=torch.long)


def _lines_to_tokens(lines: list[str], split: re.Pattern[str] | None = None) -> list[str]:
    out: list[str] = []
    for line in lines:
        words = split.findall(line.lower()) if split is not None else line.split()
        if words:
            out.extend(words)
            out.append(EOS)
    return out


def load_pydoc_corpus(valid_fraction: float = 0.1) -> tuple[list[str], list[str], str]:
    """Python's help topics (``pydoc_data.topics``, part of the standard library) as train/valid token lists."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    tokens = _lines_to_tokens(text.splitlines(), re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]"))
    cut = int(len(tokens) * (1 - valid_fraction))
    return tokens[:cut], tokens[cut:], "pydoc_data.topics (Python's help topics)"


def load_text_dataset(root: str | Path) -> tuple[list[str], list[str], str]:
    """Penn Treebank (``ptb.train.txt``, ``ptb.valid.txt``) or WikiText-2 (``wiki.train.tokens``, ...) from ``root``."""
    root = Path(root)
    for train, valid, name in (
        ("ptb.train.txt", "ptb.valid.txt", "Penn Treebank"),
        ("wiki.train.tokens", "wiki.valid.tokens", "WikiText-2"),
    ):
        if (root / train).exists() and (root / valid).exists():
            read = lambda f: _lines_to_tokens((root / f).read_text(encoding="utf-8").splitlines())  # noqa: E731
            return read(train), read(valid), name
    raise FileNotFoundError(f"No ptb.{{train,valid}}.txt or wiki.{{train,valid}}.tokens in `data`={str(root)!r}")


def windows(ids: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping ``(inputs, targets)`` windows ``[N, length]``, targets shifted by one token."""
    n = (len(ids) - 1) // length
    x = ids[: n * length].view(n, length)
    y = ids[1 : n * length + 1].view(n, length)
    return x, y


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------
class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> dropout -> decoder tied to the embedding (Press & Wolf, 2017)."""

    def __init__(self, vocab: int, emb: int = 200, hidden: int = 200, layers: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, emb) if hidden != emb else nn.Identity()
        self.decoder = nn.Linear(emb, vocab)
        self.decoder.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, scale: Tensor | None = None) -> Tensor:
        e = self.embed(tokens)
        if scale is not None:  # word-level embedding dropout, as drawn by WordEmbeddingDropout
            e = e * scale[..., None].to(e.dtype)
        h, _ = self.lstm(e)
        return self.decoder(self.proj(self.drop(h)))


class LitLM(MaxUpMixin, pl.LightningModule):
    def __init__(self, vocab: int, m: int, dropout_p: float | None, lr: float, args: argparse.Namespace) -> None:
        augment = WordEmbeddingDropout(dropout_p, vocab) if dropout_p else None
        super().__init__(m=m, augment=augment)
        self.net = LSTMLanguageModel(vocab, args.emb, args.hidden, dropout=args.dropout)
        self.lr = lr

    def per_sample_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        tokens, targets = batch[0], batch[1]
        logits = self.net(tokens, embedding_scale(batch))
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def perplexity(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 128) -> float:
    net.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits = net(x[i : i + batch_size])
        total += float(F.cross_entropy(logits.transpose(1, 2), y[i : i + batch_size], reduction="sum"))
    return math.exp(total / y.numel())


@dataclass
class Result:
    method: str
    seed: int
    valid_ppl: float
    seconds_per_epoch: float


def run_one(
    method: str, m: int, p: float | None, seed: int, data: tuple[Tensor, ...], vocab: int, args: argparse.Namespace
) -> Result:
    x_train, y_train, x_valid, y_valid = data
    pl.seed_everything(seed, verbose=False)
    model = LitLM(vocab, m=m, dropout_p=p, lr=args.lr, args=args)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True, drop_last=True)
    timer = EpochTimer()
    warmup = min(args.warmup, args.epochs - 1)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[MaxUp(warmup_epochs=warmup), timer],
        gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(model, loader)
    timed = timer.seconds[warmup:] or timer.seconds
    return Result(method, seed, perplexity(model.net, x_valid, y_valid), statistics.mean(timed))


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=str, default=None, help="directory with PTB or WikiText-2 files")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="ordinary epochs before MaxUp starts")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.1, help="embedding dropout probability")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout on the LSTM outputs")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-tokens", type=int, default=0, help="train on the first N tokens (0: all)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the run without dropout")
    parser.add_argument("--quick", action="store_true", help="a small slice of the corpus, for smoke tests")
    args = parser.parse_args(argv)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")

    train_tokens, valid_tokens, source = load_text_dataset(args.data) if args.data else load_pydoc_corpus()
    if args.train_tokens:
        train_tokens = train_tokens[: args.train_tokens]
    if args.quick:
        train_tokens, valid_tokens = train_tokens[:4000], valid_tokens[:1000]
        args.emb = args.hidden = 32
        args.seeds = 1
    vocab = Vocabulary(train_tokens, min_count=1 if args.data else 2)
    x_train, y_train = windows(vocab.encode(train_tokens), args.bptt)
    x_valid, y_valid = windows(vocab.encode(valid_tokens), args.bptt)
    data = (x_train, y_train, x_valid, y_valid)

    methods = [("no embedding dropout", 1, None)] if args.baseline else []
    methods += [
        (f"ordinary embedding dropout p={args.p}", 1, args.p),
        (f"MaxUp m={args.m}, embedding dropout p={args.p}", args.m, args.p),
    ]
    start = time.perf_counter()
    results = [
        run_one(name, m, p, seed, data, len(vocab), args) for name, m, p in methods for seed in range(args.seeds)
    ]
    total = time.perf_counter() - start

    print(
        f"\nLSTM LM ({args.emb}-d embedding, {args.hidden} hidden) on {source}: {len(train_tokens)} train /"
        f" {len(valid_tokens)} valid tokens, vocabulary {len(vocab)}; {args.epochs} epochs ({args.warmup} warm-up),"
        f" {args.seeds} seed(s)"
    )
    print(f"| {'method':<40} | {'valid perplexity':>16} | {'per seed':>20} | {'s / epoch (MaxUp phase)':>23} |")
    print(f"|{'-' * 42}|{'-' * 18}|{'-' * 22}|{'-' * 25}|")
    for name, _, _ in methods:
        rs = [r for r in results if r.method == name]
        ppl = [r.valid_ppl for r in rs]
        std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        cell = f"{statistics.mean(ppl):.2f} ± {std:.2f}" if len(ppl) > 1 else f"{ppl[0]:.2f}"
        seeds = ", ".join(f"{p:.2f}" for p in ppl)
        print(f"| {name:<40} | {cell:>16} | {seeds:>20} | {statistics.mean(r.seconds_per_epoch for r in rs):>23.2f} |")
    print(f"total {total:.0f} s")
    return results


if __name__ == "__main__":
    main()
