"""A ``torch.compile``-d backbone trains with MaxUp without recompiling at every step.

The selection pass (``m * B`` rows, low resolution, eval mode, no grad) and the gradient forward (``B`` rows, full
resolution, train mode) are different graphs, and the last batch of an epoch is shorter. Dynamo compiles each
path once, marks the changing sizes dynamic on the first recompile (``automatic_dynamic_shapes``), and from then
on reuses its graphs. A counting backend (no Inductor, fast on CPU) counts the compilations.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_maxup import MaxUpMixin
from lightning_maxup.augment import GaussianNoise

COMPILES: list[tuple[tuple[int, ...], ...]] = []


def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A ``torch.compile`` backend that records each compilation's input shapes and runs the graph eagerly."""
    COMPILES.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, Tensor)))
    return gm.forward


class CompiledLit(MaxUpMixin, pl.LightningModule):
    def __init__(self, dynamic: bool | None, **maxup: Any) -> None:
        super().__init__(augment=GaussianNoise(0.2), m=3, **maxup)
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, 10),
        )  # fmt: skip
        self.net = torch.compile(net, backend=counting_backend, dynamic=dynamic)

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1], reduction="none")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(30, 1, 8, 8, generator=g), torch.randint(0, 10, (30,), generator=g))
        return DataLoader(data, batch_size=8)  # batches of 8, 8, 8 and 6 rows

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CompileCounter(Callback):
    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.per_epoch.append(len(COMPILES))


@pytest.mark.parametrize(
    ("dynamic", "maxup", "budget"),
    [
        pytest.param(None, {}, 4, id="automatic-dynamic"),
        pytest.param(None, {"selection_size": 4, "chunk_size": 8}, 5, id="automatic-dynamic-lowres-chunked"),
        pytest.param(True, {"selection_size": 4}, 2, id="dynamic"),
    ],
)
def test_compiled_model_does_not_recompile_every_step(dynamic: bool | None, maxup: dict[str, Any], budget: int) -> None:
    torch._dynamo.reset()
    COMPILES.clear()
    counter = CompileCounter()
    pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, callbacks=[counter], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(CompiledLit(dynamic, **maxup))  # fmt: skip
    # 12 steps, each with a selection and a gradient forward; all compilation happens in the first epoch
    assert counter.per_epoch[0] == counter.per_epoch[1] == counter.per_epoch[2], (counter.per_epoch, COMPILES)
    assert 2 <= len(COMPILES) <= budget, COMPILES
    assert len(COMPILES) < torch._dynamo.config.recompile_limit, "hit the recompile limit: fell back to eager"
