"""Train a few MaxUp steps with ``strategy="ddp"``, launched by Lightning itself, by torchrun or by hand.

Each rank writes ``<out>/rank<global_rank>.json`` (see ``ddp_common.CollectiveRecorder``). Examples::

    python tests/scripts/train_ddp.py --out /tmp/run --devices 2                       # Lightning launches rank 1
    torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0 --master_addr=127.0.0.1 --master_port=29500 \\
        tests/scripts/train_ddp.py --out /tmp/run --num-nodes 2 --devices 1             # one "node" of two
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
from ddp_common import CollectiveRecorder, LitDDP  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy  # noqa: E402

from lightning_maxup import MaxUp  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--selection-size", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=60, help="seconds before a stuck collective fails")
    parser.add_argument("--no-seed-everything", action="store_true", help="leave every process its own seed")
    parser.add_argument("--ckpt-dir", default=None, help="save a checkpoint at the end of every epoch here")
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    args = parser.parse_args(argv)

    if not args.no_seed_everything:
        pl.seed_everything(0, workers=True)
    model = LitDDP(norm="bn", n=64, batch_size=8, m=4)
    extra: list[pl.Callback] = []
    if args.ckpt_dir is not None:
        extra.append(ModelCheckpoint(dirpath=args.ckpt_dir, filename="{epoch}", save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=DDPStrategy(timeout=timedelta(seconds=args.timeout)),
        max_epochs=args.epochs,
        callbacks=[
            MaxUp(warmup_epochs=args.warmup_epochs, selection_size=args.selection_size),
            CollectiveRecorder(args.out),
            *extra,
        ],
        logger=False,
        enable_checkpointing=args.ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
