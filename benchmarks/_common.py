"""Generic timing helpers shared by the benchmark scripts (no MaxUp-specific code here).

Timing on a noisy machine: :func:`time_interleaved` runs every case once per round, in a fresh random order each
round, so load from other processes hits all cases alike and the *ratios* between cases measured in one run stay
meaningful even when absolute times drift. Each case gets its own warm-up rounds first. On CUDA, each call is
timed with CUDA events after a ``torch.cuda.synchronize()``, so queued asynchronous work is neither missed nor
charged to the next case.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "Clock",
    "Timing",
    "environment",
    "is_oom",
    "markdown_table",
    "replace_between_markers",
    "time_call",
    "time_interleaved",
    "write_json",
]


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls of one case.

    Attributes:
        seconds: One entry per timed call (warm-up calls excluded).
        skipped: Why the case did not run (e.g. out of memory); ``None`` if it ran.
    """

    seconds: list[float] = field(default_factory=list)
    skipped: str | None = None

    @property
    def median(self) -> float:
        """Median seconds per call (NaN when skipped)."""
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def iqr(self) -> float:
        """Inter-quartile range of the seconds per call (0 with fewer than two calls)."""
        if len(self.seconds) < 2:
            return 0.0
        q = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q[2] - q[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "median_s": None if self.skipped else self.median,
            "iqr_s": None if self.skipped else self.iqr,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Clock = Literal["wall", "process"]


def time_call(fn: Callable[[], object], device: torch.device | str, clock: Clock = "wall") -> float:
    """Seconds one call of ``fn`` takes on ``device``, synchronised (CUDA events on CUDA, ``perf_counter`` else).

    ``clock="process"`` counts this process's CPU seconds instead (``time.process_time``): on a CPU shared with
    other jobs, and with one torch thread, that is the work the call did, whatever the preemption by other
    processes; with several threads it also counts their spin-waiting. CPU devices only.
    """
    device = torch.device(device)
    if clock not in ("wall", "process"):
        raise ValueError(f"Expected `clock` to be 'wall' or 'process', got {clock!r}")
    if clock == "process":
        if device.type == "cuda":
            raise ValueError("`clock`='process' measures CPU time; time CUDA work with clock='wall'")
        start_s = time.process_time()
        fn()
        return time.process_time() - start_s
    if device.type == "cuda":
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error from any device."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def time_interleaved(
    cases: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str,
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    clock: Clock = "wall",
) -> dict[str, Timing]:
    """Time every case ``repeats`` times, one call of each per round in a shuffled order, after warm-up rounds.

    A case that runs out of memory is marked skipped and not called again; other errors propagate.

    Args:
        cases: Name to zero-argument callable doing one unit of work (e.g. one training step).
        device: Where the work runs; CUDA work is synchronised and timed with CUDA events.
        repeats: Timed rounds.
        warmup: Untimed rounds first (allocator, oneDNN/cuDNN kernel selection, lazy initialisation).
        seed: Seed of the per-round shuffling of the case order.
        progress: Called with a short status line after each round.
        clock: ``"wall"`` or ``"process"`` (CPU seconds of this process), see :func:`time_call`.

    Returns:
        Name to :class:`Timing`, in the order of ``cases``.
    """
    if repeats < 1:
        raise ValueError(f"Expected `repeats` to be a positive integer, got {repeats!r}")
    if warmup < 0:
        raise ValueError(f"Expected `warmup` to be a non-negative integer, got {warmup!r}")
    device = torch.device(device)
    results = {name: Timing() for name in cases}
    order = list(cases)
    rng = random.Random(seed)
    for rnd in range(warmup + repeats):
        rng.shuffle(order)
        round_start = time.perf_counter()
        for name in order:
            timing = results[name]
            if timing.skipped:
                continue
            try:
                seconds = time_call(cases[name], device, clock)
            except (RuntimeError, MemoryError) as err:
                if not is_oom(err):
                    raise
                timing.skipped = "out of memory"
                timing.seconds.clear()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if rnd >= warmup:
                timing.seconds.append(seconds)
        if progress is not None:
            kind = "warm-up" if rnd < warmup else "timed"
            progress(f"round {rnd + 1}/{warmup + repeats} ({kind}) {time.perf_counter() - round_start:.1f} s")
    return results


def environment(device: torch.device | str) -> dict[str, Any]:
    """Versions and hardware worth recording next to timings."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""

    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    body = [[cell(v) for v in row] for row in rows]
    numeric = [all(_looks_numeric(r[j]) for r in body if r[j]) for j in range(len(headers))]
    align = ["---:" if n else ":---" for n in numeric]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _looks_numeric(s: str) -> bool:
    try:
        float(s.rstrip("×x%s").replace("—", "nan"))
    except ValueError:
        return False
    return True


def replace_between_markers(path: str | Path, name: str, text: str) -> bool:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Returns:
        Whether both markers were found (the file is left unchanged otherwise).
    """
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else ""
    i, j = doc.find(start), doc.find(end)
    if i < 0 or j < i:
        return False
    path.write_text(doc[: i + len(start)] + "\n" + text.strip("\n") + "\n" + doc[j:])
    return True


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
