"""MaxUp under DDP on CPU (gloo): ``ddp_spawn`` in the test process and ``ddp`` from a launched script.

What the tests pin down: parameters stay identical across ranks; ranks draw different augmentations; the
selection pass makes no collective call of its own (DDP's gradient all-reduce is the only communication of a
step); under a SyncBatchNorm-like layer every rank makes the same number of selection forwards, also on an
uneven last batch. ``nn.SyncBatchNorm`` cannot run its training forward on CPU, so
``ddp_common.GlooSyncBatchNorm2d`` stands in with the same collective pattern (one collective per training-mode
forward, none in eval mode).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from ddp_common import CollectiveRecorder, LitDDP, SelectionModeSchedule, max_param_diff, read_ranks  # noqa: E402

from lightning_maxup import MaxUp  # noqa: E402

TIMEOUT = timedelta(seconds=60)  # a mismatched collective fails after this instead of hanging the suite


def _spawn_fit(model: pl.LightningModule, out: Path, callbacks: list[Any], **trainer: Any) -> list[dict[str, Any]]:
    trainer.setdefault("max_epochs", 1)
    pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="spawn", timeout=TIMEOUT),
        callbacks=[*callbacks, CollectiveRecorder(str(out))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer,
    ).fit(model)
    return read_ranks(out, 2)


def _check_identical_params(ranks: list[dict[str, Any]]) -> None:
    diff = max_param_diff(ranks[0], ranks[1])
    assert diff == 0.0, f"parameters differ across ranks by up to {diff:.3g}"


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
@pytest.mark.usefixtures("file_system_sharing")
def test_ddp_spawn_warmup_lowres_selection(tmp_path: Path) -> None:
    """Warm-up epoch (m=1), then MaxUp m=4 selecting at 4x4: identical parameters, rank-distinct draws, and no
    collective from the selection pass; the only communication in a step is DDP's gradient all-reduce."""
    model = LitDDP(norm="bn", n=64, batch_size=8, m=4)
    ranks = _spawn_fit(model, tmp_path, [MaxUp(warmup_epochs=1, selection_size=4)], max_epochs=2)

    _check_identical_params(ranks)
    steps_per_epoch = 64 // (2 * 8)
    for r in ranks:
        assert r["world_size"] == 2
        assert [s["m"] for s in r["steps"]] == [1] * steps_per_epoch + [4] * steps_per_epoch
        maxup_steps = r["steps"][steps_per_epoch:]
        assert all(s["selection_forwards"] == 1 and s["selection_side"] == 4 for s in maxup_steps), maxup_steps
        assert all(s["selection_forwards"] == 0 for s in r["steps"][:steps_per_epoch])
        assert r["collectives"]["selection"] == 0, r["collectives"]
        # The first step of a fit broadcasts rank 0's seed (once per fit, inside the step since 0.3, so that no
        # hook override can skip it); no later step communicates outside DDP's gradient all-reduce.
        per_step = r["collectives_per_step"]
        assert all(c["step"] == 0 for c in per_step[1:]), per_step
        assert 1 <= per_step[0]["step"] <= 2, per_step[0]
        assert r["ddp_hook_calls"] >= 2 * steps_per_epoch, "DDP's gradient all-reduce should run every step"
        assert r["collectives"]["ddp_gradient"] == r["ddp_hook_calls"]
    draws0, draws1 = ranks[0]["draws"], ranks[1]["draws"]
    assert len(draws0) == len(draws1) == 2 * steps_per_epoch
    assert all(a != b for a, b in zip(draws0, draws1, strict=True)), "ranks drew identical augmentations"


@pytest.mark.flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])  # gloo teardown abort, conftest.py
@pytest.mark.slow
@pytest.mark.usefixtures("file_system_sharing")
def test_ddp_spawn_sync_batchnorm_uneven_last_batch(tmp_path: Path) -> None:
    """Ranks hold 20 and 18 samples (last batches of 4 and 2 rows), under a SyncBatchNorm-like layer.

    Epoch 0 selects in "train" mode, where every selection forward is a collective: both ranks must make
    ceil(m * B / chunk_size) forwards on every step, the short last batch included. Epoch 1 selects in "eval"
    mode: the selection pass communicates nothing.
    """
    m, batch, chunk = 4, 8, 8
    model = LitDDP(norm="gloo_sync", per_rank_samples=(20, 18), batch_size=batch, m=m, chunk_size=chunk)
    ranks = _spawn_fit(
        model, tmp_path, [SelectionModeSchedule(["train", "eval"])], max_epochs=2, use_distributed_sampler=False
    )

    _check_identical_params(ranks)
    rows = [[s["rows"] for s in r["steps"]] for r in ranks]
    assert rows == [[8, 8, 4] * 2, [8, 8, 2] * 2], rows
    forwards = [[s["selection_forwards"] for s in r["steps"]] for r in ranks]
    # Both modes: ceil(m * B / chunk) forwards on every step and rank, the short last batches (4 and 2 rows)
    # included, since under FSDP or ZeRO-3 even an eval-mode forward is a collective.
    assert forwards[0] == forwards[1] == [math.ceil(m * batch / chunk)] * 6, forwards
    assert [r["preflight_forwards"] for r in ranks] == [math.ceil(m * batch / chunk)] * 2
    per_step = [r["collectives_per_step"] for r in ranks]
    assert per_step[0] == per_step[1], per_step
    norm_layers = 2
    for r in ranks:
        train_steps, eval_steps = r["steps"][:3], r["steps"][3:]
        assert all(s["mode"] == "train" for s in train_steps)
        assert all(s["mode"] == "eval" for s in eval_steps)
        assert [s["selection_forwards"] for s in train_steps] == [math.ceil(m * batch / chunk)] * 3
        assert all(max(s["selection_rows"]) <= chunk for s in r["steps"])
        for i, (s, c) in enumerate(zip(r["steps"], r["collectives_per_step"], strict=True)):
            # the first step also runs the pre-flight check: the selection pass's own forwards, once more
            forwards = s["selection_forwards"] + (r["preflight_forwards"] if i == 0 else 0)
            expected = norm_layers * forwards if s["mode"] == "train" else 0
            assert c["selection"] == expected, (s, c)
            if i == 0:  # plus, once per fit: the seed broadcast and the agreed selection rows (an all-reduce)
                assert norm_layers + 2 <= c["step"] <= norm_layers + 4, c
            else:
                assert c["step"] == norm_layers, "the gradient forward syncs each normalisation layer once"
    # running statistics moved only in the (synchronised) gradient forwards, identically on both ranks
    assert ranks[0]["buffers"] == ranks[1]["buffers"]


def _run_script(tmp_path: Path, out: Path, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_ddp.py"), "--out", str(out), "--devices", "2", *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_ranks(out, 2)


@pytest.mark.slow
def test_ddp_script_one_seed_for_all_ranks_and_resume(tmp_path: Path) -> None:
    """Fresh processes without ``seed_everything``: both ranks use rank 0's base seed, and a run resumed from a
    checkpoint in new processes draws, on every rank, what the uninterrupted run drew."""
    full = _run_script(tmp_path, tmp_path / "full", "--no-seed-everything", "--ckpt-dir", str(tmp_path / "ckpt"))
    assert full[0]["maxup_seed"] == full[1]["maxup_seed"] is not None, [r["maxup_seed"] for r in full]
    assert full[0]["draws"] != full[1]["draws"], "ranks differ by their rank in the stream key"
    assert all(r["sync_dist_warnings"] == [] for r in full), [r["sync_dist_warnings"] for r in full]
    resumed = _run_script(
        tmp_path, tmp_path / "resumed", "--no-seed-everything", "--resume", str(tmp_path / "ckpt" / "epoch=0.ckpt")
    )
    assert [r["maxup_seed"] for r in resumed] == [r["maxup_seed"] for r in full]
    for a, b in zip(full, resumed, strict=True):
        tail = a["draws"][-len(b["draws"]) :]
        assert len(b["draws"]) == 4, b["draws"]
        assert tail == b["draws"], (a["global_rank"], tail, b["draws"])
    _check_identical_params(resumed)
    assert max_param_diff(full[0], resumed[0]) == 0.0, "the resumed run must end where the uninterrupted one did"


@pytest.mark.slow
def test_ddp_script(tmp_path: Path) -> None:
    """``strategy="ddp"`` re-launches the script for rank 1; both ranks train through warm-up into MaxUp."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_ddp.py"), "--out", str(tmp_path), "--devices", "2"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = read_ranks(tmp_path, 2)
    _check_identical_params(ranks)
    for r in ranks:
        assert r["world_size"] == 2
        assert {s["m"] for s in r["steps"]} == {1, 4}
        assert r["collectives"]["selection"] == 0
    assert ranks[0]["draws"] != ranks[1]["draws"]


@pytest.mark.parametrize(("rows", "num_chunks"), [pytest.param(3, 4, id="fewer-rows-than-chunks"), (8, 4), (5, 2)])
def test_num_chunks_makes_exactly_that_many_forwards(rows: int, num_chunks: int) -> None:
    """The functional core behind equal selection forwards per rank: the same selection, in exactly
    ``num_chunks`` forwards (trailing ones empty when there are fewer rows than chunks)."""
    from torch import nn

    from lightning_maxup.augment import GaussianNoise
    from lightning_maxup.core.functional import maxup_step

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    sizes: list[int] = []

    def loss_fn(b: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            sizes.append(int(b[0].shape[0]))
        return torch.nn.functional.cross_entropy(net(b[0]), b[1], reduction="none")

    batch = (torch.randn(rows, 4), torch.randint(0, 3, (rows,)))
    kwargs: dict[str, Any] = {"model": net, "augment": GaussianNoise(0.3), "m": 2}
    whole = maxup_step(loss_fn, batch, generator=torch.Generator().manual_seed(1), **kwargs)
    sizes.clear()
    split = maxup_step(loss_fn, batch, generator=torch.Generator().manual_seed(1), num_chunks=num_chunks, **kwargs)
    assert len(sizes) == num_chunks, sizes
    assert sum(sizes) == 2 * rows, sizes
    assert torch.equal(whole.selected, split.selected)
    torch.testing.assert_close(whole.candidate_losses, split.candidate_losses)
    with pytest.raises(ValueError, match="Expected `num_chunks` to be a positive integer or None, got 0"):
        maxup_step(loss_fn, batch, num_chunks=0, **kwargs)
