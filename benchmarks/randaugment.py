"""RandAugment drawn per row: lightning_maxup's batched version against torchvision (one call per row) and kornia.

Run from the repository root (prints a markdown table; optionally updates the doc)::

    python benchmarks/randaugment.py [--doc docs/augmentations.md]

Cases, each on the same float images in ``[0, 1]`` (``N = 2``, ``M = 9``):

* ``ours``: :class:`lightning_maxup.augment.RandAugment`, every row its own ops, signs and magnitude, no loop; on
  the CPU its default groups the rows by op (one host read of the group sizes).
* ``ours, masked``: the same with ``grouping="masked"``, every op on every row and no host sync (the default on
  accelerators).
* ``torchvision``: ``TorchvisionAdapter(v2.RandAugment())``, every row its own draw, one transform call per row; on
  the float images and, as torchvision recommends for RandAugment, on uint8 copies of them.
* ``kornia``: ``kornia.augmentation.auto.RandAugment(n=2, m=9)`` in one batched call (skipped if kornia is not
  installed). kornia draws the ops once per call, so all rows of a batch share them: it is the speed of a batched
  RandAugment, not a per-row draw.

Sizes: 3x32x32 images at ``m * B`` = 512 and 2048 rows (e.g. m = 4 or 16 copies of a 128-sample batch), and
3x224x224 images at 64 and 256 rows (fewer rows: one 224-px row is 49 times a 32-px one). All cases of one size run
interleaved in one process (:func:`_common.time_interleaved`). The clock is the CPU time of this process by default
(``--clock process``): with one torch thread that is the work done, whatever other jobs on a shared machine take.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from lightning_maxup.augment import RandAugment, TorchvisionAdapter

try:  # `python benchmarks/randaugment.py` puts benchmarks/ on sys.path; `python -m benchmarks.randaugment` does not
    from _common import environment, markdown_table, replace_between_markers, time_interleaved
except ImportError:  # pragma: no cover
    from benchmarks._common import (  # type: ignore[no-redef]
        environment,
        markdown_table,
        replace_between_markers,
        time_interleaved,
    )

DOC_MARKER = "randaugment-table"
NUM_OPS, MAGNITUDE = 2, 9
#: Speed-up over the torchvision adapter that RandAugment must reach on a CPU, and its allowed slowdown to kornia.
TARGET_OVER_TORCHVISION = 10.0
TARGET_TO_KORNIA = 2.0


def _kornia_randaugment() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from kornia.augmentation.auto import RandAugment as KorniaRandAugment
    except ImportError:
        return None
    return KorniaRandAugment(n=NUM_OPS, m=MAGNITUDE)  # type: ignore[no-any-return]


def build_cases(rows: int, size: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """The timed calls for ``rows`` images of 3 x ``size`` x ``size``."""
    x = torch.rand(rows, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    x_u8 = (x * 255).round().to(torch.uint8)
    ours = RandAugment(num_ops=NUM_OPS, magnitude=MAGNITUDE)
    masked = RandAugment(num_ops=NUM_OPS, magnitude=MAGNITUDE, grouping="masked")
    adapter = TorchvisionAdapter(v2.RandAugment(num_ops=NUM_OPS, magnitude=MAGNITUDE))

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(1)

    cases: dict[str, Callable[[], object]] = {
        "ours (per row)": lambda: ours(x, generator=generator()),
        "ours, masked (no host sync)": lambda: masked(x, generator=generator()),
        "torchvision adapter (per row), float": lambda: adapter(x, generator=generator()),
        "torchvision adapter (per row), uint8": lambda: adapter(x_u8, generator=generator()),
    }
    kornia = _kornia_randaugment()
    if kornia is not None:
        cases["kornia (ops per batch)"] = lambda: kornia(x)
    return cases


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every case at every size; one record per (size, rows, case)."""
    device = torch.device(args.device)
    records = []
    for size, rows_list in ((32, args.rows_32), (args.large_size, args.rows_large)):
        for rows in rows_list:
            cases = build_cases(rows, size, device)
            timings = time_interleaved(
                cases, device=device, repeats=args.repeats, warmup=args.warmup, clock=args.clock, seed=rows
            )
            ours = timings["ours (per row)"].median
            for name, timing in timings.items():
                records.append(
                    {
                        "size": size,
                        "rows": rows,
                        "case": name,
                        "seconds": timing.median,
                        "vs_ours": timing.median / ours,
                    }
                )
    return records


def render(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown table and one line per size on the targets."""
    table_rows = [
        [
            f"3x{r['size']}x{r['size']}",
            r["rows"],
            r["case"],
            f"{1e3 * r['seconds']:.1f}",
            f"{1e6 * r['seconds'] / r['rows']:.0f}",
            f"{r['vs_ours']:.2f}x",
        ]
        for r in records
    ]
    headers = ["images", "rows", "augmentation", "ms / call", "µs / row", "time / ours"]
    lines = [markdown_table(headers, table_rows), ""]
    for size, rows in sorted({(r["size"], r["rows"]) for r in records}):
        ratio = {r["case"]: r["vs_ours"] for r in records if (r["size"], r["rows"]) == (size, rows)}
        tv = ratio["torchvision adapter (per row), float"]
        line = f"- 3x{size}x{size}, {rows} rows: {tv:.1f}x faster than the torchvision adapter on the same float images"
        line += f" (target >= {TARGET_OVER_TORCHVISION:g}x: {'met' if tv >= TARGET_OVER_TORCHVISION else 'missed'})"
        if "kornia (ops per batch)" in ratio:
            to_kornia = 1.0 / ratio["kornia (ops per batch)"]
            met = "met" if to_kornia <= TARGET_TO_KORNIA else "missed"
            line += f"; {to_kornia:.2f}x kornia's time (target <= {TARGET_TO_KORNIA:g}x: {met})"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--rows-32", type=int, nargs="+", default=[512, 2048], help="rows of 3x32x32 images")
    p.add_argument("--large-size", type=int, default=224, help="side of the large images")
    p.add_argument("--rows-large", type=int, nargs="+", default=[64, 256], help="rows of the large images")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (median over them)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--clock", choices=["process", "wall"], default=None, help="default: process on CPU, else wall")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="a few small batches, one round: a smoke test")
    p.add_argument("--doc", help=f"replace the table between <!-- {DOC_MARKER}:start/end --> markers in this file")
    args = p.parse_args(argv)
    if args.clock is None:
        args.clock = "process" if torch.device(args.device).type == "cpu" else "wall"
    if args.quick:
        args.rows_32, args.large_size, args.rows_large, args.repeats, args.warmup = [16], 64, [4], 1, 0
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.device)
    header = (
        f"RandAugment N={NUM_OPS}, M={MAGNITUDE}; {args.device}, {env['cpu']} ({env['cpu_count']} cores),"
        f" torch.set_num_threads({torch.get_num_threads()}), torch {env['torch']}; median of {args.repeats}"
        f" interleaved rounds, {args.clock} clock; load average {env['load_average']}"
    )
    text = header + "\n\n" + render(run(args), args)
    print(text)
    if args.doc and not replace_between_markers(args.doc, DOC_MARKER, text):
        print(f"no <!-- {DOC_MARKER}:start/end --> markers in {args.doc}: left unchanged")
    return text


if __name__ == "__main__":
    main()
