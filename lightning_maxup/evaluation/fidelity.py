"""Selection fidelity: does MaxUp's cheap selection pass pick the copy the full input would have picked?

MaxUp may score its candidates on a view (``selection_size``: downsampled images) or in reduced precision
(``selection_dtype``) to save time. :func:`full_input_losses` scores the same candidates on the full input in
float32, :func:`view_fidelity` compares the two picks, and the :class:`SelectionFidelity` callback checks them
every few training steps. Worst-of-k accuracy and its validation callback are in
:mod:`lightning_maxup.evaluation.worst_of_k`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_maxup._lightning import Callback, rank_zero_warn
from lightning_maxup._validation import positive_float, positive_int
from lightning_maxup.core._state import preserved
from lightning_maxup.core.batch import (
    tensor_leaves,
)
from lightning_maxup.core.config import MaxUpConfig
from lightning_maxup.core.functional import selection_losses
from lightning_maxup.evaluation.worst_of_k import LossFn
from lightning_maxup.training._deferred import HostCopy
from lightning_maxup.training.mixin import MaxUpMixin, require_maxup_module

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = ["SelectionFidelity", "ViewFidelity", "full_input_losses", "has_shortcut", "view_fidelity"]


def has_shortcut(config: MaxUpConfig, trainer_precision: str = "32-true") -> bool:
    """Whether the selection pass scores anything but the full input in float32.

    A selection view (``selection_size``, ``selection_view``), a reduced ``selection_dtype`` or a mixed / half
    precision Trainer (whose autocast the selection pass runs under) count; ``selection_memory_format`` alone
    does not.

    Example:
        >>> has_shortcut(MaxUpConfig(m=4)), has_shortcut(MaxUpConfig(m=4, selection_size=16))
        (False, True)
        >>> has_shortcut(MaxUpConfig(m=4), "bf16-mixed")
        True
    """
    reduced = config.dtype not in (None, torch.float32)
    return config.view is not None or reduced or "16" in str(trainer_precision)


class SelectionFidelity(Callback):
    """Log how often MaxUp's cheap selection pass picks the copy the full input would, every ``every_n_steps``.

    MaxUp (Gong et al., CVPR 2021) trains each sample on the worst of its ``m`` augmented copies, and may score
    the copies on a cheap view (``selection_size``: downsampled images) or in reduced precision
    (``selection_dtype``, a bf16/fp16 Trainer). On a checked step this callback sets the module's
    ``maxup_record``, takes the step's candidates and selection losses from ``maxup_last_output``, scores the same
    candidates on the full input in float32 without gradient (in ``maxup_config.selection_mode``, leaving the
    model, its buffers, modes and the global random state exactly as they were), after the backward pass and before
    the optimizer step, with the parameters and buffers (running statistics) the selection pass saw, and logs

    - ``maxup/view_agreement``: share of samples whose view pick is the full input's worst copy;
    - ``maxup/view_regret``: mean full-input loss of the true worst copy minus that of the view's pick (``>= 0``);
    - ``maxup/view_chance``: ``1 / m``, the agreement of a random pick.

    When agreement stays within ``warn_margin`` of chance on average over the last ``window`` checks, it warns
    once: the view then selects nearly at random, and MaxUp degrades into averaging random copies.

    With no shortcut (no view, full precision; see :func:`has_shortcut`) agreement is 1 and regret 0 by
    construction, so the callback does nothing. Training is bit-identical with and without it: the extra pass
    restores everything it touches, and the augmentation stream is not consumed. With ``selection_mode="train"``
    and dropout, the full pass draws its own dropout masks, so agreement also measures that noise. Each rank
    checks its own samples and logs its own values (no collective); under FSDP or DeepSpeed ZeRO-3, where every
    forward is a collective, ranks with uneven batches would make different numbers of forwards, so do not use it
    there.

    On a checked step the module's ``maxup_record`` is turned on (unless something else, such as a
    :class:`~lightning_maxup.SelectionMonitor`, turned it on already) and off again after the backward pass; the
    step's output stays in ``maxup_last_output`` until the next step replaces it. It works next to a
    ``SelectionMonitor`` in either order: each turns the flag off only if it turned it on.

    A check makes no host sync: the values are logged as device tensors, and the agreement the warning averages is
    read on the host at the next check (or when training ends, or the callback's state is saved), long computed by
    then.

    Cost: a checked step adds one float32 forward of the ``m * B`` candidates without gradient; the default
    ``every_n_steps=200`` keeps that under 1 % of training time (see ``docs/fidelity.md`` for the measurement).

    Args:
        every_n_steps: Check at optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ...
        warn_margin: Warn when mean agreement over the window is below ``1/m + warn_margin``.
        window: Number of recent checks the warning averages over.

    Example:
        >>> fidelity = SelectionFidelity(every_n_steps=50, warn_margin=0.05, window=5)
        >>> fidelity.state_dict()
        {'history': [], 'warned': False}
        >>> SelectionFidelity(warn_margin=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `warn_margin` to be a positive finite number, got 0
    """

    def __init__(self, every_n_steps: int = 200, warn_margin: float = 0.05, window: int = 5) -> None:
        self.every_n_steps = positive_int(every_n_steps, "every_n_steps")
        self.warn_margin = positive_float(warn_margin, "warn_margin")
        self.window = positive_int(window, "window")
        self.history: deque[tuple[float, float]] = deque(maxlen=self.window)
        self.warned = False
        #: The last check's result (``None`` before the first check).
        self.last: ViewFidelity | None = None
        self._checking = False  # this step is checked
        self._restore = False  # this callback turned the module's maxup_record on and turns it off again
        self._buffers: list[Tensor] = []  # the module's buffers when the checked step's selection pass ran
        self._last_step = -1
        self._unread: tuple[HostCopy, float, int] | None = None  # the last check's agreement, read at the next one

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_maxup_module(pl_module, "SelectionFidelity")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (step + 1) % self.every_n_steps or step == self._last_step:
            return
        assert isinstance(pl_module, MaxUpMixin)
        if pl_module.maxup_active_m > 1 and has_shortcut(pl_module.maxup_config, str(trainer.precision)):
            self._last_step = step
            self._checking = True
            # The gradient forward updates running statistics after the selection pass: score with these.
            self._buffers = [b.detach().clone() for b in pl_module.buffers()]
            if not pl_module.maxup_record:  # another callback may have asked for this step's output already
                self._restore = True
                pl_module.maxup_record = True

    def _disarm(self, module: MaxUpMixin) -> None:
        if self._restore:
            module.maxup_record = False
        self._checking = self._restore = False
        self._buffers = []

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._checking:
            return
        assert isinstance(pl_module, MaxUpMixin)
        out, buffers = pl_module.maxup_last_output, self._buffers
        self._disarm(pl_module)
        if out is None or out.m < 2 or out.candidates is None:
            return
        config = pl_module.maxup_config
        with preserved(pl_module, config.selection_mode), torch.no_grad():  # type: ignore[arg-type]
            for buffer, saved in zip(pl_module.buffers(), buffers, strict=True):
                buffer.copy_(saved)
            full = full_input_losses(pl_module.maxup_selection_loss, out.candidates, config, model=pl_module)  # type: ignore[arg-type]
        fid = view_fidelity(out.candidate_losses, full.view(out.m, -1))
        self.last = fid
        b = int(out.candidate_losses.shape[1])
        # The chance as a fill on the device, not a float that Lightning would copy from the host (lift_fresh).
        chance = torch.full((), fid.chance, device=fid.agreement.device)
        for name, value in (("agreement", fid.agreement), ("regret", fid.regret), ("chance", chance)):
            pl_module.log(f"maxup/view_{name}", value, on_step=True, on_epoch=False, batch_size=b)
        # The agreement is read on the host at the next check (or the end of training), long computed by then,
        # so a check does not wait for the device.
        self._read_unread()
        self._unread = (HostCopy(fid.agreement), fid.chance, out.m)

    def _read_unread(self) -> None:
        if self._unread is not None:
            agreement, chance, m = self._unread
            self._unread = None
            self._observe(agreement.read(), chance, m)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_unread()

    def _observe(self, agreement: float, chance: float, m: int) -> None:
        self.history.append((agreement, chance))
        if self.warned or len(self.history) < self.window:
            return
        mean = sum(a for a, _ in self.history) / len(self.history)
        if mean < chance + self.warn_margin:
            self.warned = True
            rank_zero_warn(
                f"MaxUp's selection view agrees with the full input on {mean:.1%} of samples over the last"
                f" {len(self.history)} checks, within {self.warn_margin:.0%} of chance (1/m = {chance:.1%} at m={m}):"
                " the view picks nearly at random; select on a larger `selection_size` or without the view"
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._checking:  # the step never reached a backward pass (e.g. a custom training_step)
            assert isinstance(pl_module, MaxUpMixin)
            self._disarm(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(pl_module, MaxUpMixin):
            self._disarm(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._read_unread()
        return {"history": [list(h) for h in self.history], "warned": self.warned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = deque(((float(a), float(c)) for a, c in state_dict.get("history", [])), maxlen=self.window)
        self.warned = bool(state_dict.get("warned", False))


@dataclass(frozen=True)
class ViewFidelity:
    """How well the selection view's pick matches the full input's (see :func:`view_fidelity`).

    Attributes:
        agreement: Share of samples whose view pick is the full input's worst copy.
        regret: Mean over samples of the full-input loss of the full input's worst copy minus that of the view's
            pick (never negative; 0 when they agree).
        chance: ``1 / m``, the agreement of a pick made at random.
    """

    agreement: Tensor
    regret: Tensor
    chance: float


def view_fidelity(view_losses: Tensor, full_losses: Tensor) -> ViewFidelity:
    """Compare the per-sample arg-max of the view's candidate losses ``[m, B]`` with that of the full input's.

    The view's pick is the arg-max of ``view_losses`` (the copy MaxUp trains on, or, with a selection
    temperature, the copy it would train on at ``τ -> 0``); ties go to the lowest copy index, as in
    :func:`~lightning_maxup.core.functional.select_worst`. Agreement counts a pick as right when its full-input loss
    equals the full-input maximum, so exact ties in ``full_losses`` count as agreement.

    Example:
        >>> view = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # m = 2 copies of B = 2 samples
        >>> full = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
        >>> f = view_fidelity(view, full)
        >>> float(f.agreement), float(f.regret), f.chance
        (1.0, 0.0, 0.5)
        >>> f = view_fidelity(view, full.flip(0))  # the view now picks each sample's best copy
        >>> float(f.agreement), float(f.regret)
        (0.0, 2.0)
    """
    if view_losses.dim() != 2 or view_losses.shape != full_losses.shape:
        raise ValueError(
            "Expected `view_losses` and `full_losses` of the same shape [m, B], got"
            f" {list(view_losses.shape)} and {list(full_losses.shape)}"
        )
    full = full_losses.float()
    pick = view_losses.argmax(dim=0, keepdim=True).to(full.device)
    picked = full.gather(0, pick)[0]
    worst = full.amax(dim=0)
    return ViewFidelity((picked >= worst).float().mean(), (worst - picked).mean(), 1.0 / int(full.shape[0]))


def full_input_losses(
    loss_fn: LossFn, candidates: Any, config: MaxUpConfig, *, model: nn.Module | None = None
) -> Tensor:
    """Losses ``[m * B]`` of MaxUp's candidates on the full input in float32, without gradient.

    The selection pass of ``config`` with its view, reduced precision and memory format removed (and any
    surrounding autocast switched off): what the selection would have scored without its shortcuts. It runs in
    ``config.selection_mode`` and in ``config.chunk_size`` rows, and leaves ``model`` exactly as it was.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> cfg = MaxUpConfig(m=3, selection_dtype="bfloat16")
        >>> full_input_losses(lambda b: net(b).squeeze(1), torch.zeros(6, 2), cfg, model=net).dtype
        torch.float32
    """
    full = config.replace(selection_size=None, selection_view=None, selection_dtype=None, selection_memory_format=None)
    leaves = tensor_leaves(candidates)
    device_type = leaves[0].device.type if leaves else "cpu"
    with torch.autocast(device_type, enabled=False):
        return selection_losses(loss_fn, candidates, full, model=model)
