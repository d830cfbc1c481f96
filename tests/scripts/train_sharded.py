"""One rank of ``tests/guarantees/test_sharded.py``: MaxUp on a model sharded with FSDP2 (``fully_shard``), 2 CPU
ranks, gloo.

The test starts this script once per rank with a torchrun-style environment (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``NODE_RANK``, ``LOCAL_RANK``), so Lightning launches nothing itself. The phases run in order and
each writes ``<out>/<phase>_rank<r>.pt`` (tensors and plain lists, loadable with ``weights_only=True``) before
the next starts, so a phase that fails or hangs leaves the earlier phases' results:

``twin``
    Without Lightning: two identical sharded models train two steps on the same batches; only the first runs
    MaxUp's selection pass (``selection_losses``) before each gradient forward, in ``"eval"`` and ``"train"``
    mode. Saved: the full (gathered) parameters and the buffers of both, and of the first before and after each
    selection pass, with the warnings of the selection passes. Then a model whose forward writes a weight
    without gradient runs one selection pass: its warnings are saved too.
``fit``
    ``Trainer(strategy=ModelParallelStrategy(...))``, 3 epochs of 4 steps: a warm-up epoch (``m = 1``), then
    MaxUp with ``m = 4`` and ``chunk_size = 8`` selecting in ``"eval"`` (epoch 1) and ``"train"`` mode (epoch 2).
    The ranks' batches are uneven (rank 0: 8, 8, 8, 6 rows; rank 1: 6, 8, 8, 8). Saved: the selection forwards
    of every step (counted by a forward pre-hook on the network while gradient is disabled; the first step's
    count includes the pre-flight check), every step's ``m`` and mode, the warnings of the whole fit, the
    buffers at the start and at every epoch's end, and the final parameters (gathered) and buffers. A
    distributed checkpoint is saved at the end of every epoch.
``resume``
    A fresh module and Trainer resume from the checkpoint of epoch 1 and train epoch 2; saved like ``fit``.
"""

from __future__ import annotations

import argparse
import os
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUp, MaxUpConfig, MaxUpMixin
from lightning_maxup.augment import GaussianNoise
from lightning_maxup.core.functional import selection_losses

FEATURES, CLASSES, WIDTH = 4, 3, 8
#: Rows of each batch, per rank: rank 1's first batch is the short one, so only an agreed count is equal.
BATCHES = ((8, 8, 8, 6), (6, 8, 8, 8))
M, CHUNK = 4, 8
MODES = ("eval", "eval", "train")  # selection mode per epoch; epoch 0 is the warm-up (m = 1)


class WritingLinear(nn.Linear):
    """A linear layer whose forward writes its weight (in place, by one) when ``write`` is set."""

    write = False

    def forward(self, x: Tensor) -> Tensor:
        if self.write:
            with torch.no_grad():
                self.weight.add_(1.0)
        return super().forward(x)


class Net(nn.Module):
    """A sharded unit holding a BatchNorm (``block``), and a head that belongs to the root unit."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Dropout(dropout)
        )  # fmt: skip
        self.head = WritingLinear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


def shard(net: Net, mesh: Any) -> Net:
    """FSDP2 as Lightning's docs apply it: each unit, then the network's root."""
    fully_shard(net.block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def make_data(rank: int) -> tuple[Tensor, Tensor]:
    """This rank's samples (the same in every process): ``sum(BATCHES[rank])`` rows."""
    g = torch.Generator().manual_seed(0)
    n = [sum(b) for b in BATCHES]
    x, y = torch.randn(sum(n), FEATURES, generator=g), torch.randint(0, CLASSES, (sum(n),), generator=g)
    start = sum(n[:rank])
    return x[start : start + n[rank]], y[start : start + n[rank]]


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter as a full tensor (gathered from the shards: a collective) and every buffer, cloned."""
    state = {}
    for name, p in module.named_parameters():
        state[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    for name, b in module.named_buffers():
        state[name] = b.detach().clone()
    return state


def warning_records(caught: list[warnings.WarningMessage]) -> list[list[str]]:
    return [[w.category.__name__, str(w.message), w.filename] for w in caught]


class LitSharded(MaxUpMixin, pl.LightningModule):
    """A MaxUp module sharded in ``configure_model``, recording each step's selection forwards, ``m`` and mode."""

    def __init__(self) -> None:
        super().__init__(m=M, augment=GaussianNoise(0.3), chunk_size=CHUNK)
        torch.manual_seed(0)
        self.net = Net()
        self.net.register_forward_pre_hook(self._count_selection_forward)
        self.selection_forwards: list[int] = []
        self.steps: list[list[Any]] = []
        self.buffers_at_start: dict[str, Tensor] = {}
        self.buffers_at_epoch_end: list[dict[str, Tensor]] = []

    def _count_selection_forward(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            self.selection_forwards[-1] += 1

    def configure_model(self) -> None:
        if not isinstance(self.net, FSDPModule):
            shard(self.net, self.device_mesh["data_parallel"])

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def on_train_start(self) -> None:
        self.buffers_at_start = {name: b.detach().clone() for name, b in self.named_buffers()}

    def on_train_epoch_end(self) -> None:
        self.buffers_at_epoch_end.append({name: b.detach().clone() for name, b in self.named_buffers()})

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        self.selection_forwards.append(0)
        return super().on_train_batch_start(batch, batch_idx)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.maxup_step(batch)
        self.steps.append([out.m, self.maxup_selection_mode, int(batch[0].shape[0])])
        return out.loss

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        x, y = make_data(rank)
        bounds = torch.tensor((0, *BATCHES[rank])).cumsum(0).tolist()
        batches = [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return DataLoader(TensorDataset(x, y), batch_sampler=batches)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class SelectionModeSchedule(Callback):
    """The selection mode of each epoch (``MODES``), derived from the epoch so a resumed run gets it right."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.maxup_config = pl_module.maxup_config.replace(selection_mode=MODES[trainer.current_epoch])


def select(net: nn.Module, candidates: tuple[Tensor, Tensor], cfg: MaxUpConfig, num_chunks: int) -> list[list[str]]:
    """Run MaxUp's selection pass on ``net``; return the warnings it raised."""

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection_losses(loss_fn, candidates, cfg, model=net, num_chunks=num_chunks)
    return warning_records(caught)


def run_twin(rank: int, mesh: Any) -> dict[str, Any]:
    """The selection pass on sharded models against a twin that runs only the gradient forwards."""
    x, y = make_data(rank)
    x, y = x[:8], y[:8]
    record: dict[str, Any] = {}
    for mode in ("eval", "train"):
        torch.manual_seed(0)
        a = shard(Net(dropout=0.25), mesh)
        torch.manual_seed(0)
        b = shard(Net(dropout=0.25), mesh)
        opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
        opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
        cfg = MaxUpConfig(m=M, chunk_size=CHUNK, selection_mode=mode)
        noise = torch.Generator().manual_seed(rank)
        per_step: list[dict[str, Any]] = []
        for _ in range(2):
            candidates = (x.repeat(M, 1) + 0.3 * torch.randn(M * 8, FEATURES, generator=noise), y.repeat(M))
            before = full_state(a)
            caught = select(a, candidates, cfg, num_chunks=M * 8 // CHUNK)
            per_step.append({"before": before, "after": full_state(a), "warnings": caught})
            rng = torch.get_rng_state()  # both gradient forwards must draw the same dropout masks
            for net, opt in ((a, opt_a), (b, opt_b)):
                torch.set_rng_state(rng)
                F.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad()
        record[mode] = {"steps": per_step, "selected": full_state(a), "twin": full_state(b)}
    torch.manual_seed(0)
    writer = shard(Net(), mesh)
    writer.head.write = True
    record["writer_warnings"] = select(writer, (x, y), MaxUpConfig(m=M), num_chunks=1)
    return record


def run_fit(ckpt_dir: Path, resume: Path | None, timeout: int) -> dict[str, Any]:
    model = LitSharded()
    callbacks: list[Callback] = [MaxUp(warmup_epochs=1), SelectionModeSchedule()]
    if resume is None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=timeout)
        ),
        max_epochs=len(MODES),
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=resume is None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=resume)
    return {
        "selection_forwards": model.selection_forwards,
        "steps": model.steps,
        "warnings": warning_records(caught),
        "state": full_state(model),
        "buffers_at_start": model.buffers_at_start,
        "buffers_at_epoch_end": model.buffers_at_epoch_end,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--timeout", type=int, default=60, help="seconds before a stuck collective fails")
    args = parser.parse_args(argv)
    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=args.timeout))
    mesh = init_device_mesh("cpu", (2,))
    phases = {
        "twin": lambda: run_twin(rank, mesh),
        "fit": lambda: run_fit(args.out / "ckpt", None, args.timeout),
        "resume": lambda: run_fit(args.out / "ckpt", args.out / "ckpt" / "epoch=1.ckpt", args.timeout),
    }
    for phase, run in phases.items():
        try:
            torch.save(run(), args.out / f"{phase}_rank{rank}.pt")
        except Exception:
            (args.out / f"{phase}_rank{rank}.error").write_text(traceback.format_exc())
            raise
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
