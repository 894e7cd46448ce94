"""The heatmap image against reference PNGs, as a person sees it, and one figure redrawn for every heatmap of a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_gradguard.outputs.heatmap import HeatmapFigure, heatmap_size, render_heatmap

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


def _differing_pixels(image: np.ndarray, reference: np.ndarray) -> int:
    """Pixels whose colour differs from the reference by more than ``VISIBLE`` levels in some channel."""
    delta = np.abs(image.astype(np.int16) - reference.astype(np.int16)).max(axis=2)
    return int((delta > VISIBLE).sum())


#: The references were written on another machine; text antialiasing may differ in a few edge pixels between
#: machines, so the images must agree as a person sees them: at most ``MAX_DIFFERING`` of the pixels visibly
#: different (a missing or moved label, a wrong colour scale or a shifted cell changes hundreds to thousands).
VISIBLE, MAX_DIFFERING = 24, 0.0002


@pytest.mark.skipif(
    not matplotlib.__version__.startswith(REFERENCE_MATPLOTLIB + "."),
    reason=f"reference PNGs drawn with matplotlib {REFERENCE_MATPLOTLIB}",
)
@pytest.mark.parametrize("name", sorted(HEATMAP_CASES))
def test_render_heatmap_draws_what_the_reference_shows(name: str) -> None:
    args, kwargs = HEATMAP_CASES[name]
    image = render_heatmap(*args, **kwargs)
    assert image.shape == (*heatmap_size(len(args[0]), kwargs.get("width", 1000)), 3) and image.dtype == np.uint8
    reference = _read_png(DATA / f"heatmap_{name}.png")
    assert reference.shape == image.shape
    differing = _differing_pixels(image, reference)
    assert differing <= MAX_DIFFERING * image.shape[0] * image.shape[1], f"{differing} pixels differ visibly"
    assert float(np.abs(image.astype(np.float64) - reference).mean()) < 0.05


def test_the_reference_comparison_sees_a_missing_label_and_a_wrong_colour_scale() -> None:
    (layers, steps, grid), kwargs = HEATMAP_CASES["mixed"]
    image = render_heatmap(layers, steps, grid, **kwargs)
    pixels = image.shape[0] * image.shape[1]
    shorter = render_heatmap(layers, steps, grid, title="Gradient norm", **kwargs)
    assert _differing_pixels(shorter, image) > MAX_DIFFERING * pixels
    shifted = render_heatmap(layers, steps, np.asarray(grid) + 0.5, **kwargs)  # the colour bar's numbers move
    assert _differing_pixels(shifted, image) > MAX_DIFFERING * pixels


def test_one_figure_redrawn_gives_the_pixels_of_a_fresh_one_and_keeps_one_pixel_buffer() -> None:
    import gc

    from matplotlib.backends.backend_agg import RendererAgg

    figure = HeatmapFigure()
    order = ["mixed", "many_layers", "one_cell", "mixed", "all_zero", "all_zero", "mixed"]
    gc.collect()
    gc.disable()  # a dropped figure lives until a full collection, as in a long training process
    try:
        before = sum(isinstance(o, RendererAgg) for o in gc.get_objects())
        redrawn = {}
        for name in order:
            args, kwargs = HEATMAP_CASES[name]
            redrawn[name] = figure.render(*args, **kwargs)
        for _ in range(3):  # the same size again and again: the buffer is reused
            figure.render(*HEATMAP_CASES["mixed"][0], **HEATMAP_CASES["mixed"][1])
        buffers = sum(isinstance(o, RendererAgg) for o in gc.get_objects()) - before
    finally:
        gc.enable()
    assert buffers <= len(set(order))  # one per change of size, none per image
    for name, image in redrawn.items():
        args, kwargs = HEATMAP_CASES[name]
        assert np.array_equal(image, render_heatmap(*args, **kwargs)), name


def test_a_trainer_fit_writing_many_heatmaps_keeps_one_pixel_buffer(tmp_path: Path) -> None:
    import gc

    import lightning.pytorch as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from matplotlib.backends.backend_agg import RendererAgg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch import nn

    from lightning_gradguard import GradGuard

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    x = torch.randn(24, 8, 4, generator=torch.Generator().manual_seed(0))
    batches = [(b, b.sum(dim=1, keepdim=True)) for b in x]
    trainer = L.Trainer(
        max_steps=24,
        logger=TensorBoardLogger(tmp_path, name="", version=0),
        callbacks=[GradGuard(log_every_n_steps=1, heatmap_every_n_steps=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    gc.collect()
    gc.disable()  # a dropped figure lives until a full collection, which a long run reaches rarely
    try:
        before = sum(isinstance(o, RendererAgg) for o in gc.get_objects())
        trainer.fit(Regression(), torch.utils.data.DataLoader(batches, batch_size=None))
        buffers = sum(isinstance(o, RendererAgg) for o in gc.get_objects()) - before
    finally:
        gc.enable()
    events = EventAccumulator(str(tmp_path / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("gradguard/heatmap")) >= 10
    assert buffers == 1
