"""The library's classes as the ``lightning-maxup`` LightningCLI subcommands know them, and their short help page.

:data:`LIBRARY_CLASSES` is the one list of the models, data modules, callbacks and networks that ``fit``,
``validate``, ``test`` and ``predict`` accept by short name (``--model MaxUpClassifier``): the CLI imports their
modules before it builds its parser, so jsonargparse knows them as subclasses. :func:`help_page` prints them with
the first paragraph of each docstring, read from the source with :mod:`ast`: the page needs neither torch nor
Lightning, whose imports take several seconds, while LightningCLI's complete help stays one flag away
(``--help-all``).
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = ["COMMON_OPTIONS", "KINDS", "LIBRARY_CLASSES", "LibraryClass", "help_page", "summary"]

_PACKAGE = "lightning_maxup"
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LibraryClass:
    """One class (or factory) the CLI accepts by short name.

    Args:
        kind: ``"model"``, ``"data"``, ``"callback"`` or ``"network"`` (a ``backbone`` of the models).
        path: Its public import path, e.g. ``"lightning_maxup.recipes.models.MaxUpClassifier"``.
        module: The module that defines it, whose source holds its docstring.
    """

    kind: str
    path: str
    module: str

    @property
    def name(self) -> str:
        """The short name: ``"MaxUpClassifier"``."""
        return self.path.rpartition(".")[2]


#: The library's LightningModules, LightningDataModules and Callbacks, and the networks its models take (its base
#: class ``Classifier``, which does not train, is known to the CLI but not listed).
LIBRARY_CLASSES: tuple[LibraryClass, ...] = tuple(
    LibraryClass(kind, f"{_PACKAGE}.{path}", f"{_PACKAGE}.{module}")
    for kind, path, module in (
        ("model", "recipes.models.MaxUpClassifier", "recipes.models.classifier"),
        ("model", "recipes.models.AWDLSTMLanguageModel", "recipes.models.awd_lstm"),
        ("model", "certify.SmoothAdvClassifier", "certify.recipes"),
        ("model", "certify.SmoothedCertifier", "certify.recipes"),
        ("data", "recipes.datamodules.DigitsDataModule", "recipes.datamodules"),
        ("data", "recipes.datamodules.ImageNetMultiViewDataModule", "recipes.datamodules"),
        ("data", "recipes.textdata.WordLanguageData", "recipes.textdata"),
        ("data", "data.datasets.CIFARDataModule", "data.datasets"),
        ("data", "data.datasets.ImageNetDataModule", "data.datasets"),
        ("callback", "MaxUp", "training.callback"),
        ("callback", "training.schedule.MultiViewSchedule", "training.schedule"),
        ("callback", "WorstOfKValidation", "evaluation.worst_of_k"),
        ("callback", "SelectionFidelity", "evaluation.fidelity"),
        ("callback", "SelectionMonitor", "callbacks.monitor"),
        ("callback", "recipes.finetune.FreezeNormalization", "recipes.finetune"),
        ("callback", "callbacks.timing.EpochTimer", "callbacks.timing"),
        ("network", "recipes.models.SmallCNN", "recipes.models.small"),
        ("network", "recipes.models.CIFARResNet", "recipes.models.resnet_cifar"),
        ("network", "recipes.models.WideResNet", "recipes.models.wide_resnet"),
        ("network", "recipes.finetune.torchvision_model", "recipes.finetune"),
    )
)

#: The page's sections: kind, heading, and how the class is named on the command line.
KINDS: tuple[tuple[str, str], ...] = (
    ("model", "Models (--model NAME)"),
    ("data", "Data modules (--data NAME)"),
    ("callback", "Callbacks (--trainer.callbacks+ NAME, once per callback)"),
    ("network", "Networks (--model.init_args.backbone NAME)"),
)

#: The options most runs set, with a line each; LightningCLI's ``--help`` lists every one.
COMMON_OPTIONS: tuple[tuple[str, str], ...] = (
    ("-c, --config CONFIG", "a YAML config, e.g. examples/configs/digits.yaml; flags after it override it"),
    ("--print_config", "print the complete configuration and exit"),
    ("--seed_everything SEED", "seed of every random generator (default: a random seed)"),
    ("--trainer.max_epochs N", "epochs to train"),
    ("--trainer.accelerator NAME", "cpu, gpu, mps or auto"),
    ("--trainer.devices N", "devices per node"),
    (
        "--trainer.logger LOGGER",
        "default: TensorBoardLogger if tensorboard is installed, else CSVLogger; false for none",
    ),
    ("--trainer.default_root_dir DIR", "where logs and checkpoints go (default: the current directory)"),
    ("--ckpt_path PATH", "checkpoint to resume from or to evaluate"),
    ("--model.help NAME", "every option of a model; also --data.help, --trainer.callbacks.help"),
)

_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`")


def _plain(text: str) -> str:
    """``text`` without reStructuredText markup: roles give their last name, literals their content."""
    return _ROLE.sub(r"\1", text).replace("``", "").replace("`", "")


@cache
def _definitions(module: str) -> dict[str, ast.ClassDef | ast.FunctionDef]:
    path = _ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}


def summary(entry: LibraryClass) -> str:
    """The first paragraph of the docstring of ``entry``, on one line and without markup, read from the source.

    Empty where the source is not installed (a package shipped as bytecode only): the page then lists names only.
    """
    try:
        definitions = _definitions(entry.module)
    except OSError:
        return ""
    docstring = ast.get_docstring(definitions[entry.name]) or ""
    return _plain(" ".join(docstring.split("\n\n")[0].split()))


# The base class and the protocol the diagnostics read: not augmentations to pick on the command line.
_NOT_AUGMENTATIONS = ("Augmentation", "DescribedAugmentation")


def _augmentations() -> list[str]:
    tree = ast.parse((_ROOT / "augment" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names = ast.literal_eval(node.value)
            return [name for name in names if name[0].isupper() and name not in _NOT_AUGMENTATIONS]
    return []


def _table(rows: list[tuple[str, str]], width: int = 100) -> list[str]:
    column = max(len(left) for left, _ in rows) + 2
    lines = []
    for left, right in rows:
        wrapped = textwrap.wrap(right, width - column - 2) or [""]
        lines.append(f"  {left.ljust(column)}{wrapped[0]}")
        lines.extend(" " * (column + 2) + more for more in wrapped[1:])
    return lines


def help_page(command: str) -> str:
    """The short help of ``lightning-maxup COMMAND`` for a LightningCLI subcommand: the library's classes by kind.

    Example:
        >>> page = help_page("fit")
        >>> page.startswith("usage: lightning-maxup fit")
        True
        >>> "  MaxUpClassifier " in page and "  DigitsDataModule " in page and "  MaxUp " in page
        True
    """
    lines = [
        f"usage: lightning-maxup {command} [-c CONFIG] [--model NAME] [--data NAME] [--trainer.OPTION VALUE] ...",
        "",
        f"LightningCLI's {command}. The library's classes below go by their short name on the command line and",
        "as class_path in YAML (--model MaxUpClassifier, class_path: MaxUp); any other class by its import path.",
    ]
    for kind, heading in KINDS:
        rows = [(entry.name, summary(entry)) for entry in LIBRARY_CLASSES if entry.kind == kind]
        lines += ["", f"{heading}:", *_table(rows)]
    lines += ["", "Augmentations (model.init_args.maxup.augment, lightning_maxup.augment):"]
    lines += textwrap.wrap(", ".join(_augmentations()), 98, initial_indent="  ", subsequent_indent="  ")
    lines += ["", "Common options:", *_table(list(COMMON_OPTIONS))]
    if command == "fit":
        lines += ["", "At the end, fit prints the final validation metrics, the best checkpoint and the log directory."]
    lines += [
        "",
        f"lightning-maxup {command} --help-all lists every option (all Trainer arguments; takes a few seconds).",
    ]
    return "\n".join(lines)
