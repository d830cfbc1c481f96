"""Run a block with a model in a given mode and leave the model exactly as it was.

MaxUp's selection pass must be invisible: ``m`` forwards without gradient that change nothing. Listing the
layers that keep state (BatchNorm's running statistics) is not enough: InstanceNorm with tracked statistics,
``spectral_norm``'s power iteration, parametrizations and custom layers update buffers in ``forward``, and lazy
modules materialise their parameters on their first call. :func:`preserved` therefore snapshots the model itself:

- every buffer is cloned before the block and copied back (or its original object reassigned) afterwards, and
  a buffer the block registers or fills (a ``None`` slot, a cache) is removed or emptied again;
- every parameter's identity and version counter are recorded; forwards without gradient do not write
  parameters, and one that does is reported (restoring would need a copy of every weight);
- parameters and buffers of lazy modules are snapshotted right after they materialise, so the first forward of
  a ``LazyBatchNorm2d`` may be the selection pass;
- every module's ``training`` flag is restored through the module's own ``train()`` where it overrides it;
- the global CPU and CUDA random states are restored (dropout in train-mode selection draws masks from them), so
  the gradient pass draws what it would have drawn without a selection pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from lightning_maxup._validation import one_of
from lightning_maxup.config import SelectionMode

__all__ = ["ModeSnapshot", "ModelSnapshot", "modes_restored", "preserved"]


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
            if param is not None:
                self.params.append((mod, name, param, param._version))
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
        for mod, name, param, version in self.params:
            if mod._parameters.get(name) is not param or param._version != version:
                warnings.warn(
                    f"The MaxUp selection pass changed parameter `{name}` of {type(mod).__name__}, which cannot be"
                    " restored without a copy of every weight; make that module update its parameters only"
                    " with gradient enabled",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.modes.restore(model)


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
