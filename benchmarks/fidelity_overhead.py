"""What :class:`~lightning_maxup.evaluation.fidelity.SelectionFidelity` costs: the same training with and without it.

Run from the repository root (prints a Markdown table, writes JSON)::

    python benchmarks/fidelity_overhead.py

A ``MaxUpClassifier`` around a ``SmallCNN`` is trained with ``m = 4`` on the bundled handwritten digits, upsampled
bilinearly from 8 to 16 px, selecting on the 8 px view (``selection_size=8``: half resolution), for a fixed number
of optimizer steps; runs without the callback and with ``SelectionFidelity()`` (default ``every_n_steps``)
alternate, and their fit times are compared. Because a 1 % difference is below the noise of whole runs on a shared
machine, the script also times the callback's check itself: a run with ``every_n_steps=1`` records the time spent
in the check on every step, and the overhead at the default interval is ``check time / (every_n_steps x step
time)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup.augment import Compose, Cutout, RandomCrop
from lightning_maxup.data.datasets import load_digits_split
from lightning_maxup.evaluation.fidelity import SelectionFidelity
from lightning_maxup.recipes.models import MaxUpClassifier, SmallCNN

try:  # `python benchmarks/fidelity_overhead.py` puts benchmarks/ on sys.path; `python -m ...` does not
    from _common import environment, markdown_table, write_json
except ImportError:  # pragma: no cover
    from benchmarks._common import environment, markdown_table, write_json  # type: ignore[no-redef]


class TimedFidelity(SelectionFidelity):
    """:class:`SelectionFidelity` that records the seconds each check takes and every agreement it measures."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds: list[float] = []
        self.agreements: list[float] = []

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        checking = self._checking
        start = time.perf_counter()
        super().on_after_backward(trainer, pl_module)
        if checking and self.last is not None:
            self.seconds.append(time.perf_counter() - start)
            self.agreements.append(float(self.last.agreement))


def digits_16(seed: int) -> TensorDataset:
    """The digits' training split, upsampled bilinearly to 16 px."""
    (x, y), _, _ = load_digits_split(seed=seed)
    return TensorDataset(F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1), y)


def model(args: argparse.Namespace) -> MaxUpClassifier:
    """The MaxUp classifier every run trains, from the same initial weights."""
    torch.manual_seed(args.seed)
    return MaxUpClassifier(
        SmallCNN(1, 10, width=args.width),
        num_classes=10,
        lr=0.05,
        m=args.m,
        augment=Compose([RandomCrop(16, padding=2), Cutout(6)]),
        selection_size=8,
        seed=args.seed,
    )


def fit(args: argparse.Namespace, data: TensorDataset, callbacks: list[Any]) -> float:
    """Train for ``args.steps`` optimizer steps; returns the wall-clock seconds of ``trainer.fit``."""
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    net = model(args)
    start = time.perf_counter()
    trainer.fit(net, train_dataloaders=loader)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs with and without the callback, alternating")
    p.add_argument("--every-n-steps", type=int, default=None, help="default: SelectionFidelity's own default")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--width", type=int, default=32, help="SmallCNN width")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests (seconds)")
    p.add_argument("--json", default="benchmarks/results/fidelity_overhead.json")
    args = p.parse_args(argv)
    if args.every_n_steps is None:
        args.every_n_steps = SelectionFidelity().every_n_steps
    if args.quick:
        args.steps, args.repeats, args.every_n_steps, args.width = 12, 1, 4, 8
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the runs, print the table; returns the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    data = digits_16(args.seed)
    timed = TimedFidelity(every_n_steps=1, window=10**6)  # every step checked: the cost of one check
    probe_seconds = fit(args, data, [timed])
    plain, with_callback = [], []
    for r in range(args.repeats):
        runs = [
            ("plain", plain, []),
            ("callback", with_callback, [SelectionFidelity(every_n_steps=args.every_n_steps)]),
        ]
        for name, times, callbacks in runs if r % 2 == 0 else runs[::-1]:
            times.append(fit(args, data, callbacks))
            print(f"repeat {r}: {name} {times[-1]:.1f} s", file=sys.stderr, flush=True)
    step = statistics.median(plain) / args.steps
    check = statistics.median(timed.seconds)
    predicted = check / (args.every_n_steps * step)
    measured = statistics.median(with_callback) / statistics.median(plain) - 1
    results = {
        "step_seconds": step,
        "check_seconds": check,
        "predicted_overhead": predicted,
        "measured_overhead": measured,
        "plain_seconds": plain,
        "callback_seconds": with_callback,
        "probe_seconds": probe_seconds,
        "agreement_mean": statistics.mean(timed.agreements),
        "checks": len(timed.seconds),
    }
    rows = [
        ["median step (no callback)", f"{1000 * step:.1f} ms"],
        ["median check (one full-input forward of m x B rows)", f"{1000 * check:.1f} ms"],
        ["check / step", f"{check / step:.2f}"],
        [f"overhead at every_n_steps={args.every_n_steps}: check / (n x step)", f"{100 * predicted:.2f} %"],
        [f"measured: fit time with / without - 1 (medians of {args.repeats})", f"{100 * measured:+.2f} %"],
        ["run with every_n_steps=1: fit time / plain fit time", f"{probe_seconds / statistics.median(plain):.2f}"],
        [f"mean agreement of the 8 px view over {len(timed.agreements)} checks (chance {1 / args.m:.0%})",
         f"{100 * statistics.mean(timed.agreements):.1f} %"],
    ]  # fmt: skip
    head = (
        f"MaxUpClassifier(SmallCNN(width={args.width})) on the digits upsampled to 16 px, m = {args.m}, batch"
        f" {args.batch}, selection_size=8, {args.steps} optimizer steps per run. {env['cpu']},"
        f" {env['torch_threads']} thread(s), torch {env['torch']}; the machine was shared with other jobs."
    )
    print(head + "\n\n" + markdown_table(["quantity", "value"], rows))
    write_json(args.json, {"config": vars(args), "environment": env, **results})
    return results


if __name__ == "__main__":
    main()
