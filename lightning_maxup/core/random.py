"""Random draws for augmentations, from a ``torch.Generator`` or from per-row keys.

Every augmentation in :mod:`lightning_maxup.augment` draws its parameters through :func:`uniform`,
:func:`normal`, :func:`randint` and :func:`beta`. Each takes either a ``torch.Generator`` (the default: one stream
for the whole batch) or a :class:`KeyedGenerator`, whose draws for a row depend only on that row's key, e.g.
``(seed, epoch, sample index, copy index)``. Keyed draws make a MaxUp run independent of how the data is split
across ranks: two ranks with half the batch each draw exactly what one process with the whole batch draws.

The keyed stream is a counter-based generator in the spirit of Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3" (SC 2011): every number is a hash of (seed, row key, call counter, element index), computed with
integer tensor operations on the rows' device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_maxup._transfer import to_device

__all__ = [
    "Generator",
    "KeyedGenerator",
    "beta",
    "hash32",
    "hash32_int",
    "mix_seed",
    "normal",
    "randint",
    "resolve_seed",
    "uniform",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (SplitMix64 finaliser applied to each part in turn).

    Example:
        >>> mix_seed(0, 1) != mix_seed(1, 0)
        True
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def resolve_seed(seed: int | None) -> int:
    """``seed``, else ``seed_everything``'s seed (``PL_GLOBAL_SEED``), else this process's ``torch.initial_seed()``.

    Under DDP the last one differs between processes; the Lightning glue broadcasts rank 0's when a fit starts.

    Example:
        >>> resolve_seed(7)
        7
    """
    if seed is not None:
        return int(seed)
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env is not None else int(torch.initial_seed())


def hash32_int(x: int) -> int:
    """:func:`hash32` of one Python integer, computed on the host (no tensor, so no host-to-device copy).

    Example:
        >>> hash32_int(12345) == int(hash32(torch.tensor(12345)))
        True
    """
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash32(x: Tensor) -> Tensor:
    """Chris Wellons' ``lowbias32`` integer hash on int64 tensors holding 32-bit values.

    Wrapping int64 multiplication keeps the low 32 bits exact, and masking keeps every shift logical.

    Example:
        >>> hash32(torch.tensor([0, 1])).tolist()
        [0, 1753845952]
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class KeyedGenerator:
    """A per-row random stream: row ``r``'s draws depend only on ``seed`` and ``keys[r]``.

    Each call to a draw function advances an internal call counter, so successive draws differ, but the
    counter is the same on every rank that makes the same calls; the rows' draws are therefore identical
    however the rows are distributed.

    Args:
        seed: Base seed of the stream.
        keys: Integer tensor of shape ``[N]`` or ``[N, K]``: one key (or tuple of key parts) per row, for
            example ``stack([sample_index, copy_index], 1)``. Its device is where numbers are generated.

    Example:
        >>> import torch
        >>> keys = torch.tensor([[0, 0], [1, 0], [2, 0]])
        >>> whole = uniform((3, 2), generator=KeyedGenerator(7, keys))
        >>> part = uniform((1, 2), generator=KeyedGenerator(7, keys[1:2]))
        >>> torch.equal(whole[1:2], part)
        True
    """

    def __init__(self, seed: int, keys: Tensor) -> None:
        if keys.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Expected `keys` to be an integer tensor, got dtype {keys.dtype}")
        if keys.dim() == 1:
            keys = keys[:, None]
        if keys.dim() != 2:
            raise ValueError(f"Expected `keys` of shape [N] or [N, K], got shape {tuple(keys.shape)}")
        h = hash32(torch.full_like(keys[:, 0], int(seed) & _MASK32, dtype=torch.int64))
        for j in range(keys.shape[1]):
            h = hash32(h ^ hash32(keys[:, j].to(torch.int64) + 0x9E3779B9 * (j + 1)))
        self.row_hash = h
        self.calls = 0
        self.device = keys.device

    @property
    def num_rows(self) -> int:
        """Number of rows the stream serves."""
        return int(self.row_hash.shape[0])

    def bits(self, shape: Sequence[int]) -> Tensor:
        """Return int64 values in ``[0, 2**32)`` of ``shape``, whose first dimension is the row."""
        if len(shape) == 0 or shape[0] != self.num_rows:
            raise ValueError(
                f"A KeyedGenerator over {self.num_rows} rows draws shapes whose first dimension is the row,"
                f" got shape {tuple(shape)}"
            )
        self.calls += 1
        per_row = math.prod(shape[1:])
        element = torch.arange(per_row, device=self.device, dtype=torch.int64)
        # The call's hash is a Python int: a tensor built from it would be a host-to-device copy every draw.
        call = hash32_int(self.calls * 0x85EBCA6B)
        h = hash32(self.row_hash[:, None] ^ call)
        h = hash32(h + element[None, :] * 0x27D4EB2F)
        return h.reshape(tuple(shape))


#: What every sampler takes: one stream for the batch, or per-row keys.
Generator = torch.Generator | KeyedGenerator


def _device_of(generator: Generator | None, device: torch.device | str | None) -> torch.device:
    if isinstance(generator, (torch.Generator, KeyedGenerator)):
        return torch.device(generator.device)
    return torch.device(device) if device is not None else torch.device("cpu")


def uniform(
    shape: Sequence[int],
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform numbers in ``(0, 1)``, drawn on the generator's device and moved to ``device``.

    A draw from a CPU generator for an accelerator is copied as Lightning copies a batch (pinned, without
    blocking the host), so ``torch.Generator()`` with CUDA data costs no device sync; a generator on the data's
    device (``torch.Generator(device="cuda")``) makes no copy at all.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> u = uniform((4, 3), generator=g)
        >>> bool(((u > 0) & (u < 1)).all())
        True
    """
    shape = tuple(int(s) for s in shape)
    target = torch.device(device) if device is not None else _device_of(generator, None)
    if isinstance(generator, KeyedGenerator):
        u = (generator.bits(shape).to(torch.float64) + 0.5) * (1.0 / 2**32)
        return to_device(u.to(dtype), target)
    gen_device = _device_of(generator, target)
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=dtype)
    # torch.rand may return exactly 0, which log() and inverse CDFs cannot take.
    u = u.clamp_min(torch.finfo(dtype).tiny)
    return to_device(u, target)


def normal(
    shape: Sequence[int],
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal numbers (Box-Muller on keyed streams, ``torch.randn`` on generators).

    Example:
        >>> z = normal((10000,), generator=torch.Generator().manual_seed(0))
        >>> abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
        True
    """
    shape = tuple(int(s) for s in shape)
    target = torch.device(device) if device is not None else _device_of(generator, None)
    if isinstance(generator, KeyedGenerator):
        u1 = uniform(shape, generator=generator, device=target, dtype=torch.float64)
        u2 = uniform(shape, generator=generator, device=target, dtype=torch.float64)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(dtype)
    z = torch.randn(shape, generator=generator, device=_device_of(generator, target), dtype=dtype)
    return to_device(z, target)


def randint(
    low: int | Tensor,
    high: int | Sequence[int] | Tensor,
    shape: Sequence[int],
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integers uniform in ``[low, high)``; ``low`` and ``high`` may be per-row tensors broadcasting to ``shape``.

    ``high`` may also be a sequence of Python ints, one per element of the last dimension of ``shape`` (e.g.
    ``(h, w)`` for a draw of shape ``[N, 2]``). Python bounds never become tensors, so a draw makes no
    host-to-device copy.

    Example:
        >>> r = randint(2, 5, (1000,), generator=torch.Generator().manual_seed(0))
        >>> sorted(r.unique().tolist())
        [2, 3, 4]
        >>> yx = randint(0, (3, 100), (1000, 2), generator=torch.Generator().manual_seed(0))
        >>> yx.amax(0).tolist()
        [2, 99]
    """
    u = uniform(shape, generator=generator, device=device, dtype=torch.float64)
    if isinstance(high, Sequence):
        if len(high) != u.shape[-1]:
            raise ValueError(f"Expected one `high` per element of the last dimension of {tuple(shape)}, got {high!r}")
        columns = [_randint_from(u[..., j], low, int(h)) for j, h in enumerate(high)]
        return torch.stack(columns, dim=-1)
    return _randint_from(u, low, high)


def _randint_from(u: Tensor, low: int | Tensor, high: int | Tensor) -> Tensor:
    """``floor(low + u * (high - low))`` from float64 uniforms ``u``, kept below ``high``."""
    lo = low.to(device=u.device, dtype=torch.float64) if isinstance(low, Tensor) else float(low)
    if isinstance(high, Tensor):
        high_t = high.to(device=u.device, dtype=torch.float64)
        r = torch.floor(lo + u * (high_t - lo)).to(torch.int64)
        # Guard against float rounding reaching `high`.
        return torch.minimum(r, high_t.to(torch.int64) - 1)
    r = torch.floor(lo + u * (float(high) - lo)).to(torch.int64)
    return r.clamp_max(int(high) - 1)


def _gamma(
    concentration: float, n: int, *, generator: Generator | None, device: torch.device | str | None, rounds: int = 12
) -> Tensor:
    """Gamma(concentration, 1) draws by Marsaglia & Tsang (2000), vectorised over fixed rejection rounds.

    Shapes below 1 use the boost ``Gamma(a) = Gamma(a + 1) * U**(1/a)``. Each round accepts at least 95% of
    proposals, so after ``rounds`` rounds a row is unaccepted with probability below 1e-15; such a row keeps
    its last proposal.
    """
    a = float(concentration)
    boost = a < 1.0
    shape_a = a + 1.0 if boost else a
    d = shape_a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = normal((n, rounds), generator=generator, device=device, dtype=torch.float64)
    u = uniform((n, rounds), generator=generator, device=device, dtype=torch.float64)
    v = (1.0 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
    first = torch.where(
        ok.any(dim=1), ok.to(torch.int8).argmax(dim=1), torch.full_like(ok[:, 0], rounds - 1, dtype=torch.int64)
    )
    g = (d * v.clamp_min(1e-300)).gather(1, first[:, None]).squeeze(1)
    if boost:
        ub = uniform((n,), generator=generator, device=device, dtype=torch.float64)
        g = g * ub ** (1.0 / a)
    return g


def beta(
    alpha: float,
    n: int,
    *,
    generator: Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Symmetric Beta(alpha, alpha) draws as a ratio of Gamma draws (``torch.distributions`` takes no generator).

    Example:
        >>> lam = beta(1.0, 20000, generator=torch.Generator().manual_seed(0))
        >>> abs(float(lam.mean()) - 0.5) < 0.01 and abs(float(lam.var()) - 1 / 12) < 0.005
        True
    """
    if alpha <= 0:
        raise ValueError(f"Expected `alpha` to be positive, got {alpha}")
    g1 = _gamma(alpha, n, generator=generator, device=device)
    g2 = _gamma(alpha, n, generator=generator, device=device)
    out = g1 / (g1 + g2)
    return out.to(dtype)
