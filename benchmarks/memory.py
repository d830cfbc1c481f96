"""Peak memory of one training step: ERM next to MaxUp at m = 4, 10, 20, with and without chunking.

Run from the repository root::

    python benchmarks/memory.py                    # CPU: peak RSS
    python benchmarks/memory.py --device cuda      # GPU: torch.cuda.max_memory_allocated

Every configuration runs in a fresh subprocess, so one configuration's allocator state cannot hide another's
peak. The subprocess builds the model, the optimiser (with its momentum buffers) and the batch, records a
baseline, runs exactly one training step (augment, select, forward, backward, optimiser step; no warm-up, which
would set the peak itself) and reports the peak above the baseline:

* CPU: ``ru_maxrss`` after the step minus the resident set size at the baseline. glibc's ``malloc`` is told to
  serve every allocation above 64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
  resident set at once and RSS follows live tensors (tracemalloc does not see torch's allocations).
* CUDA: ``torch.cuda.max_memory_allocated()`` after the step minus ``memory_allocated()`` at the baseline.

The ERM step is ordinary augmentation (``maxup_step`` with ``m=1``: one augmented forward with gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

CONFIGS: list[dict[str, Any]] = [
    {"name": "ERM", "m": 1, "chunk": None},
    *({"name": f"MaxUp m={m}", "m": m, "chunk": None} for m in (4, 10, 20)),
    *({"name": f"MaxUp m={m}, chunked", "m": m, "chunk": "B"} for m in (4, 10, 20)),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from lightning_maxup.augment import Compose, Cutout, RandomHorizontalFlip
    from lightning_maxup.core.functional import maxup_step
    from lightning_maxup.recipes.models import SmallCNN

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = SmallCNN(3, 10, width=args.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    augment = Compose([RandomHorizontalFlip(), Cutout(size=args.size // 4)])
    generator = torch.Generator(device=device).manual_seed(0)
    # Optimiser state exists before the baseline, as in any step after the first.
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def loss_fn(batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    chunk = args.batch if cfg["chunk"] == "B" else cfg["chunk"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    out = maxup_step(loss_fn, (x, y), augment=augment, m=cfg["m"], generator=generator, model=model, chunk_size=chunk)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {**cfg, "chunk_rows": chunk, "peak_mib": peak / 2**20, "baseline_mib": baseline / 2**20,
            "baseline_maxrss_mib": baseline_maxrss / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="B, samples per step")
    parser.add_argument("--size", type=int, default=32, help="image side (CIFAR-like 3 x 32 x 32)")
    parser.add_argument("--width", type=int, default=32, help="SmallCNN width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker), args)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    passthrough = ["--device", args.device, "--batch", str(args.batch), "--size", str(args.size)]
    passthrough += ["--width", str(args.width), "--threads", str(args.threads)]
    results = []
    for cfg in CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg), *passthrough],
            capture_output=True, text=True, env=env, timeout=600, check=True,
        )  # fmt: skip
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    erm = results[0]["peak_mib"]
    unit = "peak RSS above baseline" if args.device == "cpu" else "max_memory_allocated above baseline"
    print(f"B={args.batch}, 3x{args.size}x{args.size}, SmallCNN(width={args.width}), {args.device}; {unit}\n")
    print("| configuration | selection chunk (rows) | peak (MiB) | / ERM |")
    print("|---|---:|---:|---:|")
    for r in results:
        chunk = r["chunk_rows"] if r["chunk_rows"] is not None else ("-" if r["m"] == 1 else f"{r['m'] * args.batch}")
        print(f"| {r['name']} | {chunk} | {r['peak_mib']:.1f} | {r['peak_mib'] / erm:.2f}x |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
