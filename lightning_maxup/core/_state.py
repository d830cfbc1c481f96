"""Run a block with a model in a given mode and leave the model exactly as it was.

MaxUp's selection pass must be invisible: ``m`` forwards without gradient that change nothing. Listing the
layers that keep state (BatchNorm's running statistics) is not enough: InstanceNorm with tracked statistics,
``spectral_norm``'s power iteration, parametrizations and custom layers update buffers in ``forward``, and lazy
modules materialise their parameters on their first call. :func:`preserved` therefore snapshots the model itself:

- every buffer is cloned before the block and copied back (or its original object reassigned) afterwards, and
  a buffer the block registers or fills (a ``None`` slot, a cache) is removed or emptied again;
- every parameter's identity and version counter are recorded; forwards without gradient do not write
  parameters, and one that does is reported (restoring would need a copy of every weight);
- parameters that FSDP2 (``fully_shard``) manages are swapped by FSDP itself between the sharded parameter and
  a gathered copy, which every all-gather writes: their sharded parameters are compared over the whole block,
  and the gathered copy only within the forward of the module that owns it (after FSDP's all-gather, before
  its reshard), so FSDP's own parameter management is not reported and a forward that writes a weight still is;
- parameters and buffers of lazy modules are snapshotted right after they materialise, so the first forward of
  a ``LazyBatchNorm2d`` may be the selection pass;
- every module's ``training`` flag is restored through the module's own ``train()`` where it overrides it;
- the global CPU and CUDA random states are restored (dropout in train-mode selection draws masks from them), so
  the gradient pass draws what it would have drawn without a selection pass.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from lightning_maxup._validation import one_of
from lightning_maxup.core.config import SelectionMode

__all__ = ["ModeSnapshot", "ModelSnapshot", "ShardedParams", "modes_restored", "preserved"]


class ModeSnapshot:
    """Every module's ``training`` flag, restored through the module's own ``train()`` where it overrides it."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.training = [mod.training for mod in self.modules]

    def restore(self, model: nn.Module) -> None:
        """Put every flag back; a parent's own ``train()`` may reset its children, which are fixed after it."""
        flags = dict(zip(map(id, self.modules), self.training, strict=True))
        model.train(flags[id(model)])
        for mod in model.modules():  # pre-order: parents before children
            want = flags.get(id(mod))
            if want is None or mod.training == want:
                continue
            if type(mod).train is not nn.Module.train:
                mod.train(want)
            else:
                mod.training = want


@contextmanager
def modes_restored(model: nn.Module, mode: SelectionMode = "eval") -> Iterator[None]:
    """Run the block with ``model`` in ``mode``, then restore every module's ``training`` flag (nothing else).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> net[1].eval()  # a frozen layer inside a training model
        Dropout(p=0.5, inplace=False)
        >>> with modes_restored(net, "eval"):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    one_of(mode, "mode", ("eval", "train"))
    snapshot = ModeSnapshot(model)
    try:
        model.train(mode == "train")
        yield
    finally:
        snapshot.restore(model)


class ModelSnapshot:
    """The state :func:`preserved` restores: buffers (cloned), parameter versions and ``training`` flags."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = ModeSnapshot(model)
        self.modules = self.modes.modules
        self.buffers: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        self.buffer_names: list[tuple[nn.Module, dict[str, Tensor | None]]] = []
        self.params: list[tuple[nn.Module, str, Tensor, int]] = []
        #: CUDA devices the model's parameters live on, whose random states the block must leave as they were.
        self.cuda_devices: set[int] = set()
        self.hooks: list[RemovableHandle] = []
        self._recorded: set[int] = set()
        self.sharded = ShardedParams(self.modules)
        for param in self.sharded.sharded_params():
            self._note_device(param)
        for mod in self.modules:
            if _has_lazy(mod):
                # Runs after LazyModuleMixin's own pre-hook (registered first), i.e. right after materialising.
                self.hooks.append(mod.register_forward_pre_hook(self._lazy_hook))
            else:
                self.record(mod)

    def record(self, mod: nn.Module) -> None:
        """Snapshot the direct buffers and parameters of ``mod``."""
        self._recorded.add(id(mod))
        # Names too, with empty (None) slots: a cache a module fills or registers in forward is emptied again.
        self.buffer_names.append((mod, dict(mod._buffers)))
        for name, buf in mod._buffers.items():
            if buf is not None:
                self.buffers.append((mod, name, buf, buf.detach().clone()))
        for name, param in mod._parameters.items():
            if param is not None and not self.sharded.manages(mod, name):
                self.params.append((mod, name, param, param._version))
                self._note_device(param)

    def _note_device(self, param: Tensor) -> None:
        if param.device.type == "cuda" and param.device.index is not None:
            self.cuda_devices.add(param.device.index)

    def _lazy_hook(self, mod: nn.Module, args: object) -> None:
        # Only the first forward after materialising: a second one (the next chunk) already sees changed state.
        if id(mod) not in self._recorded and not _has_lazy(mod):
            self.record(mod)

    def restore(self, model: nn.Module) -> None:
        """Put buffers back, check parameters and restore every module's mode."""
        for hook in self.hooks:
            hook.remove()
        for mod, names in self.buffer_names:
            for name in [n for n in mod._buffers if n not in names]:
                del mod._buffers[name]
                mod._non_persistent_buffers_set.discard(name)
            for name, buf in names.items():
                if buf is None:
                    mod._buffers[name] = None
        with torch.no_grad():
            for mod, name, original, saved in self.buffers:
                if mod._buffers.get(name) is not original:
                    mod._buffers[name] = original
                original.copy_(saved)
        changed = [(mod, name) for mod, name, param, version in self.params if _changed(mod, name, param, version)]
        for mod, name in [*changed, *self.sharded.restore()]:
            warnings.warn(
                f"The MaxUp selection pass changed parameter `{name}` of {type(mod).__name__}, which cannot be"
                " restored without a copy of every weight; make that module update its parameters only"
                " with gradient enabled",
                RuntimeWarning,
                stacklevel=4,
            )
        self.modes.restore(model)


class ShardedParams:
    """Checks the parameters FSDP2 (``fully_shard``) manages, which FSDP itself swaps and writes.

    FSDP2 registers on each module either the sharded parameter (a ``DTensor``) or a gathered copy, and writes the
    gathered copy in every all-gather: neither the registered object nor its version counter tells a write by the
    user's code from FSDP's own work. What is compared instead:

    - the sharded parameter (its identity and its local shard's version) over the whole block: it changes only
      when something writes the weight itself;
    - the gathered copy within each forward of the module that owns it, from after FSDP's all-gather (FSDP's
      pre-forward hook runs first) to before its reshard (this check's hook runs before FSDP's post-forward).

    A forward without gradient that writes a weight is therefore reported as without FSDP. Without FSDP2 in the
    model this finds nothing and costs nothing.

    Args:
        modules: The model's modules.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        fsdp_params = _fsdp_params(modules)
        self.entries = [(fp, fp.sharded_param, _data_version(fp.sharded_param)) for fp in fsdp_params]
        self.names: dict[int, tuple[nn.Module, list[str]]] = {}
        for fp in fsdp_params:
            info = fp._module_info
            for mod, name in zip(
                [info.module, *info.shared_modules], [info.param_name, *info.shared_param_names], strict=True
            ):
                self.names.setdefault(id(mod), (mod, []))[1].append(name)
        self.changed: list[tuple[nn.Module, str]] = []
        self._open: dict[tuple[int, str], tuple[Tensor, int]] = {}
        self.hooks = [
            handle
            for mod, _ in self.names.values()
            for handle in (
                mod.register_forward_pre_hook(self._enter),
                mod.register_forward_hook(self._leave, prepend=True),
            )
        ]

    def manages(self, mod: nn.Module, name: str) -> bool:
        """Whether FSDP2 manages parameter ``name`` of ``mod``."""
        return name in self.names.get(id(mod), (mod, []))[1]

    def sharded_params(self) -> list[Tensor]:
        """The sharded parameters."""
        return [sharded for _, sharded, _ in self.entries]

    def _enter(self, mod: nn.Module, args: object) -> None:
        for name in self.names[id(mod)][1]:
            param = mod._parameters.get(name)
            if param is not None:
                self._open[(id(mod), name)] = (param, param._version)

    def _leave(self, mod: nn.Module, args: object, output: object) -> None:
        for name in self.names[id(mod)][1]:
            opened = self._open.pop((id(mod), name), None)
            if opened is not None and _changed(mod, name, *opened):
                self.changed.append((mod, name))

    def restore(self) -> list[tuple[nn.Module, str]]:
        """Remove the hooks; return the parameters written in the block, each once, as ``(module, name)``."""
        for hook in self.hooks:
            hook.remove()
        changed = list(self.changed)
        for fp, sharded, version in self.entries:
            if fp.sharded_param is not sharded or _data_version(sharded) != version:
                changed.append((fp._module_info.module, fp._module_info.param_name))
        unique = {(id(mod), name): (mod, name) for mod, name in changed}
        return list(unique.values())


def _changed(mod: nn.Module, name: str, param: Tensor, version: int) -> bool:
    return mod._parameters.get(name) is not param or param._version != version


def _data_version(param: Tensor) -> int:
    """The version counter of a ``DTensor``'s local shard (a wrapper's own counter does not see writes)."""
    return int(getattr(param, "_local_tensor", param)._version)


def _fsdp_params(modules: list[nn.Module]) -> list[Any]:
    """FSDP2's records (``FSDPParam``) of the parameters it manages in ``modules``; empty without FSDP2."""
    # Nothing can be sharded if FSDP was never imported; torch < 2.6 has no public `FSDPModule` (FSDP2 is checked
    # like any module there).
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is None:
        return []
    out: list[Any] = []
    for mod in modules:
        if isinstance(mod, fsdp_module):
            for group in _param_groups(mod._get_fsdp_state()):
                out.extend(group.fsdp_params)
    return out


def _param_groups(state: Any) -> list[Any]:
    """An FSDP2 state's parameter groups: a list in recent torch, one optional group in older releases."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def _has_lazy(mod: nn.Module) -> bool:
    tensors = [*mod._parameters.values(), *mod._buffers.values()]
    return any(t is not None and is_lazy(t) for t in tensors)


@contextmanager
def preserved(model: nn.Module | None, mode: SelectionMode = "eval") -> Iterator[None]:
    """Run the block with ``model`` in ``mode`` (``"eval"`` or ``"train"``), then restore the model exactly.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(3, 3, 1), nn.InstanceNorm1d(3, track_running_stats=True))
        >>> before = net[1].running_mean.clone()
        >>> with preserved(net, "train"), torch.no_grad():
        ...     _ = net(torch.randn(4, 3, 5))
        >>> torch.equal(net[1].running_mean, before), net.training
        (True, True)
    """
    one_of(mode, "selection_mode", ("eval", "train"))
    if model is None:
        yield
        return
    snapshot = ModelSnapshot(model)
    with torch.random.fork_rng(devices=sorted(snapshot.cuda_devices), enabled=True):
        try:
            if mode == "eval":
                model.eval()
            yield
        finally:
            snapshot.restore(model)
