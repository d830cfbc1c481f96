"""``lightning-maxup certify`` and ``lightning-maxup certify-table``.

``certify`` builds the model and data module from a LightningCLI YAML (``model:`` and ``data:`` with
``class_path``/``init_args``), loads an optional checkpoint, certifies a split of the data with
:class:`~lightning_maxup.certify.Smooth` (batched across inputs, with a progress bar), writes a TSV in Cohen et
al.'s format, prints the certified-accuracy table at radii 0.25, 0.5, ..., 2.75 and saves a PNG plot.

``certify-table`` rebuilds that table and plot from one or more certification files (for example one per σ),
marking the best σ at each radius and drawing the upper envelope over σ.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_maxup.certify import functional as cf
from lightning_maxup.certify.table import (
    Certification,
    markdown_table,
    plot_certified_accuracy,
    read_certification,
    sigma_from_path,
    sigma_label,
    table_radii,
    write_certification,
)

__all__ = ["build_from_config", "certify_main", "certify_table_main"]


def _type(cast: Callable[[str], Any], check: Callable[[Any], Any], name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts with ``cast`` and validates with ``check`` (which raises ValueError)."""

    def convert(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"Expected `{name}` to be a {cast.__name__}, got {text!r}") from err
        try:
            return check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return convert


def _count(name: str) -> Callable[[str], Any]:
    return _type(int, lambda v: cf.check_count(v, name), name)


def build_from_config(config: str | Path) -> tuple[Any, Any]:
    """Instantiate ``(model, datamodule)`` from the ``model:`` and ``data:`` sections of a LightningCLI YAML.

    Other sections (``trainer``, ``seed_everything``, ``ckpt_path``, ...) are ignored, so the ``config.yaml`` a
    LightningCLI run saves beside its checkpoints works as is.
    """
    import pytorch_lightning as pl
    import yaml
    from jsonargparse import ArgumentParser

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `--config` to be a YAML file, got {str(path)!r}")
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [key for key in ("model", "data") if key not in raw]
    if missing:
        raise ValueError(f"Expected `--config` {str(path)!r} to have `model:` and `data:` sections, missing {missing}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    cfg = parser.parse_object({"model": raw["model"], "data": raw["data"]})
    # `instantiate` replaces `instantiate_classes` from jsonargparse 4.49.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    init = instantiate(cfg)
    return init.model, init.data


def _load_checkpoint(model: torch.nn.Module, ckpt: str | Path) -> None:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state_dict = state.get("state_dict", state) if isinstance(state, dict) else state
    model.load_state_dict(state_dict)
    hook = getattr(model, "on_load_checkpoint", None)
    if callable(hook) and isinstance(state, dict) and "state_dict" in state:
        hook(state)


def _dataset(datamodule: Any, split: str) -> Any:
    stage = {"train": "fit", "val": "validate", "test": "test"}[split]
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup(stage)
    loader = getattr(datamodule, f"{split}_dataloader")()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    return loader.dataset


def _certify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-maxup certify",
        description="Certify a trained classifier by randomized smoothing (Cohen et al., 2019) and write a TSV.",
    )
    p.add_argument("--config", required=True, help="LightningCLI YAML with `model:` and `data:` sections")
    p.add_argument("--ckpt", default=None, help="Lightning checkpoint whose weights to certify")
    p.add_argument("--sigma", required=True, type=_type(float, cf.check_sigma, "sigma"), help="noise σ")
    p.add_argument("--n0", type=_count("n0"), default=cf.DEFAULT_N0, help="selection samples")
    p.add_argument("--n", type=_count("n"), default=cf.DEFAULT_N, help="estimation samples")
    p.add_argument("--alpha", type=_type(float, cf.check_alpha, "alpha"), default=cf.DEFAULT_ALPHA, help="failure rate")
    p.add_argument("--batch-size", type=_count("batch_size"), default=cf.DEFAULT_BATCH_SIZE, help="rows/forward")
    p.add_argument("--inputs-per-batch", type=int, default=64, help="inputs certified together")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="data split to certify")
    p.add_argument("--skip", type=_count("skip"), default=1, help="certify every skip-th input")
    p.add_argument("--max", type=int, default=-1, help="stop after this many inputs (-1: all)")
    p.add_argument("--outfile", default=None, help="output TSV (default: certify_sigma_<σ>.tsv)")
    p.add_argument("--plot", default=None, help="output PNG (default: the TSV's name with .png)")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:1', or 'auto'")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument(
        "--keyed-noise",
        action="store_true",
        help="draw each input's noise from a stream keyed by its index (reproducible whatever the batching)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def certify_main(argv: list[str] | None = None) -> int:
    """Run ``lightning-maxup certify``; returns the exit status.

    Example:
        >>> certify_main(["--help"])  # doctest: +ELLIPSIS
        usage: lightning-maxup certify ...
        0
    """
    parser = _certify_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from lightning_maxup.certify.smoothing import Smooth

    model, datamodule = build_from_config(args.config)
    if args.ckpt is not None:
        _load_checkpoint(model, args.ckpt)
    num_classes = getattr(model, "num_classes", None) or getattr(datamodule, "num_classes", None)
    if not isinstance(num_classes, int):
        print("error: the model or data module must have an integer `num_classes` attribute", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model.to(device).eval()
    dataset = _dataset(datamodule, args.split)
    indices = list(range(0, len(dataset), args.skip))
    if args.max >= 0:
        indices = indices[: args.max]
    loader = DataLoader(Subset(dataset, indices), batch_size=max(1, args.inputs_per_batch), shuffle=False)
    smooth = Smooth(model, num_classes, args.sigma)
    outfile = Path(args.outfile or f"certify_sigma_{args.sigma:.2f}.tsv")
    plot = Path(args.plot) if args.plot else outfile.with_suffix(".png")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    write_certification(outfile, [], [], [], [], [])
    generator = torch.Generator(device=device).manual_seed(args.seed)
    done = 0
    bar = tqdm(total=len(indices), desc=f"certify σ={args.sigma:g}", unit="input", disable=args.no_progress)
    for batch in loader:
        x, y = batch[0].to(device), batch[1]
        idx = torch.as_tensor(indices[done : done + len(y)])
        start = time.perf_counter()
        prediction, radius = smooth.certify_batch(
            x,
            args.n0,
            args.n,
            args.alpha,
            args.batch_size,
            generator=None if args.keyed_noise else generator,
            keys=idx.to(device) if args.keyed_noise else None,
            seed=args.seed,
        )
        seconds = (time.perf_counter() - start) / len(y)
        write_certification(
            outfile, idx.tolist(), y.tolist(), prediction.tolist(), radius.tolist(), [seconds] * len(y), append=True
        )
        done += len(y)
        bar.update(len(y))
    bar.close()
    cert = read_certification(outfile)
    label = sigma_label(args.sigma)
    radii = table_radii()
    print(f"certified {len(cert)} inputs of the {args.split} split (n0={args.n0}, n={args.n}, alpha={args.alpha})")
    print(f"smoothed-classifier accuracy (r = 0): {cert.accuracy_at([0.0])[0]:.3f}")
    print(markdown_table({label: cert.accuracy_at(radii)}, radii), end="")
    plot_certified_accuracy({sigma_label(args.sigma, html=False): cert}, plot, title=Path(args.config).stem)
    print(f"wrote {outfile} and {plot}")
    return 0


def _table_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-maxup certify-table",
        description="Certified-accuracy table and plot from certification TSV files (one per σ).",
    )
    p.add_argument("files", nargs="+", help="certification TSVs (columns idx label predict radius correct time)")
    p.add_argument("--labels", nargs="+", default=None, help="row labels (default: σ from each file name)")
    p.add_argument("--radius-start", type=float, default=0.25)
    p.add_argument("--radius-stop", type=float, default=2.75)
    p.add_argument("--radius-step", type=float, default=0.25)
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    p.add_argument("--plot", default="certified_accuracy.png", help="output PNG")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p.add_argument("--no-envelope", action="store_true", help="do not draw the upper envelope over σ")
    return p


def certify_table_main(argv: list[str] | None = None) -> int:
    """Run ``lightning-maxup certify-table``; returns the exit status.

    Example:
        >>> import tempfile, os
        >>> from lightning_maxup.certify.table import write_certification
        >>> path = os.path.join(tempfile.mkdtemp(), "noise_0.25_sigma_0.25.tsv")
        >>> write_certification(path, [0, 1], [3, 5], [3, 5], [0.6, 0.3], [0.1, 0.1])
        >>> certify_table_main([path, "--radius-stop", "0.5", "--no-plot"])
        |  | r = 0.25 |r = 0.5 |
        | --- |  --- | --- |
        <b> &sigma; = 0.25 </b>| 1.00<b>*</b> |0.50<b>*</b> |
        0
    """
    parser = _table_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.labels is not None and len(args.labels) != len(args.files):
        print(
            f"error: expected one `--labels` entry per file ({len(args.files)}), got {len(args.labels)}",
            file=sys.stderr,
        )
        return 2
    try:
        radii = table_radii(args.radius_start, args.radius_stop, args.radius_step)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results: dict[str, Certification] = {}
    plot_labels: dict[str, str] = {}
    for i, file in enumerate(args.files):
        sigma = sigma_from_path(file)
        if args.labels is not None:
            label = plain = args.labels[i]
        elif sigma is not None:
            label, plain = sigma_label(sigma), sigma_label(sigma, html=False)
        else:
            label = plain = Path(file).stem
        if label in results:
            print(f"error: two files have the row label {label!r}; pass `--labels`", file=sys.stderr)
            return 2
        results[label] = read_certification(file)
        plot_labels[label] = plain
    table = markdown_table({label: c.accuracy_at(radii) for label, c in results.items()}, radii)
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    if not args.no_plot:
        plot = plot_certified_accuracy(
            {plot_labels[k]: v for k, v in results.items()},
            args.plot,
            max_radius=max(radii) + args.radius_step,
            draw_envelope=not args.no_envelope,
        )
        print(f"wrote {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    commands = {"certify": certify_main, "certify-table": certify_table_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print("usage: python -m lightning_maxup.certify.cli {certify,certify-table} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
