"""Top-level (picklable) pieces shared by the DDP, multi-node and world-size tests and their launch scripts.

Spawned and launched ranks import this module by name, so everything here lives at module level. Each rank
writes what it saw to ``<out_dir>/rank<global_rank>.json``; the tests compare the files.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_maxup.core.functional as maxup_functional
from lightning_maxup import MaxUpMixin
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.data.datasets import IndexedDataset

# The torch.distributed collectives that user-level code (SyncBatchNorm, metrics, Lightning) can call.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)

#: DDP gradient all-reduces seen by :func:`counting_allreduce_hook` in this process.
HOOK_CALLS = 0
_IN_HOOK = False


def counting_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce communication hook, counting its calls (one per gradient bucket and step).

    No annotations: DDP checks them against the real classes, and this module's annotations are strings.
    """
    global HOOK_CALLS, _IN_HOOK
    HOOK_CALLS += 1
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    _IN_HOOK = True  # the default hook calls dist.all_reduce: count it as DDP's, not as the step's
    try:
        return allreduce_hook(state, bucket)
    finally:
        _IN_HOOK = False


class GlooSyncBatchNorm2d(nn.BatchNorm2d):
    """CPU stand-in for ``nn.SyncBatchNorm`` (whose training forward needs CUDA) with the same collective pattern.

    Every training-mode forward makes exactly one collective over the world (an all-reduce of per-channel sums,
    squared sums and the count; empty inputs take part with zeros, as in ``SyncBatchNorm``), normalises with the
    global statistics and updates the running statistics with them. Eval mode uses running statistics and
    communicates nothing. Gradients flow through the normalisation but not through the remote statistics: the
    test needs the communication pattern, not SyncBatchNorm's exact gradient.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xd = x.detach().float()
        count = x.numel() // c if x.numel() else 0
        stats = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), xd.new_tensor([float(count)])])
        dist.all_reduce(stats)
        n = stats[-1].clamp_min(1.0)
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            assert self.running_mean is not None
            assert self.running_var is not None
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            momentum = 0.1 if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1).clamp_min(1.0))
        y = (x - mean[None, :, None, None].to(x.dtype)) / torch.sqrt(var[None, :, None, None] + self.eps).to(x.dtype)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class Net(nn.Module):
    """Two conv blocks, global pooling and a linear head; ``norm`` picks the normalisation (or none)."""

    def __init__(self, norm: str = "bn") -> None:
        super().__init__()
        layers: dict[str, Any] = {"bn": nn.BatchNorm2d, "gloo_sync": GlooSyncBatchNorm2d, "none": None}
        norm_cls = layers[norm]

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), *([norm_cls(cout)] if norm_cls else []), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 8), *block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class RecordingNoise(GaussianNoise):
    """Gaussian noise that remembers a fingerprint of every draw (the first values of the noise tensor)."""

    def __init__(self, sigma: float) -> None:
        super().__init__(sigma)
        self.fingerprints: list[list[float]] = []

    def sample(self, batch: Any, generator: Any = None) -> dict[str, Any]:
        params = super().sample(batch, generator)
        self.fingerprints.append(params["noise"].flatten()[:6].tolist())
        return params


def make_data(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Synthetic 8x8 one-channel images and labels, generated identically in every process."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class LitDDP(MaxUpMixin, pl.LightningModule):
    """A MaxUp module that records, per step, its ``m``, selection forwards and selection input sizes.

    Args:
        norm: Normalisation of :class:`Net`.
        per_rank_samples: Training samples of each rank (its own shard, no distributed sampler): unequal values
            give ranks uneven last batches. ``None`` uses the whole synthetic set with Lightning's sampler.
        batch_size: Samples per batch and rank.
        n: Size of the synthetic training set.
        indexed: Yield ``(x, y, index)`` batches, for ``randomness="sample"``.
        repeats: With ``indexed``, item ``i`` is sample ``i // repeats`` (index included): each sample appears
            ``repeats`` times in a row, and a ``DistributedSampler`` deals the repeats to different ranks, as
            repeated-augmentation samplers do.
        lr: SGD learning rate.
        **maxup: Passed on to :class:`~lightning_maxup.MaxUpMixin`.
    """

    def __init__(
        self,
        norm: str = "bn",
        per_rank_samples: tuple[int, ...] | None = None,
        batch_size: int = 8,
        n: int = 64,
        indexed: bool = False,
        repeats: int = 1,
        lr: float = 0.05,
        **maxup: Any,
    ) -> None:
        maxup.setdefault("augment", RecordingNoise(0.3))
        super().__init__(**maxup)
        torch.manual_seed(0)
        self.net = Net(norm)
        self.per_rank_samples = per_rank_samples
        self.batch_size = batch_size
        self.n = n
        self.indexed = indexed
        self.repeats = repeats
        self.lr = lr
        self.steps: list[dict[str, Any]] = []

    def maxup_preflight(self, batch: Any) -> None:
        self.preflight_forwards = 0
        self._in_preflight = True
        fingerprints = getattr(self.maxup_config.augment, "fingerprints", [])
        before = len(fingerprints)
        try:
            super().maxup_preflight(batch)
        finally:
            self._in_preflight = False
            del fingerprints[before:]  # the pre-flight draws from a throwaway generator, not the run's stream

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        if getattr(self, "_in_preflight", False):
            self.preflight_forwards += 1
        elif not torch.is_grad_enabled():  # the selection pass
            self.steps[-1]["selection_forwards"] += 1
            self.steps[-1]["selection_rows"].append(int(x.shape[0]))
            self.steps[-1]["selection_side"] = int(x.shape[-1])
        return F.cross_entropy(self.net(x), y, reduction="none")

    def maxup_sample_index(self, batch: Any) -> Tensor:
        return batch[-1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps.append({"selection_forwards": 0, "selection_rows": [], "selection_side": None})
        out = self.maxup_step(batch)
        self.steps[-1].update(m=out.m, rows=int(out.losses.shape[0]), mode=self.maxup_selection_mode)
        if self.indexed:
            self.steps[-1].update(index=batch[-1].tolist(), selected=out.selected.tolist())
        return out.loss

    def train_dataloader(self) -> DataLoader:
        x, y = make_data(self.n)
        tensors: tuple[Tensor, ...] = (x, y)
        if self.per_rank_samples is not None:
            rank, counts = self.trainer.global_rank, self.per_rank_samples
            start = sum(counts[:rank])
            tensors = (x[start : start + counts[rank]], y[start : start + counts[rank]])
        ds: Any = TensorDataset(*tensors)
        if self.indexed and self.repeats > 1:
            sample = torch.arange(len(tensors[0])) // self.repeats
            ds = TensorDataset(*(t[sample] for t in tensors), sample)
        elif self.indexed:
            ds = IndexedDataset(ds)
        sampler = None
        if self.per_rank_samples is None and self.trainer.world_size > 1:
            # in order, sample 2j + r to rank r (Lightning's own sampler would shuffle)
            sampler = DistributedSampler(ds, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SelectionModeSchedule(Callback):
    """Set the module's ``maxup_selection_mode`` from a per-epoch list (one run covers both modes)."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.maxup_config = pl_module.maxup_config.replace(selection_mode=self.modes[trainer.current_epoch])


@contextmanager
def _flag(state: dict[str, Any], key: str) -> Any:
    state[key] = True
    try:
        yield
    finally:
        state[key] = False


class CollectiveRecorder(Callback):
    """Counts Python-level ``torch.distributed`` collectives by phase and writes each rank's record to a file.

    Phases: ``selection`` (inside the selection pass of ``maxup_step``), ``step`` (the rest of a training batch
    up to the optimizer step), ``ddp_gradient`` (DDP's gradient all-reduce, which this callback routes through
    :func:`counting_allreduce_hook`) and ``other`` (set-up, epoch ends).

    Args:
        out_dir: Where ``rank<global_rank>.json`` goes.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.state: dict[str, Any] = {"selection": False, "step": False}
        self.counts: dict[str, int] = {"selection": 0, "step": 0, "ddp_gradient": 0, "other": 0}
        self.by_name: dict[str, int] = {}
        self.per_step: list[dict[str, int]] = []
        self._patched: list[tuple[Any, str, Any]] = []
        self.sync_dist_warnings: list[str] = []

    def _record_warning(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if "sync_dist" in str(message):
            self.sync_dist_warnings.append(str(message))
        self._showwarning(message, *args, **kwargs)

    def _phase(self) -> str:
        if _IN_HOOK:
            return "ddp_gradient"
        return "selection" if self.state["selection"] else "step" if self.state["step"] else "other"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning warns (through warnings.warn) when an epoch-level self.log lacks sync_dist under DDP.
        warnings.simplefilter("always")
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._record_warning  # type: ignore[assignment]
        self._patched.append((warnings, "showwarning", self._showwarning))
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue

            @functools.wraps(original)
            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                phase = self._phase()
                self.counts[phase] += 1
                if self.per_step and phase in ("selection", "step"):
                    self.per_step[-1][phase] += 1
                key = f"{phase}:{_original.__name__}"
                self.by_name[key] = self.by_name.get(key, 0) + 1
                return _original(*args, **kwargs)

            self._patched.append((dist, name, original))
            setattr(dist, name, counted)
        original_context = maxup_functional.preserved

        @contextmanager
        def recorded_context(*args: Any, **kwargs: Any) -> Any:
            with _flag(self.state, "selection"), original_context(*args, **kwargs):
                yield

        self._patched.append((maxup_functional, "preserved", original_context))
        maxup_functional.preserved = recorded_context  # type: ignore[assignment]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers DDP communication hooks on CUDA only; count the gradient all-reduce on CPU too.
        ddp = trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.register_comm_hook(None, counting_allreduce_hook)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.state["step"] = True
        self.per_step.append({"selection": 0, "step": 0})

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.state["step"] = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        augment = getattr(pl_module, "maxup_augment", None)
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "collectives": self.counts,
            "collectives_by_name": self.by_name,
            "collectives_per_step": self.per_step,
            "ddp_hook_calls": HOOK_CALLS,
            "steps": getattr(pl_module, "steps", []),
            "preflight_forwards": getattr(pl_module, "preflight_forwards", None),
            "maxup_seed": pl_module.maxup_config.seed if hasattr(pl_module, "maxup_config") else None,
            "sync_dist_warnings": self.sync_dist_warnings,
            "draws": getattr(augment, "fingerprints", []),
            "params": [p.detach().double().flatten().tolist() for p in pl_module.parameters()],
            "buffers": [b.detach().double().flatten().tolist() for b in pl_module.buffers()],
            "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID")},
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def read_ranks(out_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """The records of ranks ``0 .. world_size - 1``."""
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def max_param_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two records' parameters."""
    return max(
        max((abs(u - v) for u, v in zip(pa, pb, strict=True)), default=0.0)
        for pa, pb in zip(a["params"], b["params"], strict=True)
    )
