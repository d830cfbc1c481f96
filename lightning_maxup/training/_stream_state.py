"""Where ``MaxUpMixin`` keeps its augmentation stream: a child module no override of the user's can drop.

The stream is the seed, the step count and the rows agreed at a fit's first step. It is saved as the extra state of
a child module, ``_maxup_state`` (state_dict key ``_maxup_state._extra_state``), not of the user's module, so a
module that defines its own ``get_extra_state``/``set_extra_state``, or overrides ``on_save_checkpoint``,
``on_load_checkpoint`` or ``__getstate__`` without ``super()``, still saves and restores it.

Checkpoints from earlier versions load too (:func:`migrate_state_dict`, a ``load_state_dict`` pre-hook of the
user's module): 0.3 kept the stream as the module's own ``_extra_state``, and before 0.3 it was in
``checkpoint["lightning_maxup"]`` (read by the mixin's ``on_load_checkpoint``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_maxup.core.batch import batch_size
from lightning_maxup.core.random import KeyedGenerator

__all__ = [
    "STATE_KEY",
    "StreamState",
    "add_child",
    "keyed_generator",
    "legacy_checkpoint_state",
    "migrate_state_dict",
    "repeat_counts",
    "stream_attribute",
]

_STATE_VERSION = 2
_LEGACY_CHECKPOINT_KEY = "lightning_maxup"
_EXTRA_STATE_KEY = "_extra_state"
#: The child's attribute name on the user's module.
CHILD = "_maxup_state"
#: The stream's key in the user's module's ``state_dict``.
STATE_KEY = f"{CHILD}.{_EXTRA_STATE_KEY}"


class StreamState(nn.Module):
    """The augmentation stream of one ``MaxUpMixin`` module, saved as this child's extra state.

    Args:
        owner: The module whose ``maxup_config.seed`` is the stream's seed (held as a plain attribute, not a child).

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning_maxup.core.config import MaxUpConfig
        >>> owner = SimpleNamespace(maxup_config=MaxUpConfig(seed=7))
        >>> state = StreamState(owner)
        >>> state.draws = 3
        >>> state.get_extra_state().tolist()
        [2, 1, 7, 3, 0]
    """

    owner: Any

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self.draws = 0
        self.agreed_rows = 0
        object.__setattr__(self, "owner", owner)  # not registered: the owner is the parent, not a child

    def get_extra_state(self) -> Tensor:
        """The stream's seed and position and the agreed selection rows.

        One int64 CPU tensor ``[version, seed kind, seed, draws, agreed rows]``, so every ``state_dict`` value stays
        a tensor (code that clones a state dict, and distributed checkpoints, handle it like any other). The seed
        kind is 0 for a seed still ``None``, 1 for a seed stored as it is, 2 for a seed of 64 bits (``>= 2**63``,
        as ``torch.initial_seed()`` may return) stored as its two's complement. Saving does not resolve a seed
        that is still ``None``: ``seed_everything`` after a ``state_dict()`` call still decides it.

        Taking the state also reads the owner's non-finite counts still in flight (accelerators), so a checkpoint is
        not written after a step whose losses were not finite.
        """
        flush = getattr(getattr(self.owner, "_maxup_finite", None), "flush", None)
        if flush is not None:
            flush()
        seed = self.owner.maxup_config.seed
        kind = 0 if seed is None else 2 if seed >= 1 << 63 else 1
        stored = 0 if seed is None else seed - (1 << 64) if kind == 2 else seed
        values = [_STATE_VERSION, kind, stored, self.draws, self.agreed_rows]
        return torch.tensor(values, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved; ``None`` (a checkpoint from before 0.3) restores nothing."""
        if isinstance(state, Tensor):
            state = _decode(state)
        if not isinstance(state, dict):
            return
        if state.get("seed") is not None:
            self.owner.maxup_config = self.owner.maxup_config.replace(seed=int(state["seed"]))
        self.draws = int(state.get("draws") or 0)
        self.agreed_rows = int(state.get("agreed_rows") or state.get("nominal_rows") or 0)


def stream_attribute(name: str) -> Any:
    """A property of the owner reading and writing ``name`` of its child ``_maxup_state``."""
    return property(
        lambda module: getattr(module._maxup_state, name), lambda module, v: setattr(module._maxup_state, name, v)
    )


def add_child(module: Any, draws: int = 0, agreed_rows: int = 0) -> None:
    """Give ``module`` its child ``_maxup_state`` unless it has one (a module unpickled from 0.3 has not)."""
    if CHILD not in getattr(module, "_modules", module.__dict__):
        setattr(module, CHILD, StreamState(module))
        module._maxup_draws, module._maxup_agreed_rows = int(draws), int(agreed_rows)


def _decode(state: Tensor) -> dict[str, Any]:
    values = [int(v) for v in state.tolist()] if state.dim() == 1 else []
    if len(values) != 5 or values[0] != _STATE_VERSION:
        raise ValueError(
            f"Expected the MaxUp `_extra_state` to be [version {_STATE_VERSION}, seed kind, seed, draws, rows],"
            f" got {values or list(state.shape)}; was the checkpoint written by a newer lightning_maxup?"
        )
    _, kind, seed, draws, rows = values
    seed = seed & ((1 << 64) - 1) if kind == 2 else seed
    return {"seed": seed if kind else None, "draws": draws, "agreed_rows": rows}


def _has_own_extra_state(module: nn.Module) -> bool:
    return type(module).set_extra_state is not nn.Module.set_extra_state


def migrate_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of the user's module: checkpoints of earlier versions load into the child.

    0.3 saved the stream as the module's own ``_extra_state``: it moves to the child's key (unless the module now
    defines extra state of its own, which that key then holds). A ``state_dict`` from before 0.3 has neither key:
    the child loads ``None``, "nothing to restore".
    """
    key = prefix + STATE_KEY
    old = state_dict.pop(prefix + _EXTRA_STATE_KEY, None) if not _has_own_extra_state(module) else None
    state_dict.setdefault(key, old)


def legacy_checkpoint_state(checkpoint: dict[str, Any]) -> None:
    """Put the stream of a checkpoint written before 0.3 (``checkpoint["lightning_maxup"]``) where the child reads it.

    Example:
        >>> checkpoint = {"state_dict": {}, "lightning_maxup": {"seed": 9, "draws": 5}}
        >>> legacy_checkpoint_state(checkpoint)
        >>> checkpoint["state_dict"]
        {'_maxup_state._extra_state': {'seed': 9, 'draws': 5}}
    """
    legacy = checkpoint.get(_LEGACY_CHECKPOINT_KEY)
    state_dict = checkpoint.get("state_dict")
    if isinstance(legacy, dict) and isinstance(state_dict, dict):
        state_dict.setdefault(STATE_KEY, legacy)


_fill_missing_extra_state = migrate_state_dict  # the name modules pickled by 0.3 hold the hook under


def keyed_generator(module: Any, batch: Any, m: int, device: torch.device) -> KeyedGenerator:
    """The per-row stream of ``randomness="sample"`` (``MaxUpMixin.maxup_keyed_generator``).

    Row ``k * B + i`` of the copy-major expanded batch is copy ``k`` of sample ``i`` and is keyed
    ``(epoch, step, sample index, occurrence, k)``, where ``occurrence`` counts earlier rows of the *global* batch
    (lower ranks first, then this rank's earlier rows) with the same index, so a repeated index draws copies of its
    own wherever its repeats are. With more than one rank this is one all-gather of the ``B`` indices per step (no
    host sync); rows beyond the largest first batch of any rank (agreed at the first step) are compared with this
    rank's rows only.
    """
    index = torch.as_tensor(module.maxup_sample_index(batch)).to(device=device, dtype=torch.int64)
    b = batch_size(batch)
    if index.dim() != 1 or index.shape[0] != b:
        raise ValueError(
            f"Expected `maxup_sample_index(batch)` to return one dataset index per sample (shape [{b}]), got"
            f" shape {list(index.shape)}"
        )
    trainer = getattr(module, "_trainer", None)
    epoch = int(trainer.current_epoch) if trainer is not None else 0
    copy = torch.arange(m, device=device, dtype=torch.int64).repeat_interleave(b)
    occurrence = _occurrence(module, index).repeat(m)
    draws = module._maxup_draws
    keys = torch.stack(
        [torch.full_like(copy, epoch), torch.full_like(copy, draws), index.repeat(m), occurrence, copy], dim=1
    )
    module._maxup_draws = draws + 1
    return KeyedGenerator(module.maxup_resolved_seed(), keys)


def _occurrence(module: Any, index: Tensor) -> Tensor:
    """Per row, how many earlier rows of the global batch (lower ranks, then this rank) hold the same index."""
    local = repeat_counts(index)
    trainer = getattr(module, "_trainer", None)
    if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
        return local
    rank = int(trainer.global_rank)
    # Every rank gathers the same shape: its first `cap` indices, padded with -1 (no dataset index).
    cap = max(module._maxup_agreed_rows, 1)
    padded = torch.full((cap,), -1, dtype=torch.int64, device=index.device)
    rows = min(int(index.shape[0]), cap)
    padded[:rows] = index[:rows]
    gathered = trainer.strategy.all_gather(padded).reshape(-1, cap)
    lower = torch.sort(gathered[:rank].reshape(-1)).values
    earlier = torch.searchsorted(lower, index, right=True) - torch.searchsorted(lower, index, right=False)
    return local + earlier


def repeat_counts(index: Tensor) -> Tensor:
    """For each entry, how many earlier entries hold the same value, sync-free.

    Example:
        >>> repeat_counts(torch.tensor([3, 5, 3, 3])).tolist()
        [0, 0, 1, 2]
    """
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    position = torch.arange(index.shape[0], device=index.device)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.where(starts, position, torch.zeros_like(position)).cummax(0).values
    return torch.empty_like(position).scatter_(0, order, position - run_start)


_repeat_counts = repeat_counts  # its 0.3 name
