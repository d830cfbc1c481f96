"""Word-level language-modelling data as AWD-LSTM prepares it: text files, a vocabulary, batchified streams.

Each line of a file is split on whitespace and ends with ``<eos>`` (Merity et al.'s ``data.Corpus``); the token
stream of a split is cut into ``B`` equal contiguous streams (``batchify``), the rows of a ``[B, L]`` matrix, and
batches are windows ``[B, T]`` of consecutive columns with targets shifted by one token. Training windows have
AWD-LSTM's variable length: ``bptt`` with probability 0.95 and ``bptt / 2`` otherwise, then drawn from
``N(that, 5)`` and at least 5 tokens (:class:`WindowSampler`), from a generator seeded by ``(seed, epoch)``, so an
epoch's windows are the same on every run and a resumed epoch continues where it stopped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_maxup._lightning import pl

__all__ = ["Vocabulary", "WindowLoader", "WindowSampler", "WordLanguageData", "batchify", "read_words"]

UNK, EOS = "<unk>", "<eos>"


def read_words(path: str | Path, lowercase: bool = False, max_tokens: int | None = None) -> list[str]:
    r"""The words of a text file, one ``<eos>`` after each non-empty line (at most ``max_tokens`` of them).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        ...     _ = f.write("the cat\n\nsat down\n")
        >>> read_words(f.name)
        ['the', 'cat', '<eos>', 'sat', 'down', '<eos>']
    """
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = (line.lower() if lowercase else line).split()
            if parts:
                words.extend(parts)
                words.append(EOS)
            if max_tokens is not None and len(words) >= max_tokens:
                return words[:max_tokens]
    return words


class Vocabulary:
    """Word ids: ``<eos>`` is 0, ``<unk>`` is 1, then the words seen at least ``min_count`` times, most frequent first.

    Args:
        words: The training words.
        min_count: Words seen fewer times map to ``<unk>``.

    Example:
        >>> vocab = Vocabulary(["b", "a", "b", "<eos>"])
        >>> vocab.itos, vocab.encode(["a", "z"]).tolist()
        (['<eos>', '<unk>', 'b', 'a'], [3, 1])
    """

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        counts = Counter(words)
        kept = [w for w, c in counts.items() if c >= min_count and w not in (UNK, EOS)]
        self.itos = [EOS, UNK, *sorted(kept, key=lambda w: (-counts[w], w))]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Sequence[str]) -> Tensor:
        """Ids of ``words`` (``<unk>`` for unknown ones)."""
        unk = self.stoi[UNK]
        return torch.tensor([self.stoi.get(w, unk) for w in words], dtype=torch.long)


def batchify(ids: Tensor, streams: int) -> Tensor:
    """Cut ``ids`` into ``streams`` contiguous rows ``[streams, L]``, dropping the remainder (AWD-LSTM's batchify).

    Example:
        >>> batchify(torch.arange(7), 2).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    if streams < 1 or ids.numel() < 2 * streams:
        raise ValueError(f"Expected at least 2 tokens per stream, got {ids.numel()} tokens for {streams} streams")
    length = ids.numel() // streams
    return ids[: streams * length].view(streams, length)


class WindowSampler(Sampler[tuple[int, int]]):
    """Yield ``(start, length)`` windows over the columns of a ``[B, L]`` stream, in order.

    With ``variable=True`` each window's length is AWD-LSTM's draw: ``bptt`` with probability 0.95, else
    ``bptt / 2``; then ``max(5, int(N(that, 5)))``; never past the end. The draws come from a generator seeded
    with ``(seed, epoch)`` (Lightning calls :meth:`set_epoch`), so they replay, and :meth:`resume` skips the
    windows a resumed epoch has already trained.

    Args:
        columns: ``L``, the stream length.
        bptt: The nominal window length.
        variable: Draw lengths as AWD-LSTM; else every window is ``bptt`` long.
        seed: Seed of the length draws.

    Example:
        >>> list(WindowSampler(10, bptt=4, variable=False))
        [(0, 4), (4, 4), (8, 1)]
    """

    def __init__(self, columns: int, bptt: int, variable: bool = True, seed: int = 0) -> None:
        if bptt < 1:
            raise ValueError(f"Expected `bptt` to be a positive integer, got {bptt!r}")
        self.columns, self.bptt, self.variable, self.seed = columns, bptt, variable, seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s length draws (Lightning calls this at every epoch's start)."""
        self.epoch = epoch

    def resume(self, epoch: int, windows_done: int) -> None:
        """Skip the first ``windows_done`` windows of ``epoch`` at its next iteration."""
        self._skip = (epoch, windows_done)

    def windows(self, epoch: int) -> list[tuple[int, int]]:
        """All windows of ``epoch``."""
        rng = random.Random(f"{self.seed}/{epoch}")  # host-side draws of window lengths: no tensors involved
        out: list[tuple[int, int]] = []
        start = 0
        while start < self.columns - 1:
            length = self.bptt
            if self.variable:
                base = self.bptt if rng.random() < 0.95 else self.bptt / 2
                length = max(5, int(rng.gauss(base, 5)))
            length = min(length, self.columns - 1 - start)
            out.append((start, length))
            start += length
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        windows = self.windows(self.epoch)
        skip, self._skip = self._skip, None
        if skip is not None and skip[0] == self.epoch:
            windows = windows[skip[1] :]
        return iter(windows)

    def __len__(self) -> int:
        return len(self.windows(self.epoch))


class StreamWindows(Dataset[tuple[Tensor, Tensor]]):
    """``(inputs, targets)`` windows ``[B, T]`` of a ``[B, L]`` stream, indexed by ``(start, length)``."""

    def __init__(self, stream: Tensor) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return max(int(self.stream.shape[1]) - 1, 0)

    def __getitem__(self, window: tuple[int, int]) -> tuple[Tensor, Tensor]:
        start, length = window
        return self.stream[:, start : start + length], self.stream[:, start + 1 : start + 1 + length]


class WindowLoader(DataLoader[Any]):
    """The loader of :class:`WindowSampler` windows; resumable in Lightning's sense (``state_dict``).

    A batch's position in the epoch is known exactly only to the training step (Lightning fetches ahead), so the
    position a mid-epoch checkpoint resumes from is kept by the module that trains on the windows (as
    :class:`~lightning_maxup.recipes.models.awd_lstm.AWDLSTMLanguageModel` does, with its carried state) and handed to
    :meth:`WordLanguageData.resume_at`; this loader's own state is the epoch only.
    """

    def state_dict(self) -> dict[str, Any]:
        """The epoch of the window draws."""
        return {"epoch": getattr(self.sampler, "epoch", 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore beyond the epoch, which Lightning sets again through ``set_epoch``."""


class WordLanguageData(pl.LightningDataModule):
    r"""Word-level LM data from plain text files, batchified into streams for stateful truncated BPTT.

    The vocabulary is built from the training file when :attr:`vocab_size` is first read (the CLI reads it to
    link it into the model), so it is known before the model is built.

    Args:
        train_file: Training text.
        val_file: Validation text.
        test_file: Test text (optional).
        batch_size: Training streams ``B`` (AWD-LSTM: 80 for WikiText-2, 20 for PTB).
        eval_batch_size: Validation and test streams (AWD-LSTM: 10, and 1 for test; here both use this).
        bptt: Nominal window length.
        variable_length: AWD-LSTM's variable training windows (see :class:`WindowSampler`).
        min_count: Training words seen fewer times map to ``<unk>``.
        lowercase: Lower-case the text.
        max_train_tokens: Read only this many training tokens (a slice, for quick runs).
        max_eval_tokens: Read only this many validation and test tokens.
        seed: Seed of the window lengths.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "train.txt").write_text("a b c a b c a b\n" * 10)
        >>> _ = (root / "valid.txt").write_text("a b c\n" * 5)
        >>> data = WordLanguageData(root / "train.txt", root / "valid.txt", batch_size=2, eval_batch_size=1, bptt=4)
        >>> data.vocab_size
        5
        >>> data.setup("fit")
        >>> x, y = next(iter(data.val_dataloader()))
        >>> x.shape, x[0, 1:].tolist() == y[0, :-1].tolist()
        (torch.Size([1, 4]), True)
    """

    def __init__(
        self,
        train_file: str | Path,
        val_file: str | Path,
        test_file: str | Path | None = None,
        batch_size: int = 80,
        eval_batch_size: int = 10,
        bptt: int = 70,
        variable_length: bool = True,
        min_count: int = 1,
        lowercase: bool = False,
        max_train_tokens: int | None = None,
        max_eval_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("bptt", bptt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, got {value!r}")
        for name, path in (("train_file", train_file), ("val_file", val_file), ("test_file", test_file)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"`{name}` {str(path)!r} is not a file")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.batch_size, self.eval_batch_size, self.bptt = batch_size, eval_batch_size, bptt
        self.variable_length, self.min_count, self.lowercase = variable_length, min_count, lowercase
        self.max_tokens = {"train": max_train_tokens, "val": max_eval_tokens, "test": max_eval_tokens}
        self.seed = seed
        self._vocab: Vocabulary | None = None
        self._words: dict[str, list[str]] = {}
        self.streams: dict[str, Tensor] = {}
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, windows_done: int) -> None:
        """Make the next training loader skip the first ``windows_done`` windows of ``epoch`` (a mid-epoch resume)."""
        self._resume = (epoch, windows_done)

    def _read(self, split: str) -> list[str]:
        if split not in self._words:
            path = self.files[split]
            self._words[split] = [] if path is None else read_words(path, self.lowercase, self.max_tokens[split])
        return self._words[split]

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary of the training file (built on first use)."""
        if self._vocab is None:
            self._vocab = Vocabulary(self._read("train"), self.min_count)
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of words, ``<eos>`` and ``<unk>`` included."""
        return len(self.vocabulary)

    def setup(self, stage: str | None = None) -> None:
        """Encode and batchify the splits."""
        for split, rows in (("train", self.batch_size), ("val", self.eval_batch_size), ("test", self.eval_batch_size)):
            if split not in self.streams and self.files[split] is not None:
                self.streams[split] = batchify(self.vocabulary.encode(self._read(split)), rows)

    def _loader(self, split: str, variable: bool) -> WindowLoader:
        stream = self.streams[split]
        sampler = WindowSampler(int(stream.shape[1]), self.bptt, variable=variable, seed=self.seed)
        return WindowLoader(StreamWindows(stream), sampler=sampler, batch_size=None)

    def train_dataloader(self) -> WindowLoader:
        """Variable-length training windows over ``batch_size`` streams (after :meth:`resume_at`, from there)."""
        loader = self._loader("train", self.variable_length)
        if self._resume is not None:
            assert isinstance(loader.sampler, WindowSampler)
            loader.sampler.resume(*self._resume)
            self._resume = None
        return loader

    def val_dataloader(self) -> WindowLoader:
        """Fixed ``bptt`` windows over ``eval_batch_size`` validation streams."""
        return self._loader("val", False)

    def test_dataloader(self) -> WindowLoader:
        """Fixed ``bptt`` windows over ``eval_batch_size`` test streams."""
        if "test" not in self.streams:
            raise ValueError("WordLanguageData has no `test_file`")
        return self._loader("test", False)
