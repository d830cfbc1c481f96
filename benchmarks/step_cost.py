"""What one MaxUp step costs, next to ERM, its own parts, and the baselines it replaces.

Run from the repository root (one command; prints a table, writes JSON, optionally the plot and the doc table)::

    python benchmarks/step_cost.py --plot docs/step_cost.png --doc docs/benchmarks.md

Every case is one full training step (augment, forward, backward, optimiser step) unless it is a bare selection
forward. All cases run interleaved in one process (see :func:`_common.time_interleaved`), so the ratios to the ERM
step printed here are measured under the same load. Cases:

* ``erm``: ordinary augmented step on ``B`` rows.
* ``selection/{full,low}/m{m}``: the selection forward alone: ``m * B`` already augmented rows, eval mode, no
  gradient, per-sample cross-entropy; ``low`` on the low-resolution view (already downsampled).
* ``maxup/{full,low}/m{m}``: :func:`lightning_maxup.maxup_step` plus backward and optimiser step.
* ``all_grad/m{m}`` (baseline a): one forward of all ``m * B`` copies with gradient, per-sample max, backward.
* ``loop/m{m}`` (baseline b): ``m`` no-grad forwards of ``B`` freshly augmented rows, per-sample arg-max, one
  forward with gradient of the worst copies.
* ``aug_mean/m{m}`` (baseline c): ordinary augmentation averaged over ``m`` copies (the paper's eq. 7), all
  ``m * B`` rows back-propagated.
* ``pgd{k}`` (baseline d): PGD-k adversarial training (Madry et al. 2018), ``k`` input-gradient steps then one
  training step.
* ``trick/{full,low}/...``: the ``m = 4`` selection forward under inference tricks (bf16 autocast,
  ``channels_last``, ``inference_mode``, folded BatchNorm, optionally ``torch.compile``).

The cost model of the paper's Table 7 discussion is ``t_maxup ≈ t_erm + t_selection``; ``cost_model`` in the
output is ``t_maxup / (t_erm + t_selection)`` for the same ``m`` and resolution.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_maxup.augment import Compose, Cutout, RandomCrop, RandomHorizontalFlip
from lightning_maxup.core._state import preserved as selection_context
from lightning_maxup.core.batch import expand_copies, gather_rows
from lightning_maxup.core.functional import maxup_step, select_worst
from lightning_maxup.core.views import downsample_view

try:  # `python benchmarks/step_cost.py` puts benchmarks/ on sys.path; `python -m benchmarks.step_cost` does not
    from _common import environment, markdown_table, replace_between_markers, time_call, time_interleaved, write_json
except ImportError:  # pragma: no cover
    from benchmarks._common import (  # type: ignore[no-redef]
        environment,
        markdown_table,
        replace_between_markers,
        time_call,
        time_interleaved,
        write_json,
    )

DOC_MARKER = "step-cost-table"
PROFILE_MARKER = "step-cost-profile"

# name: (image side, low-resolution side, classes, batch)
MODEL_DEFAULTS: dict[str, tuple[int, int, int, int]] = {
    "resnet20": (32, 16, 10, 128),
    "resnet18": (224, 96, 1000, 128),
    "resnet50": (224, 96, 1000, 128),
    "small": (16, 8, 10, 16),
}
SUPPORTS_FAST_SELECTION = "selection_dtype" in inspect.signature(maxup_step).parameters
# The selection-forward options that pay off on a CPU with AVX-512 BF16 / AMX (see the trick table).
FAST_SELECTION: dict[str, Any] = {"selection_dtype": torch.bfloat16, "selection_memory_format": torch.channels_last}


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        # Option-A shortcut of He et al. (2016): subsample and zero-pad channels, no parameters.
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


def resnet20(num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-20 of He et al. (2016), section 4.2: 3 stages x 3 basic blocks, 16/32/64 channels."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    c_in = 16
    for c_out, stride in ((16, 1), (32, 2), (64, 2)):
        for k in range(3):
            layers.append(_BasicBlock(c_in, c_out, stride if k == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, num_classes: int) -> nn.Module:
    """One of :data:`MODEL_DEFAULTS`' networks."""
    if name == "resnet20":
        return resnet20(num_classes)
    if name in ("resnet18", "resnet50"):
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes)
    if name == "small":
        from lightning_maxup.recipes.models import SmallCNN

        return SmallCNN(3, num_classes, width=8)
    raise ValueError(f"Expected `--model` to be one of {sorted(MODEL_DEFAULTS)}, got {name!r}")


# --------------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------------
class Workload:
    """One model, optimiser, batch and augmentation shared by every case, so all cases do comparable work."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.b, self.size, self.low = args.batch, args.size, args.low_size
        torch.manual_seed(0)
        self.model = build_model(args.model, args.num_classes).to(self.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # A small learning rate keeps random-label training finite for hundreds of steps.
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.x = torch.randn(self.b, 3, self.size, self.size, device=self.device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, args.num_classes, (self.b,), device=self.device)
        self.gen = torch.Generator(self.device).manual_seed(0)
        self.augment = Compose(
            [RandomCrop(self.size, padding=self.size // 8), RandomHorizontalFlip(), Cutout(self.size // 2)]
        )
        self.pgd_steps = args.pgd_steps
        self.chunk = args.chunk_size
        self.clock = args.clock

    # --- helpers --------------------------------------------------------------------------------------------------
    def loss_fn(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1], reduction="none")

    def _train(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def candidates(self, m: int, low: bool) -> tuple[Tensor, Tensor]:
        cand = self.augment(expand_copies((self.x, self.y), m), generator=self.gen)
        return downsample_view(cand, self.low) if low else cand

    # --- cases ----------------------------------------------------------------------------------------------------
    def preserve(self) -> None:
        """What leaving the model untouched costs per step: snapshot and restore, with no forward inside."""
        with torch.no_grad(), selection_context(self.model, "eval"):
            pass

    def erm(self) -> None:
        x, y = self.augment((self.x, self.y), generator=self.gen)
        self._train(F.cross_entropy(self.model(x), y))

    def selection(self, m: int, low: bool, fast: bool = False) -> Callable[[], object]:
        return self.selection_on(self.candidates(m, low), fast)

    def selection_on(self, view: tuple[Tensor, Tensor], fast: bool = False) -> Callable[[], Tensor]:
        x, y = view
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if fast else nullcontext()

        step = self.chunk or x.shape[0]

        def run() -> Tensor:
            out = []
            with torch.no_grad(), selection_context(self.model, "eval"), amp:
                for lo in range(0, x.shape[0], step):
                    # As maxup_step(selection_memory_format=channels_last) does, the layout change is timed too.
                    inp = x[lo : lo + step].contiguous(memory_format=torch.channels_last) if fast else x[lo : lo + step]
                    out.append(F.cross_entropy(self.model(inp), y[lo : lo + step], reduction="none").float())
            return torch.cat(out)

        return run

    def maxup(self, m: int, low: bool, fast: bool = False) -> Callable[[], object]:
        kwargs: dict[str, Any] = {"selection_size": self.low if low else None, "chunk_size": self.chunk}
        if fast:
            kwargs.update(FAST_SELECTION)

        def run() -> None:
            out = maxup_step(
                self.loss_fn,
                (self.x, self.y),
                augment=self.augment,
                m=m,
                generator=self.gen,
                model=self.model,
                **kwargs,
            )
            self._train(out.loss)

        return run

    def all_grad(self, m: int, reduce: str) -> Callable[[], object]:
        def run() -> None:
            x, y = self.augment(expand_copies((self.x, self.y), m), generator=self.gen)
            losses = F.cross_entropy(self.model(x), y, reduction="none").view(m, self.b)
            self._train(losses.amax(0).mean() if reduce == "max" else losses.mean())

        return run

    def loop(self, m: int) -> Callable[[], object]:
        def run() -> None:
            xs, ys, losses = [], [], []
            with torch.no_grad(), selection_context(self.model, "eval"):
                for _ in range(m):
                    x, y = self.augment((self.x, self.y), generator=self.gen)
                    xs.append(x)
                    ys.append(y)
                    losses.append(F.cross_entropy(self.model(x), y, reduction="none"))
            worst = torch.stack(losses).argmax(0)
            rows = torch.arange(self.b, device=self.device)
            x, y = torch.stack(xs)[worst, rows], torch.stack(ys)[worst, rows]
            self._train(F.cross_entropy(self.model(x), y))

        return run

    def pgd(self) -> None:
        eps, alpha = 8 / 255, 2 / 255
        x, y = self.augment((self.x, self.y), generator=self.gen)
        delta = torch.empty_like(x).uniform_(-eps, eps, generator=self.gen).requires_grad_(True)
        with selection_context(self.model, "eval"):
            for _ in range(self.pgd_steps):
                (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x + delta), y), delta)
                delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps).requires_grad_(True)
        self._train(F.cross_entropy(self.model(x + delta.detach()), y))

    def tricks(self, m: int, low: bool, use_compile: bool) -> dict[str, Callable[[], object]]:
        """The selection forward under inference tricks; each variant does the same work on the same rows."""
        x, y = self.candidates(m, low)
        dev = self.device.type
        model_cl = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def plain(model: nn.Module, inp: Tensor, ctx: Callable[[], Any] = torch.no_grad) -> Callable[[], object]:
            def run() -> Tensor:
                with ctx(), selection_context(model, "eval"):
                    return F.cross_entropy(model(inp), y, reduction="none")

            return run

        def bf16() -> Any:
            return _stack(torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16))

        def folded(dtype: torch.dtype | None) -> Callable[[], object]:
            from torch.fx.experimental.optimization import fuse

            def run() -> Tensor:
                # Weights change every step, so the fold is redone (and timed) every step.
                with torch.no_grad(), selection_context(self.model, "eval"):
                    fused = fuse(self.model)
                    with torch.autocast(dev, dtype=dtype) if dtype is not None else nullcontext():
                        return F.cross_entropy(fused(x), y, reduction="none")

            return run

        def cl_input(ctx: Callable[[], Any]) -> Callable[[], object]:
            def run() -> Tensor:
                with ctx(), selection_context(self.model, "eval"):
                    return F.cross_entropy(
                        self.model(x.contiguous(memory_format=torch.channels_last)), y, reduction="none"
                    )

            return run

        out = {
            "no_grad fp32 (default)": plain(self.model, x),
            "inference_mode fp32": plain(self.model, x, torch.inference_mode),
            "bf16 autocast": plain(self.model, x, bf16),
            "channels_last input fp32": cl_input(torch.no_grad),
            "channels_last input + bf16 (fast selection)": cl_input(bf16),
            "channels_last model fp32": plain(model_cl, x_cl),
            "channels_last model + bf16": plain(model_cl, x_cl, bf16),
            "folded BN fp32": folded(None),
            "folded BN + bf16": folded(torch.bfloat16),
        }
        if self.chunk and self.chunk < x.shape[0]:
            out[f"chunks of {self.chunk} rows fp32"] = self.selection_on((x, y))
            out[f"chunks of {self.chunk} rows + channels_last input + bf16"] = self.selection_on((x, y), True)
        if use_compile:
            compiled: Any = torch.compile(copy.deepcopy(self.model).eval())

            def run_compiled() -> Tensor:
                compiled.load_state_dict(self.model.state_dict())  # keep in step with the trained weights
                with torch.no_grad():
                    return F.cross_entropy(compiled(x), y, reduction="none")

            out["torch.compile fp32"] = run_compiled
        return out


class _stack:  # noqa: N801 - used like a context-manager function
    def __init__(self, *ctxs: Any) -> None:
        self.ctxs = ctxs

    def __enter__(self) -> None:
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


# --------------------------------------------------------------------------------------------------------------------
# Where the time goes
# --------------------------------------------------------------------------------------------------------------------
def profile_phases(w: Workload, m: int, low: bool, fast: bool, repeats: int) -> dict[str, float]:
    """Median seconds of each phase of one MaxUp step, run phase by phase as :func:`maxup_step` runs them.

    ``erm/*`` phases are the ERM step's; the MaxUp phases that ERM plus a bare selection forward do not have are
    ``expand``, the extra ``(m - 1) * B`` rows of ``augment``, ``downsample`` and ``select+gather``.
    """
    dev = w.device
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        box: list[Any] = []
        times.setdefault(name, []).append(time_call(lambda: box.append(fn()), dev, w.clock))
        return box[0]

    for _ in range(repeats + 1):
        x, y = timed("erm/augment B", lambda: w.augment((w.x, w.y), generator=w.gen))
        loss = timed("erm/forward", lambda: F.cross_entropy(w.model(x), y))  # noqa: B023
        w.opt.zero_grad(set_to_none=True)
        timed("erm/backward", loss.backward)
        timed("erm/optimizer", w.opt.step)

        big = timed("maxup/expand", lambda: expand_copies((w.x, w.y), m))
        cand = timed("maxup/augment m*B", lambda: w.augment(big, generator=w.gen))  # noqa: B023
        view = timed("maxup/downsample", lambda: downsample_view(cand, w.low)) if low else cand  # noqa: B023

        losses = timed("maxup/selection forward", w.selection_on(view, fast))

        def pick(losses: Tensor = losses, cand: Any = cand) -> Any:
            if not bool(torch.isfinite(losses).all()):
                raise FloatingPointError("non-finite candidate loss")
            return gather_rows(cand, select_worst(losses, w.b)[1])

        worst = timed("maxup/check+select+gather", pick)
        loss = timed("maxup/gradient forward", lambda: F.cross_entropy(w.model(worst[0]), worst[1]))  # noqa: B023
        w.opt.zero_grad(set_to_none=True)
        timed("maxup/backward", loss.backward)
        timed("maxup/optimizer", w.opt.step)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def profile_ops(w: Workload, m: int, low: bool, fast: bool, steps: int = 3, top: int = 12) -> list[dict[str, Any]]:
    """torch.profiler's operators by self time over ``steps`` MaxUp steps (after one untimed step)."""
    from torch.profiler import ProfilerActivity, profile

    step = w.maxup(m, low, fast)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if w.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    use_cuda = w.device.type == "cuda"
    key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        {
            "op": e.key,
            "self_ms_per_step": getattr(e, key) / 1000 / steps,
            "share": getattr(e, key) / total,
            "calls_per_step": e.count / steps,
        }
        for e in rows
    ]


def render_profile(phases: dict[str, float], ops: list[dict[str, Any]], label: str) -> str:
    erm = sum(v for k, v in phases.items() if k.startswith("erm/"))
    mx = sum(v for k, v in phases.items() if k.startswith("maxup/"))
    extra = sum(phases.get(k, 0.0) for k in ("maxup/expand", "maxup/downsample", "maxup/check+select+gather"))
    extra += phases["maxup/augment m*B"] - phases["erm/augment B"]
    sel = phases["maxup/selection forward"]
    rows = [[k, f"{1000 * v:.1f}", f"{100 * v / mx:.1f}%" if k.startswith("maxup/") else ""] for k, v in phases.items()]
    lines = [
        f"Phases of one {label} step (medians; ms; share of the MaxUp step). Sum of MaxUp phases {1000 * mx:.1f} ms"
        f" = {mx / (erm + sel):.3f} x (ERM phases {1000 * erm:.1f} ms + selection forward {1000 * sel:.1f} ms);"
        f" overhead outside the cost model (expand, extra augmentation rows, downsample, select+gather):"
        f" {1000 * extra:.1f} ms = {100 * extra / (erm + sel):.1f}% of ERM + selection.",
        "",
        markdown_table(["phase", "ms", "share"], rows),
    ]
    if ops:
        lines += [
            "",
            "Top operators by self time (torch.profiler):",
            "",
            markdown_table(
                ["op", "ms/step", "share", "calls/step"],
                [
                    [o["op"], f"{o['self_ms_per_step']:.1f}", f"{100 * o['share']:.1f}%", f"{o['calls_per_step']:.0f}"]
                    for o in ops
                ],
            ),
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
def build_cases(w: Workload, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {"erm": w.erm, "state/preserve": w.preserve}
    for m in args.ms:
        if m == 1:
            cases["maxup/full/m1"] = w.maxup(1, low=False)  # no selection pass at m = 1: low == full
            continue
        for res in ("full", "low"):
            low = res == "low"
            cases[f"selection/{res}/m{m}"] = w.selection(m, low)
            cases[f"maxup/{res}/m{m}"] = w.maxup(m, low)
            if args.fast_selection:
                cases[f"selection/{res}/m{m}/fast"] = w.selection(m, low, fast=True)
                cases[f"maxup/{res}/m{m}/fast"] = w.maxup(m, low, fast=True)
        if not args.no_baselines:
            cases[f"all_grad/m{m}"] = w.all_grad(m, "max")
            cases[f"loop/m{m}"] = w.loop(m)
            cases[f"aug_mean/m{m}"] = w.all_grad(m, "mean")
    if not args.no_baselines and args.pgd_steps > 0:
        cases[f"pgd{args.pgd_steps}"] = w.pgd
    if not args.no_tricks:
        tm = args.trick_m
        for res in ("full", "low"):
            for name, fn in w.tricks(tm, res == "low", args.compile).items():
                cases[f"trick/{res}/m{tm}/{name}"] = fn
    return cases


def summarise(timings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    med = {k: (None if t.skipped else t.median) for k, t in timings.items()}
    erm = med["erm"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    ratios = {k: ratio(v, erm) for k, v in med.items()}
    cost_model: dict[str, float | None] = {}
    for m in args.ms:
        for res in ("full", "low"):
            for suffix in ("", "/fast"):
                if m == 1:
                    continue
                key = f"{res}/m{m}{suffix}"
                sel, mx = med.get(f"selection/{key}"), med.get(f"maxup/{key}")
                if mx is not None and sel is not None and erm is not None:
                    cost_model[key] = mx / (erm + sel)
    tricks: dict[str, dict[str, float | None]] = {}
    for res in ("full", "low"):
        prefix = f"trick/{res}/m{args.trick_m}/"
        base = med.get(prefix + "no_grad fp32 (default)")
        tricks[res] = {k[len(prefix) :]: ratio(v, base) for k, v in med.items() if k.startswith(prefix)}
    return {
        "median_s": med,
        "preserve_share_of_erm": ratio(med.get("state/preserve"), erm),
        "ratio_to_erm": ratios,
        "cost_model": cost_model,
        "trick_speedup": {res: {k: (None if v is None else 1 / v) for k, v in d.items()} for res, d in tricks.items()},
    }


def check_targets(s: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's targets, as (value, limit, met) where the cases ran."""
    r, cm = s["ratio_to_erm"], s["cost_model"]
    out: dict[str, Any] = {}

    def put(name: str, value: float | None, limit: float, cmp: str = "<=") -> None:
        if value is None:
            return
        met = value <= limit if cmp == "<=" else value >= limit
        out[name] = {"value": value, "limit": limit, "met": met}

    put("preserve_share_of_erm", s.get("preserve_share_of_erm"), 0.01)
    if 4 in args.ms:
        put("maxup_m4_cost_model_full", cm.get("full/m4"), 1.05)
        put("maxup_m4_cost_model_low", cm.get("low/m4"), 1.05)
    if 1 in args.ms:
        put("maxup_m1_vs_erm", r.get("maxup/full/m1"), 1.05)
    for m in args.ms:
        if m < 2:
            continue
        mx = r.get(f"maxup/full/m{m}")
        for base in ("all_grad", "loop"):
            b = r.get(f"{base}/m{m}")
            if mx is not None and b is not None:
                put(f"maxup_m{m}_faster_than_{base}", mx / b, 1.0)
    return out


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.2f}×"


def render_table(s: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> str:
    r, cm, med = s["ratio_to_erm"], s["cost_model"], s["median_s"]
    fast = args.fast_selection
    headers = [
        "m",
        "MaxUp",
        "MaxUp low-res",
        "sel. fwd",
        "sel. fwd low-res",
        "(a) all-grad",
        "(b) loop",
        "(c) aug. mean",
        "cost model",
        "cost model low-res",
    ]
    if fast:
        headers += [
            "MaxUp fast-sel",
            "MaxUp low-res fast-sel",
            "sel. fwd fast",
            "sel. fwd low-res fast",
            "cost model fast-sel",
            "cost model low-res fast-sel",
        ]
    rows = []
    for m in args.ms:
        full_m1 = r.get("maxup/full/m1") if m == 1 else None
        row = [
            m,
            fmt_ratio(full_m1 if m == 1 else r.get(f"maxup/full/m{m}")),
            fmt_ratio(full_m1 if m == 1 else r.get(f"maxup/low/m{m}")),
            fmt_ratio(r.get(f"selection/full/m{m}")),
            fmt_ratio(r.get(f"selection/low/m{m}")),
            fmt_ratio(r.get(f"all_grad/m{m}")),
            fmt_ratio(r.get(f"loop/m{m}")),
            fmt_ratio(r.get(f"aug_mean/m{m}")),
            fmt_ratio(cm.get(f"full/m{m}")),
            fmt_ratio(cm.get(f"low/m{m}")),
        ]
        if fast:
            row += [
                fmt_ratio(full_m1 if m == 1 else r.get(f"maxup/full/m{m}/fast")),
                fmt_ratio(full_m1 if m == 1 else r.get(f"maxup/low/m{m}/fast")),
                fmt_ratio(r.get(f"selection/full/m{m}/fast")),
                fmt_ratio(r.get(f"selection/low/m{m}/fast")),
                fmt_ratio(cm.get(f"full/m{m}/fast")),
                fmt_ratio(cm.get(f"low/m{m}/fast")),
            ]
        rows.append(row)
    where = env.get("gpu") or env["cpu"]
    lines = [
        f"{args.model} at {args.size} px (low-res {args.low_size} px), batch {args.batch}, {env['device']} ({where},"
        f" {env['torch_threads']} threads), torch {env['torch']}; medians of {args.repeats} interleaved repeats"
        f" after {args.warmup} warm-up. ERM step = {1000 * med['erm']:.1f} ms; every figure is a ratio to it.",
        "",
        markdown_table(headers, rows),
    ]
    pgd = f"pgd{args.pgd_steps}"
    if r.get(pgd) is not None:
        lines += ["", f"(d) PGD-{args.pgd_steps} adversarial training (independent of m): {fmt_ratio(r[pgd])}."]
    lines += ["", "cost model = t_maxup / (t_erm + t_selection) at the same m and resolution."]
    for res, d in s["trick_speedup"].items():
        if not d:
            continue
        lines += [
            "",
            f"Selection forward at m={args.trick_m}, {'full' if res == 'full' else 'low'} resolution"
            f" ({args.size if res == 'full' else args.low_size} px): speed-up over no_grad fp32"
            f" ({1000 * med[f'trick/{res}/m{args.trick_m}/no_grad fp32 (default)']:.1f} ms)",
            "",
            markdown_table(["variant", "speed-up"], [[k, fmt_ratio(v)] for k, v in d.items()]),
        ]
    return "\n".join(lines)


def plot(s: dict[str, Any], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, med = s["ratio_to_erm"], s["median_s"]
    ms = [m for m in args.ms if m >= 2]
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def series(key: str, with_m1: bool = False) -> tuple[list[int], list[float]]:
        pts = [(m, r.get(key.format(m=m))) for m in ms]
        if with_m1 and r.get("maxup/full/m1") is not None:
            pts = [(1, r["maxup/full/m1"]), *pts]
        pts = [(m, v) for m, v in pts if v is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    styles = [
        ("maxup/full/m{m}", "MaxUp", "C0", "-", True),
        ("maxup/low/m{m}", f"MaxUp, {args.low_size} px selection", "C1", "-", True),
        ("maxup/full/m{m}/fast", "MaxUp, bf16 + channels_last selection", "C0", ":", True),
        ("maxup/low/m{m}/fast", f"MaxUp, {args.low_size} px bf16 + channels_last selection", "C1", ":", True),
        ("all_grad/m{m}", "(a) all copies with gradient", "C3", "--", False),
        ("loop/m{m}", "(b) loop of m no-grad forwards", "C2", "--", False),
        ("aug_mean/m{m}", "(c) augmentation averaged over m (eq. 7)", "C4", "--", False),
    ]
    for key, label, color, ls, m1 in styles:
        xs, ys = series(key, m1)
        if xs:
            ax.plot(xs, ys, ls, color=color, marker="o", label=label)
    if med.get("erm"):
        pred = [
            (m, (med["erm"] + med[f"selection/full/m{m}"]) / med["erm"])
            for m in ms
            if med.get(f"selection/full/m{m}") is not None
        ]
        if pred:
            ax.plot(
                [p[0] for p in pred],
                [p[1] for p in pred],
                "-.",
                color="0.5",
                lw=1,
                label="ERM + selection forward (cost model)",
            )
    pgd = r.get(f"pgd{args.pgd_steps}")
    if pgd is not None:
        ax.axhline(pgd, color="C5", ls="--", lw=1, label=f"(d) PGD-{args.pgd_steps} (any m)")
    ax.axhline(1.0, color="k", lw=0.8, label="ERM step")
    ax.set_xlabel("m (augmented copies per sample)")
    ax.set_ylabel("step time / ERM step")
    ax.set_xticks([1, *ms])
    ax.set_title(f"{args.model}, {args.size} px, batch {args.batch}, {args.device}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(MODEL_DEFAULTS))
    p.add_argument("--size", type=int, help="image side (default: the model's: 32 for resnet20, 224 for resnet50)")
    p.add_argument("--low-size", type=int, help="low-resolution selection side (default 16 for 32 px, 96 for 224)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--batch", type=int, help="samples per step B (default 128)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 10], help="copies per sample m")
    p.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (median over them)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--pgd-steps", type=int, default=7, help="k of the PGD-k baseline (0: skip)")
    p.add_argument("--trick-m", type=int, default=4, help="m of the selection-forward trick comparison")
    p.add_argument(
        "--fast-selection",
        action=argparse.BooleanOptionalAction,
        default=SUPPORTS_FAST_SELECTION,
        help="also time MaxUp with maxup_step(selection_dtype=bfloat16,\nselection_memory_format=channels_last)",
    )
    p.add_argument("--compile", action="store_true", help="add a torch.compile selection forward to the tricks")
    p.add_argument("--channels-last", action="store_true", help="train the whole model in channels_last")
    p.add_argument("--no-baselines", action="store_true", help="skip baselines (a)-(d)")
    p.add_argument("--no-tricks", action="store_true", help="skip the selection-forward trick comparison")
    p.add_argument(
        "--chunk-size",
        type=int,
        help="rows per selection forward, for MaxUp and the bare selection forward alike\n"
        "(default: the batch size on CPU, where large batches fall out of cache; all m*B rows on CUDA; 0: all rows)",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall: elapsed time (CUDA events on CUDA); process: this process's CPU seconds, robust to other\n"
        "jobs on a shared CPU (use with --threads 1)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="m in {1, 2, 4}, 3 repeats, 1 warm-up: a minute on a CPU")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the timings, break one m=--trick-m step into phases and list torch.profiler's\n"
        "top operators (full and low resolution)",
    )
    p.add_argument("--json", default="benchmarks/results/step_cost.json", help="where to write the JSON results")
    p.add_argument("--plot", help="write the step-cost-vs-m plot here (PNG)")
    p.add_argument("--doc", help=f"replace the table between <!-- {DOC_MARKER}:start/end --> markers in this file")
    args = p.parse_args(argv)
    size, low, classes, batch = MODEL_DEFAULTS[args.model]
    args.size = args.size or size
    args.low_size = args.low_size or (low if args.size == size else max(1, args.size // 2))
    args.num_classes = args.num_classes or classes
    args.batch = args.batch or batch
    if args.quick:
        args.ms = [m for m in args.ms if m <= 4] or [1, 2]
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    args.ms = sorted(set(args.ms))
    if args.chunk_size is None:
        args.chunk_size = args.batch if args.device == "cpu" else 0
    args.chunk_size = args.chunk_size or None
    if args.clock == "process" and args.device != "cpu":
        p.error("`--clock process` measures CPU time; use `--clock wall` on CUDA")
    if any(m < 1 for m in args.ms):
        p.error(f"`--ms` must be positive integers, got {args.ms}")
    if args.fast_selection and not SUPPORTS_FAST_SELECTION:
        p.error("`--fast-selection` needs maxup_step(selection_dtype=...), which this lightning_maxup lacks")
    if args.trick_m < 2:
        p.error(f"`--trick-m` must be at least 2, got {args.trick_m}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    env = environment(args.device)
    w = Workload(args)
    cases = build_cases(w, args)
    print(f"{len(cases)} cases, {args.warmup} warm-up + {args.repeats} timed rounds", file=sys.stderr)
    start = time.perf_counter()
    timings = time_interleaved(
        cases,
        device=w.device,
        repeats=args.repeats,
        warmup=args.warmup,
        clock=args.clock,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    s = summarise(timings, args)
    targets = check_targets(s, args)
    table = render_table(s, args, env)
    print(table)
    print("\ntargets:")
    for name, t in targets.items():
        print(f"  {name}: {t['value']:.3f} (limit {t['limit']}) {'met' if t['met'] else 'MISSED'}")
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "doc")},
        "environment": env,
        "wall_seconds": time.perf_counter() - start,
        "timings": {k: t.to_dict() for k, t in timings.items()},
        **s,
        "targets": targets,
        "table_markdown": table,
    }
    write_json(args.json, payload)
    if args.plot:
        plot(s, args, args.plot)
    if args.doc and not replace_between_markers(args.doc, DOC_MARKER, table):
        print(f"no <!-- {DOC_MARKER}:start/end --> markers in {args.doc}; table not written", file=sys.stderr)
    if args.profile:
        texts, payload["profile"] = [], {}
        for res in ("full", "low"):
            label = f"m={args.trick_m} MaxUp ({args.size if res == 'full' else args.low_size} px selection)"
            phases = profile_phases(w, args.trick_m, res == "low", False, args.repeats)
            ops = profile_ops(w, args.trick_m, res == "low", False)
            payload["profile"][res] = {"phases_s": phases, "ops": ops}
            texts.append(render_profile(phases, ops, label))
        text = "\n\n".join(texts)
        payload["profile_markdown"] = text
        print("\n" + text)
        write_json(args.json, payload)
        if args.doc and not replace_between_markers(args.doc, PROFILE_MARKER, text):
            print(f"no <!-- {PROFILE_MARKER}:start/end --> markers in {args.doc}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
