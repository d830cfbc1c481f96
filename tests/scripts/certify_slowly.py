"""``lightning-maxup certify`` with each batch of inputs slowed down by 50 ms, for the test that kills it mid-run.

The pause makes the run last long enough for the test to kill it between rows on any machine, while keeping the
number of noise samples (and the in-process reference run) small. Usage: ``python certify_slowly.py ARGS...``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning_maxup.certify import smoothing
from lightning_maxup.certify.cli import certify_main

_certify_batch = smoothing.Smooth.certify_batch


def _slow_certify_batch(self: smoothing.Smooth, *args: Any, **kwargs: Any) -> Any:
    time.sleep(0.05)
    return _certify_batch(self, *args, **kwargs)


if __name__ == "__main__":
    smoothing.Smooth.certify_batch = _slow_certify_batch  # type: ignore[method-assign]
    sys.exit(certify_main(sys.argv[1:]))
