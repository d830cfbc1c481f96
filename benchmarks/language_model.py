"""Ordinary word-embedding dropout against MaxUp (m = 2) on a real English corpus, with the AWD-LSTM recipe.

The corpus is the reStructuredText source of the Python documentation that Debian's ``python3-doc`` package ships
(``/usr/share/doc/python3.X/html/_sources``; ``apt-get install python3-doc``): English prose with code, about 1.4M
whitespace words, 2.4M tokens once punctuation is split off (WikiText-2's training set has 2.1M). Files go, in sorted
order, 8 to training, 1 to validation and 1 to test of every 10; ``--train-tokens`` and ``--eval-tokens`` keep a
slice of each (the machine decides how much fits in the time budget); words seen fewer than ``--min-count`` times in
the training slice, and all words past the ``--vocab`` most frequent, become ``<unk>``.

For every seed both methods train the same AWD-LSTM (:mod:`lightning_maxup.recipes.models.awd_lstm`, scaled down) from
the
same initial weights for the same epochs: ``ordinary`` draws one word-embedding dropout mask per sequence (m = 1
throughout); ``MaxUp`` draws two and trains on the worse, after ``--warmup`` ordinary epochs. Reported: validation
and test perplexity of the final (averaged, once NT-ASGD triggered) weights, the paired difference MaxUp -
ordinary per seed with its mean and two-sided 95 % Student-t interval, and seconds per epoch.

    python benchmarks/language_model.py                  # the documented run (27 min at 1 thread, shared 2-core VM)
    python benchmarks/language_model.py --warmup 0       # MaxUp from the first epoch
    python benchmarks/language_model.py --quick          # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_maxup import MaxUp
from lightning_maxup.callbacks.timing import EpochTimer
from lightning_maxup.evaluation.paired import paired_interval
from lightning_maxup.recipes.models.awd_lstm import AWDLSTMLanguageModel
from lightning_maxup.recipes.textdata import UNK, WordLanguageData

TOKEN = re.compile(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]")


def find_sources() -> Path:
    """The installed Python documentation sources, or exit naming the package to install."""
    found = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    if not found:
        sys.exit("No /usr/share/doc/python3*/html/_sources: install Debian's python3-doc (apt-get install python3-doc)")
    return Path(found[-1])


def prepare_corpus(root: Path, out: Path, train_tokens: int, eval_tokens: int, vocab: int, min_count: int) -> dict:
    """Tokenise the sources into ``train/valid/test.txt`` (one line per non-empty source line); return statistics."""
    files = sorted(root.rglob("*.txt"))
    splits: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for i, path in enumerate(files):
        split = "valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            words = TOKEN.findall(line)
            if words:
                splits[split].append(words)
    limits = {"train": train_tokens, "valid": eval_tokens, "test": eval_tokens}
    for split, lines in splits.items():
        kept, n = [], 0
        for words in lines:
            if n >= limits[split]:
                break
            kept.append(words)
            n += len(words) + 1
        splits[split] = kept
    counts = Counter(w for words in splits["train"] for w in words)
    keep = {w for w, c in counts.most_common(vocab - 2) if c >= min_count}
    stats = {"source": str(root), "files": len(files)}
    for split, lines in splits.items():
        text = "\n".join(" ".join(w if w in keep else UNK for w in words) for words in lines)
        (out / f"{split}.txt").write_text(text + "\n", encoding="utf-8")
        stats[f"{split}_tokens"] = sum(len(words) + 1 for words in lines)
    return stats


@dataclass
class Run:
    method: str
    seed: int
    val_ppl: float
    test_ppl: float
    seconds_per_epoch: float
    seconds: float


def run_one(method: str, seed: int, data: WordLanguageData, args: argparse.Namespace) -> Run:
    m = args.m if method == "MaxUp" else 1
    pl.seed_everything(seed, verbose=False)
    model = AWDLSTMLanguageModel(
        data.vocab_size,
        emb_size=args.emb,
        hidden_size=args.hidden,
        layers=args.layers,
        dropout=args.dropout,
        dropout_hidden=args.dropout_hidden,
        dropout_input=args.dropout_input,
        weight_drop=args.weight_drop,
        embedding_dropout=args.p,
        lr=args.lr,
        bptt=args.bptt,
        nonmono=args.nonmono,
        m=m,
        seed=seed,
    )
    timer = EpochTimer()
    warmup = min(args.warmup, args.epochs - 1) if m > 1 else 0
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.25, num_sanity_val_steps=0,
        callbacks=[MaxUp(warmup_epochs=warmup), timer],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    val = trainer.validate(model, datamodule=data, verbose=False)[0]["val/ppl"]
    test = trainer.test(model, datamodule=data, verbose=False)[0]["test/ppl"]
    timed = timer.seconds[warmup:] or timer.seconds
    return Run(method, seed, float(val), float(test), statistics.mean(timed), seconds)


def report(runs: list[Run], args: argparse.Namespace, stats: dict, total: float) -> str:
    lines = [
        f"AWD-LSTM ({args.layers} layers, {args.emb}-d embedding, {args.hidden} hidden, tied) on {stats['source']}:"
        f" {stats['train_tokens']} train / {stats['valid_tokens']} valid / {stats['test_tokens']} test tokens,"
        f" vocabulary {stats['vocab']}; {args.epochs} epochs, batch {args.batch_size} x bptt {args.bptt},"
        f" word-embedding dropout p = {args.p}, MaxUp m = {args.m} after {args.warmup} warm-up epoch(s);"
        f" {len(args.seeds)} seeds; torch threads {args.threads}; total {total / 60:.1f} min",
        "",
        "| metric | ordinary | MaxUp | MaxUp - ordinary (95 % t-interval) | MaxUp lower on |",
        "|---|---|---|---|---|",
    ]
    for metric, name in (("val_ppl", "validation perplexity"), ("test_ppl", "test perplexity")):
        base = {r.seed: getattr(r, metric) for r in runs if r.method == "ordinary"}
        ours = {r.seed: getattr(r, metric) for r in runs if r.method == "MaxUp"}
        diffs = [ours[s] - base[s] for s in sorted(base) if s in ours]
        mean, half = paired_interval(diffs)
        lines.append(
            f"| {name} | {statistics.mean(base.values()):.2f} | {statistics.mean(ours.values()):.2f} |"
            f" {mean:+.2f} ± {half:.2f} [{mean - half:+.2f}, {mean + half:+.2f}] | {sum(d < 0 for d in diffs)} of"
            f" {len(diffs)} seeds |"
        )
    for method in ("ordinary", "MaxUp"):
        rs = [r for r in runs if r.method == method]
        lines.append(
            f"| s / epoch, {method} (MaxUp phase) | {statistics.mean(r.seconds_per_epoch for r in rs):.1f} | | | |"
        )
    lines.append("")
    lines.append("| seed | ordinary val / test | MaxUp val / test |")
    lines.append("|---|---|---|")
    for seed in args.seeds:
        o = next(r for r in runs if r.method == "ordinary" and r.seed == seed)
        x = next(r for r in runs if r.method == "MaxUp" and r.seed == seed)
        lines.append(f"| {seed} | {o.val_ppl:.2f} / {o.test_ppl:.2f} | {x.val_ppl:.2f} / {x.test_ppl:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="ordinary epochs before MaxUp starts")
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.1, help="word-embedding dropout")
    parser.add_argument("--train-tokens", type=int, default=120_000)
    parser.add_argument("--eval-tokens", type=int, default=30_000)
    parser.add_argument("--vocab", type=int, default=6_000)
    parser.add_argument("--min-count", type=int, default=3)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.4)
    parser.add_argument("--dropout-hidden", type=float, default=0.2)
    parser.add_argument("--dropout-input", type=float, default=0.4)
    parser.add_argument("--weight-drop", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=30.0)
    parser.add_argument("--nonmono", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--json", type=str, default=None, help="also write the runs here")
    parser.add_argument("--quick", action="store_true", help="a tiny slice and model, for smoke tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_tokens, args.eval_tokens, args.vocab = 3000, 800, 500
        args.emb = args.hidden = 16
        args.layers, args.epochs, args.seeds, args.batch_size = 2, 2, [0], 4
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stats = prepare_corpus(find_sources(), out, args.train_tokens, args.eval_tokens, args.vocab, args.min_count)
        data = WordLanguageData(
            out / "train.txt", out / "valid.txt", out / "test.txt", batch_size=args.batch_size, eval_batch_size=10,
            bptt=args.bptt,
        )  # fmt: skip
        stats["vocab"] = data.vocab_size
        runs: list[Run] = []
        for seed in args.seeds:
            for method in ("ordinary", "MaxUp"):
                runs.append(run_one(method, seed, data, args))
                r = runs[-1]
                print(
                    f"seed {seed} {method}: val {r.val_ppl:.2f} test {r.test_ppl:.2f}"
                    f" ({r.seconds_per_epoch:.1f} s/epoch, {r.seconds:.0f} s)",
                    flush=True,
                )
    total = time.perf_counter() - start
    text = report(runs, args, stats, total)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"stats": stats, "runs": [asdict(r) for r in runs]}, indent=1))
    return runs


if __name__ == "__main__":
    main()
