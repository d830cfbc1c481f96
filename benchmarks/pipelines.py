"""Where to make MaxUp's m copies: in the DataLoader workers (``MultiView``) or in the training process.

Images of mixed sizes (64-160 px a side, generated uint8 tensors held in memory: no decoding is timed, which a real
loader would add to the worker side only) go through torchvision's ``v2`` pipeline ``RandomResizedCrop(64)`` +
``RandomHorizontalFlip`` + ``RandAugment`` + ``ToDtype`` + ``Normalize``, m times per sample. Cases:

* ``multiview/<w> workers``: :class:`lightning_maxup.data.multiview.MultiView` + ``multiview_collate`` in a DataLoader
  with ``w`` workers (persistent), one full pass; crops come from the original images.
* ``adapter (training process)``: :class:`lightning_maxup.augment.TorchvisionAdapter` on the expanded ``m * B``
  batch of already-resized 64 px uint8 images, a Python loop over rows in the training process (what a step with
  ``augment=TorchvisionAdapter(...)`` runs); the loader's resize is not timed.
* ``built-in batched RandAugment``: :class:`lightning_maxup.augment.RandAugment` (after a batched flip) on the
  expanded batch of pre-resized float images, in the training process, plus the normalisation; it has no
  random-resized crop from the original image.

Every case is timed once per round in a shuffled order (``_common.time_interleaved``), so load from other
processes hits all alike; the table gives candidate images per second (m x B x batches over the median seconds of a
pass) and the ratio to the wrapper with 0 workers. The torch thread count is set explicitly: ``--threads`` in this
process, one in every worker.

    python benchmarks/pipelines.py [--images 256] [--batch 32] [--m 4] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF  # noqa: N812

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, markdown_table, replace_between_markers, time_interleaved, write_json  # noqa: E402

from lightning_maxup.augment import Compose, RandAugment, RandomHorizontalFlip, TorchvisionAdapter  # noqa: E402
from lightning_maxup.core.batch import expand_copies  # noqa: E402
from lightning_maxup.data.multiview import MultiView  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MixedSizeImages(Dataset):
    """uint8 ``[3, H, W]`` images with ``H, W`` in ``[low, high]`` and a label, generated once from a seed."""

    def __init__(self, n: int, low: int = 64, high: int = 160, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        sides = torch.randint(low, high + 1, (n, 2), generator=g).tolist()
        self.images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sides]
        self.labels = torch.randint(0, 10, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], self.labels[i]


def pipeline(size: int) -> v2.Compose:
    """The torchvision v2 pipeline of the issue: random-resized crop, flip, RandAugment on uint8, float, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def one_thread(worker_id: int, pids: Tensor | None = None) -> None:
    """Worker init: one torch thread; record the worker's pid (for its CPU time) in a shared tensor."""
    torch.set_num_threads(1)
    if pids is not None:
        pids[worker_id] = os.getpid()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Wraps a case: records, per call, the CPU seconds of this process and of each worker whose pid is known."""

    def __init__(self, fn: Callable[[], Any], pids: Tensor | None = None) -> None:
        self.fn, self.pids = fn, pids
        self.calls: list[list[float]] = []

    def processes(self) -> list[int]:
        workers = [] if self.pids is None else [p for p in self.pids.tolist() if p > 0]
        return [os.getpid(), *workers]

    def __call__(self) -> None:
        pids = self.processes()
        before = [cpu_seconds(p) for p in pids]
        self.fn()
        self.calls.append([cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)])

    def median(self) -> tuple[float, float]:
        """Median over calls of (CPU seconds of all processes, CPU seconds of the busiest one)."""
        if not self.calls:
            return float("nan"), float("nan")
        totals = sorted(sum(c) for c in self.calls)
        busiest = sorted(max(c) for c in self.calls)
        return totals[len(totals) // 2], busiest[len(busiest) // 2]


def drain(loader: DataLoader) -> Callable[[], int]:
    def run() -> int:
        rows = 0
        for batch in loader:
            rows += int(batch.batch[0].shape[0])
        return rows

    return run


def cases(args: argparse.Namespace, data: MixedSizeImages) -> tuple[dict[str, CpuMeter], int]:
    size, m, b = args.size, args.m, args.batch
    batches = len(data) // b
    out: dict[str, CpuMeter] = {}
    for w in args.workers:
        ds = MultiView(data, pipeline(size), m, seed=0)
        pids = torch.zeros(max(w, 1), dtype=torch.int64).share_memory_()
        loader = DataLoader(
            ds,
            batch_size=b,
            drop_last=True,
            num_workers=w,
            persistent_workers=w > 0,
            worker_init_fn=functools.partial(one_thread, pids=pids) if w > 0 else None,
            collate_fn=ds.collate_fn,
        )
        out[f"multiview/{w} workers"] = CpuMeter(drain(loader), pids if w > 0 else None)

    # The training-process paths get the B samples already resized (as a loader would deliver them) and expand them.
    resized = torch.stack([TF.resize(x, [size, size], antialias=True) for x in data.images])
    u8 = [resized[i * b : (i + 1) * b] for i in range(batches)]
    f32 = [x.float() / 255 for x in u8]
    adapter = TorchvisionAdapter(pipeline(size), clone=False)
    builtin = Compose([RandomHorizontalFlip(), RandAugment()])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)

    def run_adapter() -> None:
        for x in u8:
            adapter(expand_copies(x, m), generator=g)

    def run_builtin() -> None:
        for x in f32:
            (builtin(expand_copies(x, m), generator=g) - mean) / std

    out["adapter (training process)"] = CpuMeter(run_adapter)
    out["built-in batched RandAugment"] = CpuMeter(run_builtin)
    return out, batches * b * m


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images in the dataset (one pass = all of them)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="side of the crops")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers use 1)")
    parser.add_argument("--quick", action="store_true", help="a few images, one repeat: checks that it runs")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument(
        "--doc", type=str, default=None, help="markdown file whose pipelines-table markers get the output"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats, args.warmup = 16, 4, 1, 0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text)
        lines.append(text)

    say(
        f"torch threads: {torch.get_num_threads()} intra-op in this process, 1 per DataLoader worker;"
        f" {os.cpu_count()} CPUs;"
        f" load average before: {' '.join(f'{v:.2f}' for v in load_before)}"
    )
    data = MixedSizeImages(args.images)
    fns, candidates = cases(args, data)
    timings = time_interleaved(dict(fns), device="cpu", repeats=args.repeats, warmup=args.warmup)
    for meter in fns.values():
        meter.calls = meter.calls[args.warmup :]  # the warm-up round's calls come first
    load_after = os.getloadavg()
    base = timings[f"multiview/{args.workers[0]} workers"].median
    rows, rates, cpu = [], {}, {}
    for name, t in timings.items():
        rates[name] = candidates / t.median
        total, busiest = fns[name].median()
        cpu[name] = {"total_s": total, "busiest_s": busiest}
        rows.append(
            [
                name,
                f"{t.median * 1e3:.0f}",
                f"{rates[name]:.0f}",
                f"{base / t.median:.2f}x",
                f"{total * 1e3:.0f}",
                f"{candidates / busiest:.0f}" if busiest > 0 else "",
            ]
        )
    say(
        f"{args.images} images of 64-160 px, m={args.m}, B={args.batch}: {candidates} candidate images per pass;"
        f" median of {args.repeats} passes; CPU ms summed over this process and the workers"
    )
    headers = [
        "path",
        "ms / pass",
        "candidate images / s",
        f"vs multiview/{args.workers[0]} workers",
        "CPU ms / pass",
        "images / CPU s of the busiest process",
    ]
    table = markdown_table(headers, rows)
    say(table)
    say(f"load average after: {' '.join(f'{v:.2f}' for v in load_after)}")
    targets: dict[str, float] = {}
    if 0 in args.workers and 2 in args.workers:
        targets["workers2_vs_workers0"] = rates["multiview/2 workers"] / rates["multiview/0 workers"]
        targets["workers2_vs_adapter"] = rates["multiview/2 workers"] / rates["adapter (training process)"]
        say(
            f"2 workers vs 0 workers: {targets['workers2_vs_workers0']:.2f}x (target >= 1.6x);"
            f" 2 workers vs the adapter: {targets['workers2_vs_adapter']:.2f}x (target > 1x)"
        )
    result = {
        "config": vars(args),
        "environment": environment("cpu"),
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "candidates_per_pass": candidates,
        "timings": {k: v.to_dict() for k, v in timings.items()},
        "images_per_second": rates,
        "cpu_seconds_per_pass": cpu,
        "targets": targets,
        "table_markdown": table,
    }
    if args.json:
        write_json(args.json, result)
    if args.doc:
        replace_between_markers(args.doc, "pipelines-table", "```\n" + "\n".join(lines) + "\n```")
    return result


if __name__ == "__main__":
    main()
