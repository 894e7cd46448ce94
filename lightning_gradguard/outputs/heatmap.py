"""Layer x step heatmap of log10 gradient L2 norm, rendered to an RGB array.

One picture that shows vanishing and exploding gradients at a glance: one row per layer in model
order (first layer on top), one column per log step, colour = log10 of the layer's gradient L2 norm
(the logged ``layer_norm/*`` value, :func:`log10_norm`) with a labelled colour scale. The TensorBoard
image and ``gradguard report --png`` draw this same quantity. Zero norms (``-inf`` after log10) are drawn
black, missing or non-finite values light grey; a note under the step axis says so.

matplotlib (Agg canvas, no pyplot, no global state) is imported lazily; without it
:func:`render_heatmap` raises an ImportError that says what to install.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_gradguard.keys import log10_norm

__all__ = ["NORM_LABEL", "HeatmapFigure", "heatmap_size", "log10_norm", "norm_grid", "render_heatmap"]

NORM_LABEL = "log10 gradient L2 norm"
"""Colour-scale label of every GradGuard heatmap (TensorBoard image and report PNG)."""

_DPI = 100
_MAX_LABEL = 40  # characters of a layer name shown before it is shortened in the middle


def heatmap_size(n_layers: int, width: int = 1000) -> tuple[int, int]:
    """Pixel size ``(height, width)`` of :func:`render_heatmap` output for ``n_layers`` rows."""
    if n_layers < 1:
        raise ValueError(f"`n_layers` must be >= 1, got {n_layers!r}")
    return min(1600, max(360, 150 + 18 * n_layers)), width


def norm_grid(layers: Sequence[str], steps: Sequence[int], norms: Mapping[str, Mapping[int, float]]) -> np.ndarray:
    """``(len(layers), len(steps))`` grid of :func:`log10_norm` cells from ``layer -> step -> L2 norm``.

    A step missing for a layer is NaN (grey).
    """
    grid = np.full((len(layers), len(steps)), np.nan)
    for r, layer in enumerate(layers):
        series = norms.get(layer, {})
        for c, step in enumerate(steps):
            grid[r, c] = log10_norm(series.get(step, math.nan))
    return grid


def _shorten(name: str) -> str:
    if len(name) <= _MAX_LABEL:
        return name
    keep = (_MAX_LABEL - 3) // 2
    return f"{name[:keep]}...{name[-keep:]}"


def render_heatmap(
    layers: Sequence[str],
    steps: Sequence[int],
    log10_norms: Any,
    title: str = "Gradient norm per layer",
    *,
    colorbar_label: str = NORM_LABEL,
    width: int = 1000,
) -> np.ndarray:
    """Render a layer x step heatmap.

    Args:
        layers: layer names in model order; the first is drawn on top.
        steps: the step of every column.
        log10_norms: 2-D array-like of shape ``(len(layers), len(steps))`` with log10 norms (see
            :func:`norm_grid`); ``-inf`` means a zero norm, NaN/``+inf`` a missing or non-finite value.
        title: figure title.
        colorbar_label: label of the colour scale.
        width: image width in pixels (>= 400); the height follows from :func:`heatmap_size`.

    Returns:
        ``uint8`` RGB array of shape ``(height, width, 3)``.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the shapes do not match or are empty.
    """
    return HeatmapFigure().render(layers, steps, log10_norms, title, colorbar_label=colorbar_label, width=width)


class HeatmapFigure:
    """One matplotlib figure and pixel buffer, redrawn for every heatmap of a run.

    matplotlib figures are reference cycles: a figure dropped after drawing (with its ~1.5 MB pixel buffer
    and thousands of artists) lives on until Python's next full garbage collection, which in a process
    holding a Trainer, a model and their imports can be dozens of heatmaps away; the memory they took is
    then rarely given back to the system. Redrawing one figure keeps one buffer for the whole run (a new
    one only when the image size changes), so the heatmap's memory does not depend on how many are drawn.
    :func:`render_heatmap` draws with a fresh one; both give the same pixels.

    Example:

        >>> figure = HeatmapFigure()
        >>> figure.render(["a", "b"], [0, 50], [[0.0, 1.0], [-1.0, -2.0]]).shape
        (360, 1000, 3)
    """

    def __init__(self) -> None:
        self._canvas: Any | None = None

    def render(
        self,
        layers: Sequence[str],
        steps: Sequence[int],
        log10_norms: Any,
        title: str = "Gradient norm per layer",
        *,
        colorbar_label: str = NORM_LABEL,
        width: int = 1000,
    ) -> np.ndarray:
        """Draw a heatmap into this figure; arguments, result and errors as for :func:`render_heatmap`."""
        grid = _checked_grid(layers, steps, log10_norms, width)
        height, width = heatmap_size(len(layers), width)
        fig = self._figure(width, height)
        labels = [_shorten(name) for name in layers]
        longest = max(len(s) for s in labels)
        left = min(0.45, (40 + 6.6 * longest) / width)  # room for the labels and the axis title
        fig.subplots_adjust(left=left, right=0.85, top=1 - 45 / height, bottom=75 / height)
        ax = fig.add_subplot(1, 1, 1)
        image, has_zero = _draw_cells(ax, grid)
        ax.set_title(title, fontsize=11)
        _label_axes(ax, labels, steps, height)
        _draw_colour_scale(fig, image, height, colorbar_label, extend="min" if has_zero else "neither")
        fig.canvas.draw()
        rgb = np.array(np.asarray(fig.canvas.buffer_rgba())[:, :, :3], dtype=np.uint8)  # a copy: the buffer is reused
        fig.clear()  # the artists of this image go now, not with the next full garbage collection
        return rgb

    def _figure(self, width: int, height: int) -> Any:
        """The figure, emptied and sized ``width`` x ``height`` pixels (matplotlib imported here)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
            raise ImportError("the gradient heatmap needs matplotlib: pip install lightning-gradguard[report]") from exc

        if self._canvas is None:
            self._canvas = FigureCanvasAgg(Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI))
        fig = self._canvas.figure
        fig.clear()
        fig.set_size_inches(width / _DPI, height / _DPI)
        return fig


def _checked_grid(layers: Sequence[str], steps: Sequence[int], log10_norms: Any, width: int) -> np.ndarray:
    """:func:`render_heatmap`'s arguments checked; the cells as a float64 array."""
    grid = np.asarray(log10_norms, dtype=np.float64)
    if grid.ndim != 2 or grid.shape != (len(layers), len(steps)):
        raise ValueError(
            f"`log10_norms` must have shape (len(layers), len(steps)) = ({len(layers)}, {len(steps)}), got {grid.shape}"
        )
    if not layers or not steps:
        raise ValueError(f"need at least one layer and one step, got {len(layers)} and {len(steps)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 400:
        raise ValueError(f"`width` must be an int >= 400, got {width!r}")
    return grid


def _draw_cells(ax: Any, grid: np.ndarray) -> tuple[Any, bool]:
    """The cells, coloured over the finite range; zero norms black, missing or non-finite grey.

    Returns:
        ``(image, whether some norm is zero)``.
    """
    from matplotlib import colormaps

    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 0.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    zero = np.isneginf(grid)
    shown = np.where(zero, lo - 1.0, grid)  # below the scale: drawn with the "under" colour
    shown = np.ma.masked_invalid(shown)
    cmap = colormaps["viridis"].with_extremes(under="black", bad="#d0d0d0")
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi, origin="upper")
    return image, bool(zero.any())


def _label_axes(ax: Any, labels: list[str], steps: Sequence[int], height: int) -> None:
    """Layer names on the y axis (first on top, thinned when too many to read); step numbers on the x axis."""
    rows_per_label = max(1, int(np.ceil(len(labels) * 12 / (height - 120))))
    yticks = list(range(0, len(labels), rows_per_label))
    ax.set_yticks(yticks)
    ax.set_yticklabels([labels[i] for i in yticks], fontsize=8)
    ax.set_ylabel("layer (model order)", fontsize=9)

    # step numbers at up to ~10 evenly spaced columns
    n_cols = len(steps)
    n_ticks = min(n_cols, 10)
    xticks = sorted({round(i * (n_cols - 1) / max(1, n_ticks - 1)) for i in range(n_ticks)})
    ax.set_xticks(xticks)
    ax.set_xticklabels([str(int(steps[i])) for i in xticks], fontsize=8, rotation=0)
    ax.set_xlabel("step", fontsize=9)


def _draw_colour_scale(fig: Any, image: Any, height: int, label: str, extend: str) -> None:
    """The labelled colour bar right of the cells, and the note on black and grey cells under the step axis."""
    cax = fig.add_axes((0.87, 75 / height, 0.022, 1 - 120 / height))
    bar = fig.colorbar(image, cax=cax, extend=extend)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    fig.text(
        0.01,
        0.012,
        "black: zero gradient    grey: missing or non-finite",
        fontsize=8,
        color="#444444",
    )
