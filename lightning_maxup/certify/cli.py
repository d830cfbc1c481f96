"""``lightning-maxup certify`` and ``lightning-maxup certify-table``.

``certify`` builds the model and data module from a LightningCLI YAML (``model:`` and ``data:`` with
``class_path``/``init_args``), loads a checkpoint, certifies a split of the data with
:class:`~lightning_maxup.certify.Smooth` (batched across inputs, with a progress bar), writes a TSV in Cohen et
al.'s format, prints the certified-accuracy table at radii 0.25, 0.5, ..., 2.75 and saves a PNG plot.

Rows go to ``OUTFILE.partial`` as they are certified (flushed to disk after each batch of inputs), with the run's
settings in ``OUTFILE.partial.json``; the partial file is renamed to ``OUTFILE`` only when every input is done, so
a file under the final name is always complete. Rerunning the same command resumes from the partial file. Each
input's noise is keyed by its dataset index, so a resumed run writes the same rows as an uninterrupted one (all
but the measured ``time`` column).

``certify-table`` rebuilds that table and plot from one or more certification files (for example one per σ),
marking the best σ at each radius and drawing the upper envelope over σ. Every row is validated first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_maxup.certify import functional as cf
from lightning_maxup.certify.table import (
    COLUMNS,
    Certification,
    format_row,
    markdown_table,
    plot_certified_accuracy,
    read_certification,
    sigma_from_path,
    sigma_label,
    table_radii,
)

__all__ = ["build_from_config", "certify_main", "certify_table_main"]

# Bump when a change makes certify write different rows for the same settings; a partial file of another
# version is then refused instead of being completed with rows of a different kind.
_FORMAT_VERSION = 1


class _CommandError(Exception):
    """An error a command reports as one line on stderr, with exit status 2."""


class _Interrupted(Exception):
    """Ctrl-C during certification: reported in one line, with the exit status of SIGINT (130)."""


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


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


def _load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error becomes a ValueError naming the line and column."""
    import yaml

    with path.open() as f:
        try:
            return yaml.safe_load(f)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"Malformed YAML in `--config` {str(path)!r}{where}: {err.problem or err}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"Malformed YAML in `--config` {str(path)!r}: {_one_line(err)}") from None


def build_from_config(config: str | Path) -> tuple[Any, Any]:
    """Instantiate ``(model, datamodule)`` from the ``model:`` and ``data:`` sections of a LightningCLI YAML.

    Other sections (``trainer``, ``seed_everything``, ``ckpt_path``, ...) are ignored, so the ``config.yaml`` a
    LightningCLI run saves beside its checkpoints works as is.

    Raises:
        FileNotFoundError: If ``config`` is not a file.
        ValueError: If the YAML is malformed (the message gives the line and column), lacks a section, or a
            section does not match the classes it names.
    """
    from jsonargparse import ArgumentParser

    from lightning_maxup._lightning import cli_namespace

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `--config` to be a YAML file, got {str(path)!r}")
    raw = _load_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"Expected `--config` {str(path)!r} to be a YAML mapping, got {type(raw).__name__}")
    missing = [key for key in ("model", "data") if key not in raw]
    if missing:
        raise ValueError(f"Expected `--config` {str(path)!r} to have `model:` and `data:` sections, missing {missing}")
    pl = cli_namespace(["--config", str(path)])  # the namespace of the config's classes
    parser = ArgumentParser(exit_on_error=False)
    # Plain class types (not `add_subclass_arguments`, which makes them optional) keep the errors short.
    parser.add_argument("--model", type=pl.LightningModule, required=True)
    parser.add_argument("--data", type=pl.LightningDataModule, required=True)
    try:
        cfg = parser.parse_object({"model": raw["model"], "data": raw["data"]})
    except argparse.ArgumentError as err:
        raise ValueError(f"Invalid `--config` {str(path)!r}: {_one_line(err)}") from None
    # `instantiate` replaces `instantiate_classes` from jsonargparse 4.49.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    init = instantiate(cfg)
    return init.model, init.data


def _names(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_state_dict(model: torch.nn.Module, state_dict: Any, ckpt: str | Path) -> None:
    """Raise a ValueError summarising missing, unexpected and mis-shaped keys in one line."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"Expected `--ckpt` {str(ckpt)!r} to hold a state dict, got {type(state_dict).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{len(found)} {what} ({_names(found)})"
        for what, found in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if found
    ]
    if problems:
        raise ValueError(
            f"Expected `--ckpt` {str(ckpt)!r} to hold the weights of the config's {type(model).__name__},"
            f" got {'; '.join(problems)}"
        )


def _load_checkpoint(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Load a Lightning checkpoint (or a bare state dict) into ``model``.

    Raises:
        FileNotFoundError: If ``ckpt`` is not a file.
        ValueError: If it cannot be read, or its weights do not fit ``model``.
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"Expected `--ckpt` to be a checkpoint file, got {str(ckpt)!r}")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many types on a file that is not a checkpoint
        raise ValueError(f"Could not read `--ckpt` {str(ckpt)!r}: {_one_line(err)}") from err
    state_dict = state.get("state_dict", state) if isinstance(state, dict) else state
    _check_state_dict(model, state_dict, ckpt)
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
        description=(
            "Certify a trained classifier by randomized smoothing (Cohen et al., 2019) and write a TSV."
            " Rows go to OUTFILE.partial as they are certified; it becomes OUTFILE only when every input is"
            " done. Rerun the same command to resume an interrupted run."
        ),
    )
    p.add_argument("--config", required=True, help="LightningCLI YAML with model: and data: sections")
    p.add_argument("--ckpt", default=None, help="Lightning checkpoint whose weights to certify")
    p.add_argument(
        "--allow-untrained",
        action="store_true",
        help="certify the config's freshly initialised weights when no --ckpt is given",
    )
    p.add_argument("--sigma", required=True, type=_type(float, cf.check_sigma, "sigma"), help="noise σ")
    p.add_argument("--n0", type=_count("n0"), default=cf.DEFAULT_N0, help="selection samples")
    p.add_argument("--n", type=_count("n"), default=cf.DEFAULT_N, help="estimation samples")
    p.add_argument("--alpha", type=_type(float, cf.check_alpha, "alpha"), default=cf.DEFAULT_ALPHA, help="failure rate")
    p.add_argument("--batch-size", type=_count("batch_size"), default=cf.DEFAULT_BATCH_SIZE, help="rows/forward")
    p.add_argument("--inputs-per-batch", type=_count("inputs_per_batch"), default=64, help="inputs certified together")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="data split to certify")
    p.add_argument("--skip", type=_count("skip"), default=1, help="certify every skip-th input")
    p.add_argument("--max", type=int, default=-1, help="stop after this many inputs (-1: all)")
    p.add_argument("--outfile", default=None, help="output TSV (default: certify_sigma_<σ>.tsv)")
    p.add_argument("--plot", default=None, help="output PNG (default: the TSV's name with .png)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (each input's noise is keyed by its index)")
    # Keyed noise is always on now (resuming needs it); the flag stays accepted so older commands still run.
    p.add_argument("--keyed-noise", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(args: argparse.Namespace, device: torch.device, num_inputs: int) -> dict[str, Any]:
    """Everything that decides the rows of a run: a partial file is resumed only under the same settings."""
    return {
        "format": _FORMAT_VERSION,
        "config_sha256": _sha256(args.config),
        "ckpt_sha256": None if args.ckpt is None else _sha256(args.ckpt),
        "split": args.split,
        "skip": args.skip,
        "max": args.max,
        "inputs": num_inputs,
        "sigma": args.sigma,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "inputs_per_batch": args.inputs_per_batch,
        "seed": args.seed,
        "device": str(device),
    }


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make a rename durable
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically: write a temporary file, flush it to disk, rename it."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _PartialRun:
    """The partial file of a certification run and its settings file.

    ``OUTFILE.partial`` holds the header and whole batches of rows, each batch written at once and flushed to
    disk; ``OUTFILE.partial.json`` holds the settings. :meth:`finish` renames the partial file to ``OUTFILE``.
    """

    def __init__(self, outfile: Path, settings: dict[str, Any], indices: Sequence[int], inputs_per_batch: int):
        self.outfile = outfile
        self.path = outfile.with_name(outfile.name + ".partial")
        self.meta = outfile.with_name(outfile.name + ".partial.json")
        self.settings = settings
        self.indices = list(indices)
        self.inputs_per_batch = inputs_per_batch

    def start(self) -> int:
        """Open the run, resuming the partial file if there is one; returns how many inputs are already done."""
        if not self.path.exists():
            _write_durably(self.meta, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
            _write_durably(self.path, "\t".join(COLUMNS) + "\n")
            return 0
        self._check_settings()
        return self._truncate_to_done()

    def _check_settings(self) -> None:
        again = f"delete {str(self.path)!r} and {str(self.meta)!r} to start again"
        try:
            saved = json.loads(self.meta.read_text())
        except FileNotFoundError:
            raise _CommandError(
                f"found the partial file {str(self.path)!r} but not its settings {str(self.meta)!r}, so it cannot"
                f" be resumed; {again}"
            ) from None
        except ValueError as err:
            raise _CommandError(f"cannot read the settings {str(self.meta)!r} ({err}); {again}") from None
        differ = [
            f"{key} {saved.get(key)!r} there, {value!r} now"
            for key, value in self.settings.items()
            if saved.get(key) != value
        ]
        if differ:
            raise _CommandError(
                f"the partial file {str(self.path)!r} belongs to a run with other settings ({'; '.join(differ)});"
                f" rerun with that run's settings to resume it, or {again}"
            )

    def _truncate_to_done(self) -> int:
        """Drop a torn last line and any rows of an incomplete batch; returns the number of rows kept."""
        data = self.path.read_bytes()
        lines = data[: data.rfind(b"\n") + 1].decode().splitlines(keepends=True)
        header = "\t".join(COLUMNS) + "\n"
        if not lines or lines[0] != header:
            _write_durably(self.path, header)
            return 0
        try:
            done = [int(line.split("\t", 1)[0]) for line in lines[1:]]
        except ValueError:
            done = [-1]
        if done != self.indices[: len(done)]:
            raise _CommandError(
                f"the partial file {str(self.path)!r} does not hold the first inputs of this run; delete"
                f" {str(self.path)!r} and {str(self.meta)!r} to start again"
            )
        # Whole batches only, so the resumed run forwards the same batches as an uninterrupted one.
        keep = len(done) if len(done) == len(self.indices) else len(done) - len(done) % self.inputs_per_batch
        size = sum(len(line.encode()) for line in lines[: keep + 1])
        with self.path.open("r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
        return keep

    def append(self, rows: Sequence[str]) -> None:
        """Append rows in one write and flush them to disk, so a kill leaves at most one torn batch."""
        with self.path.open("a") as f:
            f.write("".join(row + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Give the complete file its final name."""
        os.replace(self.path, self.outfile)
        _fsync_dir(self.outfile.parent)
        self.meta.unlink(missing_ok=True)


def _prepare(args: argparse.Namespace) -> tuple[Any, int, torch.device, Any]:
    """The model (weights loaded, on its device, in eval mode), its number of classes, the device and the dataset."""
    if args.ckpt is None and not args.allow_untrained:
        raise _CommandError(
            "no `--ckpt` given: pass the checkpoint to certify, or `--allow-untrained` to certify untrained weights"
        )
    try:
        model, datamodule = build_from_config(args.config)
    except (OSError, ValueError, TypeError, argparse.ArgumentError) as err:
        raise _CommandError(_one_line(err)) from err
    if args.ckpt is not None:
        try:
            _load_checkpoint(model, args.ckpt)
        except (OSError, ValueError) as err:
            raise _CommandError(_one_line(err)) from err
    num_classes = getattr(model, "num_classes", None) or getattr(datamodule, "num_classes", None)
    if not isinstance(num_classes, int):
        raise _CommandError("the model or data module must have an integer `num_classes` attribute")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model.to(device).eval()
    return model, num_classes, device, _dataset(datamodule, args.split)


def _run(args: argparse.Namespace) -> Path:
    """Certify what the partial file does not hold yet; returns the final file."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from lightning_maxup.certify.smoothing import Smooth

    model, num_classes, device, dataset = _prepare(args)
    indices = list(range(0, len(dataset), args.skip))
    if args.max >= 0:
        indices = indices[: args.max]
    if not indices:
        raise _CommandError(f"no inputs to certify: the {args.split} split has {len(dataset)}, `--max` is {args.max}")
    outfile = Path(args.outfile or f"certify_sigma_{args.sigma:.2f}.tsv")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    run = _PartialRun(outfile, _settings(args, device, len(indices)), indices, args.inputs_per_batch)
    done = run.start()
    if done:
        print(f"resuming {run.path}: {done} of {len(indices)} inputs already certified", file=sys.stderr)
    loader = DataLoader(Subset(dataset, indices[done:]), batch_size=args.inputs_per_batch, shuffle=False)
    smooth = Smooth(model, num_classes, args.sigma)
    bar = tqdm(
        total=len(indices), initial=done, desc=f"certify σ={args.sigma:g}", unit="input", disable=args.no_progress
    )
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1].tolist()
            idx = indices[done : done + len(y)]
            start = time.perf_counter()
            # Noise keyed by dataset index: an input's rows do not depend on where the run started.
            keys = torch.as_tensor(idx, dtype=torch.int64, device=device)
            prediction, radius = smooth.certify_batch(
                x, args.n0, args.n, args.alpha, args.batch_size, keys=keys, seed=args.seed
            )
            seconds = (time.perf_counter() - start) / len(y)
            run.append(
                [
                    format_row(i, label, p, r, int(p == label), seconds)
                    for i, label, p, r in zip(idx, y, prediction.tolist(), radius.tolist(), strict=True)
                ]
            )
            done += len(y)
            bar.update(len(y))
    except KeyboardInterrupt:
        raise _Interrupted(
            f"interrupted after {done} of {len(indices)} inputs; rerun the same command to resume from"
            f" {str(run.path)!r}"
        ) from None
    finally:
        bar.close()
    run.finish()
    return outfile


def certify_main(argv: list[str] | None = None) -> int:
    """Run ``lightning-maxup certify``; returns the exit status.

    Errors in the arguments, the config, the checkpoint or a partial file to resume are one line on stderr,
    with exit status 2. Ctrl-C stops with status 130, keeping the rows certified so far for a rerun to resume.

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
    try:
        outfile = _run(args)
    except _CommandError as err:
        print(f"lightning-maxup certify: error: {err}", file=sys.stderr)
        return 2
    except _Interrupted as err:
        print(f"lightning-maxup certify: {err}", file=sys.stderr)
        return 130
    cert = read_certification(outfile)
    label = sigma_label(args.sigma)
    radii = table_radii()
    plot = Path(args.plot) if args.plot else outfile.with_suffix(".png")
    print(f"certified {len(cert)} inputs of the {args.split} split (n0={args.n0}, n={args.n}, alpha={args.alpha})")
    print(f"smoothed-classifier accuracy (r = 0): {cert.accuracy_at([0.0])[0]:.3f}")
    print(markdown_table({label: cert.accuracy_at(radii)}, radii), end="")
    plot_certified_accuracy({sigma_label(args.sigma, html=False): cert}, plot, title=Path(args.config).stem)
    print(f"wrote {outfile} and {plot}")
    return 0


def _table_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-maxup certify-table",
        description=(
            "Certified-accuracy table and plot from certification TSV files (one per σ). Every row is validated"
            " first; each file's row count is printed to stderr."
        ),
    )
    p.add_argument("files", nargs="+", help="certification TSVs (columns idx label predict radius correct time)")
    p.add_argument("--labels", nargs="+", default=None, help="row labels (default: σ from each file name)")
    p.add_argument("--radius-start", type=float, default=0.25, help="first radius of the table")
    p.add_argument("--radius-stop", type=float, default=2.75, help="last radius of the table")
    p.add_argument("--radius-step", type=float, default=0.25, help="step between radii")
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    p.add_argument("--plot", default="certified_accuracy.png", help="output PNG")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p.add_argument("--no-envelope", action="store_true", help="do not draw the upper envelope over σ")
    return p


def _read_all(files: Sequence[str], labels: Sequence[str] | None) -> tuple[dict[str, Certification], dict[str, str]]:
    """Each file's validated rows under its row label, and the label's plain-text form for the plot."""
    if labels is not None and len(labels) != len(files):
        raise _CommandError(f"expected one `--labels` entry per file ({len(files)}), got {len(labels)}")
    results: dict[str, Certification] = {}
    plain_labels: dict[str, str] = {}
    for i, file in enumerate(files):
        sigma = sigma_from_path(file)
        if labels is not None:
            label = plain = labels[i]
        elif sigma is not None:
            label, plain = sigma_label(sigma), sigma_label(sigma, html=False)
        else:
            label = plain = Path(file).stem
        if label in results:
            raise _CommandError(f"two files have the row label {label!r}; pass `--labels`")
        try:
            results[label] = read_certification(file)
        except FileNotFoundError:
            raise _CommandError(f"no such file: {file!r}") from None
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise _CommandError(_one_line(err)) from None
        plain_labels[label] = plain
        print(f"{file}: {len(results[label])} rows", file=sys.stderr)
    counts = {len(c) for c in results.values()}
    if len(counts) > 1:
        listing = ", ".join(f"{file}: {len(c)}" for file, c in zip(files, results.values(), strict=True))
        print(
            f"warning: the files differ in row count ({listing}); their columns certify different inputs",
            file=sys.stderr,
        )
    return results, plain_labels


def certify_table_main(argv: list[str] | None = None) -> int:
    """Run ``lightning-maxup certify-table``; returns the exit status.

    A missing file, an invalid row (named by file, line and value) or a file without rows is one line on stderr,
    with exit status 2.

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
    try:
        radii = table_radii(args.radius_start, args.radius_stop, args.radius_step)
        results, plain_labels = _read_all(args.files, args.labels)
    except (_CommandError, ValueError) as err:
        print(f"lightning-maxup certify-table: error: {err}", file=sys.stderr)
        return 2
    table = markdown_table({label: c.accuracy_at(radii) for label, c in results.items()}, radii)
    print(table, end="")
    if args.output:
        Path(args.output).write_text(table)
    if not args.no_plot:
        plot = plot_certified_accuracy(
            {plain_labels[k]: v for k, v in results.items()},
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
