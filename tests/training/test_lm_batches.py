"""Language-model batches: token keys, padding, the named scale, the identical-copies warning and LM errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_maxup import MaxUp, MaxUpMixin
from lightning_maxup.augment import TokenBatch, WordEmbeddingDropout, embedding_scale, sequence_loss
from tests.trainer_options import quiet_trainer_options

V, T = 12, 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hugging_face_dict_reads_input_ids_and_keeps_every_key() -> None:
    ids = torch.randint(1, V, (4, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, T, dtype=torch.long), "labels": ids}
    out = WordEmbeddingDropout(0.5, V, token_key="input_ids")(batch, generator=_gen())
    assert set(out) == {"input_ids", "attention_mask", "labels", "embedding_scale"}
    assert out["embedding_scale"].shape == (4, T)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # the caller's dict is untouched
    with pytest.raises(KeyError, match=r"`token_key`='tokens', got keys \['attention_mask', 'input_ids', 'labels'\]"):
        WordEmbeddingDropout(0.5, V)(batch, generator=_gen())


def test_tuple_batch_unpacks_as_before_and_a_loss_mask_is_not_a_scale() -> None:
    tokens = torch.randint(0, V, (3, T))
    x, y = out = WordEmbeddingDropout(0.5, V)((tokens, tokens), generator=_gen())
    assert isinstance(out, TokenBatch)
    assert torch.equal(x, tokens)
    assert torch.equal(y, tokens)
    loss_mask = torch.ones(3, T)  # a float tensor shaped like the tokens, third element
    assert embedding_scale((tokens, tokens, loss_mask)) is None
    x, y, mask = WordEmbeddingDropout(0.5, V)((tokens, tokens, loss_mask), generator=_gen())
    assert mask is loss_mask


def test_padding_is_never_dropped_nor_counted() -> None:
    pad = 0
    tokens = torch.randint(1, V, (256, T))
    tokens[:, -2:] = pad
    aug = WordEmbeddingDropout(0.5, V, pad_id=pad)
    params = aug.sample(tokens, _gen())
    scale = embedding_scale(aug.apply(tokens, params))
    assert torch.equal(scale[:, -2:], torch.ones(256, 2))  # exactly 1, in every one of 256 rows at p = 0.5
    assert set(scale[:, :-2].unique().tolist()) == {0.0, 2.0}
    # kept fraction counts the V - 1 real words only: its mean is 1 - p within 4 standard errors
    kept = aug.kept_fraction(params)
    reference = params["keep"][:, 1:].double().mean(dim=1)
    assert torch.allclose(kept, reference)
    assert abs(float(kept.mean()) - 0.5) < 4 * (0.25 / (256 * (V - 1))) ** 0.5
    with pytest.raises(ValueError, match=r"`pad_id` to be None or a token id in \[0, `vocab_size`=12\), got 12"):
        WordEmbeddingDropout(0.5, V, pad_id=V)


def test_sequence_loss_leaves_padding_out() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(5, T, V), torch.randint(1, V, (5, T))
    targets[0, 3:] = 0
    targets[1, :] = 0  # all padding
    got = sequence_loss(logits, targets, pad_id=0)
    for n in range(5):  # the obvious loop: mean over the row's non-padding tokens
        terms = [F.cross_entropy(logits[n, t], targets[n, t]) for t in range(T) if targets[n, t] != 0]
        expected = torch.stack(terms).mean() if terms else torch.tensor(0.0)
        assert torch.allclose(got[n], expected, atol=1e-6), (n, got[n], expected)
    assert torch.allclose(
        sequence_loss(logits, targets), F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    )


# ----------------------------------------------------------------------------------------------------------------------
# Through Lightning
# ----------------------------------------------------------------------------------------------------------------------
class _Tokens(Dataset):
    def __init__(self, n: int = 16, high: int = V, bad_from: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(1, V, (n, T), generator=g)
        self.bad_from = bad_from
        self.high = high

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i].clone()
        if self.bad_from is not None and i >= self.bad_from:
            x[0] = self.high - 1  # valid for the model, out of range for the augmentation
        return x, x


class _LM(MaxUpMixin, pl.LightningModule):
    def __init__(self, apply_scale: bool = True, model_vocab: int = V, per_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embed = nn.Embedding(model_vocab, 8)
        self.out = nn.Linear(8, model_vocab)
        self.apply_scale, self.per_token = apply_scale, per_token

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        e = self.embed(x)
        scale = embedding_scale(batch)
        if self.apply_scale and scale is not None:
            e = e * scale[..., None]
        per_token = F.cross_entropy(self.out(e).transpose(1, 2), y, reduction="none")
        return per_token if self.per_token else per_token.mean(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model: _LM, data: Dataset, epochs: int = 3, warmup: int = 1) -> list[str]:
    trainer = pl.Trainer(**quiet_trainer_options(max_epochs=epochs, callbacks=[MaxUp(warmup_epochs=warmup)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(data, batch_size=4))
    return [str(w.message) for w in caught if "copies had exactly the same loss" in str(w.message)]


def test_a_scale_never_applied_warns_once_after_the_first_maxup_epoch() -> None:
    forgotten = _fit(_LM(apply_scale=False, m=2, augment=WordEmbeddingDropout(0.3, V)), _Tokens())
    assert len(forgotten) == 1
    assert "epoch 1" in forgotten[0]
    assert "embedding_scale(batch)" in forgotten[0]
    applied = _fit(_LM(apply_scale=True, m=2, augment=WordEmbeddingDropout(0.3, V)), _Tokens())
    assert applied == []


def test_out_of_range_ids_in_a_later_batch_are_named_not_reported_as_nan() -> None:
    # The model has 20 embedding rows, the augmentation was told 12: ids 12..19 pass the model but not the
    # augmentation. The first batch is fine (the host check passes), a later one is not.
    model = _LM(model_vocab=20, m=2, augment=WordEmbeddingDropout(0.3, V))
    with pytest.raises(ValueError, match=r"token id\(s\) outside \[0, `vocab_size`=12\).*from 1 to 19"):
        _fit(model, _Tokens(high=20, bad_from=8), epochs=2, warmup=0)


def test_a_per_token_loss_gets_the_hint_to_reduce_over_tokens_in_the_users_terms() -> None:
    model = _LM(per_token=True, m=4, augment=WordEmbeddingDropout(0.3, V))
    with pytest.raises(ValueError, match="must return a 1-D tensor") as err:
        _fit(model, _Tokens(), epochs=1, warmup=0)
    message = str(err.value)
    assert "got shape [16, 6]" in message
    assert "the 16 candidates (m=4 copies of each of your 4 samples)" in message
    assert "reduce over the tokens" in message
    assert ".mean(dim=1)" in message
    assert "use reduction='none'" not in message


class _CountedLM(_LM):
    """Counts the syncing ops of every step after the first (which holds the pre-flight check), per epoch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.syncs: list[tuple[int, int, list[str]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        from tests.sync_counter import SyncCounter

        if self._maxup_prepared_for is None:
            return self.maxup_step(batch).loss
        with SyncCounter() as counter:
            loss = self.maxup_step(batch).loss
        ops = [x.op for x in counter.syncs if not x.where.startswith("result.py") or " __init__ " not in x.where]
        self.syncs.append((self.current_epoch, batch_idx, ops))
        return loss


def test_the_epoch_checks_read_the_device_once_per_epoch_not_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_maxup.training.callback as callback_module
    from tests.sync_counter import SyncCounter

    ends: list[list[str]] = []
    close = callback_module.close_epoch_checks

    def counted_close(module: Any) -> None:
        with SyncCounter() as counter:
            close(module)
        ends.append([x.op for x in counter.syncs])

    monkeypatch.setattr(callback_module, "close_epoch_checks", counted_close)
    model = _CountedLM(m=2, augment=WordEmbeddingDropout(0.3, V), check_finite=False)
    _fit(model, _Tokens(), epochs=3, warmup=1)
    assert all(ops == [] for _, _, ops in model.syncs), "no step reads the device"
    # At each epoch's end, outside the steps: the out-of-range count; after the first MaxUp epoch (1), also the
    # identical-copies flag, which is watched in that epoch only.
    assert [len(ops) for ops in ends] == [3, 4, 3], ends
    assert all(op == "_local_scalar_dense" for ops in ends for op in ops), ends
