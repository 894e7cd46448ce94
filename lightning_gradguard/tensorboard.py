"""TensorBoard-only outputs: the custom-scalars dashboard, raw histograms, text events and images.

Scalars go through every Lightning logger; what only TensorBoard understands goes through the
``SummaryWriter`` of the first :class:`~lightning.pytorch.loggers.TensorBoardLogger` attached to the
trainer. Both ``torch.utils.tensorboard`` and ``tensorboardX`` writers work.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_gradguard.keys import namespace, tag
from lightning_gradguard.stats import HistogramData

__all__ = ["dashboard_layout", "find_writer", "layer_norm_extremes", "threshold_band", "write_histograms"]


def find_writer(loggers: Iterable[Logger]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoard logger, or ``None``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def dashboard_layout(optimizer_indices: Sequence[int]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: three categories per optimizer, one question per card.

    TensorBoard draws a category's line charts first and its margin charts after them, two charts per
    row, so the categories are cut to put each band beside the line it is read with:

    * "GradGuard": **loss** | **norm within its threshold band**;
    * "GradGuard: layers": update-to-weight ratio, per-layer gradient norm, weight norm, per-layer norm
      extremes;
    * "GradGuard: LR, clipping, skipped steps": learning rate, LR guard scale, clipping, skipped steps
      and rollbacks, global norm between log steps.

    The cards:

    * **norm within its threshold band**: a margin chart, the pre-clip global norm drawn as a line
      inside a shaded band from the post-clip norm (lower) to the threshold (upper). While nothing is
      clipped the band's lower edge sits on the line; a clipped step pulls it below, and the gap
      between line and upper edge is the headroom left before clipping. TensorBoard refuses a margin
      chart whose three tags were not written at the same steps, and the threshold is absent during
      an uncapped warmup, so the chart reads the ``band/...`` copies of :func:`threshold_band`,
      written together and only while a threshold is in force.
    * **loss**: the training loss GradGuard carries (``loss``), to read a norm rise against.
    * **per-layer norm extremes**: a margin chart of the median layer norm between the smallest and
      the largest layer norm (``layer_norm_median`` within ``layer_norm_min`` .. ``layer_norm_max``).
    * **update-to-weight ratio (log10)** and **weight norm**: one line per layer.
    * **learning rate** and **LR guard scale**: each alone, so neither flattens the other.
    * **clipping**, **skipped steps and rollbacks** (counts), **global norm between log steps**
      (``global_norm`` with the interval's max and mean) and **per-layer gradient norm**.

    A torch ``SummaryWriter`` margin chart holds one series, so each band has its own card.

    Args:
        optimizer_indices: index in ``trainer.optimizers`` of every guarded optimizer.

    Returns:
        The dict ``SummaryWriter.add_custom_scalars`` takes: category -> chart title ->
        ``["Multiline", [regex, ...]]`` or ``["Margin", [value, lower, upper]]``.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for idx in optimizer_indices:
        ns = namespace(idx)

        def t(name: str, idx: int = idx) -> str:
            # charts take regular expressions: anchor them, or `clipped` would also chart `clipped_total`
            return f"^{re.escape(tag(name, idx))}$"

        def each(prefix: str, ns: str = ns) -> str:
            return f"^{re.escape(ns)}/{prefix}/.*"

        title = "GradGuard" if idx == 0 else f"GradGuard (optimizer {idx})"
        # TensorBoard draws a category's multiline charts before its margin charts, two per row: each
        # category below holds the margin chart that must sit beside a given line chart.
        layout[title] = {
            # Margin series are exact tags, not regular expressions.
            "norm within its threshold band": [
                "Margin",
                [tag("band/global_norm", idx), tag("band/post_clip_norm", idx), tag("band/threshold", idx)],
            ],
            "loss": ["Multiline", [t("loss")]],
        }
        layout[f"{title}: layers"] = {
            "per-layer norm extremes": [
                "Margin",
                [tag("layer_norm_median", idx), tag("layer_norm_min", idx), tag("layer_norm_max", idx)],
            ],
            "update-to-weight ratio (log10)": ["Multiline", [each("update_ratio")]],
            "per-layer gradient norm": ["Multiline", [each("layer_norm")]],
            "weight norm": ["Multiline", [each("weight_norm")]],
        }
        layout[f"{title}: LR, clipping, skipped steps"] = {
            "learning rate": ["Multiline", [t("lr")]],
            "LR guard scale": ["Multiline", [t("lr_scale")]],
            "clipping": ["Multiline", [t("clip_rate"), t("clipped")]],
            "skipped steps and rollbacks": [
                "Multiline",
                [t("skipped"), t("skipped_total"), t("scaler_skipped"), t("rollbacks_total")],
            ],
            "global gradient norm": [
                "Multiline",
                [t("global_norm"), t("global_norm_max"), t("global_norm_mean")],
            ],
        }
    return layout


def threshold_band(global_norm: float, post_clip_norm: float | None, threshold: float | None) -> dict[str, float]:
    """The three values of the "norm within its threshold band" card, all or none.

    A margin chart needs its value, lower and upper tags at the same steps; this returns the
    ``band/global_norm``, ``band/post_clip_norm`` and ``band/threshold`` values together when a
    threshold is in force and the norms are finite, else nothing.

    Args:
        global_norm: pre-clip global norm of the step.
        post_clip_norm: global norm after clipping (``None`` when clipping is off).
        threshold: the clip threshold in force (``None`` during an uncapped warmup or without clipping).

    Returns:
        Names relative to the namespace (pass them through :func:`~lightning_gradguard.keys.tag`).

    Example:

        >>> threshold_band(3.0, 2.0, 2.0)
        {'band/global_norm': 3.0, 'band/post_clip_norm': 2.0, 'band/threshold': 2.0}
        >>> threshold_band(3.0, 3.0, None)
        {}
    """
    if threshold is None or post_clip_norm is None:
        return {}
    values = (global_norm, post_clip_norm, threshold)
    if not all(math.isfinite(v) for v in values):
        return {}
    return dict(zip(("band/global_norm", "band/post_clip_norm", "band/threshold"), values, strict=True))


def layer_norm_extremes(layer_norms: Mapping[str, float]) -> dict[str, float]:
    """The three values of the "per-layer norm extremes" card, from the layer norms of one step.

    Non-finite norms are left out (the step's ``skipped`` count and the events report them); with no
    finite norm the result is empty.

    Args:
        layer_norms: layer name -> pre-clip L2 gradient norm.

    Returns:
        ``{"layer_norm_min": ..., "layer_norm_median": ..., "layer_norm_max": ...}`` (names relative
        to the namespace: pass them through :func:`~lightning_gradguard.keys.tag`).

    Example:

        >>> layer_norm_extremes({"a": 1.0, "b": 4.0, "c": 2.0, "d": float("nan")})
        {'layer_norm_min': 1.0, 'layer_norm_median': 2.0, 'layer_norm_max': 4.0}
    """
    finite = [v for v in layer_norms.values() if math.isfinite(v)]
    if not finite:
        return {}
    return {
        "layer_norm_min": min(finite),
        "layer_norm_median": statistics.median(finite),
        "layer_norm_max": max(finite),
    }


def write_histograms(writer: Any, optimizer_idx: int, step: int, histograms: Mapping[str, HistogramData]) -> None:
    """Write pre-binned histograms with ``add_histogram_raw`` (no tensor reaches the host)."""
    for layer, h in histograms.items():
        writer.add_histogram_raw(
            tag("hist/{layer}", optimizer_idx, layer),
            min=h.min,
            max=h.max,
            num=h.num,
            sum=h.sum,
            sum_squares=h.sum_squares,
            bucket_limits=h.bucket_limits,
            bucket_counts=h.bucket_counts,
            global_step=step,
        )
