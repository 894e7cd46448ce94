"""Histograms and the heatmap image for loggers beyond TensorBoard: W&B and MLflow.

Scalars reach every Lightning logger through ``log_metrics``. The per-layer histograms (built on the
device, see :meth:`~lightning_gradguard.measure.stats.GradStats.histogram_counts`) and the layer x step heatmap
need a logger that understands them; :func:`rich_writers` finds one writer per such logger:

* :class:`~lightning.pytorch.loggers.TensorBoardLogger`: ``add_histogram_raw`` and ``add_image``
  (:class:`TensorBoardWriter`);
* :class:`~lightning.pytorch.loggers.WandbLogger`: ``wandb.Histogram(np_histogram=(counts, edges))`` from
  the same bins (no tensor is re-binned) and ``wandb.Image`` (:class:`WandbWriter`);
* :class:`~lightning.pytorch.loggers.MLFlowLogger`: the heatmap as a PNG artifact of the run
  (``MlflowClient.log_image``); MLflow has no histogram type, so histograms are skipped
  (:class:`MLflowWriter`);

and one notice line for each logger that takes neither (CSV and others). ``wandb`` and ``mlflow`` are
imported only when such a logger is attached.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_gradguard.keys import tag
from lightning_gradguard.measure.stats import HistogramData
from lightning_gradguard.outputs.tensorboard import write_histograms

__all__ = [
    "MLflowWriter",
    "RichWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "histogram_edges",
    "rich_writers",
]


def histogram_edges(h: HistogramData) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, edges)`` as ``numpy.histogram`` returns them, from device-built bins.

    ``bucket_limits`` are the right edges of the bins; the left edge of the first is the minimum.

    Example:

        >>> h = HistogramData(-1.0, 1.0, 4.0, 0.0, 2.0, [0.0, 1.0], [1.0, 3.0])
        >>> histogram_edges(h)
        (array([1., 3.]), array([-1.,  0.,  1.]))
    """
    counts = np.asarray(h.bucket_counts, dtype=np.float64)
    edges = np.asarray([h.min, *h.bucket_limits], dtype=np.float64)
    return counts, edges


class RichWriter(Protocol):
    """What the callback calls at histogram and heatmap steps, for every logger that takes them."""

    name: str

    def histograms(self, optimizer_idx: int, step: int, histograms: Mapping[str, HistogramData]) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None: ...


class TensorBoardWriter:
    """Histograms with ``add_histogram_raw``, images with ``add_image`` (HWC ``uint8``)."""

    name = "TensorBoard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def histograms(self, optimizer_idx: int, step: int, histograms: Mapping[str, HistogramData]) -> None:
        write_histograms(self.writer, optimizer_idx, step, histograms)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")


class WandbWriter:
    """Histograms as ``wandb.Histogram(np_histogram=...)``, images as ``wandb.Image``.

    Args:
        run: a ``wandb`` run (``WandbLogger.experiment``).

    Values are logged with ``trainer/global_step`` beside them, as Lightning's ``WandbLogger`` logs
    its metrics, so W&B's step counter is never forced backwards.
    """

    name = "W&B"

    def __init__(self, run: Any) -> None:
        self.run = run

    def histograms(self, optimizer_idx: int, step: int, histograms: Mapping[str, HistogramData]) -> None:
        import wandb

        payload: dict[str, Any] = {
            tag("hist/{layer}", optimizer_idx, layer): wandb.Histogram(np_histogram=histogram_edges(h))
            for layer, h in histograms.items()
        }
        if payload:
            self.run.log({**payload, "trainer/global_step": step})

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(image), "trainer/global_step": step})


class MLflowWriter:
    """The heatmap as a PNG artifact (``<tag>/step_<step>.png``); histograms are skipped.

    Args:
        client: an ``mlflow.MlflowClient`` (``MLFlowLogger.experiment``).
        run_id: the run to attach the artifacts to (``MLFlowLogger.run_id``).
    """

    name = "MLflow"

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def histograms(self, optimizer_idx: int, step: int, histograms: Mapping[str, HistogramData]) -> None:
        """MLflow has no histogram type: nothing is written (:func:`rich_writers` says so once)."""

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{tag}/step_{step:08d}.png")


def rich_writers(loggers: Iterable[Logger]) -> tuple[list[RichWriter], list[str]]:
    """One writer per attached logger that takes histograms or images, and a notice for each other one.

    Args:
        loggers: ``trainer.loggers``.

    Returns:
        ``(writers, notices)``: the writers in logger order, and one line per logger that cannot take
        histograms and images (the caller logs each once, on rank zero), plus one for MLflow's
        missing histogram type.
    """
    writers: list[RichWriter] = []
    notices: list[str] = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writers.append(TensorBoardWriter(logger.experiment))
        elif isinstance(logger, WandbLogger):
            writers.append(WandbWriter(logger.experiment))
        elif isinstance(logger, MLFlowLogger):
            writers.append(MLflowWriter(logger.experiment, str(logger.run_id)))
            notices.append("GradGuard: MLflow has no histogram type; gradient histograms are not sent to MLFlowLogger.")
        else:
            notices.append(
                f"GradGuard: {type(logger).__name__} cannot take histograms or images; they are skipped "
                "for it (its scalars are logged as usual)."
            )
    return writers, notices
