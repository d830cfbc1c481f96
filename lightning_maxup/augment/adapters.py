"""Adapters that make torchvision ``transforms.v2`` and kornia augmentations MaxUp augmentations.

MaxUp needs an independent draw for every row of the expanded ``m * B`` batch, and the library's randomness comes
from the ``generator`` argument. Neither library takes a generator: both draw from PyTorch's global RNG. The
adapters therefore draw integer seeds from the generator (through :mod:`lightning_maxup.core.random`, so a
:class:`~lightning_maxup.core.random.KeyedGenerator` works) and run the third-party code under
:func:`torch.random.fork_rng`, with the global RNG seeded from those seeds; the caller's global RNG state is
restored afterwards, so the adapters neither consume nor perturb the global stream.

* torchvision ``v2`` transforms make one draw per call and apply it to the whole input, so
  :class:`TorchvisionAdapter` calls the transform once per row, reseeding before each call. The cost is one
  Python call per row (60-200 µs per 32x32 image on a 2-core CPU, 7-21x the built-in crop and flip, depending on
  the transform; reseeding itself is ~1 µs per row; see ``docs/augmentations.md`` and ``benchmarks/adapters.py``).
* kornia augmentations draw per row natively (``same_on_batch=False``), so :class:`KorniaAdapter` makes one
  batched call seeded from the generator. Under a ``KeyedGenerator`` it calls kornia once per row instead, since
  kornia's per-row draws depend on a row's position in the batch, which differs across ranks.

kornia is an optional extra (``pip install lightning_maxup[kornia]``); it is imported only when a
:class:`KorniaAdapter` is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_maxup.augment._base import Augmentation, Params, replace_inputs, split_inputs
from lightning_maxup.core import random as lr
from lightning_maxup.core.random import Generator, KeyedGenerator

__all__ = ["KorniaAdapter", "TorchvisionAdapter", "seeded_rng"]

_SEED_HIGH = 2**32


@contextmanager
def seeded_rng(device: torch.device | str = "cpu") -> Iterator[Callable[[int], None]]:
    """Fork the global RNGs of the CPU and of ``device``; yield a function that seeds both.

    Everything drawn from the global RNG inside the block is determined by the seeds given to the yielded
    function, and the global RNG state is restored on exit. Only the CPU generator and ``device``'s generator
    are forked and seeded, so other accelerators' streams are untouched.

    Example:
        >>> state = torch.get_rng_state()
        >>> with seeded_rng() as seed:
        ...     seed(7)
        ...     a = torch.rand(2)
        ...     seed(7)
        ...     b = torch.rand(2)
        >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), state)
        (True, True)
    """
    device = torch.device(device)
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
        module = None
    else:
        module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)

    def seed(value: int) -> None:
        torch.default_generator.manual_seed(value)
        if module is not None:
            with module.device(device):
                module.manual_seed(value)  # seeds the current device only

    with fork:
        yield seed


def _draw_seeds(n: int, generator: Generator | None) -> Tensor:
    return lr.randint(0, _SEED_HIGH, (n,), generator=generator, device="cpu")


def _stack(rows: list[Tensor], name: str) -> Tensor:
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) > 1:
        raise ValueError(
            f"{name} must give every row the same output shape to re-form the batch, got shapes {sorted(shapes)};"
            " add a resize or fixed-size crop to the transform"
        )
    return torch.stack(rows)


class TorchvisionAdapter(Augmentation):
    """Use any torchvision ``transforms.v2`` transform (``RandAugment``, ``TrivialAugmentWide``, ``RandomErasing``,
    a ``v2.Compose`` ...) as a MaxUp augmentation with an independent draw per row.

    The transform sees one input row at a time (e.g. a ``[C, H, W]`` image) under a forked global RNG seeded from
    that row's seed, which :meth:`sample` draws from the generator; the rest of the batch (labels, ...) passes
    through. Replaying the same seeds reproduces the output exactly. The transform must be per-sample (not
    ``v2.CutMix``/``v2.MixUp``, which act on whole batches) and must give every row the same output shape.

    Cost: one Python call of the transform per row plus one reseed (~1 µs), instead of one call per batch: 60-200
    µs per 32x32 image on a 2-core CPU; see ``docs/augmentations.md`` for measured numbers.

    Args:
        transform: The torchvision transform (any callable that draws from the global torch RNG works).
        clone: Give the transform a copy of the rows, so a transform with ``inplace=True`` cannot modify the
            caller's batch.

    Example:
        >>> from torchvision.transforms import v2
        >>> aug = TorchvisionAdapter(v2.RandomErasing(p=1.0))
        >>> x = torch.rand(4, 3, 16, 16)
        >>> params = aug.sample(x, torch.Generator().manual_seed(0))
        >>> out = aug(x, params=params)
        >>> out.shape, torch.equal(aug(x, params=params), out), bool(torch.equal(out, x))
        (torch.Size([4, 3, 16, 16]), True, False)
    """  # noqa: D205

    def __init__(self, transform: Callable[[Any], Any], clone: bool = True) -> None:
        if not callable(transform):
            raise TypeError(f"Expected `transform` to be a callable torchvision transform, got {transform!r}")
        self.transform = transform
        self.clone = bool(clone)

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw one 32-bit seed per row (on the CPU)."""
        x, _ = split_inputs(batch)
        return {"seeds": _draw_seeds(int(x.shape[0]), generator)}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Nothing: the draws are seeds of the wrapped library's generator, with no meaning of their own."""
        return {}

    def apply(self, batch: Any, params: Params) -> Any:
        """Transform each row under the global RNG seeded with its seed."""
        x, _ = split_inputs(batch)
        seeds = params["seeds"].tolist()
        if len(seeds) != x.shape[0]:
            raise ValueError(f"Expected one seed per row ({x.shape[0]}), got {len(seeds)}")
        source = x.clone() if self.clone else x
        rows = []
        with seeded_rng(x.device) as seed:
            for i, s in enumerate(seeds):
                seed(int(s))
                rows.append(self.transform(source[i]))
        return replace_inputs(batch, _stack(rows, "TorchvisionAdapter"))


def _require_kornia() -> Any:
    try:
        import kornia.augmentation as K  # noqa: N812
    except ImportError as err:  # pragma: no cover - kornia is installed in the dev environment
        raise ImportError(
            "KorniaAdapter needs kornia, an optional extra: pip install 'lightning_maxup[kornia]' (or kornia)"
        ) from err
    return K


class KorniaAdapter(Augmentation):
    """Use any kornia augmentation (or ``kornia.augmentation.AugmentationSequential``) as a MaxUp augmentation.

    kornia draws one set of parameters per row from the global RNG; the adapter seeds that RNG, inside
    :func:`seeded_rng`, from a seed drawn from the generator, so the draw is reproducible and the caller's global
    RNG is untouched. With a :class:`~lightning_maxup.core.random.KeyedGenerator` (or ``per_row=True``), each row is
    augmented by its own call with its own seed, so a row's draw depends on its key only, not on its position in
    the batch; this costs one kornia call per row (30-100x the batched call on a CPU; see ``docs/augmentations.md``).

    Args:
        augmentation: A kornia augmentation module with ``same_on_batch=False`` (its default).
        per_row: ``True``: one call per row; ``False``: one batched call; ``None`` (default): per row under a
            ``KeyedGenerator``, batched otherwise.

    Raises:
        ImportError: kornia is not installed.

    Example:
        >>> import kornia.augmentation as K
        >>> aug = KorniaAdapter(K.RandomHorizontalFlip(p=0.5))
        >>> x = torch.arange(4.0).view(1, 1, 1, 4).expand(8, 1, 1, 4)
        >>> out = aug(x, generator=torch.Generator().manual_seed(0))
        >>> out.shape, torch.equal(aug(x, generator=torch.Generator().manual_seed(0)), out)
        (torch.Size([8, 1, 1, 4]), True)
    """

    def __init__(self, augmentation: Callable[..., Tensor], per_row: bool | None = None) -> None:
        K = _require_kornia()  # noqa: N806
        from kornia.augmentation.container.base import BasicSequentialBase

        if not isinstance(augmentation, (K.base._BasicAugmentationBase, BasicSequentialBase)):
            raise TypeError(
                f"Expected `augmentation` to be a kornia augmentation or AugmentationSequential, got {augmentation!r}"
            )
        if getattr(augmentation, "same_on_batch", False):
            raise ValueError(
                "Expected `augmentation` to draw per row, got one with same_on_batch=True: every MaxUp copy would"
                " get the same augmentation"
            )
        if per_row is not None and not isinstance(per_row, bool):
            raise ValueError(f"Expected `per_row` to be True, False or None, got {per_row!r}")
        self.augmentation = augmentation
        self.per_row = per_row

    def sample(self, batch: Any, generator: Generator | None = None) -> Params:
        """Draw one seed per row, and decide between per-row calls and one batched call (seeded by row 0's)."""
        x, _ = split_inputs(batch)
        per_row = isinstance(generator, KeyedGenerator) if self.per_row is None else self.per_row
        return {"seeds": _draw_seeds(int(x.shape[0]), generator), "per_row": per_row}

    @override
    def describe(self, params: Params) -> dict[str, Tensor]:
        """Nothing: the draws are seeds of the wrapped library's generator, with no meaning of their own."""
        return {}

    def apply(self, batch: Any, params: Params) -> Any:
        """Run kornia under the seeded global RNG, per row or batched as ``params["per_row"]`` says."""
        x, _ = split_inputs(batch)
        seeds = params["seeds"].tolist()
        if len(seeds) != x.shape[0]:
            raise ValueError(f"Expected one seed per row ({x.shape[0]}), got {len(seeds)}")
        with seeded_rng(x.device) as seed:
            if not params["per_row"]:
                seed(int(seeds[0]))
                return replace_inputs(batch, self.augmentation(x))
            rows = []
            for i, s in enumerate(seeds):
                seed(int(s))
                rows.append(self.augmentation(x[i : i + 1]))
        return replace_inputs(batch, torch.cat(rows) if rows else x)
