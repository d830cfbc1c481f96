"""Cost of the third-party augmentation adapters against the built-in batched augmentations.

Times one call on a CIFAR-sized expanded MaxUp batch (default 256 rows = m 4 x B 64 of 3x32x32 images) on the CPU,
median of several repeats after a warm-up, and prints a markdown table: milliseconds per batch, microseconds per
row, and the ratio to the built-in ``RandomCrop + RandomHorizontalFlip``.

    python benchmarks/adapters.py [--rows 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from lightning_maxup.augment import (
    Compose,
    Cutout,
    KorniaAdapter,
    RandomCrop,
    RandomHorizontalFlip,
    TorchvisionAdapter,
)
from lightning_maxup.augment.adapters import seeded_rng
from lightning_maxup.core.random import KeyedGenerator


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    n, s = args.rows, args.size
    x = torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(0))
    x_u8 = (x * 255).to(torch.uint8)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(1)

    def keyed() -> KeyedGenerator:
        return KeyedGenerator(1, torch.arange(n))

    def reseed_only() -> None:
        with seeded_rng() as seed:
            for i in range(n):
                seed(i)

    cases: list[tuple[str, Callable[[], Any]]] = [
        (
            "built-in RandomCrop(pad 4) + HFlip",
            lambda: Compose([RandomCrop(s, padding=4), RandomHorizontalFlip()])(x, generator=gen()),
        ),
        ("built-in Cutout(16)", lambda: Cutout(16)(x, generator=gen())),
        ("reseeding only (fork_rng + manual_seed per row)", reseed_only),
        (
            "torchvision crop+flip, ONE draw for the batch",
            lambda: v2.Compose([v2.RandomCrop(s, padding=4), v2.RandomHorizontalFlip()])(x),
        ),
    ]
    tv = {
        "crop+flip": (v2.Compose([v2.RandomCrop(s, padding=4), v2.RandomHorizontalFlip()]), x),
        "RandomErasing": (v2.RandomErasing(p=1.0), x),
        "RandAugment (uint8)": (v2.RandAugment(), x_u8),
        "TrivialAugmentWide (uint8)": (v2.TrivialAugmentWide(), x_u8),
    }
    for name, (t, data) in tv.items():
        adapter = TorchvisionAdapter(t)
        cases.append((f"TorchvisionAdapter: {name}", lambda a=adapter, d=data: a(d, generator=gen())))
    try:
        import kornia.augmentation as K  # noqa: N812
    except ImportError:
        print("kornia not installed: skipping the KorniaAdapter rows")
    else:
        crop_flip = K.AugmentationSequential(K.RandomCrop((s, s), padding=4), K.RandomHorizontalFlip())
        erasing = K.RandomErasing(p=1.0)
        cases += [
            ("KorniaAdapter: crop+flip, batched", lambda: KorniaAdapter(crop_flip)(x, generator=gen())),
            ("KorniaAdapter: crop+flip, per row (keyed)", lambda: KorniaAdapter(crop_flip)(x, generator=keyed())),
            ("KorniaAdapter: RandomErasing, batched", lambda: KorniaAdapter(erasing)(x, generator=gen())),
            ("KorniaAdapter: RandomErasing, per row (keyed)", lambda: KorniaAdapter(erasing)(x, generator=keyed())),
        ]

    results = [(name, _time(fn, args.repeats)) for name, fn in cases]
    base = results[0][1]
    print(f"\n{n} rows of 3x{s}x{s} images, CPU, {torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"| {'augmentation':<50} | {'ms / batch':>10} | {'µs / row':>8} | {'x built-in':>10} |")
    print(f"|{'-' * 52}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")
    for name, sec in results:
        print(f"| {name:<50} | {1e3 * sec:>10.2f} | {1e6 * sec / n:>8.1f} | {sec / base:>10.1f} |")
    return results


if __name__ == "__main__":
    main()
