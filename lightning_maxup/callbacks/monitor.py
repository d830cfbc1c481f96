"""``SelectionMonitor``: pictures of what MaxUp selects, logged every few steps.

MaxUp (Gong, Ren, Ye & Liu, CVPR 2021, arXiv:2002.09024) trains on each sample's worst of ``m`` augmented copies.
Which copies are the worst says what the model finds hard: the Cutout box over the strokes, the strongest
noise, the most mixed CutMix. On a logging step this callback logs

- a grid of ``num_samples`` samples (rows) by their ``m`` candidates (columns), the selected copy framed, each
  with its selection-pass loss (image data only);
- for each number an augmentation's :meth:`~lightning_maxup.augment.Augmentation.describe` gives of its draw,
  its distribution over the selected copies next to its distribution over all ``m * B`` drawn copies (Cutout box
  centre, crop offset, flip, CutMix/Mixup λ, noise norm, point-cloud angle and scale, RandAugment ops and
  magnitudes, and whatever a user's own augmentation describes);
- the gap ``worst - mean`` of the selection losses over training, which with Gaussian noise estimates
  Theorem 1's penalty (TensorBoard and the others plot the mixin's ``maxup/gap`` scalar; the PNG fallback draws
  it).

The drawn parameters are recorded as the augmentation draws them, not re-drawn: on a logging step the module's
augmentation is wrapped in :class:`RecordingAugment`, which makes exactly the calls the augmentation makes
itself (``sample`` then ``apply``), so training is bit-identical with and without the monitor. Other steps
cost one integer comparison. The monitor knows no augmentation by its class: it asks each one to describe its
draw.

The pure parts (:func:`candidate_grid`, :func:`drawn_features`, :func:`selection_stats` and the ``render_*``
functions) import no Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_maxup._extras import require
from lightning_maxup._lightning import Callback
from lightning_maxup._validation import positive_int
from lightning_maxup.augment import Augmentation, Compose, DescribedAugmentation
from lightning_maxup.core.batch import first_floating
from lightning_maxup.core.functional import MaxUpOutput
from lightning_maxup.training.mixin import MaxUpMixin, require_maxup_module

if TYPE_CHECKING:
    from lightning_maxup._lightning import pl

__all__ = [
    "Drawn",
    "GridLayout",
    "RecordingAugment",
    "SelectionMonitor",
    "candidate_grid",
    "drawn_features",
    "render_candidates",
    "render_gap",
    "render_params",
    "selection_rate_maps",
    "selection_stats",
]

#: RGB of the frame around each sample's selected (worst) copy, and around the other copies.
SELECTED_COLOUR = (228, 26, 28)
OTHER_COLOUR = (190, 190, 190)
_BACKGROUND = 255

# ----------------------------------------------------------------------------------------------------------------
# Recording the drawn parameters
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Drawn:
    """The parameters one augmentation drew in one call.

    Attributes:
        augmentation: The augmentation that drew them (a
            :class:`~lightning_maxup.augment.DescribedAugmentation`).
        params: What its ``sample`` returned (one value per row of the expanded batch).
    """

    augmentation: DescribedAugmentation
    params: dict[str, Any]


class RecordingAugment:
    """Wrap an augmentation so that each call keeps the parameters its steps drew.

    An :class:`~lightning_maxup.augment.Augmentation` (built-in or a user's subclass) is called as
    ``apply(batch, sample(batch, generator))``, exactly what its own ``__call__`` does, and a
    :class:`~lightning_maxup.augment.Compose` calls its steps in turn as its own ``__call__`` does, so the random
    draws, their order and the output are those of the wrapped augmentation. An object of another class that has
    ``sample``, ``apply`` and ``describe`` (a :class:`~lightning_maxup.augment.DescribedAugmentation`) is called
    the same way, which its calling convention promises. Any other callable (or an ``Augmentation`` subclass that
    overrides ``__call__``) is called as it is and records nothing.

    Args:
        augment: The augmentation to wrap, ``augment(batch, generator=...) -> batch``.

    Example:
        >>> from lightning_maxup.augment import Cutout, RandomHorizontalFlip
        >>> aug = Compose([RandomHorizontalFlip(), Cutout(size=2)])
        >>> rec = RecordingAugment(aug)
        >>> x = torch.rand(6, 1, 8, 8)
        >>> out = rec(x, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(out, aug(x, generator=torch.Generator().manual_seed(0)))
        True
        >>> [(type(d.augmentation).__name__, sorted(d.params)) for d in rec.last]
        [('RandomHorizontalFlip', ['flip']), ('Cutout', ['cx', 'cy'])]
    """

    def __init__(self, augment: Callable[..., Any]) -> None:
        self.augment = augment
        # The conventional pointer to the wrapped callable (as functools.wraps sets it), for code that looks
        # through wrappers.
        self.__wrapped__ = augment
        #: The parameters drawn by the latest call, in the order they were drawn.
        self.last: list[Drawn] = []

    def __call__(self, batch: Any, *, generator: Any = None) -> Any:
        """Augment ``batch`` as the wrapped augmentation does, keeping the drawn parameters in :attr:`last`."""
        record: list[Drawn] = []
        out = _run(self.augment, batch, generator, record)
        self.last = record
        return out

    def __repr__(self) -> str:
        return f"RecordingAugment({self.augment!r})"


def _run(augment: Any, batch: Any, generator: Any, record: list[Drawn]) -> Any:
    if isinstance(augment, Compose) and type(augment).__call__ is Compose.__call__:
        for step in augment.augmentations:
            batch = _run(step, batch, generator, record)
        return batch
    if isinstance(augment, Augmentation):
        separable = type(augment).__call__ is Augmentation.__call__
    else:
        separable = isinstance(augment, DescribedAugmentation)
    if separable:
        params = augment.sample(batch, generator)
        record.append(Drawn(augment, params))
        return augment.apply(batch, params)
    return augment(batch, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# From drawn parameters to one number per row: each augmentation describes its own draw
# ----------------------------------------------------------------------------------------------------------------


def _described(d: Drawn) -> dict[str, Tensor]:
    values = d.augmentation.describe(d.params)
    for name, v in values.items():
        if not isinstance(v, Tensor) or v.dim() != 1:
            got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"Expected `{type(d.augmentation).__name__}.describe` to give one number per row for `{name}` "
                f"(a 1-D tensor), got {got}"
            )
    return values


def drawn_features(drawn: Sequence[Drawn]) -> dict[str, Tensor]:
    """One float64 CPU value per row for every number each augmentation's ``describe`` gives of its draw.

    Named ``"<Augmentation class>/<name>"``; an augmentation class drawn twice gets ``#2`` appended. The
    built-ins describe themselves (Cutout and CutMix their box centre, RandomCrop its offset,
    RandomHorizontalFlip 0/1, CutMix and Mixup their λ, the noises the norm of the noise they add, ...); see
    :meth:`lightning_maxup.augment.Augmentation.describe`.

    Raises:
        ValueError: If a ``describe`` gives anything other than 1-D tensors.

    Example:
        >>> from lightning_maxup.augment import Cutout
        >>> cut = Cutout(size=2)
        >>> feats = drawn_features([Drawn(cut, cut.sample(torch.zeros(5, 1, 8, 8), torch.Generator()))])
        >>> sorted(feats), feats["Cutout/centre_x"].shape
        (['Cutout/centre_x', 'Cutout/centre_y'], torch.Size([5]))
    """
    out: dict[str, Tensor] = {}
    for d in drawn:
        values = _described(d)
        prefix = type(d.augmentation).__name__
        k = 1
        while any(name.startswith(f"{prefix}/") for name in out) and k < 100:
            k += 1
            prefix = f"{type(d.augmentation).__name__}#{k}"
        for name, v in values.items():
            out[f"{prefix}/{name}"] = v.detach().to(device="cpu", dtype=torch.float64)
    return out


def selection_stats(features: dict[str, Tensor], selected: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Pair every feature's ``m * B`` drawn values with the ``B`` values of the selected copies.

    Row ``k * B + i`` of the copy-major expanded batch is copy ``k`` of sample ``i``, so sample ``i``'s selected
    row is ``selected[i] * B + i``. Features without one value per row of the expanded batch are left out.

    Args:
        features: Per-row values, from :func:`drawn_features`.
        selected: Each sample's selected copy, ``[B]`` (:attr:`~lightning_maxup.MaxUpOutput.selected`).

    Returns:
        ``{name: (all [m * B], selected [B])}``.

    Example:
        >>> stats = selection_stats({"f": torch.tensor([0.0, 1.0, 2.0, 3.0])}, torch.tensor([1, 0]))
        >>> stats["f"][1].tolist()  # sample 0's copy 1 is row 2, sample 1's copy 0 is row 1
        [2.0, 1.0]
    """
    b = int(selected.shape[0])
    rows = selected.detach().cpu().long() * b + torch.arange(b)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, values in features.items():
        if b and values.shape[0] % b == 0 and values.shape[0] >= b:
            out[name] = (values, values[rows])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The candidate grid
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridLayout:
    """Where each candidate lies in the grid of :func:`candidate_grid`.

    Attributes:
        boxes: ``[k, m, 4]`` pixel boxes ``(top, left, height, width)`` of each candidate image (inside its frame).
        selected: ``[k]``, the framed copy of each sample.
        frame: Frame width in pixels around every tile.
    """

    boxes: Tensor
    selected: Tensor
    frame: int


def _to_rgb(tiles: Tensor) -> Tensor:
    """Images ``[n, C, h, w]`` as floats ``[n, 3, h, w]`` in ``[0, 1]``, scaled together by their range."""
    tiles = tiles.detach().float()
    tiles = tiles[:, :1].expand(-1, 3, -1, -1) if tiles.shape[1] != 3 else tiles
    low, high = tiles.amin(), tiles.amax()
    return ((tiles - low) / (high - low)).clamp(0, 1) if high > low else torch.zeros_like(tiles)


def candidate_grid(
    images: Tensor,
    selected: Tensor,
    num_samples: int,
    *,
    min_side: int = 64,
    frame: int = 3,
    spacing: tuple[int, int] = (18, 4),
) -> tuple[Tensor, GridLayout]:
    """Lay out the first ``num_samples`` samples' ``m`` candidates, sample per row, copy per column, worst framed.

    Args:
        images: The ``m * B`` candidate images ``[m * B, C, H, W]``, copy-major (row ``k * B + i`` is copy ``k`` of
            sample ``i``); one or three channels shown as they are, others by their first channel.
        selected: Each sample's selected copy ``[B]``; its tile gets a :data:`SELECTED_COLOUR` frame, the others
            :data:`OTHER_COLOUR`.
        num_samples: Samples to show (at most ``B``).
        min_side: Candidates are enlarged (nearest neighbour, by an integer factor) to at least this many pixels.
        frame: Frame width in pixels.
        spacing: Pixels between rows (room for the losses' text) and between columns.

    Returns:
        ``(grid, layout)``: a ``uint8`` image ``[3, H', W']`` and the :class:`GridLayout`.

    Example:
        >>> images = torch.rand(8, 1, 4, 4)  # m = 4 copies of B = 2 samples, 4x4 pixels
        >>> grid, layout = candidate_grid(images, torch.tensor([3, 0]), 2, min_side=8)
        >>> grid.shape, layout.boxes[1, 2].tolist()  # sample 1, copy 2: (top, left, height, width)
        (torch.Size([3, 64, 68]), [35, 39, 8, 8])
    """
    b = int(selected.shape[0])
    m = int(images.shape[0]) // b
    k = min(num_samples, b)
    scale = max(1, math.ceil(min_side / max(images.shape[-2:])))
    index = (torch.arange(m)[None, :] * b + torch.arange(k)[:, None]).reshape(-1)  # [k * m], sample-major
    tiles = _to_rgb(images.index_select(0, index.to(images.device)).cpu())
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest") if scale > 1 else tiles
    h, w = int(tiles.shape[-2]), int(tiles.shape[-1])
    cell_h, cell_w = h + 2 * frame + spacing[0], w + 2 * frame + spacing[1]
    grid = torch.full((3, k * cell_h, m * cell_w - spacing[1]), _BACKGROUND, dtype=torch.uint8)
    chosen = selected[:k].detach().cpu().long()
    boxes = torch.zeros(k, m, 4, dtype=torch.long)
    pixels = (tiles * 255).round().to(torch.uint8)
    for i in range(k):
        for j in range(m):
            top, left = i * cell_h, j * cell_w
            colour = SELECTED_COLOUR if j == int(chosen[i]) else OTHER_COLOUR
            grid[:, top : top + h + 2 * frame, left : left + w + 2 * frame] = torch.tensor(colour)[:, None, None]
            grid[:, top + frame : top + frame + h, left + frame : left + frame + w] = pixels[i * m + j]
            boxes[i, j] = torch.tensor([top + frame, left + frame, h, w])
    return grid, GridLayout(boxes, chosen, frame)


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg canvas: no pyplot state, no display)
# ----------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "SelectionMonitor's figures", "plots").FigureCanvasAgg
    Figure = require("matplotlib.figure", "SelectionMonitor's figures", "plots").Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig: Any) -> np.ndarray:
    """The figure as an ``[H, W, 3]`` uint8 RGB array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def render_candidates(grid: Tensor, layout: GridLayout, losses: Tensor, title: str = "") -> np.ndarray:
    """Draw :func:`candidate_grid`'s grid with each candidate's loss under it; the selected loss in bold.

    Args:
        grid: The ``uint8`` grid ``[3, H, W]``.
        layout: Its :class:`GridLayout`.
        losses: Selection-pass losses of the shown candidates, ``[k, m]`` (sample, copy).
        title: Figure title (may hold line breaks).

    Returns:
        An ``[H', W', 3]`` uint8 RGB image.

    Example:
        >>> grid, layout = candidate_grid(torch.rand(4, 1, 8, 8), torch.tensor([1, 0]), 2)
        >>> render_candidates(grid, layout, torch.rand(2, 2)).dtype
        dtype('uint8')
    """
    h, w = int(grid.shape[1]), int(grid.shape[2])
    width = max(w, 380)
    title_px = 14 * (title.count("\n") + 1) + 10 if title else 6
    fig = _figure(width / 100, (h + title_px) / 100)
    ax = fig.add_axes((0, 0, 1, h / (h + title_px)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    margin = (width - w) / 2
    ax.set_xlim(-margin - 0.5, w + margin - 0.5)
    ax.set_axis_off()
    for i in range(layout.boxes.shape[0]):
        for j in range(layout.boxes.shape[1]):
            top, left, bh, bw = (int(v) for v in layout.boxes[i, j])
            chosen = j == int(layout.selected[i])
            ax.text(
                left + bw / 2, top + bh + layout.frame + 2, f"{float(losses[i, j]):.3g}", ha="center", va="top",
                fontsize=8, fontweight="bold" if chosen else "normal",
                color=np.array(SELECTED_COLOUR) / 255 if chosen else "black",
            )  # fmt: skip
    if title:
        fig.text(0.5, 1 - 4 / (h + title_px), title, fontsize=8, ha="center", va="top")
    return _pixels(fig)


def _bins(values: Tensor) -> np.ndarray | int:
    low, high = float(values.min()), float(values.max())
    integral = bool(torch.all(values == values.round())) and high - low <= 40
    return np.arange(low - 0.5, high + 1.5) if integral else 20


def selection_rate_maps(stats: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """For each box centre (``<name>/centre_y`` with ``<name>/centre_x``), how often a box there is selected.

    Returns ``{name: rate [H, W]}``, the share of the draws centred at each pixel that were selected, times
    ``m`` (so 1 is chance: ``1 / m`` of all draws are selected); NaN where nothing was drawn.

    Example:
        >>> ys, xs = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])  # m = 2, B = 2
        >>> stats = {"Cutout/centre_y": (ys, ys[[2, 3]]), "Cutout/centre_x": (xs, xs[[2, 3]])}
        >>> selection_rate_maps(stats)["Cutout"].tolist()
        [[0.0, 0.0], [2.0, 2.0]]
    """
    maps: dict[str, Tensor] = {}
    for name in stats:
        prefix = name[: -len("/centre_y")]
        if not name.endswith("/centre_y") or f"{prefix}/centre_x" not in stats:
            continue
        (ya, ys), (xa, xs) = stats[name], stats[f"{prefix}/centre_x"]
        h, w = int(ya.max()) + 1, int(xa.max()) + 1
        drawn = torch.bincount((ya * w + xa).long(), minlength=h * w).double()
        chosen = torch.bincount((ys * w + xs).long(), minlength=h * w).double()
        m = ya.shape[0] / max(1, ys.shape[0])
        maps[prefix] = (chosen / drawn * m).view(h, w)
    return maps


def _histogram(ax: Any, name: str, drawn: Tensor, chosen: Tensor) -> None:
    edges = np.histogram_bin_edges(drawn.numpy(), bins=_bins(drawn))
    every, _ = np.histogram(drawn.numpy(), bins=edges, density=True)
    picked, _ = np.histogram(chosen.numpy(), bins=edges, density=True)
    ax.stairs(every, edges, fill=True, color="0.7", label=f"all {drawn.numel()} draws")
    ax.stairs(picked, edges, linewidth=2, color="#e41a1c", label=f"{chosen.numel()} selected")
    ax.set_title(f"{name}\nmean {float(drawn.mean()):.3g} (all), {float(chosen.mean()):.3g} (selected)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper right")


def _rate_map(fig: Any, ax: Any, name: str, rate: Tensor) -> None:
    image = ax.imshow(rate.numpy(), cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(f"{name}: box centre, selected\nshare x m (1 = chance)", fontsize=8)
    ax.set_xlabel("x", fontsize=7)
    ax.set_ylabel("y", fontsize=7)
    ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)


def render_params(stats: dict[str, tuple[Tensor, Tensor]], title: str = "") -> np.ndarray:
    """Histograms of each drawn parameter: all draws (grey) against the selected copies (red), as densities.

    Box centres also get a map of :func:`selection_rate_maps`.

    Args:
        stats: ``{name: (all, selected)}`` from :func:`selection_stats`.
        title: Figure title.

    Returns:
        An ``[H, W, 3]`` uint8 RGB image.

    Example:
        >>> stats = {"Mixup/lam": (torch.rand(32), torch.rand(8))}
        >>> render_params(stats).shape[-1]
        3
    """
    maps = selection_rate_maps(stats)
    panels = len(stats) + len(maps)
    cols = min(3, max(1, panels))
    rows = max(1, math.ceil(panels / cols))
    fig = _figure(3.4 * cols, 2.6 * rows + 0.5)
    for n, (name, (drawn, chosen)) in enumerate(stats.items()):
        _histogram(fig.add_subplot(rows, cols, n + 1), name, drawn, chosen)
    for n, (name, rate) in enumerate(maps.items()):
        _rate_map(fig, fig.add_subplot(rows, cols, len(stats) + n + 1), name, rate)
    if not stats:
        fig.text(0.5, 0.5, "no readable drawn parameters", ha="center")
    if title:
        fig.suptitle(title, fontsize=9)
    # Fixed margins: tight_layout measures every tick label and costs more than drawing the figure.
    top = 1 - 0.75 / (2.6 * rows + 0.5)
    fig.subplots_adjust(left=0.07, right=0.96, bottom=0.45 / (2.6 * rows + 0.5), top=top, wspace=0.35, hspace=0.6)
    return _pixels(fig)


def render_gap(history: Sequence[tuple[int, float]], title: str = "") -> np.ndarray:
    """Line plot of the selection gap ``worst - mean`` (Theorem 1's penalty term) against the step.

    Example:
        >>> render_gap([(10, 0.5), (20, 0.4)]).ndim
        3
    """
    fig = _figure(5, 3)
    ax = fig.add_subplot(1, 1, 1)
    steps, gaps = [s for s, _ in history], [g for _, g in history]
    ax.plot(steps, gaps, marker="o", markersize=3, color="#377eb8")
    ax.set_xlabel("step")
    ax.set_ylabel("worst - mean selection loss")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "MaxUp gap over training", fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.16, top=0.9)
    return _pixels(fig)


# ----------------------------------------------------------------------------------------------------------------
# Where the pictures go
# ----------------------------------------------------------------------------------------------------------------


class _Sink:
    """A destination for images (``[H, W, 3]`` uint8) and, where supported, histograms."""

    histograms = False
    draws_gap = False

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        raise NotImplementedError

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        """Log a native histogram (only sinks with ``histograms = True`` are asked)."""


class _TensorBoardSink(_Sink):
    histograms = True

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values, step)


class _WandbSink(_Sink):  # pragma: no cover - wandb is not installed in the test environment
    histograms = True

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.logger.log_image(key=tag, images=[rgb], step=step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        import wandb

        self.logger.experiment.log({tag: wandb.Histogram(values.numpy()), "trainer/global_step": step})


class _MLflowSink(_Sink):  # pragma: no cover - mlflow is not installed in the test environment
    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.logger.experiment.log_image(self.logger.run_id, rgb, f"{tag}_step{step:07d}.png")


class _PngSink(_Sink):
    draws_gap = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        image = require("matplotlib.image", "SelectionMonitor's figures", "plots")

        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag.split("/")[-1])
        path = self.directory / (f"{name}.png" if step < 0 else f"{name}_step{step:07d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.imsave(path, rgb)


def _sink_for(logger: Any) -> _Sink | None:
    kind = type(logger).__name__
    if kind == "WandbLogger":
        return _WandbSink(logger)  # pragma: no cover
    if kind == "MLFlowLogger":
        return _MLflowSink(logger)  # pragma: no cover
    if kind == "TensorBoardLogger":
        writer = logger.experiment
        if callable(getattr(writer, "add_image", None)) and callable(getattr(writer, "add_histogram", None)):
            return _TensorBoardSink(writer)
    return None


def _sinks(trainer: pl.Trainer) -> list[_Sink]:
    loggers = list(trainer.loggers)
    sinks = [s for s in map(_sink_for, loggers) if s is not None]
    if sinks:
        return sinks
    directory = next((getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None) for lg in loggers), None)
    return [_PngSink(Path(directory or trainer.default_root_dir) / "maxup_monitor")]


# ----------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------


class SelectionMonitor(Callback):
    """Log what MaxUp selects every ``every_n_steps`` optimizer steps: candidates, drawn parameters and the gap.

    MaxUp (Gong et al., "MaxUp", CVPR 2021) trains each sample on the worst of its ``m`` augmented copies; this
    shows which copies those are. On a logging step it logs

    - ``maxup_monitor/candidates``: ``num_samples`` samples (rows) by their ``m`` copies, the selected (worst)
      copy framed in red, every copy's selection-pass loss under it. Only for image batches (a 4-D float
      input); point clouds and tokens get the parameters alone;
    - ``maxup_monitor/params``: for every number the augmentations describe of their draws (their
      :meth:`~lightning_maxup.augment.Augmentation.describe`), its distribution over the
      ``B`` selected copies against all ``m * B`` draws; with TensorBoard (or W&B) also as native histograms
      ``maxup_monitor/<Augmentation>/<parameter>/all`` and ``.../selected``;
    - ``maxup_monitor/gap`` (PNG fallback only): the selection gap ``worst - mean`` at every logging step so
      far; the loggers get the mixin's ``maxup/gap`` scalar at every step.

    The images go to the Trainer's TensorBoard, W&B or MLflow logger; with no logger, or one that takes no
    images (CSV), PNG files are written to ``<log_dir>/maxup_monitor/`` (``trainer.default_root_dir`` without a
    logger). Only global rank 0 records and logs, and steps during the warm-up (``m = 1``) log nothing.

    On a logging step the module's ``maxup_config.augment`` is wrapped in a :class:`RecordingAugment` and
    ``maxup_record`` is set for that one step, then both are restored: the wrapper makes the augmentation's own
    calls in the same order, so training is bit-identical with and without the monitor. On other steps the
    callback compares two integers.

    Args:
        every_n_steps: Log at optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ...
        num_samples: Samples shown in the candidate grid.

    Example:
        >>> monitor = SelectionMonitor(every_n_steps=50, num_samples=4)
        >>> monitor.state_dict()
        {'every_n_steps': 50, 'num_samples': 4, 'gap_history': []}
        >>> SelectionMonitor(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `every_n_steps` to be a positive integer, got 0
    """

    def __init__(self, every_n_steps: int = 100, num_samples: int = 8) -> None:
        self.every_n_steps = positive_int(every_n_steps, "every_n_steps")
        self.num_samples = positive_int(num_samples, "num_samples")
        self.gap_history: list[tuple[int, float]] = []
        self._sinks: list[_Sink] = []
        self._armed: tuple[RecordingAugment | None, Any, bool] | None = None
        self._last_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_maxup_module(pl_module, "SelectionMonitor")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sinks = _sinks(trainer) if trainer.is_global_zero else []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (step + 1) % self.every_n_steps or step == self._last_step or not self._sinks:
            return
        assert isinstance(pl_module, MaxUpMixin)
        if pl_module.maxup_active_m > 1:
            self._last_step = step
            self._arm(pl_module)

    def _arm(self, module: MaxUpMixin) -> None:
        config = module.maxup_config
        recorder = RecordingAugment(config.augment) if config.augment is not None else None
        self._armed = (recorder, config.augment, module.maxup_record)
        if recorder is not None:
            module.maxup_config = config.replace(augment=recorder)
        module.maxup_record = True

    def _disarm(self, module: MaxUpMixin) -> RecordingAugment | None:
        assert self._armed is not None
        recorder, augment, record = self._armed
        self._armed = None
        if recorder is not None and module.maxup_config.augment is recorder:
            module.maxup_config = module.maxup_config.replace(augment=augment)
        if not record:  # turn recording off only if this callback turned it on: another may have turned it off
            module.maxup_record = False
        return recorder

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._armed is None:
            return
        assert isinstance(pl_module, MaxUpMixin)
        out = pl_module.maxup_last_output
        recorder = self._disarm(pl_module)
        if not pl_module.maxup_record:
            pl_module.maxup_last_output = None  # the candidates are m * B rows: don't hold them until next step
        if out is not None and out.m > 1:
            self.log_selection(out, recorder.last if recorder is not None else [], trainer.global_step)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._armed is not None and isinstance(pl_module, MaxUpMixin):
            self._disarm(pl_module)

    def log_selection(self, out: MaxUpOutput, drawn: Sequence[Drawn], step: int) -> None:
        """Log one step's candidates, drawn parameters and gap to this monitor's destinations."""
        self.gap_history.append((step, float(out.gap)))
        images = first_floating(out.candidates, 4)
        if images is not None:
            grid, layout = candidate_grid(images, out.selected, self.num_samples)
            k = layout.boxes.shape[0]
            losses = out.candidate_losses[:, :k].detach().cpu().T
            title = (
                f"MaxUp candidates at step {step}\nrows: samples; columns: their m={out.m} copies\n"
                "framed: the selected (worst) copy"
            )
            self._image("maxup_monitor/candidates", render_candidates(grid, layout, losses, title), step)
        stats = selection_stats(drawn_features(drawn), out.selected)
        title = f"step {step}: drawn parameters, selected copies against all draws"
        self._image("maxup_monitor/params", render_params(stats, title), step)
        for sink in self._sinks:
            if sink.histograms:
                for name, (every, chosen) in stats.items():
                    sink.histogram(f"maxup_monitor/{name}/all", every, step)
                    sink.histogram(f"maxup_monitor/{name}/selected", chosen, step)
            if sink.draws_gap:
                sink.image("maxup_monitor/gap", render_gap(self.gap_history), -1)

    def _image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        for sink in self._sinks:
            sink.image(tag, rgb, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "num_samples": self.num_samples,
            "gap_history": [list(p) for p in self.gap_history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gap_history = [(int(s), float(g)) for s, g in state_dict.get("gap_history", [])]
