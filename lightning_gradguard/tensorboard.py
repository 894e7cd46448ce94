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

__all__ = ["dashboard_layout", "find_writer", "layer_norm_extremes", "write_histograms"]


def find_writer(loggers: Iterable[Logger]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoard logger, or ``None``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def dashboard_layout(optimizer_indices: Sequence[int]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: one "GradGuard" category per optimizer, one question per card.

    The cards, in the order TensorBoard draws them:

    * **norm within its threshold band**: a margin chart, the pre-clip ``global_norm`` drawn as a
      line inside a shaded band from ``post_clip_norm`` (lower) to ``threshold`` (upper). While
      nothing is clipped the band's lower edge sits on the line; a clipped step pulls it below, and
      the gap between line and upper edge is the headroom left before clipping.
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
        layout[title] = {
            # Margin series are exact tags, not regular expressions.
            "norm within its threshold band": [
                "Margin",
                [tag("global_norm", idx), tag("post_clip_norm", idx), tag("threshold", idx)],
            ],
            "loss": ["Multiline", [t("loss")]],
            "per-layer norm extremes": [
                "Margin",
                [tag("layer_norm_median", idx), tag("layer_norm_min", idx), tag("layer_norm_max", idx)],
            ],
            "update-to-weight ratio (log10)": ["Multiline", [each("update_ratio")]],
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
            "per-layer gradient norm": ["Multiline", [each("layer_norm")]],
            "weight norm": ["Multiline", [each("weight_norm")]],
        }
    return layout


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
