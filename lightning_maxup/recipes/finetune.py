"""Fine-tuning pretrained networks with MaxUp: frozen normalisation layers and torchvision backbones.

The MaxUp paper (Gong et al., CVPR 2021, arXiv:2002.09024, Sec. 4.1) fine-tunes pretrained ImageNet networks
with MaxUp: ResNet-50/101 for 20 epochs at learning rate 1e-5, and EfficientNet with its BatchNorm layers frozen
for 5 epochs at learning rate 1e-4. Freezing a normalisation layer means both its affine parameters (no
gradient, so the optimizer leaves them alone) and its running statistics (eval mode, so no batch, not even the
worst-case MaxUp copies, moves them).

:func:`freeze_normalization` does this once on a plain module; :class:`FreezeNormalization` is the Lightning
callback that keeps it so for the whole fit, since Lightning calls ``model.train()`` at the start of every
training epoch and after every validation loop. :func:`torchvision_model` builds a torchvision network by name
with pretrained weights from torchvision or from a local file, for ``class_path`` in LightningCLI configs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from typing_extensions import override

from lightning_maxup._lightning import Callback, rank_zero_warn

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = ["FreezeNormalization", "NormLayers", "freeze_normalization", "normalization_layers", "torchvision_model"]

#: Which normalisation layers to freeze: with running statistics only, or all.
NormLayers = Literal["running_stats", "all"]

# Normalisation layers without running statistics: frozen only with ``layers="all"``.
_STATELESS_NORMS: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _check_layers(layers: Any) -> NormLayers:
    if layers not in ("running_stats", "all"):
        raise ValueError(f"Expected `layers` to be 'running_stats' or 'all', got {layers!r}")
    return layers


def normalization_layers(module: nn.Module, layers: NormLayers = "running_stats") -> Iterator[nn.Module]:
    """Yield the normalisation layers of ``module`` (``module`` itself included).

    Args:
        module: The network to search.
        layers: ``"running_stats"``: every layer with running statistics (``torch.nn.modules.batchnorm._NormBase``:
            BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants, InstanceNorm); ``"all"``: also GroupNorm,
            LayerNorm, LocalResponseNorm and RMSNorm.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
        >>> [type(m).__name__ for m in normalization_layers(net)]
        ['BatchNorm2d']
        >>> [type(m).__name__ for m in normalization_layers(net, "all")]
        ['BatchNorm2d', 'GroupNorm']
    """
    kinds: tuple[type[nn.Module], ...] = (_NormBase,) + (_STATELESS_NORMS if _check_layers(layers) == "all" else ())
    return (mod for mod in module.modules() if isinstance(mod, kinds))


def freeze_normalization(module: nn.Module, layers: NormLayers = "running_stats") -> list[nn.Module]:
    """Freeze the normalisation layers of ``module``: eval mode and no gradient for their parameters.

    In eval mode a BatchNorm layer normalises with its running statistics and never updates them (nor
    ``num_batches_tracked``); with ``requires_grad=False`` its weight and bias get no gradient, so optimizers skip
    them (weight decay and momentum included). ``module.train()`` puts the layers back in train mode, so call this
    again after every ``train()``, or let the :class:`FreezeNormalization` callback do it in Lightning.

    Args:
        module: The network to freeze in place.
        layers: Which normalisation layers (see :func:`normalization_layers`).

    Returns:
        The frozen layers.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> frozen = freeze_normalization(net)
        >>> net[1].training, net[1].weight.requires_grad, net[0].weight.requires_grad
        (False, False, True)
        >>> _ = net(torch.randn(8, 3))
        >>> int(net[1].num_batches_tracked)
        0
    """
    frozen = _freeze_parameters(module, layers)
    for mod in frozen:
        mod.eval()
    return frozen


def _freeze_parameters(module: nn.Module, layers: NormLayers) -> list[nn.Module]:
    frozen = list(normalization_layers(module, layers))
    for mod in frozen:
        for p in mod.parameters(recurse=False):
            p.requires_grad_(False)
    return frozen


class FreezeNormalization(Callback):
    """Keep the LightningModule's normalisation layers frozen during fine-tuning (parameters and statistics).

    The paper fine-tunes EfficientNet with MaxUp with its BatchNorm layers frozen (Gong et al., 2021,
    Sec. 4.1). Parameters stop requiring gradients in ``setup``, before the optimizers are configured, so they
    get no gradient, no weight decay and no momentum. Eval mode is applied when training starts (after Lightning's
    check for modules left in eval mode, which would otherwise warn) and re-applied at the start of every training
    epoch and batch, so a ``model.train()`` anywhere in between (user code, other callbacks, Lightning versions that
    call it after validation) cannot unfreeze the statistics. They stay exactly as loaded through the MaxUp
    selection pass (which restores each layer's mode), the gradient pass and validation alike.

    Freezing is all this callback does: it does not unfreeze, so a checkpoint resumed with it continues frozen.
    To freeze only part of the network, call :func:`freeze_normalization` on a submodule in your own callback.

    Args:
        layers: Which normalisation layers (see :func:`normalization_layers`); the paper freezes BatchNorm,
            ``"running_stats"``.

    Example:
        >>> cb = FreezeNormalization()
        >>> cb.state_dict()
        {'layers': 'running_stats'}
    """

    def __init__(self, layers: NormLayers = "running_stats") -> None:
        self.layers = _check_layers(layers)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        frozen = _freeze_parameters(pl_module, self.layers)
        if not frozen:
            rank_zero_warn(
                f"FreezeNormalization(layers={self.layers!r}) found no normalisation layer in"
                f" {type(pl_module).__name__}; nothing is frozen"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        freeze_normalization(pl_module, self.layers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        freeze_normalization(pl_module, self.layers)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        freeze_normalization(pl_module, self.layers)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"layers": self.layers}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("layers")
        if saved != self.layers:
            rank_zero_warn(
                f"FreezeNormalization was saved with layers={saved!r} and resumes with layers={self.layers!r};"
                " the new setting applies"
            )


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` of ``model`` for a fresh one with ``num_classes`` outputs."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ValueError(f"Cannot set `num_classes`={num_classes}: {type(model).__name__} has no nn.Linear head")
    name, old = last
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"Expected `checkpoint` to hold a state dict, got {type(state).__name__} from {str(path)!r}")
    return state


def torchvision_model(
    name: str,
    num_classes: int = 1000,
    weights: str | None = None,
    checkpoint: str | None = None,
) -> nn.Module:
    """Build a torchvision classification network by name, optionally pretrained, for fine-tuning.

    ``weights`` names torchvision weights (downloaded once into ``$TORCH_HOME`` by torchvision); ``checkpoint``
    loads a local file instead, with no network access: a state dict saved with ``torch.save``, or a checkpoint
    holding one under ``"state_dict"`` or ``"model"``. When the pretrained head has a different number of classes,
    the last linear layer is replaced by a freshly initialised one with ``num_classes`` outputs.

    Args:
        name: A torchvision model name, e.g. ``"resnet50"``, ``"resnet101"``, ``"efficientnet_b0"``.
        num_classes: Output classes.
        weights: torchvision weights name, e.g. ``"IMAGENET1K_V1"`` or ``"DEFAULT"``; ``None`` (or ``"null"``, as
            ``--...weights=null`` arrives from the command line) for random init.
        checkpoint: Path of a local state dict for the network with its pretrained head.

    Example:
        >>> net = torchvision_model("resnet18", num_classes=10)
        >>> net(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """
    import torchvision

    # jsonargparse turns a command-line ``--...weights=null`` into the string "None" for ``str | None``.
    weights = None if weights in ("None", "null") else weights
    checkpoint = None if checkpoint in ("None", "null") else checkpoint
    if name not in torchvision.models.list_models(torchvision.models):
        raise ValueError(f"Expected `name` to be a torchvision classification model such as 'resnet50', got {name!r}")
    if weights is not None and checkpoint is not None:
        raise ValueError(f"Expected only one of `weights` and `checkpoint`, got {weights!r} and {checkpoint!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive integer, got {num_classes!r}")
    if weights is not None:
        enum = torchvision.models.get_model_weights(name)
        try:
            resolved = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise ValueError(
                f"Expected `weights` to be one of {['DEFAULT', *enum.__members__]} for {name}, got {weights!r}"
            ) from None
        model = torchvision.models.get_model(name, weights=resolved)
    elif checkpoint is not None:
        state = _load_state_dict(checkpoint)
        model = torchvision.models.get_model(name)
        head = [key for key, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        head_weight = state.get(f"{head[-1]}.weight") if head else None
        if head_weight is not None and head_weight.shape[0] != 1000:
            _replace_head(model, int(head_weight.shape[0]))
        model.load_state_dict(state)
    else:
        return torchvision.models.get_model(name, num_classes=num_classes)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last_linear or last_linear[-1].out_features != num_classes:
        _replace_head(model, num_classes)
    return model
