"""Randomized-smoothing certification against its floor, and the reduced-precision path that lowers the floor.

Run from the repository root (one command; prints the Markdown tables and writes JSON)::

    python benchmarks/certify_speed.py --doc docs/benchmarks.md

For each model (a small CNN and the CIFAR ResNet-110 of Cohen et al., 2019, both briefly trained on generated
32 px images with Gaussian noise so that their smoothed predictions are not trivial) and each ``n``, these cases
certify the same ``B`` images with the same ``n0``, ``n``, ``alpha`` and ``batch_size``, interleaved in one run:

* ``certify_batch``: :meth:`lightning_maxup.certify.Smooth.certify_batch` on all ``B`` images at once;
* ``cohen loop``: Cohen et al.'s published CERTIFY, written here from the paper: one image at a time, batches of
  ``batch_size`` noisy copies of that image, counts moved to the host (``np.bincount``), Clopper–Pearson bound;
* ``floor``: the bare batched noisy forward: the same ``B * (n0 + n)`` rows of noise added to already-expanded
  clean images and forwarded ``batch_size`` rows at a time, with no counting, no arg-max and no statistics;
* ``certify_batch bf16+cl`` and ``floor bf16+cl``: the same with ``Smooth(dtype=torch.bfloat16,
  memory_format=torch.channels_last)`` (the floor: the same autocast and input format).

Every case of timed round ``r`` draws its noise from a generator seeded ``r``, so ``certify_batch`` in fp32 and in
bf16 see the same noise and their certificates can be compared directly (fidelity), while the fp32 certificates of
different rounds differ only by Monte-Carlo noise (spread). A separate untimed fidelity study certifies more images
with the small CNN: fp32 under several seeds, bf16 under the first.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta, norm
from torch import Tensor, nn

from lightning_maxup.certify import Smooth
from lightning_maxup.recipes.models import CIFARResNet, SmallCNN

try:  # `python benchmarks/certify_speed.py` puts benchmarks/ on sys.path; `python -m ...` does not
    from _common import environment, markdown_table, replace_between_markers, time_interleaved, write_json
    from selection_fidelity import NUM_CLASSES, make_shapes
except ImportError:  # pragma: no cover
    from benchmarks._common import (  # type: ignore[no-redef]
        environment,
        markdown_table,
        replace_between_markers,
        time_interleaved,
        write_json,
    )
    from benchmarks.selection_fidelity import NUM_CLASSES, make_shapes  # type: ignore[no-redef]

DOC_MARKER = "certify-speed-table"
FAST: dict[str, Any] = {"dtype": torch.bfloat16, "memory_format": torch.channels_last}


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
def build(name: str) -> nn.Module:
    """``small`` (SmallCNN, width 16) or ``resnet110`` (CIFARResNet depth 110), normalising inside the network."""
    if name == "small":
        return nn.Sequential(_Normalize(), SmallCNN(3, NUM_CLASSES, width=16))
    if name == "resnet110":
        return CIFARResNet(depth=110, num_classes=NUM_CLASSES, mean=[0.45] * 3, std=[0.25] * 3)
    raise ValueError(f"Expected a model name 'small' or 'resnet110', got {name!r}")


class _Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x - 0.45) / 0.25


def train_noisy(model: nn.Module, steps: int, batch: int, sigma: float, g: torch.Generator) -> float:
    """Gaussian-augmentation training (Cohen et al.'s recipe) for a few steps; returns the final batch's loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = make_shapes(batch, generator=g)
        loss = F.cross_entropy(model(x + sigma * torch.randn(x.shape, generator=g)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------------------------
# Cohen et al.'s per-image CERTIFY (from the paper's pseudocode and its published code's structure)
# --------------------------------------------------------------------------------------------------------------------
def cohen_certify(
    model: nn.Module,
    x: Tensor,
    num_classes: int,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[int, float]:
    """CERTIFY for one image ``x`` ``[C, H, W]``: ``(class or -1, radius)``."""

    def sample_noise(num: int) -> np.ndarray:
        counts = np.zeros(num_classes, dtype=np.int64)
        remaining = num
        while remaining > 0:
            this = min(batch_size, remaining)
            remaining -= this
            batch = x.repeat((this, 1, 1, 1))
            noise = torch.randn(batch.shape, generator=generator) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts

    with torch.no_grad():
        c_a = int(sample_noise(n0).argmax())
        n_a = int(sample_noise(n)[c_a])
    # One-sided (1 - alpha) Clopper-Pearson bound: proportion_confint(nA, n, alpha=2 * alpha, method="beta")[0].
    p_lower = 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))
    if p_lower < 0.5:
        return -1, 0.0
    return c_a, sigma * float(norm.ppf(p_lower))


# --------------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------------
class Workload:
    """One model, ``B`` images and the settings every case shares; records each call's certificates by seed."""

    def __init__(self, model: nn.Module, x: Tensor, n: int, args: argparse.Namespace) -> None:
        self.model, self.x, self.n, self.args = model, x, n, args
        self.fp32 = Smooth(model, NUM_CLASSES, args.sigma)
        self.fast = Smooth(model, NUM_CLASSES, args.sigma, **FAST)
        self.calls: dict[str, int] = {}
        self.results: dict[str, list[tuple[Tensor, Tensor]]] = {}
        rows = min(args.batch_size, len(x) * (args.n0 + n))
        # The floor's clean rows are expanded once, outside the timing: the floor does noise + forward only.
        self.expanded = x.repeat_interleave(-(-rows // len(x)), dim=0)[:rows].contiguous()

    def _seed(self, name: str) -> torch.Generator:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        return torch.Generator().manual_seed(k)

    def certify_batch(self, smooth: Smooth, name: str) -> Callable[[], object]:
        """Case: ``smooth.certify_batch`` on all images."""

        def run() -> object:
            a = self.args
            out = smooth.certify_batch(self.x, a.n0, self.n, a.alpha, a.batch_size, generator=self._seed(name))
            self.results.setdefault(name, []).append(out)
            return out

        return run

    def cohen_loop(self) -> Callable[[], object]:
        """Case: Cohen et al.'s CERTIFY, one image at a time."""

        def run() -> object:
            a, g = self.args, self._seed("cohen loop")
            return [
                cohen_certify(self.model, xi, NUM_CLASSES, a.sigma, a.n0, self.n, a.alpha, a.batch_size, g)
                for xi in self.x
            ]

        return run

    def floor(self, fast: bool) -> Callable[[], object]:
        """Case: the bare noisy forwards, ``B * (n0 + n)`` rows in chunks of ``batch_size``."""
        total = len(self.x) * (self.args.n0 + self.n)
        name = "floor bf16+cl" if fast else "floor"

        def run() -> object:
            g, sigma = self._seed(name), self.args.sigma
            ctx: AbstractContextManager[Any] = torch.autocast("cpu", dtype=torch.bfloat16) if fast else nullcontext()
            with torch.no_grad(), ctx:
                for lo in range(0, total, len(self.expanded)):
                    base = self.expanded[: min(len(self.expanded), total - lo)]
                    noisy = base + sigma * torch.randn(base.shape, generator=g)
                    if fast:
                        noisy = noisy.contiguous(memory_format=torch.channels_last)
                    self.model(noisy)
            return None

        return run

    def cases(self) -> dict[str, Callable[[], object]]:
        """Every case of this workload, by name."""
        return {
            "certify_batch": self.certify_batch(self.fp32, "certify_batch"),
            "cohen loop": self.cohen_loop(),
            "floor": self.floor(fast=False),
            "certify_batch bf16+cl": self.certify_batch(self.fast, "certify_batch bf16+cl"),
            "floor bf16+cl": self.floor(fast=True),
        }


def fidelity(fp32: list[tuple[Tensor, Tensor]], fast: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """bf16 vs fp32 on the same noise (pairs of rounds with one seed), and the fp32 spread across seeds."""
    same = torch.cat([(p32 == p16).float() for (p32, _), (p16, _) in zip(fp32, fast, strict=True)])
    diff = torch.cat([(r32 - r16).abs() for (_, r32), (_, r16) in zip(fp32, fast, strict=True)])
    out = {"identical": float(same.mean()), "max_radius_diff": float(diff.max()), "pairs": float(len(same))}
    if len(fp32) >= 2:
        radii = torch.stack([r for _, r in fp32])
        out["radius_std_across_seeds"] = float(radii.std(dim=0).mean())
    return out


def run_workload(name: str, model: nn.Module, x: Tensor, n: int, rounds: int, args: argparse.Namespace) -> dict:
    """Time the five cases of one (model, n) interleaved; returns timings, ratios and fidelity."""
    w = Workload(model, x, n, args)
    print(f"{name}, n = {n}: {len(x)} images, {rounds} round(s)", file=sys.stderr, flush=True)
    timings = time_interleaved(
        w.cases(),
        device="cpu",
        repeats=rounds,
        warmup=0,  # warmed up once per model with a small n, see main()
        clock=args.clock,
        progress=lambda s: print("  " + s, file=sys.stderr, flush=True),
    )
    t = {k: v.median for k, v in timings.items()}
    return {
        "model": name,
        "n": n,
        "images": len(x),
        "rounds": rounds,
        "seconds": {k: v.seconds for k, v in timings.items()},
        "images_per_s": {k: len(x) / v for k, v in t.items()},
        "batch_over_floor": t["certify_batch"] / t["floor"],
        "loop_over_floor": t["cohen loop"] / t["floor"],
        "batch_speedup_over_loop": t["cohen loop"] / t["certify_batch"],
        "fast_batch_over_fast_floor": t["certify_batch bf16+cl"] / t["floor bf16+cl"],
        "fast_speedup": t["certify_batch"] / t["certify_batch bf16+cl"],
        "fast_floor_speedup": t["floor"] / t["floor bf16+cl"],
        "fidelity": fidelity(w.results["certify_batch"], w.results["certify_batch bf16+cl"]),
    }


def fidelity_study(model: nn.Module, x: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Untimed: fp32 certificates under ``args.fidelity_seeds`` seeds, bf16+cl under the first, same images."""
    fp32, fast = Smooth(model, NUM_CLASSES, args.sigma), Smooth(model, NUM_CLASSES, args.sigma, **FAST)
    n = args.fidelity_n

    def cert(smooth: Smooth, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        return smooth.certify_batch(x, args.n0, n, args.alpha, args.batch_size, generator=g)

    runs = [cert(fp32, s) for s in range(args.fidelity_seeds)]
    p16, r16 = cert(fast, 0)
    p32, r32 = runs[0]
    radii, preds = torch.stack([r for _, r in runs]), torch.stack([p for p, _ in runs])
    return {
        "images": len(x),
        "n": n,
        "seeds": args.fidelity_seeds,
        "identical": float((p32 == p16).float().mean()),
        "max_radius_diff": float((r32 - r16).abs().max()),
        "mean_radius_diff": float((r32 - r16).abs().mean()),
        "fp32_identical_across_seeds": float((preds == preds[0]).all(dim=0).float().mean()),
        "fp32_max_radius_diff_across_seeds": float((radii - radii[0]).abs().max()),
        "fp32_radius_std_across_seeds": float(radii.std(dim=0).mean()),
        "fp32_radius_std_max": float(radii.std(dim=0).max()),
    }


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------
def render(results: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> str:
    """The Markdown tables: speed, reduced precision, fidelity."""
    rows, fast_rows = [], []
    for r in results["workloads"]:
        ips = r["images_per_s"]
        label = [r["model"], f"{r['n']:,}", f"{r['images']} × {r['rounds']}"]
        rows.append(
            label
            + [
                f"{ips['certify_batch']:.3g}",
                f"{ips['cohen loop']:.3g}",
                f"{ips['floor']:.3g}",
                f"{r['batch_over_floor']:.3f}×",
                f"{r['loop_over_floor']:.3f}×",
                f"{r['batch_speedup_over_loop']:.2f}×",
            ]
        )
        f = r["fidelity"]
        std = f.get("radius_std_across_seeds")
        fast_rows.append(
            label
            + [
                f"{ips['certify_batch bf16+cl']:.3g}",
                f"{r['fast_speedup']:.2f}×",
                f"{r['fast_floor_speedup']:.2f}×",
                f"{r['fast_batch_over_fast_floor']:.3f}×",
                f"{100 * f['identical']:.0f}% of {int(f['pairs'])}",
                f"{f['max_radius_diff']:.4f}",
                "—" if std is None else f"{std:.4f}",
            ]
        )
    head = (
        f"σ = {args.sigma}, n0 = {args.n0}, alpha = {args.alpha}, batch_size = {args.batch_size} rows per forward,"
        f" 32 px RGB, 10 classes. {env['cpu']}, {env['torch_threads']} thread(s), clock={args.clock}, torch"
        f" {env['torch']}; medians over interleaved rounds (images × rounds); the machine was shared with other jobs."
    )
    speed = markdown_table(
        [
            "model",
            "n",
            "images × rounds",
            "certify_batch img/s",
            "Cohen loop img/s",
            "floor img/s",
            "certify_batch / floor",
            "Cohen loop / floor",
            "certify_batch vs loop",
        ],
        rows,
    )
    fast = markdown_table(
        [
            "model",
            "n",
            "images × rounds",
            "bf16+cl img/s",
            "speed-up vs fp32",
            "floor speed-up",
            "bf16+cl certify / bf16+cl floor",
            "same prediction as fp32",
            "max Δ radius",
            "fp32 radius std across seeds",
        ],
        fast_rows,
    )
    s = results["fidelity_study"]
    study = (
        f"Fidelity study (untimed), small CNN, {s['images']} images, n = {s['n']:,}: bf16+cl and fp32 on the same noise"
        f" give the same prediction for {100 * s['identical']:.1f}% of images, radius difference max"
        f" {s['max_radius_diff']:.4f} (mean {s['mean_radius_diff']:.4f}). fp32 alone under {s['seeds']} seeds: the"
        f" same prediction under every seed for {100 * s['fp32_identical_across_seeds']:.1f}% of images, radius std"
        f" across seeds mean {s['fp32_radius_std_across_seeds']:.4f} (max {s['fp32_radius_std_max']:.4f}), largest"
        f" difference to the first seed {s['fp32_max_radius_diff_across_seeds']:.4f}."
    )
    fast_head = "Reduced precision, `Smooth(dtype=torch.bfloat16, memory_format=torch.channels_last)`:"
    return "\n\n".join([head, speed, fast_head, fast, study])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=128, help="rows per forward (all cases)")
    p.add_argument("--ns", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--models", nargs="+", default=["small", "resnet110"], choices=["small", "resnet110"])
    p.add_argument(
        "--plan",
        nargs="+",
        default=["small:1000:4:2", "small:10000:1:2", "resnet110:1000:1:1", "resnet110:10000:1:1"],
        help="model:n:images:rounds for each workload that --models and --ns select",
    )
    p.add_argument("--train-steps", nargs=2, type=int, default=[150, 15], help="noisy training steps: small, resnet110")
    p.add_argument("--fidelity-images", type=int, default=16)
    p.add_argument("--fidelity-n", type=int, default=1000)
    p.add_argument("--fidelity-seeds", type=int, default=3)
    p.add_argument("--clock", default="process", choices=["wall", "process"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests (seconds)")
    p.add_argument("--json", default="benchmarks/results/certify_speed.json")
    p.add_argument("--doc", help=f"replace the tables between <!-- {DOC_MARKER}:start/end --> markers in this file")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.ns, args.train_steps = ["small"], [100], [5, 1]
        args.plan, args.n0, args.batch_size = ["small:100:2:2"], 10, 64
        args.fidelity_images, args.fidelity_n, args.fidelity_seeds = 4, 100, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the models, time every workload, run the fidelity study, print the tables; returns the results."""
    args = parse_args(argv)
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plan = [(m, int(n), int(b), int(r)) for m, n, b, r in (s.split(":") for s in args.plan)]
    results: dict[str, Any] = {"workloads": []}
    models: dict[str, nn.Module] = {}
    x_test, y_test = make_shapes(max(b for _, _, b, _ in plan) + args.fidelity_images, generator=g)
    for name, steps in zip(("small", "resnet110"), args.train_steps, strict=True):
        if name not in args.models:
            continue
        t0 = time.perf_counter()
        model = models[name] = build(name)
        loss = train_noisy(model, steps, 32, args.sigma, g)
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        results[f"{name}_training"] = {"steps": steps, "final_loss": loss, "clean_accuracy": acc}
        print(f"{name}: {steps} noisy steps in {time.perf_counter() - t0:.0f} s, loss {loss:.2f}, clean acc {acc:.2f}",
              file=sys.stderr)  # fmt: skip
        warm = Workload(model, x_test[:1], 100, args)
        for case in warm.cases().values():  # oneDNN kernel selection, allocator: once per model
            case()
    for name, n, images, rounds in plan:
        if name in models and n in args.ns:
            results["workloads"].append(run_workload(name, models[name], x_test[:images], n, rounds, args))
    if "small" in models:
        print("fidelity study", file=sys.stderr, flush=True)
        results["fidelity_study"] = fidelity_study(models["small"], x_test[-args.fidelity_images :], args)
    results["wall_seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start
    table = render(results, args, env)
    print(table)
    print(
        f"\ntotal runtime {results['wall_seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU of this process,"
        f" torch threads {torch.get_num_threads()}"
    )
    for r in results["workloads"]:
        met = "met" if r["batch_over_floor"] <= 1.05 else "MISSED"
        print(f"target certify_batch <= 1.05x floor, {r['model']} n={r['n']}: {r['batch_over_floor']:.3f}x {met}")
    write_json(args.json, {"config": vars(args), "environment": env, **results})
    if args.doc and not replace_between_markers(args.doc, DOC_MARKER, table):
        print(f"warning: no <!-- {DOC_MARKER}:start/end --> markers in {args.doc}; not updated", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
