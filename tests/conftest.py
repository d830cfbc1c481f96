"""Suite-wide settings.

The suite runs on 2-core machines where DDP tests start 2 processes at once: one torch thread per process avoids
oversubscribing the cores (which made small-model steps up to 70x slower here) and keeps runs comparable.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the DDP and example subprocesses

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# A `ddp_spawn` child sometimes aborts in gloo's teardown ("terminate called without an active exception") after
# its work is done: once in about four full-suite runs on a 2-core machine, never in isolated reruns. The tests
# that spawn processes are marked with pytest-rerunfailures'
# `flaky(reruns=1, only_rerun=["ProcessExitedException.*SIGABRT"])`, which reruns that exact failure once (the
# rerun must pass every assertion again) and nothing else.


@pytest.fixture
def file_system_sharing():
    """``ddp_spawn`` shares tensors through shared memory, too small in containers; files work everywhere."""
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(previous)
