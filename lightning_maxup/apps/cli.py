"""The ``lightning-maxup`` command.

Subcommands: ``demo``, LightningCLI's ``fit``/``validate``/``test``/``predict``, and ``certify``/``certify-table``.
``lightning-maxup fit --config examples/configs/digits.yaml`` trains any LightningModule and DataModule named by
``class_path`` in the YAML; MaxUp's ``m``, augmentation, warm-up and selection size are set there. The library's
models, data modules and callbacks go by their short name (``--model MaxUpClassifier``); ``fit --help`` lists them
without importing torch, ``fit --help-all`` is LightningCLI's complete help. The default logger is chosen here,
without Lightning's fallback warning: TensorBoard when ``tensorboard`` is installed, else CSV. ``fit`` ends with one
summary: the final validation metrics, the best checkpoint and the log directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_problem", "cli_main", "main", "version"]

_PROG = "lightning-maxup"
_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

_USAGE = """usage: lightning-maxup {demo,fit,validate,test,predict,study,certify,certify-table} ...
       lightning-maxup --version

  demo           where MaxUp helps and where it hurts, on the bundled digits (no download)
  fit ...        LightningCLI: train from a YAML config (lightning-maxup fit --config CONFIG);
                 fit --help lists the library's models, data modules and callbacks
  validate, test, predict
                 LightningCLI's other subcommands
  study ...      does MaxUp help on your data? paired-by-seed fits of a config, with a report
                 (lightning-maxup study --config CONFIG --m 1,2,4 --seeds 0,1,2,3 --out DIR)
  certify        randomized-smoothing certification of a trained model
  certify-table  certified-accuracy table and plot from certification files

Run lightning-maxup COMMAND --help for the options of a command.
"""


def version() -> str:
    """The version of the imported ``lightning_maxup`` (its ``__version__``).

    Not the installed distribution's metadata, which an editable install leaves at the version it was installed at.

    Example:
        >>> import lightning_maxup
        >>> version() == lightning_maxup.__version__
        True
    """
    import lightning_maxup

    return lightning_maxup.__version__


def _tensorboard_available() -> bool:
    """Whether Lightning's ``TensorBoardLogger`` can run: ``tensorboard`` or ``tensorboardX`` is installed."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _default_logger(namespace: Any, root_dir: str | None) -> Any:
    """The logger of a run that names none: TensorBoard if installed, else CSV, in ``root_dir`` or the cwd."""
    save_dir = root_dir or os.getcwd()
    if _tensorboard_available():  # versioned by the SLURM job id, if any, as Lightning's own default
        job_id = importlib.import_module(f"{namespace.__name__}.plugins.environments").SLURMEnvironment.job_id()
        return namespace.loggers.TensorBoardLogger(save_dir=save_dir, version=job_id)
    return namespace.loggers.CSVLogger(save_dir=save_dir)


def _fit_summary(trainer: Any) -> str:
    """One block after ``fit``: the final validation metrics, the checkpoint to use and the log directory."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_"))}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "none logged"
    lines = [f"{_PROG} fit finished: epochs {trainer.current_epoch}, steps {trainer.global_step}"]
    lines.append(f"  validation: {shown}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        monitor = checkpoint.monitor
        label = f"best checkpoint (by {monitor})" if monitor else "checkpoint (latest; no monitor set)"
        lines.append(f"  {label}: {checkpoint.best_model_path}")
    else:
        lines.append("  checkpoint: none saved")
    log_dir = trainer.log_dir if trainer.loggers else None  # None under fast_dev_run's dummy logger too
    lines.append(f"  logs: {log_dir}" if log_dir else "  logs: none (no logger)")
    return "\n".join(lines)


def _import_library(namespace: Any) -> None:
    """Import the library's classes, so that jsonargparse lists them and takes them by short name.

    Callbacks belong to both namespaces; the models and data modules only to the one :func:`_lightning.namespace`
    gives, and are imported only when the CLI runs on that one.
    """
    from lightning_maxup._lightning import namespace as library_namespace
    from lightning_maxup.apps._cli_help import LIBRARY_CLASSES

    same = namespace.__name__ == library_namespace()
    for module in dict.fromkeys(entry.module for entry in LIBRARY_CLASSES if same or entry.kind == "callback"):
        importlib.import_module(module)


def _lightning_cli_class(namespace: Any, link_vocab: bool = False) -> type:
    lightning_cli: Any = importlib.import_module(f"{namespace.__name__}.cli").LightningCLI  # of either namespace

    class _CLI(lightning_cli):
        """LightningCLI that parses the ``argv`` it is given without comparing it with ``sys.argv``.

        LightningCLI warns whenever ``args`` is passed while ``sys.argv`` holds arguments, which is always the case
        when the console script hands it its own arguments; parsing them here is what LightningCLI does otherwise.
        """

        def parse_arguments(self, parser: Any, args: Any) -> None:
            self.config = parser.parse_args(args)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            config = {**(self.config_init.get(f"{self.subcommand}.trainer") or {}), **kwargs}
            if config.get("logger") in (None, True) and not config.get("barebones"):
                kwargs["logger"] = _default_logger(namespace, config.get("default_root_dir"))
            return super().instantiate_trainer(**kwargs)

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                print(_fit_summary(self.trainer))

        def add_arguments_to_parser(self, parser: Any) -> None:
            if link_vocab:
                _link_vocab_size(parser)

    return _CLI


def _link_vocab_size(parser: Any) -> None:
    """Language models: a data module's ``vocab_size`` becomes the model's, computed once the data is built.

    The link is conditional: it applies where the data module has a ``vocab_size`` and the model takes one
    (:class:`~lightning_maxup.recipes.textdata.WordLanguageData` and
    :class:`~lightning_maxup.recipes.models.awd_lstm.AWDLSTMLanguageModel`, whose augmentation is built from it), and
    leaves every other configuration as it is.
    """
    parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=_vocab_size_of, apply_on="instantiate")


def _mentions_vocab_size(argv: list[str]) -> bool:
    """Whether the command line or a ``--config`` file it names mentions ``vocab_size`` (a language model's run).

    The vocabulary link is added only then: jsonargparse refuses a link target inside some other models' nested
    signatures (the ImageNet recipes' ``backbone``), so the link must not touch configurations that have no use for it.

    Example:
        >>> _mentions_vocab_size(["fit", "--model.vocab_size=10"]), _mentions_vocab_size(["fit"])
        (True, False)
    """
    for i, arg in enumerate(argv):
        if "vocab_size" in arg or "WordLanguageData" in arg or "AWDLSTM" in arg:
            return True
        path = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path is not None and Path(path).is_file():
            text = Path(path).read_text(errors="replace")
            if "vocab_size" in text or "WordLanguageData" in text or "AWDLSTM" in text:
                return True
    return False


def _vocab_size_of(data: Any) -> int | None:
    return getattr(data, "vocab_size", None)


def cli_main(argv: list[str] | None = None) -> None:
    """LightningCLI over any LightningModule and LightningDataModule (``class_path`` in the config).

    Raises:
        jsonargparse.ArgumentError: On a malformed or invalid configuration (:func:`main` prints it in one block).
    """
    from lightning_maxup._lightning import cli_namespace

    args = list(sys.argv[1:] if argv is None else argv)
    pl = cli_namespace(args)  # `pytorch_lightning` or `lightning.pytorch`: that of the config's own classes
    _import_library(pl)
    _lightning_cli_class(pl, link_vocab=_mentions_vocab_size(args))(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        # Raise instead of printing the whole usage (dozens of lines) before the message; `main` prints it.
        parser_kwargs={"exit_on_error": False, "prog": _PROG},
    )


def _ckpt_path(argv: list[str]) -> str | None:
    """The value of ``--ckpt_path`` in ``argv`` (``--ckpt_path X`` or ``--ckpt_path=X``), if any."""
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def checkpoint_problem(path: str | None) -> str | None:
    """Why ``path`` cannot be a checkpoint to resume from, or ``None``: checked before anything is built.

    A checkpoint is a zip archive whose directory sits at its end, so a truncated or corrupted file is caught by
    opening it, without reading the tensors. ``last``/``best``/``hpc`` and other non-file values are Lightning's.

    Example:
        >>> checkpoint_problem(None) is None
        True
    """
    if path is None or not Path(path).is_file():
        return None
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as err:
        return f"`--ckpt_path` {path!r} is not a readable checkpoint (truncated or corrupted?): {err}"


def _run_lightning(argv: list[str]) -> int:
    if argv[1:] in (["--help"], ["-h"]):
        from lightning_maxup.apps._cli_help import help_page

        print(help_page(argv[0]))
        return 0
    argv = ["--help" if arg == "--help-all" else arg for arg in argv]
    from jsonargparse import ArgumentError

    problem = checkpoint_problem(_ckpt_path(argv))
    if problem is not None:
        print(f"{_PROG} {argv[0]}: error: {problem}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            # Lightning 2.6 on recent torch warns on every fit about its own use of a deprecated torch pytree
            # API; nothing a user can act on.
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            cli_main(argv)
    except ArgumentError as err:
        print(f"{_PROG} {argv[0]}: error: {err}", file=sys.stderr)
        print(f"Run '{_PROG} {argv[0]} --help' for the accepted options.", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-maxup`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        print(f"{_PROG} {version()}")
        return 0
    if command == "demo":
        from lightning_maxup.apps.demo import main as demo_main

        return demo_main(rest)
    if command == "study":
        from lightning_maxup.apps.study import main as study_main

        return study_main(rest)
    if command == "certify":
        from lightning_maxup.certify.cli import certify_main

        return certify_main(rest)
    if command == "certify-table":
        from lightning_maxup.certify.cli import certify_table_main

        return certify_table_main(rest)
    if command in _LIGHTNING_COMMANDS:
        return _run_lightning(argv)
    print(f"{_PROG}: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
