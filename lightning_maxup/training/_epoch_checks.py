"""Checks the mixin reads once per epoch rather than once per step: nothing here waits for the device in a step.

* **Identical copies.** If, in every MaxUp step of the first MaxUp epoch, each sample's ``m`` copies had exactly
  the same loss, the augmentation never reached the loss (the classic case: a language model that does not
  multiply its embeddings by :func:`~lightning_maxup.augment.embedding_scale`), and the selection pass bought
  nothing. A device flag is and-ed per step and read once, when the epoch ends; one warning.
* **Deferred checks of the augmentation.** An augmentation with a ``check_deferred()`` method (such as
  :class:`~lightning_maxup.augment.WordEmbeddingDropout`, which counts out-of-range token ids on the device) has
  it called at the same points.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

IDENTICAL_COPIES_MESSAGE = (
    "In every MaxUp step of epoch {epoch}, each sample's {m} copies had exactly the same loss: the augmentation"
    " never reached the loss, so the selection pass cost time and changed nothing. With WordEmbeddingDropout,"
    " multiply the embeddings by lightning_maxup.augment.embedding_scale(batch) in per_sample_loss"
)


class EpochChecks:
    """Accumulate per-step flags on the device; read at the epoch's end (the callback), the next epoch or the end."""

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._identical: Tensor | None = None  # all copies equal in every MaxUp step of the watched epoch
        self._m = 0
        self._watching = True  # only the first epoch with MaxUp steps is watched
        self._dirty = False  # steps recorded since the last read

    def step(self, epoch: int, candidate_losses: Tensor, augment: Any, warn: Any) -> None:
        """Record one step (``candidate_losses`` ``[m, B]``); at an epoch change, read the previous epoch's flags.

        Steps without an ``augment`` are not watched: the mixin warns about those at once.
        """
        if self._epoch is not None and epoch != self._epoch:
            self.close(augment, warn)  # reads only if the epoch's last step did not (a fit stopped mid-epoch)
        self._epoch = epoch
        self._dirty = True
        m = int(candidate_losses.shape[0])
        if m > 1 and self._watching and augment is not None:  # no augmentation has its own warning
            same = (candidate_losses.amax(dim=0) == candidate_losses.amin(dim=0)).all()
            self._identical = same if self._identical is None else self._identical & same
            self._m = m

    def close(self, augment: Any, warn: Any) -> None:
        """Read what the ended epoch accumulated (one host read each) and reset; nothing to read, no read."""
        if not self._dirty:
            return
        self._dirty = False
        identical, self._identical = self._identical, None
        if identical is not None:
            self._watching = False
            if bool(identical):
                warn(IDENTICAL_COPIES_MESSAGE.format(epoch=self._epoch, m=self._m))
        check = getattr(augment, "check_deferred", None)
        if callable(check):
            check()
