"""Two single-device "nodes" on localhost train MaxUp together, launched as on a real cluster.

Both launchers a multi-node job uses are covered: ``torchrun --nnodes=2 --node_rank=R`` (Lightning detects
torchelastic) and Lightning's own environment variables ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` with
``Trainer(num_nodes=2)``. Each node is a subprocess with a timeout, so a failed rendezvous cannot hang the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from ddp_common import max_param_diff, read_ranks  # noqa: E402

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_command(launcher: str, node_rank: int, port: int, out: Path) -> tuple[list[str], dict[str, str]]:
    script = [str(SCRIPTS / "train_ddp.py"), "--out", str(out), "--num-nodes", "2", "--devices", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    if launcher == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
        rendezvous = [f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        return [*torchrun, *rendezvous, *script], env
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node_rank))
    return [sys.executable, *script], env


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [pytest.param("torchrun", id="torchrun"), pytest.param("env", id="lightning-env")])
def test_two_nodes_train_maxup(tmp_path: Path, launcher: str) -> None:
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd, env = _node_command(launcher, node_rank, port, tmp_path)
        log = (tmp_path / f"node{node_rank}.log").open("w")
        nodes.append((subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=TIMEOUT_S) for proc, _ in nodes]
    finally:
        for proc, log in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((tmp_path / f"node{r}.log").read_text()[-2500:] for r in (0, 1))
    assert codes == [0, 0], logs

    ranks = read_ranks(tmp_path, 2)
    assert [r["node_rank"] for r in ranks] == [0, 1], logs
    assert all(r["world_size"] == 2 for r in ranks)
    if launcher == "torchrun":
        assert all(r["env"]["TORCHELASTIC_RUN_ID"] is not None for r in ranks)
    diff = max_param_diff(ranks[0], ranks[1])
    assert diff == 0.0, f"parameters differ across nodes by up to {diff:.3g}"
    for r in ranks:
        assert {s["m"] for s in r["steps"]} == {1, 4}, "warm-up then MaxUp"
        assert r["collectives"]["selection"] == 0
    assert ranks[0]["draws"] != ranks[1]["draws"]
