"""The ``lightning-maxup`` command.

Subcommands: ``demo``, LightningCLI's ``fit``/``validate``/``test``/``predict``, and ``certify``/``certify-table``.
``lightning-maxup fit --config examples/configs/digits.yaml`` trains any LightningModule and DataModule named by
``class_path`` in the YAML; MaxUp's ``m``, augmentation, warm-up and selection size are set there.
"""

from __future__ import annotations

import sys

__all__ = ["cli_main", "main"]

_USAGE = """usage: lightning-maxup {demo,fit,validate,test,predict,certify,certify-table} ...

  demo           ordinary augmentation vs MaxUp on the bundled digits (no download)
  fit ...        LightningCLI: train from a YAML config (lightning-maxup fit --config CONFIG)
  validate, test, predict
                 LightningCLI's other subcommands
  certify        randomized-smoothing certification of a trained model
  certify-table  certified-accuracy table and plot from certification files
"""


def cli_main(argv: list[str] | None = None) -> None:
    """LightningCLI over any LightningModule and LightningDataModule (``class_path`` in the config)."""
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-maxup`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from lightning_maxup.demo import main as demo_main

        return demo_main(rest)
    if command == "certify":
        from lightning_maxup.certify.cli import certify_main

        return certify_main(rest)
    if command == "certify-table":
        from lightning_maxup.certify.cli import certify_table_main

        return certify_table_main(rest)
    if command in ("fit", "validate", "test", "predict"):
        cli_main(argv)
        return 0
    print(f"lightning-maxup: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
