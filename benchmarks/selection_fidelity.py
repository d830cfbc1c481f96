"""How often a cheap MaxUp selection pass picks the copy the full pass would pick, and what it costs when it does not.

Run from the repository root (one command; prints the Markdown table, writes JSON, the plot and the doc table)::

    python benchmarks/selection_fidelity.py --plot docs/selection_fidelity.png --doc docs/benchmarks.md

A CIFAR ResNet-20 (He et al., 2016) is trained with a plain PyTorch loop on generated 32 px images (class =
shape x colour family, random position, size, hue jitter and noise). At an early and a late checkpoint, a fixed set
of batches is expanded to ``m`` copies and augmented once (``RandomCrop(32, padding=4)``, flip, ``Cutout(16)``), and
every candidate's cross-entropy is computed by the *full* pass (fp32, 32 px, eval mode) and by each *cheap* pass
(16 px or 8 px antialiased view, bf16 autocast, ``channels_last``, and their combinations). For each cheap pass:

* speed-up: time of the full selection forward over the cheap one (view + forward + per-sample loss), median of
  interleaved repeats;
* agreement: share of samples whose cheap arg-max over the ``m`` copies is the full arg-max (chance: ``1/m``);
* regret: ``mean(full worst loss - full loss of the cheaply chosen copy) / mean(full worst - full mean)``: 0 when
  the cheap pass always finds the worst copy, about 1 for a uniformly random copy (plain augmentation).

A second run does the same on real handwritten images: the bundled digits (``lightning_maxup.data.
load_digits_split``, 8 x 8 px, 1 channel), upsampled bilinearly to 32 px so that the same network, augmentation and
views apply; it is trained on the training split (batches of 64, learning rate decayed to 0 on a cosine) and scored
on the validation and test splits. Its selection
forwards have the shapes of the first run's, so only agreement and regret are reported. Note that on these images
the 8 px view holds nearly all the information there is (the originals are 8 px), and 16 px is half resolution.
Agreement and regret come from :func:`lightning_maxup.evaluation.fidelity.view_fidelity`, which
:class:`lightning_maxup.evaluation.fidelity.SelectionFidelity` logs during training.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.augment import Compose, Cutout, RandomCrop, RandomHorizontalFlip
from lightning_maxup.core.views import downsample_view
from lightning_maxup.data.datasets import load_digits_split
from lightning_maxup.evaluation.fidelity import view_fidelity
from lightning_maxup.recipes.models import CIFARResNet

try:  # `python benchmarks/selection_fidelity.py` puts benchmarks/ on sys.path; `python -m ...` does not
    from _common import environment, markdown_table, replace_between_markers, time_interleaved, write_json
except ImportError:  # pragma: no cover
    from benchmarks._common import (  # type: ignore[no-redef]
        environment,
        markdown_table,
        replace_between_markers,
        time_interleaved,
        write_json,
    )

DOC_MARKER = "selection-fidelity-table"
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def make_shapes(n: int, size: int = 32, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` generated RGB images in [0, 1] and labels in ``0..9``: 5 shapes x 2 colour families.

    Shapes (disc, square, ring, stripes, cross) are drawn at a random centre and radius; the foreground colour is a
    jittered warm (classes 0-4) or cool (5-9) hue on a random grey background, plus Gaussian pixel noise, so the
    task is learnable but not solved in one epoch.
    """
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    shape, family = y % 5, y // 5
    grid = torch.arange(size, dtype=torch.float32)
    cy = torch.empty(n).uniform_(0.3 * size, 0.7 * size, generator=generator)[:, None, None]
    cx = torch.empty(n).uniform_(0.3 * size, 0.7 * size, generator=generator)[:, None, None]
    r = torch.empty(n).uniform_(0.15 * size, 0.3 * size, generator=generator)[:, None, None]
    dy, dx = grid[None, :, None] - cy, grid[None, None, :] - cx
    dist, box = (dy**2 + dx**2).sqrt(), torch.maximum(dy.abs(), dx.abs())
    masks = torch.stack(
        [
            dist < r,
            box < r,
            (dist - r).abs() < 0.08 * size,
            (box < r) & ((dy + size).floor().long() // 3 % 2 == 0),
            (box < r) & ((dy.abs() < 0.07 * size) | (dx.abs() < 0.07 * size)),
        ],
        dim=1,
    )
    mask = masks[torch.arange(n), shape].float()[:, None]
    warm, cool = torch.tensor([0.9, 0.45, 0.15]), torch.tensor([0.15, 0.45, 0.9])
    base = torch.where(family[:, None] == 0, warm, cool)
    colour = (base + 0.25 * torch.rand(n, 3, generator=generator) - 0.125).clamp(0, 1)[:, :, None, None]
    background = torch.empty(n, 1, 1, 1).uniform_(0.2, 0.6, generator=generator)
    x = mask * colour + (1 - mask) * background
    x = x + 0.12 * torch.randn(n, 3, size, size, generator=generator)
    return x.clamp(0, 1), y


def load_digits_32(seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The bundled digits upsampled bilinearly from 8 to 32 px: ``(train, validation + test)`` pairs, 1 channel."""
    (xtr, ytr), (xva, yva), (xte, yte) = load_digits_split(seed=seed)

    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)

    return (up(xtr), ytr), (up(torch.cat([xva, xte])), torch.cat([yva, yte]))


def augmentation() -> Compose:
    """The usual CIFAR augmentation of the MaxUp paper's ResNet experiments."""
    return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), Cutout(16)])


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def train_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, batch: int, g: torch.Generator
) -> float:
    """One epoch of ordinary augmented training; returns the mean training loss."""
    model.train()
    aug = augmentation()
    order = torch.randperm(len(x), generator=g)
    total, steps = 0.0, 0
    for lo in range(0, len(x) - batch + 1, batch):
        idx = order[lo : lo + batch]
        xb = aug(x[idx], generator=g)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


# --------------------------------------------------------------------------------------------------------------------
# Selection passes
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One selection pass: view side, bf16 autocast or fp32, ``channels_last`` input, BatchNorm mode.

    ``train_bn`` scores copies in train mode (``maxup_step``'s ``selection_mode="train"``): BatchNorm normalises with
    the statistics of the candidates themselves instead of running statistics gathered on 32 px images.
    """

    size: int
    bf16: bool
    channels_last: bool
    train_bn: bool = False

    @property
    def name(self) -> str:
        """Short label, e.g. ``16px+bf16+cl``."""
        parts = [f"{self.size}px"] + (["bf16"] if self.bf16 else []) + (["cl"] if self.channels_last else [])
        return "+".join(parts + (["train-BN"] if self.train_bn else []))


OPTIONS = [
    Option(size, bf16, cl)
    for size in (32, 16, 8)
    for bf16, cl in ((False, False), (False, True), (True, False), (True, True))
] + [Option(16, False, False, True), Option(16, True, True, True), Option(8, True, True, True)]


def selection_losses(model: nn.Module, x: Tensor, y: Tensor, option: Option) -> Tensor:
    """Per-row cross-entropy of the selection pass ``option`` (the caller sets the mode and disables gradients)."""
    view = downsample_view(x, option.size) if option.size != x.shape[-1] else x
    if option.channels_last:
        view = view.contiguous(memory_format=torch.channels_last)
    ctx: AbstractContextManager[Any] = torch.autocast("cpu", dtype=torch.bfloat16) if option.bf16 else nullcontext()
    with ctx:
        logits = model(view)
    return F.cross_entropy(logits.float(), y, reduction="none")


class Scorer:
    """The model as each option runs it: itself in eval mode, or a twin in train mode for ``train_bn`` options.

    The twin absorbs the running-statistics updates of train-mode forwards, so the model itself is never changed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.twin = copy.deepcopy(model).train()

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor, option: Option) -> Tensor:
        return selection_losses(self.twin if option.train_bn else self.model, x, y, option)


def fidelity(full: Tensor, cheap: Tensor) -> tuple[float, float]:
    """Agreement and regret (relative to a random copy's) of a cheap pass, from ``[m, B]`` losses of both passes."""
    result = view_fidelity(cheap, full)
    gap = (full.amax(dim=0) - full.mean(dim=0)).mean()
    return float(result.agreement), float(result.regret / gap.clamp_min(1e-12))


class Candidates:
    """Fixed evaluation batches, each expanded to ``m`` copies (row ``k * B + i`` is copy ``k`` of sample ``i``)."""

    def __init__(self, x: Tensor, y: Tensor, m: int, batch: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        aug = augmentation()
        self.m, self.batch = m, batch
        self.batches: list[tuple[Tensor, Tensor]] = []
        for lo in range(0, len(x) - batch + 1, batch):
            xb, yb = x[lo : lo + batch], y[lo : lo + batch]
            self.batches.append((aug(xb.repeat(m, 1, 1, 1), generator=g), yb.repeat(m)))

    def losses(self, scorer: Scorer, option: Option) -> Tensor:
        """``[m, samples]`` losses of every candidate under ``option``."""
        per_batch = [scorer(xb, yb, option).view(self.m, self.batch) for xb, yb in self.batches]
        return torch.cat(per_batch, dim=1)


def evaluate(
    model: nn.Module, cands: Candidates, args: argparse.Namespace, progress: Callable[[str], None], timed: bool = True
) -> dict[str, dict[str, float]]:
    """Speed-up (if ``timed``), agreement and regret of every option at the model's weights (and of a random copy)."""
    scorer = Scorer(model)
    xb, yb = cands.batches[0]

    def case(option: Option) -> Callable[[], object]:
        return lambda: scorer(xb, yb, option)

    timings = {}
    if timed:
        timings = time_interleaved(
            {o.name: case(o) for o in OPTIONS},
            device="cpu",
            repeats=args.repeats,
            warmup=1,
            clock=args.clock,
            progress=progress,
        )
    full = cands.losses(scorer, OPTIONS[0])
    rows: dict[str, dict[str, float]] = {}
    for o in OPTIONS:
        agreement, regret = fidelity(full, cands.losses(scorer, o))
        rows[o.name] = {"agreement": agreement, "regret": regret}
        if timed:
            rows[o.name]["speedup"] = timings[OPTIONS[0].name].median / timings[o.name].median
            rows[o.name]["median_s"] = timings[o.name].median
    g = torch.Generator().manual_seed(1)
    random_choice = torch.randint(0, cands.m, (full.shape[1],), generator=g)
    one_hot = F.one_hot(random_choice, cands.m).t().float()
    rows["random copy"] = dict(zip(("agreement", "regret"), fidelity(full, one_hot), strict=True))
    return rows


@torch.no_grad()
def view_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Clean accuracy on the 32, 16 and 8 px views in eval mode: how well the model still sees a low-res view."""
    model.eval()
    return {f"{s}px": float((model(downsample_view(x, s)).argmax(1) == y).float().mean()) for s in (32, 16, 8)}


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------
def render(results: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> str:
    """The Markdown table: one row per option, early and late checkpoint side by side."""
    early, late = results["checkpoints"]["early"], results["checkpoints"]["late"]
    rows = []
    for name in [o.name for o in OPTIONS] + ["random copy"]:
        e, la = early["rows"][name], late["rows"][name]
        speed = f"{e['speedup']:.2f}×" if "speedup" in e else "—"
        speed_late = f"{la['speedup']:.2f}×" if "speedup" in la else "—"
        label = f"{name} (full pass)" if name == OPTIONS[0].name else name
        rows.append(
            [
                label,
                speed,
                speed_late,
                f"{100 * e['agreement']:.1f}%",
                f"{100 * la['agreement']:.1f}%",
                f"{e['regret']:.4f}",
                f"{la['regret']:.4f}",
            ]
        )
    headers = ["selection pass", "speed-up early", "late", "agreement early", "late", "regret early", "late"]
    head = (
        f"ResNet-{args.depth} on generated 32 px images, {args.train} training images, m = {args.m},"
        f" {results['samples']} evaluation samples in batches of {args.batch_eval} ({args.m * args.batch_eval} rows per"
        f" selection forward); early = after epoch {args.early_epoch} (clean eval-mode accuracy on the 32/16/8 px"
        f" views {_accuracies(early)}), late = after epoch {args.epochs} ({_accuracies(late)})."
        f" {env['cpu']}, {env['torch_threads']} thread(s), clock={args.clock}, torch {env['torch']}, medians of"
        f" {args.repeats} interleaved repeats; the machine was shared with other jobs."
    )
    return head + "\n\n" + markdown_table(headers, rows)


def render_digits(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The Markdown table of the digits run: agreement and regret per option, early and late checkpoint."""
    early, late = results["checkpoints"]["early"], results["checkpoints"]["late"]
    rows = []
    for name in [o.name for o in OPTIONS] + ["random copy"]:
        e, la = early["rows"][name], late["rows"][name]
        label = f"{name} (full pass)" if name == OPTIONS[0].name else name
        agreement = [f"{100 * e['agreement']:.1f}%", f"{100 * la['agreement']:.1f}%"]
        rows.append([label, *agreement, f"{e['regret']:.4f}", f"{la['regret']:.4f}"])
    headers = ["selection pass", "agreement early", "late", "regret early", "late"]
    head = (
        f"Real images: ResNet-{args.depth} on the bundled handwritten digits (8 px, upsampled bilinearly to 32 px),"
        f" {results['train']} training images in batches of {args.digits_batch} with a cosine learning rate, same"
        f" augmentation and m = {args.m}, {results['samples']} validation"
        f" and test samples in batches of {args.batch_eval}; early = after epoch {args.digits_early_epoch} (clean"
        f" eval-mode accuracy on the 32/16/8 px views {_accuracies(early)}), late = after epoch {args.digits_epochs}"
        f" ({_accuracies(late)})."
    )
    return head + "\n\n" + markdown_table(headers, rows)


def _accuracies(ckpt: dict[str, Any]) -> str:
    return "/".join(f"{100 * a:.0f}" for a in ckpt["accuracy"].values()) + "%"


def plot(results: dict[str, Any], path: str) -> None:
    """Speed-up against agreement, one marker per option, early (hollow) and late (filled) checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {32: "tab:blue", 16: "tab:orange", 8: "tab:green"}
    markers = {(False, False): "o", (False, True): "s", (True, False): "^", (True, True): "D"}
    for stage, filled in (("early", False), ("late", True)):
        rows = results["checkpoints"][stage]["rows"]
        for o in OPTIONS:
            r = rows[o.name]
            c = colours[o.size]
            ax.scatter(
                100 * r["agreement"],
                r["speedup"],
                marker="*" if o.train_bn else markers[(o.bf16, o.channels_last)],
                s=120 if o.train_bn else 60,
                facecolors=c if filled else "none",
                edgecolors=c,
                label=o.name if filled else None,
            )
            if filled:
                ax.annotate(o.name, (100 * r["agreement"], r["speedup"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")  # fmt: skip
    m = results["m"]
    ax.axvline(100 / m, color="grey", ls=":", lw=1)
    ax.text(100 / m + 0.5, 0.02, "random copy", fontsize=7, color="grey", transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel(f"agreement with the full pass (% of samples, m = {m})")
    ax.set_ylabel("speed-up of the selection forward (×, log)")
    ax.set_title("Cheap MaxUp selection: speed vs fidelity (hollow: early, filled: late checkpoint)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0.4, 0.98))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20, help="CIFARResNet depth (6n + 2)")
    p.add_argument("--train", type=int, default=4096, help="generated training images")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--early-epoch", type=int, default=2, help="the early checkpoint is taken after this epoch")
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--m", type=int, default=4, help="copies per sample")
    p.add_argument("--eval-samples", type=int, default=512, help="evaluation samples (fixed batches)")
    p.add_argument("--batch-eval", type=int, default=32, help="samples per selection forward (m x this rows)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds per checkpoint")
    p.add_argument("--clock", default="process", choices=["wall", "process"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-digits", dest="digits", action="store_false", help="skip the run on the bundled digits")
    p.add_argument("--digits-train", type=int, default=None, help="use only this many digits training images")
    p.add_argument("--digits-epochs", type=int, default=12, help="epochs on the digits (1257 images each)")
    p.add_argument("--digits-early-epoch", type=int, default=4)
    p.add_argument("--digits-batch", type=int, default=64, help="training batch on the digits (cosine learning rate)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests (seconds)")
    p.add_argument("--json", default="benchmarks/results/selection_fidelity.json")
    p.add_argument("--plot", help="write the speed-up vs agreement plot here (PNG)")
    p.add_argument("--doc", help=f"replace the table between <!-- {DOC_MARKER}:start/end --> markers in this file")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.train, args.epochs, args.early_epoch = 8, 256, 2, 1
        args.eval_samples, args.batch_eval, args.repeats = 32, 16, 1
        args.digits_train, args.digits_epochs, args.digits_early_epoch = 128, 2, 1
    if not 1 <= args.early_epoch < args.epochs:
        p.error(f"Expected 1 <= `--early-epoch` < `--epochs`, got {args.early_epoch} and {args.epochs}")
    if not 1 <= args.digits_early_epoch < args.digits_epochs:
        p.error(
            "Expected 1 <= `--digits-early-epoch` < `--digits-epochs`, got"
            f" {args.digits_early_epoch} and {args.digits_epochs}"
        )
    return args


def run(
    name: str,
    train: tuple[Tensor, Tensor],
    evaluation: tuple[Tensor, Tensor],
    args: argparse.Namespace,
    g: torch.Generator,
    timed: bool,
    epochs: tuple[int, int],
    batch: int,
    cosine: bool = False,
) -> dict[str, Any]:
    """Train on ``train``, score every option on ``evaluation`` at both checkpoints ``(early, last)`` epochs.

    With ``cosine`` the learning rate decays to 0 over the ``last`` epochs (the digits need it: at a constant rate the
    eval-mode accuracy of the small training set swings between epochs).
    """
    (x_train, y_train), (x_eval, y_eval) = train, evaluation
    channels = x_train.shape[1]
    model = CIFARResNet(
        depth=args.depth, num_classes=NUM_CLASSES, in_channels=channels, mean=[0.45] * channels, std=[0.25] * channels
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    checkpoints: dict[str, dict[str, Any]] = {}
    early, last = epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, last) if cosine else None
    for epoch in range(1, last + 1):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, x_train, y_train, batch, g)
        if schedule is not None:
            schedule.step()
        acc = view_accuracy(model, x_eval, y_eval)
        print(f"{name} epoch {epoch}: loss {loss:.3f}, eval accuracy {acc} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)  # fmt: skip
        if epoch in (early, last):
            checkpoints["early" if epoch == early else "late"] = {
                "epoch": epoch,
                "accuracy": acc,
                "state": copy.deepcopy(model.state_dict()),
            }
    cands = Candidates(x_eval, y_eval, args.m, args.batch_eval, seed=args.seed + 1)
    results: dict[str, Any] = {
        "m": args.m,
        "train": len(x_train),
        "samples": len(cands.batches) * args.batch_eval,
        "checkpoints": {},
    }
    for stage, ckpt in checkpoints.items():
        model.load_state_dict(ckpt.pop("state"))
        print(f"{name}: evaluating the {stage} checkpoint", file=sys.stderr)
        ckpt["rows"] = evaluate(model, cands, args, lambda s: print(s, file=sys.stderr, flush=True), timed=timed)
        results["checkpoints"][stage] = ckpt
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate both checkpoints, print the table; returns the results."""
    args = parse_args(argv)
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    shapes = make_shapes(args.train, generator=g), make_shapes(args.eval_samples, generator=g)
    results = run("shapes", *shapes, args, g, timed=True, epochs=(args.early_epoch, args.epochs), batch=args.batch)
    table = render(results, args, env)
    if args.digits:
        (xd, yd), evaluation = load_digits_32(args.seed)
        n = len(xd) if args.digits_train is None else args.digits_train
        epochs = (args.digits_early_epoch, args.digits_epochs)
        digits = (xd[:n], yd[:n])
        results["digits"] = run(
            "digits", digits, evaluation, args, g, timed=False, epochs=epochs, batch=args.digits_batch, cosine=True
        )
        table += "\n\n" + render_digits(results["digits"], args)
    results["wall_seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start
    print(table)
    print(
        f"\ntotal runtime {results['wall_seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU of this process,"
        f" torch threads {torch.get_num_threads()}"
    )
    write_json(args.json, {"config": vars(args), "environment": env, **results})
    if args.plot:
        plot(results, args.plot)
    if args.doc and not replace_between_markers(args.doc, DOC_MARKER, table):
        print(f"warning: no <!-- {DOC_MARKER}:start/end --> markers in {args.doc}; not updated", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
