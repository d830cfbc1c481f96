"""Ready-made networks and a generic MaxUp classifier for the CLI, the demo and the examples."""

from lightning_maxup.recipes.models.awd_lstm import AWDLSTM, AWDLSTMLanguageModel
from lightning_maxup.recipes.models.classifier import MaxUpClassifier
from lightning_maxup.recipes.models.resnet_cifar import CIFARResNet, InputNormalization
from lightning_maxup.recipes.models.small import SmallCNN
from lightning_maxup.recipes.models.wide_resnet import WideResNet

__all__ = [
    "AWDLSTM",
    "AWDLSTMLanguageModel",
    "CIFARResNet",
    "InputNormalization",
    "MaxUpClassifier",
    "SmallCNN",
    "WideResNet",
]
