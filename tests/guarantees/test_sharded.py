"""MaxUp under sharded training: FSDP2 (``fully_shard``) and Lightning's ``ModelParallelStrategy``, 2 CPU ranks, gloo.

Under FSDP every forward all-gathers parameters, the selection forwards included (in eval mode too), and FSDP2
swaps each module's registered parameters between the sharded ones and gathered copies. One launch of
``scripts/train_sharded.py`` on two ranks (see its docstring for the phases) checks:

- the selection pass leaves a sharded model exactly as a twin that runs only the gradient forwards (every
  gathered parameter and every buffer, ``torch.equal``), in ``"eval"`` and ``"train"`` mode, without a warning;
  a forward that writes a weight is still reported;
- a Lightning fit (warm-up, then MaxUp selecting in both modes) raises no warning from the library;
- with uneven batches (rank 0: 8, 8, 8, 6 rows; rank 1: 6, 8, 8, 8) and ``chunk_size``, both ranks make the same
  number of selection forwards on every step; unequal counts would hang or desync FSDP's collectives, so the
  ranks' process group times out after 60 s and the launch after ``LAUNCH_TIMEOUT``;
- a run resumed from the distributed checkpoint of epoch 1 ends with the uninterrupted run's parameters.

``nn.SyncBatchNorm`` cannot run a training forward on the CPU, and ``strategy="fsdp"`` (FSDP1) and DeepSpeed
refuse it: those are not covered here (docs/scaling.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_sharded.py"
PHASES = ("twin", "fit", "resume")
LAUNCH_TIMEOUT = 300  # seconds for the whole launch; each phase's own collectives time out after 60 s
BATCHES = ((8, 8, 8, 6), (6, 8, 8, 8))  # as in the script
M, CHUNK, STEPS_PER_EPOCH = 4, 8, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Launch:
    """The two ranks' results, read from ``<out>/<phase>_rank<r>.pt``, and what to show when one is missing."""

    def __init__(self, out: Path, returncodes: list[int | None], logs: list[str]) -> None:
        self.out = out
        self.returncodes = returncodes
        self.logs = logs

    def phase(self, name: str) -> list[dict[str, Any]]:
        """Both ranks' record of phase ``name``; fails with the ranks' errors and output if one is missing."""
        files = [self.out / f"{name}_rank{r}.pt" for r in range(2)]
        if not all(f.exists() for f in files):
            errors = [(self.out / f"{name}_rank{r}.error") for r in range(2)]
            detail = "\n".join(e.read_text()[-3000:] for e in errors if e.exists()) or "\n".join(
                log[-3000:] for log in self.logs
            )
            pytest.fail(f"phase `{name}` did not finish (return codes {self.returncodes}):\n{detail}")
        return [torch.load(f, weights_only=True) for f in files]


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Start both ranks with a torchrun-style environment and wait for them (killing both on a timeout)."""
    out = tmp_path_factory.mktemp("sharded")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "PL_GLOBAL_SEED", "GROUP_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0")
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    logs = [(out / f"log{rank}").open("w") for rank in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(out)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
            cwd=out,
        )  # fmt: skip
        for rank in range(2)
    ]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    returncodes: list[int | None] = []
    for proc in procs:
        try:
            returncodes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            returncodes.append(None)  # a hang: stop both ranks, the tests report what each phase left
    for proc, log in zip(procs, logs, strict=True):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return Launch(out, returncodes, [(out / f"log{r}").read_text() for r in range(2)])


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Name -> largest absolute difference, for the tensors of ``a`` and ``b`` that are not equal."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}


def _library_warnings(records: list[list[str]]) -> list[list[str]]:
    """Warnings from lightning_maxup or about MaxUp, and every RuntimeWarning."""
    return [w for w in records if w[0] == "RuntimeWarning" or "MaxUp" in w[1] or "lightning_maxup" in w[2]]


@pytest.mark.slow
def test_ranks_exit_cleanly(launch: Launch) -> None:
    for name in PHASES:
        launch.phase(name)
    assert launch.returncodes == [0, 0], launch.logs[0][-3000:] + launch.logs[1][-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_selection_pass_leaves_sharded_model_as_its_twin(launch: Launch, mode: str) -> None:
    """Every gathered parameter and buffer is unchanged by each selection pass (BatchNorm in a sharded unit,
    dropout drawing from the global generator), and after two SGD steps the model equals its twin."""
    for rank, record in enumerate(launch.phase("twin")):
        rec = record[mode]
        for step, s in enumerate(rec["steps"]):
            assert _differences(s["before"], s["after"]) == {}, (rank, step)
            assert s["warnings"] == [], (rank, step, s["warnings"])
        assert _differences(rec["selected"], rec["twin"]) == {}, rank
        assert rec["selected"].keys() >= {"block.1.running_mean", "block.0.weight", "head.weight"}


@pytest.mark.slow
def test_write_in_sharded_forward_is_reported(launch: Launch) -> None:
    """FSDP's own swaps of gathered and sharded parameters are not reported; a forward that writes one is."""
    for record in launch.phase("twin"):
        warned = record["writer_warnings"]
        assert [w[0] for w in warned] == ["RuntimeWarning"], warned
        assert "changed parameter `weight` of WritingLinear" in warned[0][1]


@pytest.mark.slow
def test_fit_warmup_then_both_selection_modes_without_warnings(launch: Launch) -> None:
    for rank, record in enumerate(launch.phase("fit")):
        ms = [s[0] for s in record["steps"]]
        assert ms == [1] * STEPS_PER_EPOCH + [M] * 2 * STEPS_PER_EPOCH, ms
        modes = [s[1] for s in record["steps"][STEPS_PER_EPOCH:]]
        assert modes == ["eval"] * STEPS_PER_EPOCH + ["train"] * STEPS_PER_EPOCH, modes
        assert [s[2] for s in record["steps"]] == list(BATCHES[rank]) * 3
        assert _library_warnings(record["warnings"]) == [], record["warnings"]


@pytest.mark.slow
def test_equal_selection_forwards_on_uneven_batches(launch: Launch) -> None:
    """ceil(m * B / chunk_size) forwards with B the largest first batch over the ranks (8), on every step and
    rank, short batches included; the first step adds the pre-flight check's forwards (the same number)."""
    forwards = [record["selection_forwards"] for record in launch.phase("fit")]
    agreed = -(-M * max(max(b) for b in BATCHES) // CHUNK)
    assert forwards[0] == forwards[1], forwards
    assert forwards[0] == [agreed] + [0] * (STEPS_PER_EPOCH - 1) + [agreed] * 2 * STEPS_PER_EPOCH, forwards


@pytest.mark.slow
def test_resume_from_distributed_checkpoint_matches_uninterrupted_run(launch: Launch) -> None:
    """Resumed from epoch 1's checkpoint (a directory written by torch.distributed.checkpoint), epoch 2 (MaxUp,
    train-mode selection) ends with the uninterrupted run's parameters on both ranks."""
    full, resumed = launch.phase("fit"), launch.phase("resume")
    for rank, (a, b) in enumerate(zip(full, resumed, strict=True)):
        params = {k: v for k, v in a["state"].items() if k not in a["buffers_at_start"]}
        assert len(params) == 6, sorted(params)
        assert _differences(params, {k: b["state"][k] for k in params}) == {}, rank
        assert [s[:2] for s in b["steps"]] == [[M, "train"]] * STEPS_PER_EPOCH
        assert _library_warnings(b["warnings"]) == [], b["warnings"]
    assert resumed[0]["selection_forwards"] == resumed[1]["selection_forwards"]


@pytest.mark.slow
def test_resume_loads_one_ranks_buffers_on_every_rank(launch: Launch) -> None:
    """BatchNorm's running statistics are per rank, but a distributed checkpoint stores a replicated (non-DTensor)
    tensor once: every rank resumes with the same rank's copy. Eval-mode selection reads those statistics, so
    a run resumed into eval-mode selection differs from the uninterrupted one (docs/scaling.md)."""
    full, resumed = launch.phase("fit"), launch.phase("resume")
    saved = [record["buffers_at_epoch_end"][1] for record in full]
    assert _differences(saved[0], saved[1]) != {}, "the ranks' running statistics should differ (own data)"
    loaded = [record["buffers_at_start"] for record in resumed]
    assert _differences(loaded[0], loaded[1]) == {}
    assert any(_differences(loaded[0], s) == {} for s in saved), "the loaded statistics are neither rank's"
