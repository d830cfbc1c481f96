"""Word-level embedding dropout as a MaxUp augmentation for language models.

Embedding dropout (Gal & Ghahramani, 2016; Merity, Keskar & Socher, "Regularizing and Optimizing LSTM Language
Models", ICLR 2018) drops whole rows of the embedding matrix: a sampled set of vocabulary entries maps to the zero
vector, wherever the word occurs in the sequence, and the remaining vectors are scaled by ``1 / (1 - p)``.

As a MaxUp augmentation each row (sequence) draws its own vocabulary mask, and the mask is *data*: the
augmentation returns the batch with a per-token scale tensor (0 for dropped words, ``1 / (1 - p)`` for kept
ones, 1 for padding) under a name, never as an anonymous extra element: a tuple batch comes back as a
:class:`TokenBatch`, which unpacks like the tuple it wraps (``x, y = batch``) and holds the scale as
``batch.embedding_scale``; a dict batch gets the key ``"embedding_scale"``. MaxUp gathers every batch tensor of
the worst copies, so the gradient pass multiplies the embeddings by exactly the mask that the selection pass found
worst. The model applies it as ``embed(tokens) * scale[..., None]``, which equals looking the tokens up in the
row's dropped-out embedding matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_maxup.augment._base import Augmentation, Params
from lightning_maxup.core import random as lr
from lightning_maxup.core.random import Generator

__all__ = ["TokenBatch", "WordEmbeddingDropout", "embedding_scale", "sequence_loss"]

SCALE_KEY = "embedding_scale"


@dataclass
class TokenBatch:
    """A tuple batch with the per-token embedding scale attached by name.

    It unpacks, indexes and has the length of the tuple it wraps, so ``x, y = batch`` and ``batch[0]`` work as
    before the augmentation; the scale is ``batch.embedding_scale`` (or :func:`embedding_scale`). MaxUp's row
    operations (expand, slice, gather) and Lightning's device transfer walk both fields.

    Attributes:
        items: The original tuple (or list) batch, tokens first.
        embedding_scale: The per-token scale ``[N, T]``.

    Example:
        >>> tokens = torch.tensor([[1, 2]])
        >>> batch = TokenBatch((tokens, tokens), torch.ones(1, 2))
        >>> x, y = batch
        >>> len(batch), torch.equal(batch[1], y), batch.embedding_scale.shape
        (2, True, torch.Size([1, 2]))
    """

    items: tuple[Any, ...] | list[Any]
    embedding_scale: Tensor

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> Any:
        return self.items[index]


def _tokens_of(batch: Any, key: str, token_key: str) -> Tensor:
    if isinstance(batch, Tensor):
        tokens = batch
    elif isinstance(batch, dict):
        if token_key not in batch:
            raise KeyError(
                f"WordEmbeddingDropout looks for the token ids under `token_key`={token_key!r}, got keys"
                f" {sorted(batch)}; pass token_key='input_ids' for Hugging Face batches"
            )
        tokens = batch[token_key]
        if key in batch:
            raise ValueError(f"The batch already holds `{key}`; apply WordEmbeddingDropout once per batch")
    elif isinstance(batch, TokenBatch):
        raise ValueError("The batch already holds `embedding_scale`; apply WordEmbeddingDropout once per batch")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        tokens = batch[0]
    else:
        raise TypeError(
            "WordEmbeddingDropout takes token ids as a tensor, a tuple `(tokens, targets, ...)` or a dict with"
            f" `token_key`, got {type(batch).__name__}"
        )
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(
            f"Expected token ids of shape [N, T] and an integer dtype, got shape {tuple(tokens.shape)} and dtype"
            f" {tokens.dtype}"
        )
    return tokens


def embedding_scale(batch: Any, key: str = SCALE_KEY) -> Tensor | None:
    """The per-token embedding scale that :class:`WordEmbeddingDropout` added to ``batch``, or ``None``.

    Only a named scale is read: ``batch.embedding_scale`` of a :class:`TokenBatch` or ``batch[key]`` of a dict.
    A plain tuple (a validation batch, or one whose third element is a loss mask) has none.

    Example:
        >>> tokens = torch.tensor([[1, 2, 1]])
        >>> aug = WordEmbeddingDropout(0.5, vocab_size=4)
        >>> batch = aug((tokens, tokens), generator=torch.Generator().manual_seed(1))
        >>> scale = embedding_scale(batch)
        >>> scale.shape, bool(scale[0, 0] == scale[0, 2])
        (torch.Size([1, 3]), True)
        >>> embedding_scale((tokens, tokens, torch.ones(1, 3))) is None  # a loss mask is not a scale
        True
    """
    if isinstance(batch, TokenBatch):
        return batch.embedding_scale
    if isinstance(batch, dict):
        return batch.get(key)
    return None


def sequence_loss(logits: Tensor, targets: Tensor, pad_id: int | None = None) -> Tensor:
    """Per-sequence cross-entropy ``[N]``: the mean over each row's tokens, padding positions left out.

    This is the per-sample loss MaxUp needs from a language model: ``F.cross_entropy(..., reduction="none")``
    gives ``[N, T]`` per-token losses, and the mean over tokens (not over the batch) makes one loss per sequence.
    Targets equal to ``pad_id`` count neither in the sum nor in the token count; a row of padding only has loss 0.

    Args:
        logits: ``[N, T, V]`` scores.
        targets: ``[N, T]`` target ids.
        pad_id: The padding id of the targets, or ``None``.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 words: log 4 per token
        >>> targets = torch.tensor([[1, 2, 0]])
        >>> round(float(sequence_loss(logits, targets, pad_id=0)[0]), 4) == round(float(torch.log(torch.tensor(4.0))), 4)
        True
    """  # noqa: E501
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"Expected `logits` [N, T, V] and `targets` [N, T], got shapes {list(logits.shape)} and"
            f" {list(targets.shape)}"
        )
    ignore = -100 if pad_id is None else pad_id
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=ignore)
    if pad_id is None:
        return per_token.mean(dim=1)
    counted = (targets != pad_id).sum(dim=1).clamp_min(1)
    return per_token.sum(dim=1) / counted


class WordEmbeddingDropout(Augmentation):
    """Drop whole word vectors: per row, each vocabulary entry is dropped with probability ``p``.

    ``sample`` draws a boolean keep-mask over the vocabulary for every row (``[N, vocab_size]``); ``apply`` looks
    each token up in its row's mask and returns the batch with a per-token scale ``[N, T]`` added under a name: a
    tuple or list ``(tokens, targets, ...)`` becomes a :class:`TokenBatch` (which unpacks like the tuple, with the
    scale as ``.embedding_scale``), a dict gets the key ``key``, and a bare token tensor becomes a one-element
    :class:`TokenBatch`. The token ids themselves are unchanged, and all occurrences of a word in a sequence share
    its fate (word-level, not token-level, dropout).

    **Padding.** With ``pad_id``, padding positions are never dropped and get scale exactly 1 (the vocabulary
    entry ``pad_id`` is always kept and left out of :meth:`kept_fraction`). Leave them out of the loss too:
    :func:`sequence_loss` averages each row over its non-padding targets.

    **Token ids out of range.** The first batch is checked on the host (:meth:`check`). Later batches are not read
    on the host in the step: an id outside ``[0, vocab_size)`` gets scale 0 and is counted on the device, and
    :meth:`check_deferred` raises, naming the ids, when called; :class:`~lightning_maxup.MaxUpMixin` calls it at
    the end of every epoch and of training (one read per epoch), so out-of-range ids are never reported as NaN
    losses.

    Args:
        p: Probability of dropping a vocabulary entry, in ``[0, 1)``.
        vocab_size: Number of embedding rows; token ids must lie in ``[0, vocab_size)``.
        key: Dict key of the scale for dict batches.
        token_key: Dict key of the token ids for dict batches (``"input_ids"`` for Hugging Face batches).
        pad_id: The padding id, never dropped, or ``None``.

    Example:
        >>> tokens = torch.tensor([[3, 1, 3, 0], [2, 2, 1, 0]])
        >>> aug = WordEmbeddingDropout(p=0.5, vocab_size=4, pad_id=0)
        >>> x, y = batch = aug((tokens, tokens), generator=torch.Generator().manual_seed(0))
        >>> torch.equal(x, tokens), sorted(batch.embedding_scale.unique().tolist()) == [0.0, 1.0, 2.0]
        (True, True)
        >>> scale = batch.embedding_scale
        >>> bool(scale[0, 0] == scale[0, 2]) and bool(scale[1, 0] == scale[1, 1])  # same word, same fate
        True
        >>> scale[:, 3].tolist()  # padding is never dropped
        [1.0, 1.0]
    """

    def __init__(
        self, p: float, vocab_size: int, key: str = SCALE_KEY, token_key: str = "tokens", pad_id: int | None = None
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"Expected `p` to be a probability in [0, 1), got {p!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"Expected `vocab_size` to be a positive integer, got {vocab_size!r}")
        if pad_id is not None and (
            isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size
        ):
            raise ValueError(
                f"Expected `pad_id` to be None or a token id in [0, `vocab_size`={vocab_size}), got {pad_id!r}"
            )
        self.p = float(p)
        self.vocab_size = vocab_size
        self.key = key
        self.token_key = token_key
        self.pad_id = pad_id
        self._invalid: tuple[Tensor, Tensor, Tensor] | None = None  # (count, min id, max id) since the last read

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw every row's vocabulary keep-mask ``[N, vocab_size]`` (``pad_id`` always kept)."""
        tokens = _tokens_of(batch, self.key, self.token_key)
        u = lr.uniform((tokens.shape[0], self.vocab_size), generator=generator, device=tokens.device)
        keep = u >= self.p
        if self.pad_id is not None:
            keep[:, self.pad_id] = True
        return {"keep": keep}

    def kept_fraction(self, params: Params) -> Tensor:
        """Per row, the fraction of the vocabulary kept by ``params["keep"]``, ``pad_id`` not counted.

        Example:
            >>> aug = WordEmbeddingDropout(0.5, vocab_size=3, pad_id=0)
            >>> aug.kept_fraction({"keep": torch.tensor([[True, False, True]])}).tolist()
            [0.5]
        """
        keep = params["keep"].double()
        if self.pad_id is None:
            return keep.mean(dim=1)
        return (keep.sum(dim=1) - keep[:, self.pad_id]) / max(self.vocab_size - 1, 1)

    def check(self, batch: Any) -> None:
        """Raise unless every token id lies in ``[0, vocab_size)`` (reads the ids on the host: a sync)."""
        tokens = _tokens_of(batch, self.key, self.token_key)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"Expected token ids in [0, `vocab_size`={self.vocab_size}), got values in"
                f" [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def check_deferred(self) -> None:
        """Raise if a batch since the last call held token ids outside ``[0, vocab_size)`` (one host read).

        Example:
            >>> aug = WordEmbeddingDropout(0.1, vocab_size=4)
            >>> _ = aug(torch.tensor([[1, 2]]), generator=torch.Generator().manual_seed(0))  # checked on the host
            >>> _ = aug(torch.tensor([[1, 7]]), generator=torch.Generator().manual_seed(0))  # counted on the device
            >>> aug.check_deferred()
            Traceback (most recent call last):
            ...
            ValueError: 1 token id(s) outside [0, `vocab_size`=4) reached WordEmbeddingDropout since its last check (ids seen from 1 to 7); check the data and the `vocab_size` of the augmentation and of the model
        """  # noqa: E501
        pending, self._invalid = self._invalid, None
        if pending is None:
            return
        count, low, high = (int(t) for t in pending)
        if count:
            raise ValueError(
                f"{count} token id(s) outside [0, `vocab_size`={self.vocab_size}) reached WordEmbeddingDropout since"
                f" its last check (ids seen from {low} to {high}); check the data and the `vocab_size` of the"
                " augmentation and of the model"
            )

    def _record_invalid(self, ids: Tensor, valid: Tensor) -> None:
        count = (~valid).sum()
        low, high = ids.amin(), ids.amax()
        if self._invalid is not None:
            count, low, high = (
                count + self._invalid[0],
                torch.minimum(low, self._invalid[1]),
                torch.maximum(high, self._invalid[2]),
            )
        self._invalid = (count, low, high)

    def scale(self, tokens: Tensor, keep: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-token scale ``[N, T]``: ``keep[n, tokens[n, t]] / (1 - p)``, and 1 at ``pad_id``.

        The range of the ids is not read on the host (that would be a sync every step; :meth:`check` does it on
        the first batch): an id outside ``[0, vocab_size)`` gets scale 0 and is counted on the device for
        :meth:`check_deferred`.
        """
        ids = tokens.long()
        valid = (ids >= 0) & (ids < self.vocab_size)
        if ids.numel():
            self._record_invalid(ids, valid)
        kept = keep.to(tokens.device).gather(1, ids.clamp(0, self.vocab_size - 1))
        scale = (kept & valid).to(dtype) * (1.0 / (1.0 - self.p))
        if self.pad_id is not None:
            scale = torch.where(ids == self.pad_id, 1.0, scale)
        return scale

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Each row's kept share of the vocabulary (``kept_fraction``, see :meth:`kept_fraction`)."""
        return {"kept_fraction": self.kept_fraction(params)}

    def apply(self, batch: Any, params: Params) -> Any:
        """Return the batch with the per-token scale added under a name (see the class docstring)."""
        tokens = _tokens_of(batch, self.key, self.token_key)
        scale = self.scale(tokens, params["keep"])
        if isinstance(batch, Tensor):
            return TokenBatch((batch,), scale)
        if isinstance(batch, dict):
            out = dict(batch) if type(batch) is dict else type(batch)(batch)
            out[self.key] = scale
            return out
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            raise TypeError("WordEmbeddingDropout cannot add a field to a namedtuple batch; use a tuple or a dict")
        return TokenBatch(tuple(batch) if isinstance(batch, tuple) else list(batch), scale)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the device counters of the running fit."""
        state = dict(self.__dict__)
        state["_invalid"] = None
        return state
