import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_maxup.augment import WordEmbeddingDropout, embedding_scale
from lightning_maxup.augment.text import TokenBatch
from lightning_maxup.core.functional import maxup_step
from lightning_maxup.core.random import KeyedGenerator


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_scale(tokens, keep, p):
    """Per row: build the dropped-out embedding multiplier of every vocabulary entry, then look each token up."""
    out = torch.zeros(tokens.shape)
    for n in range(tokens.shape[0]):
        row_factor = {v: (1.0 / (1.0 - p) if bool(keep[n, v]) else 0.0) for v in range(keep.shape[1])}
        for t in range(tokens.shape[1]):
            out[n, t] = row_factor[int(tokens[n, t])]
    return out


def _reference_embedded(weight, tokens, keep, p):
    """Look tokens up in each row's own embedding matrix with dropped rows zeroed (Merity et al.'s formulation)."""
    rows = []
    for n in range(tokens.shape[0]):
        w = weight * keep[n].to(weight.dtype)[:, None] / (1.0 - p)
        rows.append(torch.stack([w[int(tok)] for tok in tokens[n]]))
    return torch.stack(rows)


def test_scale_matches_reference():
    tokens = torch.randint(0, 11, (5, 9))
    aug = WordEmbeddingDropout(0.3, vocab_size=11)
    params = aug.sample((tokens, tokens), _gen())
    x, y = out = aug.apply((tokens, tokens), params)
    scale = out.embedding_scale
    assert torch.equal(x, tokens)
    assert torch.equal(y, tokens)
    expected = _reference_scale(tokens, params["keep"], 0.3)
    assert torch.allclose(scale, expected), f"largest error {(scale - expected).abs().max()}"


def test_scaled_lookup_equals_dropped_embedding_matrix():
    emb = nn.Embedding(7, 4)
    tokens = torch.randint(0, 7, (3, 12))
    aug = WordEmbeddingDropout(0.5, vocab_size=7)
    params = aug.sample(tokens, _gen(2))
    scale = embedding_scale(aug.apply(tokens, params))
    got = emb(tokens) * scale[..., None]
    expected = _reference_embedded(emb.weight, tokens, params["keep"], 0.5)
    assert torch.allclose(got, expected, atol=1e-6), f"largest error {(got - expected).abs().max()}"


def test_masks_are_word_level_and_independent_per_row():
    tokens = torch.arange(50).repeat(2)[None].expand(16, 100)
    scale = embedding_scale(WordEmbeddingDropout(0.5, vocab_size=50)(tokens, generator=_gen()))
    assert torch.equal(scale[:, :50], scale[:, 50:])  # both occurrences of a word share its fate
    assert len({tuple(r.tolist()) for r in scale}) == 16


def test_drop_rate_and_expectation():
    tokens = torch.randint(0, 1000, (64, 100))
    scale = embedding_scale(WordEmbeddingDropout(0.2, vocab_size=1000)(tokens, generator=_gen()))
    drop = float((scale == 0).float().mean())
    # 6400 tokens; words repeat, so fewer independent draws, but ~64 * 1000 mask entries: rate within 0.02.
    assert abs(drop - 0.2) < 0.02, drop
    assert abs(float(scale.mean()) - 1.0) < 0.03  # inverted dropout keeps the expected embedding


def test_p_zero_keeps_everything():
    tokens = torch.randint(0, 5, (3, 4))
    scale = embedding_scale(WordEmbeddingDropout(0.0, vocab_size=5)(tokens, generator=_gen()))
    assert torch.equal(scale, torch.ones(3, 4))


@pytest.mark.parametrize(
    ("batch", "check"),
    [
        pytest.param("tensor", lambda out: isinstance(out, TokenBatch) and len(out) == 1, id="tensor"),
        pytest.param("tuple", lambda out: isinstance(out.items, tuple) and len(out) == 2, id="tuple"),
        pytest.param("list", lambda out: isinstance(out.items, list) and len(out) == 2, id="list"),
        pytest.param("dict", lambda out: set(out) == {"tokens", "targets", "embedding_scale"}, id="dict"),
    ],
)
def test_batch_containers(batch, check):
    tokens = torch.randint(0, 5, (3, 4))
    inputs = {
        "tensor": tokens,
        "tuple": (tokens, tokens),
        "list": [tokens, tokens],
        "dict": {"tokens": tokens, "targets": tokens},
    }[batch]
    snapshot = repr(inputs)
    out = WordEmbeddingDropout(0.5, vocab_size=5)(inputs, generator=_gen())
    assert check(out)
    assert repr(inputs) == snapshot  # the caller's container is not modified
    assert embedding_scale(out) is not None
    assert embedding_scale(out).shape == (3, 4)


def test_keyed_draws_do_not_depend_on_the_batch_split():
    tokens = torch.randint(0, 20, (6, 8))
    keys = torch.arange(6)
    aug = WordEmbeddingDropout(0.4, vocab_size=20)
    whole = embedding_scale(aug(tokens, generator=KeyedGenerator(1, keys)))
    parts = torch.cat(
        [
            embedding_scale(aug(tokens[:3], generator=KeyedGenerator(1, keys[:3]))),
            embedding_scale(aug(tokens[3:], generator=KeyedGenerator(1, keys[3:]))),
        ]
    )
    assert torch.equal(whole, parts)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"p": 1.0, "vocab_size": 3}, ValueError, r"`p` to be a probability in \[0, 1\), got 1.0", id="p"),
        pytest.param({"p": 0.1, "vocab_size": 0}, ValueError, r"`vocab_size` to be a positive integer, got 0", id="V"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        WordEmbeddingDropout(**kwargs)


def test_invalid_batches():
    aug = WordEmbeddingDropout(0.1, vocab_size=3)
    with pytest.raises(ValueError, match=r"token ids in \[0, `vocab_size`=3\), got values in \[0, 5\]"):
        aug(torch.tensor([[0, 5]]), generator=_gen())
    with pytest.raises(ValueError, match=r"shape \[N, T\] and an integer dtype, got shape \(2,\)"):
        aug(torch.tensor([0, 1]), generator=_gen())
    with pytest.raises(ValueError, match="already holds `embedding_scale`"):
        aug({"tokens": torch.zeros(1, 2, dtype=torch.long), "embedding_scale": torch.ones(1, 2)}, generator=_gen())


class _TinyLM(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def forward(self, tokens, scale=None):
        e = self.emb(tokens)
        if scale is not None:
            e = e * scale[..., None]
        return self.out(e)


def test_maxup_reuses_the_worst_copys_mask_in_the_gradient_pass():
    torch.manual_seed(0)
    vocab = 13
    net = _TinyLM(vocab)
    tokens = torch.randint(0, vocab, (4, 10))
    calls = []

    def loss_fn(batch):
        x, y = batch
        scale = embedding_scale(batch)
        calls.append(scale.clone())
        return F.cross_entropy(net(x, scale).transpose(1, 2), y, reduction="none").mean(1)

    out = maxup_step(
        loss_fn, (tokens, tokens), augment=WordEmbeddingDropout(0.5, vocab), m=3, generator=_gen(), model=net
    )
    candidates, gradient_pass = calls
    worst_rows = out.selected * 4 + torch.arange(4)
    assert torch.equal(gradient_pass, candidates[worst_rows])
    assert torch.allclose(out.losses.detach(), out.candidate_losses.amax(0))
