"""The heatmap image, pixel for pixel: ``render_heatmap`` against PNGs rendered before it was split into helpers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_gradguard.heatmap import heatmap_size, render_heatmap

matplotlib = pytest.importorskip("matplotlib")
DATA = Path(__file__).parent / "data"
#: The references were drawn with this matplotlib (text rendering differs between releases).
REFERENCE_MATPLOTLIB = "3.11"


def _grid(rows: int, cols: int, seed: int) -> np.ndarray:
    grid = np.random.default_rng(seed).normal(-2.0, 1.5, size=(rows, cols))
    return grid


def _cases() -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    mixed = _grid(5, 12, 0)
    mixed[1, 3:6] = -math.inf  # zero norms: black, and the colour bar gets its "min" extension
    mixed[3, 7] = math.nan  # non-finite: grey
    mixed[4, 0] = math.inf
    many = [f"encoder.layers.{i}.self_attention.output_projection.linear" for i in range(150)]
    bands = np.floor(np.add.outer(np.linspace(-4.0, 1.0, 150), np.linspace(0.0, -1.0, 30)))  # labels thinned
    return {
        "mixed": ((["embed", "block.0", "block.1", "a" * 60, "head"], list(range(0, 1200, 100)), mixed), {}),
        "many_layers": ((many, [3 * i for i in range(30)], bands), {"title": "t", "width": 640}),
        "one_cell": ((["only"], [7], [[0.5]]), {"colorbar_label": "label", "width": 400}),
        "all_zero": ((["a", "b"], [0, 1, 2], np.full((2, 3), -math.inf)), {}),
    }


HEATMAP_CASES = _cases()


def write_png(image: np.ndarray, path: Path) -> None:
    """Save an RGB ``uint8`` image losslessly."""
    matplotlib.image.imsave(path, image)


def _read_png(path: Path) -> np.ndarray:
    rgba = matplotlib.image.imread(path)  # floats in [0, 1]
    return np.rint(rgba[:, :, :3] * 255).astype(np.uint8)


@pytest.mark.skipif(
    not matplotlib.__version__.startswith(REFERENCE_MATPLOTLIB + "."),
    reason=f"reference PNGs drawn with matplotlib {REFERENCE_MATPLOTLIB}",
)
@pytest.mark.parametrize("name", sorted(HEATMAP_CASES))
def test_render_heatmap_draws_the_reference_pixels(name: str) -> None:
    args, kwargs = HEATMAP_CASES[name]
    image = render_heatmap(*args, **kwargs)
    assert image.shape == (*heatmap_size(len(args[0]), kwargs.get("width", 1000)), 3) and image.dtype == np.uint8
    reference = _read_png(DATA / f"heatmap_{name}.png")
    assert reference.shape == image.shape
    assert np.array_equal(image, reference), f"{int((image != reference).any(axis=2).sum())} pixels differ"
