"""Word-level embedding dropout as a MaxUp augmentation for language models.

Embedding dropout (Gal & Ghahramani, 2016; Merity, Keskar & Socher, "Regularizing and Optimizing LSTM Language
Models", ICLR 2018) drops whole rows of the embedding matrix: a sampled set of vocabulary entries maps to the zero
vector, wherever the word occurs in the sequence, and the remaining vectors are scaled by ``1 / (1 - p)``.

As a MaxUp augmentation each row (sequence) draws its own vocabulary mask, and the mask is *data*: the
augmentation returns the batch with an added per-token scale tensor (0 for dropped words, ``1 / (1 - p)`` for kept
ones). MaxUp gathers every batch tensor of the worst copies, so the gradient pass multiplies the embeddings by
exactly the mask that the selection pass found worst. The model applies it as ``embed(tokens) * scale[..., None]``,
which equals looking the tokens up in the row's dropped-out embedding matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_maxup import random as lr
from lightning_maxup.augment._base import Augmentation, Params
from lightning_maxup.random import Generator

__all__ = ["WordEmbeddingDropout", "embedding_scale"]

SCALE_KEY = "embedding_scale"


def _tokens_of(batch: Any, key: str) -> Tensor:
    if isinstance(batch, Tensor):
        tokens = batch
    elif isinstance(batch, dict):
        if "tokens" not in batch:
            raise KeyError(f"WordEmbeddingDropout looks for the token ids under 'tokens', got keys {sorted(batch)}")
        tokens = batch["tokens"]
        if key in batch:
            raise ValueError(f"The batch already holds `{key}`; apply WordEmbeddingDropout once per batch")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        tokens = batch[0]
    else:
        raise TypeError(
            "WordEmbeddingDropout takes token ids as a tensor, a tuple `(tokens, targets, ...)` or a dict with"
            f" 'tokens', got {type(batch).__name__}"
        )
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(
            f"Expected token ids of shape [N, T] and an integer dtype, got shape {tuple(tokens.shape)} and dtype"
            f" {tokens.dtype}"
        )
    return tokens


def embedding_scale(batch: Any, key: str = SCALE_KEY) -> Tensor | None:
    """The per-token embedding scale that :class:`WordEmbeddingDropout` added to ``batch``, or ``None``.

    For a tuple batch it is the last element when that element is a floating tensor shaped like the tokens.

    Example:
        >>> tokens = torch.tensor([[1, 2, 1]])
        >>> aug = WordEmbeddingDropout(0.5, vocab_size=4)
        >>> batch = aug((tokens, tokens), generator=torch.Generator().manual_seed(1))
        >>> scale = embedding_scale(batch)
        >>> scale.shape, bool(scale[0, 0] == scale[0, 2])
        (torch.Size([1, 3]), True)
        >>> embedding_scale((tokens, tokens)) is None
        True
    """
    if isinstance(batch, dict):
        return batch.get(key)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        last, first = batch[-1], batch[0]
        if isinstance(last, Tensor) and last.is_floating_point() and last.shape == first.shape:
            return last
    return None


class WordEmbeddingDropout(Augmentation):
    """Drop whole word vectors: per row, each vocabulary entry is dropped with probability ``p``.

    ``sample`` draws a boolean keep-mask over the vocabulary for every row (``[N, vocab_size]``); ``apply`` looks
    each token up in its row's mask and returns the batch with a per-token scale tensor ``[N, T]`` added: for a
    tuple ``(tokens, targets, ...)`` it is appended at the end, for a dict it is stored under ``key``, and a bare
    token tensor becomes ``(tokens, scale)``. The token ids themselves are unchanged, and all occurrences of a word
    in a sequence share its fate (word-level, not token-level, dropout).

    Args:
        p: Probability of dropping a vocabulary entry, in ``[0, 1)``.
        vocab_size: Number of embedding rows; token ids must lie in ``[0, vocab_size)``.
        key: Dict key of the scale for dict batches.

    Example:
        >>> tokens = torch.tensor([[3, 1, 3, 0], [2, 2, 1, 0]])
        >>> aug = WordEmbeddingDropout(p=0.5, vocab_size=4)
        >>> x, y, scale = aug((tokens, tokens), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(x, tokens), sorted(scale.unique().tolist()) == [0.0, 2.0]
        (True, True)
        >>> bool(scale[0, 0] == scale[0, 2]) and bool(scale[1, 0] == scale[1, 1])  # same word, same fate
        True
    """

    def __init__(self, p: float, vocab_size: int, key: str = SCALE_KEY) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"Expected `p` to be a probability in [0, 1), got {p!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"Expected `vocab_size` to be a positive integer, got {vocab_size!r}")
        self.p = float(p)
        self.vocab_size = vocab_size
        self.key = key

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw every row's vocabulary keep-mask ``[N, vocab_size]``."""
        tokens = _tokens_of(batch, self.key)
        u = lr.uniform((tokens.shape[0], self.vocab_size), generator=generator, device=tokens.device)
        return {"keep": u >= self.p}

    def check(self, batch: Any) -> None:
        """Raise unless every token id lies in ``[0, vocab_size)`` (reads the ids on the host: a sync)."""
        tokens = _tokens_of(batch, self.key)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"Expected token ids in [0, `vocab_size`={self.vocab_size}), got values in"
                f" [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def scale(self, tokens: Tensor, keep: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-token scale ``[N, T]``: ``keep[n, tokens[n, t]] / (1 - p)``.

        The range of the ids is not read on the host (that would be a sync every step; :meth:`check` does it on
        the first batch): an id outside ``[0, vocab_size)`` gets a NaN scale, so the loss is NaN and the step's
        ``check_finite`` reports it.
        """
        ids = tokens.long()
        valid = (ids >= 0) & (ids < self.vocab_size)
        kept = keep.to(tokens.device).gather(1, ids.clamp(0, self.vocab_size - 1))
        scale = kept.to(dtype) * (1.0 / (1.0 - self.p))
        return torch.where(valid, scale, float("nan"))

    def apply(self, batch: Any, params: Params) -> Any:
        """Return the batch with the per-token scale added (see the class docstring)."""
        tokens = _tokens_of(batch, self.key)
        scale = self.scale(tokens, params["keep"])
        if isinstance(batch, Tensor):
            return (batch, scale)
        if isinstance(batch, dict):
            out = dict(batch) if type(batch) is dict else type(batch)(batch)
            out[self.key] = scale
            return out
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            raise TypeError("WordEmbeddingDropout cannot add a field to a namedtuple batch; use a tuple or a dict")
        return (*batch, scale) if isinstance(batch, tuple) else [*batch, scale]
